"""Token shards and the speedrun's BOS-aligned, document-packed, distributed batch loader.

Shard format (DESIGN contract 2, read and checked by nanogpt.data.shards for both trainers): a header of
256 little-endian int32 -- [0] = 20240520 (magic), [1] = 1 (version), [2] = token count -- then the tokens
as little-endian uint16. One document is a BOS/end-of-text token followed by its tokens. FineWeb shards are
`fineweb_{split}_NNNNNN.bin`; the local corpus writes `{split}_NNNNNN.bin`.

Packing rule (what `DistributedBOSLoader` yields):

* The stream is every shard in order, wrapping to the first after the last (one epoch per pass).
  Tokens of a shard before its first BOS belong to no document and are skipped.
* Every document is clipped to its first `max_seq_len` tokens; the clipped documents, concatenated,
  form the *packed stream*.
* A *rank batch* starts at a document's BOS and takes the next `tokens_per_rank + 1` tokens of the
  packed stream: inputs = the first `tokens_per_rank`, targets = the last `tokens_per_rank` (the
  stream shifted by one, so every position has a real next token and nothing is padding). The last
  document of a batch may be cut at the batch end; its remainder is dropped, not carried over, and
  the next rank batch starts at the following document's BOS. (At the end of a clipped or whole
  document the target is the next document's BOS: "the document ends here".)
* Rank batches are numbered 0, 1, 2, ... along the stream; global step s gives batch
  s * world_size + r to rank r. So every rank's slice starts at a BOS, the ranks' inputs are
  disjoint, and together they are exactly what a single-rank loader yields in `world_size` steps.
* `cu_seqlens` (int32) are the document boundaries within the inputs: 0, each later BOS position,
  `tokens_per_rank`; every segment is at most `max_seq_len` long and starts with BOS.

The next shard is read (and clipped) in one background thread while the current one is used;
on CUDA it lands in pinned memory so the host-to-device copies can be asynchronous.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from nanogpt.data.shards import HEADER_BYTES, ShardError, read_shard_header


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Read one shard's tokens into memory (uint16) after checking its header and size."""
    num_tokens = read_shard_header(path)
    tokens = np.fromfile(path, dtype="<u2", count=num_tokens, offset=HEADER_BYTES)
    # Native byte order so torch.from_numpy accepts it (a no-op on little-endian hosts).
    return tokens.astype(np.uint16, copy=False)


@dataclass
class _PackedShard:
    """One shard as packed-stream tokens plus where its documents start (in both coordinates)."""

    file_index: int  # absolute: epoch * num_files + index into files
    tokens: torch.Tensor  # uint16, clipped documents concatenated; pinned on CUDA
    doc_starts: np.ndarray  # int64 offsets of each document's BOS within `tokens`
    source_offsets: np.ndarray  # int64 offsets of the same BOS tokens within the shard file
    source_tokens: int  # tokens in the shard file (the packed stream drops what clipping cut)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


def _pack_shard(path: Path, file_index: int, bos_id: int, max_seq_len: int, pin: bool) -> _PackedShard:
    tokens = read_shard(path)
    source_offsets = np.flatnonzero(tokens == bos_id).astype(np.int64)
    doc_ends = np.append(source_offsets[1:], tokens.size)
    lengths = doc_ends - source_offsets
    clipped = np.minimum(lengths, max_seq_len)
    too_long = np.flatnonzero(lengths > max_seq_len)
    if source_offsets.size == 0:
        packed = tokens[:0]
    elif too_long.size == 0 and source_offsets[0] == 0:
        packed = tokens  # already a clean packed stream: no copy
    else:
        # Copy only runs of untouched documents, cutting at each over-long one (usually few).
        pieces, run_start = [], int(source_offsets[0])
        for doc in too_long:
            pieces.append(tokens[run_start : source_offsets[doc] + max_seq_len])
            run_start = int(doc_ends[doc])
        pieces.append(tokens[run_start:])
        packed = np.concatenate(pieces)
    doc_starts = np.concatenate(([0], np.cumsum(clipped)[:-1])).astype(np.int64) if clipped.size else clipped
    packed_tensor = torch.from_numpy(np.ascontiguousarray(packed))
    if pin:
        packed_tensor = packed_tensor.pin_memory()
    return _PackedShard(file_index, packed_tensor, doc_starts, source_offsets, int(tokens.size))


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device` without making the host wait for the GPU: on CUDA through pinned memory (a copy from
    pageable memory synchronizes with the device first); elsewhere t itself."""
    if device.type != "cuda":
        return t.to(device)
    if not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class PackedBatch(NamedTuple):
    inputs: torch.Tensor  # (tokens_per_rank,) int32
    targets: torch.Tensor  # (tokens_per_rank,) int64
    cu_seqlens: torch.Tensor  # (num_docs + 1,) int32: 0, document starts, tokens_per_rank


class DistributedBOSLoader:
    """Endless BOS-aligned packed batches for one rank; see the module docstring for the rule.

    Iterating yields (inputs, targets); `next_batch()` also gives `cu_seqlens`, and the last
    batch's boundaries stay readable as `loader.cu_seqlens`.
    """

    def __init__(
        self,
        files,
        tokens_per_rank: int,
        max_seq_len: int,
        bos_id: int,
        rank: int = 0,
        world_size: int = 1,
        device="cpu",
    ):
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ShardError("DistributedBOSLoader: no shard files given")
        if tokens_per_rank < 1 or max_seq_len < 1:
            raise ValueError(f"tokens_per_rank ({tokens_per_rank}) and max_seq_len ({max_seq_len}) must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.tokens_per_rank = tokens_per_rank
        self.max_seq_len = max_seq_len
        self.bos_id = bos_id
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.cu_seqlens: torch.Tensor | None = None
        self._pin = self.device.type == "cuda"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch")
        self._prefetch: Future | None = None
        self._reset(file_index=0, source_offset=None)

    def clipped_fraction(self) -> float:
        """Share of the current shard's tokens that clipping to max_seq_len (and text before the first BOS)
        leaves out of the packed stream: documents much longer than max_seq_len are mostly not trained on."""
        shard = self._shard(0)
        return 1.0 - shard.num_tokens / max(shard.source_tokens, 1)

    # --- shard window -------------------------------------------------------------------------

    def _start_prefetch(self, file_index: int) -> None:
        path = self.files[file_index % len(self.files)]
        self._prefetch = self._executor.submit(
            _pack_shard, path, file_index, self.bos_id, self.max_seq_len, self._pin
        )

    def _shard(self, window_index: int) -> _PackedShard:
        """The shard `window_index` places after the current one, loading as needed."""
        while len(self._window) <= window_index:
            shard = self._prefetch.result()
            self._window.append(shard)
            self._start_prefetch(shard.file_index + 1)
        return self._window[window_index]

    def _reset(self, file_index: int, source_offset: int | None) -> None:
        """Position at shard `file_index` (absolute), at the document whose BOS is `source_offset`."""
        if self._prefetch is not None:
            self._prefetch.exception()  # wait out the old load (its result or error is moot now)
        self._window: list[_PackedShard] = []
        self._start_prefetch(file_index)
        self._doc = 0
        if source_offset is not None:
            shard = self._shard(0)
            doc = int(np.searchsorted(shard.source_offsets, source_offset))
            if doc >= shard.source_offsets.size or shard.source_offsets[doc] != source_offset:
                raise ValueError(
                    f"{self.files[file_index % len(self.files)]}: token offset {source_offset} is not a document start"
                )
            self._doc = doc
        self._skip_exhausted_shards()

    def _skip_exhausted_shards(self) -> None:
        """Move the position forward past shards with no documents left (wrapping)."""
        skipped = 0
        while self._doc >= self._shard(0).doc_starts.size:
            self._window.pop(0)
            self._doc = 0
            skipped += 1
            if skipped > len(self.files):
                raise ShardError(f"no document starting with BOS id {self.bos_id} in any of {len(self.files)} shards")

    # --- batches ------------------------------------------------------------------------------

    def _take_rank_batch(self, gather: bool) -> PackedBatch | None:
        """Plan (and, if `gather`, build) the rank batch at the current position; advance past it."""
        need = self.tokens_per_rank + 1
        pieces: list[tuple[int, torch.Tensor]] = []  # (position in batch, uint16 slice)
        doc_positions: list[np.ndarray] = []
        window_index, offset, filled = 0, int(self._shard(0).doc_starts[self._doc]), 0
        last_input = None  # (window index, offset) of input position tokens_per_rank - 1
        while filled < need:
            shard = self._shard(window_index)
            take = min(shard.num_tokens - offset, need - filled)
            if take > 0:
                if last_input is None and filled + take >= self.tokens_per_rank:
                    last_input = (window_index, offset + self.tokens_per_rank - 1 - filled)
                if gather:
                    pieces.append((filled, shard.tokens[offset : offset + take]))
                    lo, hi = np.searchsorted(shard.doc_starts, [offset, offset + take])
                    doc_positions.append(shard.doc_starts[lo:hi] - offset + filled)
                filled += take
            if filled < need:  # the batch runs on into the next shard (which starts at a BOS)
                window_index, offset = window_index + 1, 0
        # The next batch starts at the document after the one holding the last input token.
        end_window, end_offset = last_input
        end_shard = self._shard(end_window)
        self._window = self._window[end_window:]
        self._doc = int(np.searchsorted(end_shard.doc_starts, end_offset, side="right"))
        self._skip_exhausted_shards()
        if not gather:
            return None
        # The batch is assembled on the host (uint16 -> int32 there) in pinned memory, then copied in one
        # asynchronous transfer. A copy from pageable memory, or one converting dtypes on the way, would wait
        # for the GPU to drain first: an idle gap at every micro-step while the next forward is launched.
        pin = self.device.type == "cuda"
        host = torch.empty(need, dtype=torch.int32, pin_memory=pin)
        for position, piece in pieces:
            host[position : position + piece.numel()].copy_(piece)
        starts = np.concatenate(doc_positions)
        starts = starts[starts < self.tokens_per_rank]
        cu_seqlens = torch.from_numpy(np.append(starts, self.tokens_per_rank).astype(np.int32))
        stream, cu_seqlens = (to_device_async(t, self.device) for t in (host, cu_seqlens))
        return PackedBatch(stream[:-1], stream[1:].to(torch.int64), cu_seqlens)

    def next_batch(self) -> PackedBatch:
        """This rank's batch of the next global step (every rank walks the same stream)."""
        batch = None
        for rank in range(self.world_size):
            taken = self._take_rank_batch(gather=rank == self.rank)
            batch = taken if taken is not None else batch
        self.cu_seqlens = batch.cu_seqlens
        return batch

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.next_batch()
        return batch.inputs, batch.targets

    # --- resumption ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Where the next global step starts; the same on every rank."""
        shard = self._shard(0)
        return {
            "shard_index": shard.file_index % len(self.files),
            "token_offset": int(shard.source_offsets[self._doc]),
            "epoch": shard.file_index // len(self.files),
        }

    def load_state_dict(self, state: dict) -> None:
        shard_index = int(state["shard_index"])
        if not 0 <= shard_index < len(self.files):
            raise ValueError(f"shard_index {shard_index} is outside the {len(self.files)} shards")
        file_index = int(state.get("epoch", 0)) * len(self.files) + shard_index
        self._reset(file_index=file_index, source_offset=int(state["token_offset"]))

    def close(self) -> None:
        """Stop the prefetch thread (waits for a load in flight)."""
        self._executor.shutdown(wait=True)


class SequentialLoader:
    """The first tokens of a split as one contiguous stream, as the speedrun validates: no BOS alignment,
    no clipping. Global forward i gives rank r the stream slice starting at (i * world_size + r) * n
    (n = tokens_per_rank), inputs = n tokens, targets = the same shifted by one. `cu_seqlens` marks
    where documents start inside the slice (its first segment may be the tail of an earlier document).
    `num_tokens` caps how far it reads (the stream must hold num_tokens + 1 tokens); only what is needed
    is read from the shards."""

    def __init__(self, files, tokens_per_rank: int, num_tokens: int, bos_id: int, rank: int = 0,
                 world_size: int = 1, device="cpu"):
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ShardError("SequentialLoader: no shard files given")
        if tokens_per_rank < 1 or num_tokens < tokens_per_rank * world_size:
            raise ValueError(f"num_tokens ({num_tokens}) must hold at least one forward of tokens_per_rank "
                             f"({tokens_per_rank}) x world_size ({world_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        counts = [read_shard_header(f) for f in self.files]
        if sum(counts) < num_tokens + 1:
            raise ShardError(f"{', '.join(str(f) for f in self.files)}: {sum(counts):,} tokens in all, fewer than "
                             f"the {num_tokens + 1:,} asked for (val_tokens + 1)")
        pieces, need = [], num_tokens + 1
        for path, count in zip(self.files, counts, strict=True):
            take = min(count, need - sum(p.size for p in pieces))
            if take <= 0:
                break
            pieces.append(np.fromfile(path, dtype="<u2", count=take, offset=HEADER_BYTES).astype(np.uint16, copy=False))
        self.stream = torch.from_numpy(np.concatenate(pieces).astype(np.int32))
        self.tokens_per_rank, self.num_tokens, self.bos_id = tokens_per_rank, num_tokens, bos_id
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.forwards = num_tokens // (tokens_per_rank * world_size)
        self._next = 0

    def next_batch(self) -> PackedBatch:
        if self._next >= self.forwards:
            raise StopIteration(f"SequentialLoader: all {self.forwards} forwards of the first {self.num_tokens} tokens taken")
        n = self.tokens_per_rank
        start = (self._next * self.world_size + self.rank) * n
        self._next += 1
        piece = self.stream[start : start + n + 1]
        starts = torch.nonzero(piece[1:n] == self.bos_id).flatten().to(torch.int32) + 1
        cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int32), starts, torch.full((1,), n, dtype=torch.int32)])
        piece, cu_seqlens = (to_device_async(t, self.device) for t in (piece, cu_seqlens))
        return PackedBatch(piece[:-1], piece[1:].to(torch.int64), cu_seqlens)

    def close(self) -> None:
        pass
