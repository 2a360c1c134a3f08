"""A training-dynamics study on the local Slurm cluster (tiny CPU configs): 2 seeds of each trainer, the in-run
path and the checkpoint path, end to end to the gathered table and the report, the report checked in headless
Chromium like the comparison report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from nanogpt.probe_store import ProbeStore, read_docs
from tests.fixtures import run_module
from tests.test_slurm_submit import submit, tasks, wait

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1500)]

SETTINGS = {
    "nanogpt": ["--set", "max_iters=8", "--set", "eval_interval=4", "--set", "eval_iters=2"],
    "modded": ["--set", "num_iterations=4", "--set", "extension_iterations=0", "--set", "batch_schedule=1;1;1;1",
               "--set", "val_every=0", "--set", "val_tokens=2048"],
}


@pytest.mark.parametrize("trainer, path", [("nanogpt", "probes"), ("modded", "checkpoints")])
def test_a_study_on_the_cluster_ends_in_its_table_and_report(slurm_cluster, tmp_path, char_corpus, trainer, path):
    docs_file = tmp_path / "docs.npz"
    strings = tmp_path / "strings.txt"
    strings.write_text("def f(x):\n    return x + 1\nimport os\n")
    run_module("nanogpt.data.select_docs", char_corpus, "--out", docs_file, "--text", strings)
    runs = tmp_path / "runs"
    manifest = submit(runs, "study", "--trainer", trainer, "--seeds", "1-2", "--docs", docs_file, "--probe-every", 2,
                      "--path", path, "--gpu-type", "h100", "--data-dir", char_corpus, "--device", "cpu",
                      "--recipe", "tiny_cpu", "--cpus-per-gpu", 1, *SETTINGS[trainer])
    wait(runs, manifest)
    names = [job["name"] for job in manifest["jobs"]]
    assert names == (["study", "gather"] if path == "probes" else ["study", "score", "gather"])
    docs = read_docs(docs_file)
    steps = [0, 2, 4, 6, 8] if path == "probes" else [2, 4]
    for task in tasks(manifest, "study"):
        assert sorted(ProbeStore(task["run_dir"]).steps()) == steps
    out = runs / "submissions" / manifest["submission"] / "study"
    table = pq.read_table(out / "study.parquet")
    assert table.num_rows == 2 * len(steps) * docs.num_scores  # seeds x steps x documents x positions
    assert sorted(set(table["seed"].to_pylist())) == [1, 2]
    assert np.isfinite(table["loss"].to_numpy()).all()
    from tests.report_browser import BrowserMissing, check_report

    try:
        seen = check_report(out / "study.html")
    except BrowserMissing as e:
        pytest.skip(str(e))
    assert seen["title"] == "Training-dynamics study" and len(seen["images"]) == 2
    assert Path(out / "study_heatmap.png").stat().st_size > 1000
