"""Submission manifests of `python -m slurm.submit`: where they are, and what their jobs and runs are doing.

A submission is recorded in $RUNS_DIR/submissions/<id>/manifest.json: the command line, the code snapshot,
and per job its id, submitit parameters and tasks (label, job id, knobs, run directory, log). The launcher's
status, logs and cancel commands read it through this module, and so can reports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from nanogpt.rundir import last_record

TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}


class ManifestError(Exception):
    """No such submission; the message says where it looked."""


def write_json(path: Path, obj) -> None:
    """Write atomically (temp file + rename): a reader never sees half a manifest."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def find_manifest(runs_dir: Path, which: str | None) -> Path:
    if which and which.endswith(".json") and Path(which).is_file():
        return Path(which)
    root = runs_dir / "submissions"
    if which:
        path = root / which / "manifest.json"
        if not path.is_file():
            raise ManifestError(f"no submission {which!r} in {root}")
        return path
    manifests = sorted(root.glob("*/manifest.json"))
    if not manifests:
        raise ManifestError(f"no submissions recorded in {root}")
    return manifests[-1]


def scheduler_states(job_ids: list[str]) -> dict[str, str]:
    """Task job id ('12', '13_0') -> state: squeue for live jobs, sacct for finished ones."""
    parents = sorted({job_id.split("_")[0] for job_id in job_ids})
    states: dict[str, str] = {}
    if not parents:
        return states
    if shutil.which("sacct"):
        proc = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(parents)],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            for line in proc.stdout.splitlines():
                job_id, _, state = line.partition("|")
                states[job_id.strip()] = state.split()[0] if state.split() else "UNKNOWN"
    if shutil.which("squeue"):
        proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(parents)],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            for line in proc.stdout.splitlines():
                job_id, _, state = line.partition("|")
                states[job_id.strip()] = state.strip()
    return states


def progress(task: dict) -> str:
    if not task.get("run_dir"):
        return task.get("out_dir") or ""
    last = last_record(task["run_dir"])
    if not last:
        return "no metrics yet"
    kind, step = last.get("kind"), last.get("step")
    if kind == "end":
        loss = last.get("final_val_loss")
        return f"done at step {step}" + (f", final val loss {loss:.4f}" if isinstance(loss, float) else "")
    if kind == "stop":
        return f"stopped at step {step} ({last.get('reason')})"
    if kind == "val":
        return f"step {step}, val loss {last.get('val_loss'):.4f}" if isinstance(last.get("val_loss"), float) else f"step {step}"
    return f"step {step}, loss {last.get('loss'):.4f}" if isinstance(last.get("loss"), float) else f"step {step}"


def log_tail(path: str, lines: int) -> list[str]:
    try:
        return Path(path).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return [f"(no log yet at {path})"]


def failure_lines(path: str) -> list[str]:
    """What a failed job's log says about the failure: its `error:` lines (scripts and trainers print their
    refusals so), then its last lines (submitit's traceback ends there)."""
    tail = log_tail(path, 100000)
    errors = [line for line in tail if line.lstrip().lower().startswith("error:")][-5:]
    last = [line for line in tail[-3:] if line not in errors]
    return errors + (["..."] if errors and last else []) + last
