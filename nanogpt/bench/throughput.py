"""Throughput of the baseline trainer's optimizer step: tokens/s, ms/step and MFU. No training run.

Takes every setting of `nanogpt.train` (recipes too) plus a few of its own, builds the model,
optimizer, autocast and compile exactly as the trainer does, runs `bench_warmup` untimed steps
(compilation, autotuning), then times `bench_steps` steps with the device synchronized.

  GPT-2 124M, sequence 1024, bf16, compiled, 524,288 tokens per step through accumulation:
    python -m nanogpt.bench --batch_size=32 --total_batch_size=524288
  the same under a recipe, on real data:        python -m nanogpt.bench train_gpt2_fineweb --synthetic=False --data_dir=...
  another attention backend:                    python -m nanogpt.bench --attention=cudnn
  Inductor's loss instead of the fused op:      python -m nanogpt.bench --fused_loss=False
  Inductor's GELU between cuBLAS matmuls:       python -m nanogpt.bench --fused_mlp=False
  several GPUs:                                 torchrun --standalone --nproc_per_node=8 -m nanogpt.bench ...
  tiny, on CPU:                                 python -m nanogpt.bench tiny_cpu --bench_steps=3
  the GPU tests, then a sweep ending in a table: bash nanogpt/bench/gpu_session.sh
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nanogpt.config import ConfigError, config_help, exit_status, parse_config
from nanogpt.data.loader import TokenLoader
from nanogpt.data.shards import ShardError, find_split
from nanogpt.model import GPT, GPTConfig
from nanogpt.train import (
    TrainConfig,
    apply_run_time_options,
    compile_enabled,
    configure_backends,
    data_vocab,
    gradient_accumulation,
    init_runtime,
    mixed_precision,
    scratch_model_args,
    train_step,
    wrap_model,
)


@dataclass
class BenchConfig(TrainConfig):
    bench_steps: int = 10  # timed optimizer steps
    bench_warmup: int = 3  # untimed optimizer steps before (compilation, autotuning, allocator warmup)
    synthetic: bool = True  # random tokens; False reads the train split of data_dir
    out_json: str = ""  # also write the result here
    profile: str = ""  # write a torch.profiler table of the CUDA kernels of one timed step to this file


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__ + "\nsettings:\n" + config_help(BenchConfig))
        return {}
    cfg, _ = parse_config(BenchConfig, argv)
    if cfg.bench_steps <= 0 or cfg.bench_warmup < 0:
        raise ConfigError("bench_steps must be positive and bench_warmup not negative")
    if not cfg.synthetic and not cfg.data_dir:
        raise ConfigError("synthetic=False needs --data_dir")
    rt = init_runtime(cfg)
    accumulation = gradient_accumulation(cfg, rt.world_size)
    vocab_size = data_vocab(cfg)[0] if cfg.data_dir else (cfg.vocab_size or 50304)
    configure_backends(cfg, rt)
    torch.manual_seed(cfg.seed)

    model = apply_run_time_options(GPT(GPTConfig(**scratch_model_args(cfg, vocab_size))), cfg).to(rt.device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), rt.device_type)
    dtype, autocast, scaler = mixed_precision(cfg, rt)
    raw_model = model
    model = wrap_model(model, cfg, rt)

    if cfg.synthetic:  # a few fixed random batches, reused: token values do not change the cost
        generator = torch.Generator(device=rt.device).manual_seed(cfg.seed + rt.rank)
        pool = [torch.randint(0, vocab_size, (2, cfg.batch_size, cfg.block_size), device=rt.device, generator=generator)
                for _ in range(4)]
        counter = iter(range(10**12))

        def next_batch():
            x_and_y = pool[next(counter) % len(pool)]
            return x_and_y[0], x_and_y[1]
    else:
        loader = TokenLoader(find_split(cfg.data_dir, "train"), cfg.batch_size, cfg.block_size, order="sequential",
                             rank=rt.rank, world_size=rt.world_size, accumulation=accumulation, device=rt.device)
        next_batch = loader.next_batch

    def steps(count):
        for _ in range(count):
            loss = train_step(model, optimizer, scaler, next_batch, accumulation, autocast, cfg.grad_clip, rt.distributed)
        return loss

    def sync():
        if rt.device_type == "cuda":
            torch.cuda.synchronize()

    tokens_per_step = cfg.batch_size * cfg.block_size * rt.world_size * accumulation
    say = print if rt.master else (lambda *a, **k: None)
    say(f"bench: {raw_model.num_params() / 1e6:.1f}M params, {tokens_per_step:,} tokens/step = {cfg.batch_size} x "
        f"{cfg.block_size} x {rt.world_size} proc x {accumulation} accum, {str(dtype).removeprefix('torch.')}, "
        f"compile={compile_enabled(cfg, rt)}, attention={cfg.attention}, device {rt.device_name}", flush=True)
    start = time.perf_counter()
    if cfg.bench_warmup:
        steps(cfg.bench_warmup).item()
    sync()
    warmup_s = time.perf_counter() - start
    if rt.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    start = time.perf_counter()
    loss = steps(cfg.bench_steps).item()
    sync()
    elapsed = time.perf_counter() - start
    ms_per_step = 1000 * elapsed / cfg.bench_steps
    tokens_per_s = tokens_per_step * cfg.bench_steps / elapsed
    mfu = raw_model.estimate_mfu(tokens_per_s / rt.world_size, rt.device_name) if rt.device_type == "cuda" else None
    result = {
        "ms_per_step": ms_per_step, "tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": tokens_per_s / rt.world_size,
        "mfu": mfu, "tokens_per_step": tokens_per_step, "accumulation": accumulation, "warmup_s": warmup_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated(rt.device) / 2**30 if rt.device_type == "cuda" else None,
        "loss": loss, "device_name": rt.device_name, "world_size": rt.world_size, "torch": torch.__version__,
        "config": {k: v for k, v in asdict(cfg).items() if k in ("batch_size", "block_size", "n_layer", "n_embd",
                                                                 "attention", "compile", "compile_mode", "dtype", "inductor_tuning", "bias",
                                                                 "total_batch_size", "fused_loss", "fused_mlp")},
    }
    if cfg.profile and rt.master:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            steps(1).item()
            sync()
        averages = prof.key_averages()
        table = averages.table(sort_by="cuda_time_total" if rt.device_type == "cuda" else "cpu_time_total",
                               row_limit=40, max_name_column_width=90)
        if rt.device_type == "cuda":  # and the kernels themselves, by their own time
            table += "\n" + averages.table(sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=90)
        Path(cfg.profile).write_text(table)
    mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
    say(f"bench | {ms_per_step:.1f} ms/step | {tokens_per_s:,.0f} tok/s | {tokens_per_s / rt.world_size:,.0f} tok/s/gpu "
        f"| mfu {mfu_text} | peak mem {result['peak_memory_gib'] or 0:.1f} GiB | warmup {warmup_s:.0f}s")
    if cfg.out_json and rt.master:
        Path(cfg.out_json).write_text(json.dumps(result, indent=2) + "\n")
    if rt.distributed:
        torch.distributed.destroy_process_group()
    return result


def cli(argv: list[str] | None = None) -> int:
    """The command line (`python -m nanogpt.bench`): a bad setting or data folder is one line and exit 2."""
    return exit_status(lambda: main(argv), {ConfigError: 2, ShardError: 2})


if __name__ == "__main__":
    sys.exit(cli())
