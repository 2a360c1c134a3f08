#!/bin/bash
#SBATCH --job-name=prepare_fineweb
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
# The speedrun's data: FineWeb10B as cached GPT-2 token shards (HF dataset kjj0/fineweb10B-gpt2, 100M tokens
# each), downloaded by modded_nanogpt.data.cached_fineweb10B into $DATA_DIR/fineweb10B. Both trainers read
# them (nanogpt's train_gpt2_fineweb recipe too). Safe to rerun: valid shards are kept. Needs network to the
# Hub (or HF_ENDPOINT pointing at a mirror) and no GPU.
#
#   bash slurm/modded/prepare_fineweb.sh                        # val + 9 train shards (~2 GB), the speedrun's
#   FINEWEB_CHUNKS=103 sbatch slurm/modded/prepare_fineweb.sh   # all of FineWeb10B (~21 GB), from the repo root
#   sbatch --export=ALL,HF_ENDPOINT=https://my-mirror slurm/modded/prepare_fineweb.sh
#
# Knobs (more in slurm/common.sh):
#   FINEWEB_CHUNKS  train shards to fetch, 1..103 (default 9)
#   OUT_DIR         the output folder (default $DATA_DIR/fineweb10B)
#   HF_ENDPOINT     a Hub mirror (read by huggingface-hub)
#   EXTRA_ARGS      more options for the downloader, e.g. "--revision main"
set -euo pipefail

# shellcheck disable=SC2034  # read by common.sh: no run directory; one process, also on a GPU node
NEEDS_RUN_DIR=0 NPROC_PER_NODE=1

# Under sbatch this file runs from a copy in the spool directory, so its own location says nothing
# about the repo: REPO_DIR if given, else this file's repo when run with bash, else the submit dir.
[[ -n ${REPO_DIR:-} || -f $(dirname "${BASH_SOURCE[0]}")/../../slurm/common.sh ]] || REPO_DIR=${SLURM_SUBMIT_DIR:-$PWD}
# shellcheck source=../common.sh
source "${REPO_DIR:-$(dirname "${BASH_SOURCE[0]}")/../..}/slurm/common.sh" ||
  { echo "error: REPO_DIR=$REPO_DIR has no slurm/common.sh; submit from the repo root or set REPO_DIR" >&2; exit 2; }

FINEWEB_CHUNKS=${FINEWEB_CHUNKS:-9}
OUT_DIR=${OUT_DIR:-$DATA_DIR/fineweb10B}

require_int FINEWEB_CHUNKS 1
echo "hub: ${HF_ENDPOINT:-https://huggingface.co (default; set HF_ENDPOINT for a mirror)}"
prepare_data modded_nanogpt.data.cached_fineweb10B "$FINEWEB_CHUNKS" --out "$OUT_DIR"
