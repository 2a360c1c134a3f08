"""Do attention backends agree on a trained speedrun model? One checkpoint, scored under each backend.

    python -m modded_nanogpt.bench.backend_agreement CKPT --backends=flex,fa4 [--data_dir=DIR] [--val_tokens=N]
        [--tokens=8192] [--seed=0]

CKPT: a checkpoint of the speedrun trainer (RUN_DIR/ckpt/step_N.pt from --save_checkpoints, or the weights-only
ckpt/weights/step_N.pt). For each backend it prints:
- the val loss of those weights (the run's validation: first val_tokens of the val split, the windows and YaRN
  state a validation after that step uses; compiled on CUDA, as the trainer validates);
- for every attention layer, on the model's own queries, keys and values of the first --tokens val tokens: the
  output and the gradients (dq, dk, dv, for one fixed random output gradient) against float32 attention with the
  explicit document + causal + window mask. Per tensor the relative error |x - ref| / |ref|, the signed bias
  <x - ref, ref> / |ref|^2 (negative: the backend's tensor is shorter than the reference along it) and the worst
  row (one position's one head) |x_r - ref_r| / |ref_r|, rows under the median norm counted at the median (an
  error at a few positions). The line
  "bf16 rounding" is the floor: the reference itself rounded to bfloat16.

A backend whose val loss differs from another's on the same weights differs in evaluation; equal val losses with
larger gradient errors or biases point at its backward. Backends that cannot run here are refused before anything
is loaded (fa4: a Hopper/Blackwell GPU with flash-attn-4; flex: CUDA; sdpa: anywhere).
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

import modded_nanogpt.model as model_module
from modded_nanogpt.attention_check import relative_error
from modded_nanogpt.data.loader import SequentialLoader
from modded_nanogpt.model import ATTENTION_BACKENDS, GPT, attention_mask, dense_mask, select_attention_backend
from modded_nanogpt.score_checkpoints import read_checkpoint
from modded_nanogpt.train_gpt import (
    ConfigError,
    Runtime,
    model_config,
    resolve_data,
    schedule_of,
    validate,
    validation_windows,
)
from nanogpt.config import exit_status
from nanogpt.data.shards import ShardError
from nanogpt.probe_store import ProbeError

TENSORS = ("out", "dq", "dk", "dv")
MAX_REFERENCE_TOKENS = 16384
MAX_SDPA_VAL_FORWARD = 16384  # sdpa validates with a dense (P, P) mask per forward: 16384^2 bools = 256 MiB


def signed_bias(x: torch.Tensor, ref: torch.Tensor) -> float:
    """<x - ref, ref> / |ref|^2: the part of the error along the reference (-0.01: x is 1% short of ref)."""
    x, ref = x.double(), ref.double()
    return ((x - ref).mul(ref).sum() / ref.pow(2).sum()).item()


def worst_row_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max over rows (one position's one head: the last dim) of |x_r - ref_r| / max(|ref_r|, median |ref_r|): an
    error confined to a few positions (a mask edge, a tile boundary), which the norms over the whole tensor average
    away. Rows below the median norm count against the median, so a near-zero row cannot dominate."""
    x, ref = x.double().flatten(0, -2), ref.double().flatten(0, -2)
    norms = ref.norm(dim=-1)
    return ((x - ref).norm(dim=-1) / norms.clamp(min=norms.median())).max().item()


def errors(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(relative error, signed bias, worst row) of x against ref."""
    return relative_error(x, ref), signed_bias(x, ref), worst_row_error(x, ref)


@dataclass
class AttentionCall:
    """One attention call of the model's forward, as `attend` received it (q, k, v detached)."""
    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    window_positions: int  # keys at most this many positions back
    shift: int  # 1: paired heads, each token two positions
    scale: float  # the temperature included


@dataclass
class Report:
    val_loss: dict[str, float] = field(default_factory=dict)
    # (layer, backend or "bf16 rounding") -> {tensor: (relative error, signed bias, worst row)}
    layers: dict[tuple[int, str], dict[str, tuple[float, float, float]]] = field(default_factory=dict)
    kinds: dict[int, str] = field(default_factory=dict)  # layer -> "short"/"long", "paired"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m modded_nanogpt.bench.backend_agreement",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("checkpoint", type=Path, help="a speedrun checkpoint (ckpt/step_N.pt or ckpt/weights/step_N.pt)")
    p.add_argument("--backends", default="flex,fa4",
                   help="comma-separated attention backends to compare (fa3, fa4, flex, sdpa; default flex,fa4)")
    p.add_argument("--data_dir", help="the corpus to validate on (default: the run's)")
    p.add_argument("--val_tokens", type=int, help="val tokens to score (default: the run's val_tokens; 0: no val loss)")
    p.add_argument("--tokens", type=int, default=8192,
                   help="val tokens of the per-layer comparison (the float32 reference holds a (P, P) mask per layer "
                        "kind; default 8192)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random output gradient (default 0)")
    args = p.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    known = [b for b in ATTENTION_BACKENDS if b != "auto"]
    unknown = [b for b in backends if b not in known]
    if not backends or unknown:
        raise ConfigError(f"--backends: {', '.join(unknown) or 'none given'} not among {', '.join(known)}")
    if args.tokens < 128 or args.tokens % 128 or args.tokens > MAX_REFERENCE_TOKENS:
        raise ConfigError(f"--tokens must be a positive multiple of 128 (flex's block) up to {MAX_REFERENCE_TOKENS} "
                          f"(the float32 reference holds (heads, P, P) scores, P twice the tokens in paired-head "
                          f"layers), got {args.tokens}")
    if args.val_tokens is not None and args.val_tokens < 0:
        raise ConfigError(f"--val_tokens must be >= 0, got {args.val_tokens}")
    args.backends = backends
    return args


def capture_attention_calls(model: GPT, inputs: torch.Tensor, short: int, long: int) -> list[AttentionCall]:
    """The attention calls of one eval forward of `inputs` (run with the sdpa backend: its scale carries the
    temperature, its windows are plain ints)."""
    calls = []
    original = model_module.attend

    def record(q, k, v, mask, cu_seqlens, window, shift, scale, backend, temperature=None, max_seqlen=None,
               window_unit=1):
        if temperature is not None:
            raise AssertionError("the sdpa path folds the temperature into the scale")
        calls.append(AttentionCall(len(calls), q.detach(), k.detach(), v.detach(), int(window) * window_unit, shift,
                                   float(scale)))
        return original(q, k, v, mask, cu_seqlens, window, shift, scale, backend, temperature, max_seqlen,
                        window_unit)

    backend, model_module.attend = model.attention_backend, record
    model.attention_backend = "sdpa"
    try:
        model.eval()
        with torch.no_grad():
            model.states(inputs, short, long)
    finally:
        model_module.attend, model.attention_backend = original, backend
        model.train()
    for call, layer in zip(calls, model.attn_layers, strict=True):
        call.layer = layer
    return calls


def reference_attention(call: AttentionCall, doc: torch.Tensor, dout: torch.Tensor) -> dict[str, torch.Tensor]:
    """out, dq, dk, dv of one captured call in float32 with the explicit (P, P) mask, written here (not through
    `attend`): softmax(q k^T * scale + mask) v per head, torch's autograd for the gradients."""
    positions_doc = doc.repeat_interleave(2) if call.shift else doc
    mask = dense_mask(positions_doc, call.window_positions)
    q, k, v = (t.to(torch.float32, copy=True).requires_grad_() for t in (call.q, call.k, call.v))  # fresh leaves
    scores = torch.einsum("phd,shd->hps", q, k) * call.scale
    out = torch.einsum("hps,shd->phd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)
    out.backward(dout.float())
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


@functools.cache
def compiled_attend():
    """`attend` under torch.compile, as the trainer's graph runs it (flex's Triton kernel, not its eager math);
    one compiled function for every layer: a graph per window, head pairing and backend."""
    return torch.compile(model_module.attend, fullgraph=True, dynamic=False)


def attention_with_grads(call: AttentionCall, doc: torch.Tensor, cu_seqlens: torch.Tensor, backend: str,
                         dtype: torch.dtype, dout: torch.Tensor, compiled: bool) -> dict[str, torch.Tensor]:
    """out, dq, dk, dv of one captured call under `backend`, inputs cast to dtype, for output gradient dout.
    doc: each token's document id; cu_seqlens: the same boundaries as the loader gives them (FA3/FA4)."""
    positions_doc = doc.repeat_interleave(2) if call.shift else doc
    q, k, v = (t.to(dtype, copy=True).requires_grad_() for t in (call.q, call.k, call.v))
    mask = attention_mask(positions_doc, call.window_positions, backend)
    window, temperature = call.window_positions, None
    if backend == "fa4":  # host scalars, as the trainer passes them (attend's docstring)
        window, temperature = torch.tensor(window, dtype=torch.int64), torch.ones((), dtype=torch.float32)
    fn = compiled_attend() if compiled else model_module.attend
    out = fn(q, k, v, mask, cu_seqlens, window, call.shift, call.scale, backend, temperature)
    out.backward(dout.to(out.dtype))
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def compare_layers(calls: list[AttentionCall], doc: torch.Tensor, cu_seqlens: torch.Tensor, backends: list[str],
                   seed: int, report: Report) -> None:
    device = calls[0].q.device
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    for call in calls:
        generator = torch.Generator(device=device).manual_seed(seed + call.layer)
        dout = torch.randn(call.q.shape, generator=generator, device=device)
        ref = reference_attention(call, doc, dout)
        report.kinds[call.layer] = f"window {call.window_positions}{', paired' if call.shift else ''}"
        rounded = {name: ref[name].to(torch.bfloat16) for name in TENSORS}
        report.layers[call.layer, "bf16 rounding"] = {
            name: errors(rounded[name], ref[name]) for name in TENSORS}
        for backend in backends:
            got = attention_with_grads(call, doc, cu_seqlens, backend, compute, dout, compiled=device.type == "cuda")
            report.layers[call.layer, backend] = {
                name: errors(got[name], ref[name]) for name in TENSORS}


def agreement(argv=None) -> Report:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for backend in args.backends:
        try:
            select_attention_backend(backend, device)
        except ValueError as e:
            raise ConfigError(f"--backends: {e}") from None
    if not args.checkpoint.is_file():
        raise ConfigError(f"{args.checkpoint}: no such checkpoint file (--save_checkpoints writes RUN_DIR/ckpt/)")
    payload, hp = read_checkpoint(args.checkpoint)
    if args.data_dir:
        hp.data_dir = args.data_dir
    if args.val_tokens is not None:
        hp.val_tokens = args.val_tokens
    if hp.val_tokens and hp.val_tokens < hp.val_batch_tokens:
        raise ConfigError(f"--val_tokens={hp.val_tokens} is less than one validation forward "
                          f"(val_batch_tokens={hp.val_batch_tokens}); give at least that, or 0")
    if hp.val_tokens and "sdpa" in args.backends and hp.val_batch_tokens > MAX_SDPA_VAL_FORWARD:
        raise ConfigError(f"--backends=sdpa validates with a dense (P, P) mask per forward: the run's val_batch_tokens="
                          f"{hp.val_batch_tokens} would need {hp.val_batch_tokens**2 / 2**30:.0f} GiB of it; give "
                          "--val_tokens=0 (the per-layer comparison only) or leave sdpa out")
    _, val_files = resolve_data(hp)
    rt = Runtime(0, 0, 1, device)
    model = GPT(model_config(hp)).to(device)
    model.load_state_dict(payload["model"])
    step = payload["step"]
    short, long = validation_windows(model, schedule_of(hp), step)
    print(f"checkpoint {args.checkpoint} (step {step}); windows {short},{long} blocks; device {device}", flush=True)

    report = Report()
    compiled = device.type == "cuda" and hp.compile
    torch._dynamo.config.cache_size_limit = 64  # a graph per backend and per compared layer
    if hp.val_tokens:
        for backend in args.backends:
            model.attention_backend = backend
            eval_fn = torch.compile(model, fullgraph=True, dynamic=False) if compiled else model
            report.val_loss[backend] = validate(model, eval_fn, val_files, hp, rt, short, long)
            print(f"val loss | {backend:5s} | {report.val_loss[backend]:.6f} over {hp.val_tokens:,} tokens", flush=True)

    loader = SequentialLoader(val_files, args.tokens, args.tokens, hp.bos_id, device=device)
    try:
        batch = loader.next_batch()
    finally:
        loader.close()
    doc = torch.cumsum((batch.inputs == hp.bos_id).to(torch.int32), 0)
    calls = capture_attention_calls(model, batch.inputs, short, long)
    compare_layers(calls, doc, batch.cu_seqlens, args.backends, args.seed, report)
    print("layer | kind | backend | " + " | ".join(f"{n} err, bias, worst row" for n in TENSORS))
    for (layer, backend), found in report.layers.items():
        cells = " | ".join(f"{e:.2e}, {b:+.1e}, {w:.1e}" for e, b, w in (found[n] for n in TENSORS))
        print(f"{layer:5d} | {report.kinds[layer]} | {backend} | {cells}")
    return report


def cli() -> int:
    return exit_status(lambda: agreement(sys.argv[1:]), {ConfigError: 2, ProbeError: 2, ShardError: 2})


if __name__ == "__main__":
    sys.exit(cli())
