"""Submit the playbook's jobs with submitit, then follow them: data preparation, FlashAttention builds,
training of either trainer on 1-8 GPUs and several nodes, seed arrays, ablations and comparisons.

    python -m slurm.submit prep fineweb --chunks 9
    python -m slurm.submit build-flash-attn --gpu-type h100 --src /shared/src/flash-attention
    python -m slurm.submit train baseline --gpu-type h100 --num-gpus 8 [--nodes 2] [--seeds 1,2,3] [--set max_iters=100]
    python -m slurm.submit train modded --gpu-type h100 --num-gpus 8 [--recipe NAME]
    python -m slurm.submit ablate --features value_embeds,smear --seeds 3 --gpu-type h100 --num-gpus 8
    python -m slurm.submit compare --gpu-type h100 --num-gpus 8 --seeds 3
    python -m slurm.submit study --trainer modded --seeds 1-8 --docs docs.npz --probe-every 5 --gpu-type h100
    python -m slurm.submit status [SUBMISSION] [--wait]      # also: logs [--tail N], cancel
    python -m slurm.submit resume [SUBMISSION] [--job LABEL] [--time T]   # runs that stopped unfinished go on
  add --dry-run to print what would be submitted (no cluster needed), --cluster local to run on this
  machine, --device cpu --recipe tiny_cpu --data text for tiny CPU runs (a test cluster's fake GPUs).

Every job runs one of the sbatch scripts of slurm/ (the same as under plain sbatch) from a copy of the code
taken at submission, so a job that starts later runs the code it was submitted with. Training waits for
the data preparation it needs (afterok); seeds and ablations are job arrays; a job stopped by its time
limit or a preemption notice checkpoints, requeues itself and resumes. Each submission is recorded in
$RUNS_DIR/submissions/<id>/manifest.json (job ids, scripts, knobs, run directories, logs), beside the code
snapshot (code/) and the job logs (jobs/); its runs go to $RUNS_DIR/<id>/<run name>/.
Before anything is submitted, the request is checked: GPU type (slurm/gpus.tsv, and what the cluster
offers: sinfo), GPU and node counts the trainer can use, the environment, the data; an error exits with
status 2 and submits nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from nanogpt.gpus import gpu_table
from nanogpt.rundir import last_record
from slurm import jobs
from slurm.manifest import (
    TERMINAL_STATES,
    ManifestError,
    failure_lines,
    find_manifest,
    log_tail,
    progress,
    scheduler_states,
    write_json,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
EXIT_USAGE = 2
SIGNAL_DELAY_S = 120  # the preemption/time-limit signal comes this long before the end (as in the scripts)
MODDED_GPU_COUNTS = (1, 2, 4, 8)
SNAPSHOT_MAX_FILE_BYTES = 20 << 20  # untracked files bigger than this are left out of the code snapshot


class LaunchError(Exception):
    """A request that cannot be submitted; the message says why and what to do."""

    exit_status = EXIT_USAGE


class JobFailed(LaunchError):
    """A job run on this machine (--cluster local/debug) failed; the message names its log."""

    exit_status = 1


# ---- what can be submitted ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Trainer:
    name: str
    script: str
    default_recipe: str | None  # None: the trainer's own defaults
    recipe_dir: str
    gpu_counts: tuple[int, ...] | None = None  # total GPUs it can use; None = any
    one_node: bool = False
    seed_key: str = "seed"


TRAINERS = {
    "baseline": Trainer("baseline", "slurm/nanogpt/train_gpt2.sh", "train_gpt2_fineweb", "nanogpt/recipes"),
    "modded": Trainer("modded", "slurm/modded/train_speedrun.sh", None, "modded_nanogpt/recipes",
                      gpu_counts=MODDED_GPU_COUNTS, one_node=True),
}

# The one table of ablations: a setting of the modded trainer -> its value with the feature switched off. The
# launcher submits `--feature=value` (ablation_override); the report finds the ablated groups by the value.
ABLATIONS = {
    **{feature: False for feature in (
        "value_embeds", "bigram_embeds", "skip_connections", "skip_gate", "smear", "backout", "key_offset", "mtp",
        "softcap", "qk_norm", "sa_lambdas", "fp8")},
    "paired_head_layers": [],
    "mlp_activation": "gelu",
    "optimizer": "adamw",
}


def ablation_override(feature: str) -> str:
    """The command-line override that switches `feature` off, e.g. --value_embeds=False."""
    value = ABLATIONS[feature]
    text = (",".join(map(str, value)) or "none") if isinstance(value, list) else str(value)
    return f"--{feature}={text}"

# dataset -> (preparation script, default folder under DATA_DIR, CPUs, minutes)
DATASETS = {
    "fineweb": ("slurm/modded/prepare_fineweb.sh", "fineweb10B", 4, 240),
    "shakespeare_char": ("slurm/nanogpt/prepare_shakespeare.sh", "shakespeare_char", 2, 30),
    "shakespeare": ("slurm/nanogpt/prepare_shakespeare.sh", "shakespeare", 2, 30),
    "openwebtext": ("slurm/nanogpt/prepare_openwebtext.sh", "openwebtext", 16, 720),
    "text": ("slurm/prepare_text.sh", None, 4, 60),  # folder: stdlib_<tokenizer>, or text_<tokenizer> with --source
}
TEXT_TOKENIZERS = ("char", "bpe", "gpt2", "auto")


@dataclass
class Task:
    """One element of a job (a plain job has one): its label and the knobs its script gets."""
    label: str
    knobs: dict[str, str]
    run_dir: str | None = None
    out_dir: str | None = None


@dataclass
class JobSpec:
    name: str
    role: str  # prep | build | train | report
    script: str | None  # a script of slurm/, run by jobs.ScriptJob; None: `module` via jobs.ModuleJob
    tasks: list[Task]
    cpus_per_task: int
    time_min: int
    nodes: int = 1
    gpus_per_node: int = 0
    gpu_type: str | None = None
    partition: str | None = None
    after: list[str] = field(default_factory=list)  # names of jobs that must end first
    after_kind: str = "afterok"
    array_parallelism: int | None = None
    module: list[str] | None = None  # report jobs: python -m MODULE ARGS


@dataclass
class Context:
    """Where things go and what every job shares, from the command line and the environment."""
    cluster: str
    dry_run: bool
    runs_dir: Path
    data_root: Path
    env_path: Path
    partition: str | None
    cpu_partition: str | None
    account: str | None
    qos: str | None
    submission_id: str = ""

    @property
    def submission_dir(self) -> Path:
        return self.runs_dir / "submissions" / self.submission_id

    @property
    def code_dir(self) -> Path:
        return self.submission_dir / "code"

    def run_dir(self, label: str) -> str:
        return str(self.runs_dir / self.submission_id / label)

    def base_knobs(self) -> dict[str, str]:
        return {"REPO_DIR": str(self.code_dir), "ENV_PATH": str(self.env_path), "DATA_DIR": str(self.data_root),
                "RUNS_DIR": str(self.runs_dir), "REQUEUE": "auto"}


# ---- small parsers -----------------------------------------------------------------------------------

def parse_time_min(text: str) -> int:
    """Slurm's time formats (MM, HH:MM:SS, D-HH[:MM[:SS]]) -> whole minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise LaunchError(f"--time {text!r}: use minutes, HH:MM:SS or D-HH:MM:SS")
    days, first, second, third = match.groups()
    if days is not None:
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
    elif third is not None:
        hours, minutes, seconds = int(first), int(second), int(third)
    elif second is not None:
        hours, minutes, seconds = 0, int(first), int(second)
    else:
        hours, minutes, seconds = 0, int(first), 0
    total = (int(days or 0) * 24 + hours) * 60 + minutes + (1 if seconds else 0)
    if total < 1:
        raise LaunchError(f"--time {text!r} is shorter than a minute")
    return total


def parse_seeds(text: str | None, count_allowed: bool) -> list[int] | None:
    """'1,2,3' -> [1, 2, 3]; with count_allowed a single number N means seeds 1..N."""
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(re.fullmatch(r"\d+", part) for part in parts):
        raise LaunchError(f"--seeds {text!r}: give seeds as whole numbers, e.g. 1,2,3")
    seeds = [int(part) for part in parts]
    if count_allowed and len(seeds) == 1 and "," not in text:
        if seeds[0] < 1:
            raise LaunchError("--seeds 0: give a number of seeds >= 1 or a list such as 0,1")
        return list(range(1, seeds[0] + 1))
    if len(set(seeds)) != len(seeds):
        raise LaunchError(f"--seeds {text!r} repeats a seed")
    return seeds


def parse_overrides(pairs: list[str] | None, option: str = "--set") -> list[str]:
    """KEY=VALUE pairs -> --KEY=VALUE arguments for a trainer (the scripts word-split them: no spaces)."""
    args = []
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise LaunchError(f"{option} {pair!r}: expected KEY=VALUE, e.g. {option} max_iters=100")
        if re.search(r"\s", value) or not value:
            raise LaunchError(f"{option} {pair!r}: the value must be non-empty and hold no spaces")
        args.append(f"--{key}={value}")
    return args


# ---- checks that need the cluster ---------------------------------------------------------------------

def parse_sinfo(text: str) -> dict[str, tuple[int, int]]:
    """`sinfo -h -N -o '%N|%G'` -> GPU type -> (nodes that have it, most GPUs of it on one node).
    A node listed in several partitions counts once; untyped GRES (gpu:8) names no type and is left out."""
    per_node: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        node, _, gres = line.strip().partition("|")
        for gpu_type, count in re.findall(r"gpu:([A-Za-z][A-Za-z0-9_.-]*):(\d+)", gres):
            per_node.setdefault(node, {})[gpu_type] = int(count)
    offered: dict[str, tuple[int, int]] = {}
    for counts in per_node.values():
        for gpu_type, count in counts.items():
            nodes, most = offered.get(gpu_type, (0, 0))
            offered[gpu_type] = (nodes + 1, max(most, count))
    return offered


def query_cluster(partition: str | None) -> tuple[dict[str, tuple[int, int]] | None, str]:
    """What the cluster offers (parse_sinfo), or (None, why) when sinfo cannot tell."""
    if shutil.which("sinfo") is None:
        return None, "sinfo not found"
    cmd = ["sinfo", "-h", "-N", "-o", "%N|%G"] + (["-p", partition] if partition else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"sinfo failed: {e}"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"status {proc.returncode}"])[-1]
        return None, f"sinfo failed: {last}"
    if not proc.stdout.strip():  # sinfo -p NAME lists nothing for a partition that does not exist
        return {}, "no nodes"
    return parse_sinfo(proc.stdout), ""


def sbatch_reachable() -> bool:
    return shutil.which("sbatch") is not None


# ---- planning ------------------------------------------------------------------------------------------

def check_env_path(env_path: Path) -> str | None:
    if (env_path / "conda-meta").is_dir() or (env_path / "bin" / "activate").is_file():
        return None
    return (f"missing environment: ENV_PATH={env_path} is neither a conda env nor a venv; create it with "
            "`bash setup_env.sh` or point --env-path / ENV_PATH at it")


def data_plan(args, ctx: Context, dataset: str | None = None) -> tuple[Path, JobSpec | None, bool]:
    """(token folder, the job that prepares it, whether it is ready now) for the data options in args."""
    if getattr(args, "data_dir", None):
        path = Path(args.data_dir).expanduser().resolve()
        if not token_folder_ready(path, None, args):
            raise LaunchError(f"missing data directory: --data-dir {path} does not exist or holds no token files "
                              "(*.bin); prepare it first, e.g. python -m slurm.submit prep text --source DIR, "
                              "or name a dataset with --data to have it prepared")
        check_token_files(path)
        return path, None, True
    name = dataset or args.data
    script, folder, cpus, minutes = DATASETS[name]
    knobs: dict[str, str] = {}
    used = {"chunks": False, "source": False, "tokenizer": False, "vocab_size": False, "input": False,
            "url": False, "data_files": False}
    if name == "fineweb":
        if args.chunks is not None and not 1 <= args.chunks <= 103:
            raise LaunchError(f"--chunks {args.chunks}: FineWeb10B has 103 train shards (1..103)")
        knobs["FINEWEB_CHUNKS"] = str(args.chunks or 9)
        used["chunks"] = True
    elif name in ("shakespeare", "shakespeare_char"):
        knobs["TOKENIZER"] = "char" if name == "shakespeare_char" else "gpt2"
        if args.input:
            if not Path(args.input).is_file():
                raise LaunchError(f"--input {args.input}: no such file")
            if args.url:
                raise LaunchError("give --input or --url, not both")
        knobs["INPUT"] = str(Path(args.input).resolve()) if args.input else ""
        knobs["URL"] = args.url or ""
        used["input"] = used["url"] = True
    elif name == "openwebtext":
        knobs["DATA_FILES"] = " ".join(str(Path(p).expanduser()) for p in args.data_files or [])
        knobs["NUM_PROC"] = ""
        used["data_files"] = True
    elif name == "text":
        tokenizer = args.tokenizer or "char"
        if tokenizer not in TEXT_TOKENIZERS:
            raise LaunchError(f"--tokenizer {tokenizer}: must be one of {', '.join(TEXT_TOKENIZERS)}")
        if args.source and not Path(args.source).is_dir():
            raise LaunchError(f"--source {args.source}: no such directory")
        folder = f"text_{tokenizer}" if args.source else f"stdlib_{tokenizer}"
        knobs.update(SOURCE=str(Path(args.source).resolve()) if args.source else "", TOKENIZER=tokenizer,
                     VOCAB_SIZE=str(args.vocab_size or ""))
        used["source"] = used["tokenizer"] = used["vocab_size"] = True
    for option, was_used in used.items():
        if getattr(args, option, None) not in (None, [], "") and not was_used:
            raise LaunchError(f"--{option.replace('_', '-')} does not apply to the {name} data")
    path = ctx.data_root / (args.data_name or folder)
    knobs = ctx.base_knobs() | knobs | {"OUT_DIR": str(path)}
    cpus = args.prep_cpus or cpus
    job = JobSpec(name=f"prep-{name}", role="prep", script=script, tasks=[Task(f"prep-{name}", knobs, out_dir=str(path))],
                  cpus_per_task=cpus, time_min=parse_time_min(args.prep_time) if args.prep_time else minutes,
                  partition=ctx.cpu_partition)
    ready = token_folder_ready(path, name, args)
    if ready:
        check_token_files(path)
    return path, job, ready


def check_token_files(path: Path) -> None:
    """The headers and sizes of the token files a job would read (contract 2, read by nanogpt.data.shards as the
    trainers read it: no tokens, a few bytes a file), checked before submission instead of inside the job after
    its queue wait."""
    from nanogpt.data.shards import ShardError, open_tokens

    bad = []
    for file in sorted(path.glob("*.bin")):
        try:
            open_tokens(file)
        except ShardError as e:
            bad.append(str(e))
    if bad:
        raise LaunchError("bad token files, nothing to train on:\n  " + "\n  ".join(bad))


def token_folder_ready(path: Path, dataset: str | None, args) -> bool:
    if not path.is_dir():
        return False
    if dataset == "fineweb":  # the shards the run will read, not just any
        chunks = args.chunks or 9
        names = ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, chunks + 1)]
        return all((path / name).is_file() for name in names)
    return any(path.glob("*.bin"))


def check_recipe(trainer: Trainer, recipe: str | None) -> None:
    if not recipe:
        return
    recipe_dir = REPO_ROOT / trainer.recipe_dir
    if recipe.endswith(".toml"):
        if not Path(recipe).is_file():
            raise LaunchError(f"--recipe {recipe}: no such file")
        return
    if recipe_dir.is_dir() and not (recipe_dir / f"{recipe}.toml").is_file():
        known = sorted(p.stem for p in recipe_dir.glob("*.toml"))
        raise LaunchError(f"--recipe {recipe}: not a recipe of the {trainer.name} trainer ({trainer.recipe_dir}: "
                          f"{', '.join(known) or 'none'})")


def recipe_settings(trainer: Trainer, recipe: str | None) -> dict:
    """The settings a recipe file sets (it holds only deltas from the trainer's defaults); {} if none."""
    if not recipe:
        return {}
    path = Path(recipe) if recipe.endswith(".toml") else REPO_ROOT / trainer.recipe_dir / f"{recipe}.toml"
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def baseline_micro_batch(args, recipe: str | None, overrides: list[str]) -> str:
    """MICRO_BATCH for the baseline on GPUs: gpus.tsv's micro_batch_124m for the GPU type (or --micro-batch),
    halved until the recipe's total batch splits evenly over every GPU; "" = the script's default."""
    world = args.num_gpus * args.nodes
    settings = recipe_settings(TRAINERS["baseline"], recipe)
    for override in overrides:
        key, _, value = override.removeprefix("--").partition("=")
        settings[key] = value
    if args.device == "cpu" or any(o.startswith("--batch_size=") for o in overrides):
        return str(args.micro_batch or "")  # the recipe's, or the user's own --set batch_size=N
    total, block = int(settings.get("total_batch_size", 0) or 0), int(settings.get("block_size", 1024))
    start = args.micro_batch or int(gpu_table().get(args.gpu_type, {}).get("micro_batch_124m", 0) or 0)
    if not total or not start:
        return str(args.micro_batch or "")
    micro = start
    while micro > 1 and total % (micro * block * world):
        micro //= 2
    if total % (micro * block * world) or (args.micro_batch and micro != args.micro_batch):
        raise LaunchError(f"total_batch_size={total} tokens does not split over {world} GPUs with "
                          f"micro-batch {args.micro_batch or micro} x block {block}; change --micro-batch, "
                          "--num-gpus or --set total_batch_size=N")
    return str(micro)


def gpu_checks(trainer: Trainer | None, gpu_type: str, num_gpus: int, nodes: int) -> list[str]:
    errors = []
    known = gpu_table()
    if gpu_type not in known:
        errors.append(f"unknown GPU type {gpu_type!r}: slurm/gpus.tsv knows {', '.join(known)} (add a row for "
                      "your site's gres name)")
    if num_gpus < 1 or nodes < 1:
        errors.append(f"--num-gpus {num_gpus} / --nodes {nodes}: both must be at least 1")
    if trainer and trainer.one_node and nodes != 1:
        errors.append(f"the {trainer.name} trainer runs on one node, got --nodes {nodes}")
    if trainer and trainer.gpu_counts and num_gpus * nodes not in trainer.gpu_counts:
        counts = ", ".join(map(str, trainer.gpu_counts))
        errors.append(f"the {trainer.name} trainer runs on {counts} GPUs, got --num-gpus {num_gpus}"
                      + (f" x --nodes {nodes}" if nodes != 1 else ""))
    return errors


def cluster_checks(ctx: Context, requests: list[tuple[str, int, int, str | None]]) -> tuple[list[str], str | None]:
    """Errors for (gpu type, GPUs per node, nodes, partition) the cluster cannot give; (errors, why skipped)."""
    errors = []
    for gpu_type, per_node, nodes, partition in requests:
        offered, why = query_cluster(partition)
        if offered is None:
            return [], why
        where = f"partition {partition}" if partition else "the cluster"
        if why == "no nodes":
            errors.append(f"{where} has no nodes (sinfo lists none); check --partition (sinfo -s lists the partitions)")
            continue
        if gpu_type not in offered:
            types = ", ".join(sorted(offered)) or "no typed GPUs"
            errors.append(f"{where} offers no {gpu_type} GPUs (sinfo lists: {types}); pick one with --gpu-type")
            continue
        node_count, most = offered[gpu_type]
        if per_node > most:
            errors.append(f"--num-gpus {per_node}: nodes of {where} have at most {most} {gpu_type} GPUs each")
        if nodes > node_count:
            errors.append(f"--nodes {nodes}: {where} has {node_count} node(s) with {gpu_type} GPUs")
    return errors, None


def train_job(args, ctx: Context, trainer: Trainer, name: str, variants: list[tuple[str, list[str]]],
              seeds: list[int] | None, data_path: Path, recipe: str | None, overrides: list[str]) -> JobSpec:
    """One job (an array when there are several tasks) of `trainer`: each variant (label, extra args) x seed."""
    tasks = []
    for variant_label, variant_args in variants:
        for seed in seeds or [None]:
            label = "-".join(part for part in (name, variant_label, f"seed{seed}" if seed is not None else "") if part)
            extra = overrides + ([f"--{trainer.seed_key}={seed}"] if seed is not None else []) + variant_args
            run_dir = ctx.run_dir(label)
            knobs = ctx.base_knobs() | {
                "RUN_DIR": run_dir, "RUN_NAME": "", "DATASET_DIR": str(data_path), "RECIPE": recipe or "",
                "EXTRA_ARGS": " ".join(extra), "GPU_TYPE": args.gpu_type, "NUM_NODES": str(args.nodes),
                "GPUS_PER_NODE": str(args.num_gpus), "DEVICE": args.device, "CPUS_PER_GPU": str(args.cpus_per_gpu),
                # On CPU one process per requested GPU, so a CPU run has the layout of the GPU run it stands for.
                "NPROC_PER_NODE": str(args.num_gpus) if args.device == "cpu" else "",
                "MICRO_BATCH": baseline_micro_batch(args, recipe, overrides) if trainer.name == "baseline" else "",
            }
            tasks.append(Task(label, knobs, run_dir=run_dir))
    return JobSpec(name=name, role="train", script=trainer.script, tasks=tasks,
                   cpus_per_task=args.cpus_per_gpu * args.num_gpus, time_min=parse_time_min(args.time or "24:00:00"),
                   nodes=args.nodes, gpus_per_node=args.num_gpus, gpu_type=args.gpu_type, partition=ctx.partition,
                   array_parallelism=args.array_parallelism)


def with_data(data: tuple[Path, JobSpec | None, bool], train_jobs: list[JobSpec]) -> list[JobSpec]:
    """The training jobs, after the preparation job (which they wait for) when the data is not ready."""
    _, prep, ready = data
    if ready or prep is None:
        return train_jobs
    for job in train_jobs:
        job.after.append(prep.name)
    return [prep, *train_jobs]


Plan = tuple[list[JobSpec], list[str], list[tuple[str, int, int, str | None]]]


def plan(args, ctx: Context) -> Plan:
    """The jobs a command submits, in order; the errors found; the GPU requests to check against the cluster."""
    errors: list[str] = []
    env_error = check_env_path(ctx.env_path)
    if env_error:
        errors.append(env_error)
    if args.command == "prep":
        _, prep, _ = data_plan(args, ctx, dataset=args.dataset)
        return [prep], errors, []
    if args.command == "study":  # training-dynamics studies: slurm/study.py
        from slurm.study import plan_study

        return plan_study(args, ctx, errors)
    planner = {"build-flash-attn": plan_build, "train": plan_train, "ablate": plan_ablate,
               "compare": plan_compare}[args.command]
    return planner(args, ctx, errors)


def plan_build(args, ctx: Context, errors: list[str]) -> Plan:
    errors += gpu_checks(None, args.gpu_type, 1, 1)
    if args.src and not Path(args.src).exists():
        errors.append(f"--src {args.src}: no such checkout or sdist")
    if args.fa_version == 4 and args.src:
        errors.append("--fa-version 4 installs wheels (pip), not a checkout: drop --src")
    if args.fa_version == 3 and not args.src:
        errors.append("--fa-version 3 builds from a flash-attention checkout: give --src DIR")
    if args.fa_version == 3 and args.src and not (Path(args.src) / "hopper").is_dir():
        errors.append(f"--src {args.src} has no hopper/ folder (FA3's sources)")
    knobs = ctx.base_knobs() | {"GPU_TYPE": args.gpu_type, "NUM_NODES": "1", "GPUS_PER_NODE": "1",
                                "FA_VERSION": str(args.fa_version or ""),
                                "FLASH_ATTN_SRC": str(Path(args.src).resolve()) if args.src else "",
                                "FLASH_ATTN_MODULE": args.module or "", "MAX_JOBS": ""}
    job = JobSpec(name="build-flash-attn", role="build", script="slurm/modded/build_flash_attn.sh",
                  tasks=[Task("build-flash-attn", knobs)], cpus_per_task=args.cpus,
                  time_min=parse_time_min(args.time or "04:00:00"), gpus_per_node=1, gpu_type=args.gpu_type,
                  partition=ctx.partition)
    return [job], errors, [(args.gpu_type, 1, 1, ctx.partition)]


def gpu_request(args, ctx: Context) -> list[tuple[str, int, int, str | None]]:
    return [(args.gpu_type, args.num_gpus, args.nodes, ctx.partition)]


def plan_train(args, ctx: Context, errors: list[str]) -> Plan:
    trainer = TRAINERS[args.trainer]
    errors += gpu_checks(trainer, args.gpu_type, args.num_gpus, args.nodes)
    recipe = args.recipe or trainer.default_recipe
    check_recipe(trainer, recipe)
    if args.micro_batch and trainer.name != "baseline":
        errors.append("--micro-batch applies to the baseline trainer only")
    seeds, overrides, data = parse_seeds(args.seeds, count_allowed=False), parse_overrides(args.set), data_plan(args, ctx)
    try:
        job = train_job(args, ctx, trainer, trainer.name, [("", [])], seeds, data[0], recipe, overrides)
    except LaunchError as e:  # reported with the other errors
        return [], errors + [str(e)], gpu_request(args, ctx)
    return with_data(data, [job]), errors, gpu_request(args, ctx)


def plan_ablate(args, ctx: Context, errors: list[str]) -> Plan:
    """One array: the full model and each feature switched off (ABLATIONS), times the seeds."""
    trainer = TRAINERS["modded"]
    errors += gpu_checks(trainer, args.gpu_type, args.num_gpus, args.nodes)
    if args.micro_batch:
        errors.append("--micro-batch applies to the baseline trainer only")
    features = list(ABLATIONS) if args.features == "all" else [f.strip() for f in args.features.split(",") if f.strip()]
    unknown = [f for f in features if f not in ABLATIONS]
    if unknown or not features:
        errors.append(f"--features: unknown {', '.join(unknown) or '(none given)'}; the ablations are "
                      f"{', '.join(ABLATIONS)} (or all)")
    check_recipe(trainer, args.recipe)
    variants = [("full", [])] + [(f"no_{f}", [ablation_override(f)]) for f in features if f in ABLATIONS]
    seeds, overrides, data = parse_seeds(args.seeds, count_allowed=True), parse_overrides(args.set), data_plan(args, ctx)
    job = train_job(args, ctx, trainer, "ablate", variants, seeds, data[0], args.recipe, overrides)
    return with_data(data, [job]), errors, gpu_request(args, ctx)


def plan_compare(args, ctx: Context, errors: list[str]) -> Plan:
    """Baseline and modded arrays over the same seeds and data, then the report job."""
    errors += gpu_checks(TRAINERS["modded"], args.gpu_type, args.num_gpus, args.nodes)
    seeds, overrides, data = parse_seeds(args.seeds, count_allowed=True), parse_overrides(args.set), data_plan(args, ctx)
    train_jobs = []
    for trainer, recipe, extra in (
        (TRAINERS["baseline"], args.baseline_recipe or args.recipe or TRAINERS["baseline"].default_recipe,
         parse_overrides(args.baseline_set, "--baseline-set")),
        (TRAINERS["modded"], args.modded_recipe or args.recipe, parse_overrides(args.modded_set, "--modded-set")),
    ):
        check_recipe(trainer, recipe)
        try:
            train_jobs.append(train_job(args, ctx, trainer, trainer.name, [("", [])], seeds, data[0], recipe,
                                        overrides + extra))
        except LaunchError as e:  # reported with the other errors
            return [], errors + [str(e)], gpu_request(args, ctx)
    job_list = with_data(data, train_jobs)
    job_list.append(JobSpec(name="report", role="report", script=None, tasks=[Task("report", ctx.base_knobs())],
                            cpus_per_task=2, time_min=30, partition=ctx.cpu_partition,
                            after=[job.name for job in train_jobs], after_kind="afterany",
                            module=["slurm.report", "--manifest", str(ctx.submission_dir / "manifest.json")]))
    return job_list, errors, gpu_request(args, ctx)


# ---- submission ------------------------------------------------------------------------------------------

def new_submission_id(runs_dir: Path, label: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        candidate = f"{stamp}-{label}" + (f"-{attempt}" if attempt > 1 else "")
        if not (runs_dir / "submissions" / candidate).exists() and not (runs_dir / candidate).exists():
            return candidate
    raise LaunchError(f"cannot find a free submission name under {runs_dir}")


def git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def snapshot_code(dest: Path) -> dict:
    """Copy the repo's source files (tracked and untracked-but-not-ignored: the working tree as it is now)
    into dest, so jobs that start later run this code. Returns what .snapshot.json records."""
    listing = git("ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if listing is None:  # not a git checkout: the source folders themselves
        names = [str(p.relative_to(REPO_ROOT)) for top in ("nanogpt", "modded_nanogpt", "slurm", "tests")
                 for p in (REPO_ROOT / top).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        names += [p.name for p in REPO_ROOT.iterdir() if p.is_file()]
    else:
        names = [name for name in listing.split("\0") if name]
    copied, skipped = 0, []
    for name in names:
        source = REPO_ROOT / name
        if not source.is_file():  # deleted in the working tree, or a submodule
            continue
        if source.stat().st_size > SNAPSHOT_MAX_FILE_BYTES:
            skipped.append(name)
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        copied += 1
    sha = (git("rev-parse", "HEAD") or "").strip() or None
    dirty = bool((git("status", "--porcelain") or "").strip()) if sha else None
    info = {"source": str(REPO_ROOT), "git_sha": sha, "git_dirty": dirty,
            "git_describe": f"{sha or 'unknown'}{' (dirty)' if dirty else ''}", "files": copied,
            "skipped_large_files": skipped, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (dest / ".snapshot.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def executor_parameters(job: JobSpec, ctx: Context, dependency: str | None) -> dict:
    """submitit's AutoExecutor parameters for a job (slurm_* ones are ignored by the local executors)."""
    additional = {"requeue": True, "chdir": str(ctx.code_dir)}
    if dependency:
        # A job whose dependency failed can never run: Slurm cancels it instead of leaving it pending.
        additional.update({"dependency": dependency, "kill-on-invalid-dep": "yes"})
    params = {
        "name": job.name, "timeout_min": job.time_min, "nodes": job.nodes, "tasks_per_node": 1,
        "cpus_per_task": job.cpus_per_task,
        "slurm_use_srun": False,  # the script starts its own job steps (srun), one torchrun per node
        # A short job gets its signal a quarter of its time before the end, not at its start.
        "slurm_signal_delay_s": min(SIGNAL_DELAY_S, max(10, job.time_min * 15)), "slurm_stderr_to_stdout": True,
        "slurm_additional_parameters": additional,
    }
    if job.gpus_per_node:
        params["slurm_gres"] = f"gpu:{job.gpu_type}:{job.gpus_per_node}"
    for key, value in (("slurm_partition", job.partition), ("slurm_account", ctx.account), ("slurm_qos", ctx.qos)):
        if value:
            params[key] = value
    if len(job.tasks) > 1 and job.array_parallelism:
        params["slurm_array_parallelism"] = job.array_parallelism
    return params


def make_callable(job: JobSpec, task: Task):
    if job.script is not None:
        return jobs.ScriptJob(job.script, task.knobs, task.label)
    return jobs.ModuleJob(job.module, task.knobs, task.label)


@contextlib.contextmanager
def code_on_path(code_dir: Path):
    """Jobs (and submitit's unpickling in them) import slurm.jobs from the snapshot, not from this checkout."""
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code_dir), previous]))
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous


def submit_all(job_list: list[JobSpec], ctx: Context, argv: list[str]) -> dict:
    import submitit  # imported here: dry runs and status need no submitit

    manifest = {"submission": ctx.submission_id, "argv": argv, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "cluster": ctx.cluster, "runs_dir": str(ctx.runs_dir), "data_dir": str(ctx.data_root),
                "code": {}, "jobs": []}
    ctx.submission_dir.mkdir(parents=True)
    manifest["code"] = snapshot_code(ctx.code_dir) | {"snapshot": str(ctx.code_dir)}
    manifest_path = ctx.submission_dir / "manifest.json"
    submitted: dict[str, str] = {}  # job name -> job id (the array's id for arrays)
    sequential = ctx.cluster in ("local", "debug")
    with code_on_path(ctx.code_dir):
        for job in job_list:
            dependency = None
            if job.after and not sequential:
                dependency = f"{job.after_kind}:" + ":".join(submitted[name] for name in job.after)
            executor = submitit.AutoExecutor(folder=ctx.submission_dir / "jobs" / "%j", cluster=ctx.cluster)
            params = executor_parameters(job, ctx, dependency)
            executor.update_parameters(**params)
            callables = [make_callable(job, task) for task in job.tasks]
            entry = {"name": job.name, "role": job.role, "script": job.script, "module": job.module,
                     "parameters": params, "depends_on": dependency, "tasks": []}
            manifest["jobs"].append(entry)
            if sequential:
                handles = []
                for task, call in zip(job.tasks, callables, strict=True):  # one at a time: they share the GPUs
                    handles.append(executor.submit(call))
                    entry["tasks"].append(task_record(task, handles[-1]))
                    write_json(manifest_path, manifest)
                    wait_local(handles[-1], entry["tasks"][-1], manifest_path, manifest)
            else:
                try:
                    if len(callables) == 1:
                        handles = [executor.submit(callables[0])]
                    else:
                        with executor.batch():
                            handles = [executor.submit(call) for call in callables]
                except Exception as e:  # sbatch refused: say what is already queued
                    done = ", ".join(f"{name} ({job_id})" for name, job_id in submitted.items()) or "nothing"
                    entry["error"] = str(e)
                    write_json(manifest_path, manifest)
                    raise JobFailed(f"submitting {job.name} failed: {str(e).strip()}\nalready submitted: {done}; "
                                    f"python -m slurm.submit cancel {ctx.submission_id} cancels it") from None
                entry["tasks"] = [task_record(task, handle) for task, handle in zip(job.tasks, handles, strict=True)]
                entry["sbatch_file"] = str(handles[0].paths.submission_file)  # the script submitit sbatch'ed
            submitted[job.name] = str(handles[0].job_id).split("_")[0]
            entry["job_id"] = submitted[job.name]
            write_json(manifest_path, manifest)
    return manifest


def task_record(task: Task, handle) -> dict:
    return {"label": task.label, "job_id": str(handle.job_id), "run_dir": task.run_dir, "out_dir": task.out_dir,
            "log": str(handle.paths.stdout), "knobs": task.knobs}


def wait_local(handle, record: dict, manifest_path: Path, manifest: dict) -> None:
    """Local and debug runs: wait for the task; a failure stops the submission with its log's path."""
    try:
        handle.result()
        record["state"] = "COMPLETED"
    except Exception as e:
        record["state"] = "FAILED"
        write_json(manifest_path, manifest)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # submitit wraps the job's exception in its traceback: show the job's own error line.
        reason = next((line for line in reversed(lines) if "ScriptFailed" in line), lines[-1] if lines else repr(e))
        raise JobFailed(f"{record['label']} failed: {reason}; log: {record['log']}") from None
    write_json(manifest_path, manifest)


def print_plan(job_list: list[JobSpec], ctx: Context, skipped: str | None) -> None:
    print(f"dry run: nothing is submitted (cluster {ctx.cluster}); a submission would be recorded in "
          f"{ctx.runs_dir / 'submissions' / ctx.submission_id}")
    for job in job_list:
        dependency = f"{job.after_kind}:<{'>:<'.join(job.after)}>" if job.after else None
        params = executor_parameters(job, ctx, dependency)
        shape = f"array of {len(job.tasks)}" if len(job.tasks) > 1 else "job"
        print(f"\n{job.name}: {shape}, {job.script or 'python -m ' + ' '.join(job.module or [])}")
        print("  submitit parameters: " + json.dumps(params, sort_keys=True))
        for task in job.tasks:
            where = task.run_dir or task.out_dir
            print(f"  task {task.label}" + (f" -> {where}" if where else ""))
            knobs = {k: v for k, v in task.knobs.items() if v != ""}
            print("    knobs: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(knobs.items())))
    if skipped:
        print(f"\nskipped checks (need a reachable Slurm cluster; {skipped}): the GPU types, GPUs per node and "
              "nodes the cluster offers")


def print_submitted(manifest: dict, manifest_path: Path) -> None:
    print(f"submission {manifest['submission']} ({manifest['cluster']}): {manifest_path}")
    for entry in manifest["jobs"]:
        after = f" after {entry['depends_on']}" if entry.get("depends_on") else ""
        print(f"  {entry['name']}: job {entry.get('job_id')}{after}")
        for task in entry["tasks"]:
            where = task.get("run_dir") or task.get("out_dir") or ""
            print(f"    {task['job_id']:>12}  {task['label']:<36} {where}")
            print(f"    {'':>12}  log: {task['log']}")
    print(f"follow it: python -m slurm.submit status {manifest['submission']} [--wait]   "
          f"(logs, cancel likewise)")


# ---- status, logs, cancel ---------------------------------------------------------------------------

def cmd_status(args) -> int:
    manifest_path = find_manifest(resolve_runs_dir(args), args.submission)
    start = time.monotonic()
    deadline = start + args.timeout
    shown = None
    while True:
        manifest = json.loads(manifest_path.read_text())
        tasks = [(entry, task) for entry in manifest["jobs"] for task in entry["tasks"]]
        if manifest["cluster"] == "slurm":
            states = scheduler_states([task["job_id"] for _, task in tasks])
        else:  # local and debug runs ended with the launcher; their states are in the manifest
            states = {task["job_id"]: task.get("state", "CANCELLED") for _, task in tasks}
        current = {task["job_id"]: states.get(task["job_id"], "PENDING") for _, task in tasks}
        finished = all(state in TERMINAL_STATES for state in current.values())
        if not args.wait or finished or time.monotonic() > deadline:
            break
        waiting = waiting_line(tasks, current)
        if waiting != shown:  # say what it waits for whenever that changes (a job starts, a run logs a step)
            print(f"[{time.monotonic() - start:5.0f}s] waiting for {waiting}", flush=True)
            shown = waiting
        time.sleep(args.poll)
    print(f"submission {manifest['submission']} ({manifest['cluster']}): {manifest_path}")
    failed = unfinished = 0
    for entry, task in tasks:
        state = current[task["job_id"]]
        stopped = state == "COMPLETED" and task.get("run_dir") and \
            (last_record(task["run_dir"], ("end", "stop")) or {}).get("kind") == "stop"
        # A job that ended well after its trainer stopped on a signal (and was not requeued) left the run unfinished.
        print(f"  {task['job_id']:>12}  {task['label']:<36} {'UNFINISHED' if stopped else state:<11} {progress(task)}")
        if stopped:
            unfinished += 1
            print(f"  {'':>12}  the run stopped before its last step; python -m slurm.submit resume "
                  f"{manifest['submission']} --job {task['label']} resumes it (RUN_DIR={task['run_dir']})")
        elif state in TERMINAL_STATES and state != "COMPLETED":
            failed += 1
            print(f"  {'':>12}  {entry['name']} {state}: log {task['log']}")
            for line in failure_lines(task["log"]):
                print(f"  {'':>12}  | {line}")
    if args.wait and not all(state in TERMINAL_STATES for state in current.values()):
        print(f"error: still running after --timeout {args.timeout:.0f}s", file=sys.stderr)
        return 1
    if failed:
        print(f"error: {failed} task(s) did not complete; see the logs named above", file=sys.stderr)
    if unfinished:
        print(f"error: {unfinished} run(s) stopped before their last step (UNFINISHED above)", file=sys.stderr)
    return 1 if failed or unfinished else 0


def waiting_line(tasks: list[tuple[dict, dict]], states: dict[str, str]) -> str:
    """What --wait is waiting for: each unfinished task with its state and, when running, its progress."""
    parts = []
    for _, task in tasks:
        state = states[task["job_id"]]
        if state in TERMINAL_STATES:
            continue
        detail = progress(task) if state == "RUNNING" else ""
        parts.append(f"{task['label']} {state}" + (f" ({detail})" if detail else ""))
    done = len(tasks) - len(parts)
    return "; ".join(parts) + (f"  [{done}/{len(tasks)} done]" if done else "")


def cmd_resume(args) -> int:
    """Submit again the training tasks of a submission whose runs stopped before their last step (a stop record
    last, or no end record), with their recorded script, knobs and code snapshot: each resumes from its run
    directory's newest checkpoint. --job picks one task; --time replaces the recorded time limit."""
    import submitit

    manifest_path = find_manifest(resolve_runs_dir(args), args.submission)
    manifest = json.loads(manifest_path.read_text())
    cluster = manifest["cluster"]
    states = {}
    if cluster == "slurm":
        states = scheduler_states([t["job_id"] for e in manifest["jobs"] for t in e["tasks"]])
    chosen = []
    for entry in manifest["jobs"]:
        if entry.get("role") != "train" or not entry.get("script"):
            continue
        for task in entry["tasks"]:
            if args.job and args.job not in (task["label"], entry["name"], task["job_id"]):
                continue
            last = last_record(task["run_dir"], ("end", "stop")) if task.get("run_dir") else None
            state = states.get(task["job_id"], task.get("state", "COMPLETED"))
            if last and last.get("kind") == "end":
                print(f"  {task['label']}: finished (step {last.get('step')}); nothing to resume")
            elif state not in TERMINAL_STATES:
                print(f"  {task['label']}: job {task['job_id']} is {state}; it resumes by itself")
            else:
                chosen.append((entry, task, last))
    if args.job and not chosen and not any(args.job in (t["label"], e["name"], t["job_id"])
                                           for e in manifest["jobs"] for t in e["tasks"]):
        raise LaunchError(f"--job {args.job}: no task of submission {manifest['submission']} has that label, job "
                          "name or job id")
    if not chosen:
        print(f"submission {manifest['submission']}: no stopped run to resume")
        return 0
    submission_dir = manifest_path.parent
    code_dir = Path(manifest["code"]["snapshot"])
    with code_on_path(code_dir):
        for entry, task, last in chosen:
            params = dict(entry["parameters"])
            if args.time:
                params["timeout_min"] = parse_time_min(args.time)
            params.pop("slurm_array_parallelism", None)
            executor = submitit.AutoExecutor(folder=submission_dir / "jobs" / "%j", cluster=cluster)
            executor.update_parameters(**params)
            handle = executor.submit(jobs.ScriptJob(entry["script"], task["knobs"], task["label"]))
            task.setdefault("previous", []).append({k: task.get(k) for k in ("job_id", "log", "state")})
            task.update(job_id=str(handle.job_id), log=str(handle.paths.stdout))
            task.pop("state", None)
            where = f"from step {last.get('step')}" if last else "from its newest checkpoint"
            print(f"  {task['label']}: resubmitted as job {task['job_id']}, resuming {where} in {task['run_dir']}")
            write_json(manifest_path, manifest)
            if cluster in ("local", "debug"):
                wait_local(handle, task, manifest_path, manifest)
    print(f"follow it: python -m slurm.submit status {manifest['submission']} [--wait]")
    return 0


def cmd_logs(args) -> int:
    manifest_path = find_manifest(resolve_runs_dir(args), args.submission)
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["jobs"]:
        for task in entry["tasks"]:
            if args.job and args.job not in (task["label"], entry["name"], task["job_id"]):
                continue
            print(f"{task['label']} (job {task['job_id']}): {task['log']}")
            if args.tail:
                for line in log_tail(task["log"], args.tail):
                    print(f"  | {line}")
    return 0


def cmd_cancel(args) -> int:
    manifest_path = find_manifest(resolve_runs_dir(args), args.submission)
    manifest = json.loads(manifest_path.read_text())
    ids = sorted({entry["job_id"] for entry in manifest["jobs"] if entry.get("job_id")})
    if manifest["cluster"] != "slurm" or not ids:
        print(f"submission {manifest['submission']}: nothing to cancel ({manifest['cluster']} jobs end with the launcher)")
        return 0
    proc = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise LaunchError(f"scancel {' '.join(ids)} failed: {proc.stderr.strip()}")
    print(f"submission {manifest['submission']}: cancelled job(s) {' '.join(ids)}")
    return 0


# ---- command line ---------------------------------------------------------------------------------------

def resolve_runs_dir(args) -> Path:
    return Path(args.runs_dir or os.environ.get("RUNS_DIR") or REPO_ROOT / "runs").expanduser().resolve()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m slurm.submit", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--runs-dir", help="root of run directories and submissions (default $RUNS_DIR, else <repo>/runs)")

    common = argparse.ArgumentParser(add_help=False, parents=[where])
    group = common.add_argument_group("cluster")
    group.add_argument("--cluster", choices=("auto", "slurm", "local", "debug"), default="auto",
                       help="auto: slurm where sbatch is reachable, else local (this machine, one job after another); "
                            "debug: in this process")
    group.add_argument("--dry-run", action="store_true", help="print what would be submitted and exit")
    group.add_argument("--data-root", help="datasets root (default $DATA_DIR, else <repo>/data)")
    group.add_argument("--env-path", help="the environment jobs activate (default $ENV_PATH, else ~/conda_envs/nanogpt_env)")
    group.add_argument("--partition", help="partition of GPU jobs (default: the cluster's default)")
    group.add_argument("--cpu-partition", help="partition of data preparation and report jobs (default --partition)")
    group.add_argument("--account")
    group.add_argument("--qos")
    group.add_argument("--time", help="time limit of the main jobs (minutes, HH:MM:SS or D-HH:MM:SS)")

    data = argparse.ArgumentParser(add_help=False)
    group = data.add_argument_group("data (prepared first, when missing, by a job the others wait for)")
    group.add_argument("--data-name", help="folder under the datasets root (default: the dataset's)")
    group.add_argument("--chunks", type=int, help="fineweb: train shards of 100M tokens (default 9)")
    group.add_argument("--source", help="text: the folder of text files (default: the standard library)")
    group.add_argument("--tokenizer", help=f"text: {'|'.join(TEXT_TOKENIZERS)} (default char)")
    group.add_argument("--vocab-size", type=int, help="text with bpe: vocabulary size")
    group.add_argument("--input", help="shakespeare*: a local text file instead of the download")
    group.add_argument("--url", help="shakespeare*: where to download from")
    group.add_argument("--data-files", nargs="+", help="openwebtext: local data files or globs instead of the hub")
    group.add_argument("--prep-cpus", type=int, help="CPUs of the preparation job")
    group.add_argument("--prep-time", help="time limit of the preparation job")

    train_data = argparse.ArgumentParser(add_help=False, parents=[data])
    group = train_data.add_argument_group("training data")
    group.add_argument("--data", choices=sorted(DATASETS), default="fineweb", help="the dataset (default fineweb)")
    group.add_argument("--data-dir", help="a prepared token folder to use as is (no preparation)")

    gpus = argparse.ArgumentParser(add_help=False)
    group = gpus.add_argument_group("GPUs")
    group.add_argument("--gpu-type", required=True, help="a gres type of the cluster and a row of slurm/gpus.tsv")
    group.add_argument("--cpus-per-gpu", type=int, default=8, help="CPUs per GPU (default 8)")

    training = argparse.ArgumentParser(add_help=False, parents=[gpus])
    group = training.add_argument_group("training")
    group.add_argument("--num-gpus", type=int, default=1, help="GPUs per node (default 1); modded: 1, 2, 4 or 8")
    group.add_argument("--nodes", type=int, default=1, help="nodes (default 1; baseline only)")
    group.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                       help="cpu: run the trainer on CPU, one process per requested GPU (tests, test clusters)")
    group.add_argument("--recipe", help="a recipe of the trainer (tiny_cpu for CPU runs)")
    group.add_argument("--set", action="append", metavar="KEY=VALUE", help="a trainer setting (repeatable)")
    group.add_argument("--array-parallelism", type=int, help="most tasks of an array running at once")
    group.add_argument("--micro-batch", type=int, help="baseline: sequences per GPU per micro-step (default: "
                       "micro_batch_124m of slurm/gpus.tsv, halved until the total batch splits over the GPUs)")

    p = sub.add_parser("prep", parents=[common, data], help="prepare a dataset")
    p.add_argument("dataset", choices=sorted(DATASETS))

    p = sub.add_parser("build-flash-attn", parents=[common, gpus], help="build FlashAttention on a GPU node")
    p.add_argument("--fa-version", type=int, choices=(2, 3, 4),
                   help="default: 3 on Hopper (h100/h200), else 2; 4: FlashAttention 4 from the package index "
                        "(Hopper/Blackwell, no compiler needed)")
    p.add_argument("--src", help="a flash-attention checkout (FA3: needed) or an sdist; FA2 default: the index")
    p.add_argument("--module", help="the module to import at the end (default flash_attn / flash_attn_interface)")
    p.add_argument("--cpus", type=int, default=8, help="CPUs, also the parallel compile jobs (default 8: within "
                   "most sites' CPUs per GPU; more compiles faster)")

    p = sub.add_parser("train", parents=[common, train_data, training], help="train one trainer (seed array)")
    p.add_argument("trainer", choices=sorted(TRAINERS))
    p.add_argument("--seeds", help="comma-separated seeds: one array task each")

    p = sub.add_parser("ablate", parents=[common, train_data, training],
                       help="the modded trainer with each feature switched off, and the full model (one array)")
    p.add_argument("--features", required=True, help=f"comma-separated, or all: {', '.join(ABLATIONS)}")
    p.add_argument("--seeds", default="1", help="N (seeds 1..N) or a list (default 1)")

    p = sub.add_parser("compare", parents=[common, train_data, training],
                       help="baseline and modded on the same data, then a report")
    p.add_argument("--seeds", default="1", help="N (seeds 1..N) or a list (default 1)")
    p.add_argument("--baseline-recipe", help="default train_gpt2_fineweb (or --recipe)")
    p.add_argument("--modded-recipe", help="default: the speedrun (or --recipe)")
    p.add_argument("--baseline-set", action="append", metavar="KEY=VALUE", help="a baseline-only setting")
    p.add_argument("--modded-set", action="append", metavar="KEY=VALUE", help="a modded-only setting")

    p = sub.add_parser("study", parents=[common, train_data, training],
                       help="documents scored at many steps across seeds, then a table and a report (slurm/study.py)")
    from slurm.study import add_study_arguments

    add_study_arguments(p)

    for name, text in (("status", "the state of a submission's jobs and runs"),
                       ("logs", "the log files of a submission's jobs"), ("cancel", "scancel a submission's jobs"),
                       ("resume", "submit again the training runs of a submission that stopped unfinished")):
        p = sub.add_parser(name, parents=[where], help=text)
        p.add_argument("submission", nargs="?", help="its id (default: the latest) or manifest path")
        if name == "status":
            p.add_argument("--wait", action="store_true", help="wait until every job ended; status 1 if one failed")
            p.add_argument("--timeout", type=float, default=24 * 3600, help="seconds --wait waits at most")
            p.add_argument("--poll", type=float, default=5.0, help=argparse.SUPPRESS)
        if name == "logs":
            p.add_argument("--tail", type=int, default=0, help="also print the last N lines of each")
            p.add_argument("--job", help="only this task label, job name or job id")
        if name == "resume":
            p.add_argument("--job", help="only this task label, job name or job id")
            p.add_argument("--time", help="time limit of the new jobs (default: the recorded one)")
    return parser


def make_context(args) -> Context:
    cluster = args.cluster
    if cluster == "auto":
        cluster = "slurm" if sbatch_reachable() else "local"
    elif cluster == "slurm" and not sbatch_reachable() and not args.dry_run:
        raise LaunchError("--cluster slurm but sbatch is not on PATH; use --cluster local or --dry-run")
    env_path = Path(args.env_path or os.environ.get("ENV_PATH") or Path.home() / "conda_envs" / "nanogpt_env")
    ctx = Context(
        cluster=cluster, dry_run=args.dry_run, runs_dir=resolve_runs_dir(args),
        data_root=Path(args.data_root or os.environ.get("DATA_DIR") or REPO_ROOT / "data").expanduser().resolve(),
        env_path=env_path.expanduser().resolve(), partition=args.partition,
        cpu_partition=args.cpu_partition or args.partition, account=args.account, qos=args.qos)
    label = args.command + (f"-{args.trainer}" if getattr(args, "trainer", None) else "") + (
        f"-{args.dataset}" if getattr(args, "dataset", None) else "")
    ctx.submission_id = new_submission_id(ctx.runs_dir, label)
    if getattr(args, "nodes", 1) > 1 and cluster != "slurm":
        raise LaunchError(f"--nodes {args.nodes} needs a Slurm cluster (--cluster {cluster} runs on this machine)")
    return ctx


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "status":
        return cmd_status(args)
    if args.command == "logs":
        return cmd_logs(args)
    if args.command == "cancel":
        return cmd_cancel(args)
    if args.command == "resume":
        return cmd_resume(args)
    ctx = make_context(args)
    job_list, errors, gpu_requests = plan(args, ctx)
    skipped = None
    if ctx.cluster == "slurm" and gpu_requests:
        cluster_errors, skipped = cluster_checks(ctx, gpu_requests)
        errors += cluster_errors
        if skipped and not ctx.dry_run:
            errors.append(f"cannot ask the cluster what it offers ({skipped}); is Slurm reachable from here?")
    elif gpu_requests:
        skipped = f"--cluster {ctx.cluster}"
    if errors:
        raise LaunchError("\n".join(errors))
    if ctx.dry_run:
        print_plan(job_list, ctx, skipped)
        return 0
    try:  # the submission record, the code snapshot and the runs go here: a read-only place fails now, in a line
        ctx.runs_dir.mkdir(parents=True, exist_ok=True)
        probe = ctx.runs_dir / f".write_test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise LaunchError(f"cannot write to the runs directory {ctx.runs_dir}: {e.strerror or e}; give a writable "
                          "--runs-dir (or RUNS_DIR)") from None
    manifest = submit_all(job_list, ctx, argv)
    print_submitted(manifest, ctx.submission_dir / "manifest.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return run(argv)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except LaunchError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        if not isinstance(e, JobFailed):
            print("error: nothing was submitted", file=sys.stderr)
        return e.exit_status


if __name__ == "__main__":
    sys.exit(main())
