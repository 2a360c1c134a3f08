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
import os
import sys
from pathlib import Path

from slurm.job_state import cmd_cancel, cmd_logs, cmd_resume, cmd_status, resolve_runs_dir
from slurm.manifest import ManifestError
from slurm.plans import (
    ABLATIONS,
    DATASETS,
    EXIT_USAGE,
    REPO_ROOT,
    TEXT_TOKENIZERS,
    TRAINERS,
    Context,
    LaunchError,
    Plan,
    check_env_path,
    cluster_checks,
    data_plan,
    plan_ablate,
    plan_build,
    plan_compare,
    plan_train,
    sbatch_reachable,
)
from slurm.study import add_study_arguments, plan_study
from slurm.submission import JobFailed, new_submission_id, print_plan, print_submitted, submit_all

# The parts: slurm/plans.py (what each command would submit, and the checks of a request), slurm/submission.py
# (submitit, the code snapshot, the manifest), slurm/job_state.py (status, logs, cancel, resume); here the
# command line that ties them together.


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
        return plan_study(args, ctx, errors)
    planner = {"build-flash-attn": plan_build, "train": plan_train, "ablate": plan_ablate,
               "compare": plan_compare}[args.command]
    return planner(args, ctx, errors)


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
