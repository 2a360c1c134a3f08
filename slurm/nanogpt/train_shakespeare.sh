#!/bin/bash
#SBATCH --job-name=train_shakespeare
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=01:00:00
#SBATCH --output=%x-%j.out
# The baseline trainer on character-level Shakespeare (or any token directory), through the shared
# prologue slurm/common.sh. The GPU request comes from the command line, never from this file.
# The job log goes to the submit directory (--output=%x-%j.out), not to a node-local /tmp.
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

RECIPE=${RECIPE:-train_shakespeare_char}
DATASET_DIR=${DATASET_DIR:-}          # default needs DATA_DIR, known only after common.sh: set below

# Under sbatch this file runs from a copy in the spool directory, so its own location says nothing
# about the repo: REPO_DIR if given, else this file's repo when run with bash, else the submit dir.
if [[ -z ${REPO_DIR:-} ]]; then
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  if [[ -f $here/slurm/common.sh ]]; then REPO_DIR=$here; else REPO_DIR=${SLURM_SUBMIT_DIR:-$PWD}; fi
fi
if [[ ! -f $REPO_DIR/slurm/common.sh ]]; then
  echo "error: REPO_DIR=$REPO_DIR has no slurm/common.sh; submit from the repo root or set REPO_DIR" >&2
  exit 2
fi
# shellcheck source=../common.sh
source "$REPO_DIR/slurm/common.sh"

DATASET_DIR=${DATASET_DIR:-$DATA_DIR/shakespeare_char}
if [[ ! -d $DATASET_DIR ]]; then
  echo "error: DATASET_DIR=$DATASET_DIR does not exist (DATA_DIR=$DATA_DIR). Prepare it first:" >&2
  echo "  python -m nanogpt.data.shakespeare_char --out $DATASET_DIR     (downloads Tiny Shakespeare), or offline:" >&2
  echo "  python -m nanogpt.data.text_corpus --source DIR_OF_TEXT_FILES --out $DATASET_DIR --tokenizer char" >&2
  exit 2
fi
if ! compgen -G "$DATASET_DIR/*.bin" >/dev/null; then
  echo "error: DATASET_DIR=$DATASET_DIR holds no token files (*.bin); prepare it first" >&2
  exit 2
fi

if [[ -n $GRAD_ACC_STEPS ]]; then
  # nanogpt.train derives accumulation from its total batch, so a step count would be silently ignored.
  echo "error: GRAD_ACC_STEPS=$GRAD_ACC_STEPS: nanogpt.train derives gradient accumulation from" \
    "--total_batch_size (tokens per optimizer step); set EXTRA_ARGS=--total_batch_size=N instead" >&2
  exit 2
fi

train_args=("$RECIPE" --data_dir="$DATASET_DIR" --run_dir="$RUN_DIR" --device="$DEVICE")
read -ra extra_args <<<"$EXTRA_ARGS"
launch nanogpt.train "${train_args[@]}" "${extra_args[@]}"
