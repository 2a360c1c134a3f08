"""Batches of (input, target) token windows for training and evaluation.

Both orders hand every optimizer step the same set of windows whatever the number of processes
and the gradient accumulation, so 1 GPU x 8 accumulation steps and 8 GPUs x 1 see the same data
(and, up to float summation order, take the same step):

- "sequential" (llm.c / FineWeb style): the files are cut into consecutive chunks of
  batch_size * block_size tokens (+1 for the shifted target); global chunk c goes to micro-step
  c // world and rank c % world. Position = one counter. Wraps around at the end (next epoch).
- "random" (NanoGPT style): each step draws accumulation * world * batch_size window starts
  uniformly from all files with one generator that every rank seeds alike; each rank takes its
  slice. Position = the generator's state.

The loader's position is saved in checkpoints (`state_dict`) and restored on resume.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nanogpt.data.shards import ShardError, open_tokens


class TokenLoader:
    def __init__(self, files: list[Path], batch_size: int, block_size: int, *, order: str,
                 rank: int = 0, world_size: int = 1, accumulation: int = 1, seed: int = 0,
                 device: str = "cpu"):
        if order not in ("sequential", "random"):
            raise ValueError(f"data order must be 'sequential' or 'random', got {order!r}")
        self.files = [Path(f) for f in files]
        self.tokens = [open_tokens(f) for f in self.files]
        self.batch_size, self.block_size = batch_size, block_size
        self.order, self.rank, self.world_size, self.accumulation = order, rank, world_size, accumulation
        self.device = device
        self.chunk_tokens = batch_size * block_size
        lengths = np.array([len(t) for t in self.tokens], dtype=np.int64)
        self.num_tokens = int(lengths.sum())
        if order == "sequential":
            per_file = np.maximum(lengths - 1, 0) // self.chunk_tokens
            self.num_chunks = int(per_file.sum())
            if self.num_chunks == 0:
                raise ShardError(
                    f"{self.files[0].parent}: {self.num_tokens} tokens in {len(self.files)} file(s) hold no batch of "
                    f"batch_size*block_size+1 = {self.chunk_tokens + 1} tokens; lower batch_size or block_size"
                )
            self._chunk_ends = np.cumsum(per_file)
        else:
            starts = np.maximum(lengths - block_size, 0)  # windows of block_size+1 tokens
            if starts.sum() == 0:
                raise ShardError(
                    f"{self.files[0].parent}: no file holds block_size+1 = {block_size + 1} tokens; lower block_size"
                )
            self._start_ends = np.cumsum(starts)
        self.generator = torch.Generator().manual_seed(seed)
        self.chunk_counter = 0
        self._pending: list[np.ndarray] = []

    # -- positions -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self._pending:
            raise RuntimeError("loader state is only defined at optimizer-step boundaries")
        return {"order": self.order, "chunk_counter": self.chunk_counter,
                "generator": self.generator.get_state(), "chunk_tokens": self.chunk_tokens}

    def load_state_dict(self, state: dict):
        if state["order"] != self.order or state["chunk_tokens"] != self.chunk_tokens:
            raise ValueError(
                f"checkpoint's data position is for order={state['order']} with {state['chunk_tokens']} tokens "
                f"per batch; this run has order={self.order} with {self.chunk_tokens}"
            )
        self.chunk_counter = int(state["chunk_counter"])
        self.generator.set_state(state["generator"])
        self._pending = []

    # -- windows ---------------------------------------------------------------------------
    def _window(self, flat_start: int, ends: np.ndarray, length: int, stride_of_file) -> np.ndarray:
        file_index = int(np.searchsorted(ends, flat_start, side="right"))
        before = int(ends[file_index - 1]) if file_index else 0
        offset = stride_of_file(flat_start - before)
        return np.asarray(self.tokens[file_index][offset:offset + length], dtype=np.int64)

    def _chunk(self, chunk: int) -> np.ndarray:
        """Chunk `chunk` (mod the number of chunks) as (batch_size, block_size + 1) tokens."""
        chunk %= self.num_chunks
        flat = self._window(chunk, self._chunk_ends, self.chunk_tokens + 1, lambda i: i * self.chunk_tokens)
        # Rows overlap by nothing: row j is tokens [j*T, (j+1)*T] of the chunk.
        rows = np.lib.stride_tricks.sliding_window_view(flat, self.block_size + 1)[:: self.block_size]
        return rows[: self.batch_size]

    def _random_rows(self, starts: np.ndarray) -> np.ndarray:
        return np.stack([self._window(int(s), self._start_ends, self.block_size + 1, lambda i: i) for s in starts])

    def _to_device(self, rows: np.ndarray):
        batch = torch.from_numpy(np.ascontiguousarray(rows))
        x, y = batch[:, :-1], batch[:, 1:]
        if self.device.startswith("cuda"):
            return (x.contiguous().pin_memory().to(self.device, non_blocking=True),
                    y.contiguous().pin_memory().to(self.device, non_blocking=True))
        return x.contiguous(), y.contiguous()

    def next_batch(self):
        """The next micro-batch of this rank: (x, y), each (batch_size, block_size) int64."""
        if self.order == "sequential":
            rows = self._chunk(self.chunk_counter + self.rank)
            self.chunk_counter += self.world_size
            return self._to_device(rows)
        if not self._pending:  # draw the whole step at once so every world size sees the same windows
            total = self.accumulation * self.world_size * self.batch_size
            starts = torch.randint(int(self._start_ends[-1]), (total,), generator=self.generator).numpy()
            per_micro = starts.reshape(self.accumulation, self.world_size, self.batch_size)
            self._pending = [per_micro[m, self.rank] for m in range(self.accumulation)][::-1]
        return self._to_device(self._random_rows(self._pending.pop()))

    def eval_batches(self, num_batches: int, seed: int | None = None):
        """This rank's share of a fixed evaluation set of `num_batches` micro-batches.

        Sequential: the first chunks of the split (the same tokens at every evaluation).
        Random: windows drawn with a generator seeded by `seed` (the same windows every time).
        """
        if self.order == "sequential":
            for chunk in range(self.rank, num_batches, self.world_size):
                yield self._to_device(self._chunk(chunk))
            return
        generator = torch.Generator().manual_seed(seed or 0)
        starts = torch.randint(int(self._start_ends[-1]), (num_batches, self.batch_size), generator=generator).numpy()
        for index in range(self.rank, num_batches, self.world_size):
            yield self._to_device(self._random_rows(starts[index]))
