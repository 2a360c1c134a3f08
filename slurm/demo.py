"""The README's first command: the baseline and the speedrun-style model on the local corpus, with seeds,
compared in a report (table, HTML, PNG plots).

  make demo                                         # = bash setup_env.sh && python -m slurm.demo
  python -m slurm.demo --seeds 3                    # more seeds (about 1.5 minutes each per trainer on 2 cores)
  python -m slurm.demo --on slurm --gpu-type h100   # the same comparison as Slurm jobs (slurm.submit compare)

On this machine (the default):
1. the local corpus: this Python's standard library as character-level shards, each file cut into documents
   of at most 255 characters ($DATA_DIR/stdlib_char_docs, reused when there);
2. the baseline trainer, recipe `demo` (nanogpt/recipes/demo.toml), once per seed;
3. the speedrun trainer, recipe `demo` (modded_nanogpt/recipes/demo.toml: every feature on, at toy size),
   once per seed, on the same data and validated on the same first tokens of the val split;
4. the report (python -m slurm.report): time and tokens to the target val loss, final loss with a t-test,
   speedups; report.md, report.html and PNGs in <demo folder>/report;
5. a sample from the first baseline run and from the first speedrun-style run.
Everything runs on the GPU when there is one, else on the CPU. The trainers, the corpus preparer and the
report run through their command lines (as the launcher runs them); the demo folder is
$RUNS_DIR/demo-<time>, or --name.

With --on slurm the same work goes to the cluster: `python -m slurm.submit compare` with the demo recipes
(data preparation, then baseline and modded seed arrays, then the report job); the demo waits, printing
what it waits for, and prints the report table. Where a Slurm cluster answers, the local demo says so and
prints this command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SEEDS = 2
# The demo's target: a character-level val loss both demo recipes reach on the standard library (the
# speedrun's 3.28 is a GPT-2-token loss on FineWeb; it means nothing here).
DEFAULT_TARGET = 2.7
# The corpus: characters, each file cut into documents of at most DOC_CHARS characters, so that a document
# plus its BOS fits the modded demo recipe's seq_len (256): the speedrun's loader keeps only the first seq_len
# tokens of each document, and whole files would leave it the first 256 characters of every file.
CORPUS_NAME = "stdlib_char_docs"
DOC_CHARS = 255
VAL_TOKENS = 40_960  # both demo recipes validate on the first 40,960 tokens of the val split (20 x 16 x 128)
QUICK_VAL_TOKENS = 8_192  # --quick: 4 x 16 x 128
# --quick: short runs (a smoke test of the whole path, not a comparison)
QUICK_BASELINE = ["max_iters=150", "lr_decay_iters=150", "eval_interval=50", "eval_iters=4"]
QUICK_MODDED = ["num_iterations=40", "extension_iterations=0", "val_every=20", f"val_tokens={QUICK_VAL_TOKENS}"]
EXIT_USAGE = 2


class DemoError(Exception):
    """Bad input: reported before any work starts (exit 2)."""


class StepFailed(Exception):
    """A step of the demo failed after it started (exit 1)."""


# ---- the steps, through the command lines ------------------------------------------------------------------

def stream(cmd: list[str], prefix: str, log_path: Path | None = None) -> list[str]:
    """Run cmd from the repo root, echo its output line by line with a prefix (and into log_path);
    raise StepFailed naming the command, its status and its last lines when it fails."""
    print(f"{prefix}$ {' '.join(cmd)}", flush=True)
    lines: list[str] = []
    log = open(log_path, "w") if log_path else None  # noqa: SIM115 (closed below)
    try:
        with subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc:
            for raw in proc.stdout:
                # tqdm redraws with carriage returns: show the last state of each line only.
                line = raw.rstrip("\n").split("\r")[-1]
                lines.append(line)
                if log:
                    log.write(line + "\n")
                print(f"{prefix}{line}", flush=True)
            status = proc.wait()
    finally:
        if log:
            log.close()
    if status != 0:
        tail = "\n".join(f"    | {line}" for line in lines[-15:])
        where = f" (full output: {log_path})" if log_path else ""
        raise StepFailed(f"`{' '.join(cmd)}` exited with status {status}{where}:\n{tail}")
    return lines


def resolve_device(requested: str) -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda: no CUDA GPU is visible here (use --device auto or cpu)")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def trainer_commands(data_dir: Path, folder: Path, seeds: list[int], device: str, quick: bool) -> list[tuple]:
    """(name, run_dir, command) of every training run, baseline first."""
    trainers = (("baseline", ["nanogpt.train", "demo"], QUICK_BASELINE),
                ("modded", ["modded_nanogpt.train_gpt", "demo"], QUICK_MODDED))
    runs = []
    for name, module_and_recipe, quick_settings in trainers:
        extra = [f"--{kv}" for kv in quick_settings] if quick else []
        for seed in seeds:
            run_dir = folder / f"{name}-seed{seed}"
            runs.append((f"{name} seed {seed}", run_dir,
                         [sys.executable, "-m", *module_and_recipe, f"--data_dir={data_dir}", f"--run_dir={run_dir}",
                          f"--device={device}", f"--seed={seed}", *extra]))
    return runs


def report_table(lines: list[str]) -> list[str]:
    """The report's own printout (the table and where its files are) from its output lines."""
    return [line for line in lines if not line.startswith("warning")]


def corpus_dir(args) -> Path:
    return Path(args.data_dir or Path(os.environ.get("DATA_DIR", REPO_ROOT / "data")) / CORPUS_NAME).resolve()


def prepare_corpus(args, data_dir: Path, log_path: Path | None) -> None:
    """Prepare (or reuse) the corpus; then check it holds enough val tokens before anything trains."""
    source = ["--source", str(Path(args.source).resolve())] if args.source else []
    stream([sys.executable, "-m", "nanogpt.data.text_corpus", "--out", str(data_dir), "--tokenizer", "char",
            "--doc_chars", str(DOC_CHARS), *source], "  ", log_path)
    need = (QUICK_VAL_TOKENS if args.quick else VAL_TOKENS) + 1
    have = json.loads((data_dir / "corpus.json").read_text())["num_tokens"]["val"]
    if have < need:
        raise StepFailed(f"{data_dir}: its val split holds {have:,} tokens, fewer than the {need:,} the demo validates "
                         f"on; give a larger --source (or --quick, which validates on {QUICK_VAL_TOKENS:,})")


# ---- Slurm -----------------------------------------------------------------------------------------------

def slurm_offer() -> str | None:
    """A line about the Slurm cluster answering here (None when there is none)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return None
    from slurm.plans import query_cluster

    offered, why = query_cluster(None)
    if offered is None:
        return None
    types = ", ".join(f"{name} ({nodes} node{'s' if nodes > 1 else ''})" for name, (nodes, _) in sorted(offered.items()))
    example = next(iter(sorted(offered)), "TYPE")
    return (f"A Slurm cluster answers here (GPU types: {types or 'none typed'}). The same comparison as Slurm jobs:\n"
            f"  python -m slurm.demo --on slurm --gpu-type {example}    "
            f"(or: make demo DEMO_ARGS='--on slurm --gpu-type {example}')")


def run_on_slurm(args, seeds: list[int]) -> int:
    if not args.gpu_type:
        raise DemoError("--on slurm needs --gpu-type (a GPU type of slurm/gpus.tsv the cluster offers, e.g. h100)")
    if shutil.which("sbatch") is None:
        raise DemoError("--on slurm: sbatch is not on PATH here (run it where Slurm's commands work)")
    runs_dir = Path(args.runs_dir or os.environ.get("RUNS_DIR", REPO_ROOT / "runs")).resolve()
    data_dir = corpus_dir(args)
    cmd = [sys.executable, "-m", "slurm.submit", "compare", "--cluster", "slurm", "--runs-dir", str(runs_dir),
           "--data-dir", str(data_dir), "--baseline-recipe", "demo", "--modded-recipe", "demo",
           "--seeds", ",".join(map(str, seeds)), "--gpu-type", args.gpu_type, "--num-gpus", "1",
           "--device", args.device]
    for flag in ("partition", "cpu_partition", "account", "time", "cpus_per_gpu"):
        if getattr(args, flag):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.quick:
        cmd += [arg for kv in QUICK_BASELINE for arg in ("--baseline-set", kv)]
        cmd += [arg for kv in QUICK_MODDED for arg in ("--modded-set", kv)]
    print(f"[1/4] local corpus (here: the jobs read it from {data_dir}; it must be on a shared filesystem)")
    prepare_corpus(args, data_dir, None)
    print("[2/4] submitting the comparison (baseline and modded seed arrays, then the report job)")
    lines = stream(cmd, "  ")
    found = [m.group(1) for line in lines if (m := re.match(r"submission (\S+) \(slurm\): (\S+)", line))]
    if not found:
        raise StepFailed("slurm.submit compare did not print its submission id")
    submission = found[0]
    print(f"[3/4] waiting for submission {submission} (python -m slurm.submit status {submission})")
    stream([sys.executable, "-m", "slurm.submit", "status", submission, "--runs-dir", str(runs_dir), "--wait",
            "--timeout", str(args.wait_minutes * 60)], "  ")
    manifest = runs_dir / "submissions" / submission / "manifest.json"
    print("[4/4] the report")
    stream([sys.executable, "-m", "slurm.report", "--manifest", str(manifest), "--target", str(args.target)], "  ")
    return 0


# ---- here -------------------------------------------------------------------------------------------------

def run_here(args, seeds: list[int]) -> int:
    device = resolve_device(args.device)
    data_dir = corpus_dir(args)
    runs_dir = Path(args.runs_dir or os.environ.get("RUNS_DIR", REPO_ROOT / "runs")).resolve()
    folder = runs_dir / (args.name or time.strftime("demo-%Y%m%d-%H%M%S"))
    if folder.exists() and any(folder.iterdir()):
        raise DemoError(f"--name {folder.name}: {folder} already holds files; pick another name (nothing there "
                        "is overwritten)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DemoError(f"cannot create the demo folder {folder} (RUNS_DIR / --runs_dir): {e.strerror or e}") from None
    offer = slurm_offer()
    if offer:
        print(offer + "\nThis run stays on this machine.\n")
    runs = trainer_commands(data_dir, folder, seeds, device, args.quick)
    total = len(runs) + 3
    t0 = time.perf_counter()
    print(f"[1/{total}] local corpus: {args.source or 'the Python standard library'}, characters -> {data_dir}",
          flush=True)
    prepare_corpus(args, data_dir, folder / "prepare.log")
    for index, (name, run_dir, cmd) in enumerate(runs, start=2):
        print(f"[{index}/{total}] training: {name} on {device} -> {run_dir}  ({time.perf_counter() - t0:.0f}s so far)",
              flush=True)
        stream(cmd, f"  {name} | ", folder / f"{run_dir.name}.log")
    print(f"[{total - 1}/{total}] report: target val loss {args.target} -> {folder / 'report'}", flush=True)
    lines = stream([sys.executable, "-m", "slurm.report", str(folder), "--out", str(folder / "report"),
                    "--target", str(args.target)], "  ", folder / "report.log")
    first_baseline = runs[0][1]
    first_modded = next(run_dir for name, run_dir, _ in runs if name.startswith("modded"))
    print(f"[{total}/{total}] a sample from {first_baseline.name} and from {first_modded.name} (prompt: 'def '):",
          flush=True)
    for module, run_dir in (("nanogpt.sample", first_baseline), ("modded_nanogpt.sample", first_modded)):
        print(f"  {run_dir.name}:", flush=True)
        stream([sys.executable, "-m", module, f"--run_dir={run_dir}", "--start=def ", "--num_samples=1",
                "--max_new_tokens=200", "--temperature=0.8", f"--device={device}"], "  ",
               folder / f"sample-{run_dir.name}.log")
    print(f"\nDone in {time.perf_counter() - t0:.0f}s.")
    if args.quick:
        print(f"SMOKE TEST (--quick): runs of a few dozen steps validated on {QUICK_VAL_TOKENS:,} tokens check that "
              "every part works; their numbers compare nothing (run without --quick for a comparison).")
    print(f"The comparison (baseline vs speedrun-style, {len(seeds)} seed(s) each, target val loss {args.target}):\n")
    print("\n".join(report_table(lines)))
    print(f"\nOpen {folder / 'report' / 'report.html'} in a browser (plots embedded).\n"
          f"Runs: {folder}/<trainer>-seed<N>/ (config.json, provenance.json, metrics.jsonl, train.log, ckpt/)\n"
          f"Again on more seeds: python -m slurm.demo --seeds 4;  tests: make test")
    if offer:
        print("\n" + offer)
    return 0


# ---- command line -----------------------------------------------------------------------------------------

def parse_seeds(text: str) -> list[int]:
    """N (seeds 1..N) or a comma-separated list of distinct non-negative seeds."""
    try:
        if "," not in text:
            count = int(text)
            if count < 1:
                raise ValueError
            return list(range(1, count + 1))
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise DemoError(f"--seeds {text!r}: give a count >= 1 or a list of seeds like 1,2,3") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise DemoError(f"--seeds {text!r}: seeds must be distinct and >= 0")
    return seeds


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m slurm.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default=str(DEFAULT_SEEDS), help=f"N (1..N) or a list (default {DEFAULT_SEEDS})")
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET,
                        help=f"val loss target of the report (default {DEFAULT_TARGET}, a character-level loss)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test, not a comparison)")
    parser.add_argument("--source", help="folder of text files for the corpus (default: the standard library)")
    parser.add_argument("--data_dir", help=f"corpus folder (default $DATA_DIR/{CORPUS_NAME})")
    parser.add_argument("--runs_dir", help="where the demo folder goes (default $RUNS_DIR)")
    parser.add_argument("--name", help="demo folder name (default demo-<time>); must not hold files yet")
    parser.add_argument("--on", default="here", choices=["here", "slurm"], help="this machine, or Slurm jobs")
    slurm = parser.add_argument_group("--on slurm")
    slurm.add_argument("--gpu-type", dest="gpu_type", help="GPU type of slurm/gpus.tsv (required with --on slurm)")
    slurm.add_argument("--partition", help="GPU partition")
    slurm.add_argument("--cpu-partition", dest="cpu_partition", help="partition of the data and report jobs")
    slurm.add_argument("--account", help="Slurm account")
    slurm.add_argument("--cpus-per-gpu", dest="cpus_per_gpu", type=int, help="CPUs per GPU of each training job")
    slurm.add_argument("--time", help="time limit of each training job (minutes or HH:MM:SS)")
    slurm.add_argument("--wait-minutes", dest="wait_minutes", type=float, default=120,
                       help="how long to wait for the jobs (default 120)")
    args = parser.parse_args(argv)
    if not args.target > 0:
        raise DemoError(f"--target {args.target}: a val loss target must be > 0")
    if args.source and not Path(args.source).is_dir():
        raise DemoError(f"--source {args.source}: not a folder")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        seeds = parse_seeds(args.seeds)
        return run_on_slurm(args, seeds) if args.on == "slurm" else run_here(args, seeds)
    except DemoError as e:
        print(f"error: {e}\nerror: nothing was run", file=sys.stderr)
        return EXIT_USAGE
    except StepFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
