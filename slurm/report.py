"""Compare finished (or unfinished) runs: val loss curves, time and tokens to target, speedups, ablations.

  python -m slurm.report runs/tiny runs/modded_tiny --out reports/tiny
  python -m slurm.report $RUNS_DIR/my_study --out reports/study --target 3.28     # every run dir below
  python -m slurm.report --manifest $RUNS_DIR/submissions/<id>/manifest.json      # out: <id>/report

Inputs are run directories, folders holding run directories, and submission manifests (the file or its
folder). Only the run directory contract is read (DESIGN.md, contract 3): config.json, provenance.json,
metrics.jsonl. Runs are grouped by trainer and resolved configuration without the seed, paths and
operational settings, so the seeds of one configuration form a group. --out gets report.md, report.html
(self-contained: the plots are embedded) and the plots as PNG files; the group table is printed at the end.

Time to target is interpolated linearly between the two validations that bracket the target, in
(train_time_ms, val_loss); tokens to target likewise in (tokens, val_loss).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from nanogpt.config import exit_status
from nanogpt.rundir import read_metrics
from slurm.plans import ABLATIONS

DEFAULT_TARGET = 3.28
# Config keys that say where or how a run ran, not what it trained: runs differing only in these are seeds
# of one configuration.
NOT_CONFIGURATION = {"seed", "run_dir", "data_dir", "init_from_dir", "device", "max_train_minutes",
                     "save_checkpoints", "checkpoint_interval", "keep_checkpoints", "log_interval", "log_every",
                     "target_val_loss"}
BASELINE = "baseline"  # the baseline trainer (nanogpt.train), named as slurm.submit and the demo name it
MODDED = "modded"


class ReportError(Exception):
    """Nothing to report, or nowhere to write it: the CLI prints it and exits 2."""


@dataclass
class Run:
    path: Path
    trainer: str
    config: dict
    provenance: dict
    train: list[dict]
    val: list[dict]
    end: dict | None
    label: str | None = None  # the submission's task label, seed suffix removed

    @property
    def seed(self):
        return self.config.get("seed")

    def last(self, key: str):
        """`key` of the end record, else of the newest record that has it."""
        if self.end and self.end.get(key) is not None:
            return self.end[key]
        for record in reversed(self.train + self.val):
            if record.get(key) is not None:
                return record[key]
        return None


@dataclass
class Found:
    runs: list[Run] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    manifests: list[Path] = field(default_factory=list)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


# ---- reading runs ----------------------------------------------------------------------------------------
def read_json(path: Path, found: Found) -> dict:
    if not path.is_file():
        found.warn(f"{path} is missing")
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        found.warn(f"{path} is unreadable ({e})")
        return {}
    return value if isinstance(value, dict) else {}


def trainer_of(config: dict, provenance: dict) -> str:
    command = " ".join(map(str, provenance.get("command") or []))
    if "modded_nanogpt" in command or "num_iterations" in config:
        return MODDED
    if "nanogpt.train" in command or "max_iters" in config:
        return BASELINE
    return "unknown"


def latest_per_step(records: list[dict]) -> list[dict]:
    """One record per step (the newest: a resumed run may repeat steps), in step order."""
    by_step = {}
    for record in records:
        by_step[record.get("step", 0)] = record
    return [by_step[step] for step in sorted(by_step)]


def load_run(path: Path, found: Found, label: str | None = None) -> Run | None:
    metrics_path = path / "metrics.jsonl"
    if not metrics_path.is_file():
        found.warn(f"{metrics_path} is missing: run skipped")
        return None
    try:  # a line cut short by a kill (or any bad line) is named and skipped
        records = read_metrics(metrics_path, found.warn)
    except OSError as e:
        found.warn(f"{metrics_path} is unreadable ({e})")
        return None
    config = read_json(path / "config.json", found)
    provenance = read_json(path / "provenance.json", found)
    val = latest_per_step([r for r in records if r.get("kind") == "val" and isinstance(r.get("val_loss"), (int, float))])
    if not val:
        found.warn(f"{metrics_path} has no val record: run skipped")
        return None
    ends = [r for r in records if r.get("kind") == "end"]
    if not ends:
        stops = [r for r in records if r.get("kind") == "stop"]
        how = f"stopped at step {stops[-1].get('step')} ({stops[-1].get('reason')})" if stops else "has no end record"
        found.warn(f"{metrics_path}: the run {how}; reported up to its last validation")
    train = latest_per_step([r for r in records if r.get("kind") == "train"])
    return Run(path, trainer_of(config, provenance), config, provenance, train, val, ends[-1] if ends else None, label)


def is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in ("metrics.jsonl", "config.json", "provenance.json"))


def task_label(label: str) -> str:
    return re.sub(r"-seed-?\d+$", "", label)


def read_manifest(path: Path, found: Found) -> None:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        found.warn(f"{path} is not a readable manifest ({e})")
        return
    found.manifests.append(path)
    for job in manifest.get("jobs", []):
        for task in job.get("tasks", []):
            if not task.get("run_dir"):
                continue  # data preparation, builds, the report itself
            run_dir = Path(task["run_dir"])
            if not run_dir.is_dir():
                found.warn(f"{run_dir} (task {task.get('label')} of {path}) does not exist: run skipped")
                continue
            run = load_run(run_dir, found, task_label(task.get("label") or ""))
            if run:
                found.runs.append(run)


# Folders no run directory is found in: checkpoints, copied code, and the kernel caches the trainers keep beside
# their runs (.cache: many thousands of files).
SKIPPED_FOLDERS = {"ckpt", "code", ".cache"}


def run_dirs_below(path: Path) -> list[Path]:
    """The folders under path that hold a metrics.jsonl or a config.json, not looking inside SKIPPED_FOLDERS."""
    found = set()
    for folder, subfolders, files in os.walk(path):
        subfolders[:] = sorted(d for d in subfolders if d not in SKIPPED_FOLDERS)
        if "metrics.jsonl" in files or "config.json" in files:
            found.add(Path(folder))
    return sorted(found)


def collect(inputs: list[str]) -> Found:
    found = Found()
    for text in inputs:
        path = Path(text)
        if path.is_file() and path.suffix == ".json":
            read_manifest(path, found)
        elif (path / "manifest.json").is_file():
            read_manifest(path / "manifest.json", found)
        elif path.is_dir() and is_run_dir(path):
            if run := load_run(path, found):
                found.runs.append(run)
        elif path.is_dir():
            below = run_dirs_below(path)
            if not below:
                found.warn(f"{path} holds no run directory")
            for run_dir in below:
                if run := load_run(run_dir, found):
                    found.runs.append(run)
        else:
            found.warn(f"{path}: no such run directory, folder or manifest")
    unique = {}
    for run in found.runs:  # a run named twice (a manifest and its folder) counts once; the labelled copy wins
        key = run.path.resolve()
        if key not in unique or (run.label and not unique[key].label):
            unique[key] = run
    found.runs = list(unique.values())
    return found


# ---- per-run numbers -----------------------------------------------------------------------------------
def crossing(val: list[dict], axis: str, target: float) -> float | None:
    """Where the val loss first reaches `target` along `axis` (train_time_ms or tokens), linearly
    interpolated between the evaluations before and at the crossing; None if it never does."""
    previous = None
    for record in val:
        x, loss = record.get(axis), record["val_loss"]
        if x is None:
            continue
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(x)
            x0, loss0 = previous
            return x0 + (target - loss0) * (x - x0) / (loss - loss0)
        previous = (x, loss)
    return None


def final_loss(run: Run) -> float:
    if run.end and isinstance(run.end.get("final_val_loss"), (int, float)):
        return float(run.end["final_val_loss"])
    return float(run.val[-1]["val_loss"])


def tokens_per_second(run: Run) -> float | None:
    tokens, time_ms = run.last("tokens"), run.last("train_time_ms")
    return tokens / (time_ms / 1000) if tokens and time_ms else None


def mean_mfu(run: Run) -> float | None:
    values = [r["mfu"] for r in run.train[1:] if isinstance(r.get("mfu"), (int, float))]  # the first step compiles
    return sum(values) / len(values) if values else None


def device_text(run: Run) -> str:
    """`NVIDIA H100 80GB HBM3 x8`: the GPU and the world size of provenance.json (both trainers write the same
    keys, nanogpt.rundir.provenance); `cpu x2` without GPUs, `unknown` where provenance.json does not say."""
    names, world_size = run.provenance.get("gpus"), run.provenance.get("world_size")
    if names is None or world_size is None:
        return "unknown"
    name = Counter(names).most_common(1)[0][0] if names else "cpu"
    return f"{name} x{world_size}"


def attention_text(run: Run) -> str:
    """The attention kernels the run took, as its provenance.json names them (`fa4 (flash-attn-4 4.0.0b36)`):
    `auto` resolves per machine, so runs of one configuration can differ here; `unknown` where it is not said."""
    return str(run.provenance.get("attention_backend") or "unknown")


# ---- groups and statistics ------------------------------------------------------------------------------
def configuration(run: Run) -> dict:
    return {k: v for k, v in run.config.items() if k not in NOT_CONFIGURATION}


def group_key(run: Run) -> str:
    return run.trainer + " " + json.dumps(configuration(run), sort_keys=True, default=str)


def describe(values: list[float]) -> dict:
    """mean, sample std (0 for one value) and n of `values`."""
    n = len(values)
    if not n:
        return {"mean": None, "std": None, "n": 0, "values": []}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "values": list(values)}


def name_groups(groups: dict[str, list[Run]]) -> dict[str, list[Run]]:
    """Readable names: the submission's task label where the runs have one, else the trainer and the
    configuration keys in which the group differs from the most common value among its trainer's groups."""
    by_trainer: dict[str, list[dict]] = {}
    for runs in groups.values():
        by_trainer.setdefault(runs[0].trainer, []).extend(configuration(run) for run in runs)
    named: dict[str, list[Run]] = {}
    for runs in groups.values():
        labels = {run.label for run in runs}
        if len(labels) == 1 and None not in labels and "" not in labels:
            name = labels.pop()
        else:
            config, others = configuration(runs[0]), by_trainer[runs[0].trainer]
            keys = sorted({k for c in others for k in c if any(c.get(k) != o.get(k) for o in others)})
            differing = []
            for key in keys:
                usual = Counter(json.dumps(c.get(key), default=str) for c in others).most_common(1)[0][0]
                if json.dumps(config.get(key), default=str) != usual:
                    differing.append(f"{key}={config.get(key)}")
            name = " ".join([runs[0].trainer, *differing])
        unique, n = name, 2
        while unique in named:
            unique, n = f"{name} #{n}", n + 1
        named[unique] = runs
    return named


def group_stats(name: str, runs: list[Run], target: float) -> dict:
    runs = sorted(runs, key=lambda r: (str(r.seed), str(r.path)))
    times = [crossing(r.val, "train_time_ms", target) for r in runs]
    tokens = [crossing(r.val, "tokens", target) for r in runs]
    losses = [final_loss(r) for r in runs]
    p_value = None
    if len(losses) >= 2:
        from scipy import stats

        p = float(stats.ttest_1samp(losses, target, alternative="less").pvalue)
        p_value = None if math.isnan(p) else p
    tokens_per_s = [v for r in runs if (v := tokens_per_second(r)) is not None]
    mfus = [v for r in runs if r.trainer == BASELINE and (v := mean_mfu(r)) is not None]
    memory = [r.last("peak_memory_bytes") for r in runs if r.last("peak_memory_bytes")]
    steps = [r.last("step") or 0 for r in runs]
    attention = sorted({attention_text(r) for r in runs})
    return {
        "name": name, "trainer": runs[0].trainer, "config": configuration(runs[0]),
        "runs": [str(r.path) for r in runs], "seeds": [r.seed for r in runs], "n_runs": len(runs),
        "finished": sum(r.end is not None for r in runs),
        "steps": describe(steps), "tokens": describe([r.last("tokens") or 0 for r in runs]),
        "train_time_ms": describe([r.last("train_time_ms") or 0.0 for r in runs]),
        "time_to_target_ms": describe([t for t in times if t is not None]) | {"per_run": times},
        "tokens_to_target": describe([t for t in tokens if t is not None]) | {"per_run": tokens},
        "final_val_loss": describe(losses), "p_value": p_value,
        "tokens_per_s": describe(tokens_per_s)["mean"], "mfu": describe(mfus)["mean"],
        "peak_memory_bytes": max(memory) if memory else None,
        "device": ", ".join(sorted({device_text(r) for r in runs})),
        "attention": ", ".join(attention), "attention_kernels": attention,
        "parameters": runs[0].provenance.get("parameters") or {},
    }


def speedups(groups: dict[str, dict]) -> tuple[str | None, list[dict]]:
    """Each group against the baseline group (the baseline group with the most runs): ratios > 1 are faster."""
    baselines = [g for g in groups.values() if g["trainer"] == BASELINE]
    if not baselines:
        return None, []
    base = max(baselines, key=lambda g: (g["n_runs"], -list(groups).index(g["name"])))

    def ratio(key: str, group: dict):
        b, g = base[key]["mean"], group[key]["mean"]
        return b / g if b and g else None

    return base["name"], [{"group": g["name"], "baseline": base["name"],
                           "time_ratio": ratio("time_to_target_ms", g), "tokens_ratio": ratio("tokens_to_target", g)}
                          for g in groups.values() if g is not base]


def ablations(groups: dict[str, dict]) -> list[dict]:
    """Modded groups that differ from another modded group by exactly one switched-off feature."""
    from scipy import stats

    modded = [g for g in groups.values() if g["trainer"] == MODDED]
    found = []
    for ablated in modded:
        for full in modded:
            diff = [k for k in set(ablated["config"]) | set(full["config"])
                    if ablated["config"].get(k) != full["config"].get(k)]
            if len(diff) != 1 or diff[0] not in ABLATIONS:
                continue
            feature = diff[0]
            if ablated["config"].get(feature) != ABLATIONS[feature] or full["config"].get(feature) == ABLATIONS[feature]:
                continue
            a, f = ablated["final_val_loss"]["values"], full["final_val_loss"]["values"]
            low = high = None
            if len(a) >= 2 and len(f) >= 2:
                ci = stats.ttest_ind(a, f, equal_var=False).confidence_interval(0.95)
                low, high = (None if math.isnan(v) else float(v) for v in (ci.low, ci.high))
            ta, tf = ablated["time_to_target_ms"]["mean"], full["time_to_target_ms"]["mean"]
            found.append({
                "group": ablated["name"], "full": full["name"], "feature": feature,
                "delta_final_loss": ablated["final_val_loss"]["mean"] - full["final_val_loss"]["mean"],
                "ci_low": low, "ci_high": high,
                "delta_train_time_ms": ablated["train_time_ms"]["mean"] - full["train_time_ms"]["mean"],
                "delta_time_to_target_ms": ta - tf if ta is not None and tf is not None else None,
            })
    return found


# ---- command line -------------------------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m slurm.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", help="run directories, folders of run directories, manifests")
    parser.add_argument("--manifest", action="append", default=[], help="a submission's manifest.json (repeatable)")
    parser.add_argument("--out", help="output folder (default: <submission>/report when one manifest is given)")
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET, help=f"val loss target (default {DEFAULT_TARGET})")
    return parser.parse_args(argv)


def output_dir(args, found: Found) -> Path:
    if args.out:
        out = Path(args.out)
    elif len(found.manifests) == 1:
        out = found.manifests[0].parent / "report"
    else:
        raise ReportError("give --out DIR (the default, <submission>/report, needs exactly one manifest)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ReportError(f"cannot write the report into {out}: {e.strerror or e}") from None
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    inputs = args.inputs + args.manifest
    if not inputs:
        raise ReportError("nothing to report: give run directories, folders of runs or a --manifest")
    found = collect(inputs)
    if not found.runs:
        raise ReportError(f"no usable run (a run directory with metrics.jsonl and at least one val record) in "
                          f"{', '.join(inputs)}")
    out = output_dir(args, found)
    grouped: dict[str, list[Run]] = {}
    for run in sorted(found.runs, key=lambda r: (r.trainer != BASELINE, r.trainer, str(r.path))):
        grouped.setdefault(group_key(run), []).append(run)
    named = name_groups(grouped)
    groups = {name: group_stats(name, runs, args.target) for name, runs in named.items()}
    for name, group in groups.items():
        backends = group["attention_kernels"]
        if len(backends) > 1:  # e.g. attention_backend=auto on nodes with and without flash-attn-4
            found.warn(f"group {name!r} mixes attention kernels ({'; '.join(backends)}): its times are not one "
                       f"kernel set's; pass --attention_backend explicitly to compare like with like")
    baseline, ratios = speedups(groups)
    summary = {"target": args.target, "out": str(out), "groups": groups, "baseline": baseline,
               "speedups": ratios, "ablations": ablations(groups), "warnings": found.warnings,
               "inputs": inputs}

    from slurm import report_html

    summary["files"] = report_html.write_all(summary, named, out)
    print(report_html.text_table(summary))
    print(f"\nreport: {summary['files']['html']}\n        {summary['files']['markdown']}")
    for png in summary["files"]["plots"]:
        print(f"plot:   {png}")
    return summary


def cli(argv: list[str] | None = None) -> int:
    return exit_status(lambda: main(argv), {ReportError: 2})


if __name__ == "__main__":
    sys.exit(cli())
