"""`python -m slurm.report`: hand-written run directories with known answers, then real short CPU runs."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from slurm import report
from tests.fixtures import REPO_ROOT, run_module

TARGET = 3.28


def write_run(path: Path, trainer: str = "nanogpt", seed: int = 1, vals=(), end: bool = True, extra_config=None,
              gpus=("NVIDIA H100 80GB HBM3",) * 8, world_size: int = 8, train=(), attention=None) -> Path:
    """A run directory as the trainers write it. vals: (step, train_time_ms, tokens, val_loss)."""
    path.mkdir(parents=True)
    if trainer == "nanogpt":
        config = {"data_dir": f"/data/{seed}", "run_dir": str(path), "n_layer": 12, "max_iters": 100, "seed": seed}
        command = ["python", "-m", "nanogpt.train"]
    else:
        config = {"data_dir": "/data", "run_dir": str(path), "num_iterations": 100, "seed": seed,
                  **{feature: True for feature in ("mtp", "value_embeds", "fp8")}, "optimizer": "normuon"}
        command = ["python", "-m", "modded_nanogpt.train_gpt"]
    config.update(extra_config or {})
    (path / "config.json").write_text(json.dumps(config))
    provenance = {"command": command, "gpus": list(gpus), "world_size": world_size}
    if attention is not None:
        provenance["attention_backend"] = attention
    (path / "provenance.json").write_text(json.dumps(provenance))
    records = [{"kind": "train", **t} for t in train]
    records += [{"kind": "val", "step": s, "train_time_ms": t, "tokens": n, "val_loss": v} for s, t, n, v in vals]
    if end and vals:
        s, t, n, v = vals[-1]
        records.append({"kind": "end", "step": s, "tokens": n, "train_time_ms": t, "final_val_loss": v,
                        "peak_memory_bytes": 40 * 2**30, "world_size": world_size})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def curve(final_loss: float, time_scale: float = 1.0, token_scale: float = 1.0):
    """val 3.4 at 1000 ms, 3.2 at 2000 ms (scaled), then `final_loss`."""
    return [(0, 0.0, 0, 10.0), (10, 1000.0 * time_scale, 5000 * token_scale, 3.4),
            (20, 2000.0 * time_scale, 10000 * token_scale, 3.2), (30, 3000.0 * time_scale, 15000 * token_scale, final_loss)]


def test_time_and_tokens_to_target_are_interpolated(tmp_path):
    write_run(tmp_path / "runs" / "a", vals=curve(3.1))
    summary = report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--target", "3.28"])
    (group,) = summary["groups"].values()
    assert group["time_to_target_ms"]["mean"] == pytest.approx(1600.0)  # 1000 + (3.4-3.28)/(3.4-3.2) * 1000
    assert group["tokens_to_target"]["mean"] == pytest.approx(8000.0)
    assert group["time_to_target_ms"]["n"] == 1 and group["p_value"] is None  # one run: no t-test
    assert group["device"] == "NVIDIA H100 80GB HBM3 x8" and group["peak_memory_bytes"] == 40 * 2**30


def test_first_evaluation_below_target_and_not_reached(tmp_path):
    assert report.crossing([{"train_time_ms": 500, "val_loss": 3.0}], "train_time_ms", TARGET) == 500
    write_run(tmp_path / "runs" / "slow", vals=[(0, 0.0, 0, 10.0), (10, 1000.0, 5000, 3.5), (20, 2000.0, 10000, 3.3)])
    summary = report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    (group,) = summary["groups"].values()
    assert group["time_to_target_ms"]["per_run"] == [None] and group["time_to_target_ms"]["mean"] is None
    assert group["tokens_to_target"]["n"] == 0
    assert "not reached" in (tmp_path / "out" / "report.md").read_text()


@pytest.fixture
def study(tmp_path) -> Path:
    """Baseline x3 seeds, modded full x3, modded without mtp x2, a baseline with a different depth."""
    runs = tmp_path / "study"
    base_losses, full_losses, nomtp_losses = [3.25, 3.27, 3.22], [3.10, 3.12, 3.11], [3.20, 3.16]
    for seed, loss in enumerate(base_losses, start=1):
        write_run(runs / f"base_s{seed}", seed=seed, vals=curve(loss, time_scale=4 + seed, token_scale=2),
                  train=[{"step": 1, "mfu": 0.9}, {"step": 10, "mfu": 0.40}, {"step": 20, "mfu": 0.44}])
    for seed, loss in enumerate(full_losses, start=1):
        write_run(runs / f"m_full_s{seed}", "modded", seed=seed, vals=curve(loss, time_scale=seed))
    for seed, loss in enumerate(nomtp_losses, start=1):
        write_run(runs / f"m_nomtp_s{seed}", "modded", seed=seed, vals=curve(loss, time_scale=2 * seed),
                  extra_config={"mtp": False})
    write_run(runs / "deep", seed=1, vals=curve(3.3), extra_config={"n_layer": 24})
    return runs


def test_groups_statistics_speedups_and_ablations(study, tmp_path):
    summary = report.main([str(study), "--out", str(tmp_path / "out")])
    groups = summary["groups"]
    assert sorted(groups) == ["baseline", "baseline n_layer=24", "modded", "modded mtp=False"]
    base, full, nomtp = groups["baseline"], groups["modded"], groups["modded mtp=False"]
    assert base["n_runs"] == 3 and sorted(base["seeds"]) == [1, 2, 3] and groups["baseline n_layer=24"]["n_runs"] == 1

    losses = [3.25, 3.27, 3.22]
    assert base["final_val_loss"]["mean"] == pytest.approx(np.mean(losses))
    assert base["final_val_loss"]["std"] == pytest.approx(np.std(losses, ddof=1))
    assert base["p_value"] == pytest.approx(stats.ttest_1samp(losses, TARGET, alternative="less").pvalue)
    assert base["mfu"] == pytest.approx(0.42)  # the first logged step (compilation) is left out
    assert full["mfu"] is None

    base_times = [1600.0 * (4 + seed) for seed in (1, 2, 3)]
    full_times = [1600.0 * seed for seed in (1, 2, 3)]
    assert base["time_to_target_ms"]["mean"] == pytest.approx(np.mean(base_times))
    assert base["time_to_target_ms"]["std"] == pytest.approx(np.std(base_times, ddof=1))
    speedup = {s["group"]: s for s in summary["speedups"]}["modded"]
    assert summary["baseline"] == "baseline"
    assert speedup["time_ratio"] == pytest.approx(np.mean(base_times) / np.mean(full_times))
    assert speedup["tokens_ratio"] == pytest.approx(2.0)  # the baseline's curve is stretched 2x in tokens

    (ablation,) = summary["ablations"]
    assert (ablation["feature"], ablation["group"], ablation["full"]) == ("mtp", "modded mtp=False", "modded")
    a, f = np.array([3.20, 3.16]), np.array([3.10, 3.12, 3.11])
    delta = a.mean() - f.mean()
    va, vf = a.var(ddof=1) / len(a), f.var(ddof=1) / len(f)
    dof = (va + vf) ** 2 / (va**2 / (len(a) - 1) + vf**2 / (len(f) - 1))  # Welch-Satterthwaite
    half = stats.t.ppf(0.975, dof) * math.sqrt(va + vf)
    assert ablation["delta_final_loss"] == pytest.approx(delta)
    assert (ablation["ci_low"], ablation["ci_high"]) == (pytest.approx(delta - half), pytest.approx(delta + half))
    assert ablation["delta_train_time_ms"] == pytest.approx(np.mean([6000, 12000]) - np.mean([3000, 6000, 9000]))
    assert nomtp["time_to_target_ms"]["mean"] == pytest.approx(np.mean([3200, 6400]))

    md = (tmp_path / "out" / "report.md").read_text()
    assert "| group | params (non-emb.) | runs |" in md and "## Ablations" in md and "## Speedup over the baseline" in md


def test_broken_runs_are_named_and_the_rest_reported(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_run(runs / "good", vals=curve(3.1))
    missing = write_run(runs / "missing", vals=curve(3.1))
    (missing / "metrics.jsonl").unlink()
    cut = write_run(runs / "cut", seed=2, vals=curve(3.0))
    text = (cut / "metrics.jsonl").read_text()
    (cut / "metrics.jsonl").write_text(text[: len(text) - 25])  # the end record cut short by a kill
    write_run(runs / "noval", seed=3, train=[{"step": 1, "loss": 5.0}])
    summary = report.main([str(runs), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    for name in ("missing", "cut", "noval"):
        assert str(runs / name / "metrics.jsonl") in err
    assert "cut short" in err and "no val record" in err and "no end record" in err
    (group,) = summary["groups"].values()
    assert group["n_runs"] == 2 and group["finished"] == 1  # good, and cut up to its last validation
    assert group["final_val_loss"]["mean"] == pytest.approx((3.1 + 3.0) / 2)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Warnings" in md and str(runs / "noval" / "metrics.jsonl") in md


def test_no_usable_run_exits_2(tmp_path):
    write_run(tmp_path / "runs" / "noval", train=[{"step": 1, "loss": 5.0}])
    proc = run_module("slurm.report", tmp_path / "runs", "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2
    assert "error: no usable run" in proc.stderr and str(tmp_path / "runs") in proc.stderr
    assert report.cli([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2


def test_unwritable_out_exits_2(tmp_path, capsys):
    write_run(tmp_path / "runs" / "a", vals=curve(3.1))
    (tmp_path / "file").write_text("not a folder")
    assert report.cli([str(tmp_path / "runs"), "--out", str(tmp_path / "file" / "out")]) == 2
    assert "cannot write the report into" in capsys.readouterr().err


def test_manifest_names_groups_and_places_the_report(tmp_path):
    """The compare job's command line: `python -m slurm.report --manifest PATH` (slurm/plans.py)."""
    runs_dir = tmp_path / "runs"
    tasks = {"baseline": [], "modded": []}
    for trainer, name in (("nanogpt", "baseline"), ("modded", "modded")):
        for seed in (1, 2):
            run_dir = write_run(runs_dir / "sub1" / f"{name}-seed{seed}", trainer, seed=seed, vals=curve(3.1 + seed / 100))
            tasks[name].append({"label": f"{name}-seed{seed}", "job_id": "1", "run_dir": str(run_dir)})
    tasks["modded"].append({"label": "modded-seed3", "job_id": "1", "run_dir": str(runs_dir / "sub1" / "modded-seed3")})
    submission = runs_dir / "submissions" / "sub1"
    submission.mkdir(parents=True)
    manifest = {"submission": "sub1", "jobs": [
        {"name": "prep", "role": "prep", "tasks": [{"label": "prep", "run_dir": None, "out_dir": "/data"}]},
        *({"name": name, "role": "train", "tasks": t} for name, t in tasks.items()),
        {"name": "report", "role": "report", "tasks": [{"label": "report", "run_dir": None}]}]}
    (submission / "manifest.json").write_text(json.dumps(manifest))
    summary = report.main(["--manifest", str(submission / "manifest.json")])
    assert sorted(summary["groups"]) == ["baseline", "modded"]
    assert summary["groups"]["modded"]["n_runs"] == 2
    assert any("modded-seed3" in w for w in summary["warnings"])
    assert Path(summary["out"]) == submission / "report" and (submission / "report" / "report.html").is_file()
    # the submission folder works too, and the runs found again under their folder count once
    again = report.main([str(submission), str(runs_dir / "sub1"), "--out", str(tmp_path / "out")])
    assert sorted(again["groups"]) == ["baseline", "modded"] and again["groups"]["baseline"]["n_runs"] == 2


# ---- real short runs of both trainers ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_runs(char_corpus, tmp_path_factory) -> Path:
    """Two seeds of each trainer, at once (one thread each), through the commands users type."""
    runs = tmp_path_factory.mktemp("real_runs")
    commands = []
    for seed in (1, 2):
        commands.append(["nanogpt.train", "tiny_cpu", f"--data_dir={char_corpus}", f"--run_dir={runs / f'base{seed}'}",
                         "--max_iters=20", "--eval_interval=10", "--eval_iters=2", f"--seed={seed}"])
        commands.append(["modded_nanogpt.train_gpt", "--recipe=tiny_cpu", f"--data_dir={char_corpus}",
                         f"--run_dir={runs / f'modded{seed}'}", "--num_iterations=8", "--val_every=4", f"--seed={seed}"])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, "-m", *c], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in commands]
    for command, proc in zip(commands, procs, strict=True):
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{command} failed:\n{output[-3000:]}"
    return runs


def test_report_over_real_runs(real_runs, tmp_path):
    out = tmp_path / "out"
    proc = run_module("slurm.report", real_runs, "--out", out, "--target", "3.9")
    summary = report.main([str(real_runs), "--out", str(out), "--target", "3.9"])
    assert sorted(summary["groups"]) == ["baseline", "modded"]
    assert all(g["n_runs"] == 2 for g in summary["groups"].values())
    assert summary["groups"]["baseline"]["steps"]["values"] == [20, 20]
    assert summary["groups"]["modded"]["p_value"] is not None

    # Parameter counts come from each run's provenance (both trainers record them), shown beside the group.
    for name, group in summary["groups"].items():
        counts = group["parameters"]
        assert 0 < counts["non_embedding"] < counts["total"], (name, counts)
    assert summary["groups"]["baseline"]["parameters"] != summary["groups"]["modded"]["parameters"]
    md = (out / "report.md").read_text()
    assert "| group | params (non-emb.) | runs | steps | tokens | time to target |" in md
    assert "| baseline |" in md and "| modded |" in md
    total = summary["groups"]["modded"]["parameters"]["total"]
    assert f"| modded | {total / 1e6:.3g}M (" in md or f"| modded | {total / 1e3:.3g}k (" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    for png in summary["files"]["plots"]:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(png).stat().st_size > 1000
    assert "group" in proc.stdout and "baseline" in proc.stdout and str(out / "report.html") in proc.stdout
    assert str(out / "val_loss_vs_time.png") in proc.stdout


def test_html_is_self_contained(study, tmp_path):
    report.main([str(study), "--out", str(tmp_path / "out")])
    page = (tmp_path / "out" / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert not re.search(r"<(script|link)\b", page, re.IGNORECASE) and "@import" not in page
    assert page.count("<img") == 2 and page.count("src='data:image/png;base64,") == 2


def test_plots_leave_step_0_out_of_the_y_range_and_draw_seeds_as_a_mean_with_a_band():
    """The step-0 evaluation (about ln(vocabulary)) set the y range and squeezed the curves into a quarter of the
    plot; seeds were unlabelled lines of one colour. Now the range covers the evaluations after step 0 and the
    target, and a group's seeds get a mean curve (x: the runs' mean at each shared step) with a min-max band."""
    from types import SimpleNamespace

    from slurm.report_html import loss_range, mean_curve

    def run(points):
        return SimpleNamespace(val=[{"step": s, "train_time_ms": t, "val_loss": v} for s, t, v in points])

    a = run([(0, 0, 10.8), (10, 1000, 4.0), (20, 2000, 3.5)])
    b = run([(0, 0, 10.9), (10, 3000, 4.4), (20, 4000, 3.3), (30, 5000, 3.2)])
    low, high = loss_range({"g": [a, b]}, target=3.28)
    assert low < 3.2 and 4.4 < high < 4.5  # 10.8 and 10.9 (step 0) are outside
    xs, mean, lowest, highest = mean_curve([a, b], "train_time_ms", 1e-3)
    assert xs == [0.0, 2.0, 3.0]  # steps 0, 10, 20: the ones both runs have; x in seconds, averaged
    assert mean == pytest.approx([10.85, 4.2, 3.4]) and lowest == [10.8, 4.0, 3.3] and highest == [10.9, 4.4, 3.5]


def test_a_group_that_mixes_attention_kernels_is_flagged(tmp_path, capsys):
    """attention_backend=auto resolves per machine: two seeds of one configuration on nodes with and without
    flash-attn-4 group together, and the report names both kernel sets and warns."""
    runs = tmp_path / "runs"
    write_run(runs / "s1", trainer="modded", seed=1, vals=curve(3.1), attention="fa4 (flash-attn-4 4.0.0b36)")
    write_run(runs / "s2", trainer="modded", seed=2, vals=curve(3.12), attention="flex")
    write_run(runs / "b1", seed=1, vals=curve(3.3), attention="flash (torch SDPA)")
    write_run(runs / "b2", seed=2, vals=curve(3.31), attention="flash (torch SDPA)")
    summary = report.main([str(runs), "--out", str(tmp_path / "out")])
    modded = next(g for g in summary["groups"].values() if g["trainer"] == "modded")
    baseline = next(g for g in summary["groups"].values() if g["trainer"] == report.BASELINE)
    assert modded["n_runs"] == 2 and modded["attention"] == "fa4 (flash-attn-4 4.0.0b36), flex"
    assert baseline["attention"] == "flash (torch SDPA)"
    mixed = [w for w in summary["warnings"] if "mixes attention kernels" in w]
    assert len(mixed) == 1 and repr(modded["name"]) in mixed[0] and "--attention_backend" in mixed[0]
    assert "mixes attention kernels" in capsys.readouterr().err
    table = (tmp_path / "out" / "report.md").read_text()
    assert "| device | attention |" in table
    assert "fa4 (flash-attn-4 4.0.0b36), flex" in table and "flash (torch SDPA)" in table


def test_a_run_without_an_attention_record_reads_unknown(tmp_path):
    write_run(tmp_path / "runs" / "a", vals=curve(3.1))
    (group,) = report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])["groups"].values()
    assert group["attention"] == "unknown"


def test_a_folder_of_runs_is_read_without_entering_the_kernel_caches_checkpoints_or_code(tmp_path, monkeypatch):
    """The trainers keep their kernel caches in .cache beside the runs (thousands of files, some of them JSON):
    a folder of runs is searched without entering .cache, ckpt or code, so nothing in them is taken for a run."""
    runs = tmp_path / "runs"
    write_run(runs / "a", vals=curve(3.1))
    write_run(runs / ".cache" / "triton" / "ABC", vals=curve(3.2))  # would be a second run if it were read
    write_run(runs / "a" / "code" / "x", vals=curve(3.3))
    entered = []
    walk = os.walk

    def recording_walk(top, *args, **kwargs):
        for folder, subfolders, files in walk(top, *args, **kwargs):
            entered.append(Path(folder).name)
            yield folder, subfolders, files

    monkeypatch.setattr(report.os, "walk", recording_walk)
    (group,) = report.main([str(runs), "--out", str(tmp_path / "out")])["groups"].values()
    assert group["runs"] == [str(runs / "a")]
    assert ".cache" not in entered and "triton" not in entered and "code" not in entered
