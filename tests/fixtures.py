"""Fixtures shared by the CPU tests: a small local text corpus prepared by the real preparer."""

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
