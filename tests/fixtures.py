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


def reference_fa4_interface():
    """A stand-in for flash_attn.cute.interface on the CPU: FA4's two entry points as the model calls them,
    computed with the dense document + causal + window mask (cu_seqlens padded with empty documents, as the
    trainer pads them). Records each call's (softmax scale, left window)."""
    import types

    import torch

    from modded_nanogpt.model import dense_mask

    calls = []

    def probabilities(q, k, cu_seqlens, scale, window):
        positions = torch.arange(q.size(0))
        doc = torch.searchsorted(cu_seqlens[1:].long(), positions, right=True)
        scores = torch.einsum("phd,shd->hps", q.float(), k.float()) * scale
        return scores.masked_fill(~dense_mask(doc, window), float("-inf"))

    def attention(q, k, v, cu_seqlens, scale, window):
        scores = probabilities(q, k, cu_seqlens, scale, window)
        out = torch.einsum("hps,shd->phd", scores.softmax(-1), v.float()).to(q.dtype)
        return out.contiguous(), torch.logsumexp(scores, -1).contiguous()  # contiguous, as FA4's are

    def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                window_size_left, window_size_right, return_lse):
        assert causal and window_size_right == 0 and return_lse and cu_seqlens_q is cu_seqlens_k
        calls.append((softmax_scale, window_size_left))
        return attention(q, k, v, cu_seqlens_q, softmax_scale, window_size_left)

    def backward(q, k, v, out, dout, lse, softmax_scale, causal, softcap, window_size_left, window_size_right,
                 cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        calls.append((softmax_scale, window_size_left))
        # By hand (a custom op's body runs below autograd): P = softmax(S), O = P V, dS = P (dP - rowsum(dP P)).
        p = probabilities(q, k, cu_seqlens_q, softmax_scale, window_size_left).softmax(-1)
        dout = dout.float()
        dv = torch.einsum("hps,phd->shd", p, dout)
        dp = torch.einsum("phd,shd->hps", dout, v.float())
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * softmax_scale
        dq = torch.einsum("hps,shd->phd", ds, k.float())
        dk = torch.einsum("hps,phd->shd", ds, q.float())
        return tuple(g.to(q.dtype).contiguous() for g in (dq, dk, dv))

    interface = types.ModuleType("flash_attn.cute.interface")
    interface._flash_attn_fwd, interface._flash_attn_bwd = forward, backward
    return interface, calls


@pytest.fixture
def fa4_on_cpu(monkeypatch):
    import sys
    import types

    interface, calls = reference_fa4_interface()
    cute = types.ModuleType("flash_attn.cute")
    cute.interface = interface
    package = types.ModuleType("flash_attn")
    package.cute = cute
    for name, module in (("flash_attn", package), ("flash_attn.cute", cute), ("flash_attn.cute.interface", interface)):
        monkeypatch.setitem(sys.modules, name, module)
    return calls
