"""What a job submitted by `python -m slurm.submit` runs: one of the sbatch scripts of slurm/, with its knobs.

submitit pickles a `ScriptJob` at submission and calls it inside the job, in the batch step of the allocation
(use_srun=False), from the submission's code snapshot. The script then does what it does under plain sbatch:
the shared prologue slurm/common.sh, `launch` as a job step (srun, one torchrun per node), and, when the
trainer stopped on SIGUSR1/SIGUSR2 after a checkpoint, `scontrol requeue` of the job, which then runs this
same callable again and resumes from the same RUN_DIR. Signals sent to this process (submitit's local
executor, `kill`) are passed on to the script, as the script passes them on to the trainer.

Kept small and free of the launcher's imports: a job needs only this module, the standard library and the
run directory's reader (nanogpt.rundir, which imports no torch).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from nanogpt.rundir import last_record

EXIT_REQUEUED = 75  # slurm/common.sh's EXIT_REQUEUED: the script requeued its job, which will run again
FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
# The knobs a submission sets; values inherited from the submitting shell must not leak into a job.
MANAGED_KNOBS = (
    "REPO_DIR", "RUN_DIR", "RUN_NAME", "DATASET_DIR", "RECIPE", "EXTRA_ARGS", "GPU_TYPE", "NUM_NODES",
    "GPUS_PER_NODE", "NUM_GPUS", "NPROC_PER_NODE", "DEVICE", "OUT_DIR", "SUBMIT", "SBATCH_FLAGS", "MICRO_BATCH",
    "GRAD_ACC_STEPS", "REQUEUE",
)


class ScriptFailed(RuntimeError):
    """The script of a job exited with an error; the message names the script, the status and the log."""


class RepoJob:
    """What a job runs from REPO_DIR (the code snapshot), with the knobs as environment variables."""

    def __init__(self, knobs: dict[str, str], label: str):
        self.knobs = dict(knobs)
        self.label = label

    def environment(self, what: str) -> tuple[Path, dict[str, str]]:
        """(REPO_DIR, the job's environment: this one without the managed knobs it inherited, plus its own)."""
        repo = Path(self.knobs["REPO_DIR"])
        env = {key: value for key, value in os.environ.items() if key not in MANAGED_KNOBS} | self.knobs
        print(f"job {self.label}: {what} in {repo}", flush=True)
        return repo, env


class ScriptJob(RepoJob):
    """Run `bash SCRIPT`."""

    def __init__(self, script: str, knobs: dict[str, str], label: str):
        super().__init__(knobs, label)
        self.script = script

    def __repr__(self) -> str:
        return f"ScriptJob({self.label}: {self.script})"

    def __call__(self) -> dict:
        repo, env = self.environment(f"bash {self.script}")
        process = subprocess.Popen(["bash", str(repo / self.script)], cwd=repo, env=env)

        def forward(signum, frame):
            print(f"job {self.label}: passing {signal.Signals(signum).name} on to the script", flush=True)
            if process.poll() is None:
                process.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
        try:
            status = process.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if status == EXIT_REQUEUED:
            # Slurm is ending this run of the job and will start it again: leave no result behind, or
            # submitit would take this run for the job's end.
            print(f"job {self.label}: requeued; it resumes from {self.knobs.get('RUN_DIR')}", flush=True)
            sys.stdout.flush()
            os._exit(EXIT_REQUEUED)
        if status != 0:
            how = f"signal {signal.Signals(-status).name}" if status < 0 else f"status {status}"
            raise ScriptFailed(f"{self.script} ({self.label}) ended with {how}; its output is in this job's log above")
        summary = {"label": self.label, "script": self.script}
        if self.knobs.get("RUN_DIR"):
            summary["run_dir"] = self.knobs["RUN_DIR"]
            summary["last_record"] = last_record(self.knobs["RUN_DIR"], ("end", "stop"))
        if self.knobs.get("OUT_DIR"):
            summary["out_dir"] = self.knobs["OUT_DIR"]
        return summary


class ModuleJob(RepoJob):
    """Run `python -m MODULE ARGS...`, e.g. a report over finished runs."""

    def __init__(self, command: list[str], knobs: dict[str, str], label: str):
        super().__init__(knobs, label)
        self.command = list(command)

    def __repr__(self) -> str:
        return f"ModuleJob({self.label}: python -m {' '.join(self.command)})"

    def __call__(self) -> dict:
        repo, env = self.environment(f"python -m {' '.join(self.command)}")
        status = subprocess.run([sys.executable, "-m", *self.command], cwd=repo, env=env).returncode
        if status != 0:
            raise ScriptFailed(f"python -m {' '.join(self.command)} ({self.label}) ended with status {status}")
        return {"label": self.label, "command": self.command}
