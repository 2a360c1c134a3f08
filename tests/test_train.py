"""The baseline trainer end to end on CPU, through `python -m nanogpt.train` as a user runs it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nanogpt import checkpoint as ckpt
from nanogpt import rundir
from nanogpt.config import ConfigError, parse_config
from nanogpt.data.shards import ShardError, write_shard
from nanogpt.model import GPTConfig
from nanogpt.train import RUN_TIME_MODEL_OPTIONS, TrainConfig, apply_run_time_options, build_model, main
from tests.fixtures import REPO_ROOT, read_metrics, run_files, run_module

# A tiny CPU command line, nanoGPT's names for its settings.
TINY = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=8",
        "--max_iters=30", "--eval_interval=10", "--eval_iters=5", "--compile=False",
        "--warmup_iters=3", "--learning_rate=3e-3", "--min_lr=3e-4"]  # 30 steps: a short warmup
# Slower per step (so a test can interrupt it) and with dropout (so the RNG state must be restored).
RESUMABLE = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=96", "--block_size=96",
             "--batch_size=12", "--dropout=0.1", "--max_iters=60", "--eval_interval=10", "--eval_iters=3",
             "--log_interval=1", "--warmup_iters=5", "--learning_rate=2e-3", "--min_lr=2e-4",
             "--total_batch_size=2304", "--keep_checkpoints=3"]


def curve(run_dir: Path) -> tuple[list, list]:
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    val = [(r["step"], r["val_loss"], r["train_loss"]) for r in records if r["kind"] == "val"]
    return train, val


def test_thirty_cpu_steps_lower_the_loss_and_fill_the_run_directory(char_corpus, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_module("nanogpt.train", f"--data_dir={char_corpus}", f"--run_dir={run_dir}", *TINY)
    assert (run_dir / "config.json").is_file() and (run_dir / "provenance.json").is_file()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["n_layer"] == 2 and config["max_iters"] == 30 and config["data_dir"] == str(char_corpus)
    provenance = json.loads((run_dir / "provenance.json").read_text())
    for key in ("git_sha", "git_dirty", "python", "torch", "cuda", "nccl", "triton", "hostname", "slurm", "command", "gpus"):
        assert key in provenance, key
    assert provenance["command"][-len(TINY):] == TINY
    records = read_metrics(run_dir)
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in val] == [0, 10, 20, 30]
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.5, val
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 31))
    assert all(set(r) >= {"step", "tokens", "train_time_ms", "loss", "lr", "dt_ms", "tokens_per_s"} for r in train)
    assert train[-1]["tokens"] == 30 * 8 * 64
    end = records[-1]
    assert end["kind"] == "end" and end["step"] == 30 and end["final_val_loss"] == val[-1]["val_loss"]
    # one grep-able line per step, in the log file and on stdout
    step_line = re.compile(r"^step \d+/30 \| loss \d+\.\d{4} \| lr \S+ \| dt \d+ms \| tok/s \S+ \| mfu n/a$")
    log_lines = (run_dir / "train.log").read_text().splitlines()
    assert sum(bool(step_line.match(line)) for line in log_lines) == 30
    assert sum(bool(step_line.match(line)) for line in proc.stdout.splitlines()) == 30
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == ["step_0000020.pt", "step_0000030.pt"]


@pytest.mark.parametrize("recipe", [["tiny_cpu"], ["--recipe=tiny_cpu"]])
def test_tiny_recipe_runs(char_corpus, tmp_path, recipe):
    """The recipe first (the grammar of both trainers), or as the option the speedrun used to take."""
    summary = main([*recipe, f"--data_dir={char_corpus}", f"--run_dir={tmp_path / 'run'}", "--max_iters=20",
                    "--eval_interval=10"])
    assert summary["step"] == 20 and summary["final_val_loss"] < 4.0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["recipe"].endswith("tiny_cpu.toml")


def _wait_for(predicate, proc, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stdout.read()}")
        time.sleep(0.01)
    raise AssertionError("timed out waiting for the trainer")


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def _start(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nanogpt.train", *args], cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.fixture(scope="module")
def reference_run(char_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_module("nanogpt.train", f"--data_dir={char_corpus}", f"--run_dir={run_dir}", *RESUMABLE)
    return run_dir


def test_killed_run_resumes_bitwise(char_corpus, reference_run, tmp_path):
    """SIGKILL after the step-20 checkpoint, run the same command again: the same curve, bit for bit."""
    run_dir = tmp_path / "killed"
    args = [f"--data_dir={char_corpus}", f"--run_dir={run_dir}", *RESUMABLE]
    proc = _start(args)
    _wait_for(lambda: (run_dir / "ckpt" / "step_0000020.pt").exists() and _last_step(run_dir) >= 22, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _last_step(run_dir)
    assert killed_at < 60, "the run finished before it could be killed; make it slower"
    resumed = run_module("nanogpt.train", *args)
    assert "resumed from step" in resumed.stdout
    assert curve(run_dir) == curve(reference_run)
    dropped = (run_dir / "metrics.dropped.jsonl").read_text().splitlines()  # the re-run steps, kept aside
    assert dropped and all(json.loads(line)["step"] > 20 for line in dropped if line.endswith("}"))
    assert read_metrics(run_dir)[-1]["final_val_loss"] == read_metrics(reference_run)[-1]["final_val_loss"]


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGINT"])
def test_signal_checkpoints_and_resumes_bitwise(char_corpus, reference_run, tmp_path, sig):
    """SIGUSR1 (what Slurm sends before a time limit) or Ctrl-C (SIGINT; it used to abort with a traceback and
    lose everything since the last checkpoint): checkpoint at the next step, exit 0, resume."""
    run_dir = tmp_path / "signalled"
    args = [f"--data_dir={char_corpus}", f"--run_dir={run_dir}", *RESUMABLE]
    proc = _start(args)
    _wait_for(lambda: _last_step(run_dir) >= 13, proc)
    proc.send_signal(getattr(signal, sig))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in output, output
    stop = read_metrics(run_dir)[-1]
    assert stop["kind"] == "stop" and stop["reason"] == f"signal {sig}", stop
    assert (run_dir / "ckpt" / f"step_{stop['step']:07d}.pt").is_file()
    run_module("nanogpt.train", *args)
    assert curve(run_dir) == curve(reference_run)


def test_max_train_minutes_stops_with_a_checkpoint(char_corpus, tmp_path):
    run_dir = tmp_path / "timed"
    summary = main([f"--data_dir={char_corpus}", f"--run_dir={run_dir}", *TINY, "--max_iters=100000",
                    "--max_train_minutes=0.02"])
    assert summary["stopped"] == "max_train_minutes"
    assert rundir.newest_checkpoint(run_dir / "ckpt").name == f"step_{summary['step']:07d}.pt"


def test_target_val_loss_stops_and_records_time_to_target(char_corpus, tmp_path):
    summary = main([f"--data_dir={char_corpus}", f"--run_dir={tmp_path / 'run'}", *TINY, "--max_iters=200",
                    "--target_val_loss=3.3", "--learning_rate=3e-3"])
    assert summary["reached_target"] and summary["step"] < 200
    assert summary["final_val_loss"] <= 3.3
    assert 0 < summary["time_to_target_ms"] <= summary["train_time_ms"]
    assert summary["tokens_to_target"] == summary["step"] * 8 * 64


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(char_corpus, tmp_path):
    run_dir = tmp_path / "run"
    main([f"--data_dir={char_corpus}", f"--run_dir={run_dir}", *TINY, "--max_iters=20"])
    newest = run_dir / "ckpt" / "step_0000020.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short, e.g. by a full disk
    warnings = []
    payload = ckpt.load_newest(run_dir / "ckpt", warn=warnings.append)
    assert payload["step"] == 10 and "step_0000020.pt" in warnings[0]
    summary = main([f"--data_dir={char_corpus}", f"--run_dir={run_dir}", *TINY, "--max_iters=20"])
    assert summary["step"] == 20


KILL_DURING_SAVE = """
import os, signal, sys, torch
from nanogpt import rundir

class DiesWhilePickled:
    def __reduce__(self):  # runs in the middle of torch.save, after the file was opened and written to
        os.kill(os.getpid(), signal.SIGKILL)

rundir.save_checkpoint(sys.argv[1], 20, {"format": 1, "step": 20, "big": torch.randn(200_000), "x": DiesWhilePickled()})
"""


def test_process_killed_while_writing_a_checkpoint_leaves_the_previous_loadable(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    rundir.save_checkpoint(ckpt_dir, 10, {"format": 1, "step": 10, "weights": torch.arange(5)})
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(ckpt_dir)], cwd=REPO_ROOT)
    assert proc.returncode == -signal.SIGKILL
    assert not rundir.checkpoint_path(ckpt_dir, 20).exists()  # only a temporary file was being written
    assert [p.name for p in rundir.checkpoints(ckpt_dir)] == ["step_0000010.pt"]
    assert torch.equal(ckpt.load_newest(ckpt_dir)["weights"], torch.arange(5))


# --- bad input: a clear error naming the culprit, before any work, nothing written ------------

def _no_run_dir_written(run_dir: Path):
    assert not run_dir.exists(), f"{run_dir} was created although the run was rejected"


def test_missing_data_directory(tmp_path):
    with pytest.raises(ShardError, match=f"{tmp_path / 'nope'}: data directory not found"):
        main([f"--data_dir={tmp_path / 'nope'}", f"--run_dir={tmp_path / 'run'}", *TINY])
    _no_run_dir_written(tmp_path / "run")


def test_missing_data_dir_setting_and_cli_exit_code(tmp_path):
    with pytest.raises(ConfigError, match="data_dir is not set"):
        main([*TINY])
    proc = run_module("nanogpt.train", f"--data_dir={tmp_path / 'nope'}", "--n_layr=3", check=False)
    assert proc.returncode == 2 and "error: unknown setting --n_layr on the command line" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_val_shard(char_corpus, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train_000001.bin").write_bytes((char_corpus / "train_000001.bin").read_bytes())
    with pytest.raises(ShardError, match="no val data"):
        main([f"--data_dir={data}", f"--run_dir={tmp_path / 'run'}", *TINY])
    _no_run_dir_written(tmp_path / "run")


@pytest.mark.parametrize("damage, message", [
    (lambda b: np.int32(1234).tobytes() + b[4:], "bad magic number 1234"),
    (lambda b: b[:4] + np.int32(7).tobytes() + b[8:], "unsupported shard version 7"),
    (lambda b: b[:-10], "truncated"),
])
def test_damaged_shard_is_named(char_corpus, tmp_path, damage, message):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train_000001.bin", "corpus.json"):
        (data / name).write_bytes((char_corpus / name).read_bytes())
    val = data / "val_000000.bin"
    val.write_bytes(damage((char_corpus / "val_000000.bin").read_bytes()))
    with pytest.raises(ShardError, match=re.escape(str(val)) + ".*" + message):
        main([f"--data_dir={data}", f"--run_dir={tmp_path / 'run'}", *TINY])
    _no_run_dir_written(tmp_path / "run")


def test_batch_that_does_not_divide(char_corpus, tmp_path):
    with pytest.raises(ConfigError, match="total_batch_size=1000 tokens is not a multiple"):
        main([f"--data_dir={char_corpus}", f"--run_dir={tmp_path / 'run'}", *TINY, "--total_batch_size=1000"])
    _no_run_dir_written(tmp_path / "run")


def test_resume_without_checkpoint(char_corpus, tmp_path):
    with pytest.raises(ConfigError, match="init_from=resume but .* holds no checkpoint"):
        main([f"--data_dir={char_corpus}", f"--run_dir={tmp_path / 'run'}", *TINY, "--init_from=resume"])
    _no_run_dir_written(tmp_path / "run")


def test_missing_pretrained_directory(char_corpus, tmp_path):
    with pytest.raises(ConfigError, match="no such directory of Hugging Face GPT-2 weights"):
        main([f"--data_dir={char_corpus}", f"--run_dir={tmp_path / 'run'}", *TINY, f"--init_from={tmp_path / 'nope'}"])
    _no_run_dir_written(tmp_path / "run")


def test_data_too_small_for_one_batch(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng()
    write_shard(data / "train_000001.bin", rng.integers(0, 50, 10_000))
    write_shard(data / "val_000000.bin", rng.integers(0, 50, 100))
    with pytest.raises(ShardError, match="hold no batch"):
        main([f"--data_dir={data}", f"--run_dir={tmp_path / 'run'}", *TINY])


def test_fresh_start_keeps_earlier_files(char_corpus, tmp_path):
    """A run directory with metrics but no checkpoint: the old files are kept aside, not overwritten."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    main([f"--data_dir={char_corpus}", f"--run_dir={run_dir}", *TINY, "--max_iters=5"])
    assert (run_dir / "metrics.jsonl.1").read_text() == '{"kind": "train", "step": 1}\n'
    assert read_metrics(run_dir)[0]["kind"] == "val"


def test_two_processes_match_one_with_accumulation(char_corpus, tmp_path):
    """torchrun with 2 CPU processes (gloo) takes the same steps as 1 process accumulating 2 micro-batches."""
    common = [f"--data_dir={char_corpus}", *TINY, "--max_iters=8", "--eval_interval=4", "--total_batch_size=1024"]
    run_module("nanogpt.train", f"--run_dir={tmp_path / 'one'}", *common)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "nanogpt.train", f"--run_dir={tmp_path / 'two'}", *common],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert [s for s, _ in one[0]] == [s for s, _ in two[0]]
    np.testing.assert_allclose([loss for _, loss in two[0]], [loss for _, loss in one[0]], rtol=1e-5)
    np.testing.assert_allclose([v for _, v, _ in two[1]], [v for _, v, _ in one[1]], rtol=1e-5)
    assert json.loads((tmp_path / "two" / "provenance.json").read_text())["world_size"] == 2


def _hf_model_dir(tmp_path, vocab_size, positions=64):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=positions, vocab_size=vocab_size)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_eval_only_from_pretrained_weights(char_corpus, tmp_path):
    """The eval_gpt2* path: Hugging Face weights (a local directory here), evaluated once."""
    vocab = json.loads((char_corpus / "corpus.json").read_text())["vocab_size"]
    hf_dir = _hf_model_dir(tmp_path, vocab_size=vocab + 7)
    result = main([f"--data_dir={char_corpus}", f"--run_dir={tmp_path / 'run'}", f"--init_from={hf_dir}", "--eval_only",
                   "--block_size=32", "--batch_size=4", "--eval_iters=3", "--device=cpu", "--compile=False"])
    assert np.isfinite(result["val_loss"]) and np.isfinite(result["train_loss"])
    assert read_metrics(tmp_path / "run")[-1]["val_loss"] == result["val_loss"]
    with pytest.raises(ConfigError, match="block_size=128 exceeds the 64 positions"):
        main([f"--data_dir={char_corpus}", f"--run_dir={tmp_path / 'run2'}", f"--init_from={hf_dir}", "--eval_only",
              "--block_size=128", "--batch_size=4", "--device=cpu", "--compile=False"])


def test_pretrained_vocabulary_too_small_for_the_data(char_corpus, tmp_path):
    hf_dir = _hf_model_dir(tmp_path, vocab_size=5)
    with pytest.raises(ConfigError, match="the model has 5 tokens but the data"):
        main([f"--data_dir={char_corpus}", f"--run_dir={tmp_path / 'run'}", f"--init_from={hf_dir}", "--eval_only",
              "--block_size=32", "--batch_size=4", "--device=cpu", "--compile=False"])


def test_resume_with_a_different_model_is_refused_and_keeps_the_config(char_corpus, tmp_path):
    run_dir = tmp_path / "run"
    main([f"--data_dir={char_corpus}", f"--run_dir={run_dir}", *TINY, "--max_iters=10"])
    config_before = (run_dir / "config.json").read_text()
    with pytest.raises(ConfigError, match="holds model .* but the config asks for"):
        main([f"--data_dir={char_corpus}", f"--run_dir={run_dir}", *TINY, "--max_iters=20", "--n_layer=3"])
    assert (run_dir / "config.json").read_text() == config_before


def test_run_started_from_pretrained_weights_resumes_without_them(char_corpus, tmp_path):
    vocab = json.loads((char_corpus / "corpus.json").read_text())["vocab_size"]
    hf_dir = _hf_model_dir(tmp_path, vocab_size=vocab)
    args = [f"--data_dir={char_corpus}", f"--run_dir={tmp_path / 'run'}", f"--init_from={hf_dir}", "--block_size=32",
            "--batch_size=4", "--eval_interval=5", "--eval_iters=2", "--device=cpu", "--compile=False"]
    main([*args, "--max_iters=5"])
    import shutil

    shutil.rmtree(hf_dir)  # the weights are gone (e.g. no hub access on the compute node): resume must not need them
    summary = main([*args, "--max_iters=10"])
    assert summary["step"] == 10


@pytest.mark.parametrize("option", RUN_TIME_MODEL_OPTIONS)
def test_run_time_model_option_parses_and_stays_out_of_model_args(option):
    """--fused_loss / --fused_mlp: on by default, parsed strictly, applied to the built model (and so to its
    blocks, which share its config), and left out of checkpoints' model_args (a run resumes under either)."""
    assert option in ("fused_loss", "fused_mlp")
    assert getattr(TrainConfig(), option) is True and getattr(GPTConfig(), option) is True
    cfg, _ = parse_config(TrainConfig, [f"--{option}=False", "--n_layer=1", "--n_head=1", "--n_embd=8", "--block_size=8"])
    assert getattr(cfg, option) is False
    model, model_args = build_model(cfg, 50, print)
    assert option not in model_args
    setattr(model.config, option, True)
    assert getattr(apply_run_time_options(model, cfg).config, option) is False
    assert getattr(model.transformer.h[0].mlp.config, option) is False
    with pytest.raises(ConfigError, match=option):
        parse_config(TrainConfig, [f"--{option}=sometimes"])


def test_a_finished_run_run_again_is_left_as_it_is(char_corpus, tmp_path):
    """The same command on a run that ended (a requeued job, a sweep submitted again) trains nothing and rewrites
    nothing: its end record (peak memory, time) stays the one of the run. A larger max_iters goes on from it."""
    run_dir = tmp_path / "run"
    args = [f"--data_dir={char_corpus}", f"--run_dir={run_dir}", *TINY, "--max_iters=6", "--eval_interval=3"]
    run_module("nanogpt.train", *args)
    before = run_files(run_dir)
    again = run_module("nanogpt.train", *args)
    assert f"{run_dir} already ended at step 6" in again.stdout and "nothing to do" in again.stdout
    assert "resumed" not in again.stdout
    assert run_files(run_dir) == before
    assert "already ended at step 6" in (run_dir / "train.log").read_text()
    longer = run_module("nanogpt.train", *args, "--max_iters=9")
    assert "resumed from step 6" in longer.stdout
    ends = [r for r in read_metrics(run_dir) if r["kind"] == "end"]
    assert ends[-1]["step"] == 9


def test_a_run_killed_before_its_end_record_gets_one(char_corpus, tmp_path):
    """Killed after the final checkpoint but before the end record: run again, it resumes at the last step, writes
    the end record (no peak memory of its own: it trained nothing) and leaves the checkpoint alone."""
    run_dir = tmp_path / "run"
    args = [f"--data_dir={char_corpus}", f"--run_dir={run_dir}", *TINY, "--max_iters=6", "--eval_interval=3"]
    run_module("nanogpt.train", *args)
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    assert json.loads(lines[-1])["kind"] == "end"
    metrics.write_text("".join(line + "\n" for line in lines[:-1]))
    checkpoint = (run_dir / "ckpt" / "step_0000006.pt").read_bytes()
    again = run_module("nanogpt.train", *args)
    assert "resumed from step 6" in again.stdout and "already ended" not in again.stdout
    end = read_metrics(run_dir)[-1]
    assert end["kind"] == "end" and end["step"] == 6 and end["peak_memory_bytes"] is None
    assert end["final_val_loss"] == json.loads(lines[-1])["final_val_loss"]
    assert (run_dir / "ckpt" / "step_0000006.pt").read_bytes() == checkpoint


def readme_command(prefix: str) -> list[str]:
    """The README's command that starts with `prefix`, its continuation lines joined, as arguments."""
    lines = (REPO_ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(prefix))
    text = lines[start]
    while text.endswith("\\"):
        start += 1
        text = text[:-1] + " " + lines[start].strip()
    return text.split()


def test_the_readme_tiny_baseline_command_learns_and_a_too_long_warmup_is_named(char_corpus, tmp_path):
    """The README's tiny CPU baseline, as written (data and run directories swapped for the test's): the loss must
    fall. With the default warmup_iters (2000) for 30 steps the learning rate peaked at 9e-6 and the loss went 4.47
    -> 4.45 without a word; that case now logs a warning naming warmup_iters."""
    args = readme_command("python -m nanogpt.train --data_dir=data/mycorpus")[3:]
    args = [f"--data_dir={char_corpus}" if a.startswith("--data_dir=") else
            f"--run_dir={tmp_path / 'run'}" if a.startswith("--run_dir=") else a for a in args]
    assert "--max_iters=30" in args
    proc = run_module("nanogpt.train", *args)
    assert "warning: warmup_iters" not in proc.stdout
    # the log says what runs: the fused ops are CUDA-only (it printed "fused_loss True, fused_mlp True" on CPU)
    assert "fused_loss off (runs on CUDA only), fused_mlp off (runs on CUDA only)" in proc.stdout
    vals = [m["val_loss"] for m in read_metrics(tmp_path / "run") if m["kind"] == "val"]
    assert vals[-1] < vals[0] - 0.5, vals
    slow = [a for a in args if not a.startswith(("--warmup_iters=", "--run_dir="))] + [f"--run_dir={tmp_path / 'slow'}"]
    proc = run_module("nanogpt.train", *slow)
    assert "warning: warmup_iters=2000 is not shorter than the run (max_iters=30)" in proc.stdout


def test_compiled_runs_of_one_folder_share_the_kernel_caches_beside_them(char_corpus, tmp_path, monkeypatch):
    """With torch.compile the trainer points Inductor's and Triton's caches at RUNS/.cache (unless set): the
    first run of a folder compiles into it and logs it empty, the next logs it warm; provenance.json says which
    caches a run used."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    runs = tmp_path / "runs"
    tiny = ["--device=cpu", "--compile=True", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
            "--batch_size=4", "--max_iters=2", "--eval_interval=2", "--eval_iters=1"]
    first = run_module("nanogpt.train", f"--data_dir={char_corpus}", f"--run_dir={runs / 'a'}", *tiny)
    inductor = runs / ".cache" / "inductor"
    assert f"kernel caches (empty): TORCHINDUCTOR_CACHE_DIR={inductor}, " in first.stdout + first.stderr
    assert any(inductor.rglob("*"))  # the compile wrote there
    second = run_module("nanogpt.train", f"--data_dir={char_corpus}", f"--run_dir={runs / 'b'}", *tiny)
    assert "kernel caches (warm)" in second.stdout + second.stderr
    caches = json.loads((runs / "b" / "provenance.json").read_text())["kernel_caches"]
    assert caches == {"TORCHINDUCTOR_CACHE_DIR": str(inductor), "TRITON_CACHE_DIR": str(runs / ".cache" / "triton"),
                      "warm": True}
    uncompiled = run_module("nanogpt.train", f"--data_dir={char_corpus}", f"--run_dir={runs / 'c'}", *tiny[:1],
                            "--compile=False", *tiny[2:])
    assert "kernel caches" not in uncompiled.stdout + uncompiled.stderr  # nothing compiles on the CPU without it
