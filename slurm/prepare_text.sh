#!/bin/bash
#SBATCH --job-name=prepare_text
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=01:00:00
#SBATCH --output=%x-%j.out
# The offline corpus: any directory of text files (default: this Python's standard library) -> token shards
# (nanogpt.data.text_corpus), read by both trainers. Needs no network and no GPU.
#
#   bash slurm/prepare_text.sh                                          # stdlib, characters -> $DATA_DIR/stdlib_char
#   SOURCE=~/papers TOKENIZER=bpe VOCAB_SIZE=8192 bash slurm/prepare_text.sh   # -> $DATA_DIR/text_bpe
#   sbatch --export=ALL,SOURCE=/shared/texts,TOKENIZER=gpt2 slurm/prepare_text.sh
#
# Knobs (more in slurm/common.sh):
#   SOURCE      the directory of text files (default: the standard library of the environment's Python)
#   TOKENIZER   char (default) | bpe (trained on the corpus) | gpt2 (needs GPT-2's tokenizer files) | auto
#   VOCAB_SIZE  bpe only: the vocabulary size (default: the preparer's, 4096)
#   OUT_DIR     the output folder (default $DATA_DIR/stdlib_<TOKENIZER>, or $DATA_DIR/text_<TOKENIZER> with SOURCE)
#   EXTRA_ARGS  more options for the preparer, e.g. "--val_fraction 0.05 --max_files 500"
set -euo pipefail

# shellcheck disable=SC2034  # read by common.sh: no run directory; one process, also on a GPU node
NEEDS_RUN_DIR=0 NPROC_PER_NODE=1

# Under sbatch this file runs from a copy in the spool directory, so its own location says nothing
# about the repo: REPO_DIR if given, else this file's repo when run with bash, else the submit dir.
[[ -n ${REPO_DIR:-} || -f $(dirname "${BASH_SOURCE[0]}")/../slurm/common.sh ]] || REPO_DIR=${SLURM_SUBMIT_DIR:-$PWD}
# shellcheck source=common.sh
source "${REPO_DIR:-$(dirname "${BASH_SOURCE[0]}")/..}/slurm/common.sh" ||
  { echo "error: REPO_DIR=$REPO_DIR has no slurm/common.sh; submit from the repo root or set REPO_DIR" >&2; exit 2; }

SOURCE=${SOURCE:-}
TOKENIZER=${TOKENIZER:-char}
VOCAB_SIZE=${VOCAB_SIZE:-}
OUT_DIR=${OUT_DIR:-}                  # default needs the checked TOKENIZER (and SOURCE): set below

case $TOKENIZER in
  char | bpe | gpt2 | auto) ;;
  *) common_die "TOKENIZER must be char, bpe, gpt2 or auto, got '$TOKENIZER'" ;;
esac
[[ -z $SOURCE || -d $SOURCE ]] || common_die "SOURCE=$SOURCE is not a directory"
if [[ -z $OUT_DIR ]]; then
  if [[ -z $SOURCE ]]; then OUT_DIR=$DATA_DIR/stdlib_$TOKENIZER; else OUT_DIR=$DATA_DIR/text_$TOKENIZER; fi
fi

args=(--out "$OUT_DIR" --tokenizer "$TOKENIZER")
[[ -z $SOURCE ]] || args+=(--source "$SOURCE")
if [[ -n $VOCAB_SIZE ]]; then
  require_int VOCAB_SIZE 1
  args+=(--vocab_size "$VOCAB_SIZE")
fi
prepare_data nanogpt.data.text_corpus "${args[@]}"
