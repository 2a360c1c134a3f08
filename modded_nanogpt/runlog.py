"""The speedrun trainer's run directory (DESIGN.md contract 3) and its checkpoints.

  config.json       the resolved Hyperparameters
  provenance.json   git SHA + dirty flag, versions (python, torch, CUDA, NCCL, triton), GPUs, nvidia-smi,
                    hostname, SLURM_* variables, command line, the attention backend, and (speedrun style)
                    the source of the trainer's files, so a log says exactly what ran
  metrics.jsonl     one JSON object per event: kind train | val | stop | end, with step, tokens, train_time_ms
  train.log         the human log: `step:N/T train_time:Xms step_avg:Yms` per step, `val_loss` per validation
  ckpt/step_NNNNNNN.pt  atomic (temp file + fsync + rename); the newest readable one is loaded on resume

This folder is self-contained on purpose (a researcher can copy modded_nanogpt/ alone), so it does not
share code with nanogpt/rundir.py; the file names and record fields are the same contract.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
_CKPT = re.compile(r"^step_(\d+)\.pt$")


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def trainer_sources() -> dict[str, str]:
    """The text of every Python file of the trainer (the speedrun logs its own source)."""
    return {str(p.relative_to(PACKAGE_DIR.parent)): p.read_text()
            for p in sorted(PACKAGE_DIR.rglob("*.py")) if "__pycache__" not in p.parts}


def collect_provenance(argv: list[str], world_size: int, attention_backend: str) -> dict:
    repo = str(PACKAGE_DIR.parent)
    status = _run(["git", "-C", repo, "status", "--porcelain"])
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    if torch.cuda.is_available() and hasattr(torch.cuda, "nccl"):
        try:
            versions["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # NCCL missing from this build
            versions["nccl"] = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_sha": _run(["git", "-C", repo, "rev-parse", "HEAD"]),
        "git_dirty": None if status is None else bool(status),
        "command": [sys.executable, "-m", "modded_nanogpt.train_gpt", *argv],
        "hostname": socket.gethostname(),
        **versions,
        "world_size": world_size,
        "gpus": gpus,
        "nvidia_smi": _run(["nvidia-smi"]),
        "attention_backend": attention_backend,
        "slurm": {k: v for k, v in os.environ.items() if k.startswith("SLURM_")},
        "sources": trainer_sources(),
    }


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


def check_writable(run_dir: Path) -> None:
    """Whether run_dir can be written, before anything is computed, leaving nothing behind: a read-only place
    or a file in the path fails here, in one line, instead of in a traceback after the data and the model are
    loaded (and a run refused later for another reason creates no directory)."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as e:
        raise RunDirError(f"cannot write to the run directory {run_dir}: {e.strerror or e}; give a writable "
                          "--run_dir (or RUNS_DIR)") from None


def _set_aside(path: Path) -> None:
    """Keep an earlier run's file under the first free numbered name (name.1, name.2, ...), never overwriting."""
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    os.replace(path, path.with_name(f"{path.name}.{n}"))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class RunLog:
    """Writes the run directory; on ranks other than 0 (`enabled=False`) it only prints nothing."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.dir = Path(run_dir)
        self.enabled = enabled
        self.ckpt_dir = self.dir / "ckpt"

    def start(self, config: dict, provenance: dict, resumed_step: int | None) -> None:
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if resumed_step is None:
            for name in ("metrics.jsonl", "train.log"):  # a fresh start keeps an old run's files aside
                old = self.dir / name
                if old.exists():
                    _set_aside(old)
        else:
            self.truncate_metrics_after(resumed_step)
        _write_json(self.dir / "config.json", config)
        history = []
        if (self.dir / "provenance.json").exists():
            try:
                previous = json.loads((self.dir / "provenance.json").read_text())
                history = previous.pop("history", []) + [{k: previous.get(k) for k in ("time", "git_sha", "hostname", "command")}]
            except (OSError, ValueError):
                history = []
        _write_json(self.dir / "provenance.json", {**provenance, "resumed_step": resumed_step, "history": history})

    def completed(self, total_steps: int) -> dict | None:
        """The end record of a run that already trained all `total_steps` steps (its checkpoint of that step
        exists and the last end/stop record of metrics.jsonl is an end at that step); None otherwise. Read on
        every rank: a finished run is left as it is, so its summary (warmup, peak memory) stays the real one."""
        if not (self.ckpt_dir / f"step_{total_steps:07d}.pt").is_file():
            return None
        last = None
        try:
            lines = (self.dir / "metrics.jsonl").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("kind") in ("end", "stop"):
                last = record
        return last if last and last["kind"] == "end" and last.get("step") == total_steps else None

    def truncate_metrics_after(self, step: int) -> None:
        """After a resume from `step`, records of later steps (written before the crash; they will be written
        again) and lines cut by a kill go to metrics.dropped.jsonl; every record at or before `step` stays, the
        stop records of earlier interruptions too (the job scripts and the launcher read them). The file is
        rewritten atomically (temp file + rename)."""
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return
        keep, dropped = [], []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                dropped.append(line)  # a line cut by the crash: kept aside, not lost
                continue
            later = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step
            (dropped if later or not isinstance(record, dict) else keep).append(line)
        if dropped:
            with open(self.dir / "metrics.dropped.jsonl", "a") as f:
                f.write("\n".join(dropped) + "\n")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        print(message, flush=True)
        with open(self.dir / "train.log", "a") as f:
            f.write(message + "\n")

    def metric(self, kind: str, **values) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, **values, "time": round(time.time(), 3)}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # --- checkpoints ---------------------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        if not self.ckpt_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.ckpt_dir.iterdir() if (m := _CKPT.match(p.name))]
        return [p for _, p in sorted(found)]

    def save_checkpoint(self, state: dict, step: int) -> Path | None:
        if not self.enabled:
            return None
        path = self.ckpt_dir / f"step_{step:07d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)  # the rename itself survives a crash of the node
        except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError of its zip writer
            tmp.unlink(missing_ok=True)
            raise RunDirError(f"cannot write the checkpoint {path}: {write_failure(e, path.parent)}; the "
                              "checkpoints already written stay") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def remove_checkpoints_before(self, step: int, keep: set[int]) -> None:
        """Delete the checkpoints of steps before `step`, except those in `keep` (kept for studies)."""
        for path in self.checkpoints():
            saved = int(_CKPT.match(path.name).group(1))
            if saved < step and saved not in keep:
                path.unlink(missing_ok=True)

    def load_newest(self, log=print) -> dict | None:
        """The newest checkpoint that loads; unreadable ones are named and skipped."""
        for path in reversed(self.checkpoints()):
            try:
                return torch.load(path, map_location="cpu", weights_only=False)
            except Exception as e:  # a truncated or corrupted file: fall back to the one before
                log(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); trying an older one")
        return None
