"""Time the embedding-row gather and scatter-add of one speedrun micro-step on a GPU: torch's index_select +
index_add_ on float32 rows (before) against kernels.gather_rows / scatter_add_rows on bf16 rows (now).

    python -m modded_nanogpt.bench.rows [--tokens=49152] [--data=data/stdlib_bpe50257/train_000001.bin]

The index is a micro-step of real tokens when --data names a token shard (duplicates as training sees them:
the scatter's cost depends on them), else Zipf-distributed ids. Checks both against float64 first, then
prints one line per table and variant: the median time (triton.testing.do_bench) and the bytes it must move.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from modded_nanogpt import kernels
from modded_nanogpt.bench import require_cuda

VOCAB, DIM = 50304, 768


def token_index(tokens: int, data: str | None) -> torch.Tensor:
    if data:
        stream = np.fromfile(data, dtype=np.uint16, offset=256 * 4)[:tokens]
        return torch.from_numpy(stream.astype(np.int64)).cuda()
    ranks = torch.arange(1, VOCAB + 1, dtype=torch.float64)
    return torch.multinomial(1 / ranks, tokens, replacement=True, generator=torch.Generator().manual_seed(0)).cuda()


def bench_table(name: str, table: torch.Tensor, index: torch.Tensor) -> None:
    """Check, then time, the gather and the scatter-add of one table at this index."""
    from triton.testing import do_bench  # imported here: --help works where triton is not installed

    rows_dim = table.ndim - 2
    # Correctness on these inputs: the gather exactly; the scatter against float64.
    got = kernels.gather_rows(table, index, torch.bfloat16)
    assert torch.equal(got, table.index_select(rows_dim, index).bfloat16()), name
    grad_rows = torch.randn(got.shape, device="cuda").bfloat16()
    grad = torch.randn_like(table)
    want = grad.double().index_add_(rows_dim, index, grad_rows.double())
    kernels.scatter_add_rows(grad, index, grad_rows)
    err = ((grad.double() - want).norm() / want.norm()).item()
    assert err < 1e-6, (name, err)
    grad_rows32 = grad_rows.float()
    order = kernels.sort_index(index)
    variants = {
        "gather fp32 (index_select)": (lambda: table.index_select(rows_dim, index), 8),
        "gather -> bf16 (Triton)": (lambda: kernels.gather_rows(table, index, torch.bfloat16), 6),
        "index_add_ fp32 rows": (lambda: grad.index_add_(rows_dim, index, grad_rows32), 12),
        "scatter bf16 rows (Triton, sorted here)": (lambda: kernels.scatter_add_rows(grad, index, grad_rows), 10),
        "scatter bf16 rows (Triton, given order)": (lambda: kernels.scatter_add_rows(grad, index, grad_rows, order), 10),
    }
    for variant, (fn, bytes_per_elt) in variants.items():
        ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
        gbytes = got.numel() * bytes_per_elt / 1e9
        print(f"{name:16s} | {variant:40s} | {ms * 1000:8.1f} us | {gbytes / ms:6.2f} TB/s at {bytes_per_elt} B/row elt",
              flush=True)


def main(argv):
    p = argparse.ArgumentParser(prog="python -m modded_nanogpt.bench.rows", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("--tokens", type=int, default=49152, help="rows of one micro-step (stage 3: 49,152)")
    p.add_argument("--data", default=None, help="a token shard whose first tokens form the index (else Zipf ids)")
    args = p.parse_args(argv)
    if args.tokens <= 0:
        p.error(f"--tokens must be positive, got {args.tokens}")
    if args.data and not Path(args.data).is_file():
        p.error(f"--data: no such file: {args.data}")
    require_cuda("modded_nanogpt.bench.rows")
    from triton.testing import do_bench

    tokens, data = args.tokens, args.data
    idx = token_index(tokens, data)
    print(f"{tokens} rows, {idx.unique().numel()} distinct ids ({'real tokens' if data else 'Zipf'})")
    bench_table("value (5, V, D)", torch.randn(5, VOCAB, DIM, device="cuda"), idx)
    bench_table("token (V, D)", torch.randn(VOCAB, DIM, device="cuda"), idx)
    bench_table("bigram (5V, D)", torch.randn(5 * VOCAB, DIM, device="cuda"), idx * 1000003 % (5 * VOCAB - 1))
    for keys in (idx, idx.int()):
        ms = do_bench(lambda keys=keys: torch.sort(keys), return_mode="median")
        print(f"sort of {tokens} {keys.dtype} ids: {ms * 1000:.1f} us")


if __name__ == "__main__":
    main(sys.argv[1:])
