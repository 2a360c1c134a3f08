"""The sbatch scripts of slurm/ (other than train_shakespeare.sh, see test_sbatch_train.py): each run on this
machine without Slurm, and each submitted with sbatch to the local cluster (`slurm` marker), where the
downloads go to HTTP servers the test starts. Preemption: a job signalled with `scancel --signal=USR1 --batch`
checkpoints, requeues itself and resumes, and ends with the metrics of an uninterrupted run."""

from __future__ import annotations

import http.server
import json
import os
import pickle
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.data_gpt2_files import write_gpt2_files
from tests.fixtures import read_metrics
from tests.slurm_cluster import REPO_ROOT

# ---- helpers -------------------------------------------------------------------------------------------

BACKEND = '''\
"""A PEP 517 build backend with no requirements: a stand-in for a package that needs compiling."""
import base64, hashlib, pathlib, zipfile

NAME, VERSION, MODULE = {name!r}, "0.1", {module!r}


def _record(path, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{{path}},sha256={{digest}},{{len(data)}}"


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    dist = f"{{NAME}}-{{VERSION}}"
    files = {{
        f"{{MODULE}}.py": pathlib.Path(__file__).with_name(f"{{MODULE}}.py").read_bytes(),
        f"{{dist}}.dist-info/METADATA": f"Metadata-Version: 2.1\\nName: {{NAME}}\\nVersion: {{VERSION}}\\n".encode(),
        f"{{dist}}.dist-info/WHEEL": b"Wheel-Version: 1.0\\nGenerator: test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
    }}
    record = [_record(path, data) for path, data in files.items()] + [f"{{dist}}.dist-info/RECORD,,"]
    files[f"{{dist}}.dist-info/RECORD"] = ("\\n".join(record) + "\\n").encode()
    wheel = f"{{dist}}-py3-none-any.whl"
    with zipfile.ZipFile(pathlib.Path(wheel_directory) / wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel
'''


def write_fake_package(folder: Path, module: str) -> None:
    """A pure-Python package that pip builds with --no-build-isolation, importable as `module`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n')
    (folder / "backend.py").write_text(BACKEND.format(name=f"{module}_dist", module=module))
    (folder / f"{module}.py").write_text(f'__version__ = "0.1"\nNAME = "{module}"\n')


def write_fake_flash_attention(root: Path) -> Path:
    """A stand-in for a flash-attention checkout: FA2 at its root (fake_flash_attn), FA3 in hopper/
    (fake_flash_attn_interface)."""
    write_fake_package(root, "fake_flash_attn")
    write_fake_package(root / "hopper", "fake_flash_attn_interface")
    return root


def pip_target_env(target: Path) -> dict:
    """Knobs that make pip install into `target` (not the shared environment) and Python find it there."""
    return {"PIP_TARGET": str(target), "PYTHONPATH": str(target), "PIP_NO_INDEX": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1", "BUILD_REQUIRES": ""}


class TextServer:
    """A local HTTP server answering GET /NAME with files[NAME]; counts the requests."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests = files, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append(name)
                body = server.files.get(name)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def clean_env(**knobs) -> dict:
    """This environment without Slurm job variables (SLURM_CONF stays) or knobs a developer may have exported."""
    drop = ("RUN_DIR", "RUN_NAME", "DATASET_DIR", "RECIPE", "EXTRA_ARGS", "OUT_DIR", "DEVICE", "NPROC_PER_NODE")
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("SLURM_") and k != "SLURM_CONF") and k not in drop}
    env.update({k: str(v) for k, v in knobs.items()})
    return env


def run_script(script: str, timeout: float = 300, **knobs) -> subprocess.CompletedProcess:
    """bash SCRIPT on this machine, outside Slurm, as a user runs it."""
    return subprocess.run(["bash", script], cwd=REPO_ROOT, env=clean_env(**knobs), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def sbatch_script(cluster, tmp_path: Path, script: str, *sbatch_args: str, **knobs) -> int:
    """sbatch SCRIPT from the repo root with the knobs exported; the job id. The log: tmp_path/<name>-<id>.out."""
    export = ",".join(["ALL", *(f"{key}={value}" for key, value in knobs.items())])
    return cluster.sbatch(*sbatch_args, f"--export={export}", f"--output={tmp_path}/%x-%j.out", script,
                          env=clean_env())


def job_log(tmp_path: Path, job_id: int) -> str:
    return next(tmp_path.glob(f"*-{job_id}.out")).read_text()


def wait_for_step(run_dir: Path, step: int, timeout: float = 120) -> None:
    """Until RUN_DIR/metrics.jsonl has a train record at `step` or later."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if any(m["kind"] == "train" and m["step"] >= step for m in read_metrics(run_dir)):
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{run_dir}: no train record at step {step} within {timeout}s")


def curve(run_dir: Path) -> list[tuple]:
    """What must not depend on an interruption: (kind, step, losses) of the val records and the end record."""
    out = []
    for m in read_metrics(run_dir):
        if m["kind"] == "val":
            out.append(("val", m["step"], m["val_loss"], m.get("train_loss")))
        elif m["kind"] == "end":
            out.append(("end", m["step"], m["final_val_loss"], m["tokens"]))
    return out


TINY = "--max_iters=20 --eval_interval=10 --eval_iters=2"
TINY_MODDED = "--num_iterations=6 --extension_iterations=0 --val_every=3 --val_tokens=2048"


# ---- on this machine, without Slurm ------------------------------------------------------------------------


def test_train_gpt2_runs_a_tiny_cpu_recipe_with_a_micro_batch(tmp_path, char_corpus):
    proc = run_script("slurm/nanogpt/train_gpt2.sh", RECIPE="tiny_cpu", DATASET_DIR=char_corpus, DEVICE="cpu",
                      RUNS_DIR=tmp_path / "runs", RUN_NAME="local", MICRO_BATCH=4, EXTRA_ARGS=TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"launch: python -m nanogpt.train tiny_cpu --data_dir={char_corpus} --run_dir={tmp_path}/runs/local " \
           f"--device=cpu --batch_size=4 {TINY}" in proc.stdout and "srun" not in proc.stdout
    run_dir = tmp_path / "runs" / "local"
    assert json.loads((run_dir / "config.json").read_text())["batch_size"] == 4
    assert read_metrics(run_dir)[-1]["kind"] == "end"


def test_a_signal_outside_slurm_stops_after_a_checkpoint_and_the_rerun_resumes(tmp_path, char_corpus):
    knobs = dict(RECIPE="tiny_cpu", DATASET_DIR=char_corpus, DEVICE="cpu", RUNS_DIR=tmp_path / "runs", RUN_NAME="sig",
                 EXTRA_ARGS="--max_iters=100000 --eval_interval=1000 --eval_iters=2")
    job = subprocess.Popen(["bash", "slurm/nanogpt/train_gpt2.sh"], cwd=REPO_ROOT, env=clean_env(**knobs),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "sig"
    try:
        wait_for_step(run_dir, 20)
        job.send_signal(signal.SIGUSR1)
        stdout, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert f"stopped on signal SIGUSR1 after a checkpoint; run the same command with RUN_DIR={run_dir} to resume" in stdout
    stop = read_metrics(run_dir)[-1]
    assert stop["kind"] == "stop" and stop["reason"] == "signal SIGUSR1"
    resumed = run_script("slurm/nanogpt/train_gpt2.sh", **{**knobs, "EXTRA_ARGS": f"--max_iters={stop['step'] + 10} "
                                                           "--eval_interval=1000 --eval_iters=2"})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from step {stop['step']}" in resumed.stdout
    assert read_metrics(run_dir)[-1]["kind"] == "end" and read_metrics(run_dir)[-1]["step"] == stop["step"] + 10


def test_a_speedrun_stopped_twice_says_so_each_time_and_resumes_to_the_uninterrupted_run(tmp_path, char_corpus):
    """The job script decides "the trainer stopped after a checkpoint" from the newest stop record this launch
    wrote. A resumed speedrun used to move every earlier stop record aside, so a count of stop records did not
    grow at the second stop: the script then said nothing and ended 0 as if the run were done (under Slurm: not
    requeued, COMPLETED at step 380/502). Here: two SIGUSR1 stops, each announced; the third launch finishes
    with the uninterrupted run's curve, and both stop records stay in metrics.jsonl."""
    extra = "--num_iterations=60 --extension_iterations=0 --val_every=20 --val_tokens=2048"
    knobs = dict(RECIPE="tiny_cpu", DATASET_DIR=char_corpus, DEVICE="cpu", RUNS_DIR=tmp_path / "runs", EXTRA_ARGS=extra)
    whole = run_script("slurm/modded/train_speedrun.sh", RUN_NAME="whole", **knobs)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    run_dir = tmp_path / "runs" / "cut"
    stops = []
    for at in (12, 35):
        job = subprocess.Popen(["bash", "slurm/modded/train_speedrun.sh"], cwd=REPO_ROOT,
                               env=clean_env(RUN_NAME="cut", **knobs), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        try:
            wait_for_step(run_dir, at)
            job.send_signal(signal.SIGUSR1)
            stdout, stderr = job.communicate(timeout=120)
        finally:
            if job.poll() is None:
                job.kill()
        assert job.returncode == 0, stdout[-3000:] + stderr[-3000:]
        assert "stopped on signal SIGUSR1 after a checkpoint; run the same command with " \
               f"RUN_DIR={run_dir} to resume" in stdout, stdout[-3000:]
        stops.append(read_metrics(run_dir)[-1])
        assert stops[-1]["kind"] == "stop" and stops[-1]["step"] < 60, stops[-1]
    last = run_script("slurm/modded/train_speedrun.sh", RUN_NAME="cut", **knobs)
    assert last.returncode == 0 and f"resumed from step {stops[-1]['step']}" in last.stdout, last.stdout[-3000:]
    assert "stopped on" not in last.stdout
    kept = [m for m in read_metrics(run_dir) if m["kind"] == "stop"]
    assert [m["step"] for m in kept] == [m["step"] for m in stops]
    assert curve(run_dir) == curve(tmp_path / "runs" / "whole")


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"NPROC_PER_NODE": "3"}, "the speedrun trainer runs on 1, 2, 4 or 8 GPUs (processes), got 3 processes"),
        ({"GPUS_PER_NODE": "6"}, "the speedrun trainer runs on 1, 2, 4 or 8 GPUs (processes), got 6 GPUs"),
        ({"NUM_NODES": "2"}, "the speedrun trainer runs on one node, got NUM_NODES=2"),
        ({"GRAD_ACC_STEPS": "2", "DATASET_DIR": "CORPUS"}, "GRAD_ACC_STEPS=2: modded_nanogpt.train_gpt derives"),
    ],
)
def test_train_speedrun_refuses_what_the_trainer_cannot_run(tmp_path, char_corpus, knobs, message):
    knobs = {k: (char_corpus if v == "CORPUS" else v) for k, v in knobs.items()}
    if "GRAD_ACC_STEPS" in knobs and not (REPO_ROOT / "modded_nanogpt" / "train_gpt.py").exists():
        message = "modded_nanogpt/train_gpt.py does not exist"
    proc = run_script("slurm/modded/train_speedrun.sh", RUNS_DIR=tmp_path / "runs", DEVICE="cpu", **knobs)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "launch:" not in proc.stdout


@pytest.mark.parametrize(("knobs", "message"), [
    ({"GPUS_PER_NODE": "3"}, "the speedrun trainer runs on 1, 2, 4 or 8 GPUs (processes), got 3 GPUs"),
    ({"ENV_PATH": "MISSING"}, "could not activate the environment"),
    ({"DATASET_DIR": "MISSING"}, "DATASET_DIR="),
])
def test_submit_1_refuses_what_the_job_would_refuse_before_sbatch(tmp_path, char_corpus, knobs, message):
    """SUBMIT=1 submitted at once, so a 3-GPU speedrun, a missing environment or data directory failed only in
    the job, after the queue wait. Now a dry pass of the same script (CHECK_ONLY) runs its checks first."""
    knobs = {"DATASET_DIR": char_corpus, **{k: (tmp_path / "missing" if v == "MISSING" else v) for k, v in knobs.items()}}
    proc = run_script("slurm/modded/train_speedrun.sh", SUBMIT=1, GPU_TYPE="h100", RUNS_DIR=tmp_path / "runs", **knobs)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "not submitted: the check above failed" in proc.stderr, proc.stderr
    assert "submitting:" not in proc.stdout


def test_train_speedrun_runs_the_tiny_cpu_recipe_with_two_processes(tmp_path, char_corpus):
    proc = run_script("slurm/modded/train_speedrun.sh", RECIPE="tiny_cpu", DATASET_DIR=char_corpus, DEVICE="cpu",
                      NPROC_PER_NODE=2, RUNS_DIR=tmp_path / "runs", RUN_NAME="modded", EXTRA_ARGS=TINY_MODDED)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launch: torchrun --standalone --nproc-per-node=2" in proc.stdout
    # The grammar of both trainers (the recipe first), built by the prologue's run_trainer as for the baseline.
    assert f"-m modded_nanogpt.train_gpt tiny_cpu --data_dir={char_corpus} --run_dir={tmp_path}/runs/modded " \
           f"--device=cpu {TINY_MODDED}" in proc.stdout
    end = read_metrics(tmp_path / "runs" / "modded")[-1]
    assert end["kind"] == "end", end


@pytest.mark.parametrize(("script", "module", "recipe", "dataset"), [
    ("slurm/nanogpt/train_shakespeare.sh", "nanogpt.train", "train_shakespeare_char", "shakespeare_char"),
    ("slurm/nanogpt/train_gpt2.sh", "nanogpt.train", "train_gpt2_fineweb", "fineweb10B"),
    ("slurm/modded/train_speedrun.sh", "modded_nanogpt.train_gpt", "", "fineweb10B"),
])
def test_training_scripts_default_their_recipe_and_data_folder_and_take_the_knobs(tmp_path, script, module, recipe,
                                                                                 dataset):
    """Each training script names its defaults of RECIPE and DATASET_DIR (a folder of DATA_DIR) before the shared
    prologue, which declares the two knobs: a stray DEFAULT_RECIPE or DEFAULT_DATASET in the environment changes
    nothing, and RECIPE and DATASET_DIR win. An unknown trainer flag stops each run right after its launch line."""
    data = tmp_path / "data"
    for folder in (data / dataset, tmp_path / "other"):
        folder.mkdir(parents=True)
        (folder / "train.bin").write_bytes(b"")
    knobs = dict(DATA_DIR=data, RUNS_DIR=tmp_path / "runs", RUN_NAME="defaults", DEVICE="cpu",
                 EXTRA_ARGS="--no_such_setting=1", DEFAULT_RECIPE="stray", DEFAULT_DATASET="stray")
    proc = run_script(script, **knobs)
    assert proc.returncode != 0 and "no_such_setting" in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"launch: python -m {module} {recipe + ' ' if recipe else ''}--data_dir={data / dataset} " \
           f"--run_dir={tmp_path}/runs/defaults --device=cpu" in proc.stdout, proc.stdout
    proc = run_script(script, **knobs, RECIPE="tiny_cpu", DATASET_DIR=tmp_path / "other")
    assert f"launch: python -m {module} tiny_cpu --data_dir={tmp_path / 'other'} " in proc.stdout, proc.stdout


def test_prologue_rejects_a_bad_requeue_knob(tmp_path, char_corpus):
    proc = run_script("slurm/nanogpt/train_gpt2.sh", RUNS_DIR=tmp_path / "runs", DATASET_DIR=char_corpus, REQUEUE="yes")
    assert proc.returncode == 2 and "REQUEUE must be auto, 0 or 1, got 'yes'" in proc.stderr, proc.stderr


@pytest.mark.parametrize(("version", "module"), [("2", "fake_flash_attn"), ("3", "fake_flash_attn_interface")])
def test_build_flash_attn_installs_and_imports_the_module(tmp_path, version, module):
    source = write_fake_flash_attention(tmp_path / "flash-attention")
    proc = run_script("slurm/modded/build_flash_attn.sh", FA_VERSION=version, FLASH_ATTN_SRC=source,
                      FLASH_ATTN_MODULE=module, MAX_JOBS=3, **pip_target_env(tmp_path / "site"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    built = source / ("hopper" if version == "3" else "")
    assert f"build: FlashAttention {version} from {built.resolve()} for compute capability 9.0 with MAX_JOBS=3" in proc.stdout
    assert f"launch: python -m pip install --no-build-isolation {built.resolve()}" in proc.stdout
    assert f"built: import {module} works (version 0.1, {tmp_path / 'site' / module}.py)" in proc.stdout
    wrong = run_script("slurm/modded/build_flash_attn.sh", FA_VERSION=version, FLASH_ATTN_SRC=source,
                       FLASH_ATTN_MODULE="not_built_module", **pip_target_env(tmp_path / "site2"))
    assert wrong.returncode == 2 and "the build finished but 'import not_built_module' fails" in wrong.stderr


def test_build_flash_attn_4_installs_the_extra_pins_and_checks_the_kernels(tmp_path):
    """FA_VERSION=4: pip installs (no compiler, no checkout), the module imports, then the kernel check runs (it
    says so and passes where there is no GPU); the default spec is environment.yml's fa4 extra."""
    source = tmp_path / "fa4"
    write_fake_package(source, "fake_flash_attn_cute")
    proc = run_script("slurm/modded/build_flash_attn.sh", FA_VERSION="4", FLASH_ATTN_SPEC=source,
                      FLASH_ATTN_MODULE="fake_flash_attn_cute", PIP_ARGS="--no-build-isolation",
                      **pip_target_env(tmp_path / "site"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"launch: python -m pip install --no-build-isolation {source}" in proc.stdout
    assert "built: import fake_flash_attn_cute works" in proc.stdout
    assert "attention_check: no CUDA GPU here, so fa4's kernels were not run" in proc.stdout
    offline = run_script("slurm/modded/build_flash_attn.sh", FA_VERSION="4", **pip_target_env(tmp_path / "site2"))
    pins = (REPO_ROOT / "environment.yml").read_text().split("# extra fa4:")[1].splitlines()[0].split()
    assert pins[0] == "flash-attn-4==4.0.0b36" and "nvidia-cutlass-dsl==4.8.1" in pins
    assert f"launch: python -m pip install {' '.join(pins)}" in offline.stdout  # no index here: pip fails
    assert offline.returncode != 0
    checkout = run_script("slurm/modded/build_flash_attn.sh", FA_VERSION="4", FLASH_ATTN_SRC=tmp_path)
    assert checkout.returncode == 2 and "FA_VERSION=4 installs wheels, not a checkout" in checkout.stderr
    bad = run_script("slurm/modded/build_flash_attn.sh", FA_VERSION="5")
    assert bad.returncode == 2 and "FA_VERSION must be 2, 3 or 4, got '5'" in bad.stderr


def test_build_flash_attn_checks_its_requirements_first(tmp_path):
    source = write_fake_flash_attention(tmp_path / "flash-attention")
    proc = run_script("slurm/modded/build_flash_attn.sh", FA_VERSION="2", FLASH_ATTN_SRC=source,
                      **{**pip_target_env(tmp_path / "site"), "BUILD_REQUIRES": "json no_such_module cmd:no_such_command"})
    assert proc.returncode == 2
    assert "the build needs no_such_module cmd:no_such_command (BUILD_REQUIRES)" in proc.stderr, proc.stderr
    assert "launch:" not in proc.stdout
    no_hopper = run_script("slurm/modded/build_flash_attn.sh", FA_VERSION="3", FLASH_ATTN_SRC=tmp_path)
    assert no_hopper.returncode == 2 and f"FLASH_ATTN_SRC={tmp_path} has no hopper/ folder" in no_hopper.stderr


def test_prepare_text_writes_shards_without_a_run_directory(tmp_path, text_source):
    out = tmp_path / "data" / "text_char"
    proc = run_script("slurm/prepare_text.sh", SOURCE=text_source, DATA_DIR=tmp_path / "data", RUNS_DIR=tmp_path / "runs")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "corpus.json").read_text())["tokenizer"] == "char"
    assert f"prepared: {out}" in proc.stdout and "run_dir: none" in proc.stdout
    assert not (tmp_path / "runs").exists()


# ---- submitted to the local Slurm cluster ----------------------------------------------------------------

@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_sbatch_prepare_shakespeare_downloads_from_a_local_server(slurm_cluster, tmp_path):
    text = "".join(f"{name}: to be or not to be, line {i}.\n" for i in range(400) for name in ("ROMEO", "JULIET"))
    server = TextServer({"input.txt": text.encode()})
    try:
        job_id = sbatch_script(slurm_cluster, tmp_path, "slurm/nanogpt/prepare_shakespeare.sh",
                               DATA_DIR=tmp_path / "data", URL=f"{server.url}/input.txt")
        state = slurm_cluster.wait(job_id, timeout=300)
    finally:
        server.close()
    log = job_log(tmp_path, job_id)
    assert state == "COMPLETED", log
    out = tmp_path / "data" / "shakespeare_char"
    assert server.requests == ["input.txt"] and (out / "input.txt").read_text() == text
    meta = pickle.loads((out / "meta.pkl").read_bytes())
    train, val = np.fromfile(out / "train.bin", dtype="<u2"), np.fromfile(out / "val.bin", dtype="<u2")
    assert len(train) + len(val) == len(text) and meta["vocab_size"] == len(set(text))
    assert f"launch: srun --nodes=1 --ntasks=1 --cpus-per-task=2 --kill-on-bad-exit=1 python -m " \
           f"nanogpt.data.shakespeare_char --out {out} --url {server.url}/input.txt" in log
    assert f"prepared: {out}" in log and "run_dir: none" in log


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_sbatch_prepare_openwebtext_tokenizes_local_files(slurm_cluster, tmp_path):
    documents = [f"document {i}: hello world, the world said hello {i * 7}" for i in range(40)]
    source = tmp_path / "owt"
    source.mkdir()
    for part in range(2):
        (source / f"part{part}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[part::2]))
    write_gpt2_files(tmp_path / "gpt2")
    job_id = sbatch_script(slurm_cluster, tmp_path, "slurm/nanogpt/prepare_openwebtext.sh", "--cpus-per-task=2",
                           DATA_DIR=tmp_path / "data", DATA_FILES=f"{source}/*.jsonl", CACHE_DIR=tmp_path / "hf",
                           NANOGPT_GPT2_TOKENIZER_DIR=tmp_path / "gpt2", TIKTOKEN_CACHE_DIR=tmp_path / "tiktoken",
                           EXTRA_ARGS="--val_fraction 0.1", HF_DATASETS_OFFLINE=1)
    state = slurm_cluster.wait(job_id, timeout=300)
    log = job_log(tmp_path, job_id)
    assert state == "COMPLETED", log
    out = tmp_path / "data" / "openwebtext"
    tokens = np.concatenate([np.fromfile(out / f"{split}.bin", dtype="<u2") for split in ("train", "val")])
    eot = json.loads((tmp_path / "gpt2" / "encoder.json").read_text())["<|endoftext|>"]
    assert int((tokens == eot).sum()) == len(documents)  # every document, each ended by end-of-text
    assert "--num_proc 2" in log and f"prepared: {out}" in log


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_sbatch_prepare_fineweb_downloads_from_a_local_hub(slurm_cluster, tmp_path):
    from tests.test_modded_download import LocalHub, shard_bytes

    files = {"fineweb_val_000000.bin": shard_bytes(300, seed=0), "fineweb_train_000001.bin": shard_bytes(500, seed=1),
             "fineweb_train_000002.bin": shard_bytes(700, seed=2)}
    hub = LocalHub(files)
    try:
        job_id = sbatch_script(slurm_cluster, tmp_path, "slurm/modded/prepare_fineweb.sh", DATA_DIR=tmp_path / "data",
                               FINEWEB_CHUNKS=2, HF_ENDPOINT=hub.url, HF_HOME=tmp_path / "hf",
                               HF_HUB_DISABLE_TELEMETRY=1)
        state = slurm_cluster.wait(job_id, timeout=300)
    finally:
        hub.close()
    log = job_log(tmp_path, job_id)
    assert state == "COMPLETED", log
    out = tmp_path / "data" / "fineweb10B"
    for name, body in files.items():
        assert (out / name).read_bytes() == body
    assert f"hub: {hub.url}" in log and f"prepared: {out}" in log


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_sbatch_prepare_text_and_build_flash_attn(slurm_cluster, tmp_path, text_source):
    source = write_fake_flash_attention(tmp_path / "flash-attention")
    prep = sbatch_script(slurm_cluster, tmp_path, "slurm/prepare_text.sh", DATA_DIR=tmp_path / "data",
                         SOURCE=text_source, TOKENIZER="bpe", VOCAB_SIZE=300)
    build = sbatch_script(slurm_cluster, tmp_path, "slurm/modded/build_flash_attn.sh", "--gres=gpu:a100:1",
                          "--cpus-per-task=3", FLASH_ATTN_SRC=source, FLASH_ATTN_MODULE="fake_flash_attn",
                          **pip_target_env(tmp_path / "site"))
    for job_id in (prep, build):
        assert slurm_cluster.wait(job_id, timeout=300) == "COMPLETED", job_log(tmp_path, job_id)
    corpus = json.loads((tmp_path / "data" / "text_bpe" / "corpus.json").read_text())
    assert corpus["vocab_size"] <= 300
    log = job_log(tmp_path, build)
    # An a100 node: FA2 (FA3 is for Hopper), built for its compute capability with the job's CPUs.
    assert f"build: FlashAttention 2 from {source.resolve()} for compute capability 8.0 with MAX_JOBS=3" in log
    assert "built: import fake_flash_attn works (version 0.1" in log


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_sbatch_train_gpt2_and_train_speedrun(slurm_cluster, tmp_path, char_corpus):
    train = sbatch_script(slurm_cluster, tmp_path, "slurm/nanogpt/train_gpt2.sh", "--gres=gpu:h100:2",
                          RECIPE="tiny_cpu", DATASET_DIR=char_corpus, DEVICE="cpu", NPROC_PER_NODE=2,
                          RUNS_DIR=tmp_path / "runs", EXTRA_ARGS=TINY)
    refused = sbatch_script(slurm_cluster, tmp_path, "slurm/modded/train_speedrun.sh", "--gres=gpu:h100:3",
                            RECIPE="tiny_cpu", DATASET_DIR=char_corpus, RUNS_DIR=tmp_path / "runs")
    speedrun = sbatch_script(slurm_cluster, tmp_path, "slurm/modded/train_speedrun.sh", "--gres=gpu:a100:1",
                             "--cpus-per-task=2", RECIPE="tiny_cpu", DATASET_DIR=char_corpus, DEVICE="cpu",
                             RUNS_DIR=tmp_path / "runs", EXTRA_ARGS=TINY_MODDED)
    assert slurm_cluster.wait(refused, timeout=300) == "FAILED"
    assert "the speedrun trainer runs on 1, 2, 4 or 8 GPUs (processes), got 3 GPUs" in job_log(tmp_path, refused)
    state = slurm_cluster.wait(train, timeout=300)
    log = job_log(tmp_path, train)
    assert state == "COMPLETED", log
    assert "launch: srun --nodes=1 --ntasks=1 --cpus-per-task=8 --kill-on-bad-exit=1 torchrun --standalone " \
           "--nproc-per-node=2" in log
    end = read_metrics(tmp_path / "runs" / f"train_gpt2-{train}")[-1]
    assert end["kind"] == "end" and end["world_size"] == 2 and end["step"] == 20
    state = slurm_cluster.wait(speedrun, timeout=300)
    assert state == "COMPLETED", job_log(tmp_path, speedrun)
    assert read_metrics(tmp_path / "runs" / f"train_speedrun-{speedrun}")[-1]["kind"] == "end"


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_sbatch_job_signalled_in_its_batch_shell_requeues_and_resumes_to_the_same_result(
        slurm_cluster, tmp_path, char_corpus):
    knobs = dict(RECIPE="tiny_cpu", DATASET_DIR=char_corpus, DEVICE="cpu", RUNS_DIR=tmp_path / "runs",
                 EXTRA_ARGS="--max_iters=400 --eval_interval=100 --eval_iters=4")
    # Two ranks either way: one per node on two nodes, or two on one node (the same math, bit for bit).
    reference = sbatch_script(slurm_cluster, tmp_path, "slurm/nanogpt/train_gpt2.sh", "--gres=gpu:a100:2",
                              "--cpus-per-task=2", RUN_NAME="reference", NPROC_PER_NODE=2, **knobs)
    preempted = sbatch_script(slurm_cluster, tmp_path, "slurm/nanogpt/train_gpt2.sh", "--nodes=2",
                              "--gres=gpu:h100:1", "--cpus-per-task=1", RUN_NAME="preempted", **knobs)
    run_dir = tmp_path / "runs" / "preempted"
    wait_for_step(run_dir, 120)
    # What Slurm does 120 s before the time limit (#SBATCH --signal=B:USR1@120), by hand: the batch shell
    # passes it to srun, srun to the torchrun of each node, torchrun to its trainer process.
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(preempted)], check=True, timeout=60)
    for job_id in (reference, preempted):
        assert slurm_cluster.wait(job_id, timeout=300) == "COMPLETED", job_log(tmp_path, job_id)
    log = job_log(tmp_path, preempted)
    stops = [m for m in read_metrics(run_dir) if m["kind"] == "stop"]
    assert len(stops) == 1 and stops[0]["reason"] == "signal SIGUSR1", log
    assert f"requeue: the trainer stopped on signal SIGUSR1 after a checkpoint; requeueing job {preempted}" in log
    assert f"resumed from step {stops[0]['step']}" in log and log.count("==== job provenance") == 2, log
    assert log.count("launch: srun --nodes=2 --ntasks-per-node=1") == 2 and "forwarding SIGUSR1" in log, log
    history = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-j", str(preempted), "-o", "State"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert history == ["REQUEUED", "COMPLETED"], history
    assert curve(run_dir) == curve(tmp_path / "runs" / "reference")
    assert curve(run_dir)[-1][:2] == ("end", 400)
    assert read_metrics(run_dir)[-1]["world_size"] == 2


@pytest.mark.slurm
@pytest.mark.timeout(900)
def test_a_speedrun_preempted_three_times_requeues_each_time_and_ends_as_the_uninterrupted_run(
        slurm_cluster, tmp_path, char_corpus):
    """The speedrun under three preemption notices (what --signal=B:USR1@N sends before a time limit, by hand):
    each stop is taken as one, the job requeues itself three times and the run finishes with the curve of an
    uninterrupted run. (Before, the second stop of a resumed speedrun ended the job as COMPLETED, unfinished.)"""
    knobs = dict(RECIPE="tiny_cpu", DATASET_DIR=char_corpus, DEVICE="cpu", RUNS_DIR=tmp_path / "runs",
                 EXTRA_ARGS="--num_iterations=90 --extension_iterations=0 --val_every=30 --val_tokens=2048")
    reference = sbatch_script(slurm_cluster, tmp_path, "slurm/modded/train_speedrun.sh", "--gres=gpu:a100:1",
                              "--cpus-per-task=1", RUN_NAME="reference", **knobs)
    preempted = sbatch_script(slurm_cluster, tmp_path, "slurm/modded/train_speedrun.sh", "--gres=gpu:h100:1",
                              "--cpus-per-task=1", RUN_NAME="preempted", **knobs)
    run_dir = tmp_path / "runs" / "preempted"
    for n, at in enumerate((10, 35, 60), start=1):
        wait_for_step(run_dir, at, timeout=400)  # from the second on: the requeued job has resumed and trained
        subprocess.run(["scancel", "--signal=USR1", "--batch", str(preempted)], check=True, timeout=60)
        deadline = time.monotonic() + 120
        while sum(m["kind"] == "stop" for m in read_metrics(run_dir)) < n and time.monotonic() < deadline:
            time.sleep(0.2)
    for job_id in (reference, preempted):
        assert slurm_cluster.wait(job_id, timeout=600) == "COMPLETED", job_log(tmp_path, job_id)
    log = job_log(tmp_path, preempted)
    stops = [m for m in read_metrics(run_dir) if m["kind"] == "stop"]
    assert len(stops) == 3 and all(m["reason"] == "signal SIGUSR1" for m in stops), log
    assert log.count(f"requeueing job {preempted}") == 3, log
    for stop in stops:
        assert f"resumed from step {stop['step']}" in log, log
    history = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-j", str(preempted), "-o", "State"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert history == ["REQUEUED"] * 3 + ["COMPLETED"], history
    assert curve(run_dir) == curve(tmp_path / "runs" / "reference")
    assert curve(run_dir)[-1][:2] == ("end", 90)


def test_the_training_scripts_build_the_trainer_command_line_in_one_place():
    """Both trainers take `RECIPE --key=value`, so the three training scripts hand their knobs to one function of
    the shared prologue (run_trainer); the speedrun's script used to build `--recipe=` itself."""
    scripts = {name: (REPO_ROOT / name).read_text() for name in (
        "slurm/nanogpt/train_shakespeare.sh", "slurm/nanogpt/train_gpt2.sh", "slurm/modded/train_speedrun.sh")}
    for name, text in scripts.items():
        code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        assert sum(line.startswith("run_trainer ") for line in code) == 1, name
        assert not any(word in line for line in code for word in ("--recipe", "launch_trainer", "<<<\"$EXTRA_ARGS")), name
