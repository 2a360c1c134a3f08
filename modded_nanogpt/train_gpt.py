"""The speedrun trainer: GPT-2 124M to val loss <= 3.28 on FineWeb, at 1/2/4/8 GPUs, every feature a flag.

  python -m modded_nanogpt.train_gpt tiny_cpu --data_dir=DIR --run_dir=DIR --num_iterations=20
  torchrun --standalone --nproc_per_node=8 -m modded_nanogpt.train_gpt            # the speedrun, 8 GPUs
  NUM_GPUS=1 bash modded_nanogpt/run.sh --seed=1                                  # the same via run.sh
  DISABLE_FP8=1 ... (same as --fp8=False)

Settings: the `Hyperparameters` dataclass below; a recipe first (NAME of modded_nanogpt/recipes/NAME.toml,
only deltas, or a .toml path; `--recipe=NAME` also works) then `--key=value` overrides, the grammar of
nanogpt.train (nanogpt.config); unknown keys and wrong types fail before anything is allocated.
Lists are comma-separated (`--paired_head_layers=0,2` or `none`); stage schedules separate stages by ';'.

A run: validate everything -> build the model, compile it -> an untimed warmup that runs one step of
every shape the schedule will meet (and the validations), then restores model, optimizer and data
state -> the timed run (synchronized clock that excludes warmup, validation and checkpoints), with
`step:N/T train_loss:L train_mtp_loss:M train_time:Xms step_avg:Yms` per step and `val_loss` per validation.
train_loss is the next-token cross-entropy per token (the quantity val_loss measures, so the two compare);
train_mtp_loss is the objective the step minimizes, the multi-token-prediction weighted sum per token (equal
to train_loss once the schedule's MTP weights are (1.0,), in the last stage). The run directory
(nanogpt.rundir, shared with the baseline) gets config.json, provenance.json, metrics.jsonl, train.log and
ckpt/; the same command resumes from the newest checkpoint. SIGUSR1/SIGUSR2/SIGTERM and max_train_minutes
checkpoint and exit 0.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from modded_nanogpt import kernels, probes
from modded_nanogpt.data.loader import DistributedBOSLoader, SequentialLoader, to_device_async
from modded_nanogpt.dist_optim import AdamGroup, BankSpec, SpeedrunOptimizer
from modded_nanogpt.model import (
    ATTENTION_BACKENDS,
    BLOCK,
    FLASH_BACKENDS,
    GPT,
    ModelConfig,
    describe_attention_backend,
    fa4_precompile,
    select_attention_backend,
)
from modded_nanogpt.schedule import Momentum, Schedule, ScheduleError
from nanogpt import probe_store
from nanogpt.config import ConfigError, parse_config, trainer_exit_status, usage
from nanogpt.data.shards import ShardError, check_token_ids, find_shards, read_shard_header
from nanogpt.probe_store import ProbeError, Study
from nanogpt.rundir import (
    COMPILE_CACHES,
    RunDir,
    RunDirError,
    StopSignal,
    caches_text,
    check_same_trainer,
    check_writable,
    compile_caches,
    holds_files,
    load_newest,
    provenance,
    prune_checkpoints,
    save_checkpoint,
)

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
WORLD_SIZES = (1, 2, 4, 8)
TOTAL_MICRO_STEPS = 8  # micro-steps per step summed over ranks: 8 // world_size per rank
# A micro-step's loss is the sum over its tokens (of the MTP-weighted cross-entropies) divided by this, and the
# ranks' gradients are summed: the published 2 / accumulation steps with gradients averaged over the ranks.
# So the gradients (and Adam's eps against them) have the published scale at every world size.
LOSS_DIVISOR = TOTAL_MICRO_STEPS / 2

# The published Adam groups: (betas, lr multiplier of adam_lr, weight-decay multiplier of adam_weight_decay).
ADAM_GROUPS = {
    "value_bigram": ((0.75, 0.95), 75.0, 5.0),  # value embeddings, bigram embedding
    "head": ((0.5, 0.95), 1.0, 150.0),  # lm_head
    "embed": ((0.5, 0.95), 1.0, 150.0),  # the token embedding once untied
    "x0_lambdas": ((0.65, 0.95), 5.0, 0.0),
    "scalars": ((0.9, 0.99), 5.0, 0.0),  # residual, attention gains, bigram, smear, backout, skip lambdas
    "smear_gate": ((0.9, 0.99), 0.01, 0.0),
    "skip_gate": ((0.9, 0.99), 0.05, 0.0),
    "gates": ((0.9, 0.99), 1.0, 1.0),  # attention and value-embedding gates
}


@dataclass
class Hyperparameters:
    # --- data and run ---
    data_dir: str = ""  # token shards (*train_NNNNNN.bin, *val_NNNNNN.bin); "" = $DATA_PATH or $DATA_DIR + /fineweb10B
    run_dir: str = ""  # "" = $RUNS_DIR/modded-<time>; the same run_dir resumes
    vocab_size: int = 50304  # GPT-2's 50,257 padded to a multiple of 128; 0 = from data_dir/corpus.json, padded
    bos_id: int = 50256  # the document separator (GPT-2's <|endoftext|>); -1 = from data_dir/corpus.json
    # --- model size ---
    num_layers: int = 11  # transformer blocks
    model_dim: int = 768  # residual stream width
    num_heads: int = 6  # attention heads (an even number with paired heads)
    head_dim: int = 128  # per head; num_heads * head_dim must equal model_dim
    mlp_ratio: int = 4  # MLP hidden width / model_dim
    # --- architecture features (each off-switch leaves the plain model) ---
    fp8: bool = True  # FP8 lm_head matmuls (torch._scaled_mm) on GPUs that have them; DISABLE_FP8=1 = False
    paired_head_layers: list[int] = field(default_factory=lambda: [0, 2, 5, 9])  # `none` = off
    value_embeds: bool = True  # the bank of value embeddings mixed into V (with gates)
    value_embed_layers: list[int] = field(default_factory=lambda: [0, 1, 8, 9, 10])  # layers that take a value embedding (one table each)
    bigram_embeds: bool = True  # hashed (previous, current) token embeddings added to the residual
    skip_connections: bool = True  # gated U-net skip from skip_from's output to skip_to's input
    skip_gate: bool = True  # the skip's gate per token: sigmoid(lambda) * 2 sigmoid(W x0[:12]); False = sigmoid(lambda)
    skip_from: int = 3  # the skip connection's source layer (its output)
    skip_to: int = 6  # ... and target layer (its input)
    smear: bool = True  # gated copy of token t-1's embedding into token t
    backout: bool = True  # x -= backout_lambda * x_backout before the head
    backout_layer: int = 7  # the layer whose output is backed out
    key_offset: bool = True  # long-window layers: stationary key dims shifted by one token
    mtp: bool = True  # multi-token prediction losses (weights from mtp_schedule); False = next token only
    softcap: bool = True  # logits -> 23 * sigmoid((logits + 5) / 7.5)
    qk_norm: bool = True  # RMSNorm on queries and keys
    mlp_activation: str = "relu2"  # relu2 | gelu
    mlp_kernel: str = "triton"  # relu2 MLP: triton (kernels.relu2_mlp, activation and its gradient in matmul epilogues) | torch (cuBLAS + Inductor)
    qkv_kernel: str = "triton"  # attention inputs (projection, q/k norm + rotary, key offset, value embeddings): triton (one fused op each way on CUDA bf16; elsewhere the torch code) | torch (Inductor)
    embedding_grads: str = "scatter"  # scatter (rows gathered outside the graph, their gradients scatter-added) | dense (autograd's)
    optimizer: str = "normuon"  # normuon (banks) + Adam (rest) | adamw (everything)
    attention_backend: str = "auto"  # auto (fa3, else fa4 on sm90/sm100, else flex; sdpa on CPU) | fa3 | fa4 | flex | sdpa
    attention_skip_layers: list[int] = field(default_factory=lambda: [6])  # layers without attention (MLP only)
    long_window_layers: list[int] = field(default_factory=lambda: [3, 10])  # layers with the long window (and the key offset)
    attn_scale: float = 0.1  # attention softmax scale at the start
    yarn_attn_factor: float = 0.2  # each YaRN rescale (long window grown s times) multiplies the scale by this * ln(s) + 1
    sa_lambdas: bool = True  # learned gains on each layer's QKV (start 0.5) and output (start 1.0) weights
    residual_init: float = 1.1  # residual lambdas at the start
    lm_head_init_std: float = 0.005  # head (and tied embedding) init N(0, this)
    # --- schedule (stages separated by ';', see schedule.py) ---
    seq_len: int = 2048  # longest document piece (documents are clipped to it)
    num_iterations: int = 1515  # scheduled steps, split evenly into the stages
    extension_iterations: int = 40  # then these, with the last entry of each schedule
    batch_schedule: str = "8;16;24;24"  # sequences of seq_len per micro-step (x 8 micro-steps per step)
    window_schedule: str = "1,3;3,7;5,11;6,13"  # (short, long) windows in blocks of 128 tokens
    final_long_window: int = 20  # long window for the final validation
    mtp_schedule: str = "1,0.5,0.25>0;1,0.5>0;1;1"  # per-stage weights; a>b moves linearly over the stage
    lr_schedule: str = "1.0;1.52;1.73;1.73"  # per-stage learning-rate multipliers
    cooldown_frac: float = 0.55  # lr decays over the final 55% of the scheduled steps ...
    final_lr_frac: float = 0.1  # ... toward this fraction
    tie_embeddings: bool = True  # tied until untie_step, then untied; False = untied from the start
    untie_step: int = -1  # odd; -1 = the first odd step at 2/3 of num_iterations (1011); >= the last step = tied throughout
    # --- optimizer ---
    muon_lr: float = 0.023  # NorMuon learning rate (times the schedule's multiplier)
    muon_momentum: float = 0.95  # the momentum between warmup and cooldown
    muon_momentum_min: float = 0.85  # ... rising from this over momentum_warmup_steps, back to it over the last momentum_cooldown_steps
    momentum_warmup_steps: int = 300  # steps of NorMuon's momentum warmup (muon_momentum_min -> muon_momentum)
    momentum_cooldown_steps: int = 50  # last steps of the run over which the momentum returns to muon_momentum_min
    muon_beta2: float = 0.95  # NorMuon's second-moment EMA (per row or column)
    muon_weight_decay: float = 1.2  # cautious; per step p -= wd * lr * lr_eff * p where update and p agree in sign
    mlp_proj_lr_mul: float = 2.0  # NorMuon lr multiplier of the MLP down projections
    adam_lr: float = 0.008  # times each group's lr_mul (ADAM_GROUPS)
    adam_eps: float = 1e-10  # Adam's epsilon
    adam_weight_decay: float = 0.005  # cautious; per Adam step p -= lr^2 * this * wd_mul * p (ADAM_GROUPS)
    adamw_matrix_lr: float = 0.004  # optimizer=adamw: lr of the bank matrices
    # --- validation and stopping ---
    val_tokens: int = 10_485_760  # the first tokens of the val shard(s)
    val_batch_tokens: int = 262_144  # tokens per validation forward per rank (head in bf16, no fp8)
    val_every: int = 250  # steps; 0 = only at the end
    target_val_loss: float = 3.28  # the time it is first reached is recorded (the run goes on)
    # --- system ---
    seed: int = 0  # model init and data order
    device: str = "auto"  # auto | cuda | cpu
    compile: bool = True  # torch.compile(fullgraph=True) on CUDA (ignored on CPU)
    warmup: bool = True  # untimed warmup of every step shape on CUDA (torch.compile, Triton autotuning), then state restored
    save_checkpoints: str = ""  # "" | "every:N" | "100,500,1000": checkpoints kept for studies
    save_checkpoints_as: str = "full"  # full (resumable, ckpt/step_N.pt) | weights_bf16 (weights only, 2-D in bf16, ckpt/weights/)
    checkpoint_every: int = 250  # a checkpoint every N steps against crashes (untimed; only the newest stays); 0 = off
    max_train_minutes: float = 0.0  # > 0: checkpoint and stop after this much wall time (job limits)
    log_every: int = 1  # a step line every N steps
    # --- training-dynamics studies (probes.py) ---
    probe_docs: str = ""  # a docs file (python -m nanogpt.data.select_docs): its documents' per-token losses go to probes/
    probe_every: int = 0  # score the probe documents every N steps (from step 0, and at the last); 0 = off
    probe_steps: str = ""  # or at these steps, e.g. 0,10,100


# ---- configuration -------------------------------------------------------------------------------------


def parse_hyperparameters(argv: list[str]) -> Hyperparameters:
    """Defaults <- recipe (RECIPE first, or --recipe=RECIPE) <- DISABLE_FP8 <- --key=value (nanogpt.config)."""
    environment = {"fp8": False} if os.environ.get("DISABLE_FP8", "0") not in ("", "0") else {}
    hp, _ = parse_config(Hyperparameters, argv, RECIPE_DIR, environment)
    check_choices(hp)
    return hp


def check_choices(hp: Hyperparameters) -> None:
    choices = {"mlp_activation": ("relu2", "gelu"), "mlp_kernel": ("triton", "torch"), "qkv_kernel": ("triton", "torch"),
               "optimizer": ("normuon", "adamw"), "embedding_grads": ("scatter", "dense"),
               "attention_backend": ATTENTION_BACKENDS, "device": ("auto", "cuda", "cpu"),
               "save_checkpoints_as": ("full", "weights_bf16")}
    for key, allowed in choices.items():
        if getattr(hp, key) not in allowed:
            raise ConfigError(f"--{key}: {getattr(hp, key)!r} is not one of {', '.join(allowed)}")
    for key in ("num_iterations", "seq_len", "val_batch_tokens", "val_tokens", "log_every", "num_layers", "model_dim"):
        if getattr(hp, key) < 1:
            raise ConfigError(f"--{key} must be >= 1, got {getattr(hp, key)}")
    if hp.num_heads * hp.head_dim != hp.model_dim:
        raise ConfigError(f"num_heads * head_dim ({hp.num_heads} * {hp.head_dim}) must equal model_dim ({hp.model_dim}) (square attention banks)")
    checkpoint_steps(hp.save_checkpoints, 1)  # raises on a bad spec
    if hp.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint_every must be >= 0 (0 = off), got {hp.checkpoint_every}")


def checkpoint_steps(spec: str, total_steps: int) -> set[int]:
    try:
        return probe_store.checkpoint_steps(spec, total_steps)
    except ProbeError as e:
        raise ConfigError(str(e)) from None


def default_data_dir() -> Path:
    root = os.environ.get("DATA_PATH") or os.environ.get("DATA_DIR") or "data"
    return Path(root) / "fineweb10B"


def resolve_data(hp: Hyperparameters) -> tuple[list[Path], list[Path]]:
    """Shards exist and are well-formed; vocab_size/bos_id from corpus.json where asked."""
    data_dir = Path(hp.data_dir) if hp.data_dir else default_data_dir()
    hp.data_dir = str(data_dir)
    if not data_dir.is_dir():
        raise ShardError(f"{data_dir}: data directory not found (python -m modded_nanogpt.data.cached_fineweb10B 9 "
                         "downloads FineWeb; python -m nanogpt.data.text_corpus makes local shards)")
    train, val = find_shards(data_dir, "train"), find_shards(data_dir, "val")
    if hp.vocab_size == 0 or hp.bos_id == -1:
        corpus = data_dir / "corpus.json"
        if not corpus.is_file():
            raise ConfigError(f"vocab_size=0 / bos_id=-1 read {corpus}, which does not exist; set them explicitly")
        meta = json.loads(corpus.read_text())
        if hp.vocab_size == 0:
            hp.vocab_size = -(-int(meta["vocab_size"]) // 128) * 128
        if hp.bos_id == -1:
            hp.bos_id = int(meta["eot_id"] if "eot_id" in meta else meta["end_of_text_id"])
    available = sum(read_shard_header(f) for f in val)
    if available < hp.val_tokens + 1:
        raise ConfigError(f"val_tokens={hp.val_tokens}: the val shards of {data_dir} hold {available:,} tokens "
                          f"(validation reads val_tokens + 1); lower val_tokens")
    return train, val


def model_config(hp: Hyperparameters) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in dataclasses.asdict(hp).items() if k in names})


def schedule_of(hp: Hyperparameters) -> Schedule:
    """The run's schedule from its settings (raises ScheduleError on a bad one)."""
    return Schedule(hp.num_iterations, hp.extension_iterations, hp.seq_len, TOTAL_MICRO_STEPS, hp.batch_schedule,
                    hp.window_schedule, hp.mtp_schedule, hp.lr_schedule, hp.final_long_window, hp.cooldown_frac,
                    hp.final_lr_frac, hp.mtp, hp.tie_embeddings, hp.untie_step,
                    Momentum(hp.muon_momentum_min, hp.muon_momentum, hp.momentum_warmup_steps,
                             hp.momentum_cooldown_steps))


# ---- runtime -------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0


def lm_head_mode(fp8: bool, device: torch.device) -> str:
    """How the LM head's matmuls run, for the log: fp8 tensor cores, fp8 simulated in float32 (the same rounding,
    on a GPU without fp8 tensor cores, e.g. an A100: slower than a bf16 head), or no fp8 at all."""
    if not fp8:
        return "bf16 (fp8 off)" if device.type == "cuda" else "float32 (fp8 off)"
    if device.type != "cuda":
        return "float32 (fp8 runs on GPUs only)"
    if kernels.has_fp8_tensor_cores(device.index):
        return "fp8 (torch._scaled_mm)"
    major, minor = torch.cuda.get_device_capability(device)
    return (f"fp8 simulated in float32: sm_{major}{minor} has no fp8 tensor cores, which makes the head slower "
            "than bf16; --fp8=False (or DISABLE_FP8=1) for a bf16 head")


def init_runtime(hp: Hyperparameters) -> Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size not in WORLD_SIZES:
        raise ConfigError(f"world_size {world_size} is not supported: the speedrun runs on 1, 2, 4 or 8 GPUs "
                          f"(one node; grad accumulation = 8 // world_size)")
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = hp.device == "cuda" or (hp.device == "auto" and torch.cuda.is_available())
    if hp.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA device is available")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return Runtime(rank, local_rank, world_size, device)


class StepReadings:
    """A step's losses and its all-ranks stop flag, read one step late so the host never waits for the GPU
    between steps (with a per-step `.item()` the GPU idles while the host launches the next step's first
    kernels: ~1 ms per stage-3 step on an H200, more where the host is slower).

    `queue(losses, stop)` is called right after a step is queued: it reduces the stop flag over the ranks
    (MAX, queued on the stream like everything else), copies losses and flag to pinned host memory without
    waiting, and records an event. `wait(record)` blocks on that event only, typically while the GPU is
    already running the next step, and returns (time it finished, the losses as floats, any rank asked to
    stop). Every rank
    reads the same reduced flag for the same step, so all ranks stop at the same step. On CPU everything
    has already happened.
    """

    def __init__(self, rt: Runtime):
        self.rt = rt

    def queue(self, losses: torch.Tensor, stop: bool) -> dict:
        values = losses.detach().float().reshape(-1)
        count = values.numel()
        if self.rt.world_size > 1:
            flag = to_device_async(torch.tensor([float(stop)]), self.rt.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            values = torch.cat([values, flag])
        if self.rt.device.type != "cuda":
            return {"values": values, "count": count, "stop": stop, "event": None}
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return {"values": host, "count": count, "stop": stop, "event": event}

    @staticmethod
    def wait(record: dict) -> tuple[float, list[float], bool]:
        if record["event"] is not None:
            record["event"].synchronize()
        now = time.perf_counter()
        values, count = record["values"].tolist(), record["count"]
        return now, values[:count], values[count] > 0 if len(values) > count else record["stop"]


# ---- optimizer -----------------------------------------------------------------------------------------


def build_optimizer(model: GPT, hp: Hyperparameters, rt: Runtime) -> SpeedrunOptimizer:
    """Banks -> NorMuon (or AdamW); embeddings and head, gates, scalars -> Adam with the published per-group
    settings (ADAM_GROUPS)."""
    members = {
        "value_bigram": ["value_embeds", "bigram_embed"], "head": ["lm_head_t"], "embed": ["embed"],
        "x0_lambdas": ["x0_lambdas"], "scalars": ["scalars"], "smear_gate": ["smear_gate"],
        "skip_gate": ["skip_gate"], "gates": ["attn_gate", "ve_gate"],
    }
    groups = []
    for name, (betas, lr_mul, wd_mul) in ADAM_GROUPS.items():
        params = [getattr(model, n) for n in members[name] if hasattr(model, n)]
        if params:
            groups.append(AdamGroup(name, params, hp.adam_lr * lr_mul, betas, hp.adam_weight_decay * wd_mul))
    hd = hp.num_heads * hp.head_dim
    mlp_matrices = model.mlp_bank.numel() // (model.hidden * hp.model_dim)  # [up_0, down_0, up_1, down_1, ...]
    banks = [BankSpec("attn_bank", model.attn_bank, (model.attn_bank.numel() // (hd * hp.model_dim), hd, hp.model_dim)),
             BankSpec("mlp_bank", model.mlp_bank, (mlp_matrices, model.hidden, hp.model_dim),
                      lr_muls=[1.0, hp.mlp_proj_lr_mul] * (mlp_matrices // 2))]
    if hp.optimizer == "adamw":
        groups.append(AdamGroup("matrices", [b.param for b in banks], hp.adamw_matrix_lr, (0.9, 0.95), 0.0, every_step=True))
        banks = []
    return SpeedrunOptimizer(banks, groups, hp.muon_lr, hp.muon_momentum, hp.muon_beta2, hp.muon_weight_decay,
                             hp.adam_eps, rt.rank, rt.world_size)


# ---- one step, one validation ----------------------------------------------------------------------------


def window_inputs(model, short_window: int, long_window: int, device):
    """The attention windows as the forward takes them: 0-d tensors, which the compiled graph reads as inputs,
    so the stages that differ only in windows (the last stage and the extension; every validation) share
    one graph. FA4 reads them on the host, so they stay on the CPU; FlashAttention 3 takes its window as a
    Python int (then each window compiles its own graph)."""
    if model.attention_backend == "fa3":
        return short_window, long_window
    if model.attention_backend == "fa4":
        return tuple(torch.tensor(w, dtype=torch.int64) for w in (short_window, long_window))
    return tuple(to_device_async(torch.tensor(w, dtype=torch.int64), device) for w in (short_window, long_window))


FA4_CACHE_SWITCH = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"  # "1": FA4's kernels go to (and come from) its disk cache
FA4_CACHE_DIR = "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"  # that cache's folder (read when flash_attn.cute is imported)
# The kernel caches beside the run directory (nanogpt.rundir.compile_caches), FlashAttention 4's CuTe kernels'
# included.
SPEEDRUN_CACHES = COMPILE_CACHES | {FA4_CACHE_DIR: "flash_attn_cute"}
FLASH_BOUNDARY_SLOTS = 1024  # cu_seqlens entries FA3/FA4 get at least (documents + 1), see flash_boundaries


def flash_boundaries(model, cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """The document boundaries as FA3/FA4 read them: padded with `tokens` (empty documents at the end) to
    FLASH_BOUNDARY_SLOTS entries, or the next power of two above for a batch of more documents (at most
    tokens + 1). The number of documents changes from batch to batch, and the compiled graph, of static shapes,
    would compile again for each new count; in a few fixed lengths it compiles once each. (Every slot costs:
    FA4 forward + backward at 49,152 tokens and 70 documents took 1.1 ms with 71 entries and with 1,025, but
    11.9 ms with 49,153 on an H200.) The other backends do not read cu_seqlens."""
    if model.attention_backend not in FLASH_BACKENDS or cu_seqlens is None:
        return cu_seqlens
    slots = max(FLASH_BOUNDARY_SLOTS, 1 << (cu_seqlens.numel() - 1).bit_length())
    return torch.nn.functional.pad(cu_seqlens, (0, min(slots, tokens + 1) - cu_seqlens.numel()), value=tokens)


def fa4_precompile_wanted(backend: str, device: torch.device) -> bool:
    """Whether the warmup compiles FA4's kernels in a child process (start_fa4_precompile): attention_backend fa4
    on CUDA with FA4's disk cache on (FA4_CACHE_SWITCH) and its folder empty or absent. A cache that holds files
    already (a later run in the same folder of runs) gives the first call its kernels from disk, and a child
    would only import and load them again beside the first graph."""
    if backend != "fa4" or device.type != "cuda" or os.environ.get(FA4_CACHE_SWITCH) != "1":
        return False
    return not holds_files(os.environ.get(FA4_CACHE_DIR))


def start_fa4_precompile(model, seq_len: int, device: torch.device):
    """model.fa4_precompile for this model: two documents of seq_len tokens, padded as flash_boundaries pads a
    batch (the padded length picks FA4's kernel variant), the model's heads, head size and scale."""
    two_docs = torch.tensor([0, seq_len, 2 * seq_len], dtype=torch.int32, device=device)
    return fa4_precompile(flash_boundaries(model, two_docs, 2 * seq_len), seq_len, model.config.num_heads,
                          model.config.head_dim, model.config.attn_scale, BLOCK)


def embedding_rows(model, inputs) -> tuple[dict | None, list]:
    """The forward's `rows` argument and what add_row_grads needs after the backward: gathered embedding rows
    with --embedding_grads=scatter (GPT.gather_rows says why), else (None, []): the graph reads the tables."""
    if model.embedding_grads == "scatter":
        return model.gather_rows(inputs)
    return None, []


def train_step(model, step_fn, optimizer, loader, plan, rt: Runtime):
    """Forward/backward over this rank's micro-steps, then the optimizer; returns the step's mean losses per
    token, a tensor [next-token loss, MTP-weighted loss] (still on the device: reading it waits for the GPU)."""
    accumulation = TOTAL_MICRO_STEPS // rt.world_size
    micro_tokens = plan.batch_tokens // TOTAL_MICRO_STEPS
    loader.tokens_per_rank = micro_tokens
    model.set_long_window(plan.long_window)
    # A tensor, so the weights can move every step without a recompile (their count changes per stage).
    mtp = to_device_async(torch.tensor(plan.mtp_weights, dtype=torch.float32), rt.device)
    short, long = window_inputs(model, plan.short_window, plan.long_window, rt.device)
    next_total = torch.zeros((), device=rt.device)
    loss_total = torch.zeros((), device=rt.device)
    for _ in range(accumulation):
        batch = loader.next_batch()
        rows, scatter = embedding_rows(model, batch.inputs)
        cu_seqlens = flash_boundaries(model, batch.cu_seqlens, micro_tokens)
        loss, next_token = step_fn(batch.inputs, batch.targets, short, long, mtp, LOSS_DIVISOR, cu_seqlens, rows,
                                   with_next_token=True)
        loss.backward()
        model.add_row_grads(scatter)
        loss_total += loss.detach()
        next_total += next_token
    model.tie_gradients()  # tied: the token rows' gradient joins the head's (GPT.gather_rows says why)
    optimizer.step(plan.lr_multiplier, plan.adam_step, plan.muon_momentum)
    if plan.untie_after:
        model.untie()
        optimizer.copy_adam_state(model.lm_head_t, model.embed, transform=lambda t: t.T if t.ndim == 2 else t)
    totals = torch.stack([next_total, loss_total])
    if rt.world_size > 1:
        dist.all_reduce(totals)
    return totals * (LOSS_DIVISOR / plan.batch_tokens)  # the means over the step's tokens


def validate(model, eval_fn, val_files, hp: Hyperparameters, rt: Runtime, short_window: int, long_window: int,
             max_forwards: int | None = None) -> float:
    """Mean next-token loss over the first val_tokens of the val shards (fresh loader each time), in eval mode
    (the head in bf16, no fp8), with the given attention windows, in forwards of val_batch_tokens per rank.

    The val tokens are read as one contiguous stream, as the speedrun validates (no BOS alignment, no clipping
    to seq_len): every run scores the same first val_tokens, whatever its forward size, and so does the
    baseline trainer (nanogpt.train), which makes their val losses comparable. The forward size still sets
    where attention context restarts (a forward's first tokens see no earlier ones): the published 262,144.
    """
    per_forward = hp.val_batch_tokens
    steps = hp.val_tokens // (per_forward * rt.world_size)
    if max_forwards is not None:  # the warmup: compile, do not measure
        steps = min(steps, max_forwards)
    weights = torch.ones(1, device=rt.device)
    short, long = window_inputs(model, short_window, long_window, rt.device)
    loader = SequentialLoader(val_files, per_forward, hp.val_tokens, hp.bos_id, rt.rank, rt.world_size, rt.device)
    total = torch.zeros((), device=rt.device, dtype=torch.float64)
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(steps):
                batch = loader.next_batch()
                rows = embedding_rows(model, batch.inputs)[0]
                cu_seqlens = flash_boundaries(model, batch.cu_seqlens, per_forward)
                loss = eval_fn(batch.inputs, batch.targets, short, long, weights, float(per_forward), cu_seqlens, rows)
                total += loss.double() * per_forward
    finally:
        model.train()
        loader.close()
    if rt.world_size > 1:
        dist.all_reduce(total)
    return total.item() / (steps * per_forward * rt.world_size)


def validation_windows(model, schedule: Schedule, steps_done: int) -> tuple[int, int]:
    """The windows of a validation after steps_done steps, with YaRN set for them: those of the next step, as the
    published loop advances its schedule (YaRN included) before it validates; after the last step the last
    stage's short window and final_long_window, without a YaRN rescale (the published final validation)."""
    short, long = schedule.windows_at(steps_done)
    if steps_done < schedule.total_steps:
        model.set_long_window(long)
    return short, long


# ---- the run -------------------------------------------------------------------------------------------


def snapshot(model, optimizer, loader) -> dict:
    return {"model": copy.deepcopy(model.state_dict()), "optimizer": optimizer.state_dict(), "loader": loader.state_dict()}


def restore(state, model, optimizer, loader) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    loader.load_state_dict(state["loader"])


def parameter_counts(model: GPT) -> dict:
    """provenance.json's "parameters": every parameter, and those outside the embedding tables (token, value,
    bigram) and the output head, the part that does the compute per token (reports show both)."""
    tables = {"embed", "lm_head_t", "value_embeds", "bigram_embed"}
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "non_embedding": sum(p.numel() for n, p in model.named_parameters() if n not in tables)}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage(__doc__, Hyperparameters))
        return {}
    hp = parse_hyperparameters(argv)
    rt = init_runtime(hp)  # refuses world sizes other than 1/2/4/8 before anything is allocated
    try:
        result = run(hp, rt, argv)
        if dist.is_initialized():
            dist.barrier()  # leave together: gloo can abort a rank whose peer tears down connections first
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
            # Free what still refers to the process group's tensors while the interpreter is whole: left to the
            # interpreter's exit, 2-rank gloo runs that saved a checkpoint mid-run aborted in rank 1's teardown
            # ("terminate called without an active exception") in 4 of 15 runs; 0 of 30 with the collection.
            gc.collect()


def run(hp: Hyperparameters, rt: Runtime, argv: list[str]) -> dict:
    train_files, val_files = resolve_data(hp)
    if not hp.run_dir:
        hp.run_dir = str(Path(os.environ.get("RUNS_DIR", "runs")) / f"modded-{time.strftime('%Y%m%d-%H%M%S')}")
    caches = None
    if rt.device.type == "cuda":  # before anything compiles or imports flash_attn.cute
        os.environ.setdefault(FA4_CACHE_SWITCH, "1")
        caches = compile_caches(Path(hp.run_dir), SPEEDRUN_CACHES)
    try:
        cfg = model_config(hp)
        schedule = schedule_of(hp)
        backend = select_attention_backend(hp.attention_backend, rt.device)
    except (ValueError, ScheduleError) as e:
        raise ConfigError(str(e)) from None
    if hp.val_tokens % (hp.val_batch_tokens * rt.world_size):
        raise ConfigError(f"val_tokens ({hp.val_tokens}) must be a multiple of val_batch_tokens * world_size "
                          f"({hp.val_batch_tokens} * {rt.world_size})")
    check_same_trainer(Path(hp.run_dir), "modded_nanogpt.train_gpt")
    if rt.master:
        check_writable(Path(hp.run_dir))
    total_steps = schedule.total_steps
    check_token_ids(val_files, hp.vocab_size)
    check_token_ids(train_files, hp.vocab_size, sum(schedule.at(s).batch_tokens for s in range(total_steps)))
    # Probe documents are packed by their BOS token (probes.py): a file whose documents do not start with it is
    # refused here, before the model is built.
    study = Study(hp.run_dir, hp.probe_docs, hp.probe_every, hp.probe_steps, hp.save_checkpoints,
                  hp.save_checkpoints_as, total_steps, hp.vocab_size, rt.master, hp.bos_id)
    keep_steps = study.full_steps
    periodic = set(range(hp.checkpoint_every, total_steps, hp.checkpoint_every)) if hp.checkpoint_every else set()
    log_run = RunDir(Path(hp.run_dir), rt.master)
    log = log_run.log
    finished = log_run.completed(total_steps)
    if finished is not None:  # e.g. a requeued job whose run had ended: nothing to redo, nothing rewritten
        log(f"{hp.run_dir} already finished its {total_steps} steps (final val_loss {finished.get('final_val_loss') or float('nan'):.4f}, "
            f"train_time {finished.get('train_time_ms', 0) / 1000:.1f}s): nothing to do; give a new --run_dir to "
            "train again")
        return finished

    torch.manual_seed(hp.seed)
    try:
        model = GPT(cfg).to(rt.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model.attention_backend = backend
    model.max_doc_tokens = hp.seq_len
    model.embedding_grads = hp.embedding_grads
    if not hp.tie_embeddings:
        model.untie()
    compiled = hp.compile and rt.device.type == "cuda"
    if compiled:
        torch._dynamo.config.cache_size_limit = 64
        # Static shapes: one graph per schedule shape (the warmup compiles them all); dynamic sequence
        # lengths trip Inductor on the block-mask arithmetic and would slow every kernel.
        step_fn = torch.compile(model, fullgraph=True, dynamic=False)
        probe_fn = torch.compile(probes.packed_losses, fullgraph=True, dynamic=False)
    else:
        step_fn, probe_fn = model, probes.packed_losses
    packed_probes = None  # the probe documents packed once, on the device, for every probe step
    if study.docs is not None:
        packed_probes = probes.pack_documents(model, study.docs, probes.forward_tokens(backend, compiled,
                                                                                   hp.val_batch_tokens), rt.device)
    optimizer = build_optimizer(model, hp, rt)
    loader = DistributedBOSLoader(train_files, schedule.at(0).batch_tokens // TOTAL_MICRO_STEPS, hp.seq_len,
                                  hp.bos_id, rt.rank, rt.world_size, rt.device)

    start_step, state = 0, {"train_time_ms": 0.0, "time_to_target_ms": None, "tokens": 0, "last_val_loss": None}
    saved = load_newest(log_run.ckpt_dir, log)
    if saved is not None:
        if saved["config"]["num_layers"] != hp.num_layers or saved["config"]["model_dim"] != hp.model_dim:
            raise ConfigError(f"{hp.run_dir}: its checkpoint is of another model size; use a new run_dir")
        restore(saved, model, optimizer, loader)
        start_step, state = saved["step"], saved["state"]
    config = dataclasses.asdict(hp)
    backend_detail = describe_attention_backend(backend)
    log_run.start(config, provenance("modded_nanogpt.train_gpt", argv, rt.world_size, backend_detail)
                  | {"parameters": parameter_counts(model), "kernel_caches": caches},
                  start_step if saved else None)
    log(f"modded_nanogpt: world_size {rt.world_size} | {TOTAL_MICRO_STEPS // rt.world_size} micro-steps/rank "
        f"| attention {backend_detail} | compile {compiled} | params {sum(p.numel() for p in model.parameters()):,} | run {hp.run_dir}")
    log(f"lm head: {lm_head_mode(hp.fp8, rt.device)}")
    if caches is not None:
        log(caches_text(caches))
    if saved is not None:
        log(f"resumed from step {start_step}")
    study.start(start_step if saved else None, log)
    clipped = loader.clipped_fraction()
    if clipped > 0.1:
        log(f"warning: documents are clipped to seq_len={hp.seq_len} tokens: {100 * clipped:.0f}% of the first train "
            f"shard is never trained on (cut long documents into pieces, e.g. python -m nanogpt.data.text_corpus "
            f"--doc_chars N, or raise seq_len)")

    def save(step: int):
        ckpt = {"step": step, "state": state, "config": config, **snapshot(model, optimizer, loader)}
        if rt.master:
            save_checkpoint(log_run.ckpt_dir, step, ckpt)
            prune_checkpoints(log_run.ckpt_dir, step, keep_newest=1, keep_steps=keep_steps)  # the newest resumes

    def warm_probe(short_window: int, long_window: int):
        """One probe forward (all have one shape): its graph compiled in the warmup, for these windows and the
        model's tying state, as validation's."""
        if packed_probes is not None:
            probes.forward_losses(model, packed_probes, short_window, long_window, probe_fn, max_forwards=1)

    # --- warmup: compile every shape the schedule meets, untimed, then put everything back ---
    warmup_s = 0.0
    # On CUDA also without torch.compile: the Triton kernels compile and autotune per shape on first use.
    if (compiled or rt.device.type == "cuda") and hp.warmup and start_step < total_steps:
        t0 = time.perf_counter()
        precompile = None
        # FA4's kernels compile in a child process beside the first graph, reaching this one through the disk cache
        if fa4_precompile_wanted(backend, rt.device):
            precompile = start_fa4_precompile(model, hp.seq_len, rt.device)
        elif backend == "fa4" and os.environ.get(FA4_CACHE_SWITCH) == "1":
            log(f"warmup: FA4's kernels load from its warm disk cache ({os.environ.get(FA4_CACHE_DIR)})")
        saved_state = snapshot(model, optimizer, loader)
        plans = schedule.distinct_shapes()
        for plan in plans:
            if schedule.untie_step is not None and plan.step > schedule.untie_step and model.is_tied:
                model.untie()
            train_step(model, step_fn, optimizer, loader, plan, rt)
            # Validation's eval-mode graph (flex, fa4: one for every window and, with gathered rows, tied or not).
            validate(model, step_fn, val_files, hp, rt, plan.short_window, plan.long_window, max_forwards=1)
            warm_probe(plan.short_window, plan.long_window)
            log(f"warmup: step shape of step {plan.step} (batch {plan.batch_tokens}, windows {plan.short_window},"
                f"{plan.long_window}, {len(plan.mtp_weights)} MTP terms) compiled at {time.perf_counter() - t0:.0f}s")
            if precompile is not None:  # done by now: the step's FA4 calls waited for it
                precompile.join()
                log(f"warmup: FA4's kernels compiled beside the first graph, in a child process, in "
                    f"{precompile.seconds:.1f}s" if precompile.error is None else f"warmup: FA4's kernels did not "
                    f"compile beside the first graph ({precompile.error}); the first step compiled them")
                precompile = None
        validate(model, step_fn, val_files, hp, rt, *schedule.windows_at(total_steps), max_forwards=1)
        warm_probe(*schedule.windows_at(total_steps))
        restore(saved_state, model, optimizer, loader)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        warmup_s = time.perf_counter() - t0
        probed = " + probe forward" if packed_probes is not None else ""
        log(f"warmup (compile of {len(plans)} step shapes + validation{probed}): {warmup_s:.1f}s, not timed")
        torch.manual_seed(hp.seed)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def sync():
        if rt.device.type == "cuda":
            torch.cuda.synchronize()

    def study_step(step: int):
        """The study's work at this step (weights-only checkpoints, probe scores); the caller keeps it off the clock."""
        study.save_weights(step, model.state_dict(), state["tokens"], {"config": config}, log)
        if study.due(step):
            started = time.perf_counter()
            windows = validation_windows(model, schedule, step)
            scores = probes.score_documents(model, packed_probes, *windows, probe_fn)
            study.record(step, scores, state["tokens"], time.perf_counter() - started, log)

    study_step(start_step)  # step 0, or the step a resumed run starts from

    deadline = time.time() + 60 * hp.max_train_minutes if hp.max_train_minutes > 0 else None
    readings = StepReadings(rt)

    def take(entry) -> bool:
        """Wait for a queued step to finish on the GPU, add its time to the clock, log it; return whether any
        rank asked to stop by then."""
        nonlocal clock
        done_step, done_plan, tokens, record = entry
        now, (loss_value, mtp_loss_value), stop = readings.wait(record)
        state["train_time_ms"] += 1000 * (now - clock)
        clock = now
        if done_step % hp.log_every == 0 or done_step == total_steps:
            step_avg = state["train_time_ms"] / done_step
            log(f"step:{done_step}/{total_steps} train_loss:{loss_value:.4f} train_mtp_loss:{mtp_loss_value:.4f} "
                f"train_time:{state['train_time_ms']:.0f}ms step_avg:{step_avg:.2f}ms")
            log_run.metric("train", step=done_step, tokens=tokens, train_time_ms=state["train_time_ms"],
                           loss=loss_value, mtp_loss=mtp_loss_value, lr_multiplier=done_plan.lr_multiplier, stage=done_plan.stage,
                           batch_tokens=done_plan.batch_tokens, windows=[done_plan.short_window, done_plan.long_window],
                           mtp_weights=list(done_plan.mtp_weights), step_avg_ms=step_avg)
            if not (math.isfinite(loss_value) and math.isfinite(mtp_loss_value)):
                raise FloatingPointError(f"loss is {loss_value} (MTP-weighted {mtp_loss_value}) at step {done_step}")
        return stop

    with StopSignal() as stop_signal:
        sync()
        clock = time.perf_counter()
        step = start_step
        queued = None  # the last step whose loss has not been read: read after the next step is queued
        while step < total_steps:
            plan = schedule.at(step)
            loss = train_step(model, step_fn, optimizer, loader, plan, rt)
            step += 1
            state["tokens"] += plan.batch_tokens
            last = step == total_steps
            asked = stop_signal.received is not None or (deadline is not None and time.time() >= deadline)
            current = (step, plan, state["tokens"], readings.queue(loss, asked))
            # The previous step's readings: the GPU already holds this step's work, so waiting costs nothing.
            stop = take(queued) if queued is not None else False
            # One rank knows its own flag now; several agree on the reduced flags, a step late.
            stop = stop or (rt.world_size == 1 and asked)
            queued = current
            validating = last or (hp.val_every and step % hp.val_every == 0)
            saving = step in keep_steps or step in periodic
            studying = step in study.weight_steps or study.due(step)
            if validating or stop or saving or studying:
                stop = take(queued) or stop
                queued = None
            if validating:
                val_loss = validate(model, step_fn, val_files, hp, rt, *validation_windows(model, schedule, step))
                state["last_val_loss"] = val_loss
                if state["time_to_target_ms"] is None and val_loss <= hp.target_val_loss:
                    state["time_to_target_ms"] = state["train_time_ms"]
                    state["step_to_target"] = step
                log(f"step:{step}/{total_steps} val_loss:{val_loss:.4f} train_time:{state['train_time_ms']:.0f}ms "
                    f"step_avg:{state['train_time_ms'] / step:.2f}ms")
                log_run.metric("val", step=step, tokens=state["tokens"], train_time_ms=state["train_time_ms"],
                               val_loss=val_loss)
                sync()
                clock = time.perf_counter()
            if studying:  # outside the training clock, as validation
                study_step(step)
                sync()
                clock = time.perf_counter()
            if saving and not last:  # outside the training clock, as validation
                save(step)
                clock = time.perf_counter()
            if stop and not last:
                out_of_time = deadline is not None and time.time() >= deadline
                reason = (f"signal {stop_signal.received}" if stop_signal.received
                          else "max_train_minutes" if out_of_time else "another rank asked to stop")
                if not saving:  # else saved just above
                    save(step)
                log(f"stopping at step {step}: {reason}; run the same command again to resume")
                log_run.metric("stop", step=step, reason=reason, train_time_ms=state["train_time_ms"])
                return {"stopped": reason, "step": step, "train_time_ms": state["train_time_ms"]}
    # A process that resumed from the final checkpoint (killed before its end record) trained nothing: it
    # neither saves again nor reports a warmup or a peak memory of its own.
    trained = start_step < total_steps
    if trained:
        save(total_steps)
    peak = torch.cuda.max_memory_allocated(rt.device) if rt.device.type == "cuda" and trained else None
    summary = {"step": total_steps, "tokens": state["tokens"], "train_time_ms": state["train_time_ms"],
               "final_val_loss": state["last_val_loss"], "target_val_loss": hp.target_val_loss,
               "reached_target": state["time_to_target_ms"] is not None,
               "time_to_target_ms": state["time_to_target_ms"], "warmup_s": warmup_s if trained else None,
               "peak_memory_bytes": peak, "world_size": rt.world_size}
    log_run.metric("end", **summary)
    peak_text = f" | peak memory {peak / 2**30:.1f} GiB" if peak else ""
    log(f"done | final val_loss {state['last_val_loss']:.4f} | train_time {state['train_time_ms'] / 1000:.1f}s"
        f"{peak_text} | run {hp.run_dir}")
    return summary


def cli() -> int:
    return trainer_exit_status(main, {ConfigError: 2, ShardError: 2, ProbeError: 2, RunDirError: 1})


if __name__ == "__main__":
    sys.exit(cli())
