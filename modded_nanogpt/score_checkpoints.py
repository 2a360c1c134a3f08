"""Score the probe documents with every kept checkpoint of a speedrun run that is not scored yet.

  python -m modded_nanogpt.score_checkpoints RUN_DIR --docs docs.npz     # the first time
  python -m modded_nanogpt.score_checkpoints RUN_DIR                     # again: the run's probes/docs.npz, new ones only

Kept checkpoints: ckpt/step_N.pt (--save_checkpoints=every:N), else ckpt/weights/step_N.pt
(--save_checkpoints_as=weights_bf16). The scores go to RUN_DIR/probes/ exactly as the in-run path
(--probe_docs, --probe_every) writes them, with the attention windows a validation of that step uses: the same
model state gives the same numbers (bit for bit on CPU). Each step is written when done, so a killed scoring job
run again goes on where it stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from modded_nanogpt.model import GPT, select_attention_backend
from modded_nanogpt.probes import score_documents
from modded_nanogpt.train_gpt import (
    ConfigError,
    Hyperparameters,
    model_config,
    schedule_of,
    validation_windows,
)
from nanogpt.config import exit_status
from nanogpt.probe_store import Docs, ProbeError, check_vocabulary, checkpoint_tokens, score_checkpoints_main
from nanogpt.sample import sampling_device


def score_checkpoint(path: Path, docs: Docs, device: torch.device) -> tuple[np.ndarray, int]:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or "batch_schedule" not in payload.get("config", {}):
        raise ProbeError(f"{path}: not a checkpoint of the speedrun trainer (a baseline's: python -m "
                         "nanogpt.score_checkpoints)")
    known = Hyperparameters.__dataclass_fields__
    hp = Hyperparameters(**{k: v for k, v in payload["config"].items() if k in known})
    model = GPT(model_config(hp))
    model.load_state_dict(payload["model"])  # weights-only bf16 tensors are copied into the float32 parameters
    model.attention_backend = select_attention_backend(hp.attention_backend, device)  # as the trainer chose it
    model.to(device)
    check_vocabulary(docs, hp.vocab_size, str(path))
    step = payload["step"]
    windows = validation_windows(model, schedule_of(hp), step)
    tokens = checkpoint_tokens(payload)
    return score_documents(model, docs, *windows, hp.val_batch_tokens, device), tokens


def main(argv=None) -> list[int]:
    return score_checkpoints_main(argv, __doc__, "python -m modded_nanogpt.score_checkpoints", score_checkpoint,
                                  lambda name: torch.device(sampling_device(name)))


def cli() -> int:
    return exit_status(main, {ProbeError: 2, ConfigError: 2})


if __name__ == "__main__":
    sys.exit(cli())
