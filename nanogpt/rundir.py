"""The run directory (DESIGN.md, contract 3): config.json, provenance.json, metrics.jsonl, train.log.

Only rank 0 writes (`enabled=False` elsewhere). Reports and the launcher read these files and
nothing else, so their names and fields are a contract.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanogpt import checkpoint as ckpt

REPO_ROOT = Path(__file__).resolve().parent.parent


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_step_line(step, max_steps, loss, lr, dt_ms, tokens_per_s, mfu) -> str:
    """`step 100/1555 | loss 3.4100 | lr 6.00e-04 | dt 312ms | tok/s 1.68M | mfu 41.2%` (grep-able)."""
    mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
    return (f"step {step}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | dt {dt_ms:.0f}ms | "
            f"tok/s {_human(tokens_per_s)} | mfu {mfu_text}")


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance(argv: list[str], device_names: list[str], world_size: int) -> dict:
    """Where and with what a run ran: code version, library versions, hardware, scheduler."""
    info = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": None,
        "command": [sys.executable, "-m", "nanogpt.train", *argv],
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": None,
        "triton": None,
        "world_size": world_size,
        "device_names": device_names,
        "gpus": [],
        "slurm": {k: v for k, v in sorted(os.environ.items()) if k.startswith("SLURM_")},
    }
    status = _git("status", "--porcelain", "--untracked-files=no")
    info["git_dirty"] = None if status is None else bool(status)
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001 - builds without NCCL
            pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


RunDirError = ckpt.RunDirError  # the run directory cannot be written (defined beside the checkpoint writer)


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


class RunDir:
    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.metrics_path = self.path / "metrics.jsonl"
        self.log_path = self.path / "train.log"

    def _aside(self, path: Path):
        """Keep an earlier run's file under a numbered name instead of overwriting it."""
        n = 1
        while path.with_name(f"{path.name}.{n}").exists():
            n += 1
        path.rename(path.with_name(f"{path.name}.{n}"))

    def start(self, config: dict, argv: list[str], resumed_step: int | None, device_names, world_size):
        if not self.enabled:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if resumed_step is None:  # a fresh start: earlier files without a checkpoint are kept aside
            for path in (self.metrics_path, self.log_path):
                if path.exists():
                    self._aside(path)
        prov = provenance(argv, device_names, world_size)
        prov["resumed_from_step"] = resumed_step
        previous = self.path / "provenance.json"
        if previous.exists() and resumed_step is not None:
            try:
                old = json.loads(previous.read_text())
                prov["history"] = old.pop("history", []) + [old]
            except json.JSONDecodeError:
                pass
        _write_json(self.path / "config.json", config)
        _write_json(previous, prov)

    def add_provenance(self, **values):
        """Merge facts known only once the model exists (e.g. its parameter counts) into provenance.json."""
        if not self.enabled:
            return
        path = self.path / "provenance.json"
        try:
            prov = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            prov = {}
        _write_json(path, prov | values)

    def log(self, message: str):
        if not self.enabled:
            return
        print(message, flush=True)
        with open(self.log_path, "a") as f:
            f.write(message + "\n")

    def metric(self, kind: str, **values):
        if not self.enabled:
            return
        record = {"kind": kind, **values, "time": round(time.time(), 3)}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def completed(self, max_iters: int) -> dict | None:
        """The end record of a run that already ended here (at max_iters, or earlier on reaching its target):
        the last end/stop record of metrics.jsonl is an end at the step of the newest checkpoint. None otherwise
        (a run to go on, or one to extend with a larger max_iters)."""
        newest = ckpt.newest(self.path / "ckpt")
        if newest is None:
            return None
        last = None
        try:
            lines = self.metrics_path.read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("kind") in ("end", "stop"):
                last = record
        if not last or last["kind"] != "end" or ckpt.path_for(self.path / "ckpt", last.get("step", -1)) != newest:
            return None
        return last if last["step"] >= max_iters or last.get("reached_target") else None

    def truncate_metrics_after(self, step: int):
        """On resume, drop records past the checkpoint's step (the steps will be run again).

        Dropped lines go to metrics.dropped.jsonl, so nothing written is lost.
        """
        if not self.enabled or not self.metrics_path.exists():
            return
        keep, dropped = [], []
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                dropped.append(line)
                continue
            (keep if record.get("step", 0) <= step else dropped).append(line)
        if dropped:
            with open(self.path / "metrics.dropped.jsonl", "a") as f:
                f.write("\n".join(dropped) + "\n")
        tmp = self.metrics_path.with_name("metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.metrics_path)


def _write_json(path: Path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)
