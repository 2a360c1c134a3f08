"""Probe documents scored during training and from kept checkpoints, in both trainers (CPU)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanogpt.probe_store import ProbeError, ProbeStore, Study, read_docs
from tests.fixtures import REPO_ROOT, read_metrics, run_module

BASELINE = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
            "--batch_size=4", "--max_iters=10", "--eval_interval=5", "--eval_iters=2", "--warmup_iters=2",
            "--learning_rate=3e-3", "--min_lr=3e-4"]
SPEEDRUN = ["--recipe=tiny_cpu", "--num_iterations=6", "--extension_iterations=0", "--batch_schedule=1;1;1",
            "--window_schedule=1,1;1,2;2,2", "--mtp_schedule=1,0.5;1;1", "--lr_schedule=1;1.2;1", "--val_every=3",
            "--val_tokens=2048", "--untie_step=3"]


@pytest.fixture(scope="module")
def docs_file(char_corpus, tmp_path_factory) -> Path:
    """Three short documents and one longer than the baseline's 32-token context (scored in windows)."""
    strings = tmp_path_factory.mktemp("strings") / "strings.txt"
    strings.write_text("def f(x):\nimport os\nreturn None\n" + "for item in range(10): total += item * 2  # sum\n")
    out = strings.parent / "docs.npz"
    run_module("nanogpt.data.select_docs", char_corpus, "--out", out, "--text", strings)
    assert read_docs(out).lengths.max() > 32
    return out


def baseline(char_corpus, run_dir, *extra):
    return [f"--data_dir={char_corpus}", f"--run_dir={run_dir}", *BASELINE, *extra]


def speedrun(char_corpus, run_dir, *extra):
    return [*SPEEDRUN, f"--data_dir={char_corpus}", f"--run_dir={run_dir}", *extra]


def stored(run_dir) -> dict[int, np.ndarray]:
    store = ProbeStore(run_dir)
    return {step: np.array(store.read(step)) for step in store.steps()}


def hand_scores_baseline(model, docs, block_size) -> np.ndarray:
    """Next-token losses from log-softmax of the logits, window by window, written out here."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(len(docs)):
            tokens = torch.tensor(docs.document(i))
            for start in range(0, len(tokens) - 1, block_size):
                window = tokens[start:start + block_size + 1]
                logits, mean_loss = model(window[None, :-1], window[None, 1:])
                log_probs = torch.log_softmax(logits[0].double(), dim=-1)
                losses = -log_probs.gather(1, window[1:, None]).squeeze(1)
                assert losses.mean().item() == pytest.approx(mean_loss.item(), rel=1e-5)  # validation's loss
                out.append(losses)
    return torch.cat(out).numpy()


def test_both_trainers_store_probes_with_one_module():
    """The probe store (the docs file, probes/, kept checkpoints, score_checkpoints' command line) is written once,
    in nanogpt/, and the speedrun imports it; its files are written as the run directory writes checkpoints."""
    import importlib.util

    from modded_nanogpt import probes as modded_probes
    from modded_nanogpt import score_checkpoints as modded_score
    from modded_nanogpt import train_gpt
    from nanogpt import probe_store, probes, rundir, score_checkpoints

    assert importlib.util.find_spec("modded_nanogpt.probe_store") is None
    assert not (REPO_ROOT / "modded_nanogpt" / "probe_store.py").exists()
    assert train_gpt.Study is probe_store.Study and train_gpt.ProbeError is probe_store.ProbeError
    assert train_gpt.probe_store is probe_store and modded_probes.Docs is probes.Docs is probe_store.Docs
    for module in (score_checkpoints, modded_score):
        assert module.score_checkpoints_main is probe_store.score_checkpoints_main
        assert module.check_vocabulary is probe_store.check_vocabulary
    assert probe_store.atomic_write is rundir.atomic_write and probe_store.fsync_dir is rundir.fsync_dir


def test_baseline_probes_at_the_right_steps_outside_the_clock_equal_to_scoring_by_hand(char_corpus, docs_file,
                                                                                       tmp_path, monkeypatch):
    from nanogpt import train
    from nanogpt.model import GPT, GPTConfig

    pause_s = 2.0
    real = train.score_documents

    def slow(*args, **kwargs):  # each probe takes pause_s: the training clock must not see it
        time.sleep(pause_s)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "score_documents", slow)
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    summary = train.main(baseline(char_corpus, run_dir, f"--probe_docs={docs_file}", "--probe_every=4",
                                  "--save_checkpoints=every:4"))
    assert time.perf_counter() - started > 4 * pause_s
    assert summary["train_time_ms"] < 4 * pause_s * 1000 - 1000, summary
    scores = stored(run_dir)
    assert sorted(scores) == [0, 4, 8, 10]  # every 4 steps from 0, and the last
    index = ProbeStore(run_dir).index()["steps"]
    assert {int(s): e["tokens"] for s, e in index.items()} == {s: s * 4 * 32 for s in (0, 4, 8, 10)}
    docs = read_docs(docs_file)
    assert all(len(v) == docs.num_scores for v in scores.values())
    assert read_docs(run_dir / "probes" / "docs.npz").sha256 == docs.sha256
    for step in (4, 8):
        payload = torch.load(run_dir / "ckpt" / f"step_{step:07d}.pt", weights_only=False)
        model = GPT(GPTConfig(**payload["model_args"]))
        model.load_state_dict(payload["model"])
        np.testing.assert_allclose(scores[step], hand_scores_baseline(model, docs, 32), rtol=1e-5, atol=1e-6)
    assert scores[10].mean() < scores[0].mean()
    log = (run_dir / "train.log").read_text()
    assert "probe | step 4 | 4 documents | mean loss" in log and "not timed" in log


def test_speedrun_probes_at_the_right_steps_equal_to_its_eval_loss(char_corpus, docs_file, tmp_path):
    from modded_nanogpt.model import GPT
    from modded_nanogpt.train_gpt import Hyperparameters, main, model_config, schedule_of, validation_windows

    run_dir = tmp_path / "run"
    main(speedrun(char_corpus, run_dir, f"--probe_docs={docs_file}", "--probe_steps=0,2,5",
                  "--save_checkpoints=2,5"))
    scores = stored(run_dir)
    assert sorted(scores) == [0, 2, 5]
    docs = read_docs(docs_file)
    for step in (2, 5):
        payload = torch.load(run_dir / "ckpt" / f"step_{step:07d}.pt", weights_only=False)
        hp = Hyperparameters(**payload["config"])
        model = GPT(model_config(hp))
        model.load_state_dict(payload["model"])
        model.eval()
        short, long = validation_windows(model, schedule_of(hp), step)
        per_doc = np.split(scores[step], np.cumsum(docs.lengths - 1)[:-1])
        with torch.no_grad():
            for i in range(len(docs)):
                tokens = torch.tensor(docs.document(i), dtype=torch.int32)
                x = model.states(tokens[:-1], short, long)
                total = model.eval_loss(x, tokens[1:].long(), (1.0,), 1.0)  # what validation sums
                assert per_doc[i].sum() == pytest.approx(total.item(), rel=1e-5)
    metrics = read_metrics(run_dir)
    tokens = {m["step"]: m["tokens"] for m in metrics if m["kind"] == "train"}
    index = ProbeStore(run_dir).index()["steps"]
    assert {int(s): e["tokens"] for s, e in index.items()} == {0: 0, 2: tokens[2], 5: tokens[5]}


@pytest.mark.parametrize("trainer", ["nanogpt", "modded"])
def test_the_checkpoint_path_equals_the_in_run_path_bitwise(char_corpus, docs_file, tmp_path, trainer):
    run_dir = tmp_path / "run"
    if trainer == "nanogpt":
        module, args, every, steps = "nanogpt.train", baseline(char_corpus, run_dir), "every:3", [3, 6, 9, 10]
    else:
        module, args, every, steps = "modded_nanogpt.train_gpt", speedrun(char_corpus, run_dir), "every:2", [2, 4, 6]
    run_module(module, *args, f"--probe_docs={docs_file}", "--probe_every=1", f"--save_checkpoints={every}")
    in_run = stored(run_dir)
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "probes")
    scorer = "nanogpt.score_checkpoints" if trainer == "nanogpt" else "modded_nanogpt.score_checkpoints"
    proc = run_module(scorer, copy, "--docs", docs_file, "--device=cpu")
    from_checkpoints = stored(copy)
    assert sorted(from_checkpoints) == steps
    for step in steps:
        assert np.array_equal(from_checkpoints[step], in_run[step]), step
    index, original = ProbeStore(copy).index(), ProbeStore(run_dir).index()
    assert all(index["steps"][str(s)]["tokens"] == original["steps"][str(s)]["tokens"] for s in steps)
    assert {e["source"] for e in index["steps"].values()} == {"checkpoint"}
    assert f"{len(steps)} to score" in proc.stdout
    # Run again: nothing to do. A step lost from the index (a job killed after the .npy, before the index) is
    # scored again, alone.
    again = run_module(scorer, copy)
    assert "0 to score" in again.stdout
    index["steps"].pop(str(steps[-1]))
    (copy / "probes" / "index.json").write_text(json.dumps(index))
    third = run_module(scorer, copy)
    assert "1 to score" in third.stdout and f"probe | step {steps[-1]} " in third.stdout
    assert np.array_equal(stored(copy)[steps[-1]], in_run[steps[-1]])


@pytest.mark.parametrize("trainer", ["nanogpt", "modded"])
def test_weights_only_bf16_checkpoints_score_near_the_full_model(char_corpus, docs_file, tmp_path, trainer):
    run_dir = tmp_path / "run"
    if trainer == "nanogpt":
        module, args, step = "nanogpt.train", baseline(char_corpus, run_dir, "--n_embd=128", "--max_iters=6"), 6
        scorer = "nanogpt.score_checkpoints"
    else:
        module, args, step = "modded_nanogpt.train_gpt", speedrun(char_corpus, run_dir), 6
        scorer = "modded_nanogpt.score_checkpoints"
    run_module(module, *args, f"--probe_docs={docs_file}", f"--probe_steps={step}", f"--save_checkpoints={step}",
               "--save_checkpoints_as=weights_bf16")
    weights = run_dir / "ckpt" / "weights" / f"step_{step:07d}.pt"
    full = run_dir / "ckpt" / f"step_{step:07d}.pt"  # the trainer's own resumable checkpoint of its last step
    assert weights.is_file() and weights.stat().st_size < 0.3 * full.stat().st_size
    payload = torch.load(weights, weights_only=False)
    assert {t.dtype for t in payload["model"].values() if t.ndim >= 2} == {torch.bfloat16}
    full.unlink()
    copy_scores = stored(run_dir)[step]
    shutil.rmtree(run_dir / "probes")
    run_module(scorer, run_dir, "--docs", docs_file)
    from_weights = stored(run_dir)[step]
    assert not np.array_equal(from_weights, copy_scores)  # bf16 weights: near, not equal
    assert np.abs(from_weights - copy_scores).mean() < 0.02


def _wait(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the trainer ended early ({proc.returncode})")
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the trainer")


def test_kill_9_during_probes_then_resume_loses_and_doubles_nothing(char_corpus, docs_file, tmp_path):
    args = ["--max_iters=40", "--checkpoint_interval=8", "--keep_checkpoints=1", f"--probe_docs={docs_file}",
            "--probe_every=2", "--n_embd=64"]
    whole = tmp_path / "whole"
    run_module("nanogpt.train", *baseline(char_corpus, whole, *args))
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "nanogpt.train", *baseline(char_corpus, run_dir, *args)],
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait(lambda: 10 in ProbeStore(run_dir).steps(), proc)  # after the step-8 checkpoint, before step 16's
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(ProbeStore(run_dir).steps())
    assert done[-1] < 40, "the run ended before the kill; make it slower"
    # What a kill in the middle of a write leaves: a half-written temporary file of the next step, and a step's
    # .npy renamed into place whose index entry was not written yet.
    last = done[-1]
    (run_dir / "probes" / f"step_{last + 2:07d}.npy.tmp").write_bytes(b"\x93NUMPY partial")
    np.save(run_dir / "probes" / f"step_{last + 4:07d}.npy", np.zeros(3, dtype=np.float32))
    resumed = run_module("nanogpt.train", *baseline(char_corpus, run_dir, *args))
    assert "resumed from step" in resumed.stdout
    assert not list((run_dir / "probes").glob("*.tmp"))
    final, reference = stored(run_dir), stored(whole)
    assert sorted(final) == sorted(reference) == list(range(0, 41, 2))
    for step in reference:
        assert np.array_equal(final[step], reference[step]), step
    index = ProbeStore(run_dir).index()["steps"]
    assert len(index) == 21 and sorted(int(s) for s in index) == list(range(0, 41, 2))


def test_a_resumed_speedrun_scores_its_first_step_and_the_rest_once(char_corpus, docs_file, tmp_path):
    """Resumed from the step-3 checkpoint whose probes were lost (a kill between the checkpoint and the probes; the
    later steps' probes dropped as the resume drops them): it scores step 3 before training, then 4..6, each once."""
    from modded_nanogpt.train_gpt import main

    args = [f"--probe_docs={docs_file}", "--probe_every=1", "--save_checkpoints=3"]
    main(speedrun(char_corpus, tmp_path / "whole", *args))
    run_dir = tmp_path / "cut"
    main(speedrun(char_corpus, run_dir, *args))
    assert ProbeStore(run_dir).drop_after(2) == [3, 4, 5, 6]
    (run_dir / "ckpt" / "step_0000006.pt").unlink()
    main(speedrun(char_corpus, run_dir, *args))
    assert "resumed from step 3" in (run_dir / "train.log").read_text()
    final, reference = stored(run_dir), stored(tmp_path / "whole")
    assert sorted(final) == sorted(reference) == list(range(7))
    for step in reference:
        assert np.array_equal(final[step], reference[step]), step


@pytest.mark.parametrize("extra, message", [
    (["--probe_every=2"], "probe_every/probe_steps need --probe_docs=FILE"),
    (["--probe_docs={docs}"], "give --probe_every=N or --probe_steps=A,B,... too"),
    (["--probe_docs={docs}", "--probe_steps=3,99"], "probe_steps: [99] outside the run's steps 0..10"),
    (["--probe_docs={missing}", "--probe_every=2"], "docs file not found"),
    (["--probe_docs={docs}", "--probe_every=2", "--save_checkpoints_as=half"], "save_checkpoints_as"),
    (["--save_checkpoints=often"], "--save_checkpoints: 'often'"),
])
@pytest.mark.parametrize("trainer", ["nanogpt.train", "modded_nanogpt.train_gpt"])
def test_bad_study_settings_fail_before_any_write(char_corpus, docs_file, tmp_path, trainer, extra, message):
    run_dir = tmp_path / "run"
    extra = [e.format(docs=docs_file, missing=tmp_path / "nope.npz") for e in extra]
    if trainer == "nanogpt.train":
        args = baseline(char_corpus, run_dir, *extra)
    else:
        args = speedrun(char_corpus, run_dir, "--num_iterations=10", *extra)
    proc = run_module(trainer, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not run_dir.exists()


def test_a_resumed_run_refuses_other_documents_and_a_vocabulary_they_exceed(char_corpus, docs_file, tmp_path):
    run_dir = tmp_path / "run"
    run_module("nanogpt.train", *baseline(char_corpus, run_dir, f"--probe_docs={docs_file}", "--probe_every=5",
                                          "--max_iters=5"))
    other = tmp_path / "other.npz"
    run_module("nanogpt.data.select_docs", char_corpus, "--out", other, "--indices", "0")
    before = {p.name: p.read_bytes() for p in (run_dir / "probes").iterdir()}
    proc = run_module("nanogpt.train", *baseline(char_corpus, run_dir, f"--probe_docs={other}", "--probe_every=5",
                                                 "--max_iters=10"), check=False)
    assert proc.returncode == 2 and "holds scores of other documents" in proc.stderr, proc.stderr
    assert {p.name: p.read_bytes() for p in (run_dir / "probes").iterdir()} == before
    docs = read_docs(docs_file)
    with pytest.raises(ProbeError, match="token id .* outside the model's vocabulary of 10"):
        Study(tmp_path / "x", str(docs_file), 1, "", "", "full", 5, 10, True)
    assert int(docs.tokens.max()) >= 10


def test_per_token_scores_of_the_speedrun_follow_the_softcap(char_corpus, docs_file):
    """token_losses = cross-entropy of the softcapped logits, row by row, whatever the chunking of the head."""
    from modded_nanogpt import probes
    from modded_nanogpt.model import GPT
    from modded_nanogpt.train_gpt import model_config, parse_hyperparameters, resolve_data

    hp = parse_hyperparameters(["--recipe=tiny_cpu", f"--data_dir={char_corpus}"])
    resolve_data(hp)
    torch.manual_seed(0)
    model = GPT(model_config(hp)).eval()
    x = torch.randn(50, hp.model_dim)
    targets = torch.randint(0, hp.vocab_size, (50,))
    expected = F.cross_entropy(23 * torch.sigmoid((x @ model.lm_head_t + 5) / 7.5), targets, reduction="none")
    torch.testing.assert_close(probes.token_losses(model, x, targets), expected)
    original = probes.EVAL_HEAD_ROWS
    try:
        probes.EVAL_HEAD_ROWS = 7
        torch.testing.assert_close(probes.token_losses(model, x, targets), expected)
    finally:
        probes.EVAL_HEAD_ROWS = original
