#!/bin/bash
#SBATCH --job-name=prepare_shakespeare
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:30:00
#SBATCH --output=%x-%j.out
# Tiny Shakespeare for the baseline trainer: characters (nanogpt.data.shakespeare_char: train.bin, val.bin,
# meta.pkl) or GPT-2 tokens (nanogpt.data.shakespeare). Downloads input.txt unless INPUT names a local file.
# Needs no GPU; runs on a login node as well (bash slurm/nanogpt/prepare_shakespeare.sh).
#
#   bash slurm/nanogpt/prepare_shakespeare.sh                          # -> $DATA_DIR/shakespeare_char
#   TOKENIZER=gpt2 bash slurm/nanogpt/prepare_shakespeare.sh           # -> $DATA_DIR/shakespeare
#   sbatch slurm/nanogpt/prepare_shakespeare.sh                        # from the repo root
#   sbatch --export=ALL,INPUT=/shared/texts/input.txt slurm/nanogpt/prepare_shakespeare.sh
#
# Knobs (more in slurm/common.sh):
#   TOKENIZER  char (default) | gpt2 (needs GPT-2's tokenizer files: tiktoken's cache or NANOGPT_GPT2_TOKENIZER_DIR)
#   OUT_DIR    the output folder (default $DATA_DIR/shakespeare_char, or $DATA_DIR/shakespeare for gpt2)
#   INPUT      a local UTF-8 text file to use instead of downloading
#   URL        where to download input.txt from (default: the preparer's, char-rnn's tinyshakespeare)
#   EXTRA_ARGS more options for the preparer, e.g. "--val_fraction 0.05"
set -euo pipefail

# shellcheck disable=SC2034  # read by common.sh: no run directory; one process, also on a GPU node
NEEDS_RUN_DIR=0 NPROC_PER_NODE=1

# Under sbatch this file runs from a copy in the spool directory, so its own location says nothing
# about the repo: REPO_DIR if given, else this file's repo when run with bash, else the submit dir.
[[ -n ${REPO_DIR:-} || -f $(dirname "${BASH_SOURCE[0]}")/../../slurm/common.sh ]] || REPO_DIR=${SLURM_SUBMIT_DIR:-$PWD}
# shellcheck source=../common.sh
source "${REPO_DIR:-$(dirname "${BASH_SOURCE[0]}")/../..}/slurm/common.sh" ||
  { echo "error: REPO_DIR=$REPO_DIR has no slurm/common.sh; submit from the repo root or set REPO_DIR" >&2; exit 2; }

TOKENIZER=${TOKENIZER:-char}
OUT_DIR=${OUT_DIR:-}                  # default needs the checked TOKENIZER: set below
INPUT=${INPUT:-}
URL=${URL:-}

case $TOKENIZER in
  char) module=nanogpt.data.shakespeare_char ;;
  gpt2) module=nanogpt.data.shakespeare ;;
  *) common_die "TOKENIZER must be char or gpt2, got '$TOKENIZER'" ;;
esac
OUT_DIR=${OUT_DIR:-$DATA_DIR/${module##*.}}
[[ -z $INPUT || -f $INPUT ]] || common_die "INPUT=$INPUT is not a file"
[[ -z $INPUT || -z $URL ]] || common_die "give INPUT or URL, not both"

args=(--out "$OUT_DIR")
[[ -z $INPUT ]] || args+=(--input "$INPUT")
[[ -z $URL ]] || args+=(--url "$URL")
prepare_data "$module" "${args[@]}"
