"""Training-dynamics studies: documents scored at many steps across seeds, gathered into one table and a report.

    python -m nanogpt.data.select_docs DATA_DIR --out docs.npz --random 50 --seed 0
    python -m slurm.submit study --trainer modded --seeds 1-8 --docs docs.npz --probe-every 5 --gpu-type h100
    python -m slurm.submit study --trainer nanogpt --seeds 1-4 --docs docs.npz --probe-every 50 --path checkpoints ...
    python -m slurm.study gather --out DIR RUN_DIR [RUN_DIR ...]     (or --manifest FILE: a submission's runs)

Path "probes" (default): each run scores the documents itself (--probe_docs, --probe_every; outside its training
clock). Path "checkpoints": each run keeps weights-only bf16 checkpoints every N steps, and a scoring array (one
task per run, after the training array) scores them (python -m <trainer>.score_checkpoints). Then a gathering job
writes study.parquet (seed, step, tokens, document, position, loss: position t is the loss of the document's token
t given tokens 0..t-1) and the report: mean loss per document against step with the spread over seeds, a document
x step heatmap, the documents whose loss drops most sharply in one interval (PNGs, study.md, a self-contained
study.html). Before submitting, the disk the study will take is printed; a study that does not fit the free space
of the runs directory is refused.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from nanogpt.probe_store import Docs, ProbeError, ProbeStore, read_docs
from slurm import plans

TRAINER_NAMES = {"nanogpt": "baseline", "baseline": "baseline", "modded": "modded"}
SCORERS = {"baseline": "nanogpt.score_checkpoints", "modded": "modded_nanogpt.score_checkpoints"}
TOP_DROPS = 10


class StudyError(ValueError):
    """A study that cannot be gathered or submitted; the message names the culprit."""


def parse_seed_range(text: str) -> list[int]:
    """'1-8' -> 1..8; '1,3,5' -> those; 'N' -> 1..N."""
    text = text.strip()
    if m := re.fullmatch(r"(\d+)-(\d+)", text):
        first, last = int(m.group(1)), int(m.group(2))
        if first > last:
            raise StudyError(f"--seeds {text}: the range runs backwards")
        return list(range(first, last + 1))
    if re.fullmatch(r"\d+", text):
        if int(text) < 1:
            raise StudyError("--seeds 0: give a count >= 1, a range such as 1-8 or a list such as 0,1")
        return list(range(1, int(text) + 1))
    parts = [p.strip() for p in text.split(",")]
    if not all(re.fullmatch(r"\d+", p) for p in parts) or len(set(parts)) != len(parts):
        raise StudyError(f"--seeds {text!r}: give a range (1-8), a count (8) or distinct whole numbers (1,2,3)")
    return [int(p) for p in parts]


# ---- the table ------------------------------------------------------------------------------------------------

def run_seed(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "config.json").read_text())["seed"])
    except (OSError, ValueError, KeyError) as e:
        raise StudyError(f"{run_dir}: no seed in its config.json ({e})") from None


def gather_table(run_dirs: list[Path]):
    """One pyarrow table of every stored score of the runs: seed, step, tokens, document, position, loss."""
    import pyarrow as pa

    columns = {name: [] for name in ("seed", "step", "tokens", "document", "position", "loss")}
    docs_hash, seeds = None, {}
    for run_dir in run_dirs:
        store = ProbeStore(run_dir)
        try:
            docs = store.docs()
        except ProbeError as e:
            raise StudyError(f"{run_dir}: no probe scores ({e})") from None
        if docs_hash not in (None, docs.sha256):
            raise StudyError(f"{run_dir} scored other documents (hash {docs.sha256[:12]}, not {docs_hash[:12]})")
        docs_hash = docs.sha256
        seed = run_seed(run_dir)
        if seed in seeds:
            raise StudyError(f"{run_dir} and {seeds[seed]} are both seed {seed}")
        seeds[seed] = run_dir
        document = np.repeat(np.arange(len(docs), dtype=np.int32), docs.lengths - 1)
        position = np.concatenate([np.arange(1, n, dtype=np.int32) for n in docs.lengths])
        for step, entry in store.steps().items():
            scores = np.asarray(store.read(step), dtype=np.float32)
            if len(scores) != len(document):
                raise StudyError(f"{store.path(step)}: {len(scores)} scores, expected {len(document)}")
            count = len(scores)
            columns["seed"].append(np.full(count, seed, dtype=np.int32))
            columns["step"].append(np.full(count, step, dtype=np.int32))
            columns["tokens"].append(np.full(count, entry["tokens"], dtype=np.int64))
            columns["document"].append(document)
            columns["position"].append(position)
            columns["loss"].append(scores)
    if not seeds:
        raise StudyError("no runs to gather")
    return pa.table({name: np.concatenate(parts) if parts else np.array([]) for name, parts in columns.items()})


def write_parquet(table, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def document_curves(table) -> tuple[list[int], list[int], list[int], np.ndarray]:
    """(seeds, steps, documents, mean loss over each document's positions as [seed, document, step]; NaN where a
    seed has no score of that step)."""
    seed = table["seed"].to_numpy()
    step = table["step"].to_numpy()
    document = table["document"].to_numpy()
    loss = table["loss"].to_numpy().astype(np.float64)
    seeds, steps, documents = (sorted(set(a.tolist())) for a in (seed, step, document))
    si, ti, di = (np.searchsorted(values, a) for values, a in ((seeds, seed), (steps, step), (documents, document)))
    total = np.zeros((len(seeds), len(documents), len(steps)))
    count = np.zeros_like(total)
    np.add.at(total, (si, di, ti), loss)
    np.add.at(count, (si, di, ti), 1)
    with np.errstate(invalid="ignore"):
        return seeds, steps, documents, total / np.where(count, count, np.nan)


def sharpest_drops(steps: list[int], mean: np.ndarray, top: int = TOP_DROPS) -> list[dict]:
    """The documents whose seed-mean loss falls most between two consecutive scored steps."""
    if len(steps) < 2:
        return []
    drops = mean[:, :-1] - mean[:, 1:]  # [document, interval]
    best = np.nanargmax(np.where(np.isnan(drops), -np.inf, drops), axis=1)
    rows = [{"document": d, "from_step": steps[k], "to_step": steps[k + 1], "drop": float(drops[d, k]),
             "before": float(mean[d, k]), "after": float(mean[d, k + 1])}
            for d, k in enumerate(best) if np.isfinite(drops[d, k])]
    return sorted(rows, key=lambda r: -r["drop"])[:top]


# ---- the report -----------------------------------------------------------------------------------------------

def plot_report(steps, documents, curves, drops, docs: Docs, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, low, high = np.nanmean(curves, axis=0), np.nanmin(curves, axis=0), np.nanmax(curves, axis=0)
    shown = [r["document"] for r in drops] or list(range(min(len(documents), TOP_DROPS)))
    fig, ax = plt.subplots(figsize=(10, 6))
    for d in shown:
        line, = ax.plot(steps, mean[d], label=f"doc {documents[d]} ({docs.lengths[documents[d]]} tok)")
        ax.fill_between(steps, low[d], high[d], color=line.get_color(), alpha=0.15)
    ax.set(xlabel="step", ylabel="mean next-token loss", title=f"Loss per document, mean and min-max over "
           f"{curves.shape[0]} seeds ({len(shown)} sharpest drops of {len(documents)} documents)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    curves_png = out / "study_documents.png"
    fig.savefig(curves_png, dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, max(3, 0.25 * len(documents) + 1)))
    image = ax.imshow(mean, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=90, fontsize=7)
    ax.set_yticks(range(len(documents)), [str(d) for d in documents], fontsize=7)
    ax.set(xlabel="step", ylabel="document", title="Mean loss over seeds, document x step")
    fig.colorbar(image, ax=ax, label="mean next-token loss")
    heatmap_png = out / "study_heatmap.png"
    fig.savefig(heatmap_png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [curves_png, heatmap_png]


def drop_rows(drops: list[dict], documents: list[int], docs: Docs) -> list[list[str]]:
    return [[str(documents[r["document"]]), str(docs.lengths[documents[r["document"]]]),
             f"{r['from_step']} -> {r['to_step']}", f"{r['before']:.4f}", f"{r['after']:.4f}", f"{r['drop']:.4f}"]
            for r in drops]


def write_report(table, docs: Docs, run_dirs: list[Path], out: Path) -> dict:
    from slurm.report_html import STYLE, html_table, md_table

    seeds, steps, documents, curves = document_curves(table)
    mean = np.nanmean(curves, axis=0)
    drops = sharpest_drops(steps, mean)
    plots = plot_report(steps, documents, curves, drops, docs, out)
    columns = ["document", "tokens", "interval", "loss before", "loss after", "drop"]
    rows = drop_rows(drops, documents, docs)
    facts = (f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), {len(steps)} steps ({steps[0]}..{steps[-1]}), "
             f"{len(documents)} documents ({docs.num_scores:,} scored tokens; docs sha256 {docs.sha256[:12]}), "
             f"{table.num_rows:,} rows")
    note = "The documents whose mean loss over seeds falls most between two consecutive scored steps."
    md = ["# Training-dynamics study", "", facts, "", "## Sharpest drops", "", note, "", md_table(columns, rows), "",
          "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    page = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Training-dynamics study</title>"
            f"<style>{STYLE}</style></head><body><h1>Training-dynamics study</h1><p>{html.escape(facts)}</p>",
            f"<h2>Sharpest drops</h2><p>{html.escape(note)}</p>", html_table(columns, rows), "<h2>Plots</h2>"]
    for path in plots:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        page.append(f"<img alt='{html.escape(path.stem)}' src='data:image/png;base64,{data}'>")
    page.append("<h2>Runs</h2><ul>" + "".join(f"<li><code>{html.escape(str(r))}</code></li>" for r in run_dirs)
                + "</ul></body></html>\n")
    (out / "study.md").write_text("\n".join(md) + "\n")
    (out / "study.html").write_text("\n".join(page))
    return {"markdown": str(out / "study.md"), "html": str(out / "study.html"), "plots": [str(p) for p in plots],
            "drops": drops}


def manifest_runs(path: Path) -> list[Path]:
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise StudyError(f"{path}: not a readable manifest ({e})") from None
    runs = [Path(t["run_dir"]) for job in manifest.get("jobs", []) if job.get("role") == "train"
            for t in job.get("tasks", []) if t.get("run_dir")]
    missing = [str(r) for r in runs if not r.is_dir()]
    if missing:
        raise StudyError(f"runs of {path} missing: {', '.join(missing)}")
    return runs


def gather(run_dirs: list[Path], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    table = gather_table(run_dirs)
    write_parquet(table, out / "study.parquet")
    result = write_report(table, ProbeStore(run_dirs[0]).docs(), run_dirs, out)
    print(f"{out / 'study.parquet'}: {table.num_rows:,} rows; report {result['html']}")
    return result | {"parquet": str(out / "study.parquet"), "rows": table.num_rows}


# ---- submission ---------------------------------------------------------------------------------------------

def trainer_settings(trainer: str, recipe: str | None, overrides: list[str], data_path: Path,
                     gpus: int = 1) -> tuple[int, int, int]:
    """(steps of the run, parameters of the model, tokens it trains on) from the recipe and overrides, as the trainer
    would resolve them on `gpus` GPUs in all."""
    import torch

    meta = {}
    if (data_path / "corpus.json").is_file():
        meta = json.loads((data_path / "corpus.json").read_text())
    if trainer == "baseline":
        from nanogpt.config import parse_config
        from nanogpt.model import GPT, GPTConfig
        from nanogpt.train import TrainConfig, scratch_model_args

        cfg, _ = parse_config(TrainConfig, ([recipe] if recipe else []) + overrides)
        vocab = cfg.vocab_size or int(meta.get("vocab_size") or 0) or 50304
        with torch.device("meta"):
            model = GPT(GPTConfig(**scratch_model_args(cfg, vocab)))
        per_step = cfg.total_batch_size or cfg.batch_size * cfg.block_size * gpus
        return cfg.max_iters, sum(p.numel() for p in model.parameters()), cfg.max_iters * per_step
    from modded_nanogpt.model import GPT
    from modded_nanogpt.train_gpt import model_config, parse_hyperparameters, schedule_of

    hp = parse_hyperparameters(([f"--recipe={recipe}"] if recipe else []) + overrides)
    if hp.vocab_size == 0:
        hp.vocab_size = -(-int(meta.get("vocab_size") or 50257) // 128) * 128
    if hp.bos_id == -1:
        hp.bos_id = int(meta.get("eot_id", 50256))
    model = GPT(model_config(hp))  # on the CPU: its init reads buffers, which meta tensors cannot
    schedule = schedule_of(hp)
    tokens = sum(schedule.at(step).batch_tokens for step in range(schedule.total_steps))
    return schedule.total_steps, sum(p.numel() for p in model.parameters()), tokens


def scored_steps(steps: int, every: int) -> int:
    """How many steps a run scores: 0, every, 2 every, ..., and the last: len(nanogpt.probe_store.probe_steps(every,
    "", steps)) in closed form (the disk check runs before a request's settings are known to be sane: listing the
    steps of max_iters=10^11 would not fit in memory)."""
    return steps // every + 1 + (steps % every > 0)


def compute_share(docs: Docs, steps: int, every: int, train_tokens: int) -> float:
    """The probes' forwards against the run's training, in compute: (scored steps x the documents' tokens) /
    (3 x the tokens trained on), a forward costing about a third of a training step per token. In the speedrun's
    scaled run on an H200 (256 documents, 357,466 tokens, every 5 of 462 steps, 122.7M tokens trained) this says
    9.1%; the probes measured 10.4% of the training time (modded_nanogpt/PERF_NOTES.md, 2026-12-03 (g))."""
    return scored_steps(steps, every) * int(docs.lengths.sum()) / (3 * train_tokens)


def disk_estimate(docs: Docs, docs_file: Path, seeds: int, steps: int, params: int, every: int,
                  path: str) -> dict[str, int]:
    """Bytes the study writes: scores, kept weights (checkpoint path) and each run's resumable checkpoints (model and
    optimizer state, up to two kept), the table."""
    scored = scored_steps(steps, every)
    per_run = {"probe scores": scored * docs.num_scores * 4 + docs_file.stat().st_size,
               "resumable checkpoints": 2 * 3 * 4 * params}
    if path == "checkpoints":
        per_run["weights-only checkpoints"] = (steps // every) * 2 * params
    total = {k: v * seeds for k, v in per_run.items()}
    total["table (parquet, at most)"] = seeds * scored * docs.num_scores * 28
    return total


def free_bytes(path: Path) -> int:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def plan_study(args, ctx, errors: list[str]):
    """The study's jobs for slurm.submit: the training array (with the study's settings), for the checkpoint path
    the scoring array after it, then the gathering job."""
    trainer = plans.TRAINERS[TRAINER_NAMES[args.trainer]]
    errors += plans.gpu_checks(trainer, args.gpu_type, args.num_gpus, args.nodes)
    recipe = args.recipe or trainer.default_recipe
    try:  # errors are returned with the others, not raised
        plans.check_recipe(trainer, recipe)
        seeds = parse_seed_range(args.seeds)
        docs = read_docs(args.docs)
        overrides, data = plans.parse_overrides(args.set), plans.data_plan(args, ctx)
    except (StudyError, ProbeError, plans.LaunchError) as e:
        return [], errors + [str(e)], plans.gpu_request(args, ctx)
    if args.probe_every < 1:
        errors.append(f"--probe-every {args.probe_every}: must be at least 1")
    docs_file = Path(args.docs).resolve()
    if args.path == "probes":
        study_args = [f"--probe_docs={docs_file}", f"--probe_every={args.probe_every}"]
    else:
        study_args = [f"--save_checkpoints=every:{args.probe_every}", "--save_checkpoints_as=weights_bf16"]
    try:
        train = plans.train_job(args, ctx, trainer, "study", [("", study_args)], seeds, data[0], recipe, overrides)
        steps, params, train_tokens = trainer_settings(trainer.name, recipe, overrides, data[0],
                                                       max(1, args.num_gpus) * max(1, args.nodes))
    except Exception as e:  # a bad setting, reported with the other errors
        return [], errors + [str(e)], plans.gpu_request(args, ctx)
    every = max(1, args.probe_every)
    share = compute_share(docs, steps, every, train_tokens)
    where = "of each run's training" if args.path == "probes" else "in the scoring jobs, against the training"
    print(f"study compute: {scored_steps(steps, every)} scorings of {int(docs.lengths.sum()):,} tokens per run, "
          f"about {100 * share:.1f}% {where} (forward-only tokens / 3 x trained tokens; measured ~1.15x that "
          "on an H200)")
    need = disk_estimate(docs, docs_file, len(seeds), steps, params, every, args.path)
    free = free_bytes(ctx.runs_dir)
    print(f"study disk: {sum(need.values()) / 2**30:.2f} GiB in {ctx.runs_dir} ({free / 2**30:.1f} GiB free): "
          + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in need.items()))
    if sum(need.values()) > free:
        errors.append(f"the study needs about {sum(need.values()) / 2**30:.2f} GiB but {ctx.runs_dir} has "
                      f"{free / 2**30:.2f} GiB free: fewer seeds or documents, a larger --probe-every, or another "
                      "--runs-dir")
    job_list = plans.with_data(data, [train])
    after = [train.name]
    if args.path == "checkpoints":
        score_tasks = [plans.Task(f"score-{t.label}", ctx.base_knobs() | {"RUN_DIR": t.run_dir}) for t in train.tasks]
        job_list.append(plans.JobSpec(
            name="score", role="score", script=None, tasks=score_tasks, cpus_per_task=args.cpus_per_gpu,
            time_min=plans.parse_time_min(args.time or "04:00:00"), gpus_per_node=1 if args.device != "cpu" else 0,
            gpu_type=args.gpu_type, partition=ctx.partition, after=[train.name], after_kind="afterok",
            module=["slurm.study", "score", "--trainer", trainer.name, "--docs", str(docs_file),
                    "--device", args.device]))
        after.append("score")
    job_list.append(plans.JobSpec(
        name="gather", role="report", script=None, tasks=[plans.Task("gather", ctx.base_knobs())], cpus_per_task=2,
        time_min=60, partition=ctx.cpu_partition, after=after, after_kind="afterany",
        module=["slurm.study", "gather", "--manifest", str(ctx.submission_dir / "manifest.json"), "--out",
                str(ctx.submission_dir / "study")]))
    return job_list, errors, plans.gpu_request(args, ctx)


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trainer", required=True, choices=sorted(TRAINER_NAMES), help="nanogpt (baseline) or modded")
    parser.add_argument("--seeds", required=True, help="a range (1-8), a count (8) or a list (1,3,5)")
    parser.add_argument("--docs", required=True, help="a docs file of python -m nanogpt.data.select_docs")
    parser.add_argument("--probe-every", type=int, required=True, help="score (or keep a checkpoint) every N steps")
    parser.add_argument("--path", choices=("probes", "checkpoints"), default="probes",
                        help="probes: runs score as they train; checkpoints: runs keep weights-only checkpoints, "
                             "a scoring array scores them (default probes)")


# ---- in-job commands --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm.study", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("gather", help="the table and the report of a study's runs")
    p.add_argument("runs", nargs="*", type=Path, help="run directories")
    p.add_argument("--manifest", type=Path, help="a submission's manifest.json: its training runs")
    p.add_argument("--out", type=Path, required=True, help="where study.parquet and the report go")
    p = sub.add_parser("score", help="score a run's kept checkpoints (RUN_DIR from the environment, as in a job)")
    p.add_argument("--trainer", required=True, choices=sorted(SCORERS))
    p.add_argument("--docs", required=True)
    p.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        if args.command == "score":
            import importlib

            run_dir = os.environ.get("RUN_DIR")
            if not run_dir:
                raise StudyError("RUN_DIR is not set (the scoring job's knob)")
            importlib.import_module(SCORERS[args.trainer]).main([run_dir, "--docs", args.docs, "--device",
                                                                 args.device])
            return 0
        runs = list(args.runs) + (manifest_runs(args.manifest) if args.manifest else [])
        if not runs:
            raise StudyError("give run directories or --manifest FILE")
        gather(runs, args.out)
    except (StudyError, ProbeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
