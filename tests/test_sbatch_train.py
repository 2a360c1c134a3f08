"""slurm/nanogpt/train_shakespeare.sh submitted to the local Slurm cluster, as a user submits it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.slurm_cluster import REPO_ROOT

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

SCRIPT = "slurm/nanogpt/train_shakespeare.sh"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """DATA_DIR with a tiny character-level corpus in DATA_DIR/shakespeare_char, made by the real preparer."""
    source = tmp_path_factory.mktemp("sbatch_text")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("bisect.py", "heapq.py", "shlex.py", "textwrap.py", "string.py", "glob.py"):
        (source / name).write_text((stdlib / name).read_text())
    root = tmp_path_factory.mktemp("sbatch_data")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "nanogpt.data.text_corpus",
            "--source",
            str(source),
            "--out",
            str(root / "shakespeare_char"),
            "--tokenizer",
            "char",
        ],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return root


def submit(cluster, tmp_path: Path, *sbatch_args: str, **knobs: str) -> tuple[int, str, str]:
    """sbatch the script from the repo root with --export=ALL,KNOB=...; (job id, final state, job log)."""
    export = ",".join(["ALL", *(f"{key}={value}" for key, value in knobs.items())])
    job_id = cluster.sbatch(*sbatch_args, f"--export={export}", f"--output={tmp_path}/%x-%j.out", SCRIPT)
    state = cluster.wait(job_id, timeout=600)
    log = (tmp_path / f"train_shakespeare-{job_id}.out").read_text()
    return job_id, state, log


def test_sbatch_trains_tiny_model_and_writes_the_run_directory(slurm_cluster, data_dir, tmp_path):
    runs = tmp_path / "runs"
    job_id, state, log = submit(
        slurm_cluster,
        tmp_path,
        "--gres=gpu:h100:1",
        RECIPE="tiny_cpu",
        DATA_DIR=str(data_dir),
        RUNS_DIR=str(runs),
        RUN_NAME="tiny",
        EXTRA_ARGS="--max_iters=60 --eval_interval=20",
    )
    assert state == "COMPLETED", log
    # The prologue took the GPU type and counts from the job, not from knobs typed a second time.
    assert "gpu_type: h100  nodes: 1  gpus/node: 1" in log, log
    assert f"SLURM_JOB_ID={job_id}" in log, log
    run_dir = runs / "tiny"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data_dir"] == str(data_dir / "shakespeare_char")
    assert config["max_iters"] == 60
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["kind"] == "end", metrics[-1]
    val_losses = [m["val_loss"] for m in metrics if m["kind"] == "val"]
    assert len(val_losses) >= 3, metrics
    assert val_losses[-1] < val_losses[0] - 0.3, val_losses
    assert metrics[-1]["final_val_loss"] == pytest.approx(val_losses[-1])


def test_missing_data_directory_fails_before_the_trainer_starts(slurm_cluster, tmp_path):
    missing = tmp_path / "no_such_data"
    job_id, state, log = submit(
        slurm_cluster,
        tmp_path,
        "--gres=gpu:h100:1",
        RECIPE="tiny_cpu",
        DATA_DIR=str(missing),
        RUNS_DIR=str(tmp_path / "runs"),
    )
    assert state == "FAILED", log
    assert f"error: DATASET_DIR={missing}/shakespeare_char does not exist" in log, log
    assert "launch:" not in log, log


def test_gpu_type_knob_that_contradicts_the_job_fails(slurm_cluster, data_dir, tmp_path):
    job_id, state, log = submit(
        slurm_cluster,
        tmp_path,
        "--gres=gpu:h100:1",
        GPU_TYPE="a100",
        RECIPE="tiny_cpu",
        DATA_DIR=str(data_dir),
        RUNS_DIR=str(tmp_path / "runs"),
    )
    assert state == "FAILED", log
    assert "GPU_TYPE=a100 but the job has h100" in log, log


def test_submit_knobs_become_sbatch_options(slurm_cluster, data_dir, tmp_path):
    # SUBMIT=1 builds the sbatch options from the knobs; --test-only makes Slurm check them without running.
    env = dict(
        os.environ,
        SUBMIT="1",
        GPU_TYPE="a100",
        GPUS_PER_NODE="2",
        CPUS_PER_GPU="4",
        PARTITION=slurm_cluster.partition,
        TIME="00:05:00",
        SBATCH_FLAGS="--test-only",
        DATA_DIR=str(data_dir),
        RUNS_DIR=str(tmp_path / "runs"),
    )
    proc = subprocess.run(
        ["bash", SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--gres=gpu:a100:2" in proc.stdout and "--cpus-per-task=8" in proc.stdout, proc.stdout
    assert f"on nodes a100-1 in partition {slurm_cluster.partition}" in proc.stderr, proc.stderr
    # A type this cluster lacks is refused by Slurm itself (slurm/gpus.tsv knows l40s, the cluster does not).
    proc = subprocess.run(
        ["bash", SCRIPT],
        cwd=REPO_ROOT,
        env=dict(env, GPU_TYPE="l40s"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "Requested node configuration is not available" in proc.stderr, proc.stderr


DDP_PROBE = """\
import os
import pathlib
import sys
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
total = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(total)
# One file per rank: lines that several nodes print into one job log may interleave.
pathlib.Path(sys.argv[1], f"rank{dist.get_rank()}").write_text(
    f"world={dist.get_world_size()} node={os.environ['SLURMD_NODENAME']} sum={total.item():.0f}")
dist.destroy_process_group()
"""


def test_launch_spans_two_nodes_through_srun_and_torchrun(slurm_cluster, tmp_path):
    # common.sh's launch(): srun starts one torchrun per node; they meet at a c10d rendezvous on the
    # first node of the job; 2 processes per node (CPU, gloo) here.
    (tmp_path / "ddp_probe.py").write_text(DDP_PROBE)
    script = tmp_path / "two_node_launch.sh"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --nodes=2\n"
        "#SBATCH --ntasks-per-node=1\n"
        "#SBATCH --cpus-per-task=2\n"
        "set -euo pipefail\n"
        'source "$REPO_DIR/slurm/common.sh"\n'
        'launch ddp_probe "$1"\n'
    )
    export = f"ALL,REPO_DIR={REPO_ROOT},RUNS_DIR={tmp_path / 'runs'},PYTHONPATH={tmp_path},NPROC_PER_NODE=2"
    job_id = slurm_cluster.sbatch(
        "--gres=gpu:h100:2",
        f"--export={export}",
        f"--output={tmp_path}/%x-%j.out",
        script,
        tmp_path,
        cwd=tmp_path,
    )
    state = slurm_cluster.wait(job_id, timeout=300)
    log = (tmp_path / f"two_node_launch.sh-{job_id}.out").read_text()
    assert state == "COMPLETED", log
    assert "launch: srun --nodes=2" in log and "--rdzv-endpoint=h100-1:" in log, log
    probes = {path.name: path.read_text() for path in tmp_path.glob("rank*")}
    assert sorted(probes) == ["rank0", "rank1", "rank2", "rank3"], log
    assert sorted(probes.values()) == [f"world=4 node=h100-{n} sum=10" for n in (1, 1, 2, 2)], log
