#!/bin/bash
#SBATCH --job-name=train_gpt2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
# The baseline trainer (nanogpt.train) on GPT-2 124M: by default the llm.c-style FineWeb10B baseline that the
# speedrun is compared against (recipe train_gpt2_fineweb), or nanoGPT's OpenWebText run (RECIPE=train_gpt2).
# Any number of GPUs and nodes: the GPU request comes from the command line; the micro-batch per GPU from
# slurm/gpus.tsv (micro_batch_124m of GPU_TYPE), and gradient accumulation from the recipe's total batch.
# 120 s before the time limit the trainer checkpoints and the job requeues itself and resumes (RUN_DIR).
#
#   # data (once): sbatch slurm/modded/prepare_fineweb.sh   (or: python -m slurm.submit prep fineweb)
#   # tiny CPU run, no Slurm:
#   RECIPE=tiny_cpu DATASET_DIR=data/stdlib_char DEVICE=cpu bash slurm/nanogpt/train_gpt2.sh
#   # 8 GPUs of one node / 2 nodes of 8, from the repo root (add --cpus-per-task=8 per GPU):
#   sbatch --gres=gpu:h100:8 --cpus-per-task=64 slurm/nanogpt/train_gpt2.sh
#   sbatch --nodes=2 --gres=gpu:h100:8 --cpus-per-task=64 --export=ALL,MICRO_BATCH=32 slurm/nanogpt/train_gpt2.sh
#   # nanoGPT's GPT-2 on OpenWebText (data: sbatch slurm/nanogpt/prepare_openwebtext.sh):
#   sbatch --gres=gpu:a100:8 --cpus-per-task=64 --export=ALL,RECIPE=train_gpt2,DATASET_DIR=data/openwebtext slurm/nanogpt/train_gpt2.sh
#   # let the knobs build the sbatch options:
#   SUBMIT=1 GPU_TYPE=h100 GPUS_PER_NODE=8 PARTITION=<partition> TIME=02:00:00 bash slurm/nanogpt/train_gpt2.sh
#
# Knobs (more in slurm/common.sh: GPU_TYPE, NUM_NODES, GPUS_PER_NODE, RUN_NAME, DEVICE, REQUEUE, ...):
#   RECIPE       a recipe of nanogpt/recipes (default train_gpt2_fineweb) or a path to a .toml
#   DATASET_DIR  the token directory (default $DATA_DIR/fineweb10B); must exist and hold *.bin
#   MICRO_BATCH  sequences per GPU per micro-step (default on CUDA: micro_batch_124m of GPU_TYPE in
#                slurm/gpus.tsv; on CPU: the recipe's). With 16+ GPUs at 524,288 tokens/step use 32 or less.
#   RUN_DIR      the run directory (default $RUNS_DIR/<job name>-<job id>); the trainer resumes from it
#   EXTRA_ARGS   more --key=value for nanogpt.train (they win over MICRO_BATCH), e.g. "--max_iters=100"
set -euo pipefail

# shellcheck disable=SC2034  # read by common.sh: the defaults of its knobs RECIPE and DATASET_DIR (under DATA_DIR)
DEFAULT_RECIPE=train_gpt2_fineweb DEFAULT_DATASET=fineweb10B

# Under sbatch this file runs from a copy in the spool directory, so its own location says nothing
# about the repo: REPO_DIR if given, else this file's repo when run with bash, else the submit dir.
[[ -n ${REPO_DIR:-} || -f $(dirname "${BASH_SOURCE[0]}")/../../slurm/common.sh ]] || REPO_DIR=${SLURM_SUBMIT_DIR:-$PWD}
# shellcheck source=../common.sh
source "${REPO_DIR:-$(dirname "${BASH_SOURCE[0]}")/../..}/slurm/common.sh" ||
  { echo "error: REPO_DIR=$REPO_DIR has no slurm/common.sh; submit from the repo root or set REPO_DIR" >&2; exit 2; }

MICRO_BATCH=${MICRO_BATCH:-}          # default needs GPU_TYPE and DEVICE: set below

require_token_dir DATASET_DIR \
  "python -m modded_nanogpt.data.cached_fineweb10B 9 --out $DATASET_DIR   (or: sbatch slurm/modded/prepare_fineweb.sh)" \
  "for OpenWebText: python -m nanogpt.data.openwebtext --out $DATASET_DIR (or: sbatch slurm/nanogpt/prepare_openwebtext.sh)"

if [[ -z $MICRO_BATCH && $DEVICE == cuda ]]; then
  MICRO_BATCH=$(gpu_fact "$GPU_TYPE" micro_batch_124m)
fi
[[ -z $MICRO_BATCH ]] || require_int MICRO_BATCH 1
run_trainer nanogpt.train ${MICRO_BATCH:+--batch_size="$MICRO_BATCH"}
