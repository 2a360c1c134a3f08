#!/usr/bin/env bash
# The speedrun on one node: torchrun over NUM_GPUS GPUs (1, 2, 4 or 8; grad accumulation = 8 / NUM_GPUS).
#   NUM_GPUS=8 bash modded_nanogpt/run.sh                       # the record configuration
#   NUM_GPUS=1 bash modded_nanogpt/run.sh --seed=2 --fp8=False  # any --key=value of Hyperparameters
# Data: $DATA_PATH/fineweb10B or $DATA_DIR/fineweb10B (python -m modded_nanogpt.data.cached_fineweb10B 9),
# or --data_dir=DIR. Runs land in $RUNS_DIR (default runs/) unless --run_dir=DIR; the same run_dir resumes.
set -euo pipefail
NUM_GPUS=${NUM_GPUS:-8}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case "$NUM_GPUS" in
  1|2|4|8) ;;
  *) echo "error: NUM_GPUS must be 1, 2, 4 or 8 (got '$NUM_GPUS'): the speedrun keeps 8 micro-steps per step" >&2; exit 2 ;;
esac
exec torchrun --standalone --nproc_per_node="$NUM_GPUS" -m modded_nanogpt.train_gpt "$@"
