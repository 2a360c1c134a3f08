"""`python -m slurm.demo`, the README's first command: corpus -> baseline and modded runs over seeds -> report
-> a sample; its errors before any work; and the Slurm version on the local cluster."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from slurm import demo
from tests.fixtures import read_metrics, run_module


def test_quick_demo_trains_both_trainers_over_seeds_and_reports(text_source, tmp_path):
    proc = run_module("slurm.demo", "--quick", "--seeds", "2", "--source", text_source, "--data_dir",
                      tmp_path / "data", "--runs_dir", tmp_path / "runs", "--name", "d", "--device", "cpu",
                      timeout=900)
    out = proc.stdout
    folder = tmp_path / "runs" / "d"
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert names == ["baseline-seed1", "baseline-seed2", "modded-seed1", "modded-seed2", "report"]
    for name in names[:-1]:
        records = read_metrics(folder / name)
        assert records[-1]["kind"] == "end", name
        config = json.loads((folder / name / "config.json").read_text())
        assert config["seed"] == int(name[-1]) and config["data_dir"] == str(tmp_path / "data")
    # The steps are announced in order, the trainers' step lines stream through, the report table is printed.
    steps = re.findall(r"^\[(\d+)/7\]", out, flags=re.M)
    assert steps == [str(i) for i in range(1, 8)]
    assert re.search(r"^  baseline seed 1 \| step 50/150", out, flags=re.M)
    assert re.search(r"^  modded seed 2 \| step:20/40 val_loss", out, flags=re.M)
    assert "SMOKE TEST (--quick)" in out.split("The comparison")[0]  # --quick says its numbers compare nothing
    table = out.split("The comparison (baseline vs speedrun-style, 2 seed(s) each")[1]
    # group, parameters (all, and without embeddings and head), runs
    for group in ("baseline", "modded"):  # one name for the baseline, as in the run names
        assert re.search(rf"^{group}\s+[\d.]+[kM]? \([\d.]+[kM]?\)\s+2\s", table, flags=re.M), table
    assert f"Open {folder / 'report' / 'report.html'}" in out
    for name in ("report.html", "report.md", "val_loss_vs_time.png", "val_loss_vs_tokens.png"):
        assert (folder / "report" / name).stat().st_size > 0
    assert out.count("--- sample 1/1 ---") == 2  # one from each trainer
    assert "  baseline-seed1:" in out and "  modded-seed1:" in out
    # Each step's full output is kept beside the runs.
    assert "step 150/150" in (folder / "baseline-seed2.log").read_text()


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0"], "--seeds '0': give a count >= 1"),
    (["--seeds", "two"], "--seeds 'two'"),
    (["--seeds", "1,1"], "must be distinct"),
    (["--target", "0"], "--target 0.0: a val loss target must be > 0"),
    (["--on", "slurm"], "--on slurm needs --gpu-type"),
    (["--source", "/nonexistent/text"], "--source /nonexistent/text: not a folder"),
])
def test_bad_input_stops_before_any_work(tmp_path, args, message, capsys):
    status = demo.main([*args, "--runs_dir", str(tmp_path / "runs"), "--data_dir", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert status == 2 and message in err and "nothing was run" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_an_existing_demo_folder_is_never_overwritten(tmp_path, capsys):
    kept = tmp_path / "runs" / "mine" / "baseline-seed1" / "metrics.jsonl"
    kept.parent.mkdir(parents=True)
    kept.write_text("precious\n")
    status = demo.main(["--runs_dir", str(tmp_path / "runs"), "--name", "mine", "--data_dir", str(tmp_path / "data")])
    assert status == 2 and "already holds files" in capsys.readouterr().err
    assert kept.read_text() == "precious\n" and not (tmp_path / "data").exists()


def test_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    status = demo.main(["--device", "cuda", "--runs_dir", str(tmp_path / "runs")])
    assert status == 2 and "no CUDA GPU is visible" in capsys.readouterr().err


def test_a_failing_step_names_the_command_and_its_log(text_source, tmp_path, capsys):
    """A corpus folder holding something else: the preparer refuses, the demo stops there with its output."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.json").write_text("{}")
    (data / "train_000001.bin").write_bytes(b"x")
    status = demo.main(["--source", str(text_source), "--data_dir", str(data), "--runs_dir", str(tmp_path / "runs"),
                        "--name", "f", "--quick"])
    err = capsys.readouterr().err
    assert status == 1 and "nanogpt.data.text_corpus" in err and "exited with status" in err
    assert str(tmp_path / "runs" / "f" / "prepare.log") in err
    assert not (tmp_path / "runs" / "f" / "baseline-seed1").exists()


def test_a_corpus_too_small_to_validate_on_stops_before_training(tmp_path, capsys):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("a.py", "b.py", "c.py"):
        (source / name).write_text("x = 1\n" * 200)
    status = demo.main(["--source", str(source), "--data_dir", str(tmp_path / "data"), "--runs_dir",
                        str(tmp_path / "runs"), "--name", "small"])
    err = capsys.readouterr().err
    assert status == 1 and "fewer than the 40,961 the demo validates on; give a larger --source" in err
    assert sorted(p.name for p in (tmp_path / "runs" / "small").iterdir()) == ["prepare.log"]


def test_seed_lists(tmp_path):
    assert demo.parse_seeds("3") == [1, 2, 3]
    assert demo.parse_seeds("4,7") == [4, 7]


@pytest.mark.slurm
def test_demo_on_slurm_runs_the_comparison_as_jobs(slurm_cluster, text_source, tmp_path):
    """--on slurm: compare is submitted to the local cluster (fake typed GPUs, CPU runs), the demo waits while
    saying what it waits for, and prints the report of the submission."""
    data = tmp_path / "data" / "demo_corpus"
    proc = run_module("slurm.demo", "--on", "slurm", "--source", text_source, "--gpu-type", "a100", "--device", "cpu", "--quick", "--seeds", "1",
                      "--data_dir", data, "--runs_dir", tmp_path / "runs", "--cpus-per-gpu", "1", "--wait-minutes", "12",
                      timeout=1000, env={"ENV_PATH": os.environ.get("VIRTUAL_ENV", "")} if os.environ.get("VIRTUAL_ENV") else None)
    out = proc.stdout
    assert "waiting for" in out
    manifest_path = next((tmp_path / "runs" / "submissions").glob("*/manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    # The demo prepared the corpus before submitting (so no prep job); the jobs trained on it.
    assert [job["name"] for job in manifest["jobs"]] == ["baseline", "modded", "report"]
    assert json.loads((data / "corpus.json").read_text())["settings"]["doc_chars"] == demo.DOC_CHARS
    for name in ("baseline", "modded"):
        (task,) = next(job for job in manifest["jobs"] if job["name"] == name)["tasks"]
        assert read_metrics(Path(task["run_dir"]))[-1]["kind"] == "end"
    # Groups carry the submission's task labels here (baseline, modded), then their parameter counts.
    for group in ("baseline", "modded"):
        assert re.search(rf"^  {group}\s+[\d.]+[kM]? \([\d.]+[kM]?\)\s+1\s", out, flags=re.M), out
    assert (manifest_path.parent / "report" / "report.html").is_file()
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)


@pytest.mark.slurm
def test_with_a_cluster_answering_the_local_demo_offers_the_cluster_version(slurm_cluster):
    """What the local demo prints first and last where sinfo answers: the GPU types, and the command."""
    offer = demo.slurm_offer()
    assert offer is not None and "A Slurm cluster answers here" in offer
    assert "a100 (1 node)" in offer and "h100 (2 nodes)" in offer
    assert "python -m slurm.demo --on slurm --gpu-type a100" in offer


def test_without_slurm_commands_there_is_no_offer(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert demo.slurm_offer() is None
