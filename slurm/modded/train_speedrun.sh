#!/bin/bash
#SBATCH --job-name=train_speedrun
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
# The speedrun trainer (modded_nanogpt.train_gpt) on FineWeb10B, on 1, 2, 4 or 8 GPUs of one node (its world
# size must divide 8; other counts and several nodes are refused before anything starts). The GPU request
# comes from the command line. 120 s before the time limit (or on `scancel --signal=USR1 [--batch] JOBID`)
# the trainer checkpoints and the job requeues itself; it resumes from the same RUN_DIR.
#
#   # data (once): sbatch slurm/modded/prepare_fineweb.sh   (or: python -m slurm.submit prep fineweb)
#   # tiny CPU run, no Slurm (NPROC_PER_NODE=2: two gloo processes):
#   RECIPE=tiny_cpu DATASET_DIR=data/stdlib_char DEVICE=cpu bash slurm/modded/train_speedrun.sh
#   # 8 H100s, from the repo root:
#   sbatch --gres=gpu:h100:8 --cpus-per-task=64 slurm/modded/train_speedrun.sh
#   sbatch --gres=gpu:h100:1 --export=ALL,EXTRA_ARGS="--value_embeds=False" slurm/modded/train_speedrun.sh
#   SUBMIT=1 GPU_TYPE=h100 GPUS_PER_NODE=8 PARTITION=<partition> TIME=00:30:00 bash slurm/modded/train_speedrun.sh
#
# Knobs (more in slurm/common.sh: GPU_TYPE, GPUS_PER_NODE, RUN_NAME, DEVICE, REQUEUE, ...):
#   RECIPE       a recipe of modded_nanogpt/recipes (default: none, the trainer's defaults: the speedrun;
#                tiny_cpu for CPU tests)
#   DATASET_DIR  the token directory (default $DATA_DIR/fineweb10B); must exist and hold *.bin
#   RUN_DIR      the run directory (default $RUNS_DIR/<job name>-<job id>); the trainer resumes from it
#   EXTRA_ARGS   more --key=value for the trainer, e.g. "--value_embeds=False --mlp_activation=gelu"
set -euo pipefail

# shellcheck disable=SC2034  # read by common.sh: the defaults of its knobs RECIPE (empty: the trainer's own) and
# DATASET_DIR (under DATA_DIR)
DEFAULT_RECIPE='' DEFAULT_DATASET=fineweb10B

# Under sbatch this file runs from a copy in the spool directory, so its own location says nothing
# about the repo: REPO_DIR if given, else this file's repo when run with bash, else the submit dir.
[[ -n ${REPO_DIR:-} || -f $(dirname "${BASH_SOURCE[0]}")/../../slurm/common.sh ]] || REPO_DIR=${SLURM_SUBMIT_DIR:-$PWD}
# shellcheck source=../common.sh
source "${REPO_DIR:-$(dirname "${BASH_SOURCE[0]}")/../..}/slurm/common.sh" ||
  { echo "error: REPO_DIR=$REPO_DIR has no slurm/common.sh; submit from the repo root or set REPO_DIR" >&2; exit 2; }

# The speedrun's batch and schedule are laid out for 8 ranks on one node.
if ((NUM_NODES != 1)); then
  common_die "the speedrun trainer runs on one node, got NUM_NODES=$NUM_NODES; submit with --nodes=1 and 1, 2, 4 or 8 GPUs"
fi
for count in "$GPUS_PER_NODE GPUs" "$NPROC_PER_NODE processes"; do
  case ${count%% *} in
    1 | 2 | 4 | 8) ;;
    0) [[ $count == *GPUs ]] || common_die "NPROC_PER_NODE must be at least 1" ;;  # no GPU: a CPU run
    *) common_die "the speedrun trainer runs on 1, 2, 4 or 8 GPUs (processes), got $count;" \
      "submit with --gres=gpu:$GPU_TYPE:N for N in 1 2 4 8" ;;
  esac
done
[[ -f $REPO_DIR/modded_nanogpt/train_gpt.py ]] ||
  common_die "$REPO_DIR/modded_nanogpt/train_gpt.py does not exist: this checkout has no speedrun trainer"
require_token_dir DATASET_DIR \
  "python -m modded_nanogpt.data.cached_fineweb10B 9 --out $DATASET_DIR   (or: sbatch slurm/modded/prepare_fineweb.sh)" \
  "offline, for a tiny run: python -m nanogpt.data.text_corpus --out $DATASET_DIR --tokenizer char"

run_trainer modded_nanogpt.train_gpt
