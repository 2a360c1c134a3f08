"""Profile one speedrun step shape on a GPU: compile, time steps, and print the top kernels.

    python -m modded_nanogpt.bench.profile [--stage=2] [--steps=6] [--no_profile] [--host_profile] [--key=value ...]
    python -m modded_nanogpt.bench.profile --bench_head [--rows=49152]

Synthetic packed batches (random tokens, a BOS every ~800 tokens; --blocking_loader copies them from pageable
memory, as a loader without pinned buffers does) or, with --data_dir=DIR, the trainer's loader on real shards; the
trainer's own model, optimizer and step function. Prints the median step time, then the profiler's top CUDA
kernels for two steps and the GPU's busy time against the wall time (the difference: the GPU waiting).
--host_profile adds Python's profile of the host queuing two steps (where its time goes when it is the bottleneck).
--bench_head times the backward of the FP8 head + softcapped loss at one micro-step's size: the CE backward
then the quantizer (two kernels) against the fused CE-gradient + e5m2 kernel (both transposes).
"""

import argparse
import cProfile
import dataclasses
import os
import pstats
import statistics
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from modded_nanogpt.bench import require_cuda
from modded_nanogpt.data.loader import DistributedBOSLoader, PackedBatch, to_device_async
from modded_nanogpt.model import GPT, select_attention_backend
from modded_nanogpt.train_gpt import (
    FA4_CACHE_DIR,
    FA4_CACHE_SWITCH,
    TOTAL_MICRO_STEPS,
    ConfigError,
    Runtime,
    build_optimizer,
    model_config,
    parse_hyperparameters,
    resolve_data,
    schedule_of,
    start_fa4_precompile,
    train_step,
)


class SyntheticLoader:
    def __init__(self, bos_id, vocab, device, blocking=False):
        self.tokens_per_rank, self.bos_id, self.vocab, self.device = 0, bos_id, vocab, device
        self.blocking = blocking
        self.generator = torch.Generator().manual_seed(0)

    def next_batch(self):
        n = self.tokens_per_rank
        stream = torch.randint(0, self.vocab, (n + 1,), generator=self.generator)
        stream[::800] = self.bos_id
        starts = torch.arange(0, n, 800, dtype=torch.int32)
        cu = torch.cat([starts, torch.tensor([n], dtype=torch.int32)])
        if self.blocking:  # the old loaders' copies from pageable memory: each waits for the GPU to drain
            return PackedBatch(stream[:-1].int().to(self.device), stream[1:].to(self.device), cu.to(self.device))
        inputs, targets, cu = (to_device_async(t, self.device) for t in (stream[:-1].int(), stream[1:], cu))
        return PackedBatch(inputs, targets, cu)


def bench_head(rows: int):
    from triton.testing import do_bench

    from modded_nanogpt.kernels import common, cross_entropy, fp8

    vocab, g = 50304, torch.Generator(device="cuda").manual_seed(0)
    logits = (3 * torch.randn(rows, vocab, generator=g, device="cuda")).bfloat16()
    targets = torch.randint(0, vocab, (rows,), generator=g, device="cuda")
    weights = torch.tensor([1.0], device="cuda")
    _, lse, _ = cross_entropy._softcapped_ce_forward(logits, targets, weights, [], 23.0, 5.0, 7.5)
    grad_rows = torch.full((1,), 1.0 / rows, device="cuda").expand(rows)
    scale = 2.0**-10 / rows

    def apart():
        grad = cross_entropy._softcapped_ce_backward_op(grad_rows, logits, targets, weights, [], lse, 23.0, 5.0,
                                                        7.5)
        return fp8._quantize_both_layouts(grad, scale, torch.float8_e5m2)

    def grad_fp8(**kw):
        return lambda: cross_entropy._softcapped_ce_grad_fp8(grad_rows, logits, targets, weights, [], lse, 23.0, 5.0,
                                                             7.5, scale, **kw)

    fused = grad_fp8()

    def forward():
        return cross_entropy._softcapped_ce_forward(logits, targets, weights, [], 23.0, 5.0, 7.5)

    def with_sigmoid(fn, fast):
        def run():
            common.FAST_SIGMOID = fast
            return fn()
        return run

    fast_default = common.FAST_SIGMOID
    for fast in (False, True):
        common.FAST_SIGMOID = fast
        ms = do_bench(forward, warmup=50, rep=300, return_mode="median")
        print(f"head forward  | CE loss + lse, fast sigmoid {fast!s:5} | {ms:7.3f} ms | "
              f"{rows * vocab * 2 / 1e9 / ms:6.2f} TB/s at 2 B/elt", flush=True)
    common.FAST_SIGMOID = fast_default
    variants = {"CE backward + quantize": apart, "fused CE-gradient + e5m2 (the default)": fused,
                "fused, exact sigmoid": with_sigmoid(fused, False), "fused, fast sigmoid": with_sigmoid(fused, True)}
    # Pointer loads and stores: tile shapes with one tile per program, then programs walking col_tiles tiles
    # along their rows, each tile's load issued before the one before it is computed (prefetch) or not.
    for block_r, block_c, warps in ((64, 64, 8), (64, 128, 4), (64, 128, 8), (128, 128, 8), (32, 256, 4),
                                    (64, 256, 8), (128, 64, 4), (32, 128, 4)):
        variants[f"pointers {block_r}x{block_c}, {warps} warps, 1 tile"] = grad_fp8(
            block_r=block_r, block_c=block_c, num_warps=warps, col_tiles=1, prefetch=False, tma=False)
    for block_r, block_c, col_tiles, prefetch in ((64, 64, 1, False), (64, 64, 16, False), (64, 64, 32, False),
                                                  (64, 64, 4, True), (64, 64, 16, True), (64, 64, 32, True),
                                                  (32, 128, 16, True)):
        variants[f"pointers {block_r}x{block_c}/4, {col_tiles} tiles each{', prefetch' if prefetch else ''}"] = (
            grad_fp8(block_r=block_r, block_c=block_c, col_tiles=col_tiles, prefetch=prefetch, tma=False))
    # Tiles moved by TMA descriptors, the walk's loads pipelined over `stages` stages by Triton.
    for block_r, block_c, col_tiles, stages in ((64, 64, 1, 1), (64, 64, 16, 1), (64, 64, 16, 2), (64, 64, 16, 3),
                                                (64, 64, 32, 2), (32, 128, 16, 2)):
        variants[f"TMA {block_r}x{block_c}/4, {col_tiles} tiles each, {stages} stages"] = grad_fp8(
            block_r=block_r, block_c=block_c, col_tiles=col_tiles, tma=True, stages=stages)
    want = apart()
    torch.cuda.synchronize()
    gbytes = rows * vocab * (2 + 1 + 1) / 1e9
    common.FAST_SIGMOID = fast_default
    for name, fn in variants.items():
        got = fn()
        same = [(a.view(torch.uint8) != b.view(torch.uint8)).sum().item() for a, b in zip(got, want, strict=True)]
        ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
        print(f"head backward | {name:50s} | {ms:7.3f} ms | {gbytes / ms:6.2f} TB/s at 4 B/elt | codes differing {same}",
              flush=True)


KERNEL_GROUPS = [  # (group, substrings of the kernel name), first match wins
    ("flex attention", ("flex_attention", "flex_decoding")),
    # FA4's CuTe DSL kernels are named after their class (FlashAttentionForwardSm90, FlashAttentionBackwardSm90,
    # FlashAttentionBackwardPreprocess/Postprocess) under a "kernel_cutlass" prefix: ahead of cuBLAS's "cutlass".
    ("FA4 attention forward", ("flashattentionforward",)),
    ("FA4 attention backward", ("flashattentionbackward",)),
    ("relu2 TMA", ("_relu2",)),
    ("softcapped CE (+ e5m2 grad)", ("softcapped_ce",)),
    ("fp8 quantize", ("quantize_fp8",)),
    ("fp8 matmul", ("f8f8", "e4m3", "e5m2", "fp8")),
    ("cuBLAS bf16", ("gemm", "sm90_xmma", "nvjet", "cutlass", "ampere_bf16", "cublas")),
    ("Polar Express symmetric", ("symmetric_matmul",)),
    ("Inductor reduction", ("triton_red_", "triton_per_")),
    ("Inductor pointwise", ("triton_poi_",)),
    ("copies / fills", ("memcpy", "memset", "copy_", "fill_", "elementwise_kernel", "vectorized_")),
]


def kernel_group(name: str) -> str:
    lowered = name.lower()
    for group, keys in KERNEL_GROUPS:
        if any(k in lowered for k in keys):
            return group
    return "other: " + name[:40]


def parse_args(argv):
    """The profile's own options; every other argument is a trainer setting (--key=value), checked by the trainer's
    parser, so a misspelt option stops here naming it."""
    p = argparse.ArgumentParser(prog="python -m modded_nanogpt.bench.profile", allow_abbrev=False,
                                description=__doc__.split("\n")[0],
                                epilog="Other arguments are the trainer's settings (python -m modded_nanogpt.train_gpt "
                                       "--help), e.g. --data_dir=DIR --vocab_size=0 --bos_id=-1 for real shards.")
    p.add_argument("--stage", type=int, default=2, help="schedule stage to profile (default schedule: 0-2, 3: extension)")
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--no_profile", action="store_true", help="times only, no torch.profiler table")
    p.add_argument("--host_profile", action="store_true", help="add Python's profile of the host queuing two steps")
    p.add_argument("--blocking_loader", action="store_true", help="synthetic batches copied from pageable memory")
    p.add_argument("--bench_head", action="store_true", help="time the FP8 head's backward variants instead")
    p.add_argument("--fa4_precompile", action="store_true",
                   help="attention_backend=fa4: compile FA4's kernels beside the first graph, in a child process, "
                        "as the trainer does (through FA4's disk cache, in a new temporary directory unless "
                        "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR is set); without it the first step's first call "
                        "compiles them")
    p.add_argument("--rows", type=int, default=49152, help="--bench_head: rows of one micro-step")
    args, settings = p.parse_known_args(argv)
    try:
        hp = parse_hyperparameters(settings)
    except ConfigError as e:
        p.error(str(e))
    if args.steps <= 0 or args.rows <= 0 or args.stage < 0:
        p.error("--steps and --rows must be positive, --stage not negative")
    return args, settings, hp


def main(argv):
    args, settings, hp = parse_args(argv)
    stage, steps = args.stage, args.steps
    schedule = schedule_of(hp)
    if stage >= len(schedule.stage_starts):
        raise SystemExit(f"--stage={stage}: this schedule has stages 0-{len(schedule.stage_starts) - 1}")
    require_cuda("modded_nanogpt.bench.profile")
    if args.fa4_precompile:  # read when flash_attn.cute is first imported
        os.environ[FA4_CACHE_SWITCH] = "1"
        os.environ.setdefault(FA4_CACHE_DIR, tempfile.mkdtemp(prefix="fa4_cute_"))
    if args.bench_head:
        bench_head(args.rows)
        return
    rt = Runtime(0, 0, 1, torch.device("cuda"))
    if hp.data_dir and not any(a.startswith("--val_tokens=") for a in settings):
        hp.val_tokens = 0  # the profile never validates: a small corpus's val shard need not hold the default
    train_files = resolve_data(hp)[0] if hp.data_dir else None  # real shards (vocab/bos from corpus.json)
    model = GPT(model_config(hp)).cuda()
    model.attention_backend = select_attention_backend(hp.attention_backend, rt.device)
    print(f"attention backend: {model.attention_backend}")
    model.max_doc_tokens = hp.seq_len  # as the trainer: the loader clips documents to seq_len
    model.embedding_grads = hp.embedding_grads
    plan = schedule.at(schedule.stage_starts[stage] + 2)
    if plan.step > (schedule.untie_step or 0):
        model.untie()
    step_fn = torch.compile(model, fullgraph=True, dynamic=False)
    optimizer = build_optimizer(model, hp, rt)
    if train_files:
        torch._dynamo.config.cache_size_limit = 64  # as the trainer
        loader = DistributedBOSLoader(train_files, plan.batch_tokens // TOTAL_MICRO_STEPS, hp.seq_len, hp.bos_id,
                                      device=rt.device)
    else:
        loader = SyntheticLoader(hp.bos_id, 50257, rt.device, blocking=args.blocking_loader)
    # The trainer's steps alternate: Adam updates on odd steps only (NorMuon every step). Profiled steps do too.
    plans = [dataclasses.replace(plan, untie_after=False, adam_step=odd) for odd in (False, True)]
    t0 = time.perf_counter()
    precompile = None
    if model.attention_backend == "fa4" and args.fa4_precompile:
        precompile = start_fa4_precompile(model, hp.seq_len, rt.device)
    train_step(model, step_fn, optimizer, loader, plans[1], rt).tolist()
    if precompile is not None:
        precompile.join()
        print(f"FA4 precompile process: {precompile.seconds:.1f}s, error {precompile.error}")
    print(f"stage {stage}: {plan.batch_tokens} tokens/step, windows {plan.short_window},{plan.long_window}; "
          f"compile + first step {time.perf_counter() - t0:.1f}s", flush=True)
    times = []
    for i in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        train_step(model, step_fn, optimizer, loader, plans[i % 2], rt).tolist()
        times.append(1000 * (time.perf_counter() - t))
    print(f"median step {statistics.median(times):.1f} ms over {steps} steps: {[round(t) for t in times]}", flush=True)
    # As the trainer runs: no wait between steps (it reads each step's loss one step late).
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(steps):
        train_step(model, step_fn, optimizer, loader, plans[i % 2], rt)
    queued = time.perf_counter()
    torch.cuda.synchronize()
    print(f"pipelined: {1000 * (time.perf_counter() - t) / steps:.1f} ms per step over {steps} steps without a "
          f"wait between them; the host was done queuing them at {1000 * (queued - t) / steps:.1f} ms per step "
          "(CUDA's launch queue holds back a host that runs ahead, so compare the GPU's busy time below)", flush=True)
    if args.host_profile:  # where the host's time goes while it queues steps (Python's profiler)
        stats = cProfile.Profile()
        torch.cuda.synchronize()
        stats.enable()
        for i in range(2):
            train_step(model, step_fn, optimizer, loader, plans[i % 2], rt)
        stats.disable()
        torch.cuda.synchronize()
        pstats.Stats(stats).sort_stats("cumulative").print_stats(30)
    if args.no_profile:
        return
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for i in range(2):
            train_step(model, step_fn, optimizer, loader, plans[i % 2], rt).tolist()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=110))
    kernels_only = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
    groups = {}
    for e in kernels_only:
        groups.setdefault(kernel_group(e.key), []).append((e.self_device_time_total / 1000 / 2, e.count // 2, e.key))
    print("kernel group | ms per step | kernels")
    for name, entries in sorted(groups.items(), key=lambda kv: -sum(ms for ms, _, _ in kv[1])):
        print(f"{name:28s} | {sum(ms for ms, _, _ in entries):7.1f} | {len(entries)}")
    # The largest kernels of each group with their whole names (the table above cuts names and rows).
    for name, entries in groups.items():
        for ms, calls, key in sorted(entries, reverse=True)[:4]:
            print(f"  {name[:20]:20s} | {ms:7.2f} ms/step | {calls:4d} calls/step | {key}")
    busy_ms = sum(e.self_device_time_total for e in kernels_only) / 1000 / 2
    print(f"GPU busy {busy_ms:.1f} ms per step (sum of kernel times) against {statistics.median(times):.1f} ms per step "
          "wall: the rest is the GPU waiting for the host", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
