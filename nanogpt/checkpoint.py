"""The baseline trainer's checkpoints: what goes in them, and everything needed to resume exactly.

Contents: model and optimizer (and GradScaler) states, the loop state (step, tokens, training time, target
bookkeeping), the model shape, the resolved config, and for every rank its data position and random-number-
generator states, so a resumed run continues bitwise on CPU. How they are written, found and loaded (atomic
`ckpt/step_NNNNNNN.pt`, the newest one that loads) is the run directory's contract: nanogpt.rundir.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from nanogpt import rundir

FORMAT_VERSION = 1

def capture_rng(device: str) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: str):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.startswith("cuda") and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save(ckpt_dir: Path, step: int, model, optimizer, scaler, state: dict, model_args: dict, config: dict,
         loader, rt, keep: int, keep_steps=()):
    """Write the checkpoint of `step` (every rank must call this; rank 0 writes); of the older ones, the newest
    `keep` and those of `keep_steps` (kept for studies) stay."""
    state["saved_step"] = step
    rank_state = {"loader": loader.state_dict(), "rng": capture_rng(rt.device)}
    if rt.distributed:
        gathered = [None] * rt.world_size if rt.rank == 0 else None
        torch.distributed.gather_object(rank_state, gathered, dst=0)
    else:
        gathered = [rank_state]
    if rt.rank == 0:
        payload = {
            "format": FORMAT_VERSION,
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "state": dict(state),
            "model_args": model_args,
            "config": config,
            "world_size": rt.world_size,
            "rank_states": gathered,
        }
        rundir.save_checkpoint(ckpt_dir, step, payload)
        rundir.prune_checkpoints(ckpt_dir, step, keep_newest=keep, keep_steps=keep_steps)
    if rt.distributed:
        torch.distributed.barrier()


def load_newest(ckpt_dir: Path, warn=print) -> dict | None:
    """The newest checkpoint of this trainer that loads, or None; unreadable ones are named and skipped."""
    return rundir.load_newest(ckpt_dir, warn, expect={"format": FORMAT_VERSION})


def restore_rank_state(payload: dict, rank: int, world_size: int, loader, device: str, log=print):
    """Restore this rank's data position and RNG streams.

    The data position is the same on every rank (see nanogpt.data.loader), so it carries over to a
    different world size; the per-rank RNG streams (dropout) only when the world size is unchanged.
    """
    states = payload["rank_states"]
    loader.load_state_dict(states[0]["loader"])
    if payload["world_size"] == world_size:
        restore_rng(states[rank]["rng"], device)
    else:
        log(f"note: checkpoint was written by {payload['world_size']} processes, this run has {world_size}; "
            "data position kept, random streams (dropout) reseeded")
        torch.manual_seed(payload["config"]["seed"] + rank + 7919 * payload["step"])
