"""The speedrun's optimizer step across 1/2/4/8 GPUs: NorMuon on the parameter banks, Adam on the rest.

Per step, after the last micro-step's backward:
  1. launch, small parameters first, an all-reduce (sum) of every Adam parameter's gradient (only on
     Adam steps: between them the gradients keep accumulating locally), then a reduce-scatter (sum) of
     each bank's gradient, so rank r receives the summed gradient of its own slice of matrices;
  2. as each finishes: Adam updates its (replicated) parameters; NorMuon updates rank r's slice of a bank,
     then an all-gather sends the new slice to every rank. The communication of later tensors runs
     while earlier ones are computed on.
The loss is normalized by the tokens of the whole global step, so summing gradients over ranks gives
the same math at every world size (the micro-steps per rank are 8 // world_size).

With one process nothing is communicated and the same code runs. With gloo (CPU tests) the
reduce-scatter is an all-reduce followed by taking the local slice (gloo has no reduce-scatter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from modded_nanogpt.data.loader import to_device_async
from modded_nanogpt.optim import normuon_update


def _adam_step_count(p, state) -> int:
    """Create p's Adam state on its first update; advance and return the step count."""
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    state["step"] += 1
    return state["step"]


def adam_update(p, grad, state, lr, beta1, beta2, eps, weight_decay):
    """AdamW (decoupled weight decay, bias-corrected moments) on p in place, in torch's fused AdamW kernel:
    one pass over p, grad and the two moments (28 bytes per float). As separate tensor operations (the
    reference below) it moved ~88: 12.3 ms against 5.0 ms per Adam step for the 464M Adam floats of the
    untied speedrun model on an H100 (python -m tests.modded_bench_adam)."""
    t = _adam_step_count(p, state)
    # The kernel reads the (already advanced) step count from a tensor on p's device; a pinned copy does not
    # make the host wait for the GPU.
    step = to_device_async(torch.tensor(float(t), dtype=torch.float32), p.device)
    torch._fused_adamw_([p], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], [], [step], lr=lr, beta1=beta1,
                        beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
                        grad_scale=None, found_inf=None)


def adam_update_reference(p, grad, state, lr, beta1, beta2, eps, weight_decay):
    """adam_update as plain tensor operations (the slow reference of the tests)."""
    t = _adam_step_count(p, state)
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(eps)
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))


@dataclass
class AdamGroup:
    name: str
    params: list
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    every_step: bool = False  # False: accumulate over two steps, update on Adam steps only


@dataclass
class BankSpec:
    name: str
    param: torch.nn.Parameter
    shape: tuple[int, int, int]  # the bank viewed as (matrices, rows, cols): whole matrices to shard

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
        self.muon_state: dict[str, dict] = {bank.name: {} for bank in banks}
        self.adam_state: dict[int, dict] = {}
        self.distributed = world_size > 1
        self.gloo = self.distributed and dist.get_backend() == "gloo"

    def _shard(self, tensor, bank: BankSpec):
        per_rank = bank.matrices // self.world_size
        return tensor.view(bank.shape)[self.rank * per_rank : (self.rank + 1) * per_rank]

    def _adam_params(self, adam_step: bool):
        # Small parameters first: their all-reduces finish early and Adam can start on them.
        params = [(g, p) for g in self.adam_groups if adam_step or g.every_step for p in g.params if p.grad is not None]
        return sorted(params, key=lambda gp: gp[1].numel())

    @torch.no_grad()
    def step(self, lr_multiplier: float, adam_step: bool):
        """One update; Adam parameters only when adam_step (their gradients are then zeroed)."""
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
                           momentum=self.muon["momentum"], beta2=self.muon["beta2"],
                           weight_decay=self.muon["weight_decay"])
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
        """Carry src's Adam moments over to dst (the untie step: head -> embedding, transposed). The moments are
        laid out as dst is: CUDA's fused AdamW refuses moments whose strides differ from the parameter's (a
        transposed view's clone keeps the transposed strides; CPU's accepts them)."""
        state = self.adam_state.get(id(src))
        if state:
            self.adam_state[id(dst)] = {k: (transform(v).clone(memory_format=torch.contiguous_format)
                                            if torch.is_tensor(v) else v) for k, v in state.items()}
