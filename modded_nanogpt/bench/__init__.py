"""Measurements of the speedrun trainer, apart from its tests: each runs as `python -m modded_nanogpt.bench.NAME`
from the repo root and prints what it measured (`--help`: its options).

    profile        time and profile one step shape of the trainer (synthetic or real batches)
    mlp            the ReLU^2 MLP kernels against cuBLAS at a stage-3 micro-step (--sweep: tilings)
    flex           FlexAttention kernel_options at the stage-3 block masks
    adam           the fused Adam step against the same update as separate tensor operations
    rows           the embedding-row gather and scatter-add against index_select / index_add_
    compile_times  which Triton kernels of one run compiled slowest (reads a Triton cache)
    sm90_check     compile the Triton kernels for sm_90 (or sm_80) without a GPU: registers, spills, load widths
    gpu_session.sh a scaled training run on a GPU machine, then the GPU tests (bash modded_nanogpt/bench/gpu_session.sh)
"""


def require_cuda(prog: str) -> None:
    """Stop with one line naming the tool before any work when no CUDA device is visible."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"{prog}: needs a CUDA GPU; none is visible here")
