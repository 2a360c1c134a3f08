"""The lm_head and the cross-entropy loss in one op, with the gradient of the logits made in the forward.

    linear_cross_entropy(x, weight, targets, ignore_index=-1)
        = F.cross_entropy(x @ weight.T, targets, ignore_index=ignore_index), the mean over rows whose
          target is not ignore_index, computed in (at least) float32 as under autocast.

Why: in the compiled trainer the loss reads the (tokens x 50304) bf16 logits once in the forward and
once more in the backward, which then writes their gradient: three passes over 13 GB per micro-batch
of 128 x 1024 tokens, at ~1.5 TB/s in Inductor's kernels (nanogpt/PERF_NOTES.md). Here the forward
runs cuBLAS for the logits, then ONE Triton kernel per micro-batch, a program per row:
  pass 1  an online log-sum-exp over the row in float32 (a running max and sum per lane), so the
          row's loss is lse - logit[target];
  pass 2  re-reads the row, still in L2, and overwrites the logits IN PLACE with the gradient of the
          row's loss, softmax - onehot(target) (zeros for an ignored row), in the logits' dtype.
The backward then has only its two matrix products: grad_x = G @ weight and grad_weight = G.T @ x,
each scaled afterwards by grad_loss / n_valid (n_valid = rows not ignored, counted on the GPU: no
host sync). The scale is applied to those small outputs, not to G: a float16 G divided by ~10^5
rows would underflow, and scaling G would be one more pass over it.

The fused path runs for CUDA tensors in bfloat16 or float16 where triton imports; everything else
(CPU, float32, no triton) takes `linear_cross_entropy_reference`, plain PyTorch. The fused op is a
torch.library custom op with a fake (shape) function and registered autograd, so torch.compile
traces it as one opaque node. Under torch.no_grad (or when neither x nor weight requires grad) the
gradient pass is skipped and the logits freed at once. Nothing here touches CUDA at import; triton
is imported under a guard and the kernel exists only where it imports.

The kernel's block size and warp count are tuned once per (vocab, dtype, device) on the first call,
on a scratch buffer of random logits (the real buffer cannot serve: the kernel overwrites it).
`python -m nanogpt.fused_loss` prints that tuning on a GPU: time and bandwidth of every candidate.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machines: linear_cross_entropy runs its reference
    triton = tl = None

_FUSED_DTYPES = (torch.bfloat16, torch.float16)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The softmax runs in at least float32, as autocast runs cross_entropy."""
    return torch.promote_types(dtype, torch.float32)


def linear_cross_entropy_reference(x, weight, targets, ignore_index: int = -1):
    """The same loss in plain PyTorch: logits in x's dtype, the cross-entropy in at least float32."""
    logits = x @ weight.t()
    return F.cross_entropy(logits.to(_loss_dtype(logits.dtype)), targets, ignore_index=ignore_index)


def fused_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where linear_cross_entropy runs the Triton kernel: CUDA, 16-bit floats, triton importable."""
    return triton is not None and x.is_cuda and x.dtype in _FUSED_DTYPES and weight.dtype == x.dtype


def linear_cross_entropy(x, weight, targets, ignore_index: int = -1):
    """Mean cross-entropy of logits x @ weight.T over the rows whose target is not ignore_index.

    x (N, C), weight (V, C), targets (N,) integers in [0, V) or ignore_index. Returns a scalar in
    at least float32; differentiable in x and weight. All rows ignored gives NaN, as F.cross_entropy.
    """
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[1] or targets.shape != x.shape[:1]:
        raise ValueError(f"linear_cross_entropy needs x (N, C), weight (V, C) and targets (N,), got x "
                         f"{tuple(x.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}")
    if not fused_path(x, weight):
        return linear_cross_entropy_reference(x, weight, targets, ignore_index)
    compute_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    loss, _ = torch.ops.nanogpt.linear_cross_entropy(x, weight, targets, ignore_index, compute_grad)
    return loss


# ---------------------------------------------------------------------------------------------
# the op: logits by cuBLAS, then per row the loss and (in place) the gradient of the logits
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("nanogpt::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                             compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, G) where G (N, V) = d(sum of row losses)/d(logits) if compute_grad, else (0, V)."""
    logits = torch.mm(x, weight.t())
    targets = targets.contiguous()
    if logits.is_cuda and triton is not None:
        row_losses = _row_losses_triton_(logits, targets, ignore_index, compute_grad)
    else:  # the op's own CPU path, so that its autograd and fake function are testable without a GPU
        row_losses = _row_losses_torch_(logits, targets, ignore_index, compute_grad)
    loss = row_losses.sum() / (targets != ignore_index).sum()
    return loss, (logits if compute_grad else logits.new_empty((0, logits.shape[1])))


@_linear_cross_entropy_op.register_fake
def _(x, weight, targets, ignore_index, compute_grad):
    loss = x.new_empty((), dtype=_loss_dtype(x.dtype))
    return loss, x.new_empty((x.shape[0] if compute_grad else 0, weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, targets, ignore_index, _ = inputs
    ctx.save_for_backward(x, weight, targets, output[1])
    ctx.ignore_index = ignore_index
    # G is a by-product, not a result: its gradient is never formed (set_materialize_grads(False)
    # passes None instead of a zero tensor as large as the logits).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_of_g):
    x, weight, targets, grad_logits = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None
    scale = grad_loss / (targets != ctx.ignore_index).sum()  # d(mean loss) = d(sum) / n_valid, on the GPU
    grad_x = (grad_logits @ weight) * scale if ctx.needs_input_grad[0] else None
    grad_weight = (grad_logits.t() @ x) * scale if ctx.needs_input_grad[1] else None
    return grad_x, grad_weight, None, None, None


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def _row_losses_torch_(logits, targets, ignore_index: int, compute_grad: bool):
    """What the kernel does, in PyTorch: per-row losses; logits overwritten by softmax - onehot."""
    z = logits.to(_loss_dtype(logits.dtype))
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)[:, None]
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    row_losses = torch.where(valid, (lse - z.gather(1, safe_targets)).squeeze(1), 0.0)
    if compute_grad:
        grad = torch.exp(z - lse).scatter_add_(1, safe_targets, -torch.ones_like(lse))
        logits.copy_(torch.where(valid[:, None], grad, 0.0))
    return row_losses


# ---------------------------------------------------------------------------------------------
# the Triton kernel and its tuning
# ---------------------------------------------------------------------------------------------

# (BLOCK_V, num_warps, L2 hints) candidates. The best one holds enough bytes in flight per SM to keep HBM busy.
# Measured on an H100 at 131,072 x 50,304 (python -m nanogpt.fused_loss): loss + gradient 13.0 ms
# (4096, 16) = 2.0 TB/s counting one read and one write per logit (the re-read of pass 2 comes from
# L2); loss only 4.3 ms = 3.1 TB/s. A persistent grid holding 1-16 rows per SM in flight (so that the
# re-read surely hits L2) measured 13.6-21.3 ms: no better, so not kept.
_CONFIGS = tuple((block, warps, hints) for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16),
                                                           (8192, 16), (8192, 32)) for hints in (False, True))
_TUNE_ROWS = 16384  # rows of the tuning buffer: 1.6 GB at vocab 50304 in bf16, far more than L2
_tuned: dict[tuple, tuple[int, int, bool]] = {}

if triton is not None:

    @triton.jit
    def _cross_entropy_rows_kernel(logits_ptr, targets_ptr, row_losses_ptr, row_stride, vocab, ignore_index,
                                   WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, L2_HINTS: tl.constexpr):
        # L2_HINTS: pass 1 asks L2 to keep the row (evict_last), pass 2 walks it backwards (the chunks
        # pass 1 read last are the likeliest still there) and marks what it reads and writes evict_first.
        row = tl.program_id(0).to(tl.int64)  # int64: rows x vocab exceeds 2^31
        row_ptr = logits_ptr + row * row_stride
        target = tl.load(targets_ptr + row)
        valid = target != ignore_index
        target = tl.where(valid, target, 0)  # an ignored row reads column 0, then contributes nothing
        target_logit = tl.load(row_ptr + target).to(tl.float32)  # read before pass 2 overwrites it
        cols = tl.arange(0, BLOCK_V)

        # Pass 1: online log-sum-exp, each lane keeping its own max m and sum s of exp(z - m), so the
        # loop has no cross-lane reduction and one exp per element: a new maximum rescales the sum by
        # exp(old - new), otherwise the element adds exp(z - m). m starts finite, so the -inf of
        # masked columns gives exp(-inf) = 0 instead of exp(-inf + inf) = NaN.
        m = tl.full([BLOCK_V], -1.0e30, tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            z = tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf"),
                        eviction_policy="evict_last" if L2_HINTS else "").to(tl.float32)
            e = tl.exp(-tl.abs(z - m))
            s = tl.where(z > m, s * e + 1.0, s + e)
            m = tl.maximum(m, z)
        row_max = tl.max(m, axis=0)
        lse = row_max + tl.log(tl.sum(s * tl.exp(m - row_max), axis=0))
        tl.store(row_losses_ptr + row, tl.where(valid, lse - target_logit, 0.0))

        # Pass 2: the row again (from L2), overwritten with d(row loss)/d(logits) = softmax - onehot.
        if WRITE_GRAD:
            chunks = tl.cdiv(vocab, BLOCK_V)
            for i in range(0, chunks):
                offs = ((chunks - 1 - i) if L2_HINTS else i) * BLOCK_V + cols
                mask = offs < vocab
                z = tl.load(row_ptr + offs, mask=mask, other=0.0,
                            eviction_policy="evict_first" if L2_HINTS else "").to(tl.float32)
                grad = tl.exp(z - lse) - tl.where(offs == target, 1.0, 0.0)
                grad = tl.where(valid, grad, 0.0)
                tl.store(row_ptr + offs, grad.to(logits_ptr.dtype.element_ty), mask=mask,
                         eviction_policy="evict_first" if L2_HINTS else "")


def _launch(logits, targets, row_losses, ignore_index: int, write_grad: bool, block_v: int, num_warps: int,
            l2_hints: bool):
    _cross_entropy_rows_kernel[(logits.shape[0],)](
        logits, targets, row_losses, logits.stride(0), logits.shape[1], ignore_index,
        WRITE_GRAD=write_grad, BLOCK_V=block_v, L2_HINTS=l2_hints, num_warps=num_warps,
    )


def _candidates(vocab: int, write_grad: bool) -> list[tuple[int, int, bool]]:
    """Configs whose block is not far wider than the row (all of them at vocab 50304); without the
    gradient pass the L2 hints change nothing, so only the configs without them."""
    widest = max(_CONFIGS[0][0], triton.next_power_of_2(vocab))
    return [c for c in _CONFIGS if c[0] <= widest and (write_grad or not c[2])]


def tune(vocab: int, dtype: torch.dtype, device, write_grad: bool = True, rows: int = _TUNE_ROWS) -> dict:
    """Milliseconds of each (BLOCK_V, num_warps, L2 hints) on `rows` random rows: {config: ms}."""
    from triton.testing import do_bench

    generator = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG (dropout, resumption) alone
    scratch = torch.randn((rows, vocab), dtype=dtype, device=device, generator=generator)
    targets = torch.randint(0, vocab, (rows,), device=device, generator=generator)
    row_losses = torch.empty(rows, dtype=torch.float32, device=device)
    # The kernel overwrites the scratch rows with gradients on its first run; its cost does not
    # depend on the values, so the later runs time the same work.
    return {config: do_bench(lambda config=config: _launch(scratch, targets, row_losses, -1, write_grad, *config))
            for config in _candidates(vocab, write_grad)}


def _row_losses_triton_(logits, targets, ignore_index: int, compute_grad: bool):
    rows, vocab = logits.shape
    key = (vocab, logits.dtype, logits.device.index, compute_grad)
    if key not in _tuned:
        times = tune(vocab, logits.dtype, logits.device, compute_grad)
        _tuned[key] = min(times, key=times.get)
    row_losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _launch(logits, targets, row_losses, ignore_index, compute_grad, *_tuned[key])
    return row_losses


def main(argv: list[str] | None = None):
    """Print the kernel's tuning at the trainer's shape (time and HBM bandwidth of each config), and
    beside it the compiled PyTorch loss on the same logits: forward + backward, as the trainer without it."""
    from triton.testing import do_bench

    argv = sys.argv[1:] if argv is None else argv
    rows = int(argv[0]) if argv else 131072  # one micro-batch of 128 x 1024 tokens
    vocab = int(argv[1]) if len(argv) > 1 else 50304
    if triton is None or not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU and triton")
    logit_bytes = rows * vocab * 2  # bf16
    for write_grad in (True, False):
        times = tune(vocab, torch.bfloat16, torch.device("cuda"), write_grad, rows)
        moved = 2 * logit_bytes if write_grad else logit_bytes  # HBM: read once (pass 2 hits L2), write once
        print(f"fused kernel, {rows} rows x {vocab}, bf16, {'loss and gradient' if write_grad else 'loss only'}:")
        for (block_v, num_warps, hints), ms in sorted(times.items(), key=lambda item: item[1]):
            print(f"  BLOCK_V {block_v:5d}  num_warps {num_warps:2d}  L2 hints {hints!s:5}  {ms:7.3f} ms  "
                  f"{moved / ms / 1e9:5.2f} TB/s")

    logits = torch.randn((rows, vocab), dtype=torch.bfloat16, device="cuda", requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), device="cuda")

    inductor_loss = torch.compile(lambda logits, targets: F.cross_entropy(logits.float(), targets, ignore_index=-1))
    ms = do_bench(lambda: torch.autograd.grad(inductor_loss(logits, targets), logits))
    print(f"torch.compile'd F.cross_entropy forward + backward on the same logits: {ms:7.3f} ms "
          f"({3 * logit_bytes / ms / 1e9:5.2f} TB/s counting 2 reads + 1 write)")


if __name__ == "__main__":
    main()
