"""Probe documents scored during training (--probe_docs with --probe_every or --probe_steps) and from kept checkpoints
(python -m modded_nanogpt.score_checkpoints): every document's next-token losses, into the run's probes/
(nanogpt/probe_store.py, the one format both trainers write).

The model scores as it validates (train_gpt.validate): eval mode, model.states() then the head in the compute dtype
without fp8 (as GPT.eval_loss), the softcapped loss from the same fused kernel on GPU, next-token only, with the
validation's attention windows of that step. The documents are packed, as the training loader packs them: whole
documents one after another in forwards of one fixed length (forward_tokens), told apart by their leading BOS token
(attention stays within a document; RoPE is relative; smear, key offset and bigrams restart at a BOS), so a packed
forward scores each document as a forward of its own would, up to float rounding, in a few large forwards instead
of hundreds of small ones. The packing is made once per run (pack_documents) and stays on the device; a probe step
is then a few forwards of one shape (compiled once, in the trainer's warmup) and one copy of the scores to the
host.

A document whose inputs (all its tokens but the last) do not fit in what is left of a forward starts the next one;
one longer than a forward is cut into consecutive pieces of forward_tokens, each starting a forward, so a piece's
first token sees no earlier one (as a validation forward's first tokens). The rest of a forward is BOS tokens, each
a document of its own for FlexAttention and SDPA (one segment for FA3/FA4, which read the boundaries as
cu_seqlens); their scores are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from modded_nanogpt import kernels
from modded_nanogpt.model import BLOCK, EVAL_HEAD_ROWS, FLASH_BACKENDS
from nanogpt.probe_store import Docs, check_document_starts

# Tokens per packed forward (at most; never more than a validation forward, val_batch_tokens). FA3/FA4 and compiled
# FlexAttention cost about the same per token at any length: 256 documents of ~700 tokens fill 6 forwards of
# 32,768 (196,608 tokens, 10% padding), where one forward of the published 262,144 would pad 46%. SDPA (and
# FlexAttention run eagerly) build the dense (tokens, tokens) scores, which grow with the square: 2,048 there.
PACKED_FORWARD_TOKENS = 32_768
DENSE_FORWARD_TOKENS = 2_048


def forward_tokens(backend: str, compiled: bool, val_batch_tokens: int) -> int:
    """The length of every packed forward: a multiple of BLOCK (FlexAttention's block)."""
    sparse = backend in FLASH_BACKENDS or (backend == "flex" and compiled)
    tokens = min(val_batch_tokens, PACKED_FORWARD_TOKENS if sparse else DENSE_FORWARD_TOKENS)
    return -(-tokens // BLOCK) * BLOCK


def placements(lengths: np.ndarray, forward_tokens: int) -> list[tuple[int, int, int, int, int]]:
    """Where the documents' inputs go, in order: (forward, offset in it, document, first input, inputs). A
    document's inputs are its tokens but the last (lengths[i] - 1 of them); a piece that does not fit in what is
    left of a forward starts the next one, so the pieces after a document's first (each forward_tokens long but
    the last) start forwards of their own."""
    out, forward, used = [], 0, 0
    for doc, length in enumerate(lengths):
        inputs = int(length) - 1
        for start in range(0, inputs, forward_tokens):
            n = min(forward_tokens, inputs - start)
            if used + n > forward_tokens:
                forward, used = forward + 1, 0
            out.append((forward, used, doc, start, n))
            used += n
    return out


@dataclass
class PackedDocs:
    """The probe documents packed into forwards of forward_tokens, on the device for every probe step."""
    inputs: list[torch.Tensor]  # per forward (forward_tokens,) int32
    targets: list[torch.Tensor]  # per forward (forward_tokens,) int64
    cu_seqlens: list[torch.Tensor | None]  # per forward, FA3/FA4's boundaries (all of one length), else None
    keep: torch.Tensor  # (num_scores,) int64: where the documents' scores lie in the forwards' losses, in order
    forward_tokens: int

    def __len__(self) -> int:
        return len(self.inputs)


def pack_documents(model, docs: Docs, forward_tokens: int, device) -> PackedDocs:
    """Pack `docs` for `model` (its BOS token and attention backend) into forwards of forward_tokens tokens."""
    from modded_nanogpt.train_gpt import flash_boundaries  # train_gpt imports this module

    if forward_tokens % BLOCK:
        raise ValueError(f"forward_tokens {forward_tokens} is not a multiple of {BLOCK}")
    bos_id = model.config.bos_id
    check_document_starts(docs, bos_id, "probe documents")
    places = placements(docs.lengths, forward_tokens)
    count = places[-1][0] + 1
    inputs = np.full((count, forward_tokens), bos_id, dtype=np.int32)
    targets = np.full((count, forward_tokens), bos_id, dtype=np.int64)
    real = np.zeros((count, forward_tokens), dtype=bool)
    ends = np.zeros(count, dtype=np.int64)  # where each forward's padding begins
    for forward, offset, doc, start, n in places:
        tokens = docs.document(doc)
        inputs[forward, offset:offset + n] = tokens[start:start + n]
        targets[forward, offset:offset + n] = tokens[start + 1:start + n + 1]
        real[forward, offset:offset + n] = True
        ends[forward] = offset + n
    boundaries = [None] * count
    if model.attention_backend in FLASH_BACKENDS:
        # As the loader marks them: 0 and every later BOS, here only up to the padding, which is one segment.
        raw = [np.unique(np.concatenate([[0], np.flatnonzero(row[:end] == bos_id), [end, forward_tokens]]))
               for row, end in zip(inputs, ends, strict=True)]
        longest = max(len(r) for r in raw)  # all forwards padded to one length: one compiled graph
        boundaries = [flash_boundaries(model, torch.from_numpy(np.pad(r, (0, longest - len(r)),
                                                                      constant_values=forward_tokens)).int(),
                                       forward_tokens).to(device) for r in raw]
    return PackedDocs([torch.from_numpy(row).to(device) for row in inputs],
                      [torch.from_numpy(row).to(device) for row in targets], boundaries,
                      torch.from_numpy(np.flatnonzero(real.reshape(-1))).to(device), forward_tokens)


def token_losses(model, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token losses of the states x (float32, one per row), as GPT.eval_loss sums them."""
    head = model.lm_head_t.to(x.dtype)
    losses = []
    for start in range(0, x.size(0), EVAL_HEAD_ROWS):
        logits = x[start:start + EVAL_HEAD_ROWS] @ head
        chunk_targets = targets[start:start + EVAL_HEAD_ROWS]
        if model.config.softcap:  # the fused kernel validation's loss comes from, on GPU
            losses.append(kernels.softcapped_token_losses(logits, chunk_targets))
        else:
            losses.append(F.cross_entropy(logits.float(), chunk_targets.long(), reduction="none"))
    return torch.cat(losses)


def packed_losses(model, inputs, targets, short_window, long_window, cu_seqlens=None) -> torch.Tensor:
    """The next-token loss at every position of one packed forward: what the trainer compiles (fullgraph, static
    shapes: every forward of a packing has the same), windows as train_gpt.window_inputs gives them."""
    return token_losses(model, model.states(inputs, short_window, long_window, cu_seqlens), targets)


@torch.no_grad()
def forward_losses(model, packed: PackedDocs, short_window: int, long_window: int, forward=packed_losses,
                   max_forwards: int | None = None) -> list[torch.Tensor]:
    """Each forward's losses (left on the device), in eval mode; windows in blocks of 128."""
    from modded_nanogpt.train_gpt import window_inputs  # train_gpt imports this module

    was_training = model.training
    model.eval()
    try:
        short, long = window_inputs(model, short_window, long_window, packed.keep.device)
        batches = list(zip(packed.inputs, packed.targets, packed.cu_seqlens, strict=True))[:max_forwards]
        return [forward(model, inputs, targets, short, long, cu_seqlens) for inputs, targets, cu_seqlens in batches]
    finally:
        model.train(was_training)


def score_documents(model, packed: PackedDocs, short_window: int, long_window: int,
                    forward=packed_losses) -> np.ndarray:
    """Every document's next-token losses (float32), one document after another: the forwards are queued
    without a wait, and the scores come to the host in one copy."""
    losses = forward_losses(model, packed, short_window, long_window, forward)
    return torch.cat(losses)[packed.keep].cpu().numpy()
