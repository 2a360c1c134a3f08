"""softcapped_cross_entropy: multi-token-prediction cross-entropy on sigmoid-capped logits, in one Triton pass
over each row forward and one backward; fp8_softcapped_cross_entropy: the fp8 head (fp8.py) and this loss as
one op, whose backward writes the logits' gradient straight as e5m2 codes. The kernels' sigmoid follows
common.FAST_SIGMOID (through common.fast_sigmoid, read at call time).
"""

import functools

import torch
import torch.nn.functional as F

from modded_nanogpt.kernels import common
from modded_nanogpt.kernels.common import (
    FLOAT8_E4M3,
    FLOAT8_E5M2,
    fast_sigmoid,
    has_fp8_tensor_cores,
    tl,
    tma_ready,
    triton,
)
from modded_nanogpt.kernels.fp8 import _check_fp8_shapes, _fp8_linear_forward, _fp8_linear_grads, fp8_linear

# Softcapped logits lie in (0, cap), so the forward kernel shifts them by cap instead of by a running maximum:
# every exp(capped - cap) lies in (exp(-cap), 1], a normal float32 for cap <= 80 (exp(-87.3) is the smallest).
MAX_CAP = 80.0


def _check_ce_args(logits, targets, mtp_weights, cap, reduction):
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"softcapped_cross_entropy needs logits (N, V) and targets (N,), "
                         f"got logits shape {tuple(logits.shape)} and targets shape {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
    if isinstance(mtp_weights, torch.Tensor) and mtp_weights.ndim != 1:
        raise ValueError(f"mtp_weights as a tensor must be 1-D, got shape {tuple(mtp_weights.shape)}")
    if len(mtp_weights) == 0:
        raise ValueError("mtp_weights must hold at least one weight (weight of the next token first)")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if not 0 < cap <= MAX_CAP:
        raise ValueError(f"cap must be in (0, {MAX_CAP}], got {cap}: the kernels sum exp(capped - cap), which "
                         f"stays a normal float32 only for caps up to {MAX_CAP}")


def softcap(logits, cap=23.0, shift=5.0, div=7.5):
    """cap * sigmoid((logits + shift) / div), in at least float32: the speedrun's bounded logits."""
    return cap * torch.sigmoid((logits.to(torch.promote_types(logits.dtype, torch.float32)) + shift) / div)


def softcapped_cross_entropy_reference(logits, targets, mtp_weights, cap=23.0, shift=5.0, div=7.5,
                                       reduction="sum", with_next_token=False):
    """The loss of softcapped_cross_entropy in plain PyTorch, at least fp32, autograd by torch.

    float64 logits are computed in float64, so torch.autograd.gradcheck applies.
    """
    _check_ce_args(logits, targets, mtp_weights, cap, reduction)
    rows = logits.shape[0]
    capped = softcap(logits, cap, shift, div)
    log_probs = torch.log_softmax(capped, dim=-1)
    loss = log_probs.new_zeros(())
    next_token = None
    for k in range(min(len(mtp_weights), rows)):
        picked = log_probs[: rows - k].gather(1, targets[k:, None].long()).squeeze(1)
        loss = loss - mtp_weights[k] * picked.sum()
        if k == 0:
            next_token = -picked.detach().sum()
    scale = 1 / rows if reduction == "mean" else 1
    return (loss * scale, next_token * scale) if with_next_token else loss * scale


def softcapped_cross_entropy(logits, targets, mtp_weights, cap=23.0, shift=5.0, div=7.5, reduction="sum",
                             with_next_token=False):
    """Multi-token-prediction cross-entropy on softcapped logits, an fp32 scalar.

    s = cap * sigmoid((logits + shift) / div) bounds the logits to (0, cap). The loss is
    sum over rows t and k = 0..len(mtp_weights)-1 of mtp_weights[k] * CE(s_t, targets[t + k]),
    skipping t + k >= N: row t also predicts the token k steps after its own target.
    reduction "mean" divides by N. logits (N, V) bf16/fp16/fp32, targets (N,) ints in [0, V)
    (not checked on GPU: checking would cost a host sync). Gradients come back in the
    logits' dtype.

    mtp_weights: a tuple/list of python floats, or a 1-D float tensor on the logits' device.
    Under torch.compile floats are baked into the graph, so changing them recompiles; a
    tensor's values can change freely (only a change of its length recompiles).

    with_next_token=True returns (loss, next_token_loss): the second is the unweighted k = 0 term
    alone (sum over rows of CE(s_t, targets[t]), same reduction), without gradient, the loss a
    trainer logs next to its MTP objective. The fused kernel writes it in the same pass.

    The fused forward makes one pass over each row (softcap, log-sum-exp shifted by cap, and the
    target terms) and keeps only the row's log-sum-exp; the backward recomputes the softcap
    from the logits rather than saving an (N, V) gradient in the forward, so evaluation
    without grad writes nothing of size (N, V) and the incoming gradient is applied in the
    same pass that writes grad_logits.
    """
    _check_ce_args(logits, targets, mtp_weights, cap, reduction)
    if not common.use_triton(logits):
        return softcapped_cross_entropy_reference(logits, targets, mtp_weights, cap, shift, div, reduction,
                                                  with_next_token)
    if isinstance(mtp_weights, torch.Tensor):
        weights, weight_values = mtp_weights, []
    else:
        weights, weight_values = None, [float(w) for w in mtp_weights]
    row_losses, _, row_next = torch.ops.modded_nanogpt.softcapped_cross_entropy(
        logits, targets, weights, weight_values, float(cap), float(shift), float(div))
    scale = 1 / logits.shape[0] if reduction == "mean" else 1
    loss = row_losses.sum() * scale
    return (loss, row_next.detach().sum() * scale) if with_next_token else loss


def softcapped_token_losses_reference(logits, targets, cap=23.0, shift=5.0, div=7.5):
    """CE(softcap(logits_t), targets[t]) for every row t: (N,) float32 (at least), no reduction."""
    _check_ce_args(logits, targets, (1.0,), cap, "sum")
    return F.cross_entropy(softcap(logits, cap, shift, div), targets.long(), reduction="none")


def softcapped_token_losses(logits, targets, cap=23.0, shift=5.0, div=7.5):
    """softcapped_token_losses_reference through the fused forward kernel on GPU (its per-row next-token term):
    one pass over the logits, where the reference writes and reads an fp32 copy of them. Per-token scores
    (the study probes) then come from the kernel validation's loss comes from. No gradient."""
    if not common.use_triton(logits):
        return softcapped_token_losses_reference(logits, targets, cap, shift, div)
    _check_ce_args(logits, targets, (1.0,), cap, "sum")
    return torch.ops.modded_nanogpt.softcapped_cross_entropy(logits, targets, None, [1.0], float(cap), float(shift),
                                                             float(div))[2]


@functools.lru_cache(maxsize=64)
def _weights_on_device(values, device):
    return torch.tensor(values, dtype=torch.float32, device=device)


def _mtp_weight_tensor(weights, weight_values, device):
    """The weights as an fp32 tensor on device. Python floats are copied there once per distinct
    tuple and cached: a fresh host-to-device copy on every call would make each call wait for
    the GPU (and could not be captured in a CUDA graph)."""
    if weights is not None:
        return weights.to(device=device, dtype=torch.float32).contiguous()
    return _weights_on_device(tuple(weight_values), device)


@torch.library.custom_op("modded_nanogpt::softcapped_cross_entropy", mutates_args=())
def _softcapped_ce_op(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None,
                      weight_values: list[float], cap: float, shift: float,
                      div: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_losses, row_lse, row_next), fp32 (N,): each row's weighted loss terms, its log-sum-exp and its
    unweighted next-token loss (no gradient flows through row_lse or row_next).

    The MTP weights come either as a tensor (weights) or as floats (weight_values, weights None).
    """
    return _softcapped_ce_forward(logits, targets, weights, weight_values, cap, shift, div)


def _softcapped_ce_forward(logits, targets, weights, weight_values, cap, shift, div):
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    rows, vocab = logits.shape
    weights = _mtp_weight_tensor(weights, weight_values, logits.device)
    row_losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    row_lse = torch.empty_like(row_losses)
    row_next = torch.empty_like(row_losses)
    _softcapped_ce_forward_kernel[(rows,)](
        logits, logits.stride(0), targets.contiguous(), weights, row_losses, row_lse, row_next,
        rows, vocab, cap, shift, 1.0 / div, N_MTP=weights.numel(), FAST=fast_sigmoid(logits),
    )
    return row_losses, row_lse, row_next


@_softcapped_ce_op.register_fake
def _(logits, targets, weights, weight_values, cap, shift, div):
    row_losses = logits.new_empty(logits.shape[:1], dtype=torch.float32)
    return row_losses, torch.empty_like(row_losses), torch.empty_like(row_losses)


@torch.library.custom_op("modded_nanogpt::softcapped_cross_entropy_backward", mutates_args=())
def _softcapped_ce_backward_op(grad_rows: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                               weights: torch.Tensor | None, weight_values: list[float], row_lse: torch.Tensor,
                               cap: float, shift: float, div: float) -> torch.Tensor:
    """grad_logits, in the logits' dtype, for per-row loss gradients grad_rows (N,)."""
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    rows, vocab = logits.shape
    weights = _mtp_weight_tensor(weights, weight_values, logits.device)
    grad_logits = torch.empty((rows, vocab), dtype=logits.dtype, device=logits.device)
    # grad_rows is often the expanded gradient of a sum: stride 0, read as such.
    _softcapped_ce_backward_kernel[(rows,)](
        grad_rows, grad_rows.stride(0), logits, logits.stride(0), grad_logits, grad_logits.stride(0),
        targets.contiguous(), weights, row_lse, rows, vocab, cap, shift, 1.0 / div, N_MTP=weights.numel(),
        FAST=fast_sigmoid(logits),
    )
    return grad_logits


@_softcapped_ce_backward_op.register_fake
def _(grad_rows, logits, targets, weights, weight_values, row_lse, cap, shift, div):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _softcapped_ce_setup_context(ctx, inputs, output):
    logits, targets, weights, weight_values, cap, shift, div = inputs
    ctx.save_for_backward(logits, targets, weights, output[1])
    ctx.args = (weight_values, cap, shift, div)


def _softcapped_ce_backward(ctx, grad_rows, _grad_lse, _grad_next):
    logits, targets, weights, row_lse = ctx.saved_tensors
    weight_values, cap, shift, div = ctx.args
    grad_logits = torch.ops.modded_nanogpt.softcapped_cross_entropy_backward(
        grad_rows, logits, targets, weights, weight_values, row_lse, cap, shift, div)
    return grad_logits, None, None, None, None, None, None


_softcapped_ce_op.register_autograd(_softcapped_ce_backward, setup_context=_softcapped_ce_setup_context)


# ---------------------------------------------------------------------------------------------
# fp8_softcapped_cross_entropy: the fp8 head and the loss as one op
# ---------------------------------------------------------------------------------------------

def fp8_softcapped_cross_entropy(x, weight_t, targets, mtp_weights, x_scale, w_scale, grad_scale,
                                 cap=23.0, shift=5.0, div=7.5, with_next_token=False):
    """softcapped_cross_entropy(fp8_linear(x, weight_t, x_scale, w_scale, grad_scale), targets,
    mtp_weights), reduction "sum": the same function, with half the memory traffic in backward.

    Apart, the loss's backward writes the logits' gradient in bf16 and fp8_linear's backward reads it
    back to quantize it (bytes moved per element: 2 + 2 + 2 + 2 + 1 + 1); here one kernel reads the
    logits, computes each gradient element, rounds it to bf16 (so the codes are those of the two ops
    apart) and writes its e5m2 code in both layouts the products take (2 + 1 + 1). x (N, K), weight_t (K, V),
    targets (N,). Elsewhere than on fp8 tensor cores it is the composition of the two ops.
    with_next_token: as in softcapped_cross_entropy.
    """
    _check_fp8_shapes(x, weight_t)
    if not (common.use_triton(x) and x.ndim == 2 and has_fp8_tensor_cores(x.device.index)):
        logits = fp8_linear(x, weight_t, x_scale, w_scale, grad_scale)
        return softcapped_cross_entropy(logits, targets, mtp_weights, cap, shift, div, reduction="sum",
                                        with_next_token=with_next_token)
    _check_ce_args(x, targets, mtp_weights, cap, "sum")
    if isinstance(mtp_weights, torch.Tensor):
        weights, weight_values = mtp_weights, []
    else:
        weights, weight_values = None, [float(w) for w in mtp_weights]
    row_losses, _, row_next, *_ = torch.ops.modded_nanogpt.fp8_softcapped_cross_entropy(
        x, weight_t, targets, weights, weight_values, float(x_scale), float(w_scale), float(grad_scale),
        float(cap), float(shift), float(div))
    return (row_losses.sum(), row_next.detach().sum()) if with_next_token else row_losses.sum()


@torch.library.custom_op("modded_nanogpt::fp8_softcapped_cross_entropy", mutates_args=())
def _fp8_ce_op(x: torch.Tensor, weight_t: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None,
               weight_values: list[float], x_scale: float, w_scale: float, grad_scale: float, cap: float,
               shift: float, div: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor, torch.Tensor]:
    """(row_losses, row_lse, row_next, logits, x_fp8^T, weight_t_fp8); the last three are kept for backward."""
    logits, x_fp8_t, w_fp8 = _fp8_linear_forward(x, weight_t, x_scale, w_scale)
    row_losses, row_lse, row_next = _softcapped_ce_forward(logits, targets, weights, weight_values, cap, shift, div)
    return row_losses, row_lse, row_next, logits, x_fp8_t, w_fp8


@_fp8_ce_op.register_fake
def _(x, weight_t, targets, weights, weight_values, x_scale, w_scale, grad_scale, cap, shift, div):
    row_losses = x.new_empty(x.shape[:1], dtype=torch.float32)
    logits = x.new_empty((x.shape[0], weight_t.shape[1]), dtype=torch.bfloat16)
    x_fp8_t = x.new_empty((x.shape[1], x.shape[0]), dtype=FLOAT8_E4M3)
    return (row_losses, torch.empty_like(row_losses), torch.empty_like(row_losses), logits, x_fp8_t,
            weight_t.new_empty(weight_t.shape, dtype=FLOAT8_E4M3))


@torch.library.custom_op("modded_nanogpt::fp8_softcapped_cross_entropy_backward", mutates_args=())
def _fp8_ce_backward_op(grad_rows: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                        weights: torch.Tensor | None, weight_values: list[float], row_lse: torch.Tensor,
                        x_fp8_t: torch.Tensor, w_fp8: torch.Tensor, x_scale: float, w_scale: float,
                        grad_scale: float, cap: float, shift: float, div: float, x_dtype: torch.dtype,
                        w_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight_t) for per-row loss gradients grad_rows (N,)."""
    grad_fp8, grad_fp8_t = _softcapped_ce_grad_fp8(grad_rows, logits, targets, weights, weight_values, row_lse,
                                                   cap, shift, div, grad_scale)
    return _fp8_linear_grads(grad_fp8, grad_fp8_t, x_fp8_t, w_fp8, x_scale, w_scale, grad_scale, x_dtype, w_dtype)


@_fp8_ce_backward_op.register_fake
def _(grad_rows, logits, targets, weights, weight_values, row_lse, x_fp8_t, w_fp8, x_scale, w_scale, grad_scale,
      cap, shift, div, x_dtype, w_dtype):
    grad_x = logits.new_empty((logits.shape[0], w_fp8.shape[0]), dtype=x_dtype)
    return grad_x, w_fp8.new_empty(w_fp8.shape, dtype=w_dtype)


def _softcapped_ce_grad_fp8(grad_rows, logits, targets, weights, weight_values, row_lse, cap, shift, div,
                            grad_scale, block_r=32, block_c=128, num_warps=4, col_tiles=16, prefetch=True,
                            tma=False, stages=2):
    """The loss's gradient w.r.t. the logits as e5m2 codes of grad / grad_scale, (N, V) and (V, N), the same
    codes every way below. Programs of block_r x block_c tiles, each reading its rows' factors once and walking
    col_tiles tiles along them. Pointer loads and stores by default, with `prefetch` each tile's load issued before
    the tile before it is computed; tma=True moves the tiles through TMA descriptors instead (Hopper or later,
    rows of q and q^T 16-byte aligned: common.tma_ready; None picks it where that holds), the walk's loads
    pipelined over `stages` stages by Triton. The tiles leave out the MTP terms' one-hots; a second kernel then
    writes the codes of the target logits.
    At a stage-3 micro-step (49,152 x 50,304) on an H200: 32 x 128 tiles with prefetch (the default) 2.86 ms;
    64 x 64 with prefetch 3.04 ms; TMA 64 x 64, 2 stages, 4.03 ms (the fastest while the tile loop ran three times
    as many instructions) (modded_nanogpt/PERF_NOTES.md)."""
    rows, vocab = logits.shape
    weights = _mtp_weight_tensor(weights, weight_values, logits.device)
    q = torch.empty((rows, vocab), dtype=FLOAT8_E5M2, device=logits.device)
    q_t = torch.empty((vocab, rows), dtype=FLOAT8_E5M2, device=logits.device)
    targets = targets.contiguous()
    grid = (triton.cdiv(rows, block_r), triton.cdiv(vocab, block_c * col_tiles))
    if tma is None:
        tma = tma_ready(logits, q, q_t)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        descs = [TensorDescriptor.from_tensor(t, block) for t, block in
                 ((logits, [block_r, block_c]), (q, [block_r, block_c]), (q_t, [block_c, block_r]))]
        _softcapped_ce_grad_fp8_tma_kernel[grid](
            grad_rows, grad_rows.stride(0), *descs, targets, weights, weights.numel(), row_lse, rows, vocab, cap,
            shift, 1.0 / div, grad_scale, BLOCK_R=block_r, BLOCK_C=block_c, COL_TILES=col_tiles,
            FAST=fast_sigmoid(logits), STAGES=stages, num_warps=num_warps)
    else:
        _softcapped_ce_grad_fp8_kernel[grid](
            grad_rows, grad_rows.stride(0), logits, logits.stride(0), logits.stride(1), q, q_t, targets, weights,
            weights.numel(), row_lse, rows, vocab, cap, shift, 1.0 / div, grad_scale, BLOCK_R=block_r,
            BLOCK_C=block_c, COL_TILES=col_tiles, FAST=fast_sigmoid(logits), PREFETCH=prefetch, num_warps=num_warps)
    entries = rows * weights.numel()  # then the target logits' codes, over the tile kernels'
    _softcapped_ce_grad_fp8_targets_kernel[(triton.cdiv(entries, 128),)](
        grad_rows, grad_rows.stride(0), logits, logits.stride(0), logits.stride(1), q, q_t, targets, weights,
        weights.numel(), row_lse, rows, vocab, cap, shift, 1.0 / div, grad_scale, BLOCK=128,
        FAST=fast_sigmoid(logits), num_warps=4)
    return q, q_t


def _fp8_ce_setup_context(ctx, inputs, output):
    x, weight_t, targets, weights, weight_values, x_scale, w_scale, grad_scale, cap, shift, div = inputs
    _, row_lse, _, logits, x_fp8_t, w_fp8 = output
    ctx.save_for_backward(logits, targets, weights, row_lse, x_fp8_t, w_fp8)
    ctx.args = (weight_values, x_scale, w_scale, grad_scale, cap, shift, div, x.dtype, weight_t.dtype)


def _fp8_ce_backward(ctx, grad_rows, *_unused):
    logits, targets, weights, row_lse, x_fp8_t, w_fp8 = ctx.saved_tensors
    weight_values, x_scale, w_scale, grad_scale, cap, shift, div, x_dtype, w_dtype = ctx.args
    grad_x, grad_w = torch.ops.modded_nanogpt.fp8_softcapped_cross_entropy_backward(
        grad_rows, logits, targets, weights, weight_values, row_lse, x_fp8_t, w_fp8, x_scale, w_scale, grad_scale,
        cap, shift, div, x_dtype, w_dtype)
    return grad_x, grad_w, None, None, None, None, None, None, None, None, None


_fp8_ce_op.register_autograd(_fp8_ce_backward, setup_context=_fp8_ce_setup_context)


# ---------------------------------------------------------------------------------------------
# Triton kernels (defined only where triton imports)
# ---------------------------------------------------------------------------------------------

if triton is not None:
    from modded_nanogpt.kernels.common import exp2, sigmoid, tanh

    LOG2E = tl.constexpr(1.4426950408889634)  # log2(e), for exp(x) = 2^(x log2(e))

    _ROW_CONFIGS = [triton.Config({"BLOCK_V": 1024}, num_warps=4), triton.Config({"BLOCK_V": 2048}, num_warps=8),
                    triton.Config({"BLOCK_V": 4096}, num_warps=8), triton.Config({"BLOCK_V": 4096}, num_warps=16)]

    # N_MTP (the number of MTP weights) is a run-time value, not specialized: one binary per config serves
    # every stage (as a constexpr, each stage's count compiled all configs of both kernels again).
    @triton.autotune(configs=_ROW_CONFIGS, key=["V", "N_MTP"])
    @triton.jit(do_not_specialize=["N_MTP"])
    def _softcapped_ce_forward_kernel(logits_ptr, stride_row, targets_ptr, weights_ptr, row_loss_ptr, row_lse_ptr,
                                      row_next_ptr, N, V, cap, shift, inv_div, N_MTP, BLOCK_V: tl.constexpr,
                                      FAST: tl.constexpr):
        """One program per row: log-sum-exp of the softcapped row, then its weighted target terms and its
        unweighted next-token term (the loss the trainer logs)."""
        row = tl.program_id(0)
        row_ptr = logits_ptr + row.to(tl.int64) * stride_row
        # lse = cap + log(sum exp(capped - cap)): capped < cap bounds every term by 1 (MAX_CAP keeps it above
        # float32's underflow), so no running maximum, and each lane sums its own terms; one reduction at the end
        # instead of a maximum and a sum across the block per BLOCK_V columns.
        # In t = tanh(u / 2) of u = (z + shift) / div (the sigmoid being (1 + t) / 2), exp(capped - cap) is
        # 2^((t - 1) cap log2(e) / 2): an FMA into the tanh and one into the exp2 per logit.
        half_cap_log2e = 0.5 * cap * LOG2E
        sum_exp = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < V
            z = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            t = tanh(z * (0.5 * inv_div) + 0.5 * shift * inv_div, FAST)
            sum_exp += tl.where(in_row, exp2(t * half_cap_log2e - half_cap_log2e, FAST), 0.0)
        lse = cap + tl.log(tl.sum(sum_exp, axis=0))

        loss = 0.0
        for k in range(N_MTP):
            valid = row + k < N
            target = tl.load(targets_ptr + row + k, mask=valid, other=0)
            z_target = tl.load(row_ptr + target).to(tl.float32)
            capped_target = cap * sigmoid((z_target + shift) * inv_div, FAST)
            loss += tl.where(valid, tl.load(weights_ptr + k) * (lse - capped_target), 0.0)
        z_next = tl.load(row_ptr + tl.load(targets_ptr + row)).to(tl.float32)
        tl.store(row_next_ptr + row, lse - cap * sigmoid((z_next + shift) * inv_div, FAST))
        tl.store(row_loss_ptr + row, loss)
        tl.store(row_lse_ptr + row, lse)

    @triton.autotune(configs=_ROW_CONFIGS, key=["V", "N_MTP"])
    @triton.jit(do_not_specialize=["N_MTP"])
    def _softcapped_ce_backward_kernel(grad_rows_ptr, grad_rows_stride, logits_ptr, stride_row, grad_ptr,
                                       grad_stride_row, targets_ptr, weights_ptr, row_lse_ptr, N, V, cap, shift,
                                       inv_div, N_MTP, BLOCK_V: tl.constexpr, FAST: tl.constexpr):
        """grad = g_t * (W_t softmax(s) - sum_k w_k onehot(y_{t+k})) * ds/dz, with W_t the valid weights' sum:
        one program per row, as a (1, BLOCK_V) tile of _ce_grad_tile at a time."""
        rows = (tl.program_id(0) + tl.arange(0, 1)).to(tl.int64)  # this row, as the (1,) rows of a tile
        g, c, weight_total = _ce_grad_row_factors(rows, grad_rows_ptr, grad_rows_stride, weights_ptr, N_MTP,
                                                  row_lse_ptr, N, cap, inv_div)
        g, c, weight_total = g[:, None], c[:, None], weight_total[:, None]
        row_ptr = logits_ptr + rows[:, None] * stride_row
        grad_row_ptr = grad_ptr + rows[:, None] * grad_stride_row
        for start in range(0, V, BLOCK_V):
            cols = (start + tl.arange(0, BLOCK_V))[None, :]
            in_row = cols < V
            z = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            grad = _ce_grad_tile(z, rows, cols, g, c, weight_total, targets_ptr, weights_ptr, N_MTP, N, cap, shift,
                                 inv_div, FAST)
            tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)

    # Per-row values are loaded as 1-D vectors and broadcast afterwards: loaded as (R, 1) tensors in a tile's
    # layout, each thread loaded every value once per column it holds (16 loads per value for a 64 x 64 tile
    # with 4 warps: Triton's loads are not merged like its arithmetic).
    @triton.jit
    def _ce_grad_row_factors(rows, grad_rows_ptr, grad_rows_stride, weights_ptr, n_mtp, row_lse_ptr, N, cap,
                             inv_div):
        """(g, c, weight_total) of rows (R,), what _ce_grad_tile takes per row, each (R,): g = grad_row * cap *
        inv_div / 4, c = (cap / 2 - lse) log2(e), and the sum of the row's valid MTP weights."""
        in_rows = rows < N
        grad_row = tl.load(grad_rows_ptr + rows * grad_rows_stride, mask=in_rows, other=0.0)
        lse = tl.load(row_lse_ptr + rows, mask=in_rows, other=0.0)
        weight_total = tl.zeros(rows.shape, dtype=tl.float32)
        for k in range(n_mtp):
            weight_total += tl.where(rows + k < N, tl.load(weights_ptr + k), 0.0)
        return grad_row * (0.25 * cap * inv_div), (0.5 * cap - lse) * LOG2E, weight_total

    @triton.jit
    def _e5m2_codes(grad, inv_scale, fp8_dtype: tl.constexpr):
        """e5m2(bf16(grad) * inv_scale): the quotient by the scale as one rounded product, not the correctly
        rounded division of fp8._to_fp8. A bf16 value has 8 significant bits and the codes 3, so the two differ
        only where the quotient lies within a float32 ulp or so of a rounding boundary of the codes (about one
        logit in a million, by one code). The conversion saturates (cvt.rn.satfinite): no clamp. Both layouts'
        stores want the codes in their own register layout, and Triton quantizes once per layout (it converts
        the bf16 tile rather than the codes), so every instruction here counts twice."""
        return (grad.to(tl.bfloat16).to(tl.float32) * inv_scale).to(fp8_dtype, fp_downcast_rounding="rtne")

    @triton.jit
    def _ce_grad_tile(z, rows, cols, g, c, weight_total, targets_ptr, weights_ptr, n_targets, N, cap, shift, inv_div,
                      FAST: tl.constexpr):
        """The softcapped CE's gradient for a (R, C) tile of logits z: rows (R,), cols (1, C), the row factors of
        _ce_grad_row_factors as (R, 1): g_t (W_t softmax(s) - sum_k w_k onehot(y_{t+k})) ds/dz, with W_t the sum of
        the row's valid weights. Written in t = tanh(u / 2) of u = (z + shift) / div, the sigmoid being
        (1 + t) / 2: the capped logit is cap (1 + t) / 2, its softmax probability 2^(t cap log2(e) / 2 + c), its
        derivative in z cap inv_div (1 - t^2) / 4. So an FMA, the tanh, an FMA and the exp2, then three
        instructions for the chain rule per logit (the fp8 kernel is bound by instruction issue); the same
        values as the sigmoid's form up to float32 rounding. n_targets: how many of the MTP terms' one-hots to
        subtract here (0: none, for the tile kernels, which leave the target logits to
        _softcapped_ce_grad_fp8_targets_kernel)."""
        t = tanh(z * (0.5 * inv_div) + (0.5 * shift * inv_div), FAST)
        dloss_dcapped = weight_total * exp2(t * (0.5 * cap * LOG2E) + c, FAST)
        for k in range(n_targets):
            target = tl.load(targets_ptr + rows + k, mask=rows + k < N, other=-1)  # -1 matches no column
            dloss_dcapped -= tl.where(cols == target[:, None], tl.load(weights_ptr + k), 0.0)
        return dloss_dcapped * (1.0 - t * t) * g

    @triton.jit(do_not_specialize=["N_MTP"])
    def _softcapped_ce_grad_fp8_kernel(grad_rows_ptr, grad_rows_stride, logits_ptr, stride_r, stride_c, q_ptr,
                                       q_t_ptr, targets_ptr, weights_ptr, N_MTP, row_lse_ptr, N, V, cap, shift,
                                       inv_div, scale, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                                       COL_TILES: tl.constexpr, FAST: tl.constexpr, PREFETCH: tl.constexpr):
        """q = e5m2(bf16(grad) / scale) of (BLOCK_R, BLOCK_C) tiles of the CE gradient, (N, V) row-major, and
        q_t = q^T, (V, N) row-major: bf16 first, as the CE backward followed by the quantizer, whose codes these
        are up to float32 rounding (_ce_grad_tile, _e5m2_codes). tl.trans of the codes, not a second,
        transposed read (12.3 against 5.6 ms on an H100 at 49,152 x 50,304)."""
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        g, c, weight_total = _ce_grad_row_factors(rows, grad_rows_ptr, grad_rows_stride, weights_ptr, N_MTP,
                                                  row_lse_ptr, N, cap, inv_div)
        g, c, weight_total = g[:, None], c[:, None], weight_total[:, None]
        inv_scale = tl.div_rn(1.0, scale)
        first = tl.program_id(1) * COL_TILES * BLOCK_C
        if PREFETCH:  # the first tile's logits; each iteration then issues the next tile's load before its work
            cols = (first + tl.arange(0, BLOCK_C)).to(tl.int64)
            z_next = tl.load(logits_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c,
                             mask=(rows[:, None] < N) & (cols[None, :] < V), other=0.0)
        for tile in range(COL_TILES):  # COL_TILES tiles along the rows, their factors read once
            cols = (first + tile * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
            mask = (rows[:, None] < N) & (cols[None, :] < V)
            mask_t = (cols[:, None] < V) & (rows[None, :] < N)
            if PREFETCH:
                z = z_next
                after = cols + BLOCK_C  # past the walk's last tile or the row's end: masked off, nothing read
                z_next = tl.load(logits_ptr + rows[:, None] * stride_r + after[None, :] * stride_c,
                                 mask=(rows[:, None] < N) & (after[None, :] < V) & (tile + 1 < COL_TILES), other=0.0)
            else:
                z = tl.load(logits_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)
            grad = _ce_grad_tile(z.to(tl.float32), rows, cols[None, :], g, c, weight_total, targets_ptr, weights_ptr,
                                 0, N, cap, shift, inv_div, FAST)  # the target logits: the targets kernel
            codes = _e5m2_codes(grad, inv_scale, q_ptr.dtype.element_ty)
            tl.store(q_ptr + rows[:, None] * V + cols[None, :], codes, mask=mask)
            tl.store(q_t_ptr + cols[:, None] * N + rows[None, :], tl.trans(codes), mask=mask_t)

    @triton.jit(do_not_specialize=["N_MTP"])
    def _softcapped_ce_grad_fp8_tma_kernel(grad_rows_ptr, grad_rows_stride, logits_desc, q_desc, q_t_desc, targets_ptr,
                                           weights_ptr, N_MTP, row_lse_ptr, N, V, cap, shift, inv_div, scale,
                                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, COL_TILES: tl.constexpr,
                                           FAST: tl.constexpr, STAGES: tl.constexpr):
        """_softcapped_ce_grad_fp8_kernel with its tiles moved by TMA: the logits loaded, q and q^T stored
        through descriptors, which leave out what lies past the tensors' edges (no masks)."""
        row0 = tl.program_id(0) * BLOCK_R
        rows = (row0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        g, c, weight_total = _ce_grad_row_factors(rows, grad_rows_ptr, grad_rows_stride, weights_ptr, N_MTP,
                                                  row_lse_ptr, N, cap, inv_div)
        g, c, weight_total = g[:, None], c[:, None], weight_total[:, None]
        inv_scale = tl.div_rn(1.0, scale)
        for tile in tl.range(COL_TILES, num_stages=STAGES):  # STAGES > 1: the next tiles' loads issued ahead
            col0 = (tl.program_id(1) * COL_TILES + tile) * BLOCK_C
            cols = (col0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            z = logits_desc.load([row0, col0])
            grad = _ce_grad_tile(z.to(tl.float32), rows, cols[None, :], g, c, weight_total, targets_ptr, weights_ptr,
                                 0, N, cap, shift, inv_div, FAST)  # the target logits: the targets kernel
            codes = _e5m2_codes(grad, inv_scale, q_desc.dtype)
            q_desc.store([row0, col0], codes)
            q_t_desc.store([col0, row0], tl.trans(codes))

    @triton.jit(do_not_specialize=["N_MTP"])
    def _softcapped_ce_grad_fp8_targets_kernel(grad_rows_ptr, grad_rows_stride, logits_ptr, stride_r, stride_c,
                                               q_ptr, q_t_ptr, targets_ptr, weights_ptr, N_MTP, row_lse_ptr, N, V,
                                               cap, shift, inv_div, scale, BLOCK: tl.constexpr, FAST: tl.constexpr):
        """The codes of the target logits, after a tile kernel wrote them without the MTP terms' one-hots: entry
        (row, k) of the N x N_MTP is the logit (row, target[row + k]), recomputed by _ce_grad_tile with every
        term and written to q and q^T. An entry whose logit another k of its row shares writes the same code.
        So the tile kernels save the compare, select and subtract per logit and per MTP weight."""
        entry = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        rows = (entry // N_MTP).to(tl.int64)
        valid = (entry < N * N_MTP) & (rows + entry % N_MTP < N)
        cols = tl.load(targets_ptr + rows + entry % N_MTP, mask=valid, other=0).to(tl.int64)
        g, c, weight_total = _ce_grad_row_factors(rows, grad_rows_ptr, grad_rows_stride, weights_ptr, N_MTP,
                                                  row_lse_ptr, N, cap, inv_div)
        z = tl.load(logits_ptr + rows * stride_r + cols * stride_c, mask=valid, other=0.0).to(tl.float32)
        grad = _ce_grad_tile(z[:, None], rows, cols[:, None], g[:, None], c[:, None], weight_total[:, None],
                             targets_ptr, weights_ptr, N_MTP, N, cap, shift, inv_div, FAST)
        codes = tl.reshape(_e5m2_codes(grad, tl.div_rn(1.0, scale), q_ptr.dtype.element_ty), (BLOCK,))
        tl.store(q_ptr + rows * V + cols, codes, mask=valid)
        tl.store(q_t_ptr + cols * N + rows, codes, mask=valid)
