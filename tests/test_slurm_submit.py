"""The launcher (python -m slurm.submit) against the local Slurm cluster, with tiny CPU configs on the fake
GPUs: preparation before training (afterok), seed and ablation arrays, two nodes against one, preemption
with requeue and resume, failures named with their log, and requests refused before anything is submitted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from tests.fixtures import read_metrics
from tests.slurm_cluster import REPO_ROOT
from tests.test_sbatch_scripts import (
    TINY_MODDED,
    curve,
    pip_target_env,
    wait_for_step,
    write_fake_flash_attention,
)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

TINY_SETS = ["--set", "max_iters=20", "--set", "eval_interval=10", "--set", "eval_iters=2"]


def launcher(*args, **extra_env) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("SLURM_") and k != "SLURM_CONF") and k not in ("RUNS_DIR", "DATA_DIR")}
    env.update({k: str(v) for k, v in extra_env.items()})
    return subprocess.run([sys.executable, "-m", "slurm.submit", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def submit(runs: Path, *args, **extra_env) -> dict:
    """Submit to the cluster; the manifest of the submission."""
    proc = launcher(*args, "--cluster", "slurm", "--runs-dir", runs, **extra_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    submission = re.search(r"^submission (\S+) \(slurm\)", proc.stdout, re.M).group(1)
    return json.loads((runs / "submissions" / submission / "manifest.json").read_text())


def wait(runs: Path, manifest: dict, expect_ok: bool = True) -> subprocess.CompletedProcess:
    proc = launcher("status", manifest["submission"], "--runs-dir", runs, "--wait", "--timeout", 400, "--poll", 0.5)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr + logs(manifest)
    return proc


def logs(manifest: dict) -> str:
    out = []
    for job in manifest["jobs"]:
        for task in job["tasks"]:
            path = Path(task["log"])
            out.append(f"\n--- {task['label']} ({path})\n" + (path.read_text()[-3000:] if path.exists() else "(none)"))
    return "".join(out)


def tasks(manifest: dict, job_name: str) -> list[dict]:
    return next(job for job in manifest["jobs"] if job["name"] == job_name)["tasks"]


def sacct_times(job_id: str) -> tuple[datetime, datetime]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,Start,End"], capture_output=True,
                         text=True, check=True).stdout
    for line in out.splitlines():
        found, start, end = line.split("|")
        if found == job_id:
            return datetime.fromisoformat(start), datetime.fromisoformat(end)
    raise AssertionError(f"sacct knows no job {job_id}: {out}")


def test_training_waits_for_its_data_and_seeds_become_an_array(slurm_cluster, tmp_path, text_source):
    runs = tmp_path / "runs"
    manifest = submit(runs, "train", "baseline", "--gpu-type", "h100", "--seeds", "1,2", "--data", "text",
                      "--source", text_source, "--data-root", tmp_path / "data", "--device", "cpu", "--recipe",
                      "tiny_cpu", "--cpus-per-gpu", 1, *TINY_SETS)
    status = wait(runs, manifest)
    prep, train = tasks(manifest, "prep-text"), tasks(manifest, "baseline")
    assert manifest["jobs"][1]["depends_on"] == f"afterok:{prep[0]['job_id']}"
    assert [task["job_id"] for task in train] == [f"{manifest['jobs'][1]['job_id']}_{i}" for i in (0, 1)]
    _, prep_end = sacct_times(prep[0]["job_id"])
    for seed, task in zip((1, 2), train, strict=True):
        start, _ = sacct_times(task["job_id"])
        assert start >= prep_end, (task, start, prep_end)
        run_dir = Path(task["run_dir"])
        assert run_dir == runs / manifest["submission"] / f"baseline-seed{seed}"
        config = json.loads((run_dir / "config.json").read_text())
        assert config["seed"] == seed and config["data_dir"] == str(tmp_path / "data" / "text_char")
        assert read_metrics(run_dir)[-1]["kind"] == "end"
    assert status.stdout.count("COMPLETED") == 3 and "done at step 20" in status.stdout
    # The jobs ran the snapshot, not this checkout.
    log = Path(train[0]["log"]).read_text()
    assert f"repo: {runs}/submissions/{manifest['submission']}/code" in log and "(snapshot)" in log


def test_two_nodes_train_with_both_ranks_and_match_one_node(slurm_cluster, tmp_path, char_corpus):
    runs = tmp_path / "runs"
    common = ["train", "baseline", "--num-gpus", 1, "--device", "cpu", "--recipe", "tiny_cpu", "--data-dir",
              char_corpus, "--cpus-per-gpu", 1, "--set", "total_batch_size=1024", "--set", "max_iters=30",
              "--set", "eval_interval=10", "--set", "eval_iters=4"]
    two = submit(runs, *common, "--gpu-type", "h100", "--nodes", 2)
    one = submit(runs, *common, "--gpu-type", "a100", "--nodes", 1)
    wait(runs, two)
    wait(runs, one)
    two_dir, one_dir = Path(tasks(two, "baseline")[0]["run_dir"]), Path(tasks(one, "baseline")[0]["run_dir"])
    log = Path(tasks(two, "baseline")[0]["log"]).read_text()
    assert "launch: srun --nodes=2 --ntasks-per-node=1" in log and "--rdzv-endpoint=h100-1:" in log, log
    end_two, end_one = read_metrics(two_dir)[-1], read_metrics(one_dir)[-1]
    assert end_two["world_size"] == 2 and end_one["world_size"] == 1
    assert "x 2 proc x 1 accumulation" in (two_dir / "train.log").read_text()
    assert "x 1 proc x 2 accumulation" in (one_dir / "train.log").read_text()
    # The same data per optimizer step: 2 ranks x 1 micro-batch = 1 rank x 2 accumulated micro-batches.
    for kind, key in (("train", "loss"), ("val", "val_loss")):
        a = [(m["step"], m["tokens"], m[key]) for m in read_metrics(two_dir) if m["kind"] == kind]
        b = [(m["step"], m["tokens"], m[key]) for m in read_metrics(one_dir) if m["kind"] == kind]
        assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) >= 3
        assert [x[2] for x in a] == pytest.approx([x[2] for x in b], rel=1e-4), (kind, a, b)


def test_a_signalled_job_checkpoints_requeues_and_resumes_to_the_uninterrupted_result(
        slurm_cluster, tmp_path, char_corpus):
    runs = tmp_path / "runs"
    common = ["train", "baseline", "--num-gpus", 2, "--device", "cpu", "--recipe", "tiny_cpu", "--data-dir",
              char_corpus, "--cpus-per-gpu", 1, "--set", "max_iters=400", "--set", "eval_interval=100",
              "--set", "eval_iters=4"]
    reference = submit(runs, *common, "--gpu-type", "a100")
    preempted = submit(runs, *common, "--gpu-type", "h100")
    task = tasks(preempted, "baseline")[0]
    run_dir = Path(task["run_dir"])
    wait_for_step(run_dir, 120)
    # What Slurm does SIGNAL_DELAY_S before the time limit (--signal=USR2@120 of submitit's header), by hand:
    # the signal goes to the job's steps, i.e. srun -> torchrun -> both trainer processes.
    subprocess.run(["scancel", "--signal=USR2", task["job_id"]], check=True, timeout=60)
    wait(runs, preempted)
    wait(runs, reference)
    log = Path(task["log"]).read_text()
    stops = [m for m in read_metrics(run_dir) if m["kind"] == "stop"]
    assert len(stops) == 1 and stops[0]["reason"] == "signal SIGUSR2", log
    assert "torchrun --standalone --nproc-per-node=2" in log
    assert f"requeue: the trainer stopped on signal SIGUSR2 after a checkpoint; requeueing job {task['job_id']}" in log
    assert "job baseline: requeued; it resumes from" in log and f"resumed from step {stops[0]['step']}" in log
    history = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-j", task["job_id"], "-o", "State"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert history == ["REQUEUED", "COMPLETED"], history
    assert curve(run_dir) == curve(Path(tasks(reference, "baseline")[0]["run_dir"]))
    assert curve(run_dir)[-1][:2] == ("end", 400)


def test_a_failing_job_is_reported_with_its_log(slurm_cluster, tmp_path, char_corpus):
    runs = tmp_path / "runs"
    manifest = submit(runs, "train", "baseline", "--gpu-type", "h100", "--device", "cpu", "--recipe", "tiny_cpu",
                      "--data-dir", char_corpus, "--cpus-per-gpu", 1, "--set", "no_such_key=1")
    status = wait(runs, manifest, expect_ok=False)
    log = tasks(manifest, "baseline")[0]["log"]
    assert status.returncode == 1, status.stdout + status.stderr
    assert f"baseline FAILED: log {log}" in status.stdout
    assert "no_such_key" in status.stdout  # the log's tail, with the trainer's error
    assert "error: 1 task(s) did not complete; see the logs named above" in status.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "baseline", "--gpu-type", "l40s"], "the cluster offers no l40s GPUs (sinfo lists: a100, h100)"),
        (["train", "baseline", "--gpu-type", "b200"], "unknown GPU type 'b200'"),
        (["train", "baseline", "--gpu-type", "h100", "--num-gpus", "9"], "--num-gpus 9: nodes of the cluster have at most 8 h100"),
        (["train", "baseline", "--gpu-type", "h100", "--nodes", "3"], "--nodes 3: the cluster has 2 node(s) with h100 GPUs"),
        (["train", "baseline", "--gpu-type", "a100", "--nodes", "2"], "--nodes 2: the cluster has 1 node(s) with a100 GPUs"),
        (["train", "modded", "--gpu-type", "h100", "--num-gpus", "3"], "the modded trainer runs on 1, 2, 4, 8 GPUs"),
        (["train", "baseline", "--gpu-type", "h100", "--data-dir", "MISSING"], "missing data directory"),
        (["train", "baseline", "--gpu-type", "h100", "--partition", "nosuch"], "partition nosuch has no nodes"),
    ],
)
def test_requests_the_cluster_or_trainer_cannot_run_are_refused_before_submission(
        slurm_cluster, tmp_path, char_corpus, args, message):
    args = [str(tmp_path / "missing") if arg == "MISSING" else arg for arg in args]
    if "--data-dir" not in args:
        args += ["--data-dir", str(char_corpus)]
    queue_before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    proc = launcher(*args, "--runs-dir", tmp_path / "runs")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "error: nothing was submitted" in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout == queue_before


def test_a_dry_run_on_the_cluster_runs_its_checks_and_submits_nothing(slurm_cluster, tmp_path, char_corpus):
    proc = launcher("train", "baseline", "--gpu-type", "h100", "--nodes", 2, "--num-gpus", 8, "--data-dir", char_corpus,
                    "--dry-run", "--runs-dir", tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr
    assert '"slurm_gres": "gpu:h100:8"' in proc.stdout and '"nodes": 2' in proc.stdout
    assert "skipped checks" not in proc.stdout and not (tmp_path / "runs").exists()


def test_build_flash_attn_through_the_launcher(slurm_cluster, tmp_path):
    source = write_fake_flash_attention(tmp_path / "flash-attention")
    runs = tmp_path / "runs"
    # The launcher's environment is the jobs' environment (sbatch --export=ALL): pip installs into PIP_TARGET.
    manifest = submit(runs, "build-flash-attn", "--gpu-type", "h100", "--src", source, "--module",
                      "fake_flash_attn_interface", "--cpus", 2, **pip_target_env(tmp_path / "site"))
    wait(runs, manifest)
    log = Path(tasks(manifest, "build-flash-attn")[0]["log"]).read_text()
    assert f"build: FlashAttention 3 from {(source / 'hopper').resolve()} for compute capability 9.0 with MAX_JOBS=2" in log
    assert "built: import fake_flash_attn_interface works (version 0.1" in log


def test_ablation_array_and_comparison_produce_the_expected_runs(slurm_cluster, tmp_path, char_corpus, text_source):
    runs = tmp_path / "runs"
    modded_sets = [arg for pair in TINY_MODDED.split() for arg in ("--set", pair.removeprefix("--"))]
    ablate = submit(runs, "ablate", "--features", "value_embeds,mlp_activation", "--seeds", 1, "--gpu-type", "h100",
                    "--device", "cpu", "--recipe", "tiny_cpu", "--data-dir", char_corpus, "--cpus-per-gpu", 1,
                    *modded_sets)
    compare = submit(runs, "compare", "--seeds", 1, "--gpu-type", "a100", "--device", "cpu", "--recipe", "tiny_cpu",
                     "--data", "text", "--source", text_source, "--data-root", tmp_path / "data", "--cpus-per-gpu", 1,
                     "--baseline-set", "max_iters=20",
                     *[arg.replace("--set", "--modded-set") for arg in modded_sets])
    wait(runs, ablate)
    wait(runs, compare)
    ablation = {Path(task["run_dir"]).name: Path(task["run_dir"]) for task in tasks(ablate, "ablate")}
    assert sorted(ablation) == ["ablate-full-seed1", "ablate-no_mlp_activation-seed1", "ablate-no_value_embeds-seed1"]
    configs = {name: json.loads((path / "config.json").read_text()) for name, path in ablation.items()}
    assert configs["ablate-full-seed1"]["value_embeds"] is True
    assert configs["ablate-no_value_embeds-seed1"]["value_embeds"] is False
    assert configs["ablate-no_mlp_activation-seed1"]["mlp_activation"] == "gelu"
    assert all(read_metrics(path)[-1]["kind"] == "end" for path in ablation.values())
    names = [job["name"] for job in compare["jobs"]]
    assert names[:3] == ["prep-text", "baseline", "modded"]
    for name in ("baseline", "modded"):
        run_dir = Path(tasks(compare, name)[0]["run_dir"])
        assert run_dir.name == f"{name}-seed1" and read_metrics(run_dir)[-1]["kind"] == "end"
        assert json.loads((run_dir / "config.json").read_text())["data_dir"] == str(tmp_path / "data" / "text_char")
