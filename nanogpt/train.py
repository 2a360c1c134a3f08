"""Train GPT-2 (baseline NanoGPT) on CPU, one GPU, or many GPUs and nodes under torchrun.

Examples (from the repository root):
  tiny CPU run on the local corpus:
    python -m nanogpt.data.text_corpus --source DIR --out data/stdlib_char --tokenizer char
    python -m nanogpt.train tiny_cpu --data_dir=data/stdlib_char --run_dir=runs/tiny
  nanoGPT's names work as overrides:
    python -m nanogpt.train --data_dir=DIR --run_dir=DIR --device=cpu --n_layer=2 --n_head=2 \\
        --n_embd=64 --block_size=64 --batch_size=8 --max_iters=30 --warmup_iters=3 --eval_interval=10 --eval_iters=5 --compile=False
  one GPU, GPT-2 124M on FineWeb:   python -m nanogpt.train train_gpt2_fineweb --data_dir=... --run_dir=...
  8 GPUs of one node:               torchrun --standalone --nproc_per_node=8 -m nanogpt.train train_gpt2_fineweb ...
  a cluster:                        sbatch slurm/nanogpt/train_gpt2.sh (see README)
  every setting:                    python -m nanogpt.train --help

The run directory holds config.json, provenance.json, metrics.jsonl, train.log and ckpt/. Started
again on the same run directory (a requeued job), the trainer resumes from its newest complete
checkpoint. On SIGUSR1, SIGUSR2 or SIGTERM, and when max_train_minutes is reached, it writes a
checkpoint and exits cleanly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nanogpt import checkpoint as ckpt
from nanogpt.config import ConfigError, parse_config, trainer_exit_status, usage
from nanogpt.data.loader import TokenLoader
from nanogpt.data.shards import ShardError, check_token_ids, find_split, read_meta
from nanogpt.model import GPT, GPT2_SIZES, SDPA_BACKENDS, GPTConfig, select_sdpa_backend
from nanogpt.probe_store import ProbeError, Study
from nanogpt.probes import score_documents
from nanogpt.rundir import (
    RunDir,
    RunDirError,
    StopSignal,
    caches_text,
    check_same_trainer,
    check_writable,
    compile_caches,
    newest_checkpoint,
    provenance,
)


def _help(text: str):
    return field(metadata={"help": text})


@dataclass
class TrainConfig:
    # --- input and output -----------------------------------------------------------------
    data_dir: str = ""  # token files: train.bin/val.bin (NanoGPT) or *train_NNNNNN.bin shards
    run_dir: str = ""  # where config, provenance, metrics, log and checkpoints go; "" = $RUNS_DIR/nanogpt-<time>
    init_from: str = "scratch"  # scratch | resume | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | HF dir
    # --- model (GPT-2 124M by default) ----------------------------------------------------
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads
    n_embd: int = 768  # residual stream width
    block_size: int = 1024  # context length in tokens
    vocab_size: int = 0  # 0 = from the data (corpus.json / meta.pkl), else GPT-2's 50304 (padded)
    dropout: float = 0.0  # dropout probability (0 for pre-training)
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 had
    fused_loss: bool = True  # CUDA training: lm_head + cross-entropy as one op, logits' gradient in the forward (Triton)
    fused_mlp: bool = True  # CUDA on Hopper+: the MLP as one op, GELU in Triton matmul epilogues (others: unfused)
    # --- batch ------------------------------------------------------------------------------
    batch_size: int = 12  # sequences per micro-batch per process
    total_batch_size: int = 0  # tokens per optimizer step over all processes; 0 = one micro-batch each
    # --- AdamW ------------------------------------------------------------------------------
    learning_rate: float = 6e-4  # peak AdamW learning rate
    max_iters: int = 600000  # optimizer steps
    weight_decay: float = 0.1  # AdamW decoupled weight decay (2-D weights only)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # 0 = off
    # --- learning-rate schedule -------------------------------------------------------------
    lr_schedule: str = "cosine"  # cosine (nanoGPT) | wsd (warmup-stable-decay, llm.c style) | constant
    warmup_iters: int = 2000  # linear warmup steps (a warning if longer than max_iters)
    lr_decay_iters: int = 0  # step at which the decay ends; 0 = max_iters
    min_lr: float = 6e-5  # learning rate at the end of the decay
    cooldown_frac: float = 0.2  # wsd: fraction of lr_decay_iters spent decaying linearly to min_lr
    # --- evaluation and stopping ----------------------------------------------------------
    eval_interval: int = 2000  # evaluate every N steps (and at the first and last step)
    eval_iters: int = 200  # micro-batches per evaluation and split (all processes together)
    eval_train: bool = True  # also estimate the loss on a fixed sample of the train split
    eval_only: bool = False  # evaluate once and exit (eval_gpt2* recipes)
    log_interval: int = 1  # a step line every N steps
    target_val_loss: float | None = None  # stop when val loss <= this; records time to target
    max_train_minutes: float | None = None  # checkpoint and stop after this much wall time
    # --- checkpoints ------------------------------------------------------------------------
    checkpoint_interval: int = 0  # steps between checkpoints; 0 = at every evaluation
    keep_checkpoints: int = 2  # newest N kept; older ones deleted (except those of save_checkpoints)
    # --- training-dynamics studies (nanogpt/probes.py) ----------------------------------------
    probe_docs: str = ""  # a docs file (python -m nanogpt.data.select_docs): its documents' per-token losses go to probes/
    probe_every: int = 0  # score the probe documents every N steps (from step 0, and at the last); 0 = off
    probe_steps: str = ""  # or at these steps, e.g. 0,10,100
    save_checkpoints: str = ""  # "" | "every:N" | "100,500,1000": checkpoints kept for studies (python -m nanogpt.score_checkpoints)
    save_checkpoints_as: str = "full"  # full (resumable, ckpt/step_N.pt) | weights_bf16 (weights only, 2-D in bf16, ckpt/weights/)
    # --- system -----------------------------------------------------------------------------
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16 on GPUs that have it, else fp16 + GradScaler; fp32 on CPU) | float32 | bfloat16 | float16
    compile: bool | None = None  # torch.compile; None = on for CUDA
    compile_mode: str = "default"  # torch.compile mode: default | max-autotune-no-cudagraphs | max-autotune | reduce-overhead
    inductor_tuning: bool = False  # let the compiler tune its own (Triton) kernels: slower compile, maybe faster steps
    backend: str = "auto"  # process-group backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    data_order: str = "auto"  # auto (random for train.bin, sequential for shards) | random | sequential
    attention: str = "auto"  # SDPA backend: auto | flash | cudnn | efficient | math
    seed: int = 1337  # model init, data order and dropout

    def __post_init__(self):
        choices = {
            "lr_schedule": ("cosine", "wsd", "constant"),
            "dtype": ("auto", "float32", "bfloat16", "float16"),
            "backend": ("auto", "nccl", "gloo"),
            "data_order": ("auto", "random", "sequential"),
            "attention": SDPA_BACKENDS,
            "compile_mode": ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"),
            "save_checkpoints_as": ("full", "weights_bf16"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r}: must be one of {', '.join(allowed)}")
        positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters", "eval_interval",
                    "eval_iters", "log_interval", "keep_checkpoints")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}={getattr(self, key)}: must be positive")
        for key in ("vocab_size", "total_batch_size", "warmup_iters", "lr_decay_iters", "checkpoint_interval"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)}: must not be negative")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout}: must lie in [0, 1)")
        if not 0 <= self.cooldown_frac <= 1:
            raise ConfigError(f"cooldown_frac={self.cooldown_frac}: must lie in [0, 1]")
        if self.min_lr > self.learning_rate:
            raise ConfigError(f"min_lr={self.min_lr} exceeds learning_rate={self.learning_rate}")
        # A path is checked when its weights are loaded: a resumed run needs only its checkpoint.
        if self.init_from not in ("scratch", "resume", *GPT2_SIZES) and "/" not in self.init_from:
            raise ConfigError(
                f"init_from={self.init_from!r}: must be scratch, resume, one of {', '.join(GPT2_SIZES)}, "
                "or a directory with Hugging Face GPT-2 weights"
            )


def learning_rate_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    peak = cfg.learning_rate
    if step < cfg.warmup_iters:
        return peak * (step + 1) / (cfg.warmup_iters + 1)
    if cfg.lr_schedule == "constant":
        return peak
    decay_end = cfg.lr_decay_iters or cfg.max_iters
    if step >= decay_end:
        return cfg.min_lr
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_iters) / max(1, decay_end - cfg.warmup_iters)
        return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - cfg.min_lr)
    cooldown_start = max(cfg.warmup_iters, decay_end - round(cfg.cooldown_frac * decay_end))
    if step < cooldown_start:
        return peak
    progress = (step - cooldown_start) / max(1, decay_end - cooldown_start)
    return peak + progress * (cfg.min_lr - peak)


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_step_line(step, max_steps, loss, lr, dt_ms, tokens_per_s, mfu) -> str:
    """`step 100/1555 | loss 3.4100 | lr 6.00e-04 | dt 312ms | tok/s 1.68M | mfu 41.2%` (grep-able)."""
    mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
    return (f"step {step}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | dt {dt_ms:.0f}ms | "
            f"tok/s {_human(tokens_per_s)} | mfu {mfu_text}")


def fused_paths(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> str:
    """What the log says of the fused ops: whether each runs here, not only whether it is asked for (both run on
    CUDA only; the fused MLP also needs TMA, compute capability 9+, and 16-bit activations)."""
    cuda = device.type == "cuda"
    loss = "on" if cfg.fused_loss and cuda else "off" if not cfg.fused_loss else "off (runs on CUDA only)"
    if not cfg.fused_mlp:
        mlp = "off"
    elif not cuda:
        mlp = "off (runs on CUDA only)"
    elif torch.cuda.get_device_capability(device)[0] < 9:
        mlp = "off (needs compute capability 9+)"
    else:
        mlp = "on" if dtype in (torch.bfloat16, torch.float16) else "off (needs bf16/fp16)"
    return f"fused_loss {loss}, fused_mlp {mlp}"


# --- distributed setup ------------------------------------------------------------------------

@dataclass
class Runtime:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    device_type: str = "cpu"
    device_name: str = "cpu"
    distributed: bool = False

    @property
    def master(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str) -> str:
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={requested!r} but CUDA is not available here (use --device=cpu)")
    if requested not in ("cpu", "mps") and not requested.startswith("cuda"):
        raise ConfigError(f"device={requested!r}: must be auto, cpu, mps, cuda or cuda:N")
    return requested


def init_runtime(cfg: TrainConfig) -> Runtime:
    """Single process, or DDP when torchrun/srun set RANK and WORLD_SIZE."""
    device = resolve_device(cfg.device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        device_name = torch.cuda.get_device_name(device) if device.startswith("cuda") else device
        return Runtime(device=device, device_type=device.split(":")[0], device_name=device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
    torch.distributed.init_process_group(backend=backend)
    device_name = torch.cuda.get_device_name(device) if device.startswith("cuda") else device
    return Runtime(rank, local_rank, world_size, device, device.split(":")[0], device_name, True)


def all_reduce_max(flag: bool, rt: Runtime) -> bool:
    if not rt.distributed:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=rt.device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


# --- setup helpers ----------------------------------------------------------------------------

def gradient_accumulation(cfg: TrainConfig, world_size: int) -> int:
    tokens_per_micro = cfg.batch_size * cfg.block_size * world_size
    if cfg.total_batch_size == 0:
        return 1
    if cfg.total_batch_size % tokens_per_micro:
        raise ConfigError(
            f"total_batch_size={cfg.total_batch_size} tokens is not a multiple of batch_size*block_size*world_size "
            f"= {cfg.batch_size}*{cfg.block_size}*{world_size} = {tokens_per_micro}; change batch_size or total_batch_size"
        )
    return cfg.total_batch_size // tokens_per_micro


def data_vocab(cfg: TrainConfig) -> tuple[int, dict]:
    """Vocabulary size for the model: the config's, the data's, or GPT-2's padded 50304."""
    meta = read_meta(cfg.data_dir)
    data_vocab_size = int(meta.get("vocab_size", 0) or 0)
    if cfg.vocab_size and data_vocab_size and cfg.vocab_size < data_vocab_size:
        raise ConfigError(f"vocab_size={cfg.vocab_size} is smaller than the data's vocabulary ({data_vocab_size} in {cfg.data_dir})")
    return cfg.vocab_size or data_vocab_size or 50304, meta


def configure_backends(cfg: TrainConfig, rt: Runtime):
    """Process-wide CUDA settings: TF32 matmuls, the attention backend, compiler tuning."""
    if rt.device_type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    select_sdpa_backend(cfg.attention)
    if cfg.inductor_tuning:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True


def mixed_precision(cfg: TrainConfig, rt: Runtime):
    """(dtype, autocast context, GradScaler): the scaler is active only for float16."""
    dtype = choose_dtype(cfg, rt)
    autocast = torch.autocast(rt.device_type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    return dtype, autocast, torch.amp.GradScaler(rt.device_type, enabled=(dtype == torch.float16))


def compile_enabled(cfg: TrainConfig, rt: Runtime) -> bool:
    return cfg.compile if cfg.compile is not None else rt.device_type == "cuda"


def wrap_model(model, cfg: TrainConfig, rt: Runtime):
    """torch.compile (on by default on CUDA), then DDP when several processes run."""
    if compile_enabled(cfg, rt):
        model = torch.compile(model, mode=cfg.compile_mode)
    if rt.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
    return model


def data_order(cfg: TrainConfig, train_files) -> str:
    """NanoGPT's random windows for its train.bin; llm.c's sequential pass for shards."""
    if cfg.data_order != "auto":
        return cfg.data_order
    return "random" if train_files[0].name == "train.bin" else "sequential"


def choose_dtype(cfg: TrainConfig, rt: Runtime) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if rt.device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_run_dir() -> str:
    root = os.environ.get("RUNS_DIR", "runs")
    job = os.environ.get("SLURM_JOB_ID")
    return str(Path(root) / (f"nanogpt-job{job}" if job else time.strftime("nanogpt-%Y%m%d-%H%M%S")))


def scratch_model_args(cfg: TrainConfig, vocab_size: int) -> dict:
    return dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                vocab_size=vocab_size, dropout=cfg.dropout, bias=cfg.bias)


# Settings of GPTConfig that choose how the model computes, not what: taken from the run's config
# and left out of model_args, so a checkpoint resumes under either value.
RUN_TIME_MODEL_OPTIONS = ("fused_loss", "fused_mlp")


def apply_run_time_options(model: GPT, cfg: TrainConfig) -> GPT:
    for key in RUN_TIME_MODEL_OPTIONS:
        setattr(model.config, key, getattr(cfg, key))
    return model


def build_model(cfg: TrainConfig, vocab_size: int, print_fn, data_vocab_size: int | None = None) -> tuple[GPT, dict]:
    if cfg.init_from in ("scratch", "resume"):
        model_args = scratch_model_args(cfg, vocab_size)
        return GPT(GPTConfig(**model_args)), model_args
    if cfg.init_from not in GPT2_SIZES and not Path(cfg.init_from).is_dir():
        raise ConfigError(f"init_from={cfg.init_from}: no such directory of Hugging Face GPT-2 weights")
    print_fn(f"initialising from Hugging Face GPT-2 weights: {cfg.init_from} (its sizes replace n_layer/n_head/n_embd)")
    model = GPT.from_pretrained(cfg.init_from, dropout=cfg.dropout)
    if data_vocab_size and data_vocab_size > model.config.vocab_size:
        raise ConfigError(f"init_from={cfg.init_from}: the model has {model.config.vocab_size} tokens but the data in "
                          f"{cfg.data_dir} uses {data_vocab_size}; use data tokenized with its tokenizer")
    if cfg.block_size > model.config.block_size:
        raise ConfigError(f"block_size={cfg.block_size} exceeds the {model.config.block_size} positions of {cfg.init_from}")
    if cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
    return model, {k: v for k, v in dataclasses.asdict(model.config).items() if k not in RUN_TIME_MODEL_OPTIONS}


class TrainClock:
    """Training wall time: runs only while steps run, synchronizing with the device when paused."""

    def __init__(self, device_type: str, total_ms: float = 0.0):
        self.total_ms = total_ms
        self.device_type = device_type
        self.started: float | None = None

    def start(self):
        if self.started is None:
            self.started = time.perf_counter()

    def pause(self):
        if self.started is not None:
            if self.device_type == "cuda":
                torch.cuda.synchronize()
            self.total_ms += (time.perf_counter() - self.started) * 1000
            self.started = None


def train_step(model, optimizer, scaler, next_batch, accumulation: int, autocast, grad_clip: float,
               distributed: bool) -> torch.Tensor:
    """One optimizer step over `accumulation` micro-batches; returns the step's mean loss (on device).

    Under DDP the gradients are all-reduced only on the last micro-batch (no_sync before).
    """
    loss_sum = None
    for micro in range(accumulation):
        x, y = next_batch()
        sync = not distributed or micro == accumulation - 1
        with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
            _, loss = model(x, y, return_logits=False)
            loss = loss / accumulation
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


# --- evaluation -------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, loader: TokenLoader, num_batches: int, autocast, rt: Runtime, seed: int) -> float:
    """Mean loss over a fixed set of `num_batches` micro-batches shared out among the ranks."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)  # (sum of losses, count)
    for x, y in loader.eval_batches(num_batches, seed=seed):
        with autocast:
            _, loss = model(x, y)
        total[0] += loss.double()
        total[1] += 1
    if rt.distributed:
        torch.distributed.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


# --- the training loop ------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(usage(__doc__, TrainConfig))
        return {}
    cfg, recipe = parse_config(TrainConfig, argv)
    if not cfg.data_dir:
        raise ConfigError("data_dir is not set: give --data_dir=DIR (see python -m nanogpt.data.text_corpus)")
    # Everything that can be checked before a process group or a GPU is taken, is checked here.
    train_files, val_files = find_split(cfg.data_dir, "train"), find_split(cfg.data_dir, "val")
    for files, order in ((train_files, data_order(cfg, train_files)), (val_files, "sequential")):
        TokenLoader(files, cfg.batch_size, cfg.block_size, order=order)  # validates every header and size
    vocab_size, data_meta = data_vocab(cfg)
    check_token_ids(train_files + val_files, vocab_size)
    run_dir = Path(cfg.run_dir or default_run_dir())
    study = Study(run_dir, cfg.probe_docs, cfg.probe_every, cfg.probe_steps, cfg.save_checkpoints,
                  cfg.save_checkpoints_as, cfg.max_iters, vocab_size, master=os.environ.get("RANK", "0") == "0")
    check_same_trainer(run_dir, "nanogpt.train")
    if os.environ.get("RANK", "0") == "0":
        check_writable(run_dir)
    has_checkpoint = newest_checkpoint(run_dir / "ckpt") is not None
    if cfg.init_from == "resume" and not has_checkpoint:
        raise ConfigError(f"init_from=resume but {run_dir / 'ckpt'} holds no checkpoint")
    if "/" in cfg.init_from and not has_checkpoint and not Path(cfg.init_from).is_dir():
        raise ConfigError(f"init_from={cfg.init_from}: no such directory of Hugging Face GPT-2 weights")
    previous = RunDir(run_dir, enabled=os.environ.get("RANK", "0") == "0")
    finished = None if cfg.eval_only else previous.completed(cfg.max_iters, target_stops=True)
    if finished is not None:  # e.g. a requeued job whose run had ended: nothing to redo, nothing rewritten
        previous.log(f"{run_dir} already ended at step {finished['step']} (final val loss "
                     f"{finished.get('final_val_loss') or float('nan'):.4f}, train_time {finished.get('train_time_ms', 0) / 1000:.1f}s): "
                     "nothing to do; give a new --run_dir to train again, or a larger --max_iters to go on")
        return finished
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = gradient_accumulation(cfg, world_size)
    if world_size > 1 and not cfg.run_dir:
        raise ConfigError("give --run_dir explicitly when running several processes (they must agree on it)")

    rt = init_runtime(cfg)
    try:
        result = _train(cfg, recipe, rt, run_dir, train_files, val_files, vocab_size, data_meta, accumulation, argv,
                        study)
        if rt.distributed:
            # Every rank leaves together: gloo aborts a process ("terminate called without an active
            # exception") when a peer tears its connections down while it is still finishing up.
            torch.distributed.barrier()
        return result
    finally:
        if rt.distributed:
            torch.distributed.destroy_process_group()
            # Free what still refers to the process group while the interpreter is whole: left to the
            # interpreter's exit, a 2-rank gloo run's rank 1 can still abort in its teardown (as in the speedrun
            # trainer, where this collection took such aborts from 4 in 15 runs to 0 in 30).
            gc.collect()


def _train(cfg, recipe, rt: Runtime, run_dir: Path, train_files, val_files, vocab_size, data_meta, accumulation, argv,
           study: Study):
    # First: torch reads (and, unset, fills in) the cache variables once torch._dynamo is imported, which
    # building the optimizer does. Only where something compiles.
    caches = compile_caches(run_dir) if compile_enabled(cfg, rt) or rt.device_type == "cuda" else None
    run = RunDir(run_dir, enabled=rt.master)
    resume_state = ckpt.load_newest(run_dir / "ckpt", warn=run.log)
    if resume_state and cfg.init_from in ("scratch", "resume"):
        asked = scratch_model_args(cfg, vocab_size)
        if resume_state["model_args"] != asked:  # checked before config.json is rewritten
            raise ConfigError(f"the checkpoint in {run_dir / 'ckpt'} holds model {resume_state['model_args']} but the "
                              f"config asks for {asked}; use another --run_dir for a different model")
    run.start(dataclasses.asdict(cfg) | {"recipe": str(recipe) if recipe else None},
              provenance("nanogpt.train", argv, rt.world_size, f"sdpa ({cfg.attention})"),
              resume_state["step"] if resume_state else None)  # a resume drops the records after its step
    log = run.log
    study.start(resume_state["step"] if resume_state else None, log)

    seed_offset = rt.rank  # dropout differs per rank; the data order does not (see loader)
    torch.manual_seed(cfg.seed + seed_offset)
    random.seed(cfg.seed + seed_offset)
    np.random.seed(cfg.seed + seed_offset)
    configure_backends(cfg, rt)

    tokens_per_step = cfg.batch_size * cfg.block_size * rt.world_size * accumulation
    order = data_order(cfg, train_files)
    device = rt.device
    train_loader = TokenLoader(train_files, cfg.batch_size, cfg.block_size, order=order, rank=rt.rank,
                               world_size=rt.world_size, accumulation=accumulation, seed=cfg.seed, device=device)
    val_loader = TokenLoader(val_files, cfg.batch_size, cfg.block_size, order="sequential", rank=rt.rank,
                             world_size=rt.world_size, device=device)
    train_eval_loader = TokenLoader(train_files, cfg.batch_size, cfg.block_size, order="random", rank=rt.rank,
                                    world_size=rt.world_size, device=device)

    if resume_state:  # the checkpoint's own shape: a requeued job started from GPT-2 needs no hub access
        model_args = resume_state["model_args"]
        model = GPT(GPTConfig(**model_args))
        model.load_state_dict(resume_state["model"])
    else:
        model, model_args = build_model(cfg, vocab_size, log, data_meta.get("vocab_size"))
    apply_run_time_options(model, cfg)
    model.to(device)
    dtype, autocast, scaler = mixed_precision(cfg, rt)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), rt.device_type)

    state = {"step": 0, "tokens": 0, "train_time_ms": 0.0, "best_val_loss": None, "last_val_loss": None,
             "time_to_target_ms": None, "tokens_to_target": None, "evaluated_step": None, "saved_step": None}
    if resume_state:
        optimizer.load_state_dict(resume_state["optimizer"])
        if resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        state.update(resume_state["state"])
        ckpt.restore_rank_state(resume_state, rt.rank, rt.world_size, train_loader, device, log)
        log(f"resumed from step {state['step']} ({state['tokens']:,} tokens, {state['train_time_ms'] / 1000:.1f}s trained)")
    del resume_state

    raw_model = model
    run.add_provenance(kernel_caches=caches)
    if caches is not None:
        log(caches_text(caches))
    model = wrap_model(model, cfg, rt)
    if compile_enabled(cfg, rt):
        log("compiled the model (torch.compile); the first step includes compilation and is not timed")

    # Reports show both counts: every parameter, and those outside the (tied) token and position embeddings.
    run.add_provenance(parameters={"total": raw_model.num_params(non_embedding=False),
                                   "non_embedding": raw_model.num_params() - raw_model.transformer.wte.weight.numel()})
    log(f"model: {raw_model.num_params() / 1e6:.2f}M parameters (without position embeddings), vocab {vocab_size}, "
        f"device {rt.device_name} x{rt.world_size}, dtype {str(dtype).removeprefix('torch.')}, attention {cfg.attention}, "
        f"{fused_paths(cfg, torch.device(device), dtype)}")
    log(f"batch: {tokens_per_step:,} tokens/step = {cfg.batch_size} seq x {cfg.block_size} tok x {rt.world_size} proc "
        f"x {accumulation} accumulation; data order {order}; {train_loader.num_tokens:,} train tokens")
    if not cfg.eval_only and cfg.warmup_iters >= cfg.max_iters and cfg.lr_schedule != "constant":
        peak = max(learning_rate_at(s, cfg) for s in range(cfg.max_iters))
        log(f"warning: warmup_iters={cfg.warmup_iters} is not shorter than the run (max_iters={cfg.max_iters}): the "
            f"learning rate only reaches {peak:.2g} of learning_rate={cfg.learning_rate:g}; set --warmup_iters "
            "(e.g. a tenth of max_iters)")

    def run_eval(step):
        val_loss = evaluate(raw_model, val_loader, cfg.eval_iters, autocast, rt, cfg.seed)
        train_loss = evaluate(raw_model, train_eval_loader, cfg.eval_iters, autocast, rt, cfg.seed) if cfg.eval_train else None
        return val_loss, train_loss

    if cfg.eval_only:
        val_loss, train_loss = run_eval(state["step"])
        run.metric("val", step=state["step"], tokens=state["tokens"], train_time_ms=state["train_time_ms"],
                   val_loss=val_loss, train_loss=train_loss)
        log(f"eval | step {state['step']} | val loss {val_loss:.4f}" + (f" | train loss {train_loss:.4f}" if train_loss is not None else ""))
        return {"val_loss": val_loss, "train_loss": train_loss}

    checkpoint_every = cfg.checkpoint_interval or cfg.eval_interval
    deadline = time.time() + cfg.max_train_minutes * 60 if cfg.max_train_minutes else None
    clock = TrainClock(rt.device_type, state["train_time_ms"])

    def save(step):
        state["train_time_ms"] = clock.total_ms
        ckpt.save(run_dir / "ckpt", step, raw_model, optimizer, scaler, state, model_args, dataclasses.asdict(cfg),
                  train_loader, rt, keep=cfg.keep_checkpoints, keep_steps=study.full_steps)
        log(f"checkpoint | step {step} | {run_dir / 'ckpt'}")

    def study_step(step):
        """The study's work at this step (checkpoints kept for it, probe scores), outside the training clock."""
        if step in study.full_steps and state["saved_step"] != step:
            clock.pause()
            save(step)
        if step in study.weight_steps or study.due(step):
            clock.pause()
            study.save_weights(step, raw_model.state_dict(), state["tokens"],
                               {"model_args": model_args, "config": dataclasses.asdict(cfg)}, log)
        if study.due(step):
            started = time.perf_counter()
            scores = score_documents(raw_model, study.docs, cfg.block_size, autocast, device)
            study.record(step, scores, state["tokens"], time.perf_counter() - started, log)

    def metric(kind, **values):
        run.metric(kind, step=state["step"], tokens=state["tokens"], train_time_ms=clock.total_ms, **values)

    stop_reason = None
    first_step_ms = None  # this process's first step compiles and warms up: it is not training time
    logged = {"step": state["step"], "ms": clock.total_ms}
    model.train()
    with StopSignal() as stop_signal:
        while True:
            step = state["step"]
            last_step = step >= cfg.max_iters
            if (step % cfg.eval_interval == 0 or last_step) and state["evaluated_step"] != step:
                clock.pause()
                val_loss, train_loss = run_eval(step)
                state["evaluated_step"], state["last_val_loss"] = step, val_loss
                state["best_val_loss"] = min(val_loss, state["best_val_loss"] or math.inf)
                metric("val", val_loss=val_loss, train_loss=train_loss)
                log(f"eval | step {step}/{cfg.max_iters} | val loss {val_loss:.4f}"
                    + (f" | train loss {train_loss:.4f}" if train_loss is not None else "")
                    + f" | train_time {clock.total_ms / 1000:.1f}s")
                if cfg.target_val_loss is not None and val_loss <= cfg.target_val_loss and state["time_to_target_ms"] is None:
                    state["time_to_target_ms"], state["tokens_to_target"] = clock.total_ms, state["tokens"]
                    log(f"target val loss {cfg.target_val_loss} reached at step {step}: "
                        f"{clock.total_ms / 1000:.1f}s, {state['tokens']:,} tokens")
                    stop_reason = "target"
                if step > 0 and (step % checkpoint_every == 0 or last_step or stop_reason):
                    save(step)
            elif step > 0 and step % checkpoint_every == 0 and state["saved_step"] != step:
                clock.pause()
                save(step)
            study_step(step)
            if last_step or stop_reason:
                break

            lr = learning_rate_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if first_step_ms is not None:
                clock.start()
            step_start = time.perf_counter()
            loss_sum = train_step(model, optimizer, scaler, train_loader.next_batch, accumulation, autocast,
                                  cfg.grad_clip, rt.distributed)
            state["step"] = step = step + 1
            state["tokens"] += tokens_per_step
            if first_step_ms is None:
                loss_sum.item()  # wait for the device
                first_step_ms = (time.perf_counter() - step_start) * 1000
                log(f"first step: {first_step_ms:.0f}ms (compilation and warmup; not counted as training time)")
                logged = {"step": step, "ms": clock.total_ms}

            if step % cfg.log_interval == 0 or step == cfg.max_iters:
                if rt.distributed:  # report the loss of the whole step, not this rank's share
                    torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
                loss_value = loss_sum.item()  # synchronizes with the device
                clock.pause()
                timed = step - logged["step"]
                dt_ms = (clock.total_ms - logged["ms"]) / timed if timed else first_step_ms
                logged = {"step": step, "ms": clock.total_ms}
                tokens_per_s = tokens_per_step / (dt_ms / 1000)
                mfu = raw_model.estimate_mfu(tokens_per_s / rt.world_size, rt.device_name) if rt.device_type == "cuda" else None
                metric("train", loss=loss_value, lr=lr, dt_ms=dt_ms, tokens_per_s=tokens_per_s, mfu=mfu)
                log(format_step_line(step, cfg.max_iters, loss_value, lr, dt_ms, tokens_per_s, mfu))
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"loss is {loss_value} at step {step}; lower learning_rate or check the data")

            out_of_time = deadline is not None and time.time() >= deadline
            if all_reduce_max(stop_signal.received is not None or out_of_time, rt):
                clock.pause()
                stop_reason = f"signal {stop_signal.received}" if stop_signal.received else "max_train_minutes"
                save(step)
                log(f"stopping at step {step}: {stop_reason}; run the same command again to resume")
                metric("stop", reason=stop_reason)
                return {"stopped": stop_reason, "step": step, "train_time_ms": clock.total_ms}

    state["train_time_ms"] = clock.total_ms
    # No peak memory from a process that resumed at the end (killed before its end record) and trained nothing.
    peak_memory = torch.cuda.max_memory_allocated(device) if rt.device_type == "cuda" and first_step_ms is not None else None
    summary = {
        "step": state["step"], "tokens": state["tokens"], "train_time_ms": state["train_time_ms"],
        "final_val_loss": state["last_val_loss"], "best_val_loss": state["best_val_loss"],
        "target_val_loss": cfg.target_val_loss, "reached_target": state["time_to_target_ms"] is not None,
        "time_to_target_ms": state["time_to_target_ms"], "tokens_to_target": state["tokens_to_target"],
        "peak_memory_bytes": peak_memory, "world_size": rt.world_size, "device_name": rt.device_name,
    }
    run.metric("end", **summary)
    log(f"done | step {state['step']} | final val loss {state['last_val_loss']:.4f} | train_time {state['train_time_ms'] / 1000:.1f}s | run {run_dir}")
    return summary


def cli() -> int:
    return trainer_exit_status(main, {ConfigError: 2, ShardError: 2, ProbeError: 2, RunDirError: 1})


if __name__ == "__main__":
    sys.exit(cli())
