"""Embedding rows: gather_rows (with the cast to the compute dtype) and scatter_add_rows of their gradients.

The speedrun reads 11 embedding rows per token (token, 5 value, 5 bigram; 425M floats of tables) and the
trainer gathers them outside the compiled graph (model.GPT.gather_rows says why). torch's gather of a
(5, V, D) table and its index_add_ are generic kernels: on an H200 at a stage-3 micro-step (49,152 tokens)
they took 0.88 ms and 1.70 ms for the value table (+ 0.28 ms per 2-D index_add_), ~25 ms per step, against
~0.4 ms of bytes. Here the gather casts on the way (the trainer asks for bf16 value and bigram rows: the
forward casts them to bf16 anyway, and their gradient is that bf16 value cast up, so the math is unchanged),
and the scatter walks the sorted index, summing each run of equal ids in registers before one atomic add:
135 us instead of 1,519 for the value table (modded_nanogpt.bench.rows).
"""

import torch

from modded_nanogpt.kernels import common
from modded_nanogpt.kernels.common import tl, triton


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
    if not (common.use_triton(table) and table.is_contiguous() and index.is_cuda):
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
    if not (common.use_triton(grad) and grad.dtype == torch.float32 and grad.is_contiguous() and index.is_cuda):
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
# Triton kernels (defined only where triton imports)
# ---------------------------------------------------------------------------------------------

if triton is not None:

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
