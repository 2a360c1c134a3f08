"""Fused GPU ops of the speedrun trainer, each beside the plain PyTorch reference it must match.

    relu2_linear(x, weight)                         relu(x @ weight.T) ** 2, the MLP up projection
    relu2_mlp(x, up, down)                          relu(x @ up.T) ** 2 @ down, the whole MLP (fused backward)
    fp8_linear(x, weight_t, x_scale, w_scale, grad_scale)
                                                    x @ weight_t through fp8 tensor cores (lm_head)
    softcapped_cross_entropy(logits, targets, mtp_weights, cap, shift, div, reduction)
                                                    multi-token-prediction CE on sigmoid-capped logits
    fp8_softcapped_cross_entropy(x, weight_t, targets, mtp_weights, x_scale, w_scale, grad_scale)
                                                    the fp8 head and that loss as one op
    xxt(X), ba_plus_caa(A, alpha, beta)             symmetric products of Polar Express
    gather_rows(table, index, dtype)                table[..., index, :] cast to dtype (embedding rows)
    scatter_add_rows(grad, index, rows)             grad[..., index, :] += rows, duplicates summed
    attention_inputs(x, w_qkv, cos, sin, ...)       an attention layer's q, k, v (projection, q/k norm +
                                                    rotary, key offset, value embeddings)

One module per op holds its reference (`*_reference`), its Triton kernels and its custom-op registration:

    mlp               relu2_linear, relu2_mlp
    fp8               fp8_linear
    cross_entropy     softcap, softcapped_cross_entropy, softcapped_token_losses, fp8_softcapped_cross_entropy
    symmetric_matmul  xxt, ba_plus_caa
    embedding_rows    gather_rows, scatter_add_rows, sort_index
    qkv               attention_inputs, attention_inputs_supported
    common            use_triton, has_fp8_tensor_cores, FAST_SIGMOID, the kernels' sigmoid, dtype constants
    tma_tiles         the tile walk of mlp's persistent TMA kernel (a byte-identical copy of nanogpt/tma_tiles.py)

Each public function takes CPU or CUDA tensors. `use_triton(t)` picks the fused path: a CUDA
tensor, triton importable, and MODDED_NO_TRITON unset (MODDED_NO_TRITON=1 forces the
references, for debugging and for A/B runs). Everywhere else the `*_reference` function runs,
so the trainer's CPU tests exercise the same math. The Triton matmuls are written for 16-bit
inputs (bf16/fp16); float32 inputs take the reference (cuBLAS) path on GPU too, since tl.dot
would silently round them to tf32.

The fused ops are torch.library custom ops (`torch.ops.modded_nanogpt.*`) with fake (shape)
functions and registered autograd, so torch.compile(fullgraph=True) traces them as single opaque
nodes. Nothing here touches CUDA at import; triton is imported under a guard (common.py), and the
kernels exist only where it imports.

The switches use_triton and FAST_SIGMOID live in common, where the ops read them at call time; on
this package they read and set those (`kernels.FAST_SIGMOID = False` reaches every kernel).
"""

import sys
import types

from modded_nanogpt.kernels import common
from modded_nanogpt.kernels.common import FAST_SIGMOID, has_fp8_tensor_cores, triton, use_triton
from modded_nanogpt.kernels.cross_entropy import (
    fp8_softcapped_cross_entropy,
    softcap,
    softcapped_cross_entropy,
    softcapped_cross_entropy_reference,
    softcapped_token_losses,
    softcapped_token_losses_reference,
)
from modded_nanogpt.kernels.embedding_rows import (
    gather_rows,
    gather_rows_reference,
    scatter_add_rows,
    scatter_add_rows_reference,
    sort_index,
)
from modded_nanogpt.kernels.fp8 import fp8_linear, fp8_linear_reference
from modded_nanogpt.kernels.mlp import relu2_linear, relu2_linear_reference, relu2_mlp, relu2_mlp_reference
from modded_nanogpt.kernels.qkv import (
    attention_inputs,
    attention_inputs_reference,
    attention_inputs_supported,
)
from modded_nanogpt.kernels.symmetric_matmul import ba_plus_caa, ba_plus_caa_reference, xxt, xxt_reference

__all__ = [
    "FAST_SIGMOID", "attention_inputs", "attention_inputs_reference", "attention_inputs_supported", "ba_plus_caa",
    "ba_plus_caa_reference", "fp8_linear", "fp8_linear_reference", "fp8_softcapped_cross_entropy", "gather_rows",
    "gather_rows_reference", "has_fp8_tensor_cores", "relu2_linear", "relu2_linear_reference", "relu2_mlp",
    "relu2_mlp_reference", "scatter_add_rows", "scatter_add_rows_reference", "softcap",
    "softcapped_cross_entropy", "softcapped_cross_entropy_reference", "softcapped_token_losses",
    "softcapped_token_losses_reference", "sort_index", "triton", "use_triton", "xxt",
    "xxt_reference",
]


def _common_switch(name):
    """A property of the package that reads and sets common's `name`."""
    return property(lambda _package: getattr(common, name),
                    lambda _package, value: setattr(common, name, value))


class _Package(types.ModuleType):
    """This package's module type: its FAST_SIGMOID and use_triton are views of common's (the names imported
    above only serve readers and linters; these properties take precedence over them)."""

    FAST_SIGMOID = _common_switch("FAST_SIGMOID")
    use_triton = _common_switch("use_triton")


sys.modules[__name__].__class__ = _Package
