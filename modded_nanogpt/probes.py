"""Probe documents scored during training (--probe_docs with --probe_every or --probe_steps) and from kept checkpoints
(python -m modded_nanogpt.score_checkpoints): every document's next-token losses, into the run's probes/
(nanogpt/probe_store.py, the one format both trainers write).

The model scores as it validates (train_gpt.validate): eval mode, model.states() then the head in the compute
dtype without fp8 (GPT.eval_loss), the softcap, next-token only, with the validation's attention windows of that
step; a document longer than a validation forward (val_batch_tokens) is scored in consecutive forwards of that
many tokens, each forward's first token seeing no earlier one.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from modded_nanogpt import kernels
from modded_nanogpt.model import BLOCK, EVAL_HEAD_ROWS
from nanogpt.probe_store import Docs


def token_losses(model, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token losses of the states x (float32, one per row), as GPT.eval_loss sums them."""
    head = model.lm_head_t.to(x.dtype)
    losses = []
    for start in range(0, x.size(0), EVAL_HEAD_ROWS):
        logits = x[start:start + EVAL_HEAD_ROWS] @ head
        logits = kernels.softcap(logits) if model.config.softcap else logits.float()
        losses.append(F.cross_entropy(logits, targets[start:start + EVAL_HEAD_ROWS].long(), reduction="none"))
    return torch.cat(losses)


@torch.no_grad()
def score_documents(model, docs: Docs, short_window: int, long_window: int, forward_tokens: int,
                    device) -> np.ndarray:
    """Every document's next-token losses (float32), one document after another; windows in blocks of 128."""
    was_training = model.training
    model.eval()
    scores = []
    try:
        for i in range(len(docs)):
            tokens = torch.from_numpy(docs.document(i)).to(device=device, dtype=torch.int32)
            inputs, targets = tokens[:-1], tokens[1:]
            for start in range(0, len(inputs), forward_tokens):
                piece = inputs[start:start + forward_tokens]
                n = piece.numel()
                if model.attention_backend == "flex" and n % BLOCK:
                    # FlexAttention takes whole blocks: BOS tokens after the piece (each its own document,
                    # seen by no earlier position) fill the last one, and their states are dropped.
                    piece = F.pad(piece, (0, BLOCK - n % BLOCK), value=model.config.bos_id)
                cu_seqlens = torch.tensor([0, piece.numel()], dtype=torch.int32, device=device)
                x = model.states(piece, short_window, long_window, cu_seqlens)[:n]
                scores.append(token_losses(model, x, targets[start:start + forward_tokens]).cpu())
    finally:
        model.train(was_training)
    return torch.cat(scores).numpy().astype(np.float32)
