#!/bin/bash
#SBATCH --job-name=train_shakespeare
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=01:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
# The baseline trainer on character-level Shakespeare (or any token directory), through the shared
# prologue slurm/common.sh. The GPU request comes from the command line, never from this file.
# The job log goes to the submit directory (--output=%x-%j.out), not to a node-local /tmp. 120 s before the
# time limit (or on `scancel --signal=USR1 [--batch] JOBID`) the trainer checkpoints and the job requeues
# itself; it resumes from the same RUN_DIR, and the log continues (--open-mode=append).
#
#   # data (once): python -m nanogpt.data.shakespeare_char   (offline: nanogpt.data.text_corpus --tokenizer char)
#   # tiny CPU run, no Slurm (any machine):
#   RECIPE=tiny_cpu DATASET_DIR=data/stdlib_char bash slurm/nanogpt/train_shakespeare.sh
#   # 1 GPU, no Slurm:
#   CUDA_VISIBLE_DEVICES=0 bash slurm/nanogpt/train_shakespeare.sh
#   # torchrun, one process per visible GPU of this machine:
#   bash slurm/nanogpt/train_shakespeare.sh
#   # sbatch, from the repo root (the job finds the repo from the submit directory):
#   sbatch --gres=gpu:h100:1 slurm/nanogpt/train_shakespeare.sh
#   sbatch --gres=gpu:h100:8 --cpus-per-task=64 --export=ALL,EXTRA_ARGS="--max_iters=2000" slurm/nanogpt/train_shakespeare.sh
#   # let the knobs build the sbatch options (GPU type/count, partition, account, QOS, time):
#   SUBMIT=1 GPU_TYPE=a100 GPUS_PER_NODE=4 PARTITION=<partition> TIME=00:30:00 bash slurm/nanogpt/train_shakespeare.sh
#
# Knobs (more in slurm/common.sh: GPU_TYPE, NUM_NODES, GPUS_PER_NODE, RUN_NAME, DEVICE, ...):
#   RECIPE       a recipe of nanogpt/recipes (default train_shakespeare_char) or a path to a .toml
#   DATASET_DIR  the token directory (default $DATA_DIR/shakespeare_char); must exist and hold *.bin
#   RUN_DIR      the run directory (default $RUNS_DIR/<job name>-<job id>); the trainer resumes from it
#   DEVICE       auto | cuda | cpu (default auto: cuda where nvidia-smi lists a GPU)
#   EXTRA_ARGS   more --key=value for nanogpt.train, e.g. "--max_iters=100 --compile=False"
set -euo pipefail

# shellcheck disable=SC2034  # read by common.sh: the defaults of its knobs RECIPE and DATASET_DIR (under DATA_DIR)
DEFAULT_RECIPE=train_shakespeare_char DEFAULT_DATASET=shakespeare_char

# Under sbatch this file runs from a copy in the spool directory, so its own location says nothing
# about the repo: REPO_DIR if given, else this file's repo when run with bash, else the submit dir.
[[ -n ${REPO_DIR:-} || -f $(dirname "${BASH_SOURCE[0]}")/../../slurm/common.sh ]] || REPO_DIR=${SLURM_SUBMIT_DIR:-$PWD}
# shellcheck source=../common.sh
source "${REPO_DIR:-$(dirname "${BASH_SOURCE[0]}")/../..}/slurm/common.sh" ||
  { echo "error: REPO_DIR=$REPO_DIR has no slurm/common.sh; submit from the repo root or set REPO_DIR" >&2; exit 2; }

require_token_dir DATASET_DIR \
  "python -m nanogpt.data.shakespeare_char --out $DATASET_DIR     (downloads Tiny Shakespeare), or offline:" \
  "python -m nanogpt.data.text_corpus --source DIR_OF_TEXT_FILES --out $DATASET_DIR --tokenizer char"

run_trainer nanogpt.train
