"""Probe documents scored during training (--probe_docs with --probe_every or --probe_steps) and from kept checkpoints
(python -m nanogpt.score_checkpoints): every document's next-token losses, into the run's probes/ (probe_store.py).

A document longer than the context is scored as validation reads the val split: in consecutive windows of block_size
tokens, each window's first token seeing no earlier one.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from nanogpt.probe_store import Docs


@torch.no_grad()
def score_documents(model, docs: Docs, block_size: int, autocast=None, device="cpu") -> np.ndarray:
    """Every document's next-token losses (float32), one document after another, in eval mode."""
    autocast = autocast or contextlib.nullcontext()
    was_training = model.training
    model.eval()
    scores = []
    try:
        for i in range(len(docs)):
            tokens = torch.from_numpy(docs.document(i)).to(device)
            for start in range(0, len(tokens) - 1, block_size):
                x = tokens[start:start + block_size]
                y = tokens[start + 1:start + 1 + block_size]
                x = x[:len(y)]
                with autocast:
                    logits, _ = model(x[None], y[None])
                scores.append(F.cross_entropy(logits[0].float(), y, reduction="none").cpu())
    finally:
        model.train(was_training)
    return torch.cat(scores).numpy().astype(np.float32)
