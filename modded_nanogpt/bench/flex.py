"""FlexAttention forward and forward+backward at the speedrun's stage-3 micro-step, for several `kernel_options`.

    python -m modded_nanogpt.bench.flex [--only=0,3,5] [--positions=49152] [--iters=20] [--jobs=4]

What is timed mirrors `modded_nanogpt.model` at stage 3 (one micro-step of 24 * 2048 = 49,152 tokens, windows
of 5 and 11 blocks of 128 tokens, default ModelConfig): the three mask kinds that `GPT.attention_masks` builds,
each with its layer count (10 attention layers: short (1, 4, 7, 8), long (3, 10), short + paired heads (0, 2,
5, 9), the paired ones on 2 * P positions with 3 heads, their window counted in those positions). Documents have random lengths (1 + exponential, mean
--mean_doc tokens, seeded, clipped to seq_len 2048 like the loader), doc ids as the model's forward builds them
(cumsum of the BOS flags, repeat_interleave(2) for paired heads), windows as 0-d int64 tensors times BLOCK (as
`train_gpt.window_inputs` passes them), masks from `flex_block_mask`, the score_mod `score * temperature` with
a 0-d fp32 temperature (the YaRN factor stage 3 has reached) and scale 0.1; q, k, v are (P, H, D) bf16 and
transposed to (1, H, P, D) inside the compiled function, as `attend` does. Forward timings are of the training
forward (inputs need grad: the kernel also writes the logsumexp). Per candidate the table gives each kind's
median forward and forward+backward times (CUDA events, `--iters` calls after warmup), the compile time of its
first call, and the max abs difference of out, dq, dk, dv against candidate 0 (the default) on the same
inputs; the summary weights the kinds by their layer counts times 8 micro-steps (one optimizer step on one GPU).
Errors (e.g. Triton "out of resource: shared memory") are reported per candidate and kind; the run goes on
(a CUDA error such as an illegal memory access poisons the process: rerun without that candidate). Candidate 0's
rows print the scale of its results (max |x| of out, dq, dk, dv): a reordered accumulation differs by bf16 ulps,
a config that breaks results by amounts of that scale.

With --jobs > 1 the candidates are first compiled in parallel child processes (same script, --compile_only),
which fill the on-disk Inductor/Triton caches; the timing process then compiles each candidate again from those
caches (children still running after --precompile_timeout seconds are stopped). --jobs=1 compiles in the timing
process only. The compile column is the first call's wall time in the timing process (cache hits after the
parallel compile). If all candidates do not fit one 10-minute command, split them with --only.

kernel_options, as read in the torch source of the local venv (torch 2.13.0+cpu; the GPU has torch 2.11, whose
source was not available here: the script prints the GPU's own defaults and checks every key against its
FlexKernelOptions before running):
  torch/nn/attention/flex_attention.py: class FlexKernelOptions (keys num_warps, num_stages, BLOCK_M, BLOCK_N,
    BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, PRESCALE_QK, ROWS_GUARANTEED_SAFE, BLOCKS_ARE_CONTIGUOUS, WRITE_DQ,
    FORCE_USE_FLEX_ATTENTION, USE_TMA, BACKEND, ROCm kpack/matrix_instr_nonkdim/waves_per_eu); any key may carry
    a fwd_ or bwd_ prefix to apply to one pass only.
  torch/_inductor/kernel/flex/flex_attention.py: the forward lowering strips fwd_ (drops bwd_ keys), then fills
    num_stages, num_warps, BLOCK_M, BLOCK_N from the default config (USE_TMA defaults to False on CUDA, and falls
    back to False where `can_use_tma` rejects the inputs); the backward lowering does the same with bwd_ and
    BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2.
  Constraints: the forward template asserts SPARSE_Q_BLOCK_SIZE % BLOCK_M == 0 and SPARSE_KV_BLOCK_SIZE %
    BLOCK_N == 0 (the BlockMask's blocks are 128 x 128 here); templates/flex_backwards.py.jinja asserts
    BLOCK_N1 % BLOCK_M1 == 0 and BLOCK_M2 % BLOCK_N2 == 0 (and the SPARSE_* // BLOCK_* multiples must be whole).
  Defaults, torch/_inductor/template_heuristics/triton.py, class CUDAConfigHeuristic (no max_autotune):
    forward, h100_default_flex_config[(bfloat16, 128)] = FlexConfig(128, 64, 3, 8): BLOCK_M 128, BLOCK_N 64,
    3 stages, 8 warps (capability == (9, 0));
    backward, config_map["sm90"] for head_dim <= 128 = FlexBwDConfig(64, 128, 128, 64, 3, 8): BLOCK_M1 64,
    BLOCK_N1 128, BLOCK_M2 128, BLOCK_N2 64, 3 stages, 8 warps.
  BLOCKS_ARE_CONTIGUOUS is not a candidate: a query block's partial key blocks (diagonal, window edge, document
  starts) are not contiguous, so it would give wrong results. ROWS_GUARANTEED_SAFE holds (every position may
  attend to itself). PRESCALE_QK multiplies q by scale * log2(e) before QK^T: the score_mod is linear in the
  score, so results stay the same up to rounding.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time

import torch

from modded_nanogpt.model import BLOCK, ModelConfig, flex_block_mask

STAGE3_POSITIONS = 24 * 2048  # tokens per micro-step at stage 3 (batch_schedule 24 sequences of seq_len)
SEQ_LEN = 2048  # the loader clips documents to seq_len
MICRO_STEPS = 8  # train_gpt.TOTAL_MICRO_STEPS: micro-steps per optimizer step (one GPU)
ATTN_SCALE = 0.1  # ModelConfig.attn_scale
DEVICE = "cuda"
# The YaRN scale factor after the long window grew 3 -> 7 -> 11 blocks (GPT.set_long_window).
STAGE3_TEMPERATURE = (0.2 * math.log(7 / 3) + 1) * (0.2 * math.log(11 / 7) + 1)


def _bwd(m1, n1, m2, n2, stages, warps):
    return {"bwd_BLOCK_M1": m1, "bwd_BLOCK_N1": n1, "bwd_BLOCK_M2": m2, "bwd_BLOCK_N2": n2,
            "bwd_num_stages": stages, "bwd_num_warps": warps}


SM90_FWD_DEFAULT = {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 8}

# (short name, kernel_options). 0 must stay None: it is the reference of the difference columns.
CANDIDATES: list[tuple[str, dict | None]] = [
    ("default (None)", None),
    ("2.13 sm90 defaults pinned", {**SM90_FWD_DEFAULT, **_bwd(64, 128, 128, 64, 3, 8)}),
    ("bwd 64/128/128/64 s2 w8", _bwd(64, 128, 128, 64, 2, 8)),
    ("bwd 64/128/128/64 s4 w8", _bwd(64, 128, 128, 64, 4, 8)),
    ("bwd 64/128/128/64 s3 w4", _bwd(64, 128, 128, 64, 3, 4)),
    ("bwd 32/128/128/32 s3 w8", _bwd(32, 128, 128, 32, 3, 8)),
    ("bwd 64/64/64/64 s3 w4", _bwd(64, 64, 64, 64, 3, 4)),
    ("USE_TMA", {"USE_TMA": True}),
    ("ROWS_GUARANTEED_SAFE", {"ROWS_GUARANTEED_SAFE": True}),
    ("PRESCALE_QK", {"PRESCALE_QK": True}),
    ("fwd 128/128 s2 w8", {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_stages": 2, "fwd_num_warps": 8}),
]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m modded_nanogpt.bench.flex", description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help="comma-separated candidate indices (default: all)")
    p.add_argument("--positions", type=int, default=STAGE3_POSITIONS, help="positions P (multiple of 128)")
    p.add_argument("--windows", default="5,11", help="short,long windows in blocks of 128 tokens (stage 3: 5,11)")
    p.add_argument("--mean_doc", type=float, default=1000.0, help="mean document length before clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=20, help="timed calls per measurement (median)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    p.add_argument("--jobs", type=int, default=4, help="parallel compile processes before timing (1: none)")
    p.add_argument("--precompile_timeout", type=float, default=420.0, help="seconds for the parallel compile")
    p.add_argument("--compile_only", action="store_true", help="(child processes) compile, run once, exit")
    args = p.parse_args(argv)
    try:
        args.only = [int(i) for i in args.only.split(",") if i.strip()] or list(range(len(CANDIDATES)))
        args.windows = tuple(int(w) for w in args.windows.split(","))
    except ValueError as e:
        p.error(f"--only and --windows take comma-separated integers ({e})")
    bad = [i for i in args.only if not 0 <= i < len(CANDIDATES)]
    if bad:
        p.error(f"--only: no candidates {bad} (0..{len(CANDIDATES) - 1})")
    if len(args.windows) != 2:
        p.error("--windows takes two values: short,long")
    if args.positions < BLOCK or args.positions % BLOCK:
        p.error(f"--positions must be a positive multiple of {BLOCK}, got {args.positions}")
    return args


def describe(options: dict | None) -> str:
    return "None" if options is None else ", ".join(f"{k}={v}" for k, v in options.items())


def block_sizes_problem(options: dict | None) -> str | None:
    """Why these options' explicit block sizes cannot run on 128 x 128 mask blocks (None if they can)."""
    if not options:
        return None
    plain = {k.removeprefix("fwd_").removeprefix("bwd_"): v for k, v in options.items()}
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"):
        if key in plain and BLOCK % plain[key]:
            return f"{key}={plain[key]} does not divide the mask's block size {BLOCK}"
    for big, small in (("BLOCK_N1", "BLOCK_M1"), ("BLOCK_M2", "BLOCK_N2")):
        if big in plain and small in plain and plain[big] % plain[small]:
            return f"{big} % {small} != 0 (a static assertion of the backward template)"
    return None


def unknown_keys(options: dict | None) -> list[str]:
    """Keys (prefix stripped) that this torch's FlexKernelOptions does not declare."""
    from torch.nn.attention.flex_attention import FlexKernelOptions

    known = FlexKernelOptions.__optional_keys__ | FlexKernelOptions.__required_keys__
    return [k for k in options or {} if k.removeprefix("fwd_").removeprefix("bwd_") not in known]


def attention_kinds(cfg: ModelConfig) -> dict[tuple[bool, bool], int]:
    """{(long window?, paired heads?): number of layers}, as GPT.attention_masks groups the layers."""
    kinds: dict[tuple[bool, bool], int] = {}
    for layer in range(cfg.num_layers):
        if layer in cfg.attention_skip_layers:
            continue
        kind = (layer in cfg.long_window_layers, layer in cfg.paired_head_layers)
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def kind_name(kind) -> str:
    long, paired = kind
    return ("long" if long else "short") + (" paired" if paired else "")


def document_ids(positions: int, mean_doc: float, seed: int) -> tuple[torch.Tensor, int]:
    """Per-token document ids as GPT.forward builds them (cumsum of the BOS flags, int32, from 1), for a stream
    of documents of 1 + exponential(mean_doc - 1) tokens clipped to SEQ_LEN; the last one cut at the end."""
    g = torch.Generator().manual_seed(seed)
    draws = int(positions / max(mean_doc * 0.5, 1.0)) + 64  # plenty: clipped lengths average > mean / 2
    lengths = (1 + torch.empty(draws, dtype=torch.float64).exponential_(1.0 / max(mean_doc - 1, 1e-9), generator=g)
               .floor().long()).clamp(max=SEQ_LEN)
    starts = torch.cumsum(lengths, 0) - lengths
    starts = starts[starts < positions]
    is_doc_start = torch.zeros(positions, dtype=torch.bool)
    is_doc_start[starts] = True
    return torch.cumsum(is_doc_start.to(torch.int32), 0), starts.numel()


def make_attend(kernel_options: dict | None, temperature: torch.Tensor):
    """The flex branch of model.attend with kernel_options, compiled like the trainer's model."""
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * temperature

    def attend_flex(q, k, v, mask):
        qt, kt, vt = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, P, D)
        out = flex_attention(qt, kt, vt, score_mod=score_mod, block_mask=mask, scale=ATTN_SCALE,
                             kernel_options=kernel_options)
        return out[0].transpose(0, 1)

    return torch.compile(attend_flex, fullgraph=True, dynamic=False)


def median_ms(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    torch.cuda.synchronize()
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def short_error(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    hint = next((line for line in lines if "out of resource" in line.lower() or "Error" in line), lines[0] if lines else "")
    return f"{type(e).__name__}: {hint}"[:200]


def print_defaults():
    """The installed torch's FlexKernelOptions keys and its default flex configs for bf16, head dim 128."""
    import triton
    from torch.nn.attention.flex_attention import FlexKernelOptions

    cap = torch.cuda.get_device_capability()
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()} (sm{cap[0]}{cap[1]})")
    keys = sorted(FlexKernelOptions.__optional_keys__ | FlexKernelOptions.__required_keys__)
    print(f"FlexKernelOptions keys: {', '.join(keys)}")
    try:
        from torch._inductor.choices import InductorChoices

        choices = InductorChoices()
        fwd = choices.get_flex_attention_fwd_configs(128, torch.bfloat16, "cuda")
        bwd = choices.get_flex_attention_bwd_configs(128, torch.bfloat16, "cuda")
        print(f"default forward configs (bf16, D=128): {fwd}")
        print(f"default backward configs (bf16, D=128): {bwd}")
    except Exception as e:  # private API: report, do not fail
        print(f"(could not read the default flex configs: {short_error(e)})")


def build_problems(args, device):
    """Per mask kind the model has: (kind, layers, mask, q, k, v, grad_out), inputs seeded per kind."""
    cfg = ModelConfig()
    doc, num_docs = document_ids(args.positions, args.mean_doc, args.seed)
    doc = doc.to(device)
    short_tokens, long_tokens = (torch.tensor(w, dtype=torch.int64, device=device) * BLOCK for w in args.windows)
    problems = []
    for n, (kind, layers) in enumerate(sorted(attention_kinds(cfg).items())):
        long, paired = kind
        positions_doc = doc.repeat_interleave(2) if paired else doc
        mask = flex_block_mask(positions_doc, long_tokens if long else short_tokens)
        P, H, D = positions_doc.numel(), cfg.num_heads // 2 if paired else cfg.num_heads, cfg.head_dim
        g = torch.Generator(device=device).manual_seed(args.seed * 100 + n)
        q, k, v = (torch.randn(P, H, D, device=device, generator=g, dtype=torch.bfloat16).requires_grad_()
                   for _ in range(3))
        grad_out = torch.randn(P, H, D, device=device, generator=g, dtype=torch.bfloat16)
        problems.append((kind, layers, mask, q, k, v, grad_out))
    lengths = torch.bincount(doc.cpu())[1:]  # tokens per document (ids start at 1)
    print(f"{args.positions} positions, {num_docs} documents (mean {lengths.float().mean():.0f}, max {lengths.max()} "
          f"tokens), windows {args.windows[0]} / {args.windows[1]} blocks; kinds: "
          + ", ".join(f"{kind_name(kind)} ({layers} layers, {mask.seq_lengths[0]} positions, {q.size(1)} heads, "
                      f"{mask.kv_num_blocks.sum().item() + mask.full_kv_num_blocks.sum().item()} of "
                      f"{(mask.seq_lengths[0] // BLOCK) ** 2} block pairs visited)"
                      for kind, layers, mask, q, *_ in problems), flush=True)
    return problems


def precompile(args):
    """Compile the selected candidates in parallel child processes (fills the on-disk caches)."""
    todo = list(args.only)
    common = [f"--positions={args.positions}", f"--windows={args.windows[0]},{args.windows[1]}",
              f"--mean_doc={args.mean_doc}", f"--seed={args.seed}", "--jobs=1", "--compile_only"]
    t0 = time.perf_counter()
    running: list[tuple[int, subprocess.Popen]] = []
    failed = []
    deadline = t0 + args.precompile_timeout
    while todo or running:
        if time.perf_counter() > deadline:  # a stuck compile must not eat the timing run's time
            for i, child in running:
                child.kill()
                child.wait()
                failed.append(i)
            failed.extend(todo)
            break
        while todo and len(running) < args.jobs:
            i = todo.pop(0)
            cmd = [sys.executable, "-m", "modded_nanogpt.bench.flex", f"--only={i}", *common]
            running.append((i, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        time.sleep(0.5)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            if item[1].returncode:
                failed.append(item[0])
    note = f" (candidates {failed} exited non-zero or were stopped; they compile below)" if failed else ""
    print(f"parallel compile of {len(args.only)} candidates in {args.jobs} processes: "
          f"{time.perf_counter() - t0:.0f} s{note}", flush=True)


def main(argv) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if not torch.cuda.is_available():
        print("modded_nanogpt.bench.flex: no CUDA device; nothing to time (FlexAttention's Triton kernels need a GPU). "
              "Candidates:")
        for i, (name, options) in enumerate(CANDIDATES):
            print(f"  {i:2d}  {name:28s} {describe(options)}")
        return 0

    torch._dynamo.config.cache_size_limit = 64  # as train_gpt; each candidate also starts from a reset
    device = torch.device(DEVICE)
    if not args.compile_only:
        print_defaults()
    problems = build_problems(args, device)
    if args.jobs > 1 and len(args.only) > 1 and not args.compile_only:
        precompile(args)
    temperature = torch.tensor(STAGE3_TEMPERATURE, device=device)

    reference = {}  # kind -> (out, dq, dk, dv) of candidate 0
    summary = []
    if not args.compile_only:
        print(f"\n{'#':>2}  {'kind':13s} {'fwd ms':>8s} {'fwd+bwd':>8s} {'bwd ms':>8s} {'compile':>8s}   "
              f"max|diff| vs #0: out, dq, dk, dv", flush=True)
    for i in args.only:
        name, options = CANDIDATES[i]
        problem = block_sizes_problem(options)
        unknown = unknown_keys(options)
        if problem or unknown:
            reason = problem or f"keys {unknown} unknown to this torch's FlexKernelOptions"
            print(f"{i:2d}  {name}: skipped: {reason}", flush=True)
            summary.append((i, name, None, reason))
            continue
        torch._dynamo.reset()
        fn = make_attend(options, temperature)
        step = [0.0, 0.0]  # weighted per optimizer step: fwd, fwd+bwd
        worst = [0.0] * 4
        errors = []
        for kind, layers, mask, q, k, v, grad_out in problems:
            label = kind_name(kind)
            try:
                t0 = time.perf_counter()
                out = fn(q, k, v, mask)
                grads = torch.autograd.grad(out, (q, k, v), grad_out)
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - t0
                if args.compile_only:
                    continue
                results = (out.detach(), *grads)
                if i == 0:
                    reference[kind] = results
                diffs = ([(a.float() - b.float()).abs().max().item() for a, b in zip(results, reference[kind], strict=True)]
                         if kind in reference else None)
                scale_text = ("   (scale: max|x| " + ", ".join(f"{r.abs().max().item():.2e}" for r in results) + ")"
                              if i == 0 else "")
                del out, grads, results

                def forward(fn=fn, q=q, k=k, v=v, mask=mask):
                    return fn(q, k, v, mask)

                def forward_backward(fn=fn, q=q, k=k, v=v, mask=mask, grad_out=grad_out):
                    return torch.autograd.grad(fn(q, k, v, mask), (q, k, v), grad_out)

                fwd_ms = median_ms(forward, args.iters, args.warmup)
                both_ms = median_ms(forward_backward, args.iters, args.warmup)
            except Exception as e:  # e.g. shared memory out of resources: report and go on
                errors.append(f"{label}: {short_error(e)}")
                print(f"{i:2d}  {label:13s} ERROR {short_error(e)}", flush=True)
                torch._dynamo.reset()
                continue
            step[0] += MICRO_STEPS * layers * fwd_ms
            step[1] += MICRO_STEPS * layers * both_ms
            diff_text = "-" if diffs is None else ", ".join(f"{d:.2e}" for d in diffs)
            if diffs is not None:
                worst = [max(w, d) for w, d in zip(worst, diffs, strict=True)]
            print(f"{i:2d}  {label:13s} {fwd_ms:8.3f} {both_ms:8.3f} {both_ms - fwd_ms:8.3f} {compile_s:7.1f}s   "
                  f"{diff_text}{scale_text}", flush=True)
        if args.compile_only:
            continue
        summary.append((i, name, None if errors else (step, worst if reference else None),
                        "; ".join(dict.fromkeys(e.split(": ", 1)[1] for e in errors))))  # each distinct error once

    if args.compile_only:
        return 0
    print(f"\nPer optimizer step ({MICRO_STEPS} micro-steps x the layers of each kind); vs #0 = fwd+bwd change:")
    print(f"{'#':>2}  {'candidate':28s} {'fwd ms':>8s} {'fwd+bwd':>8s} {'bwd ms':>8s} {'vs #0':>8s}   max|diff| out, dq, dk, dv")
    base = next((s[2][0][1] for s in summary if s[0] == 0 and s[2]), None)
    for i, name, result, error in summary:
        if result is None:
            print(f"{i:2d}  {name:28s} {error}")
            continue
        (fwd, both), worst = result
        change = f"{both - base:+8.1f}" if base is not None else f"{'-':>8s}"
        diff_text = "-" if worst is None else ", ".join(f"{d:.2e}" for d in worst)
        print(f"{i:2d}  {name:28s} {fwd:8.1f} {both:8.1f} {both - fwd:8.1f} {change}   {diff_text}")
    print("\nOptions:")
    for i in args.only:
        print(f"  {i:2d}  {describe(CANDIDATES[i][1])}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
