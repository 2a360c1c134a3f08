"""Fused GPU ops of the speedrun trainer, each beside the plain PyTorch reference it must match.

    relu2_linear(x, weight)                         relu(x @ weight.T) ** 2, the MLP up projection
    relu2_mlp(x, up, down)                          relu(x @ up.T) ** 2 @ down, the whole MLP (fused backward)
    fp8_linear(x, weight_t, x_scale, w_scale, grad_scale)
                                                    x @ weight_t through fp8 tensor cores (lm_head)
    softcapped_cross_entropy(logits, targets, mtp_weights, cap, shift, div, reduction)
                                                    multi-token-prediction CE on sigmoid-capped logits
    xxt(X), ba_plus_caa(A, alpha, beta)             symmetric products of Polar Express
    gather_rows(table, index, dtype)                table[..., index, :] cast to dtype (embedding rows)
    scatter_add_rows(grad, index, rows)             grad[..., index, :] += rows, duplicates summed
    attention_inputs(x, w_qkv, cos, sin, ...)       an attention layer's q, k, v (projection, q/k norm +
                                                    rotary, key offset, value embeddings)

Each public function takes CPU or CUDA tensors. `use_triton(t)` picks the fused path: a CUDA
tensor, triton importable, and MODDED_NO_TRITON unset (MODDED_NO_TRITON=1 forces the
references, for debugging and for A/B runs). Everywhere else the `*_reference` function runs,
so the trainer's CPU tests exercise the same math. The Triton matmuls are written for 16-bit
inputs (bf16/fp16); float32 inputs take the reference (cuBLAS) path on GPU too, since tl.dot
would silently round them to tf32.

The fused ops are torch.library custom ops with fake (shape) functions and registered
autograd, so torch.compile(fullgraph=True) traces them as single opaque nodes. Nothing here
touches CUDA at import; triton is imported under a guard, and the kernels exist only where it
imports.
"""

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machines: every public function runs its reference
    triton = tl = None

_FLOAT8_E4M3 = torch.float8_e4m3fn
_FLOAT8_E5M2 = torch.float8_e5m2
_TRITON_MATMUL_DTYPES = (torch.bfloat16, torch.float16)


def use_triton(t: torch.Tensor) -> bool:
    """True where the fused path runs for tensor t: CUDA, triton importable, MODDED_NO_TRITON unset."""
    return t.is_cuda and triton is not None and os.environ.get("MODDED_NO_TRITON", "") in ("", "0")


# ---------------------------------------------------------------------------------------------
# relu2_linear: relu(x @ W^T)^2 with the activation in the matmul epilogue
# ---------------------------------------------------------------------------------------------

def relu2_linear_reference(x, weight):
    """relu(x @ weight.T) ** 2 in plain PyTorch, autograd by torch. x (..., K), weight (M, K)."""
    return torch.relu(x @ weight.mT) ** 2


def relu2_linear(x, weight):
    """relu(x @ weight.T) ** 2 for x (..., K) and weight (M, K); differentiable in both.

    weight is cast to x's dtype first (fp32 master weights with bf16 activations). The fused
    path computes the product in one Triton matmul whose epilogue writes both the output and
    the pre-activation; backward multiplies the incoming gradient by 2 relu(pre) in one
    elementwise kernel and leaves the two matmuls of the gradient to cuBLAS.
    """
    if x.ndim < 1 or weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"relu2_linear needs x (..., K) and weight (M, K) with the same K, "
                         f"got x shape {tuple(x.shape)} and weight shape {tuple(weight.shape)}")
    weight = weight.to(x.dtype)
    if not (use_triton(x) and x.dtype in _TRITON_MATMUL_DTYPES):
        return relu2_linear_reference(x, weight)
    post, _ = torch.ops.modded_nanogpt.relu2_linear(x.reshape(-1, x.shape[-1]), weight)
    return post.reshape(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("modded_nanogpt::relu2_linear", mutates_args=())
def _relu2_linear_op(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(post, pre) for 2-D x and weight; pre is kept only for the backward pass."""
    pre = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    post = torch.empty_like(pre)
    if _tma_ready(x, weight, pre):
        _relu2_tma(x, weight, pre, pre, post, backward=False)
    else:
        _relu2_pointer(x, weight, pre, post)
    return post, pre


def _relu2_pointer(x, weight, pre, post):
    """Launch the pointer-based kernel (any strides, any GPU): pre = x @ weight^T, post = relu(pre)^2."""
    rows, inner = x.shape
    cols = weight.shape[0]
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)
    _relu2_matmul_kernel[grid](
        x, weight, pre, post, rows, cols, inner,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), pre.stride(0), pre.stride(1),
    )


def _tma_ready(*tensors) -> bool:
    """Whether the TMA kernel can take these 2-D tensors: a GPU with TMA (Hopper or later; A100s take the
    pointer kernel), rows 16-byte aligned, last dim contiguous."""
    return (torch.cuda.get_device_capability(tensors[0].device)[0] >= 9
            and all(t.ndim == 2 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
                    and t.data_ptr() % 16 == 0 for t in tensors))


def _relu2_tma(a, b, pre, out, post, backward: bool, post_only: bool = False, config=None):
    """Launch the persistent TMA kernel: a (M, K) @ b (N, K)^T with the squared ReLU's epilogue.
    config: a triton.Config from _relu2_tma_config to run instead of autotuning (benchmarks)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = a.shape
    N = b.shape[0]
    # Block shapes are placeholders here; each autotuned config's pre_hook sets its own.
    descs = [TensorDescriptor.from_tensor(t, [16, 16]) for t in (a, b, pre, out, post)]
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    grid = lambda meta: (min(sms * meta["CTAS"], triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)
    if config is None:
        return _relu2_tma_persistent_kernel[grid](*descs, M, N, K, BACKWARD=backward, POST_ONLY=post_only,
                                                  NUM_SMS=sms)
    config.pre_hook(dict(zip(("a_desc", "b_desc", "pre_desc", "out_desc", "post_desc"), descs, strict=True)))
    return _relu2_tma_persistent_kernel.fn[grid(config.kwargs)](
        *descs, M, N, K, BACKWARD=backward, POST_ONLY=post_only, NUM_SMS=sms, **config.kwargs,
        num_warps=config.num_warps, num_stages=config.num_stages)


@_relu2_linear_op.register_fake
def _(x, weight):
    out = x.new_empty((x.shape[0], weight.shape[0]))
    return out, torch.empty_like(out)


@torch.library.custom_op("modded_nanogpt::relu2_grad", mutates_args=())
def _relu2_grad_op(grad_post: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """grad_post * 2 relu(pre): the gradient through the squared ReLU, in one pass."""
    return _relu2_grad(grad_post.contiguous(), pre.contiguous(), torch.empty_like(pre), from_post=False)


def _relu2_grad(grad_post, saved, grad_pre, from_post: bool):
    """Launch the elementwise kernel: grad_pre = grad_post * 2 relu(pre), saved being pre or (from_post)
    post = relu(pre)^2; all three contiguous and of one shape."""
    numel = saved.numel()
    _relu2_grad_kernel[(triton.cdiv(numel, 4096),)](grad_post, saved, grad_pre, numel, FROM_POST=from_post,
                                                      BLOCK=4096, num_warps=8)
    return grad_pre


@_relu2_grad_op.register_fake
def _(grad_post, pre):
    return torch.empty_like(pre)


def _relu2_linear_setup_context(ctx, inputs, output):
    x, weight = inputs
    ctx.save_for_backward(x, weight, output[1])


def _relu2_linear_backward(ctx, grad_post, _grad_pre):
    x, weight, pre = ctx.saved_tensors
    grad_pre = torch.ops.modded_nanogpt.relu2_grad(grad_post, pre)
    return grad_pre @ weight, grad_pre.mT @ x


_relu2_linear_op.register_autograd(_relu2_linear_backward, setup_context=_relu2_linear_setup_context)


def relu2_mlp_reference(x, up, down):
    """relu(x @ up.T) ** 2 @ down in plain PyTorch: the MLP of a block. up and down are (hidden, dim)."""
    return relu2_linear_reference(x, up) @ down


def relu2_mlp(x, up, down):
    """relu(x @ up.T) ** 2 @ down for x (..., dim), up and down (hidden, dim); differentiable in all three.

    Weights are cast to x's dtype. On the fused path the up projection is the Triton kernel of
    relu2_linear, the down projection cuBLAS, and the backward's gradient through the squared ReLU
    is the epilogue of the matmul that makes it (grad_y @ down^T, then times 2 relu(pre) before the
    store): the (rows, hidden) gradient of the activation never goes through memory.

    Only post = relu(pre)^2 is stored (the down projection needs it); the backward takes relu(pre) as
    sqrt(post). That saves the forward a (rows, hidden) store (H100, 49,152 x 768 -> 3072: 436 -> 360 us;
    the backward's square root costs ~10 us) and the activation memory of pre. It is as accurate as
    storing pre in 16 bits: sqrt halves post's relative rounding error, so relu(pre) comes back within
    ~2^-10 relative where a stored bf16 pre is within 2^-9.
    """
    if x.ndim < 1 or up.ndim != 2 or up.shape != down.shape or x.shape[-1] != up.shape[1]:
        raise ValueError(f"relu2_mlp needs x (..., dim) and up, down (hidden, dim), got x shape {tuple(x.shape)}, "
                         f"up {tuple(up.shape)}, down {tuple(down.shape)}")
    up, down = up.to(x.dtype), down.to(x.dtype)
    if not (use_triton(x) and x.dtype in _TRITON_MATMUL_DTYPES):
        return relu2_mlp_reference(x, up, down)
    y = torch.ops.modded_nanogpt.relu2_mlp(x.reshape(-1, x.shape[-1]), up, down)[0]
    return y.reshape(x.shape)


@torch.library.custom_op("modded_nanogpt::relu2_mlp", mutates_args=())
def _relu2_mlp_op(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, post); post is kept for the backward pass (which recovers relu(pre) from it)."""
    if _tma_ready(x, up):
        post = torch.empty((x.shape[0], up.shape[0]), dtype=x.dtype, device=x.device)
        _relu2_tma(x, up, post, post, post, backward=False, post_only=True)
    else:  # GPUs without TMA: the pointer kernel, which also writes pre (unused here)
        post = torch.ops.modded_nanogpt.relu2_linear(x, up)[0]
    return post @ down, post


@_relu2_mlp_op.register_fake
def _(x, up, down):
    return x.new_empty(x.shape), x.new_empty((x.shape[0], up.shape[0]))


@torch.library.custom_op("modded_nanogpt::relu2_mlp_grad_pre", mutates_args=())
def _relu2_mlp_grad_pre_op(grad_y: torch.Tensor, down: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """(grad_y @ down^T) * 2 sqrt(post): the gradient of the up projection's output, in one kernel."""
    grad_y, down, post = grad_y.contiguous(), down.contiguous(), post.contiguous()
    grad_pre = torch.empty_like(post)
    if _tma_ready(grad_y, down, post):
        _relu2_tma(grad_y, down, post, grad_pre, grad_pre, backward=True, post_only=True)
    else:
        _relu2_grad(grad_y @ down.T, post, grad_pre, from_post=True)
    return grad_pre


@_relu2_mlp_grad_pre_op.register_fake
def _(grad_y, down, post):
    return torch.empty_like(post)


def _relu2_mlp_setup_context(ctx, inputs, output):
    x, up, down = inputs
    ctx.save_for_backward(x, up, down, output[1])


def _relu2_mlp_backward(ctx, grad_y, _grad_post):
    x, up, down, post = ctx.saved_tensors
    grad_pre = torch.ops.modded_nanogpt.relu2_mlp_grad_pre(grad_y, down, post)
    return grad_pre @ up, grad_pre.mT @ x, post.mT @ grad_y


_relu2_mlp_op.register_autograd(_relu2_mlp_backward, setup_context=_relu2_mlp_setup_context)


# ---------------------------------------------------------------------------------------------
# fp8_linear: x @ weight_t on fp8 tensor cores, with fp8 gradients
# ---------------------------------------------------------------------------------------------

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


@functools.cache
def has_fp8_tensor_cores(device_index) -> bool:
    """Whether CUDA device `device_index` has fp8 tensor cores (sm_89 and later); elsewhere fp8 is simulated."""
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


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
        x_q = _dequantize(_quantize(x, x_scale, _FLOAT8_E4M3), x_scale)
        w_q = _dequantize(_quantize(weight_t, w_scale, _FLOAT8_E4M3), w_scale)
        ctx.save_for_backward(x_q, w_q)
        ctx.grad_scale, ctx.dtypes = grad_scale, (x.dtype, weight_t.dtype)
        return (x_q @ w_q).to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad):
        x_q, w_q = ctx.saved_tensors
        g_q = _dequantize(_quantize(grad, ctx.grad_scale, _FLOAT8_E5M2), ctx.grad_scale)
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
    if not use_triton(x):
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
    x_fp8, x_fp8_t = _quantize_both_layouts(x, x_scale, _FLOAT8_E4M3)
    w_fp8, w_fp8_t = _quantize_both_layouts(weight_t, w_scale, _FLOAT8_E4M3)
    out = _fp8_matmul(x_fp8, w_fp8_t.mT, x_scale, w_scale, torch.bfloat16, fast_accum=True)
    return out, x_fp8_t, w_fp8


@_fp8_linear_op.register_fake
def _(x, weight_t, x_scale, w_scale, grad_scale):
    out = x.new_empty((x.shape[0], weight_t.shape[1]), dtype=torch.bfloat16)
    x_fp8_t = x.new_empty((x.shape[1], x.shape[0]), dtype=_FLOAT8_E4M3)
    return out, x_fp8_t, weight_t.new_empty(weight_t.shape, dtype=_FLOAT8_E4M3)


@torch.library.custom_op("modded_nanogpt::fp8_linear_backward", mutates_args=())
def _fp8_linear_backward_op(grad: torch.Tensor, x_fp8_t: torch.Tensor, w_fp8: torch.Tensor,
                            x_scale: float, w_scale: float, grad_scale: float,
                            x_dtype: torch.dtype, w_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight_t). Both products pair e5m2 with e4m3, which _scaled_mm supports
    (tested on H100 with torch 2.11); only e5m2 x e5m2 is refused, and nothing here needs it."""
    grad_fp8, grad_fp8_t = _quantize_both_layouts(grad, grad_scale, _FLOAT8_E5M2)
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
# softcapped_cross_entropy: multi-token-prediction CE on sigmoid-capped logits
# ---------------------------------------------------------------------------------------------

# The softcap's sigmoid in the CE kernels: for 16-bit logits the GPU's one-instruction tanh (its error, at most
# cap * 2^-11.99 ~ 5.6e-3 on a capped logit, is under half a bf16 step of logits above 2), for float32 logits
# and with MODDED_EXACT_SIGMOID=1 the exact formula. The kernels are bound by such instructions (PERF_NOTES.md).
FAST_SIGMOID = os.environ.get("MODDED_EXACT_SIGMOID", "") in ("", "0")


def _fast_sigmoid(logits) -> bool:
    return FAST_SIGMOID and logits.dtype != torch.float32


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
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")


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

    The fused forward makes one pass over each row (softcap, running max, log-sum-exp, and the
    target terms) and keeps only the row's log-sum-exp; the backward recomputes the softcap
    from the logits rather than saving an (N, V) gradient in the forward, so evaluation
    without grad writes nothing of size (N, V) and the incoming gradient is applied in the
    same pass that writes grad_logits.
    """
    _check_ce_args(logits, targets, mtp_weights, cap, reduction)
    if not use_triton(logits):
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
        rows, vocab, cap, shift, 1.0 / div, N_MTP=weights.numel(), FAST=_fast_sigmoid(logits),
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
        FAST=_fast_sigmoid(logits),
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
    if not (use_triton(x) and x.ndim == 2 and has_fp8_tensor_cores(x.device.index)):
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
    x_fp8_t = x.new_empty((x.shape[1], x.shape[0]), dtype=_FLOAT8_E4M3)
    return (row_losses, torch.empty_like(row_losses), torch.empty_like(row_losses), logits, x_fp8_t,
            weight_t.new_empty(weight_t.shape, dtype=_FLOAT8_E4M3))


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
                            grad_scale, block_r=64, block_c=64, num_warps=4):
    """The loss's gradient w.r.t. the logits as e5m2 codes of grad / grad_scale, (N, V) and (V, N).
    The tile: 64 x 64 with 4 warps was the fastest of nine shapes on an H100 (modded_nanogpt/PERF_NOTES.md)."""
    rows, vocab = logits.shape
    weights = _mtp_weight_tensor(weights, weight_values, logits.device)
    q = torch.empty((rows, vocab), dtype=_FLOAT8_E5M2, device=logits.device)
    q_t = torch.empty((vocab, rows), dtype=_FLOAT8_E5M2, device=logits.device)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(vocab, block_c))
    _softcapped_ce_grad_fp8_kernel[grid](
        grad_rows, grad_rows.stride(0), logits, logits.stride(0), logits.stride(1), q, q_t, targets.contiguous(),
        weights, weights.numel(), row_lse, rows, vocab, cap, shift, 1.0 / div, grad_scale,
        torch.finfo(_FLOAT8_E5M2).max, BLOCK_R=block_r, BLOCK_C=block_c, FAST=_fast_sigmoid(logits),
        num_warps=num_warps)
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
# Symmetric products of Polar Express: only the upper-triangular tiles are computed
# ---------------------------------------------------------------------------------------------
# Measured on H100, bf16, kernel time: xxt matches cuBLAS's full product (0.059 vs 0.056 ms at
# (40, 768, 768), 0.101 vs 0.114 ms at (24, 768, 3072)), the halved work offset by Triton's lower
# matmul efficiency; ba_plus_caa, which also folds in beta * A, takes 0.077 vs 0.172 ms; the
# five Polar Express iterations 1.40 vs 2.00 ms and 2.59 vs 4.71 ms on those two banks.

def xxt_reference(X):
    """X @ X^T for X (..., m, n)."""
    return X @ X.mT


def ba_plus_caa_reference(A, alpha, beta):
    """alpha * (A @ A) + beta * A for A (..., m, m)."""
    return alpha * (A @ A) + beta * A


def xxt(X):
    """X @ X^T for X (m, n) or (b, m, n), in X's dtype.

    The result is symmetric, so the fused kernel computes only the tiles on and above the
    diagonal and writes each off-diagonal one twice (as itself and transposed): about half
    the FLOPs of a general matmul, and an exactly symmetric result.
    """
    if X.ndim not in (2, 3):
        raise ValueError(f"xxt needs X of shape (m, n) or (b, m, n), got shape {tuple(X.shape)}")
    if not (use_triton(X) and X.dtype in _TRITON_MATMUL_DTYPES):
        return xxt_reference(X)
    return torch.ops.modded_nanogpt.xxt(X)


def ba_plus_caa(A, alpha, beta):
    """alpha * (A @ A) + beta * A for symmetric A, (m, m) or (b, m, m), in A's dtype.

    A must be symmetric (as the output of xxt is): the kernel reads A's rows for A's columns,
    and computes only the upper-triangular tiles of the (symmetric) result.
    """
    if A.ndim not in (2, 3) or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"ba_plus_caa needs a square A of shape (m, m) or (b, m, m), got shape {tuple(A.shape)}")
    if not (use_triton(A) and A.dtype in _TRITON_MATMUL_DTYPES):
        return ba_plus_caa_reference(A, alpha, beta)
    return torch.ops.modded_nanogpt.ba_plus_caa(A, float(alpha), float(beta))


def _launch_symmetric_matmul(A, alpha, beta, add_input):
    batched = A if A.ndim == 3 else A.unsqueeze(0)
    batch, rows, inner = batched.shape
    out = torch.empty((batch, rows, rows), dtype=A.dtype, device=A.device)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK"]), triton.cdiv(rows, meta["BLOCK"]), batch)
    _symmetric_matmul_kernel[grid](
        batched, out, rows, inner, batched.stride(0), batched.stride(1), batched.stride(2),
        out.stride(0), out.stride(1), out.stride(2), alpha, beta, ADD_INPUT=add_input,
    )
    return out if A.ndim == 3 else out.squeeze(0)


@torch.library.custom_op("modded_nanogpt::xxt", mutates_args=())
def _xxt_op(X: torch.Tensor) -> torch.Tensor:
    return _launch_symmetric_matmul(X, 1.0, 0.0, add_input=False)


@_xxt_op.register_fake
def _(X):
    return X.new_empty((*X.shape[:-1], X.shape[-2]))


@torch.library.custom_op("modded_nanogpt::ba_plus_caa", mutates_args=())
def _ba_plus_caa_op(A: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return _launch_symmetric_matmul(A, alpha, beta, add_input=True)


@_ba_plus_caa_op.register_fake
def _(A, alpha, beta):
    return torch.empty_like(A, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# Embedding rows: gather (with the cast to the compute dtype) and scatter-add of their gradients
# ---------------------------------------------------------------------------------------------
# The speedrun reads 11 embedding rows per token (token, 5 value, 5 bigram; 425M floats of tables) and
# the trainer gathers them outside the compiled graph (model.GPT.gather_rows says why). torch's gather
# of a (5, V, D) table and its index_add_ are generic kernels: on an H200 at a stage-3 micro-step
# (49,152 tokens) they took 0.88 ms and 1.70 ms for the value table (+ 0.28 ms per 2-D index_add_),
# ~25 ms per step, against ~0.4 ms of bytes. Here the gather casts on the way (the trainer asks for bf16
# value and bigram rows: the forward casts them to bf16 anyway, and their gradient is that bf16 value cast
# up, so the math is unchanged), and the scatter walks the sorted index, summing each run of equal ids in
# registers before one atomic add: 135 us instead of 1,519 for the value table (modded_nanogpt.bench.rows).

def _as_tables(table: torch.Tensor) -> torch.Tensor:
    if table.ndim not in (2, 3):
        raise ValueError(f"embedding rows need a (V, D) or (N, V, D) table, got shape {tuple(table.shape)}")
    return table if table.ndim == 3 else table[None]


def gather_rows_reference(table, index, dtype):
    """table[..., index, :] in dtype: rows (T, D) of a (V, D) table, or (N, T, D) of an (N, V, D) one."""
    return table.index_select(table.ndim - 2, index).to(dtype)


def gather_rows(table, index, dtype):
    """gather_rows_reference in one Triton kernel on GPU (reads fp32 rows, writes dtype)."""
    tables = _as_tables(table)
    if index.ndim != 1:
        raise ValueError(f"gather_rows needs a 1-D index, got shape {tuple(index.shape)}")
    if not (use_triton(table) and table.is_contiguous() and index.is_cuda):
        return gather_rows_reference(table, index, dtype)
    n, _, dim = tables.shape
    out = torch.empty((n, index.numel(), dim), dtype=dtype, device=table.device)
    if index.numel():
        grid = (triton.cdiv(index.numel(), 16), n, triton.cdiv(dim, 256))
        _gather_rows_kernel[grid](tables, index, out, index.numel(), tables.shape[1], dim, BLOCK_T=16, BLOCK_D=256,
                                  num_warps=4)
    return out if table.ndim == 3 else out[0]


def scatter_add_rows_reference(grad, index, rows):
    """grad[..., index, :] += rows, duplicates summed (index_add_ in grad's dtype); grad is a (V, D) or
    (N, V, D) table gradient, rows (T, D) or (N, T, D)."""
    grad.index_add_(grad.ndim - 2, index, rows.to(grad.dtype))


def sort_index(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted index, positions) for scatter_add_rows: computed once per index, shared by its tables. The
    keys are sorted as int32 (ids fit): half the radix passes of int64."""
    return torch.sort(index.to(torch.int32))


def scatter_add_rows(grad, index, rows, sorted_index=None):
    """scatter_add_rows_reference; on GPU one Triton kernel over the sorted index (sorted_index from
    sort_index, else sorted here): each program walks 32 sorted positions and sums each run of equal
    indices in float32 registers, then adds it to grad with one atomic add per run and column."""
    grads = _as_tables(grad)
    want = (grads.shape[0], index.numel(), grads.shape[2])
    if index.ndim != 1 or tuple(_as_tables(rows).shape) != want:
        raise ValueError(f"scatter_add_rows: rows of shape {tuple(rows.shape)} do not match a gradient of shape "
                         f"{tuple(grad.shape)} and an index of shape {tuple(index.shape)}")
    if not (use_triton(grad) and grad.dtype == torch.float32 and grad.is_contiguous() and index.is_cuda):
        scatter_add_rows_reference(grad, index, rows)
        return
    if not index.numel():
        return
    values, positions = sort_index(index) if sorted_index is None else sorted_index
    rows = _as_tables(rows.contiguous())
    n, vocab, dim = grads.shape
    grid = (triton.cdiv(index.numel(), 32), n, triton.cdiv(dim, 256))
    _scatter_add_rows_kernel[grid](grads, values, positions, rows, index.numel(), vocab, dim, CHUNK=32,
                                   BLOCK_D=256, num_warps=2)


# ---------------------------------------------------------------------------------------------
# Attention inputs: QKV projection, q/k RMSNorm + half-truncated rotary, key offset, value-embedding mix
# ---------------------------------------------------------------------------------------------
# The plain version is model.attention_inputs (tensor code that Inductor fuses). Profiled on an H200
# at a stage-3 micro-step, its q/k kernels took 162-181 us forward and 219 us backward per attention
# layer, about twice the bytes they move (read q, k; write them: 302 MB forward, 453 MB backward).
# This op does the projection through cuBLAS and everything after it in one pass each way: q, k and v
# leave the forward contiguous (T, H, D) (the paired-head reshape is then a view), and the backward
# writes the whole (T, 3 H D) gradient of the projection's output, so the two products that follow
# read it as one tensor. Selected by --qkv_kernel=triton (the default; model.GPT.attention). Measured on
# an H200 (modded_nanogpt.bench.profile, stage 3): ~131 us forward and ~168 us backward per layer and micro-step
# for q, k and v together, and a stage-3 step 684.9 -> 669.3 ms against the plain version.

_NORM_EPS = torch.finfo(torch.float32).eps  # F.rms_norm's eps for its float32 computation


def attention_inputs_supported(x: torch.Tensor, head_dim: int) -> bool:
    """Where attention_inputs can run: the fused path's device and dtype (bf16), and a power-of-two head_dim
    (the kernels take a head's halves as tiles of head_dim / 2 columns)."""
    return use_triton(x) and x.dtype == torch.bfloat16 and head_dim >= 4 and head_dim & (head_dim - 1) == 0


def attention_inputs(x, w_qkv, cos, sin, not_doc_start, ve, ve_gate, num_heads: int, qk_norm: bool,
                     key_offset: bool, paired: bool = False):
    """q, k, v (T, H, D) of one attention layer from its normalized input x (T, dim) and w_qkv (3 H D, dim),
    as model.attention_inputs computes them (the reference), where attention_inputs_supported says so.
    paired: cos/sin have 2 T rows and head h at token t rotates by row 2 t + (h % 2)."""
    return _AttentionInputs.apply(x, w_qkv, cos, sin, not_doc_start, ve,
                                  None if ve_gate is None else ve_gate.contiguous(), num_heads, qk_norm, key_offset,
                                  paired)


class _AttentionInputs(torch.autograd.Function):
    """The projection (cuBLAS) and the fused kernels; the projection's output is kept for the backward."""

    @staticmethod
    def forward(ctx, x, w_qkv, cos, sin, not_doc_start, ve, ve_gate, num_heads, qk_norm, key_offset, paired):
        qkv = x @ w_qkv.T
        q, k, v = torch.ops.modded_nanogpt.attention_inputs_forward(qkv, cos, sin, not_doc_start, ve, ve_gate,
                                                                    num_heads, qk_norm, key_offset, paired)
        ctx.save_for_backward(x, w_qkv, qkv, cos, sin, not_doc_start, ve, ve_gate)
        ctx.flags = (num_heads, qk_norm, key_offset, paired)
        return q, k, v

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        x, w_qkv, qkv, cos, sin, not_doc_start, ve, ve_gate = ctx.saved_tensors
        grad_qkv, grad_ve, grad_gate = torch.ops.modded_nanogpt.attention_inputs_backward(
            grad_q, grad_k, grad_v, qkv, cos, sin, not_doc_start, ve, ve_gate, *ctx.flags)
        has_ve = ve is not None
        return (grad_qkv @ w_qkv, grad_qkv.T @ x, None, None, None, grad_ve if has_ve else None,
                grad_gate if has_ve else None, None, None, None, None)


def _ve_launch_args(ve, ve_gate, placeholder):
    """(ve, gate, ve row stride, gate row stride) for the kernels; without value embeddings a placeholder
    pointer (never read: HAS_VE is off) and zero strides."""
    if ve is None:
        return placeholder, placeholder, 0, 0
    return ve, ve_gate, ve.stride(0), ve_gate.stride(0)


@torch.library.custom_op("modded_nanogpt::attention_inputs_forward", mutates_args=())
def _attention_inputs_forward_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, not_doc_start: torch.Tensor,
                                 ve: torch.Tensor | None, ve_gate: torch.Tensor | None, num_heads: int, qk_norm: bool,
                                 key_offset: bool, paired: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = qkv.shape[0]
    head_dim = qkv.shape[1] // (3 * num_heads)
    q, k, v = (torch.empty((T, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device) for _ in range(3))
    ve_arg, gate_arg, ve_stride, gate_stride = _ve_launch_args(ve, ve_gate, qkv)
    _attention_inputs_kernel[(num_heads, triton.cdiv(T, 32))](
        qkv, cos, sin, not_doc_start, ve_arg, gate_arg, q, k, v, T, qkv.stride(0), cos.stride(0), ve_stride,
        gate_stride, _NORM_EPS, H=num_heads, HALF=head_dim // 2, QK_NORM=qk_norm, KEY_OFFSET=key_offset,
        HAS_VE=ve is not None, PAIRED=paired, BLOCK_T=32, num_warps=4)
    return q, k, v


@_attention_inputs_forward_op.register_fake
def _(qkv, cos, sin, not_doc_start, ve, ve_gate, num_heads, qk_norm, key_offset, paired):
    shape = (qkv.shape[0], num_heads, qkv.shape[1] // (3 * num_heads))
    return tuple(qkv.new_empty(shape) for _ in range(3))


@torch.library.custom_op("modded_nanogpt::attention_inputs_backward", mutates_args=())
def _attention_inputs_backward_op(grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor, qkv: torch.Tensor,
                                  cos: torch.Tensor, sin: torch.Tensor, not_doc_start: torch.Tensor,
                                  ve: torch.Tensor | None, ve_gate: torch.Tensor | None, num_heads: int, qk_norm: bool,
                                  key_offset: bool, paired: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad of the projection's output (T, 3 H D), grad ve, grad ve_gate); the last two are empty without
    value embeddings."""
    T, H = qkv.shape[0], num_heads
    head_dim = qkv.shape[1] // (3 * H)
    grads = [g if g.stride(-1) == 1 else g.contiguous() for g in (grad_q, grad_k, grad_v)]
    grad_qkv = torch.empty_like(qkv)
    has_ve = ve is not None
    grad_ve = torch.empty_like(ve) if has_ve else qkv.new_empty(0)
    grad_gate = torch.empty((T, H), dtype=torch.float32, device=qkv.device) if has_ve else qkv.new_empty(0)
    ve_arg, gate_arg, ve_stride, gate_stride = _ve_launch_args(ve, ve_gate, qkv)
    grad_ve_arg, grad_gate_arg, _, _ = _ve_launch_args(grad_ve if has_ve else None, grad_gate, qkv)
    _attention_inputs_backward_kernel[(H, triton.cdiv(T, 32))](
        *grads, qkv, cos, sin, not_doc_start, ve_arg, gate_arg, grad_qkv, grad_ve_arg, grad_gate_arg, T,
        *(g.stride(0) for g in grads), *(g.stride(1) for g in grads), qkv.stride(0), cos.stride(0), ve_stride,
        gate_stride, _NORM_EPS, H=H, HALF=head_dim // 2, QK_NORM=qk_norm, KEY_OFFSET=key_offset, HAS_VE=has_ve,
        PAIRED=paired, BLOCK_T=32, num_warps=4)
    return grad_qkv, grad_ve, grad_gate.to(qkv.dtype) if has_ve else grad_gate


@_attention_inputs_backward_op.register_fake
def _(grad_q, grad_k, grad_v, qkv, cos, sin, not_doc_start, ve, ve_gate, num_heads, qk_norm, key_offset, paired):
    has_ve = ve is not None
    return (torch.empty_like(qkv), torch.empty_like(ve) if has_ve else qkv.new_empty(0),
            qkv.new_empty(ve_gate.shape) if has_ve else qkv.new_empty(0))


# ---------------------------------------------------------------------------------------------
# Triton kernels (defined only where triton imports)
# ---------------------------------------------------------------------------------------------

if triton is not None:

    def _matmul_configs(block_m_n_k_warps_stages):
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
                for m, n, k, w, s in block_m_n_k_warps_stages]

    # Measured on H100 at 6144 x 768 -> 3072: (128, 128, 64, 8 warps, 3 stages) 76 us, about cuBLAS's
    # 48 us matmul plus an elementwise relu^2 pass; deeper pipelines or wider tiles were slower (88-92 us).
    @triton.autotune(
        configs=_matmul_configs([(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 128, 64, 4, 3), (256, 128, 64, 8, 3)]),
        key=["M", "N", "K"],
    )
    @triton.jit
    def _relu2_matmul_kernel(x_ptr, w_ptr, pre_ptr, post_ptr, M, N, K,
                             stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr):
        """pre = x @ w^T (M x N, inner K), post = relu(pre)^2; one (BLOCK_M, BLOCK_N) tile per program."""
        # Programs run in groups of GROUP_M row-tiles sweeping the columns together, so the
        # weight tiles they share are read from L2 instead of HBM.
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        programs_per_group = GROUP_M * tiles_n
        first_tile_m = (pid // programs_per_group) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_tile_m, GROUP_M)
        tile_m = first_tile_m + (pid % programs_per_group) % group_rows
        tile_n = (pid % programs_per_group) // group_rows

        rows = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        x_tile_ptr = x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk
        w_tile_ptr = w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn  # w^T tile, (BLOCK_K, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_in = (k0 + ks) < K
            x_tile = tl.load(x_tile_ptr, mask=(rows[:, None] < M) & k_in[None, :], other=0.0)
            w_tile = tl.load(w_tile_ptr, mask=k_in[:, None] & (cols[None, :] < N), other=0.0)
            acc = tl.dot(x_tile, w_tile, acc)
            x_tile_ptr += BLOCK_K * stride_xk
            w_tile_ptr += BLOCK_K * stride_wk

        out_offsets = rows[:, None] * stride_om + cols[None, :] * stride_on
        out_mask = (rows[:, None] < M) & (cols[None, :] < N)
        relu = tl.maximum(acc, 0.0)
        tl.store(pre_ptr + out_offsets, acc.to(pre_ptr.dtype.element_ty), mask=out_mask)
        tl.store(post_ptr + out_offsets, (relu * relu).to(post_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _relu2_epilogue(acc, pre_desc, out_desc, post_desc, off_m, off_n, BACKWARD: tl.constexpr,
                        POST_ONLY: tl.constexpr):
        dtype = out_desc.dtype
        if BACKWARD:
            saved = pre_desc.load([off_m, off_n]).to(tl.float32)
            relu = tl.sqrt(tl.maximum(saved, 0.0)) if POST_ONLY else tl.maximum(saved, 0.0)
            out_desc.store([off_m, off_n], (acc * 2.0 * relu).to(dtype))
        else:
            if not POST_ONLY:
                out_desc.store([off_m, off_n], acc.to(dtype))
            relu = tl.maximum(acc, 0.0)
            post_desc.store([off_m, off_n], (relu * relu).to(dtype))

    def _relu2_tma_config(bm, bn, bk, warps, stages, subtile, ctas=1, warp_specialize=False):
        def set_block_shapes(nargs):
            nargs["a_desc"].block_shape = [bm, bk]
            nargs["b_desc"].block_shape = [bn, bk]
            for name in ("pre_desc", "out_desc", "post_desc"):
                nargs[name].block_shape = [bm, bn // 2 if subtile else bn]
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SUBTILE": subtile,
                              "CTAS": ctas, "WARP_SPECIALIZE": warp_specialize}, num_warps=warps,
                             num_stages=stages, pre_hook=set_block_shapes)

    def _relu2_tma_configs():
        config = _relu2_tma_config
        # Measured on an H200 at 49,152 x 768 -> 3072 (modded_nanogpt/bench/mlp.py): forward 410 us with
        # (128, 256, 64, 8 warps, 4 stages, subtiled stores) against 586 us for the pointer kernel below and
        # 474 us for cuBLAS + Inductor's relu^2; backward 453 us with 3 stages (4 do not fit in shared
        # memory there) against 538 us for cuBLAS + the elementwise gradient kernel.
        return [config(128, 256, 64, 8, 4, True), config(128, 256, 64, 8, 3, True), config(128, 128, 64, 8, 4, False)]

    @triton.autotune(configs=_relu2_tma_configs(), key=["M", "N", "K", "BACKWARD", "POST_ONLY"])
    @triton.jit
    def _relu2_tma_persistent_kernel(a_desc, b_desc, pre_desc, out_desc, post_desc, M, N, K,
                                     BACKWARD: tl.constexpr, POST_ONLY: tl.constexpr, BLOCK_M: tl.constexpr,
                                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                                     NUM_SMS: tl.constexpr, CTAS: tl.constexpr, SUBTILE: tl.constexpr,
                                     WARP_SPECIALIZE: tl.constexpr):
        """acc = a @ b^T (a (M, K), b (N, K), through TMA tiles), then the squared ReLU's epilogue.
        Forward (BACKWARD=0): out = pre = acc, post = relu(acc)^2. Backward: a is the gradient of the
        down projection's output, b the down weight, so acc is the gradient of post; out = acc * 2 relu(pre).
        One program per SM walks the tiles, so the loads of a tile overlap the epilogue of the one before;
        SUBTILE stores the epilogue in two column halves (less shared memory for the stores); CTAS programs
        share an SM, so one's epilogue can run while another's matmul does. POST_ONLY: the forward stores no
        pre (only post), and the backward's saved tensor is post, with relu(pre) = sqrt(post)."""
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        programs_per_group = GROUP_M * tiles_n
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_SMS * CTAS, flatten=True,
                             warp_specialize=WARP_SPECIALIZE):
            first_tile_m = (tile // programs_per_group) * GROUP_M
            group_rows = tl.minimum(tiles_m - first_tile_m, GROUP_M)
            off_m = (first_tile_m + (tile % programs_per_group) % group_rows) * BLOCK_M
            off_n = ((tile % programs_per_group) // group_rows) * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for ki in range(k_tiles):
                k = ki * BLOCK_K
                acc = tl.dot(a_desc.load([off_m, k]), b_desc.load([off_n, k]).T, acc)
            if SUBTILE:
                left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
                _relu2_epilogue(left, pre_desc, out_desc, post_desc, off_m, off_n, BACKWARD, POST_ONLY)
                _relu2_epilogue(right, pre_desc, out_desc, post_desc, off_m, off_n + BLOCK_N // 2, BACKWARD,
                                POST_ONLY)
            else:
                _relu2_epilogue(acc, pre_desc, out_desc, post_desc, off_m, off_n, BACKWARD, POST_ONLY)

    @triton.jit
    def _relu2_grad_kernel(grad_post_ptr, saved_ptr, grad_pre_ptr, numel, FROM_POST: tl.constexpr,
                           BLOCK: tl.constexpr):
        """grad_post * 2 relu(pre), where saved is pre, or post = relu(pre)^2 (FROM_POST)."""
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_range = offsets < numel
        grad_post = tl.load(grad_post_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
        saved = tl.maximum(tl.load(saved_ptr + offsets, mask=in_range, other=0.0).to(tl.float32), 0.0)
        grad_pre = 2.0 * grad_post * (tl.sqrt(saved) if FROM_POST else saved)
        tl.store(grad_pre_ptr + offsets, grad_pre.to(grad_pre_ptr.dtype.element_ty), mask=in_range)

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
        tl.store(q_ptr + rows[:, None] * C + cols[None, :], _to_fp8(values, scale, bound, q_ptr), mask=mask)
        mask_t = (cols[:, None] < C) & (rows[None, :] < R)
        values_t = tl.load(src_ptr + cols[:, None] * stride_c + rows[None, :] * stride_r, mask=mask_t, other=0.0)
        tl.store(q_t_ptr + cols[:, None] * R + rows[None, :], _to_fp8(values_t, scale, bound, q_t_ptr), mask=mask_t)

    @triton.jit
    def _to_fp8(values, scale, bound, fp8_ptr):
        # A correctly rounded division, as torch's on CPU, so the codes match the reference's. Not tl.div_rn
        # per element (it made the quantizers compute-bound on H100: 8.0 against 5.2 ms for the CE-gradient
        # kernel); instead one correctly rounded reciprocal and Markstein's correction, q + (v - q s) / s
        # with the remainder exact in an FMA, which rounds to the correctly rounded quotient (for quotients
        # in the normal range; those below it become fp8 zeros either way).
        values = values.to(tl.float32)
        reciprocal = tl.div_rn(1.0, scale)
        quotient = values * reciprocal
        scaled = tl.fma(tl.fma(-quotient, scale, values), reciprocal, quotient)
        clamped = tl.minimum(tl.maximum(scaled, -bound), bound)
        return clamped.to(fp8_ptr.dtype.element_ty, fp_downcast_rounding="rtne")

    @triton.jit
    def _sigmoid(x, FAST: tl.constexpr):
        """sigmoid(x): with FAST, 0.5 + 0.5 tanh(x / 2) through tanh.approx.f32 (one special-function
        instruction, relative error <= 2^-10.99); else tl.sigmoid (an exp and an IEEE division)."""
        if FAST:
            t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [0.5 * x], dtype=tl.float32,
                                          is_pure=True, pack=1)
            return 0.5 + 0.5 * t
        return tl.sigmoid(x)

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
        # Online log-sum-exp. Softcapped values lie in (0, cap), so 0 is a safe starting max.
        row_max = 0.0
        sum_exp = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < V
            z = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            capped = tl.where(in_row, cap * _sigmoid((z + shift) * inv_div, FAST), 0.0)
            new_max = tl.maximum(row_max, tl.max(capped, axis=0))
            block_sum = tl.sum(tl.where(in_row, tl.exp(capped - new_max), 0.0), axis=0)
            sum_exp = sum_exp * tl.exp(row_max - new_max) + block_sum
            row_max = new_max
        lse = row_max + tl.log(sum_exp)

        loss = 0.0
        for k in range(N_MTP):
            valid = row + k < N
            target = tl.load(targets_ptr + row + k, mask=valid, other=0)
            z_target = tl.load(row_ptr + target).to(tl.float32)
            capped_target = cap * _sigmoid((z_target + shift) * inv_div, FAST)
            loss += tl.where(valid, tl.load(weights_ptr + k) * (lse - capped_target), 0.0)
        z_next = tl.load(row_ptr + tl.load(targets_ptr + row)).to(tl.float32)
        tl.store(row_next_ptr + row, lse - cap * _sigmoid((z_next + shift) * inv_div, FAST))
        tl.store(row_loss_ptr + row, loss)
        tl.store(row_lse_ptr + row, lse)

    @triton.autotune(configs=_ROW_CONFIGS, key=["V", "N_MTP"])
    @triton.jit(do_not_specialize=["N_MTP"])
    def _softcapped_ce_backward_kernel(grad_rows_ptr, grad_rows_stride, logits_ptr, stride_row, grad_ptr,
                                       grad_stride_row, targets_ptr, weights_ptr, row_lse_ptr, N, V, cap, shift,
                                       inv_div, N_MTP, BLOCK_V: tl.constexpr, FAST: tl.constexpr):
        """grad = g_t * (W_t softmax(s) - sum_k w_k onehot(y_{t+k})) * ds/dz, with W_t the valid weights' sum."""
        row = tl.program_id(0)
        row_ptr = logits_ptr + row.to(tl.int64) * stride_row
        grad_row_ptr = grad_ptr + row.to(tl.int64) * grad_stride_row
        grad_row = tl.load(grad_rows_ptr + row * grad_rows_stride)
        lse = tl.load(row_lse_ptr + row)
        weight_total = 0.0
        for k in range(N_MTP):
            weight_total += tl.where(row + k < N, tl.load(weights_ptr + k), 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < V
            z = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            sig = _sigmoid((z + shift) * inv_div, FAST)
            dloss_dcapped = weight_total * tl.exp(cap * sig - lse)
            for k in range(N_MTP):
                valid = row + k < N
                target = tl.load(targets_ptr + row + k, mask=valid, other=-1)  # -1 matches no column
                dloss_dcapped -= tl.where(cols == target, tl.load(weights_ptr + k), 0.0)
            grad = grad_row * dloss_dcapped * (cap * inv_div) * sig * (1.0 - sig)
            tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)

    @triton.jit
    def _ce_grad_tile(z, rows, cols, grad_rows_ptr, grad_rows_stride, targets_ptr, weights_ptr, n_mtp, row_lse_ptr,
                      N, cap, shift, inv_div, FAST: tl.constexpr):
        """The softcapped CE's gradient for a tile of logits z; rows and cols broadcast to z's shape. The
        same arithmetic, in the same order, as _softcapped_ce_backward_kernel."""
        in_rows = rows < N
        grad_row = tl.load(grad_rows_ptr + rows * grad_rows_stride, mask=in_rows, other=0.0)
        lse = tl.load(row_lse_ptr + rows, mask=in_rows, other=0.0)
        weight_total = tl.zeros(rows.shape, dtype=tl.float32)
        for k in range(n_mtp):
            weight_total += tl.where(rows + k < N, tl.load(weights_ptr + k), 0.0)
        sig = _sigmoid((z + shift) * inv_div, FAST)
        dloss_dcapped = weight_total * tl.exp(cap * sig - lse)
        for k in range(n_mtp):
            target = tl.load(targets_ptr + rows + k, mask=rows + k < N, other=-1)  # -1 matches no column
            dloss_dcapped -= tl.where(cols == target, tl.load(weights_ptr + k), 0.0)
        return grad_row * dloss_dcapped * (cap * inv_div) * sig * (1.0 - sig)

    @triton.jit(do_not_specialize=["N_MTP"])
    def _softcapped_ce_grad_fp8_kernel(grad_rows_ptr, grad_rows_stride, logits_ptr, stride_r, stride_c, q_ptr,
                                       q_t_ptr, targets_ptr, weights_ptr, N_MTP, row_lse_ptr, N, V, cap, shift,
                                       inv_div, scale, bound, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                                       FAST: tl.constexpr):
        """q = e5m2(bf16(grad) / scale) of a (BLOCK_R, BLOCK_C) tile of the CE gradient, (N, V) row-major,
        and q_t = q^T, (V, N) row-major. bf16 first: the codes of the CE backward followed by the quantizer.
        On H100 at 49,152 x 50,304: 5.6 ms against 7.4 ms for the CE backward + quantizer (8.0 ms with tl.div_rn
        per element; 12.3 ms recomputing the transposed tile from a second, transposed read instead of tl.trans)."""
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
        mask = (rows[:, None] < N) & (cols[None, :] < V)
        mask_t = (cols[:, None] < V) & (rows[None, :] < N)
        z = tl.load(logits_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)
        grad = _ce_grad_tile(z.to(tl.float32), rows[:, None], cols[None, :], grad_rows_ptr, grad_rows_stride,
                             targets_ptr, weights_ptr, N_MTP, row_lse_ptr, N, cap, shift, inv_div, FAST)
        codes = _to_fp8(grad.to(tl.bfloat16), scale, bound, q_ptr)
        tl.store(q_ptr + rows[:, None] * V + cols[None, :], codes, mask=mask)
        tl.store(q_t_ptr + cols[:, None] * N + rows[None, :], tl.trans(codes), mask=mask_t)

    @triton.autotune(
        configs=[triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
                 triton.Config({"BLOCK": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
                 triton.Config({"BLOCK": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
                 triton.Config({"BLOCK": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3)],
        key=["M", "K"],
    )
    @triton.jit
    def _symmetric_matmul_kernel(a_ptr, c_ptr, M, K, stride_ab, stride_am, stride_ak, stride_cb, stride_cm,
                                 stride_cn, alpha, beta, ADD_INPUT: tl.constexpr, BLOCK: tl.constexpr,
                                 BLOCK_K: tl.constexpr):
        """C = alpha A A^T (+ beta A when ADD_INPUT: A square, symmetric), upper tiles only.

        Program (i, j, b) computes tile (i, j) of batch b when i <= j and also stores its
        transpose as tile (j, i); programs below the diagonal return at once. Square tiles
        keep the computed and mirrored tiles aligned, so each output element has one writer.
        """
        tile_i = tl.program_id(0)
        tile_j = tl.program_id(1)
        if tile_i > tile_j:
            return
        batch = tl.program_id(2).to(tl.int64)
        a_batch_ptr = a_ptr + batch * stride_ab
        rows_i = (tile_i * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        rows_j = (tile_j * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        a_i_ptr = a_batch_ptr + rows_i[:, None] * stride_am + ks[None, :] * stride_ak
        a_j_t_ptr = a_batch_ptr + ks[:, None] * stride_ak + rows_j[None, :] * stride_am  # (BLOCK_K, BLOCK)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_in = (k0 + ks) < K
            a_i = tl.load(a_i_ptr, mask=(rows_i[:, None] < M) & k_in[None, :], other=0.0)
            a_j_t = tl.load(a_j_t_ptr, mask=k_in[:, None] & (rows_j[None, :] < M), other=0.0)
            acc = tl.dot(a_i, a_j_t, acc)
            a_i_ptr += BLOCK_K * stride_ak
            a_j_t_ptr += BLOCK_K * stride_ak

        tile_mask = (rows_i[:, None] < M) & (rows_j[None, :] < M)
        acc = acc * alpha
        if ADD_INPUT:
            a_tile = tl.load(a_batch_ptr + rows_i[:, None] * stride_am + rows_j[None, :] * stride_ak,
                             mask=tile_mask, other=0.0)
            acc += beta * a_tile.to(tl.float32)
        out = acc.to(c_ptr.dtype.element_ty)
        c_batch_ptr = c_ptr + batch * stride_cb
        tl.store(c_batch_ptr + rows_i[:, None] * stride_cm + rows_j[None, :] * stride_cn, out, mask=tile_mask)
        if tile_i != tile_j:
            mirror_mask = (rows_j[:, None] < M) & (rows_i[None, :] < M)
            tl.store(c_batch_ptr + rows_j[:, None] * stride_cm + rows_i[None, :] * stride_cn, tl.trans(out),
                     mask=mirror_mask)

    @triton.jit
    def _gather_rows_kernel(table_ptr, index_ptr, out_ptr, T, V, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[n, t, :] = table[n, index[t], :] in out's dtype; program (t block, n, column block)."""
        n = tl.program_id(1).to(tl.int64)
        ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        t_in = ts < T
        mask = t_in[:, None] & (cols[None, :] < D)
        rows = tl.load(index_ptr + ts, mask=t_in, other=0).to(tl.int64)
        values = tl.load(table_ptr + (n * V + rows[:, None]) * D + cols[None, :], mask=mask, other=0.0)
        out_rows = n * T + ts.to(tl.int64)
        tl.store(out_ptr + out_rows[:, None] * D + cols[None, :], values.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scatter_add_rows_kernel(grad_ptr, sorted_ptr, positions_ptr, rows_ptr, T, V, D, CHUNK: tl.constexpr,
                                 BLOCK_D: tl.constexpr):
        """grad[n, sorted[p], :] += rows[n, positions[p], :] for the CHUNK sorted positions p of this program:
        a run of equal indices is summed in registers and added with one atomic add (relaxed: only the sum
        matters), so a frequent token costs one atomic per run and chunk instead of one per occurrence."""
        n = tl.program_id(1).to(tl.int64)
        start = tl.program_id(0) * CHUNK
        cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_in = cols < D
        grad_n = grad_ptr + n * V * D
        rows_n = rows_ptr + n * T * D
        current = tl.load(sorted_ptr + start).to(tl.int64)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for r in tl.static_range(CHUNK):
            valid = start + r < T
            index = tl.load(sorted_ptr + start + r, mask=valid, other=-1).to(tl.int64)
            source = tl.load(positions_ptr + start + r, mask=valid, other=0)
            row = tl.load(rows_n + source * D + cols, mask=col_in & valid, other=0.0).to(tl.float32)
            new_run = index != current
            tl.atomic_add(grad_n + current * D + cols, acc, mask=col_in & new_run, sem="relaxed")
            acc = tl.where(new_run, row, acc + row)
            current = index
        tl.atomic_add(grad_n + current * D + cols, acc, mask=col_in & (current >= 0), sem="relaxed")

    @triton.jit
    def _load_half_rows(ptr, rows, row_stride, cols, mask):
        return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _rms_scale(lo, hi, HALF: tl.constexpr, eps):
        """1 / rms of each row of [lo, hi] (float32), as a column."""
        return tl.rsqrt((tl.sum(lo * lo, axis=1) + tl.sum(hi * hi, axis=1)) / (2 * HALF) + eps)[:, None]

    @triton.jit
    def _normalized_halves(base, rows, row_stride, cols, mask, eps, HALF: tl.constexpr, QK_NORM: tl.constexpr):
        """Both halves of rows of one head, RMS-normalized and rounded to bf16 as F.rms_norm's output is."""
        lo = _load_half_rows(base, rows, row_stride, cols, mask)
        hi = _load_half_rows(base + HALF, rows, row_stride, cols, mask)
        if QK_NORM:
            scale = _rms_scale(lo, hi, HALF, eps)
            lo = (lo * scale).to(tl.bfloat16).to(tl.float32)
            hi = (hi * scale).to(tl.bfloat16).to(tl.float32)
        return lo, hi

    @triton.jit
    def _head_block(cos_ptr, sin_ptr, T, table_stride, HALF: tl.constexpr, PAIRED: tl.constexpr,
                    BLOCK_T: tl.constexpr):
        """This program's head, tokens (int64), half-columns, token mask (1-D and as a column) and cos/sin rows
        (PAIRED: the tables have 2 T rows and head h at token t takes row 2 t + h % 2). Heads vary fastest in
        the grid: the programs of one token block share its cos/sin rows in L2."""
        h = tl.program_id(0)
        ts = (tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        cols = tl.arange(0, HALF)
        t_in = ts < T
        mask = t_in[:, None]
        table_rows = 2 * ts + h % 2 if PAIRED else ts
        cos = tl.load(cos_ptr + table_rows[:, None] * table_stride + cols[None, :], mask=mask, other=1.0)
        sin = tl.load(sin_ptr + table_rows[:, None] * table_stride + cols[None, :], mask=mask, other=0.0)
        return h, ts, cols, t_in, mask, cos, sin

    @triton.jit
    def _attention_inputs_kernel(qkv_ptr, cos_ptr, sin_ptr, nds_ptr, ve_ptr, gate_ptr, q_ptr, k_ptr, v_ptr, T,
                                 qkv_stride, table_stride, ve_stride, gate_stride, eps, H: tl.constexpr,
                                 HALF: tl.constexpr, QK_NORM: tl.constexpr, KEY_OFFSET: tl.constexpr,
                                 HAS_VE: tl.constexpr, PAIRED: tl.constexpr, BLOCK_T: tl.constexpr):
        """Program (head h, token block): q, k, v of BLOCK_T tokens of head h, each as two halves of HALF dims.

        q = rot(norm(q_pre)), k likewise; with KEY_OFFSET the stationary dims of k (the upper half of each
        half: zero frequency) are those of norm(k_pre) one token earlier, times not_doc_start; v = v_pre +
        gate * ve. Outputs (T, H, 2 HALF), contiguous."""
        h, ts, cols, t_in, mask, cos, sin = _head_block(cos_ptr, sin_ptr, T, table_stride, HALF, PAIRED, BLOCK_T)
        out_rows = ((ts * H + h) * (2 * HALF))[:, None]

        q_base = qkv_ptr + h * (2 * HALF)
        lo, hi = _normalized_halves(q_base, ts, qkv_stride, cols, mask, eps, HALF, QK_NORM)
        tl.store(q_ptr + out_rows + cols[None, :], (lo * cos + hi * sin).to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(q_ptr + out_rows + HALF + cols[None, :], (hi * cos - lo * sin).to(q_ptr.dtype.element_ty), mask=mask)

        k_base = qkv_ptr + (H + h) * (2 * HALF)
        lo, hi = _normalized_halves(k_base, ts, qkv_stride, cols, mask, eps, HALF, QK_NORM)
        k_lo, k_hi = lo * cos + hi * sin, hi * cos - lo * sin
        if KEY_OFFSET:
            prev = ts - 1
            prev_lo, prev_hi = _normalized_halves(k_base, prev, qkv_stride, cols, (t_in & (prev >= 0))[:, None], eps,
                                                  HALF, QK_NORM)
            carry = tl.load(nds_ptr + ts, mask=t_in, other=0.0).to(tl.float32)[:, None]
            stationary = (cols >= HALF // 2)[None, :]
            k_lo = tl.where(stationary, prev_lo * carry, k_lo)
            k_hi = tl.where(stationary, prev_hi * carry, k_hi)
        tl.store(k_ptr + out_rows + cols[None, :], k_lo.to(k_ptr.dtype.element_ty), mask=mask)
        tl.store(k_ptr + out_rows + HALF + cols[None, :], k_hi.to(k_ptr.dtype.element_ty), mask=mask)

        dims = tl.arange(0, 2 * HALF)
        v = tl.load(qkv_ptr + ts[:, None] * qkv_stride + (2 * H + h) * (2 * HALF) + dims[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        if HAS_VE:
            gate = tl.load(gate_ptr + ts * gate_stride + h, mask=t_in, other=0.0).to(tl.float32)[:, None]
            ve = tl.load(ve_ptr + ts[:, None] * ve_stride + h * (2 * HALF) + dims[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            v = v + gate * ve
        tl.store(v_ptr + out_rows + dims[None, :], v.to(v_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_input_grad(d_lo, d_hi, cos, sin, x_base, ts, qkv_stride, cols, mask, eps, out, HALF: tl.constexpr,
                       QK_NORM: tl.constexpr):
        """Store the gradient of q_pre (or k_pre) given that of the rotated output's halves: the rotation's
        transpose, then the RMSNorm's backward dx = s (g - y mean(g y)), y = x s, recomputed from x."""
        g_lo = d_lo * cos - d_hi * sin
        g_hi = d_lo * sin + d_hi * cos
        if QK_NORM:
            x_lo = _load_half_rows(x_base, ts, qkv_stride, cols, mask)
            x_hi = _load_half_rows(x_base + HALF, ts, qkv_stride, cols, mask)
            scale = _rms_scale(x_lo, x_hi, HALF, eps)
            y_lo, y_hi = x_lo * scale, x_hi * scale
            mean_gy = ((tl.sum(g_lo * y_lo, axis=1) + tl.sum(g_hi * y_hi, axis=1)) / (2 * HALF))[:, None]
            g_lo = scale * (g_lo - y_lo * mean_gy)
            g_hi = scale * (g_hi - y_hi * mean_gy)
        tl.store(out + cols[None, :], g_lo.to(out.dtype.element_ty), mask=mask)
        tl.store(out + HALF + cols[None, :], g_hi.to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _attention_inputs_backward_kernel(gq_ptr, gk_ptr, gv_ptr, qkv_ptr, cos_ptr, sin_ptr, nds_ptr, ve_ptr,
                                          gate_ptr, gqkv_ptr, gve_ptr, ggate_ptr, T, gq_t, gk_t, gv_t, gq_h, gk_h,
                                          gv_h, qkv_stride, table_stride, ve_stride, gate_stride, eps,
                                          H: tl.constexpr, HALF: tl.constexpr, QK_NORM: tl.constexpr,
                                          KEY_OFFSET: tl.constexpr, HAS_VE: tl.constexpr, PAIRED: tl.constexpr,
                                          BLOCK_T: tl.constexpr):
        """The gradient of _attention_inputs_kernel for (head h, token block): of the projection's output (its
        q, k and v parts, one (T, 3 H D) tensor), of ve and of the gate. With KEY_OFFSET, the gradient of k's
        stationary dims at token t comes from the output at token t + 1."""
        h, ts, cols, t_in, mask, cos, sin = _head_block(cos_ptr, sin_ptr, T, table_stride, HALF, PAIRED, BLOCK_T)
        grad_rows = gqkv_ptr + ts[:, None] * qkv_stride

        gq_base = gq_ptr + h * gq_h
        d_lo = _load_half_rows(gq_base, ts, gq_t, cols, mask)
        d_hi = _load_half_rows(gq_base + HALF, ts, gq_t, cols, mask)
        _qk_input_grad(d_lo, d_hi, cos, sin, qkv_ptr + h * (2 * HALF), ts, qkv_stride, cols, mask, eps,
                       grad_rows + h * (2 * HALF), HALF, QK_NORM)

        gk_base = gk_ptr + h * gk_h
        d_lo = _load_half_rows(gk_base, ts, gk_t, cols, mask)
        d_hi = _load_half_rows(gk_base + HALF, ts, gk_t, cols, mask)
        if KEY_OFFSET:
            nxt = ts + 1
            next_in = nxt < T
            carry = tl.load(nds_ptr + nxt, mask=next_in, other=0.0).to(tl.float32)[:, None]
            stationary = (cols >= HALF // 2)[None, :]
            d_lo = tl.where(stationary, _load_half_rows(gk_base, nxt, gk_t, cols, next_in[:, None]) * carry, d_lo)
            d_hi = tl.where(stationary, _load_half_rows(gk_base + HALF, nxt, gk_t, cols, next_in[:, None]) * carry,
                            d_hi)
        _qk_input_grad(d_lo, d_hi, cos, sin, qkv_ptr + (H + h) * (2 * HALF), ts, qkv_stride, cols, mask, eps,
                       grad_rows + (H + h) * (2 * HALF), HALF, QK_NORM)

        dims = tl.arange(0, 2 * HALF)
        gv = tl.load(gv_ptr + ts[:, None] * gv_t + h * gv_h + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_rows + (2 * H + h) * (2 * HALF) + dims[None, :], gv.to(gqkv_ptr.dtype.element_ty), mask=mask)
        if HAS_VE:
            gate = tl.load(gate_ptr + ts * gate_stride + h, mask=t_in, other=0.0).to(tl.float32)
            ve = tl.load(ve_ptr + ts[:, None] * ve_stride + h * (2 * HALF) + dims[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            tl.store(gve_ptr + ts[:, None] * ve_stride + h * (2 * HALF) + dims[None, :],
                     (gv * gate[:, None]).to(gve_ptr.dtype.element_ty), mask=mask)
            tl.store(ggate_ptr + ts * H + h, tl.sum(gv * ve, axis=1), mask=t_in)
