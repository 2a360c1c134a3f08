"""The launcher (python -m slurm.submit) without a Slurm cluster: plans printed by --dry-run, the checks that
refuse a request before anything is submitted, and real runs on this machine with --cluster local (submitit's
local executor runs the same sbatch scripts from the code snapshot). The slurm tier (test_slurm_submit.py)
runs the same commands against the local cluster."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slurm import plans
from tests.fixtures import read_metrics
from tests.slurm_cluster import REPO_ROOT


def launcher_env(**extra) -> dict:
    """This environment without a reachable cluster: no SLURM_CONF (sinfo then fails at once) and no job variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RUNS_DIR", "DATA_DIR")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launcher(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slurm.submit", *map(str, args)], cwd=REPO_ROOT,
                          env=env or launcher_env(), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def roots(tmp_path) -> dict:
    return {"runs": tmp_path / "runs", "data": tmp_path / "data"}


def dry_run(roots, *args) -> str:
    proc = launcher(*args, "--dry-run", "--cluster", "slurm", "--runs-dir", roots["runs"], "--data-root", roots["data"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not roots["runs"].exists(), "a dry run wrote something"
    return proc.stdout


def planned_tasks(output: str) -> dict[str, dict[str, str]]:
    """task label -> its knobs, from a dry run's output."""
    tasks, label = {}, None
    for line in output.splitlines():
        if match := re.match(r"  task (\S+)", line):
            label = match.group(1)
        elif line.startswith("    knobs: ") and label:
            tasks[label] = dict(item.split("=", 1) for item in shlex.split(line.removeprefix("    knobs: ")))
    return tasks


def planned_parameters(output: str) -> dict[str, dict]:
    """job name -> its submitit parameters, from a dry run's output."""
    params, name = {}, None
    for line in output.splitlines():
        if match := re.match(r"^(\S+): (?:job|array of \d+), ", line):
            name = match.group(1)
        elif line.startswith("  submitit parameters: ") and name:
            params[name] = json.loads(line.removeprefix("  submitit parameters: "))
    return params


# ---- dry runs: what would be submitted ------------------------------------------------------------------


def test_dry_run_of_a_seed_array_plans_prep_first_and_names_the_skipped_checks(roots, text_source):
    out = dry_run(roots, "train", "baseline", "--gpu-type", "h100", "--num-gpus", "2", "--seeds", "1,2",
                  "--data", "text", "--source", text_source, "--device", "cpu", "--recipe", "tiny_cpu",
                  "--set", "max_iters=20")
    params = planned_parameters(out)
    assert list(params) == ["prep-text", "baseline"]  # data first, training waits on it
    assert params["baseline"]["slurm_additional_parameters"]["dependency"] == "afterok:<prep-text>"
    assert params["baseline"]["slurm_gres"] == "gpu:h100:2" and params["baseline"]["cpus_per_task"] == 16
    assert params["baseline"]["slurm_use_srun"] is False and params["baseline"]["slurm_signal_delay_s"] == 120
    assert "slurm_gres" not in params["prep-text"]  # preparation asks for no GPU
    tasks = planned_tasks(out)
    assert tasks["prep-text"]["OUT_DIR"] == str(roots["data"] / "text_char")
    assert tasks["prep-text"]["SOURCE"] == str(text_source)
    seed1, seed2 = tasks["baseline-seed1"], tasks["baseline-seed2"]
    assert seed1["EXTRA_ARGS"] == "--max_iters=20 --seed=1" and seed2["EXTRA_ARGS"] == "--max_iters=20 --seed=2"
    assert seed1["DATASET_DIR"] == str(roots["data"] / "text_char") and seed1["RECIPE"] == "tiny_cpu"
    assert seed1["RUN_DIR"].startswith(str(roots["runs"])) and seed1["RUN_DIR"].endswith("-train-baseline/baseline-seed1")
    assert seed1["NPROC_PER_NODE"] == "2" and seed1["DEVICE"] == "cpu"  # one CPU process per requested GPU
    assert seed1["REPO_DIR"].endswith("/code")  # jobs run the snapshot
    assert "skipped checks (need a reachable Slurm cluster; sinfo failed" in out


def test_dry_run_of_an_ablation_is_one_array_of_variants_times_seeds(roots, char_corpus):
    out = dry_run(roots, "ablate", "--features", "value_embeds,mlp_activation,paired_head_layers", "--seeds", "2",
                  "--gpu-type", "h100", "--num-gpus", "8", "--data-dir", char_corpus)
    params = planned_parameters(out)
    assert list(params) == ["ablate"]  # the data exists: no preparation job
    assert "array of 8" in out
    tasks = planned_tasks(out)
    expected = {"full": "", "no_value_embeds": "--value_embeds=False", "no_mlp_activation": "--mlp_activation=gelu",
                "no_paired_head_layers": "--paired_head_layers=none"}
    assert sorted(tasks) == sorted(f"ablate-{variant}-seed{seed}" for variant in expected for seed in (1, 2))
    for variant, flag in expected.items():
        for seed in (1, 2):
            assert tasks[f"ablate-{variant}-seed{seed}"]["EXTRA_ARGS"] == f"--seed={seed} {flag}".strip()
    assert all("RECIPE" not in knobs for knobs in tasks.values())  # empty: the speedrun's own defaults

    everything = planned_tasks(dry_run(roots, "ablate", "--features", "all", "--gpu-type", "h100", "--num-gpus", "1",
                                       "--data-dir", char_corpus))
    assert len(everything) == 1 + len(plans.ABLATIONS)


def test_dry_run_of_a_comparison_trains_both_on_the_same_data(roots, char_corpus):
    out = dry_run(roots, "compare", "--seeds", "1,3", "--gpu-type", "a100", "--num-gpus", "4", "--data-dir",
                  char_corpus, "--recipe", "tiny_cpu", "--baseline-set", "max_iters=30")
    tasks = planned_tasks(out)
    assert sorted(tasks) == ["baseline-seed1", "baseline-seed3", "modded-seed1", "modded-seed3", "report"]
    assert {tasks[t]["DATASET_DIR"] for t in tasks if t != "report"} == {str(char_corpus)}
    assert tasks["baseline-seed1"]["EXTRA_ARGS"] == "--max_iters=30 --seed=1"
    assert tasks["modded-seed3"]["EXTRA_ARGS"] == "--seed=3"
    assert tasks["baseline-seed1"]["RUN_DIR"].rsplit("/", 1)[0] == tasks["modded-seed1"]["RUN_DIR"].rsplit("/", 1)[0]


@pytest.mark.parametrize(
    ("args", "script", "knobs"),
    [
        (["fineweb", "--chunks", "3"], "slurm/modded/prepare_fineweb.sh", {"FINEWEB_CHUNKS": "3", "OUT_DIR": "fineweb10B"}),
        (["shakespeare_char"], "slurm/nanogpt/prepare_shakespeare.sh", {"TOKENIZER": "char", "OUT_DIR": "shakespeare_char"}),
        (["shakespeare", "--url", "http://mirror/input.txt"], "slurm/nanogpt/prepare_shakespeare.sh",
         {"TOKENIZER": "gpt2", "URL": "http://mirror/input.txt", "OUT_DIR": "shakespeare"}),
        (["openwebtext", "--data-files", "/shared/owt/*.jsonl"], "slurm/nanogpt/prepare_openwebtext.sh",
         {"DATA_FILES": "/shared/owt/*.jsonl", "OUT_DIR": "openwebtext"}),
        (["text", "--tokenizer", "bpe", "--vocab-size", "512", "--data-name", "mine"], "slurm/prepare_text.sh",
         {"TOKENIZER": "bpe", "VOCAB_SIZE": "512", "OUT_DIR": "mine"}),
    ],
)
def test_dry_run_of_each_preparation(roots, args, script, knobs):
    out = dry_run(roots, "prep", *args)
    assert f"prep-{args[0]}: job, {script}" in out
    task = planned_tasks(out)[f"prep-{args[0]}"]
    for key, value in knobs.items():
        assert task[key] == (str(roots["data"] / value) if key == "OUT_DIR" else value), (key, task)


@pytest.mark.parametrize(("gpu_type", "num_gpus", "nodes", "micro_batch"),
                         [("h100", 8, 1, "64"), ("h100", 8, 2, "32"), ("a100", 8, 1, "16"), ("h100", 8, 4, "16")])
def test_baseline_micro_batch_comes_from_gpus_tsv_and_fits_the_total_batch(roots, char_corpus, gpu_type, num_gpus,
                                                                             nodes, micro_batch):
    # train_gpt2_fineweb: 524,288 tokens per step of 1024-token sequences, split over every GPU.
    out = dry_run(roots, "train", "baseline", "--gpu-type", gpu_type, "--num-gpus", num_gpus, "--nodes", nodes,
                  "--data-dir", char_corpus)
    assert planned_tasks(out)["baseline"]["MICRO_BATCH"] == micro_batch


def test_dry_run_of_a_flash_attention_build(roots, tmp_path):
    (tmp_path / "fa" / "hopper").mkdir(parents=True)
    out = dry_run(roots, "build-flash-attn", "--gpu-type", "h100", "--fa-version", "3", "--src", tmp_path / "fa",
                  "--cpus", "32")
    params = planned_parameters(out)["build-flash-attn"]
    assert params["slurm_gres"] == "gpu:h100:1" and params["cpus_per_task"] == 32
    task = planned_tasks(out)["build-flash-attn"]
    assert task["FA_VERSION"] == "3" and task["FLASH_ATTN_SRC"] == str(tmp_path / "fa")


# ---- refused before submission ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "baseline", "--gpu-type", "b200"], "unknown GPU type 'b200': slurm/gpus.tsv knows h100_pcie"),
        (["train", "modded", "--gpu-type", "h100", "--num-gpus", "3"],
         "the modded trainer runs on 1, 2, 4, 8 GPUs, got --num-gpus 3"),
        (["train", "modded", "--gpu-type", "h100", "--num-gpus", "4", "--nodes", "2"],
         "the modded trainer runs on one node, got --nodes 2"),
        (["train", "baseline", "--gpu-type", "h100", "--data-dir", "MISSING"], "missing data directory: --data-dir"),
        (["train", "baseline", "--gpu-type", "h100", "--env-path", "MISSING"], "missing environment: ENV_PATH="),
        (["train", "baseline", "--gpu-type", "h100", "--recipe", "no_such_recipe"],
         "--recipe no_such_recipe: not a recipe of the baseline trainer"),
        (["train", "baseline", "--gpu-type", "h100", "--set", "max_iters"], "--set 'max_iters': expected KEY=VALUE"),
        (["train", "baseline", "--gpu-type", "h100", "--seeds", "1,1"], "--seeds '1,1' repeats a seed"),
        (["train", "baseline", "--gpu-type", "h100", "--chunks", "200"], "--chunks 200: FineWeb10B has 103 train shards"),
        (["train", "baseline", "--gpu-type", "h100", "--data", "text", "--chunks", "2"],
         "--chunks does not apply to the text data"),
        (["ablate", "--features", "smear,wings", "--gpu-type", "h100"], "--features: unknown wings; the ablations are"),
        (["build-flash-attn", "--gpu-type", "h100", "--fa-version", "3"], "--fa-version 3 builds from a flash-attention"),
        (["build-flash-attn", "--gpu-type", "h100", "--fa-version", "4", "--src", "."],
         "--fa-version 4 installs wheels (pip), not a checkout: drop --src"),
        (["train", "baseline", "--gpu-type", "h100", "--nodes", "2", "--cluster", "local"],
         "--nodes 2 needs a Slurm cluster"),
        (["train", "baseline", "--gpu-type", "h100", "--num-gpus", "8", "--micro-batch", "128"],
         "total_batch_size=524288 tokens does not split over 8 GPUs with micro-batch 128 x block 1024"),
    ],
)
def test_bad_requests_are_refused_before_anything_is_submitted(roots, tmp_path, args, message):
    args = [str(tmp_path / "missing") if arg == "MISSING" else arg for arg in args]
    proc = launcher(*args, "--runs-dir", roots["runs"], "--data-root", roots["data"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr
    assert proc.stderr.rstrip().endswith("error: nothing was submitted")
    assert not (roots["runs"] / "submissions").exists()


def test_parsers():
    assert [plans.parse_time_min(t) for t in ("30", "01:30:00", "45:30", "1-00", "2-01:00:00")] == [
        30, 90, 46, 1440, 2940]
    assert plans.parse_seeds("3", count_allowed=True) == [1, 2, 3]
    assert plans.parse_seeds("3", count_allowed=False) == [3]
    assert plans.parse_seeds("7,2", count_allowed=True) == [7, 2]
    assert plans.parse_overrides(["max_iters=10", "lr=3e-4"]) == ["--max_iters=10", "--lr=3e-4"]
    for bad in (["x y=1"], ["a=b c"], ["=1"], ["a="]):
        with pytest.raises(plans.LaunchError):
            plans.parse_overrides(bad)
    with pytest.raises(plans.LaunchError):
        plans.parse_time_min("soon")


def test_sinfo_gres_parsing_counts_nodes_once_and_skips_untyped_gpus():
    text = "h100-1|gpu:h100:8(S:0-1)\nh100-1|gpu:h100:8(S:0-1)\nh100-2|gpu:h100:4\nmix-1|gpu:a100:2,gpu:h100:2\ncpu-1|(null)\nold-1|gpu:8\n"
    assert plans.parse_sinfo(text) == {"h100": (3, 8), "a100": (1, 2)}


# ---- --cluster local: the jobs run on this machine, one after the other -----------------------------------


def test_local_cluster_prepares_then_trains_a_seed_array_from_the_snapshot(roots, text_source):
    proc = launcher("train", "baseline", "--cluster", "local", "--gpu-type", "h100", "--seeds", "1,2",
                    "--runs-dir", roots["runs"], "--data-root", roots["data"], "--data", "text", "--source", text_source,
                    "--device", "cpu", "--recipe", "tiny_cpu", "--set", "max_iters=20", "--set", "eval_interval=10",
                    "--set", "eval_iters=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest_path = next(roots["runs"].glob("submissions/*/manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    assert [job["name"] for job in manifest["jobs"]] == ["prep-text", "baseline"]
    tasks = [task for job in manifest["jobs"] for task in job["tasks"]]
    assert [task["state"] for task in tasks] == ["COMPLETED"] * 3
    assert (roots["data"] / "text_char" / "corpus.json").is_file()
    for seed, task in zip((1, 2), tasks[1:], strict=True):
        run_dir = Path(task["run_dir"])
        assert run_dir.name == f"baseline-seed{seed}" and run_dir.parent.name == manifest["submission"]
        assert json.loads((run_dir / "config.json").read_text())["seed"] == seed
        assert read_metrics(run_dir)[-1]["kind"] == "end"
        assert Path(task["log"]).is_file() and "launch: python -m nanogpt.train tiny_cpu" in Path(task["log"]).read_text()
    # The snapshot: the tracked sources, none of the ignored run output, and what the code was.
    code = Path(manifest["code"]["snapshot"])
    assert (code / "slurm" / "common.sh").is_file() and (code / "nanogpt" / "train.py").is_file()
    assert not (code / "runs").exists() and not (code / ".git").exists()
    snapshot = json.loads((code / ".snapshot.json").read_text())
    assert snapshot["source"] == str(REPO_ROOT) and len(snapshot["git_sha"]) == 40
    assert "(snapshot)" in Path(tasks[1]["log"]).read_text()  # the job's provenance names it

    status = launcher("status", "--runs-dir", roots["runs"])
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("COMPLETED") == 3 and "done at step 20, final val loss" in status.stdout
    logs = launcher("logs", manifest["submission"], "--runs-dir", roots["runs"], "--job", "baseline-seed2", "--tail", "3")
    assert logs.returncode == 0 and tasks[2]["log"] in logs.stdout and tasks[1]["log"] not in logs.stdout


def test_resume_submits_a_stopped_run_again_and_it_goes_on(roots, char_corpus):
    """A run that stopped unfinished (max_train_minutes here; a time limit without requeue on a cluster) is
    continued by `resume`: the recorded script, knobs and snapshot run again and resume from the newest
    checkpoint; finished runs are left alone. There was no launcher path to continue a stopped run."""
    proc = launcher("train", "modded", "--cluster", "local", "--gpu-type", "h100", "--runs-dir", roots["runs"],
                    "--data-dir", char_corpus, "--device", "cpu", "--recipe", "tiny_cpu", "--set", "num_iterations=60",
                    "--set", "extension_iterations=0", "--set", "val_every=0", "--set", "val_tokens=2048",
                    "--set", "max_train_minutes=0.003")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest_path = next(roots["runs"].glob("submissions/*/manifest.json"))
    submission = json.loads(manifest_path.read_text())["submission"]
    task = json.loads(manifest_path.read_text())["jobs"][0]["tasks"][0]
    first = read_metrics(Path(task["run_dir"]))[-1]
    assert first["kind"] == "stop" and first["reason"] == "max_train_minutes" and first["step"] < 60, first
    assert launcher("status", submission, "--runs-dir", roots["runs"]).returncode == 1  # UNFINISHED
    resumed = launcher("resume", submission, "--runs-dir", roots["runs"], "--job", "modded")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "modded: resubmitted as job" in resumed.stdout and f"resuming from step {first['step']}" in resumed.stdout
    task = json.loads(manifest_path.read_text())["jobs"][0]["tasks"][0]
    assert task["previous"][0]["job_id"] != task["job_id"]
    assert f"resumed from step {first['step']}" in Path(task["log"]).read_text()
    second = read_metrics(Path(task["run_dir"]))[-1]
    assert second["kind"] in ("stop", "end") and second["step"] > first["step"], second
    bad = launcher("resume", submission, "--runs-dir", roots["runs"], "--job", "no-such-task")
    assert bad.returncode == 2 and "--job no-such-task: no task of submission" in bad.stderr


def test_local_cluster_failure_names_the_log(roots, char_corpus):
    proc = launcher("train", "baseline", "--cluster", "local", "--gpu-type", "h100", "--runs-dir", roots["runs"],
                    "--data-dir", char_corpus, "--device", "cpu", "--recipe", "tiny_cpu", "--set", "no_such_key=1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    match = re.search(r"error: baseline failed: .*ScriptFailed: .*train_gpt2.sh \(baseline\) ended with status 2.*; log: (\S+)", proc.stderr)
    assert match, proc.stderr
    assert "no_such_key" in Path(match.group(1)).read_text()
    status = launcher("status", "--runs-dir", roots["runs"])
    assert status.returncode == 1 and "FAILED" in status.stdout and match.group(1) in status.stdout


def test_status_reports_a_run_that_stopped_unfinished(tmp_path):
    """A job can end well (COMPLETED) after its trainer stopped on a signal without being requeued (requeue off,
    or MAX_REQUEUES reached): the run is unfinished, and status says so, says how to resume, and exits 1
    (it used to print COMPLETED and exit 0). A run whose newest record is its end stays COMPLETED."""
    runs = tmp_path / "runs"
    tasks = []
    for label, records in (("finished", [{"kind": "stop", "step": 3}, {"kind": "end", "step": 9}]),
                           ("stopped", [{"kind": "train", "step": 3}, {"kind": "stop", "step": 3,
                                                                        "reason": "signal SIGUSR1"}])):
        run_dir = runs / label
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        tasks.append({"label": label, "job_id": str(len(tasks) + 1), "run_dir": str(run_dir), "out_dir": None,
                      "log": str(tmp_path / f"{label}.log"), "knobs": {}, "state": "COMPLETED"})
    manifest = {"submission": "s1", "cluster": "local", "jobs": [{"name": "train", "tasks": tasks}]}
    (runs / "submissions" / "s1").mkdir(parents=True)
    (runs / "submissions" / "s1" / "manifest.json").write_text(json.dumps(manifest))
    proc = launcher("status", "s1", "--runs-dir", runs)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert re.search(r"finished\s+COMPLETED\s+done at step 9", proc.stdout), proc.stdout
    assert re.search(r"stopped\s+UNFINISHED\s+stopped at step 3 \(signal SIGUSR1\)", proc.stdout), proc.stdout
    assert any(f"python -m slurm.submit resume s1 --job stopped resumes it (RUN_DIR={runs / 'stopped'})" in line
               for line in lines), proc.stdout
    assert "1 run(s) stopped before their last step" in proc.stderr


@pytest.mark.parametrize("damage, message", [
    ("truncate", "header says"), ("magic", "bad magic number 12345 (expected 20240520)"),
])
def test_a_damaged_shard_is_refused_before_submission(roots, tmp_path, char_corpus, damage, message):
    """The launcher checks the headers and sizes of the token files a job would read (it found a truncated shard
    or a bad magic only inside the job, after the queue wait): one line per bad file, nothing submitted."""
    import numpy as np

    data = tmp_path / "data_copy"
    shutil.copytree(char_corpus, data)
    shard = sorted(data.glob("*train*.bin"))[0]
    if damage == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 100)
    else:
        header = np.fromfile(shard, dtype="<i4", count=256)
        header[0] = 12345
        with open(shard, "r+b") as f:
            f.write(header.tobytes())
    proc = launcher("train", "baseline", "--gpu-type", "h100", "--data-dir", data, "--runs-dir", roots["runs"],
                    "--data-root", roots["data"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "bad token files" in proc.stderr and f"{shard}: {message}" in proc.stderr, proc.stderr
    assert not (roots["runs"] / "submissions").exists()


def test_an_unwritable_runs_directory_is_refused_in_one_line(roots, tmp_path, char_corpus):
    """--runs-dir that cannot be written (here: under a file; root ignores read-only bits) used to end in a
    traceback of the launcher; now one line, nothing submitted."""
    (tmp_path / "a_file").write_text("")
    runs = tmp_path / "a_file" / "runs"
    proc = launcher("train", "baseline", "--gpu-type", "h100", "--cluster", "local", "--data-dir", char_corpus,
                    "--runs-dir", runs, "--data-root", roots["data"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot write to the runs directory {runs}: Not a directory" in proc.stderr
    assert proc.stderr.rstrip().endswith("error: nothing was submitted")


def test_one_ablation_table_serves_the_launcher_the_trainer_and_the_report(monkeypatch):
    """slurm.plans.ABLATIONS (feature -> its value switched off) was written again in slurm/report.py as
    ABLATION_OFF. Now: each override the launcher submits parses, in the speedrun trainer, to the table's value,
    which differs from the default, and the report finds ablations by that same table."""
    from modded_nanogpt.train_gpt import parse_hyperparameters
    from slurm import report

    monkeypatch.delenv("DISABLE_FP8", raising=False)
    assert report.ABLATIONS is plans.ABLATIONS
    default = parse_hyperparameters([])
    for feature, off in plans.ABLATIONS.items():
        override = plans.ablation_override(feature)
        assert override.startswith(f"--{feature}=") and " " not in override, override
        assert getattr(parse_hyperparameters([override]), feature) == off != getattr(default, feature), feature
    assert plans.ablation_override("paired_head_layers") == "--paired_head_layers=none"
    assert plans.ablation_override("value_embeds") == "--value_embeds=False"
