"""The GPT-2 MLP with its GELU in the epilogues of Triton matmuls.

    gelu_mlp(x, w_fc, b_fc, w_proj, b_proj)
        = F.linear(F.gelu(F.linear(x, w_fc, b_fc), approximate="tanh"), w_proj, b_proj)

Why: compiled, the MLP is two cuBLAS matmuls and Inductor's elementwise kernels between them. The
(tokens x 4C) activations then cross memory more often than the matmuls need: the forward writes the
pre-activation, reads it back and writes the GELU; the backward writes the GELU's incoming gradient,
reads it with the pre-activation and writes the gradient of the pre-activation, then reads that again
for the bias gradient. At 131,072 tokens x 3072 that is ~0.8 GB a pass per layer
(nanogpt/PERF_NOTES.md: GELU forward + backward ~65 ms of a ~1 s step on an H100). Here:
  forward   one persistent TMA matmul, x @ w_fc^T, whose epilogue adds the bias and stores both the
            pre-activation (kept for backward) and its GELU; then cuBLAS for the c_proj matmul;
  backward  one persistent TMA matmul, grad_y @ w_proj, whose epilogue multiplies by GELU'(pre) and
            stores the gradient of the pre-activation, plus per-tile column sums of it (fp32): the bias
            gradient without another pass; then cuBLAS for the four remaining matmuls.
The GELU is the tanh approximation GPT-2 used, 0.5 x (1 + tanh u), u = sqrt(2/pi) (x + 0.044715 x^3),
computed in float32 from the pre-activation rounded to the matmul's dtype, as the unfused compiled model
computes it. The kernels take tanh from the GPU's one-instruction approximation (APPROX_TANH below; exact
with NANOGPT_GELU_EXACT=1): its error (relative 2^-11 in tanh) is under the bf16 rounding of the result
but for outputs near zero, where it is at most ~7e-4 absolute.

The fused path runs for CUDA tensors in bfloat16 or float16 on GPUs with TMA (compute capability 9+:
H100/H200) where triton imports; everything else (CPU, A100, float32) takes `gelu_mlp_reference`,
plain PyTorch. The op is a torch.library custom op with a fake (shape) function and registered
autograd, so torch.compile traces it as one opaque node. It also runs on CPU tensors (in PyTorch, the
same formulas as the kernels' epilogues), so its autograd is testable without a GPU. Nothing here
touches CUDA at import; triton is imported under a guard and the kernels exist only where it imports.
`python -m nanogpt.fused_mlp` times it against the compiled unfused MLP on a GPU.
"""

import functools
import math
import os
import sys

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machines: gelu_mlp runs its reference
    triton = tl = None

_FUSED_DTYPES = (torch.bfloat16, torch.float16)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715
# The kernels' tanh: the GPU's one-instruction approximation (tanh.approx.f32, max relative error 2^-10.99,
# under bf16's 2^-9 rounding of the stored result), or with NANOGPT_GELU_EXACT=1 an exp and a division.
# The epilogues are bound by such special-function instructions (nanogpt/PERF_NOTES.md).
APPROX_TANH = os.environ.get("NANOGPT_GELU_EXACT", "") in ("", "0")
# Every kernel configuration uses 128-row tiles, so the bias gradient's per-tile partial sums have a
# shape known before the autotuner picks one.
_BLOCK_M = 128


def gelu_mlp_reference(x, w_fc, b_fc, w_proj, b_proj):
    """The MLP in plain PyTorch: c_proj(gelu_tanh(c_fc(x)))."""
    return F.linear(F.gelu(F.linear(x, w_fc, b_fc), approximate="tanh"), w_proj, b_proj)


def fused_path(x: torch.Tensor, w_fc: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """True where gelu_mlp runs the Triton kernels: CUDA with TMA (capability 9+), 16-bit floats, triton,
    and widths the TMA descriptors take."""
    return (triton is not None and x.is_cuda and x.dtype in _FUSED_DTYPES
            and all(w is None or w.dtype == x.dtype for w in (w_fc, *others))
            and tma_widths(x.shape[-1], w_fc.shape[0], x.element_size())
            and _has_tma(x.device.index))


def tma_widths(width: int, hidden: int, element_size: int) -> bool:
    """Whether rows of `width` and `hidden` elements are 16-byte multiples, as TMA descriptors need (with
    2-byte floats: widths divisible by 8). Other widths take the reference path."""
    return (width * element_size) % 16 == 0 and (hidden * element_size) % 16 == 0


@functools.cache
def _has_tma(device_index) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def gelu_mlp(x, w_fc, b_fc, w_proj, b_proj):
    """c_proj(gelu_tanh(c_fc(x))) for x (..., C), w_fc (H, C), w_proj (C, H), biases (H,), (C,) or None.

    Differentiable in all five. Tensors must share a dtype (cast them first, as autocast would).
    """
    if (x.ndim < 1 or w_fc.ndim != 2 or w_proj.ndim != 2 or x.shape[-1] != w_fc.shape[1]
            or w_proj.shape != (w_fc.shape[1], w_fc.shape[0])
            or (b_fc is not None and b_fc.shape != w_fc.shape[:1])
            or (b_proj is not None and b_proj.shape != w_proj.shape[:1])):
        shapes = [None if t is None else tuple(t.shape) for t in (x, w_fc, b_fc, w_proj, b_proj)]
        raise ValueError(f"gelu_mlp needs x (..., C), w_fc (H, C), b_fc (H,), w_proj (C, H), b_proj (C,); got "
                         f"x, w_fc, b_fc, w_proj, b_proj shapes {shapes}")
    if not fused_path(x, w_fc, b_fc, w_proj, b_proj):
        return gelu_mlp_reference(x, w_fc, b_fc, w_proj, b_proj)
    y = torch.ops.nanogpt.gelu_mlp(x.reshape(-1, x.shape[-1]), w_fc, b_fc, w_proj, b_proj)[0]
    return y.reshape(x.shape)


def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in at least float32: where the epilogues compute."""
    return t.to(_wide_dtype(t.dtype))


def gelu_and_slope(pre: torch.Tensor):
    """(gelu_tanh(pre), its derivative) in float32, the formulas of the kernels' epilogues."""
    z = _wide(pre)
    s = torch.sigmoid(2.0 * _SQRT_2_OVER_PI * (z + _CUBIC * z * z * z))
    return z * s, s + z * s * (1.0 - s) * (2.0 * _SQRT_2_OVER_PI) * (1.0 + 3.0 * _CUBIC * z * z)


# ---------------------------------------------------------------------------------------------
# the op
# ---------------------------------------------------------------------------------------------

def _uses_kernels(t: torch.Tensor) -> bool:
    return t.is_cuda and triton is not None


@torch.library.custom_op("nanogpt::gelu_mlp", mutates_args=())
def _gelu_mlp_op(x: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor | None, w_proj: torch.Tensor,
                 b_proj: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, pre, h): pre = x @ w_fc^T + b_fc and h = gelu(pre) are kept for the backward pass."""
    x = x.contiguous()
    if _uses_kernels(x):
        pre = torch.empty((x.shape[0], w_fc.shape[0]), dtype=x.dtype, device=x.device)
        h = torch.empty_like(pre)
        _launch(x, w_fc.contiguous(), b_fc, pre, pre, h, None, backward=False)
    else:  # the op's own CPU path: the same formulas in PyTorch
        pre = F.linear(x, w_fc, b_fc)
        h = gelu_and_slope(pre)[0].to(pre.dtype)
    return F.linear(h, w_proj, b_proj), pre, h


@_gelu_mlp_op.register_fake
def _(x, w_fc, b_fc, w_proj, b_proj):
    hidden = x.new_empty((x.shape[0], w_fc.shape[0]))
    return x.new_empty((x.shape[0], w_proj.shape[0])), hidden, torch.empty_like(hidden)


@torch.library.custom_op("nanogpt::gelu_mlp_grad_pre", mutates_args=())
def _gelu_mlp_grad_pre_op(grad_y: torch.Tensor, w_proj: torch.Tensor, pre: torch.Tensor,
                          bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_pre, grad_b_fc): grad_pre = (grad_y @ w_proj) * gelu'(pre), grad_b_fc its column sums in at
    least float32 (an empty tensor when bias_grad is False)."""
    grad_y = grad_y.contiguous()
    if _uses_kernels(grad_y):
        grad_pre = torch.empty_like(pre)
        partial = torch.empty((triton.cdiv(pre.shape[0], _BLOCK_M) if bias_grad else 0, pre.shape[1]),
                              dtype=torch.float32, device=pre.device)
        # b of the kernel is (N, K): the down weight transposed, a small copy (C x 4C).
        _launch(grad_y, w_proj.t().contiguous(), None, pre.contiguous(), grad_pre, grad_pre,
                partial if bias_grad else None, backward=True)
        return grad_pre, (partial.sum(0) if bias_grad else partial.new_empty((0,)))
    grad = _wide(grad_y @ w_proj) * gelu_and_slope(pre)[1]
    grad_pre = grad.to(pre.dtype)
    return grad_pre, (_wide(grad_pre).sum(0) if bias_grad else grad.new_empty((0,)))


@_gelu_mlp_grad_pre_op.register_fake
def _(grad_y, w_proj, pre, bias_grad):
    return torch.empty_like(pre), pre.new_empty((pre.shape[1] if bias_grad else 0,), dtype=_wide_dtype(pre.dtype))


def _setup_context(ctx, inputs, output):
    x, w_fc, b_fc, w_proj, b_proj = inputs
    _, pre, h = output
    ctx.save_for_backward(x, w_fc, w_proj, pre, h)
    ctx.has_b_fc, ctx.has_b_proj = b_fc is not None, b_proj is not None
    # pre and h are by-products, not results: no gradient flows into them (set_materialize_grads(False)
    # passes None rather than two zero tensors of (tokens x 4C)).
    ctx.mark_non_differentiable(pre, h)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, _grad_pre, _grad_h):
    x, w_fc, w_proj, pre, h = ctx.saved_tensors
    if grad_y is None:
        return None, None, None, None, None
    need = ctx.needs_input_grad
    grad_x = grad_w_fc = grad_b_fc = None
    if need[0] or need[1] or need[2]:
        grad_pre, bias_sums = torch.ops.nanogpt.gelu_mlp_grad_pre(grad_y, w_proj, pre, ctx.has_b_fc and need[2])
        grad_x = grad_pre @ w_fc if need[0] else None
        grad_w_fc = grad_pre.t() @ x if need[1] else None
        grad_b_fc = bias_sums.to(pre.dtype) if ctx.has_b_fc and need[2] else None
    grad_w_proj = grad_y.t() @ h if need[3] else None
    grad_b_proj = grad_y.sum(0) if ctx.has_b_proj and need[4] else None
    return grad_x, grad_w_fc, grad_b_fc, grad_w_proj, grad_b_proj


_gelu_mlp_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# the kernel: a persistent TMA matmul a (M, K) @ b (N, K)^T with the GELU's epilogues
# ---------------------------------------------------------------------------------------------

def _launch(a, b, bias, pre, out, h, partial, backward: bool):
    """Forward: pre = out = a @ b^T + bias, h = gelu(pre). Backward: out = (a @ b^T) * gelu'(pre) and,
    where partial is given, partial[i] = the column sums of out's i-th 128-row tile."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = a.shape
    N = b.shape[0]
    if not tma_widths(K, N, a.element_size()):  # gelu_mlp's fused_path sends other widths to the reference
        raise ValueError(f"gelu_mlp's kernels need rows of 16-byte multiples: K={K}, N={N} in {a.dtype}")
    # Block shapes are placeholders here; each autotuned config's pre_hook sets its own.
    descs = [TensorDescriptor.from_tensor(t, [16, 16]) for t in (a, b, pre, out, h)]
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    grid = lambda meta: (min(sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)
    # Unused pointers get a real tensor (never read: HAS_BIAS / PARTIAL are compile-time switches).
    _gelu_tma_persistent_kernel[grid](*descs, bias if bias is not None else out,
                                      partial if partial is not None else out, M, N, K,
                                      HAS_BIAS=bias is not None, PARTIAL=partial is not None,
                                      BACKWARD=backward, APPROX_TANH=APPROX_TANH, NUM_SMS=sms)


if triton is not None:
    from nanogpt.tma_tiles import tile_matmul, tile_offsets

    @triton.jit
    def _tanh_u(z, APPROX_TANH: tl.constexpr):
        """tanh(u), u = sqrt(2/pi) (z + 0.044715 z^3): one MUFU instruction (tanh.approx.f32, max relative
        error 2^-10.99) with APPROX_TANH, else 2 sigmoid(2u) - 1 (an exp and a division)."""
        u = (0.7978845608028654 * z) * (1.0 + 0.044715 * z * z)
        if APPROX_TANH:
            return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [u], dtype=tl.float32,
                                             is_pure=True, pack=1)
        return 2.0 * tl.sigmoid(2.0 * u) - 1.0

    @triton.jit
    def _gelu_epilogue(acc, bias_ptr, partial_ptr, pre_desc, out_desc, h_desc, off_m, off_n, N,
                       WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BACKWARD: tl.constexpr,
                       BLOCK_M: tl.constexpr, APPROX_TANH: tl.constexpr):
        dtype = out_desc.dtype
        cols = off_n + tl.arange(0, WIDTH)
        if BACKWARD:
            z = pre_desc.load([off_m, off_n]).to(tl.float32)
            t = _tanh_u(z, APPROX_TANH)
            half_z = 0.5 * z
            # d/dz [0.5 z (1 + t)] = 0.5 (1 + t) + 0.5 z (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 z^2)
            slope = 0.5 + 0.5 * t + half_z * (1.0 - t * t) * (0.7978845608028654 + 0.10703222440565526 * z * z)
            grad = (acc * slope).to(dtype)
            out_desc.store([off_m, off_n], grad)
            if PARTIAL:
                tl.store(partial_ptr + (off_m // BLOCK_M) * N + cols, tl.sum(grad.to(tl.float32), axis=0),
                         mask=cols < N)
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            pre = acc.to(dtype)
            out_desc.store([off_m, off_n], pre)
            z = pre.to(tl.float32)
            half_z = 0.5 * z
            h_desc.store([off_m, off_n], (half_z + half_z * _tanh_u(z, APPROX_TANH)).to(dtype))

    def _gelu_tma_configs():
        def config(bn, bk, warps, stages, subtile):
            def set_block_shapes(nargs):
                nargs["a_desc"].block_shape = [_BLOCK_M, bk]
                nargs["b_desc"].block_shape = [bn, bk]
                for name in ("pre_desc", "out_desc", "h_desc"):
                    nargs[name].block_shape = [_BLOCK_M, bn // 2 if subtile else bn]
            return triton.Config({"BLOCK_M": _BLOCK_M, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SUBTILE": subtile},
                                 num_warps=warps, num_stages=stages, pre_hook=set_block_shapes)
        # The shapes measured best for the speedrun's squared-ReLU MLP on H100/H200 (modded_nanogpt/kernels/mlp.py),
        # plus a smaller tile; the autotuner picks per (M, N, K, direction).
        return [config(256, 64, 8, 4, True), config(256, 64, 8, 3, True), config(128, 64, 8, 4, False),
                config(128, 64, 4, 4, False)]

    @triton.autotune(configs=_gelu_tma_configs(), key=["M", "N", "K", "BACKWARD", "HAS_BIAS", "PARTIAL", "APPROX_TANH"])
    @triton.jit
    def _gelu_tma_persistent_kernel(a_desc, b_desc, pre_desc, out_desc, h_desc, bias_ptr, partial_ptr, M, N, K,
                                    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BACKWARD: tl.constexpr,
                                    APPROX_TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, SUBTILE: tl.constexpr):
        """acc = a @ b^T through TMA tiles, one program per SM walking the output tiles (so a tile's loads
        overlap the previous tile's epilogue), GROUP_M row-tiles sweeping the columns together (shared b
        tiles come from L2; the walk: nanogpt/tma_tiles.py). SUBTILE runs the epilogue on two column halves (less
        shared memory for stores)."""
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        programs_per_group = GROUP_M * tiles_n
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_SMS, flatten=True):
            off_m, off_n = tile_offsets(tile, tiles_m, programs_per_group, BLOCK_M, BLOCK_N, GROUP_M)
            acc = tile_matmul(a_desc, b_desc, off_m, off_n, k_tiles, BLOCK_M, BLOCK_N, BLOCK_K)
            if SUBTILE:
                left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
                _gelu_epilogue(left, bias_ptr, partial_ptr, pre_desc, out_desc, h_desc, off_m, off_n, N,
                               BLOCK_N // 2, HAS_BIAS, PARTIAL, BACKWARD, BLOCK_M, APPROX_TANH)
                _gelu_epilogue(right, bias_ptr, partial_ptr, pre_desc, out_desc, h_desc, off_m, off_n + BLOCK_N // 2,
                               N, BLOCK_N // 2, HAS_BIAS, PARTIAL, BACKWARD, BLOCK_M, APPROX_TANH)
            else:
                _gelu_epilogue(acc, bias_ptr, partial_ptr, pre_desc, out_desc, h_desc, off_m, off_n, N,
                               BLOCK_N, HAS_BIAS, PARTIAL, BACKWARD, BLOCK_M, APPROX_TANH)


# ---------------------------------------------------------------------------------------------
# python -m nanogpt.fused_mlp: time the fused MLP against the compiled unfused one on a GPU
# ---------------------------------------------------------------------------------------------

def _bench(rows: int = 131072, width: int = 768) -> None:
    if not torch.cuda.is_available() or triton is None:
        print("nanogpt.fused_mlp: no CUDA GPU with triton here; nothing to time")
        return
    torch.manual_seed(0)
    dev, dtype = "cuda", torch.bfloat16
    x = torch.randn(rows, width, device=dev, dtype=dtype, requires_grad=True)
    params = [torch.randn(4 * width, width, device=dev, dtype=dtype) * 0.02, torch.randn(4 * width, device=dev, dtype=dtype) * 0.02,
              torch.randn(width, 4 * width, device=dev, dtype=dtype) * 0.02, torch.randn(width, device=dev, dtype=dtype) * 0.02]
    for p in params:
        p.requires_grad_(True)
    grad_y = torch.randn(rows, width, device=dev, dtype=dtype)
    if not fused_path(x, *params):
        print("nanogpt.fused_mlp: this GPU takes the reference path (no TMA); nothing to compare")
        return
    compiled = torch.compile(gelu_mlp_reference)

    def timed(fn, backward: bool) -> float:
        def once():
            y = fn(x, *params)
            if backward:
                y.backward(grad_y)
        for _ in range(3):
            once()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            once()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 20

    global APPROX_TANH
    print(f"GELU MLP, {rows} x {width} -> {4 * width} -> {width}, {dtype}, {torch.cuda.get_device_name()}")
    for name, fn, approx in (("compiled unfused (Inductor + cuBLAS)", compiled, True),
                             ("fused, tanh.approx epilogues", gelu_mlp, True),
                             ("fused, exact tanh (NANOGPT_GELU_EXACT=1)", gelu_mlp, False)):
        APPROX_TANH = approx
        with torch.no_grad():
            fwd = timed(fn, backward=False)
        both = timed(fn, backward=True)
        print(f"{name:42s} forward {fwd:7.3f} ms   forward + backward {both:7.3f} ms")


if __name__ == "__main__":
    _bench(*(int(a) for a in sys.argv[1:3]))
