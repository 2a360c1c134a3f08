"""Checkpoints: atomic writes, newest-complete loading, and everything needed to resume exactly.

A checkpoint is `ckpt/step_NNNNNNN.pt`, written to a temporary name, flushed to disk and renamed,
so a process killed mid-write leaves only a `.tmp` file and the previous checkpoint intact.
Loading tries the newest file first and falls back to older ones if it cannot be read.

Contents: model and optimizer (and GradScaler) states, the loop state (step, tokens, training
time, target bookkeeping), the model shape, the resolved config, and for every rank its data
position and random-number-generator states, so a resumed run continues bitwise on CPU.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d+)\.pt$")


def path_for(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:07d}.pt"


class RunDirError(RuntimeError):
    """The run directory cannot be written (read-only, full disk): one line naming the path and the cause."""


def write_failure(error: BaseException, folder: Path) -> str:
    """What went wrong in a few words: the OS's reason, and the free space where the disk is (nearly) full."""
    reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[-1][:200]
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return reason
    if free < 1 << 30 or "space" in reason.lower() or "unexpected pos" in reason:
        return f"no space left on the device ({free / 2**20:.0f} MiB free there; {reason})"
    return reason


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint files (not temporaries), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def newest(ckpt_dir: Path) -> Path | None:
    files = complete_checkpoints(ckpt_dir)
    return files[-1] if files else None


def atomic_torch_save(obj, path: Path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
        path = path_for(ckpt_dir, step)
        try:
            atomic_torch_save(payload, path)
        except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError of its zip writer
            raise RunDirError(f"cannot write the checkpoint {path}: {write_failure(e, Path(ckpt_dir))}; the "
                              "checkpoints already written stay") from None
        for old in complete_checkpoints(ckpt_dir)[:-keep]:
            if int(_NAME.match(old.name).group(1)) not in keep_steps:
                old.unlink(missing_ok=True)
    if rt.distributed:
        torch.distributed.barrier()


def load_newest(ckpt_dir: Path, map_location="cpu", warn=print) -> dict | None:
    """The newest checkpoint that loads, or None when there is none; unreadable ones are skipped."""
    for path in reversed(complete_checkpoints(ckpt_dir)):
        try:
            payload = torch.load(path, map_location=map_location, weights_only=False)
            if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
                raise ValueError("not a checkpoint of this trainer")
        except Exception as e:  # noqa: BLE001 - a damaged file of any kind: fall back to an older one
            warn(f"warning: skipping unreadable checkpoint {path}: {type(e).__name__}: {e}")
            continue
        payload["path"] = str(path)
        return payload
    return None


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
