"""fp8_linear: x @ weight_t (the lm_head, stored transposed) on fp8 tensor cores, e4m3 operands forward and
e5m2 gradients backward, each scale a divisor before a saturating cast. A Triton kernel writes each quantized
operand in both layouts cuBLASLt's fp8 matmul takes; where the GPU has no fp8 tensor cores (before sm_89) the
same products are simulated in fp32, exactly as the reference does them.
"""

import torch

from modded_nanogpt.kernels import common
from modded_nanogpt.kernels.common import FLOAT8_E4M3, FLOAT8_E5M2, has_fp8_tensor_cores, tl, triton


def _quantize(t, scale, dtype):
    """(t / scale) cast to an fp8 dtype, saturating at its largest finite value.

    The scale is the divisor before the cast, so it should be about max|t| / 448 for e4m3 and
    a value's fp8 code times the scale gives it back. The division is done in fp32: rounding
    t / scale to bf16 first and then to fp8 would round twice, off by one fp8 step in about
    3% of the values. Saturating (rather than the NaN or inf that an overflowing cast can
    give) keeps one outlier from poisoning a whole step.
    """
    bound = torch.finfo(dtype).max
    return (t.float() / scale).clamp(-bound, bound).to(dtype)


def _dequantize(t_fp8, scale):
    return t_fp8.float() * scale


def _quantize_both_layouts(t, scale, dtype):
    """_quantize of a 2-D t, returned as (q, q_t): q row-major and q_t = q.T made contiguous.

    cuBLASLt's fp8 matmul takes its first operand row-major and its second column-major, and
    each of the three products of fp8_linear uses an operand in the other layout than its
    sibling, so every quantized tensor is written both ways in one pass (one read of t).
    Where the GPU has no fp8 tensor cores, plain torch ops do the same.
    """
    if not (t.is_cuda and has_fp8_tensor_cores(t.device.index)):
        q = _quantize(t, scale, dtype)
        return q, q.mT.contiguous()
    rows, cols = t.shape
    q = torch.empty((rows, cols), dtype=dtype, device=t.device)
    q_t = torch.empty((cols, rows), dtype=dtype, device=t.device)
    grid = (triton.cdiv(rows, 64), triton.cdiv(cols, 64))
    _quantize_fp8_kernel[grid](t, q, q_t, rows, cols, t.stride(0), t.stride(1), scale, torch.finfo(dtype).max,
                               BLOCK_R=64, BLOCK_C=64, num_warps=4)
    return q, q_t


def _fp8_matmul(a, b, scale_a, scale_b, out_dtype, fast_accum):
    """(a * scale_a) @ (b * scale_b) for fp8 a (m, k) and b (k, n), returned in out_dtype.

    torch._scaled_mm (cuBLASLt) where the GPU has fp8 tensor cores (sm_89 and later) and every
    dim is a multiple of 16, as it requires; a must be row-major and b column-major (the
    callers pass them so; .contiguous() below is then free). Elsewhere the same product is
    simulated in fp32, exactly as the reference does it.
    """
    dims_ok = all(d % 16 == 0 for d in (*a.shape, b.shape[1]))
    if a.is_cuda and dims_ok and has_fp8_tensor_cores(a.device.index):
        scale_a = torch.full((), scale_a, dtype=torch.float32, device=a.device)
        scale_b = torch.full((), scale_b, dtype=torch.float32, device=a.device)
        return torch._scaled_mm(a.contiguous(), b.mT.contiguous().mT, scale_a, scale_b,
                                out_dtype=out_dtype, use_fast_accum=fast_accum)
    return (_dequantize(a, scale_a) @ _dequantize(b, scale_b)).to(out_dtype)


class _Fp8LinearReference(torch.autograd.Function):
    """The fp8 recipe simulated in fp32: quantize, dequantize, multiply exactly.

    Straight-through: each gradient is the exact product of the quantized operands, as on the
    tensor cores; nothing is propagated through the rounding itself.
    """

    @staticmethod
    def forward(ctx, x, weight_t, x_scale, w_scale, grad_scale):
        x_q = _dequantize(_quantize(x, x_scale, FLOAT8_E4M3), x_scale)
        w_q = _dequantize(_quantize(weight_t, w_scale, FLOAT8_E4M3), w_scale)
        ctx.save_for_backward(x_q, w_q)
        ctx.grad_scale, ctx.dtypes = grad_scale, (x.dtype, weight_t.dtype)
        return (x_q @ w_q).to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad):
        x_q, w_q = ctx.saved_tensors
        g_q = _dequantize(_quantize(grad, ctx.grad_scale, FLOAT8_E5M2), ctx.grad_scale)
        x_dtype, w_dtype = ctx.dtypes
        return (g_q @ w_q.mT).to(x_dtype), (x_q.mT @ g_q).to(w_dtype), None, None, None


def fp8_linear_reference(x, weight_t, x_scale, w_scale, grad_scale):
    """fp8_linear simulated in plain PyTorch (fp32 products of fp8-rounded values), bf16 out."""
    _check_fp8_shapes(x, weight_t)
    return _Fp8LinearReference.apply(x, weight_t, x_scale, w_scale, grad_scale)


def fp8_linear(x, weight_t, x_scale, w_scale, grad_scale):
    """Logits x @ weight_t in bf16 through fp8 tensor cores. x (..., K), weight_t (K, V).

    weight_t is the lm_head stored transposed (model_dim x vocab). Scales are python floats
    and are divisors: x_fp8 = (x / x_scale).to(e4m3), w_fp8 = (weight_t / w_scale).to(e4m3),
    and in backward grad_fp8 = (grad / grad_scale).to(e5m2); each cast saturates at the
    format's largest finite value (448 for e4m3, 57344 for e5m2), so pick scale ~ max|value| /
    that bound. Gradients come back in x's and weight_t's dtypes (fp32 master weights work).
    The forward product sums over K (768) and uses fast, less often promoted, accumulation;
    the backward ones sum over the vocabulary (grad_x) and over the tokens (grad_weight_t),
    long sums that get cuBLASLt's accurate accumulation.
    """
    _check_fp8_shapes(x, weight_t)
    if not common.use_triton(x):
        return fp8_linear_reference(x, weight_t, x_scale, w_scale, grad_scale)
    out, _, _ = torch.ops.modded_nanogpt.fp8_linear(
        x.reshape(-1, x.shape[-1]), weight_t, float(x_scale), float(w_scale), float(grad_scale))
    return out.reshape(*x.shape[:-1], weight_t.shape[1])


def _check_fp8_shapes(x, weight_t):
    if x.ndim < 1 or weight_t.ndim != 2 or x.shape[-1] != weight_t.shape[0]:
        raise ValueError(f"fp8_linear needs x (..., K) and weight_t (K, V) with the same K, "
                         f"got x shape {tuple(x.shape)} and weight_t shape {tuple(weight_t.shape)}")


@torch.library.custom_op("modded_nanogpt::fp8_linear", mutates_args=())
def _fp8_linear_op(x: torch.Tensor, weight_t: torch.Tensor, x_scale: float, w_scale: float,
                   grad_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, x_fp8^T, weight_t_fp8): the fp8 operands are returned in the layouts backward needs."""
    return _fp8_linear_forward(x, weight_t, x_scale, w_scale)


def _fp8_linear_forward(x, weight_t, x_scale, w_scale):
    x_fp8, x_fp8_t = _quantize_both_layouts(x, x_scale, FLOAT8_E4M3)
    w_fp8, w_fp8_t = _quantize_both_layouts(weight_t, w_scale, FLOAT8_E4M3)
    out = _fp8_matmul(x_fp8, w_fp8_t.mT, x_scale, w_scale, torch.bfloat16, fast_accum=True)
    return out, x_fp8_t, w_fp8


@_fp8_linear_op.register_fake
def _(x, weight_t, x_scale, w_scale, grad_scale):
    out = x.new_empty((x.shape[0], weight_t.shape[1]), dtype=torch.bfloat16)
    x_fp8_t = x.new_empty((x.shape[1], x.shape[0]), dtype=FLOAT8_E4M3)
    return out, x_fp8_t, weight_t.new_empty(weight_t.shape, dtype=FLOAT8_E4M3)


@torch.library.custom_op("modded_nanogpt::fp8_linear_backward", mutates_args=())
def _fp8_linear_backward_op(grad: torch.Tensor, x_fp8_t: torch.Tensor, w_fp8: torch.Tensor,
                            x_scale: float, w_scale: float, grad_scale: float,
                            x_dtype: torch.dtype, w_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight_t). Both products pair e5m2 with e4m3, which _scaled_mm supports
    (tested on H100 with torch 2.11); only e5m2 x e5m2 is refused, and nothing here needs it."""
    grad_fp8, grad_fp8_t = _quantize_both_layouts(grad, grad_scale, FLOAT8_E5M2)
    return _fp8_linear_grads(grad_fp8, grad_fp8_t, x_fp8_t, w_fp8, x_scale, w_scale, grad_scale, x_dtype, w_dtype)


def _fp8_linear_grads(grad_fp8, grad_fp8_t, x_fp8_t, w_fp8, x_scale, w_scale, grad_scale, x_dtype, w_dtype):
    # grad_x = grad @ weight_t^T: w_fp8 is row-major (K, V), so its transpose is column-major.
    grad_x = _fp8_matmul(grad_fp8, w_fp8.mT, grad_scale, w_scale, x_dtype, fast_accum=False)
    grad_w = _fp8_matmul(x_fp8_t, grad_fp8_t.mT, x_scale, grad_scale, w_dtype, fast_accum=False)
    return grad_x, grad_w


@_fp8_linear_backward_op.register_fake
def _(grad, x_fp8_t, w_fp8, x_scale, w_scale, grad_scale, x_dtype, w_dtype):
    grad_x = grad.new_empty((grad.shape[0], w_fp8.shape[0]), dtype=x_dtype)
    return grad_x, w_fp8.new_empty(w_fp8.shape, dtype=w_dtype)


def _fp8_linear_setup_context(ctx, inputs, output):
    x, weight_t, x_scale, w_scale, grad_scale = inputs
    ctx.save_for_backward(output[1], output[2])
    ctx.scales, ctx.dtypes = (x_scale, w_scale, grad_scale), (x.dtype, weight_t.dtype)


def _fp8_linear_backward(ctx, grad_out, _grad_x_fp8_t, _grad_w_fp8):
    x_fp8_t, w_fp8 = ctx.saved_tensors
    grad_x, grad_w = torch.ops.modded_nanogpt.fp8_linear_backward(grad_out, x_fp8_t, w_fp8, *ctx.scales, *ctx.dtypes)
    return grad_x, grad_w, None, None, None


_fp8_linear_op.register_autograd(_fp8_linear_backward, setup_context=_fp8_linear_setup_context)


# ---------------------------------------------------------------------------------------------
# Triton kernels (defined only where triton imports)
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _quantize_fp8_kernel(src_ptr, q_ptr, q_t_ptr, R, C, stride_r, stride_c, scale, bound,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """q = fp8(clamp(src / scale)), (R, C) row-major, and q_t = q^T, (C, R) row-major.

        The transposed tile is loaded a second time (from L1/L2) in transposed order rather
        than made with tl.trans: with triton 3.6 on H100, tl.trans of this tile dropped
        elements of the transposed store for fp32 sources (measured).
        """
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        values = tl.load(src_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)
        tl.store(q_ptr + rows[:, None] * C + cols[None, :], _to_fp8(values, scale, bound, q_ptr.dtype.element_ty),
                 mask=mask)
        mask_t = (cols[:, None] < C) & (rows[None, :] < R)
        values_t = tl.load(src_ptr + cols[:, None] * stride_c + rows[None, :] * stride_r, mask=mask_t, other=0.0)
        tl.store(q_t_ptr + cols[:, None] * R + rows[None, :],
                 _to_fp8(values_t, scale, bound, q_t_ptr.dtype.element_ty), mask=mask_t)

    @triton.jit
    def _to_fp8(values, scale, bound, fp8_dtype: tl.constexpr):
        # A correctly rounded division, as torch's on CPU, so the codes match the reference's. Not tl.div_rn
        # per element (it made the quantizers compute-bound on H100: 8.0 against 5.2 ms for the CE-gradient
        # kernel of then, which now multiplies by the reciprocal alone: cross_entropy._e5m2_codes says why);
        # instead one correctly rounded reciprocal and Markstein's correction, q + (v - q s) / s
        # with the remainder exact in an FMA, which rounds to the correctly rounded quotient (for quotients
        # in the normal range; those below it become fp8 zeros either way).
        values = values.to(tl.float32)
        reciprocal = tl.div_rn(1.0, scale)
        quotient = values * reciprocal
        scaled = tl.fma(tl.fma(-quotient, scale, values), reciprocal, quotient)
        clamped = tl.minimum(tl.maximum(scaled, -bound), bound)
        return clamped.to(fp8_dtype, fp_downcast_rounding="rtne")
