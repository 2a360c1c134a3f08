"""The speedrun MLP's squared-ReLU matmuls at one stage-3 micro-step (49,152 x 768 -> 3072) on a GPU:
cuBLAS (+ an elementwise pass) against the Triton kernels, forward and backward.

    python -m modded_nanogpt.bench.mlp [--rows=49152] [--sweep]
"""

import argparse
import sys

import torch

from modded_nanogpt.bench import require_cuda
from modded_nanogpt.kernels import mlp


def main(argv):
    p = argparse.ArgumentParser(prog="python -m modded_nanogpt.bench.mlp", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("--rows", type=int, default=49152, help="tokens of one micro-step (stage 3: 49,152)")
    p.add_argument("--sweep", action="store_true", help="then the TMA kernel's tilings, each without autotuning")
    args = p.parse_args(argv)
    if args.rows <= 0:
        p.error(f"--rows must be positive, got {args.rows}")
    require_cuda("modded_nanogpt.bench.mlp")
    from triton.testing import do_bench

    rows = args.rows
    dim, hidden = 768, 3072
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, dim, device="cuda", generator=g).bfloat16()
    up = (torch.randn(hidden, dim, device="cuda", generator=g) * dim**-0.5).bfloat16()
    down = (torch.randn(hidden, dim, device="cuda", generator=g) * hidden**-0.5).bfloat16()
    grad_y = torch.randn(rows, dim, device="cuda", generator=g).bfloat16()
    flop = 2 * rows * dim * hidden

    def report(name, fn, got=None, want=None):
        ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
        err = "" if got is None else f"  max rel err {((got - want).abs().max() / want.abs().max()).item():.1e}"
        print(f"{name:44s} {ms * 1000:7.1f} us  {flop / ms / 1e9:6.1f} TFLOP/s{err}", flush=True)

    pre = x.float() @ up.float().T
    post_want = torch.relu(pre).square()
    grad_pre_want = 2 * (grad_y.float() @ down.float().T) * torch.relu(pre.bfloat16().float())
    pre = pre.bfloat16()
    relu2 = torch.compile(lambda p: torch.relu(p).square())

    def pointer_kernel():
        post = torch.empty_like(pre)
        mlp._relu2_pointer(x, up, torch.empty_like(pre), post)
        return post

    report("fwd cuBLAS mm alone", lambda: x @ up.T)
    report("fwd cuBLAS mm + compiled relu^2", lambda: relu2(x @ up.T), relu2(x @ up.T).float(), post_want)
    report("fwd Triton pointer kernel", pointer_kernel, pointer_kernel().float(), post_want)
    fused = lambda: torch.ops.modded_nanogpt.relu2_linear(x, up)
    report("fwd Triton TMA kernel (relu2_linear)", fused, fused()[0].float(), post_want)
    apart = lambda: torch.ops.modded_nanogpt.relu2_grad(grad_y @ down.T, pre)
    report("bwd cuBLAS mm + relu2_grad kernel", apart, apart().float(), grad_pre_want)
    fused = lambda: torch.ops.modded_nanogpt.relu2_mlp_grad_pre(grad_y, down, post_want.bfloat16())
    report("bwd fused (relu2_mlp_grad_pre)", fused, fused().float(), grad_pre_want)
    if args.sweep:
        sweep(x, up, down, grad_y, pre, post_want, grad_pre_want, report)


def sweep(x, up, down, grad_y, pre, post_want, grad_pre_want, report):
    """The TMA kernel's tilings, programs per SM, automatic warp specialization, and the post-only variant
    (forward stores no pre; backward takes relu(pre) = sqrt(post)), each run without autotuning."""
    config = mlp._relu2_tma_config
    variants = [  # (name, config)
        ("128x256 w8 s4 sub (default fwd)", config(128, 256, 64, 8, 4, True)),
        ("128x256 w8 s3 sub (default bwd)", config(128, 256, 64, 8, 3, True)),
        ("128x128 w4 s3 sub 2/SM", config(128, 128, 64, 4, 3, True, ctas=2)),
        ("128x128 w4 s2 2/SM", config(128, 128, 64, 4, 2, False, ctas=2)),
        ("128x128 w8 s3 sub 2/SM", config(128, 128, 64, 8, 3, True, ctas=2)),
        ("128x128 w4 s4 sub 1/SM", config(128, 128, 64, 4, 4, True)),
        ("64x256 w4 s3 sub 2/SM", config(64, 256, 64, 4, 3, True, ctas=2)),
        ("128x256 w8 s3 sub WS", config(128, 256, 64, 8, 3, True, warp_specialize=True)),
        ("128x128 w4 s3 sub WS", config(128, 128, 64, 4, 3, True, warp_specialize=True)),
        ("128x256 w4 s3 sub WS", config(128, 256, 64, 4, 3, True, warp_specialize=True)),
    ]
    post_bf16 = post_want.bfloat16()

    def run_variant(name, cfg, post_only):
        p, q, g = torch.empty_like(pre), torch.empty_like(pre), torch.empty_like(pre)
        saved = post_bf16 if post_only else pre
        fwd = lambda: mlp._relu2_tma(x, up, p, p, q, backward=False, post_only=post_only, config=cfg)
        bwd = lambda: mlp._relu2_tma(grad_y, down, saved, g, g, backward=True, post_only=post_only, config=cfg)
        compiled = fwd()
        regs = f" ({getattr(compiled, 'n_regs', '?')} regs, {compiled.metadata.shared // 1024} KiB smem)"
        report(f"fwd {name}{regs}", fwd, q.float(), post_want)
        bwd()
        report(f"bwd {name}", bwd, g.float(), grad_pre_want)

    for name, cfg in variants:
        for post_only in (False, True):
            tag = f"{name}{' post-only' if post_only else ''}"
            try:
                run_variant(tag, cfg, post_only)
            except Exception as e:  # a config that does not compile or fit: say so, go on
                print(f"{tag}: {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
