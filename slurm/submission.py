"""Submitting a plan (slurm/plans.py) with submitit: a code snapshot, one executor per job with its
parameters and dependencies, job arrays, and the manifest ($RUNS_DIR/submissions/<id>/manifest.json, read by
slurm/manifest.py) written after every job, so a submission that fails half-way says what is already queued.
Local and debug runs wait for each task here. Also the printouts of a dry run and of a submission.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from slurm import jobs
from slurm.manifest import write_json
from slurm.plans import REPO_ROOT, Context, JobSpec, LaunchError, Task

SIGNAL_DELAY_S = 120  # the preemption/time-limit signal comes this long before the end (as in the scripts)
SNAPSHOT_MAX_FILE_BYTES = 20 << 20  # untracked files bigger than this are left out of the code snapshot


class JobFailed(LaunchError):
    """A job run on this machine (--cluster local/debug) failed; the message names its log."""

    exit_status = 1


def new_submission_id(runs_dir: Path, label: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        candidate = f"{stamp}-{label}" + (f"-{attempt}" if attempt > 1 else "")
        if not (runs_dir / "submissions" / candidate).exists() and not (runs_dir / candidate).exists():
            return candidate
    raise LaunchError(f"cannot find a free submission name under {runs_dir}")


def git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def snapshot_code(dest: Path) -> dict:
    """Copy the repo's source files (tracked and untracked-but-not-ignored: the working tree as it is now)
    into dest, so jobs that start later run this code. Returns what .snapshot.json records."""
    listing = git("ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if listing is None:  # not a git checkout: the source folders themselves
        names = [str(p.relative_to(REPO_ROOT)) for top in ("nanogpt", "modded_nanogpt", "slurm", "tests")
                 for p in (REPO_ROOT / top).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        names += [p.name for p in REPO_ROOT.iterdir() if p.is_file()]
    else:
        names = [name for name in listing.split("\0") if name]
    copied, skipped = 0, []
    for name in names:
        source = REPO_ROOT / name
        if not source.is_file():  # deleted in the working tree, or a submodule
            continue
        if source.stat().st_size > SNAPSHOT_MAX_FILE_BYTES:
            skipped.append(name)
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        copied += 1
    sha = (git("rev-parse", "HEAD") or "").strip() or None
    dirty = bool((git("status", "--porcelain") or "").strip()) if sha else None
    info = {"source": str(REPO_ROOT), "git_sha": sha, "git_dirty": dirty,
            "git_describe": f"{sha or 'unknown'}{' (dirty)' if dirty else ''}", "files": copied,
            "skipped_large_files": skipped, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (dest / ".snapshot.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def executor_parameters(job: JobSpec, ctx: Context, dependency: str | None) -> dict:
    """submitit's AutoExecutor parameters for a job (slurm_* ones are ignored by the local executors)."""
    additional = {"requeue": True, "chdir": str(ctx.code_dir)}
    if dependency:
        # A job whose dependency failed can never run: Slurm cancels it instead of leaving it pending.
        additional.update({"dependency": dependency, "kill-on-invalid-dep": "yes"})
    params = {
        "name": job.name, "timeout_min": job.time_min, "nodes": job.nodes, "tasks_per_node": 1,
        "cpus_per_task": job.cpus_per_task,
        "slurm_use_srun": False,  # the script starts its own job steps (srun), one torchrun per node
        # A short job gets its signal a quarter of its time before the end, not at its start.
        "slurm_signal_delay_s": min(SIGNAL_DELAY_S, max(10, job.time_min * 15)), "slurm_stderr_to_stdout": True,
        "slurm_additional_parameters": additional,
    }
    if job.gpus_per_node:
        params["slurm_gres"] = f"gpu:{job.gpu_type}:{job.gpus_per_node}"
    for key, value in (("slurm_partition", job.partition), ("slurm_account", ctx.account), ("slurm_qos", ctx.qos)):
        if value:
            params[key] = value
    if len(job.tasks) > 1 and job.array_parallelism:
        params["slurm_array_parallelism"] = job.array_parallelism
    return params


def make_callable(job: JobSpec, task: Task):
    if job.script is not None:
        return jobs.ScriptJob(job.script, task.knobs, task.label)
    return jobs.ModuleJob(job.module, task.knobs, task.label)


@contextlib.contextmanager
def code_on_path(code_dir: Path):
    """Jobs (and submitit's unpickling in them) import slurm.jobs from the snapshot, not from this checkout."""
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code_dir), previous]))
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous


def submit_all(job_list: list[JobSpec], ctx: Context, argv: list[str]) -> dict:
    import submitit  # imported here: dry runs and status need no submitit

    manifest = {"submission": ctx.submission_id, "argv": argv, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "cluster": ctx.cluster, "runs_dir": str(ctx.runs_dir), "data_dir": str(ctx.data_root),
                "code": {}, "jobs": []}
    ctx.submission_dir.mkdir(parents=True)
    manifest["code"] = snapshot_code(ctx.code_dir) | {"snapshot": str(ctx.code_dir)}
    manifest_path = ctx.submission_dir / "manifest.json"
    submitted: dict[str, str] = {}  # job name -> job id (the array's id for arrays)
    sequential = ctx.cluster in ("local", "debug")
    with code_on_path(ctx.code_dir):
        for job in job_list:
            dependency = None
            if job.after and not sequential:
                dependency = f"{job.after_kind}:" + ":".join(submitted[name] for name in job.after)
            executor = submitit.AutoExecutor(folder=ctx.submission_dir / "jobs" / "%j", cluster=ctx.cluster)
            params = executor_parameters(job, ctx, dependency)
            executor.update_parameters(**params)
            callables = [make_callable(job, task) for task in job.tasks]
            entry = {"name": job.name, "role": job.role, "script": job.script, "module": job.module,
                     "parameters": params, "depends_on": dependency, "tasks": []}
            manifest["jobs"].append(entry)
            if sequential:
                handles = []
                for task, call in zip(job.tasks, callables, strict=True):  # one at a time: they share the GPUs
                    handles.append(executor.submit(call))
                    entry["tasks"].append(task_record(task, handles[-1]))
                    write_json(manifest_path, manifest)
                    wait_local(handles[-1], entry["tasks"][-1], manifest_path, manifest)
            else:
                try:
                    if len(callables) == 1:
                        handles = [executor.submit(callables[0])]
                    else:
                        with executor.batch():
                            handles = [executor.submit(call) for call in callables]
                except Exception as e:  # sbatch refused: say what is already queued
                    done = ", ".join(f"{name} ({job_id})" for name, job_id in submitted.items()) or "nothing"
                    entry["error"] = str(e)
                    write_json(manifest_path, manifest)
                    raise JobFailed(f"submitting {job.name} failed: {str(e).strip()}\nalready submitted: {done}; "
                                    f"python -m slurm.submit cancel {ctx.submission_id} cancels it") from None
                entry["tasks"] = [task_record(task, handle) for task, handle in zip(job.tasks, handles, strict=True)]
                entry["sbatch_file"] = str(handles[0].paths.submission_file)  # the script submitit sbatch'ed
            submitted[job.name] = str(handles[0].job_id).split("_")[0]
            entry["job_id"] = submitted[job.name]
            write_json(manifest_path, manifest)
    return manifest


def task_record(task: Task, handle) -> dict:
    return {"label": task.label, "job_id": str(handle.job_id), "run_dir": task.run_dir, "out_dir": task.out_dir,
            "log": str(handle.paths.stdout), "knobs": task.knobs}


def wait_local(handle, record: dict, manifest_path: Path, manifest: dict) -> None:
    """Local and debug runs: wait for the task; a failure stops the submission with its log's path."""
    try:
        handle.result()
        record["state"] = "COMPLETED"
    except Exception as e:
        record["state"] = "FAILED"
        write_json(manifest_path, manifest)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # submitit wraps the job's exception in its traceback: show the job's own error line.
        reason = next((line for line in reversed(lines) if "ScriptFailed" in line), lines[-1] if lines else repr(e))
        raise JobFailed(f"{record['label']} failed: {reason}; log: {record['log']}") from None
    write_json(manifest_path, manifest)


def print_plan(job_list: list[JobSpec], ctx: Context, skipped: str | None) -> None:
    print(f"dry run: nothing is submitted (cluster {ctx.cluster}); a submission would be recorded in "
          f"{ctx.runs_dir / 'submissions' / ctx.submission_id}")
    for job in job_list:
        dependency = f"{job.after_kind}:<{'>:<'.join(job.after)}>" if job.after else None
        params = executor_parameters(job, ctx, dependency)
        shape = f"array of {len(job.tasks)}" if len(job.tasks) > 1 else "job"
        print(f"\n{job.name}: {shape}, {job.script or 'python -m ' + ' '.join(job.module or [])}")
        print("  submitit parameters: " + json.dumps(params, sort_keys=True))
        for task in job.tasks:
            where = task.run_dir or task.out_dir
            print(f"  task {task.label}" + (f" -> {where}" if where else ""))
            knobs = {k: v for k, v in task.knobs.items() if v != ""}
            print("    knobs: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(knobs.items())))
    if skipped:
        print(f"\nskipped checks (need a reachable Slurm cluster; {skipped}): the GPU types, GPUs per node and "
              "nodes the cluster offers")


def print_submitted(manifest: dict, manifest_path: Path) -> None:
    print(f"submission {manifest['submission']} ({manifest['cluster']}): {manifest_path}")
    for entry in manifest["jobs"]:
        after = f" after {entry['depends_on']}" if entry.get("depends_on") else ""
        print(f"  {entry['name']}: job {entry.get('job_id')}{after}")
        for task in entry["tasks"]:
            where = task.get("run_dir") or task.get("out_dir") or ""
            print(f"    {task['job_id']:>12}  {task['label']:<36} {where}")
            print(f"    {'':>12}  log: {task['log']}")
    print(f"follow it: python -m slurm.submit status {manifest['submission']} [--wait]   "
          f"(logs, cancel likewise)")
