"""Gathering a study's runs into one table and a report, and the submission's checks (CPU; no cluster)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from nanogpt.probe_store import ProbeStore, make_docs, probe_steps
from slurm.study import (
    StudyError,
    compute_share,
    gather,
    gather_table,
    parse_seed_range,
    scored_steps,
    sharpest_drops,
)
from tests.fixtures import run_module

LENGTHS = [5, 9, 3]
STEPS = [0, 10, 20, 30]


def fake_run(root: Path, seed: int, docs, steps=STEPS) -> Path:
    """A run directory with probe scores written through the store: document d's loss falls at a step of its own."""
    run_dir = root / f"seed{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"seed": seed}))
    store = ProbeStore(run_dir)
    store.attach(docs, fresh=True)
    for step in steps:
        per_doc = [np.full(n - 1, 4.0 - (1.5 if step >= 10 * (d + 1) else 0.0) + 0.01 * seed, dtype=np.float32)
                   for d, n in enumerate(LENGTHS)]
        store.write(step, np.concatenate(per_doc), tokens=step * 1000, source="train")
    return run_dir


@pytest.fixture
def docs():
    rng = np.random.default_rng(0)
    return make_docs([np.concatenate([[0], rng.integers(1, 50, n - 1)]) for n in LENGTHS], [""] * 3, [-1] * 3, {})


def test_the_table_has_a_row_per_seed_step_document_and_position(docs, tmp_path):
    runs = [fake_run(tmp_path, seed, docs) for seed in (1, 2, 3)]
    result = gather(runs, tmp_path / "out")
    table = pq.read_table(tmp_path / "out" / "study.parquet")
    assert table.column_names == ["seed", "step", "tokens", "document", "position", "loss"]
    assert table.num_rows == result["rows"] == 3 * len(STEPS) * sum(n - 1 for n in LENGTHS)
    rows = table.to_pylist()
    keys = {(r["seed"], r["step"], r["document"], r["position"]) for r in rows}
    assert len(keys) == table.num_rows  # no row twice
    assert {r["position"] for r in rows if r["document"] == 1} == set(range(1, 9))
    assert all(r["tokens"] == 1000 * r["step"] for r in rows)
    one = [r["loss"] for r in rows if (r["seed"], r["step"], r["document"]) == (2, 20, 1)]
    assert one == pytest.approx([2.52] * 8)  # document 1 drops by 1.5 at step 20; seed 2 adds 0.02
    # The report: each document's sharpest drop is at its own interval.
    drops = {d["document"]: (d["from_step"], d["to_step"]) for d in result["drops"]}
    assert drops == {0: (0, 10), 1: (10, 20), 2: (20, 30)}
    page = (tmp_path / "out" / "study.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "10 -&gt; 20" in page
    assert all(Path(p).stat().st_size > 1000 for p in result["plots"])


def test_gathering_refuses_runs_of_other_documents_and_a_seed_twice(docs, tmp_path):
    first = fake_run(tmp_path / "a", 1, docs)
    other = make_docs([np.array([0, 1, 2])], [""], [-1], {})
    with pytest.raises(StudyError, match="scored other documents"):
        gather_table([first, fake_run(tmp_path / "b", 2, other)])
    with pytest.raises(StudyError, match="are both seed 1"):
        gather_table([first, fake_run(tmp_path / "c", 1, docs)])


def test_sharpest_drop_ignores_missing_steps():
    mean = np.array([[3.0, np.nan, 1.0], [3.0, 2.9, 2.8]])
    rows = sharpest_drops([0, 5, 10], mean)
    assert [(r["document"], r["from_step"]) for r in rows] == [(1, 0)]  # document 0 has no full interval


def test_seed_ranges():
    assert parse_seed_range("1-8") == list(range(1, 9)) and parse_seed_range("3") == [1, 2, 3]
    assert parse_seed_range("4,7") == [4, 7]
    for bad in ("8-1", "1,1", "a"):
        with pytest.raises(StudyError):
            parse_seed_range(bad)


def test_submit_study_prints_the_disk_and_refuses_a_study_that_does_not_fit(char_corpus, tmp_path):
    docs_file = tmp_path / "docs.npz"
    run_module("nanogpt.data.select_docs", char_corpus, "--out", docs_file, "--indices", "0")
    common = ["slurm.submit", "study", "--trainer", "nanogpt", "--seeds", "1-2", "--docs", docs_file, "--gpu-type",
              "h100", "--dry-run", "--cluster", "local", "--device", "cpu", "--recipe", "tiny_cpu", "--data-dir",
              char_corpus, "--runs-dir", tmp_path / "runs"]
    proc = run_module(*common, "--probe-every", "50")
    assert "study disk:" in proc.stdout and "probe scores" in proc.stdout
    assert "study compute: " in proc.stdout and "of each run's training" in proc.stdout
    assert "--probe_docs=" in proc.stdout and "--probe_every=50" in proc.stdout and "gather" in proc.stdout
    proc = run_module(*common, "--probe-every", "1", "--set", "max_iters=100000000000", check=False)
    assert proc.returncode == 2 and "the study needs about" in proc.stderr and "GiB free" in proc.stderr
    assert "nothing was submitted" in proc.stderr and not (tmp_path / "runs" / "submissions").exists()
    proc = run_module(*common, "--probe-every", "5", "--path", "checkpoints")
    assert "--save_checkpoints=every:5 --save_checkpoints_as=weights_bf16" in proc.stdout
    assert "python -m slurm.study score --trainer baseline" in proc.stdout
    proc = run_module(*common[:7], tmp_path / "nope.npz", *common[8:], "--probe-every", "5", check=False)
    assert proc.returncode == 2 and "docs file not found" in proc.stderr


def test_the_compute_estimate_of_the_measured_scaled_run():
    """The speedrun's scaled run on an H200 (modded_nanogpt/PERF_NOTES.md, 2026-12-03 (g)): 256 documents of
    357,466 tokens scored at 94 of its 462 steps (every 5 and the last), 122,683,392 tokens trained; the probes took
    10.4% of the training time. The estimate (a forward a third of a training step per token) says 9.1%."""
    assert scored_steps(462, 5) == 94 and scored_steps(10, 5) == 3 and scored_steps(10, 1) == 11
    for steps, every in ((462, 5), (10, 5), (10, 1), (10, 3), (7, 10)):  # the trainers' list, counted
        assert scored_steps(steps, every) == len(probe_steps(every, "", steps))
    lengths = [1396] * 255 + [1486]
    docs = make_docs([np.zeros(n, dtype=np.int64) for n in lengths], [""] * 256, [-1] * 256, {})
    assert int(docs.lengths.sum()) == 357_466
    share = compute_share(docs, 462, 5, 122_683_392)
    assert share == pytest.approx(94 * 357_466 / (3 * 122_683_392)) and 0.090 < share < 0.092
    assert 0.104 / share == pytest.approx(1.14, abs=0.01)  # what the printed "~1.15x" rests on
