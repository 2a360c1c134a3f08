"""What `python -m slurm.submit` would submit: the trainers, datasets and ablations it knows, the jobs
(JobSpec: script, tasks with their knobs, resources, dependencies) each command plans, and the checks of a
request (GPU type and counts, recipe, data, environment; against the cluster through sinfo) made before
anything is submitted. Nothing here submits or writes: slurm/submission.py does that with the plan.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from nanogpt.gpus import gpu_table

REPO_ROOT = Path(__file__).resolve().parent.parent
EXIT_USAGE = 2
MODDED_GPU_COUNTS = (1, 2, 4, 8)


class LaunchError(Exception):
    """A request that cannot be submitted; the message says why and what to do."""

    exit_status = EXIT_USAGE


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
