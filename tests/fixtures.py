"""Helpers shared by the tests: a small local text corpus prepared by the real preparer, running modules as a
user would, and a few training steps of a small baseline model (for comparing its fused paths to the plain one)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_module(module: str, *args, check: bool = True, timeout: float = 600, env: dict | None = None,
               **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m module args...` from the repo root, as a user would."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO_ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"python -m {module} {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def run_files(run_dir: Path) -> dict:
    """Every file of a run directory but the human log, by relative path -> bytes (to show nothing was rewritten)."""
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(Path(run_dir).rglob("*"))
            if p.is_file() and p.name != "train.log"}


@pytest.fixture(scope="session")
def text_source(tmp_path_factory) -> Path:
    """A fixed handful of the standard library's modules: a deterministic small corpus."""
    source = tmp_path_factory.mktemp("text_source")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "csv.py", "dataclasses.py",
                 "difflib.py", "fractions.py", "functools.py", "glob.py", "heapq.py", "inspect.py", "json/decoder.py",
                 "json/encoder.py", "pathlib.py", "pprint.py", "random.py", "shlex.py", "statistics.py",
                 "string.py", "textwrap.py", "typing.py", "uuid.py"):
        target = source / name.replace("/", "_")
        shutil.copy(stdlib / name, target)
    return source


@pytest.fixture(scope="session")
def char_corpus(tmp_path_factory, text_source) -> Path:
    """The local corpus, character-level, prepared by `python -m nanogpt.data.text_corpus`."""
    out = tmp_path_factory.mktemp("corpus_char")
    run_module("nanogpt.data.text_corpus", "--source", text_source, "--out", out, "--tokenizer", "char")
    return out


def small_gpt_losses(device: str, steps: int = 8, compile_model: bool = False, ignore_prefix: int = 0,
                     **config) -> list[float]:
    """Losses of `steps` AdamW steps of a 2-layer baseline GPT under bf16 autocast (on CUDA) on learnable data
    (100 of 50,304 tokens), from seed 0; `config` sets GPTConfig switches (fused_loss, fused_mlp, ...), and the
    first `ignore_prefix` targets of each row are ignored (-1). For comparing a model's fused paths to its plain
    one: the same seeds, data and steps."""
    import contextlib

    import torch

    from nanogpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=128, block_size=128, vocab_size=50304, **config)).to(device)
    optimizer = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), torch.device(device).type)
    step_fn = torch.compile(model) if compile_model else model
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda"
                else contextlib.nullcontext())
    g = torch.Generator(device=device).manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = torch.randint(0, 100, (2, 8, 128), device=device, generator=g)
        y[:, :ignore_prefix] = -1
        with autocast:
            _, loss = step_fn(x, y, return_logits=False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
