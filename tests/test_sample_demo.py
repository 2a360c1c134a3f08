"""Sampling from runs and checkpoints, its errors, and the baseline trainer's own demo (nanogpt.demo)."""

import pytest

from nanogpt import demo, sample
from nanogpt.config import ConfigError
from nanogpt.train import main as train_main
from tests.fixtures import run_module

TINY = ["--device=cpu", "--compile=False", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--max_iters=10", "--eval_interval=5", "--eval_iters=2"]


@pytest.fixture(scope="module")
def trained_run(char_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sample_run")
    train_main([f"--data_dir={char_corpus}", f"--run_dir={run_dir}", *TINY])
    return run_dir


def test_samples_from_a_run_directory_and_a_checkpoint(trained_run, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("import os\n")
    from_run = sample.main([f"--run_dir={trained_run}", f"--start=FILE:{prompt}", "--num_samples=3",
                            "--max_new_tokens=25", "--device=cpu"])
    assert len(from_run) == 3 and all(s.startswith("import os\n") and len(s) > len("import os\n") for s in from_run)
    checkpoint = trained_run / "ckpt" / "step_0000010.pt"
    from_file = sample.main([f"--checkpoint={checkpoint}", f"--start=FILE:{prompt}", "--num_samples=3",
                             "--max_new_tokens=25", "--device=cpu"])
    assert from_file == from_run  # same weights, same seed


@pytest.mark.parametrize("args, message", [
    ([], "exactly one of --run_dir, --checkpoint or --init_from"),
    (["--run_dir=/nonexistent/run", "--checkpoint=/x.pt"], "exactly one of"),
    (["--run_dir=/nonexistent/run"], "run_dir /nonexistent/run: not found"),
    (["--checkpoint=/nonexistent/x.pt"], "checkpoint /nonexistent/x.pt: not found"),
    (["--init_from=gpt3"], "init_from='gpt3'"),
])
def test_sample_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        sample.main(args)


def test_sample_from_run_without_checkpoint(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        sample.main([f"--run_dir={tmp_path / 'run'}"])


def test_sample_from_damaged_checkpoint_file(tmp_path):
    bad = tmp_path / "step_0000001.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = run_module("nanogpt.sample", f"--checkpoint={bad}", check=False)
    assert proc.returncode == 2 and f"checkpoint {bad}: cannot be read" in proc.stderr


def test_demo_prepares_trains_and_samples(text_source, tmp_path):
    result = demo.main(["--data_dir", str(tmp_path / "data"), "--runs_dir", str(tmp_path / "runs"), "--run_name", "d",
                        "--max_iters=30", "--device=cpu"])
    assert (tmp_path / "data" / "corpus.json").is_file()  # the local corpus, prepared from the stdlib
    assert result["run_dir"] == str(tmp_path / "runs" / "d")
    assert result["summary"]["step"] == 30 and len(result["samples"]) == 2
    assert (tmp_path / "runs" / "d" / "ckpt" / "step_0000030.pt").is_file()
