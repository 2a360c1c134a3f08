"""Score the probe documents with every kept checkpoint of a speedrun run that is not scored yet.

  python -m modded_nanogpt.score_checkpoints RUN_DIR --docs docs.npz     # the first time
  python -m modded_nanogpt.score_checkpoints RUN_DIR                     # again: the run's probes/docs.npz, new ones only

Kept checkpoints: ckpt/step_N.pt (--save_checkpoints=every:N), else ckpt/weights/step_N.pt
(--save_checkpoints_as=weights_bf16). The scores go to RUN_DIR/probes/ exactly as the in-run path
(--probe_docs, --probe_every) writes them, with the attention windows a validation of that step uses and the
same packing and scoring (modded_nanogpt.probes): the same model state gives the same numbers (bit for bit on
CPU; on CUDA the probe forward is compiled where the run compiled, as the trainer does). Each step is written
when done, so a killed scoring job run again goes on where it stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from modded_nanogpt.model import GPT, select_attention_backend
from modded_nanogpt.probes import forward_tokens, pack_documents, packed_losses, score_documents
from modded_nanogpt.train_gpt import (
    ConfigError,
    Hyperparameters,
    model_config,
    schedule_of,
    validation_windows,
)
from nanogpt.config import exit_status
from nanogpt.probe_store import (
    Docs,
    ProbeError,
    check_document_starts,
    check_vocabulary,
    checkpoint_tokens,
    score_checkpoints_main,
)
from nanogpt.sample import sampling_device


def read_checkpoint(path: Path, mmap: bool = False) -> tuple[dict, Hyperparameters]:
    payload = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    if not isinstance(payload, dict) or "batch_schedule" not in payload.get("config", {}):
        raise ProbeError(f"{path}: not a checkpoint of the speedrun trainer (a baseline's: python -m "
                         "nanogpt.score_checkpoints)")
    known = Hyperparameters.__dataclass_fields__
    return payload, Hyperparameters(**{k: v for k, v in payload["config"].items() if k in known})


def check_docs(docs: Docs, where: str, kept: dict[int, Path]) -> None:
    """Before anything is written: the documents fit the run's vocabulary and start with its BOS token."""
    _, hp = read_checkpoint(next(iter(kept.values())), mmap=True)  # the config only; no tensor is read
    check_vocabulary(docs, hp.vocab_size, where)
    check_document_starts(docs, hp.bos_id, where)


class CheckpointScorer:
    """Scores checkpoints one after another with one model (each checkpoint's weights loaded into it) and one
    packing of the documents, so that on CUDA the compiled probe forward compiles once per window and tying
    state, as in the run, not once per checkpoint."""

    def __init__(self):
        self.model = self.packed = self.key = None
        self.forward = packed_losses

    def __call__(self, path: Path, docs: Docs, device: torch.device) -> tuple[np.ndarray, int]:
        payload, hp = read_checkpoint(path)
        check_vocabulary(docs, hp.vocab_size, str(path))
        check_document_starts(docs, hp.bos_id, str(path))
        backend = select_attention_backend(hp.attention_backend, device)  # as the trainer chose it
        compiled = hp.compile and device.type == "cuda"
        key = (model_config(hp), backend, compiled, hp.val_batch_tokens, docs.sha256)
        if key != self.key:
            self.model = GPT(model_config(hp)).to(device)
            self.model.attention_backend = backend
            if compiled:
                torch._dynamo.config.cache_size_limit = 64  # as the trainer: a graph per window pair (FA3/FA4)
                self.forward = torch.compile(packed_losses, fullgraph=True, dynamic=False)
            self.packed = pack_documents(self.model, docs, forward_tokens(backend, compiled, hp.val_batch_tokens),
                                         device)
            self.key = key
        # Weights-only bf16 tensors are copied into the float32 parameters; the tying and YaRN state come along.
        self.model.load_state_dict(payload["model"])
        step = payload["step"]
        windows = validation_windows(self.model, schedule_of(hp), step)
        return score_documents(self.model, self.packed, *windows, self.forward), checkpoint_tokens(payload)


def main(argv=None) -> list[int]:
    return score_checkpoints_main(argv, __doc__, "python -m modded_nanogpt.score_checkpoints", CheckpointScorer(),
                                  lambda name: torch.device(sampling_device(name)), check=check_docs)


def cli() -> int:
    return exit_status(main, {ProbeError: 2, ConfigError: 2})


if __name__ == "__main__":
    sys.exit(cli())
