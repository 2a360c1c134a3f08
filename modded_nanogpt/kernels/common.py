"""What the ops of the package share: the optional triton import, the switch between the fused paths and the
references (use_triton), the fp8 and TMA capability tests, dtype constants, and the sigmoid, tanh and exp2 of the
cross-entropy kernels with the switch of their fast forms (FAST_SIGMOID).

The ops read use_triton and FAST_SIGMOID here at call time (`common.use_triton(x)`, fast_sigmoid), so a value
set on this module, or on the package, which passes both names through to this one, takes effect at the next
call. Nothing here touches CUDA at import.
"""

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machines: every public function runs its reference
    triton = tl = None

FLOAT8_E4M3 = torch.float8_e4m3fn
FLOAT8_E5M2 = torch.float8_e5m2
# The Triton matmuls are written for 16-bit inputs: tl.dot would silently round float32 ones to tf32, so those
# take the reference (cuBLAS) path on GPU too.
TRITON_MATMUL_DTYPES = (torch.bfloat16, torch.float16)


def use_triton(t: torch.Tensor) -> bool:
    """True where the fused path runs for tensor t: CUDA, triton importable, MODDED_NO_TRITON unset."""
    return t.is_cuda and triton is not None and os.environ.get("MODDED_NO_TRITON", "") in ("", "0")


@functools.cache
def has_fp8_tensor_cores(device_index) -> bool:
    """Whether CUDA device `device_index` has fp8 tensor cores (sm_89 and later); elsewhere fp8 is simulated."""
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def tma_ready(*tensors) -> bool:
    """Whether TMA kernels can take these 2-D CUDA tensors through descriptors: a GPU with TMA (Hopper or
    later; A100s and sm_89 GPUs take the pointer kernels), rows 16-byte aligned, last dim contiguous."""
    return (tensors[0].is_cuda and torch.cuda.get_device_capability(tensors[0].device)[0] >= 9
            and all(t.ndim == 2 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
                    and t.data_ptr() % 16 == 0 for t in tensors))


# The softcap's sigmoid in the CE kernels: for 16-bit logits the GPU's one-instruction tanh (its error, at most
# cap * 2^-11.99 ~ 5.6e-3 on a capped logit, is under half a bf16 step of logits above 2), for float32 logits
# and with MODDED_EXACT_SIGMOID=1 the exact formula. The kernels are bound by such instructions
# (modded_nanogpt/PERF_NOTES.md).
FAST_SIGMOID = os.environ.get("MODDED_EXACT_SIGMOID", "") in ("", "0")


def fast_sigmoid(logits) -> bool:
    """Whether the cross-entropy kernels take the fast sigmoid for these logits: FAST_SIGMOID, read now, and
    16-bit logits."""
    return FAST_SIGMOID and logits.dtype != torch.float32


if triton is not None:  # the kernels' sigmoid, a Triton function inlined where a kernel calls it

    @triton.jit
    def sigmoid(x, FAST: tl.constexpr):
        """sigmoid(x): with FAST, 0.5 + 0.5 tanh(x / 2) through tanh.approx.f32 (one special-function
        instruction, relative error <= 2^-10.99); else tl.sigmoid (an exp and an IEEE division)."""
        if FAST:
            return 0.5 + 0.5 * tanh(0.5 * x, True)
        return tl.sigmoid(x)

    @triton.jit
    def tanh(x, FAST: tl.constexpr):
        """tanh(x): with FAST tanh.approx.f32 (one special-function instruction), else 2 sigmoid(2x) - 1."""
        if FAST:
            return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                             pack=1)
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def exp2(x, FAST: tl.constexpr):
        """2^x: with FAST ex2.approx.ftz.f32 alone (tl.exp2's ex2.approx.f32 adds a range check and two
        multiplies per element for results below float32's normal range, flushed to zero here), else tl.exp2."""
        if FAST:
            return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        return tl.exp2(x)
