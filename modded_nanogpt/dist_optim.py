"""The speedrun's optimizer step across 1/2/4/8 GPUs: NorMuon on the parameter banks, Adam on the rest.

Per step, after the last micro-step's backward:
  1. launch, small parameters first, an all-reduce (sum) of every Adam parameter's gradient (only on
     Adam steps: between them the gradients keep accumulating locally), then a reduce-scatter (sum) of
     each bank's gradient, so rank r receives the summed gradient of its own slice of matrices;
  2. as each finishes: Adam updates its (replicated) parameters; NorMuon updates rank r's slice of a bank,
     then an all-gather sends the new slice to every rank. The communication of later tensors runs
     while earlier ones are computed on.
A bank may give each matrix its own NorMuon learning-rate multiplier (BankSpec.lr_muls); a rank applies
those of its own matrices. Every micro-step's loss has the same scale at every world size (train_gpt's
LOSS_DIVISOR), so summing gradients over ranks gives the same math at every world size (the micro-steps per
rank are 8 // world_size).

With one process nothing is communicated and the same code runs. With gloo (CPU tests) the
reduce-scatter is an all-reduce followed by taking the local slice (gloo has no reduce-scatter).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from modded_nanogpt.data.loader import to_device_async
from modded_nanogpt.kernels import use_triton
from modded_nanogpt.optim import normuon_update

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machines: adam_update runs the reference math
    triton = tl = None


def _adam_step_count(p, state) -> int:
    """Create p's Adam state on its first update; advance and return the step count."""
    if not state:
        moment_dtype = torch.promote_types(p.dtype, torch.float32)  # float32 moments, float64 in tests
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment_dtype)
    state["step"] += 1
    return state["step"]


def _adam_scalars(t, lr, beta1, beta2, weight_decay):
    """Host floats of step t: the bias-corrected step size and the decay coefficient lr^2 * c."""
    return lr * (1 - beta2**t) ** 0.5 / (1 - beta1**t), lr * lr * weight_decay


def adam_update_reference(p, grad, state, lr, beta1, beta2, eps, weight_decay):
    """One Adam step of p in place, as the speedrun record computes it, in plain tensor operations:

        m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
        update = m / (sqrt(v) + eps) * lr * sqrt(1 - beta2^t) / (1 - beta1^t)
        p <- p - update - lr^2 * weight_decay * p * [update * p > 0]

    lr is this step's learning rate, t the step count (from 1, kept in state). The decay is cautious (only
    where the update moves p toward zero) and scales with the square of the learning rate."""
    t = _adam_step_count(p, state)
    _adam_math(p, grad, state["exp_avg"], state["exp_avg_sq"], t, lr, beta1, beta2, eps, weight_decay)


def _adam_math(p, grad, exp_avg, exp_avg_sq, t, lr, beta1, beta2, eps, weight_decay):
    grad = grad.to(exp_avg.dtype)
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size, decay = _adam_scalars(t, lr, beta1, beta2, weight_decay)
    update = exp_avg / (exp_avg_sq.sqrt() + eps) * step_size
    if weight_decay != 0:
        before = p.to(update.dtype)
        update += torch.where(update * before > 0, before, 0) * decay
    p.sub_(update.to(p.dtype))


_ADAM_BLOCK = 2048

if triton is not None:

    @triton.jit
    def _adam_kernel(p_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, numel, beta1, beta2, eps, step_size, decay,
                     BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < numel
        p = tl.load(p_ptr + offsets, mask=inside)
        g = tl.load(grad_ptr + offsets, mask=inside).to(tl.float32)
        m = beta1 * tl.load(exp_avg_ptr + offsets, mask=inside) + (1 - beta1) * g
        v = beta2 * tl.load(exp_avg_sq_ptr + offsets, mask=inside) + (1 - beta2) * g * g
        update = m / (tl.sqrt_rn(v) + eps) * step_size
        update += tl.where(update * p > 0, p * decay, 0.0)
        tl.store(exp_avg_ptr + offsets, m, mask=inside)
        tl.store(exp_avg_sq_ptr + offsets, v, mask=inside)
        tl.store(p_ptr + offsets, p - update, mask=inside)


def adam_update(p, grad, state, lr, beta1, beta2, eps, weight_decay):
    """adam_update_reference's math; on CUDA in one Triton pass over p, grad and the two moments (28 bytes per
    float): 3.2 ms against the reference's 15.8 ms for 464M floats (12 tables of 50304 x 768) on an H200, at
    4.0 TB/s (python -m modded_nanogpt.bench.adam times the model's own). The step size and decay are host
    floats (the step count lives on the host), so nothing waits for the GPU and no value recompiles the
    kernel. The kernel walks the tensors as flat arrays, so it takes a float32 p and moments laid out
    contiguously, as _adam_step_count and copy_adam_state make them; other layouts, and CPU tensors, take
    the reference math."""
    t = _adam_step_count(p, state)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    fused = (use_triton(p) and p.dtype == exp_avg.dtype == exp_avg_sq.dtype == torch.float32
             and p.is_contiguous() and exp_avg.is_contiguous() and exp_avg_sq.is_contiguous())
    if not fused:
        return _adam_math(p, grad, exp_avg, exp_avg_sq, t, lr, beta1, beta2, eps, weight_decay)
    step_size, decay = _adam_scalars(t, lr, beta1, beta2, weight_decay)
    numel = p.numel()
    grid = (triton.cdiv(numel, _ADAM_BLOCK),)
    _adam_kernel[grid](p, grad.contiguous(), exp_avg, exp_avg_sq, numel, beta1, beta2, eps, step_size, decay,
                       BLOCK=_ADAM_BLOCK, num_warps=8)


@dataclass
class AdamGroup:
    name: str
    params: list
    lr: float  # base learning rate; a step uses lr * its lr_multiplier
    betas: tuple[float, float]
    weight_decay: float  # c of the cautious decay lr_t^2 * c * p (adam_update_reference)
    every_step: bool = False  # False: accumulate over two steps, update on Adam steps only


@dataclass
class BankSpec:
    name: str
    param: torch.nn.Parameter
    shape: tuple[int, int, int]  # the bank viewed as (matrices, rows, cols): whole matrices to shard
    lr_muls: Sequence[float] | None = None  # NorMuon learning-rate multiplier per matrix; None: all 1

    def __post_init__(self):
        if self.lr_muls is not None and len(self.lr_muls) != self.matrices:
            raise ValueError(f"bank {self.name}: {len(self.lr_muls)} lr_muls for {self.matrices} matrices")

    @property
    def matrices(self) -> int:
        return self.shape[0]


class SpeedrunOptimizer:
    """NorMuon (sharded over ranks) on banks + replicated Adam groups; see the module docstring."""

    def __init__(self, banks: list[BankSpec], adam_groups: list[AdamGroup], muon_lr, muon_momentum, muon_beta2,
                 muon_weight_decay, adam_eps, rank=0, world_size=1):
        for bank in banks:
            if bank.matrices % world_size:
                raise ValueError(f"bank {bank.name}: {bank.matrices} matrices do not split over world_size {world_size}")
        self.banks, self.adam_groups = banks, adam_groups
        self.muon = dict(lr=muon_lr, momentum=muon_momentum, beta2=muon_beta2, weight_decay=muon_weight_decay)
        self.adam_eps = adam_eps
        self.rank, self.world_size = rank, world_size
        self.bank_lr_muls = {bank.name: self._slice_lr_mul(bank) for bank in banks}
        self.muon_state: dict[str, dict] = {bank.name: {} for bank in banks}
        self.adam_state: dict[int, dict] = {}
        self.distributed = world_size > 1
        self.gloo = self.distributed and dist.get_backend() == "gloo"

    def _slice_lr_mul(self, bank: BankSpec):
        """The multipliers of this rank's matrices: a float where they are all equal, else a (matrices, 1, 1)
        tensor on the bank's device, made once here so a step copies nothing to the GPU."""
        per_rank = bank.matrices // self.world_size
        muls = [1.0] * bank.matrices if bank.lr_muls is None else [float(m) for m in bank.lr_muls]
        muls = muls[self.rank * per_rank : (self.rank + 1) * per_rank]
        if len(set(muls)) == 1:
            return muls[0]
        dtype = torch.promote_types(bank.param.dtype, torch.float32)
        return to_device_async(torch.tensor(muls, dtype=dtype).view(-1, 1, 1), bank.param.device)

    def _shard(self, tensor, bank: BankSpec):
        per_rank = bank.matrices // self.world_size
        return tensor.view(bank.shape)[self.rank * per_rank : (self.rank + 1) * per_rank]

    def _adam_params(self, adam_step: bool):
        # Small parameters first: their all-reduces finish early and Adam can start on them.
        params = [(g, p) for g in self.adam_groups if adam_step or g.every_step for p in g.params if p.grad is not None]
        return sorted(params, key=lambda gp: gp[1].numel())

    @torch.no_grad()
    def step(self, lr_multiplier: float, adam_step: bool, muon_momentum: float | None = None):
        """One update; Adam parameters only when adam_step (their gradients are then zeroed). muon_momentum:
        NorMuon's momentum for this step (the schedule's); None: the constructor's."""
        momentum = self.muon["momentum"] if muon_momentum is None else muon_momentum
        pending = []
        adam = self._adam_params(adam_step)
        for _, p in adam:
            pending.append(dist.all_reduce(p.grad, async_op=True) if self.distributed else None)
        bank_grads = []
        for bank in self.banks:
            grad = bank.param.grad
            if grad is None:
                bank_grads.append((None, None))
            elif not self.distributed:
                bank_grads.append((self._shard(grad, bank), None))
            elif self.gloo:
                bank_grads.append((grad, dist.all_reduce(grad, async_op=True)))
            else:
                out = torch.empty_like(self._shard(grad, bank))
                full = grad.view(bank.shape)
                bank_grads.append((out, dist.reduce_scatter_tensor(out, full, async_op=True)))

        for (group, p), work in zip(adam, pending, strict=True):
            if work is not None:
                work.wait()
            adam_update(p, p.grad, self.adam_state.setdefault(id(p), {}), group.lr * lr_multiplier,
                        *group.betas, self.adam_eps, group.weight_decay)
            p.grad = None

        gathers = []
        for bank, (grad, work) in zip(self.banks, bank_grads, strict=True):
            if grad is None:
                continue
            if work is not None:
                work.wait()
            if self.gloo:
                grad = self._shard(grad, bank)
            shard = self._shard(bank.param.data, bank)
            normuon_update(shard, grad, self.muon_state[bank.name], lr=self.muon["lr"] * lr_multiplier,
                           momentum=momentum, beta2=self.muon["beta2"],
                           weight_decay=self.muon["weight_decay"], lr_mul=self.bank_lr_muls[bank.name])
            if self.distributed:
                full = bank.param.data.view(bank.shape)
                if self.gloo:
                    pieces = list(full.chunk(self.world_size))
                    gathers.append(dist.all_gather(pieces, shard.clone(), async_op=True))
                    gathers[-1].wait()  # gloo's all_gather writes into views only once it completes
                else:
                    gathers.append(dist.all_gather_into_tensor(full, shard.clone(), async_op=True))
            bank.param.grad = None
        for work in gathers:
            work.wait()

    # --- checkpoints: the full state on every rank's behalf, independent of the world size ------------

    def state_dict(self) -> dict:
        muon = {}
        for bank in self.banks:
            state = self.muon_state[bank.name]
            if not state:
                continue
            muon[bank.name] = {k: self._gather(v) for k, v in state.items()}
        names = {id(p): f"{g.name}.{i}" for g in self.adam_groups for i, p in enumerate(g.params)}
        adam = {names[key]: {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in st.items()}
                for key, st in self.adam_state.items() if key in names}
        return {"muon": muon, "adam": adam, "pending_grads": self._pending_grads()}

    def _pending_grads(self) -> dict:
        """The gradients Adam parameters have accumulated since the last Adam step (between Adam steps they
        are not applied yet), summed over the ranks, as the next Adam step would sum them: a checkpoint taken
        between the two steps must carry them, or the resumed run drops one step's Adam gradient."""
        pending = {}
        for g in self.adam_groups:
            for i, p in enumerate(g.params):
                if g.every_step or p.grad is None:
                    continue
                grad = p.grad.detach().clone()
                if self.distributed:
                    dist.all_reduce(grad)
                pending[f"{g.name}.{i}"] = grad.cpu()
        return pending

    def _gather(self, shard: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return shard.detach().cpu().clone()
        pieces = [torch.empty_like(shard) for _ in range(self.world_size)]
        dist.all_gather(pieces, shard.contiguous())
        return torch.cat(pieces).cpu()

    def load_state_dict(self, state: dict) -> None:
        for bank in self.banks:
            saved = state["muon"].get(bank.name)
            if saved is None:
                self.muon_state[bank.name] = {}
                continue
            device = bank.param.device
            per_rank = bank.matrices // self.world_size
            self.muon_state[bank.name] = {
                k: v[self.rank * per_rank : (self.rank + 1) * per_rank].to(device).clone() for k, v in saved.items()
            }
        self.adam_state = {}
        pending = state.get("pending_grads", {})
        for g in self.adam_groups:
            for i, p in enumerate(g.params):
                saved = state["adam"].get(f"{g.name}.{i}")
                if saved is not None:
                    self.adam_state[id(p)] = {k: (v.to(p.device).clone() if torch.is_tensor(v) else v) for k, v in saved.items()}
                # Rank 0 holds the summed pending gradient; the next Adam step's all-reduce adds the others'
                # new ones. Gradients left over from before the load (the warmup's) are dropped.
                grad = pending.get(f"{g.name}.{i}")
                p.grad = grad.to(device=p.device, dtype=p.dtype).clone() if grad is not None and self.rank == 0 else None

    def copy_adam_state(self, src: torch.nn.Parameter, dst: torch.nn.Parameter, transform=lambda t: t) -> None:
        """Carry src's Adam moments and step count over to dst (the untie step: head -> embedding,
        transposed). The moments are made contiguous, as dst is: adam_update's kernel walks p and its moments
        as flat arrays (a transposed view's clone keeps the transposed strides, which would send dst to the
        slow path)."""
        state = self.adam_state.get(id(src))
        if state:
            self.adam_state[id(dst)] = {k: (transform(v).clone(memory_format=torch.contiguous_format)
                                            if torch.is_tensor(v) else v) for k, v in state.items()}
