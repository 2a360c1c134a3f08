"""The commands that follow a submission after it was made, from its manifest: status (with --wait), logs,
cancel, and resume (submit again the training runs that stopped before their last step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from nanogpt.rundir import last_record
from slurm import jobs
from slurm.manifest import (
    TERMINAL_STATES,
    failure_lines,
    find_manifest,
    log_tail,
    progress,
    scheduler_states,
    write_json,
)
from slurm.plans import REPO_ROOT, LaunchError, parse_time_min
from slurm.submission import code_on_path, wait_local


def resolve_runs_dir(args) -> Path:
    return Path(args.runs_dir or os.environ.get("RUNS_DIR") or REPO_ROOT / "runs").expanduser().resolve()


def cmd_status(args) -> int:
    manifest_path = find_manifest(resolve_runs_dir(args), args.submission)
    start = time.monotonic()
    deadline = start + args.timeout
    shown = None
    while True:
        manifest = json.loads(manifest_path.read_text())
        tasks = [(entry, task) for entry in manifest["jobs"] for task in entry["tasks"]]
        if manifest["cluster"] == "slurm":
            states = scheduler_states([task["job_id"] for _, task in tasks])
        else:  # local and debug runs ended with the launcher; their states are in the manifest
            states = {task["job_id"]: task.get("state", "CANCELLED") for _, task in tasks}
        current = {task["job_id"]: states.get(task["job_id"], "PENDING") for _, task in tasks}
        finished = all(state in TERMINAL_STATES for state in current.values())
        if not args.wait or finished or time.monotonic() > deadline:
            break
        waiting = waiting_line(tasks, current)
        if waiting != shown:  # say what it waits for whenever that changes (a job starts, a run logs a step)
            print(f"[{time.monotonic() - start:5.0f}s] waiting for {waiting}", flush=True)
            shown = waiting
        time.sleep(args.poll)
    print(f"submission {manifest['submission']} ({manifest['cluster']}): {manifest_path}")
    failed = unfinished = 0
    for entry, task in tasks:
        state = current[task["job_id"]]
        stopped = state == "COMPLETED" and task.get("run_dir") and \
            (last_record(task["run_dir"], ("end", "stop")) or {}).get("kind") == "stop"
        # A job that ended well after its trainer stopped on a signal (and was not requeued) left the run unfinished.
        print(f"  {task['job_id']:>12}  {task['label']:<36} {'UNFINISHED' if stopped else state:<11} {progress(task)}")
        if stopped:
            unfinished += 1
            print(f"  {'':>12}  the run stopped before its last step; python -m slurm.submit resume "
                  f"{manifest['submission']} --job {task['label']} resumes it (RUN_DIR={task['run_dir']})")
        elif state in TERMINAL_STATES and state != "COMPLETED":
            failed += 1
            print(f"  {'':>12}  {entry['name']} {state}: log {task['log']}")
            for line in failure_lines(task["log"]):
                print(f"  {'':>12}  | {line}")
    if args.wait and not all(state in TERMINAL_STATES for state in current.values()):
        print(f"error: still running after --timeout {args.timeout:.0f}s", file=sys.stderr)
        return 1
    if failed:
        print(f"error: {failed} task(s) did not complete; see the logs named above", file=sys.stderr)
    if unfinished:
        print(f"error: {unfinished} run(s) stopped before their last step (UNFINISHED above)", file=sys.stderr)
    return 1 if failed or unfinished else 0


def waiting_line(tasks: list[tuple[dict, dict]], states: dict[str, str]) -> str:
    """What --wait is waiting for: each unfinished task with its state and, when running, its progress."""
    parts = []
    for _, task in tasks:
        state = states[task["job_id"]]
        if state in TERMINAL_STATES:
            continue
        detail = progress(task) if state == "RUNNING" else ""
        parts.append(f"{task['label']} {state}" + (f" ({detail})" if detail else ""))
    done = len(tasks) - len(parts)
    return "; ".join(parts) + (f"  [{done}/{len(tasks)} done]" if done else "")


def cmd_resume(args) -> int:
    """Submit again the training tasks of a submission whose runs stopped before their last step (a stop record
    last, or no end record), with their recorded script, knobs and code snapshot: each resumes from its run
    directory's newest checkpoint. --job picks one task; --time replaces the recorded time limit."""
    import submitit

    manifest_path = find_manifest(resolve_runs_dir(args), args.submission)
    manifest = json.loads(manifest_path.read_text())
    cluster = manifest["cluster"]
    states = {}
    if cluster == "slurm":
        states = scheduler_states([t["job_id"] for e in manifest["jobs"] for t in e["tasks"]])
    chosen = []
    for entry in manifest["jobs"]:
        if entry.get("role") != "train" or not entry.get("script"):
            continue
        for task in entry["tasks"]:
            if args.job and args.job not in (task["label"], entry["name"], task["job_id"]):
                continue
            last = last_record(task["run_dir"], ("end", "stop")) if task.get("run_dir") else None
            state = states.get(task["job_id"], task.get("state", "COMPLETED"))
            if last and last.get("kind") == "end":
                print(f"  {task['label']}: finished (step {last.get('step')}); nothing to resume")
            elif state not in TERMINAL_STATES:
                print(f"  {task['label']}: job {task['job_id']} is {state}; it resumes by itself")
            else:
                chosen.append((entry, task, last))
    if args.job and not chosen and not any(args.job in (t["label"], e["name"], t["job_id"])
                                           for e in manifest["jobs"] for t in e["tasks"]):
        raise LaunchError(f"--job {args.job}: no task of submission {manifest['submission']} has that label, job "
                          "name or job id")
    if not chosen:
        print(f"submission {manifest['submission']}: no stopped run to resume")
        return 0
    submission_dir = manifest_path.parent
    code_dir = Path(manifest["code"]["snapshot"])
    with code_on_path(code_dir):
        for entry, task, last in chosen:
            params = dict(entry["parameters"])
            if args.time:
                params["timeout_min"] = parse_time_min(args.time)
            params.pop("slurm_array_parallelism", None)
            executor = submitit.AutoExecutor(folder=submission_dir / "jobs" / "%j", cluster=cluster)
            executor.update_parameters(**params)
            handle = executor.submit(jobs.ScriptJob(entry["script"], task["knobs"], task["label"]))
            task.setdefault("previous", []).append({k: task.get(k) for k in ("job_id", "log", "state")})
            task.update(job_id=str(handle.job_id), log=str(handle.paths.stdout))
            task.pop("state", None)
            where = f"from step {last.get('step')}" if last else "from its newest checkpoint"
            print(f"  {task['label']}: resubmitted as job {task['job_id']}, resuming {where} in {task['run_dir']}")
            write_json(manifest_path, manifest)
            if cluster in ("local", "debug"):
                wait_local(handle, task, manifest_path, manifest)
    print(f"follow it: python -m slurm.submit status {manifest['submission']} [--wait]")
    return 0


def cmd_logs(args) -> int:
    manifest_path = find_manifest(resolve_runs_dir(args), args.submission)
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["jobs"]:
        for task in entry["tasks"]:
            if args.job and args.job not in (task["label"], entry["name"], task["job_id"]):
                continue
            print(f"{task['label']} (job {task['job_id']}): {task['log']}")
            if args.tail:
                for line in log_tail(task["log"], args.tail):
                    print(f"  | {line}")
    return 0


def cmd_cancel(args) -> int:
    manifest_path = find_manifest(resolve_runs_dir(args), args.submission)
    manifest = json.loads(manifest_path.read_text())
    ids = sorted({entry["job_id"] for entry in manifest["jobs"] if entry.get("job_id")})
    if manifest["cluster"] != "slurm" or not ids:
        print(f"submission {manifest['submission']}: nothing to cancel ({manifest['cluster']} jobs end with the launcher)")
        return 0
    proc = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise LaunchError(f"scancel {' '.join(ids)} failed: {proc.stderr.strip()}")
    print(f"submission {manifest['submission']}: cancelled job(s) {' '.join(ids)}")
    return 0
