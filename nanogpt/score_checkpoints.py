"""Score the probe documents with every kept checkpoint of a baseline run that is not scored yet.

  python -m nanogpt.score_checkpoints RUN_DIR --docs docs.npz     # the first time
  python -m nanogpt.score_checkpoints RUN_DIR                     # again: the run's probes/docs.npz, new ones only

Kept checkpoints: ckpt/step_N.pt (--save_checkpoints=every:N), else ckpt/weights/step_N.pt
(--save_checkpoints_as=weights_bf16). The scores go to RUN_DIR/probes/ exactly as the in-run path
(--probe_docs, --probe_every) writes them: the same model state gives the same numbers (bit for bit on CPU).
Each step is written when done, so a killed scoring job run again goes on where it stopped.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from nanogpt.config import ConfigError, exit_status
from nanogpt.model import GPT, GPTConfig
from nanogpt.probe_store import Docs, ProbeError, check_vocabulary, checkpoint_tokens, score_checkpoints_main
from nanogpt.probes import score_documents
from nanogpt.train import Runtime, TrainConfig, apply_run_time_options, mixed_precision, resolve_device


def score_checkpoint(path: Path, docs: Docs, device: str) -> tuple[np.ndarray, int]:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or "model_args" not in payload:
        raise ProbeError(f"{path}: not a checkpoint of the baseline trainer (a speedrun's: python -m "
                         "modded_nanogpt.score_checkpoints)")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in payload["config"].items() if k in known})
    model = GPT(GPTConfig(**payload["model_args"]))
    model.load_state_dict(payload["model"])  # weights-only bf16 tensors are copied into the float32 parameters
    apply_run_time_options(model, cfg).to(device)
    check_vocabulary(docs, model.config.vocab_size, str(path))
    rt = Runtime(device=device, device_type=device.split(":")[0])
    _, autocast, _ = mixed_precision(cfg, rt)
    tokens = checkpoint_tokens(payload)
    return score_documents(model, docs, model.config.block_size, autocast, device), tokens


def main(argv=None) -> list[int]:
    return score_checkpoints_main(argv, __doc__, "python -m nanogpt.score_checkpoints", score_checkpoint,
                                  resolve_device)


def cli() -> int:
    return exit_status(main, {ProbeError: 2, ConfigError: 2})


if __name__ == "__main__":
    sys.exit(cli())
