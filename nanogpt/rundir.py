"""The run directory and its checkpoints (DESIGN.md, contracts 3 and 4), written once for both trainers.

  config.json        the resolved settings
  provenance.json    git SHA + dirty flag, versions (python, torch, CUDA, NCCL, triton), the GPUs, nvidia-smi,
                     hostname, SLURM_* variables, the command line, the attention backend, the text of the
                     trainer's Python files; resumed_from_step, and after a resume a summary of each earlier launch
  metrics.jsonl      one JSON object per event: kind train | val | stop | end, with step, tokens, train_time_ms
  train.log          the human log: one grep-able line per step, in the trainer's own format
  ckpt/step_NNNNNNN.pt  written atomically (temp file, fsync, rename, fsync of the folder); the newest one that
                     loads is where a run resumes

Both trainers (nanogpt.train, modded_nanogpt.train_gpt) write through this module, and the launcher, the job
scripts and the reports read through it (read_metrics, last_record), so the names and fields exist once. Only
rank 0 writes (`RunDir(path, enabled=False)` elsewhere). A fresh start in a directory that holds an earlier
run's files moves them aside, all under the first number free for every one of them (metrics.jsonl.N,
train.log.N, config.json.N, provenance.json.N): no start overwrites what another wrote. A resume moves the
records of steps after its checkpoint (they run again) and lines cut short by a kill to metrics.dropped.jsonl.

Importing this module imports no torch: the tooling reads run directories with the standard library only.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The trainers that write run directories, by module: a run directory is resumed only by the trainer that made it.
TRAINERS = {"nanogpt.train": "the baseline trainer", "modded_nanogpt.train_gpt": "the speedrun trainer"}
RUN_FILES = ("metrics.jsonl", "train.log", "config.json", "provenance.json")
_CHECKPOINT = re.compile(r"^step_(\d+)\.pt$")
# What provenance.json keeps of each earlier launch of a resumed run (the whole record, sources included, would
# grow the file by the trainer's source text at every requeue).
HISTORY_KEYS = ("time", "git_sha", "git_dirty", "hostname", "command", "world_size", "gpus", "resumed_from_step")


# torch.compile's (Inductor's) and Triton's compiled-kernel caches, by variable: unless set, in $RUNS_DIR/.cache
# for a run under $RUNS_DIR, else in .cache beside the run directory, so that runs (a study's seeds, an
# ablation's arms, a job requeued on another node) share them, and only the first run of a configuration
# compiles from scratch.
COMPILE_CACHES = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


def compile_caches(run_dir: Path, caches: dict[str, str] | None = None) -> dict:
    """Point each cache variable (COMPILE_CACHES, or `caches`: variable -> folder name) that is not set already
    at CACHE_ROOT/<name>: $RUNS_DIR/.cache if run_dir is under $RUNS_DIR, else RUN_DIR/../.cache. Read by
    Inductor and Triton when they compile, so call this before the first compile. Returns {variable: path} as
    in force, and `warm`: whether any of them held files already (a warm cache's warmup is not a cold one's)."""
    run_dir = Path(run_dir).resolve()
    runs = Path(os.environ["RUNS_DIR"]).resolve() if os.environ.get("RUNS_DIR") else None
    root = (runs if runs is not None and run_dir.is_relative_to(runs) else run_dir.parent) / ".cache"
    used = {}
    for variable, name in (COMPILE_CACHES if caches is None else caches).items():
        used[variable] = os.environ.setdefault(variable, str(root / name))
    return used | {"warm": any(holds_files(path) for path in used.values())}


def holds_files(folder) -> bool:
    """Whether folder (a path, or None) holds a file at any depth: a cache that is warm. Folders alone do not
    count: FA4 makes its cache's folder tree (one folder per kernel) when it is imported, before any kernel."""
    return folder is not None and Path(folder).is_dir() and any(p.is_file() for p in Path(folder).rglob("*"))


def caches_text(caches: dict) -> str:
    """compile_caches' answer as the trainers log it."""
    paths = ", ".join(f"{k}={v}" for k, v in caches.items() if k != "warm")
    return f"kernel caches ({'warm' if caches['warm'] else 'empty'}): {paths}"


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
    existing = Path(run_dir)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as e:
        raise RunDirError(f"cannot write to the run directory {run_dir}: {e.strerror or e}; give a writable "
                          "--run_dir (or RUNS_DIR)") from None


def check_same_trainer(run_dir: Path, module: str) -> None:
    """A run directory another trainer made (the module of its provenance.json's command) is not this one's to
    resume or overwrite (its checkpoints hold another model and format): say so before anything is written."""
    from nanogpt.config import ConfigError

    try:
        command = json.loads((Path(run_dir) / "provenance.json").read_text())["command"]
        writer = command[command.index("-m") + 1]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return
    if writer != module and writer in TRAINERS:
        raise ConfigError(f"{run_dir} holds a run of {TRAINERS[writer]} ({writer}: see its provenance.json); give "
                          f"this run of {TRAINERS.get(module, module)} its own --run_dir")


class StopSignal:
    """Remembers that SIGUSR1/SIGUSR2/SIGTERM/SIGINT arrived; the loop checkpoints and exits at a step boundary
    with a stop record whose reason names the signal (the job scripts requeue on `signal SIGUSR1/SIGUSR2`).
    Ctrl-C (SIGINT) stops the same way; a second Ctrl-C aborts at once (KeyboardInterrupt, no checkpoint)."""

    SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT")

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received == "SIGINT":
            raise KeyboardInterrupt
        if name == "SIGINT":
            print("Ctrl-C: stopping after this step with a checkpoint (the same command resumes); Ctrl-C again "
                  "aborts without one", file=sys.stderr, flush=True)
        self.received = name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---- provenance -----------------------------------------------------------------------------------------


def _output(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(repo: Path = REPO_ROOT) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the code in `repo`. Dirty: a tracked file differs from the commit, or a file git does
    not ignore is untracked (it is in the working tree the run imports from, and in the launcher's code
    snapshot). A snapshot made by `python -m slurm.submit` has no .git: its .snapshot.json says what it was
    copied from (asking git there would describe the checkout around the submission folder instead)."""
    snapshot = Path(repo) / ".snapshot.json"
    if snapshot.is_file():
        try:
            info = json.loads(snapshot.read_text())
            return info.get("git_sha"), info.get("git_dirty")
        except (OSError, ValueError):
            return None, None
    sha = _output(["git", "-C", str(repo), "rev-parse", "HEAD"])
    status = _output(["git", "-C", str(repo), "status", "--porcelain"]) if sha else None
    return sha, None if status is None else bool(status)


def trainer_sources(package_dir: Path) -> dict[str, str]:
    """The text of every Python file of a trainer package, by path from the repo root: what exactly ran."""
    package_dir = Path(package_dir)
    return {str(p.relative_to(package_dir.parent)): p.read_text()
            for p in sorted(package_dir.rglob("*.py")) if "__pycache__" not in p.parts}


def provenance(module: str, argv: list[str], world_size: int, attention_backend: str) -> dict:
    """Where and with what a run ran: code version, library versions, hardware, scheduler, command line. Both
    trainers write these keys (resumed_from_step, history and parameters are added by RunDir)."""
    import torch

    sha, dirty = git_state()
    nccl = None
    if torch.cuda.is_available():
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001 - a build without NCCL
            pass
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    package = module.split(".")[0]
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_sha": sha,
        "git_dirty": dirty,
        "command": [sys.executable, "-m", module, *argv],
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": nccl,
        "triton": triton_version,
        "world_size": world_size,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "nvidia_smi": _output(["nvidia-smi"]),
        "attention_backend": attention_backend,
        "slurm": {k: v for k, v in sorted(os.environ.items()) if k.startswith("SLURM_")},
        "sources": trainer_sources(REPO_ROOT / package),
    }


# ---- metrics.jsonl, as everything reads it --------------------------------------------------------------


def read_metrics(path: Path, warn=None) -> list[dict]:
    """The records of a metrics.jsonl, in order. A line cut short by a kill, or any line that is not a JSON
    object, is skipped and named to `warn` (when given). An unreadable or missing file raises OSError."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif warn is not None:
            where = "the last line is cut short" if number == len(lines) else f"line {number} is not a JSON object"
            warn(f"{path}: {where}; ignored")
    return records


def last_record(run_dir: Path, kinds: tuple[str, ...] | None = None) -> dict | None:
    """The last record of RUN_DIR/metrics.jsonl (of one of `kinds` if given); None without one."""
    try:
        records = read_metrics(Path(run_dir) / "metrics.jsonl")
    except OSError:
        return None
    matching = [r for r in records if kinds is None or r.get("kind") in kinds]
    return matching[-1] if matching else None


# ---- checkpoints ----------------------------------------------------------------------------------------


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:07d}.pt"


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint files (no temporaries), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def newest_checkpoint(ckpt_dir: Path) -> Path | None:
    files = checkpoints(ckpt_dir)
    return files[-1] if files else None


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable; some file systems refuse fsync on a folder, which is no error here."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Write a file under `path` whole or not at all: `write(f)` fills a temporary file (path + ".tmp"), which is
    flushed to disk and renamed over `path`; on any failure the temporary file is removed and the error raised.
    The rename is durable after fsync_dir(path.parent)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(ckpt_dir: Path, step: int, payload: dict) -> Path:
    """Write `payload` as the checkpoint of `step`: a temporary file, flushed to disk, renamed, the rename
    made durable. A process killed meanwhile leaves at most the temporary file; the checkpoints already
    written stay loadable. A failure (a full disk: torch's zip writer raises RuntimeError) is a RunDirError."""
    import torch

    path = checkpoint_path(ckpt_dir, step)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(payload, f))
    except (OSError, RuntimeError) as e:
        raise RunDirError(f"cannot write the checkpoint {path}: {write_failure(e, path.parent)}; the "
                          "checkpoints already written stay") from None
    fsync_dir(path.parent)
    return path


def prune_checkpoints(ckpt_dir: Path, step: int, keep_newest: int, keep_steps=()) -> None:
    """After the checkpoint of `step` was written: delete those up to it but the newest `keep_newest`, except
    the checkpoints of `keep_steps` (kept for studies). Later ones are left alone: they exist only when they
    failed to load on resume, and the run overwrites them when it gets there (the one just written stays)."""
    files = [p for p in checkpoints(ckpt_dir) if int(_CHECKPOINT.match(p.name).group(1)) <= step]
    for path in files[:max(len(files) - keep_newest, 0)]:
        if int(_CHECKPOINT.match(path.name).group(1)) not in keep_steps:
            path.unlink(missing_ok=True)


def load_newest(ckpt_dir: Path, log=print, expect: dict | None = None) -> dict | None:
    """The newest checkpoint that loads (with its "path"), or None when none does. A file that does not load,
    is not a dict with a "step", or lacks the `expect`ed values (a format version) is named to `log` and
    skipped for the one before it."""
    import torch

    for path in reversed(checkpoints(ckpt_dir)):
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(payload, dict) or "step" not in payload:
                raise ValueError("not a checkpoint")
            for key, value in (expect or {}).items():
                if payload.get(key) != value:
                    raise ValueError(f"{key} is {payload.get(key)!r}, not {value!r}: not a checkpoint of this trainer")
        except Exception as e:  # noqa: BLE001 - a damaged file of any kind: fall back to an older one
            log(f"warning: skipping unreadable checkpoint {path}: {type(e).__name__}: {e}")
            continue
        payload["path"] = str(path)
        return payload
    return None


# ---- the run directory ----------------------------------------------------------------------------------


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class RunDir:
    """Writes one run's directory; with `enabled=False` (ranks other than 0) every write is skipped."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.ckpt_dir = self.path / "ckpt"
        self.metrics_path = self.path / "metrics.jsonl"
        self.log_path = self.path / "train.log"

    def set_aside(self) -> int | None:
        """Move an earlier run's files (RUN_FILES) to NAME.N, N the first number free for all of them, so the
        files of one run keep one number; return N (None when there was nothing to move)."""
        present = [name for name in RUN_FILES if (self.path / name).exists()]
        if not present:
            return None
        n = 1
        while any((self.path / f"{name}.{n}").exists() for name in RUN_FILES):
            n += 1
        for name in present:
            os.replace(self.path / name, self.path / f"{name}.{n}")
        return n

    def start(self, config: dict, provenance: dict, resumed_from_step: int | None) -> None:
        """Write config.json and provenance.json. A fresh start (resumed_from_step None) first moves an earlier
        run's files aside; a resume keeps them, drops the records after its step (truncate_metrics_after) and
        adds the earlier launches to provenance.json's history."""
        if not self.enabled:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        history = []
        if resumed_from_step is None:
            self.set_aside()
        else:
            self.truncate_metrics_after(resumed_from_step)
            try:
                previous = json.loads((self.path / "provenance.json").read_text())
                history = previous.get("history", []) + [{k: previous.get(k) for k in HISTORY_KEYS}]
            except (OSError, ValueError, AttributeError):
                pass
        _write_json(self.path / "config.json", config)
        _write_json(self.path / "provenance.json",
                    {**provenance, "resumed_from_step": resumed_from_step, "history": history})

    def add_provenance(self, **values) -> None:
        """Merge facts known only later (the model's parameter counts) into provenance.json."""
        if not self.enabled:
            return
        path = self.path / "provenance.json"
        try:
            prov = json.loads(path.read_text())
        except (OSError, ValueError):
            prov = {}
        _write_json(path, prov | values)

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        print(message, flush=True)
        with open(self.log_path, "a") as f:
            f.write(message + "\n")

    def metric(self, kind: str, **values) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, **values, "time": round(time.time(), 3)}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def completed(self, goal_step: int, target_stops: bool = False) -> dict | None:
        """The end record of a run that already ended here: the last end/stop record of metrics.jsonl is an end,
        the newest checkpoint is of its step, and that step is goal_step or later (or, where reaching the target
        ends a run, the end says it was reached). None otherwise: a run to go on, or one to extend further.
        Read on every rank: a finished run is left as it is, so its summary stays the real one."""
        last = last_record(self.path, ("end", "stop"))
        if not last or last["kind"] != "end" or not isinstance(last.get("step"), int):
            return None
        if newest_checkpoint(self.ckpt_dir) != checkpoint_path(self.ckpt_dir, last["step"]):
            return None
        return last if last["step"] >= goal_step or (target_stops and last.get("reached_target")) else None

    def truncate_metrics_after(self, step: int) -> None:
        """After a resume from `step`, records of later steps (written before the crash; they will be written
        again) and lines cut by a kill go to metrics.dropped.jsonl; every record at or before `step` stays, the
        stop records of earlier interruptions too (the job scripts and the launcher read them). The file is
        rewritten atomically (temp file + rename)."""
        if not self.enabled or not self.metrics_path.exists():
            return
        keep, dropped = [], []
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            later = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step
            (dropped if later or not isinstance(record, dict) else keep).append(line)
        if dropped:
            with open(self.path / "metrics.dropped.jsonl", "a") as f:
                f.write("\n".join(dropped) + "\n")
        tmp = self.metrics_path.with_name("metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.metrics_path)
