"""Check an attention backend's kernels on this machine's GPU against SDPA with the explicit mask.

    python -m modded_nanogpt.attention_check --backend=fa4        # what build_flash_attn.sh runs at its end

Packed random documents, causal, sliding windows, plain and paired heads (the speedrun's shapes at a smaller
length): forward and backward in bf16 against SDPA in float32. Prints the relative errors and the time of
the first call (FA4 compiles its kernels then) and exits 1 when an error exceeds 1e-2. Without a CUDA GPU
there is nothing to check: it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from modded_nanogpt.model import attend, attention_mask, select_attention_backend

TOLERANCE = 1e-2


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(backend: str, tokens: int = 4096, heads: int = 6, head_dim: int = 128, seed: int = 0) -> list[str]:
    """One line per case (shift 0: plain heads, 1: paired) with its errors; raises AssertionError on a bad one."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for shift, window in ((0, 384), (1, 1407)):
        starts = torch.zeros(tokens, dtype=torch.bool)
        starts[0] = True
        starts[torch.randint(1, tokens, (8,), generator=g)] = True
        doc = torch.cumsum(starts.int(), 0).cuda()
        cu = torch.cat([torch.nonzero(starts).flatten(), torch.tensor([tokens])]).to("cuda", torch.int32)
        P = tokens << shift
        q, k, v = (torch.randn(P, heads >> shift, head_dim, generator=g).to("cuda", torch.bfloat16).requires_grad_()
                   for _ in range(3))
        grad = torch.randn(P, heads >> shift, head_dim, generator=g).to("cuda", torch.bfloat16)
        mask = attention_mask(doc.repeat_interleave(1 << shift), window, backend)
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = attend(q, k, v, mask, cu, window, shift, 0.1, backend)
        got = (out, *torch.autograd.grad(out, (q, k, v), grad))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        dense = attention_mask(doc.repeat_interleave(1 << shift), window, "sdpa")
        ref_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
        ref = attend(*ref_inputs, dense, None, window, shift, 0.1, "sdpa")
        want = (ref, *torch.autograd.grad(ref, ref_inputs, grad.float()))
        errors = [relative_error(a, b) for a, b in zip(got, want, strict=True)]
        line = (f"{backend} {'paired' if shift else 'plain'} heads, window {window}: relative errors out/dq/dk/dv "
                + " ".join(f"{e:.1e}" for e in errors) + f"; first call {seconds:.1f} s")
        lines.append(line)
        assert all(0 <= e < TOLERANCE for e in errors), line
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="fa4", choices=("fa3", "fa4", "flex"), help="the backend to check")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"attention_check: no CUDA GPU here, so {args.backend}'s kernels were not run (check them on a GPU node)")
        return 0
    try:
        select_attention_backend(args.backend, torch.device("cuda"))
        for line in check(args.backend):
            print(f"attention_check: {line}")
    except (ValueError, AssertionError) as e:
        print(f"attention_check: error: {e}", file=sys.stderr)
        return 1
    print(f"attention_check: {args.backend} agrees with SDPA on {torch.cuda.get_device_name()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
