#!/bin/bash
#SBATCH --job-name=prepare_openwebtext
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
# OpenWebText (or any text dataset) with GPT-2's tokenizer for the baseline trainer (nanogpt.data.openwebtext:
# train.bin, val.bin). The full set takes hours and ~80 GB of HF cache: point HF_HOME (or CACHE_DIR) at a
# big shared disk. Needs no GPU. GPT-2's tokenizer files must be at hand on the node (tiktoken's cache,
# TIKTOKEN_CACHE_DIR, or NANOGPT_GPT2_TOKENIZER_DIR).
#
#   sbatch slurm/nanogpt/prepare_openwebtext.sh                                  # HF hub -> $DATA_DIR/openwebtext
#   sbatch --cpus-per-task=32 --export=ALL,HF_HOME=/shared/hf slurm/nanogpt/prepare_openwebtext.sh
#   DATA_FILES='/shared/owt/*.jsonl' bash slurm/nanogpt/prepare_openwebtext.sh    # local files, no hub
#
# Knobs (more in slurm/common.sh):
#   OUT_DIR     the output folder (default $DATA_DIR/openwebtext)
#   NUM_PROC    processes for loading and tokenizing (default: the CPUs of the job, else of this machine)
#   DATASET     HF hub dataset name or local folder (default: the preparer's, openwebtext)
#   DATA_FILES  local data files or globs (word-split; quote globs), read with the builder of their suffix
#   CACHE_DIR   HF datasets cache (default: HF_HOME's)
#   EXTRA_ARGS  more options for the preparer, e.g. "--revision refs/convert/parquet"
set -euo pipefail

# shellcheck disable=SC2034  # read by common.sh: no run directory; one launcher process (it starts NUM_PROC workers itself)
NEEDS_RUN_DIR=0 NPROC_PER_NODE=1

# Under sbatch this file runs from a copy in the spool directory, so its own location says nothing
# about the repo: REPO_DIR if given, else this file's repo when run with bash, else the submit dir.
[[ -n ${REPO_DIR:-} || -f $(dirname "${BASH_SOURCE[0]}")/../../slurm/common.sh ]] || REPO_DIR=${SLURM_SUBMIT_DIR:-$PWD}
# shellcheck source=../common.sh
source "${REPO_DIR:-$(dirname "${BASH_SOURCE[0]}")/../..}/slurm/common.sh" ||
  { echo "error: REPO_DIR=$REPO_DIR has no slurm/common.sh; submit from the repo root or set REPO_DIR" >&2; exit 2; }

OUT_DIR=${OUT_DIR:-$DATA_DIR/openwebtext}
NUM_PROC=${NUM_PROC:-}
DATASET=${DATASET:-}
DATA_FILES=${DATA_FILES:-}
CACHE_DIR=${CACHE_DIR:-}

require_cpus NUM_PROC

args=(--out "$OUT_DIR" --num_proc "$NUM_PROC")
[[ -z $DATASET ]] || args+=(--dataset "$DATASET")
[[ -z $CACHE_DIR ]] || args+=(--cache_dir "$CACHE_DIR")
if [[ -n $DATA_FILES ]]; then
  read -ra patterns <<<"$DATA_FILES"   # the preparer expands the globs and names a pattern that matches nothing
  args+=(--data_files "${patterns[@]}")
fi
prepare_data nanogpt.data.openwebtext "${args[@]}"
