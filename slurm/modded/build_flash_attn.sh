#!/bin/bash
#SBATCH --job-name=build_flash_attn
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
# Build FlashAttention into the environment (ENV_PATH) on a node of the GPU type it is for: FA2 (flash_attn)
# with `pip install --no-build-isolation` from a local checkout, an sdist or the package index, FA3
# (flash_attn_interface, Hopper: h100/h200) from the hopper/ folder of a checkout, or FA4 (flash_attn.cute,
# Hopper and Blackwell) from the package index: no compiler, its CuTe kernels compile at first use, and the
# script ends with a forward/backward of them against SDPA on this node's GPU. The modded trainer's attention
# selector takes FA3 where it loads, else FA4, else FlexAttention. The kernels are built
# for GPU_TYPE's compute capability (cuda_arch in slurm/gpus.tsv) only, with MAX_JOBS parallel compilers
# (default: the CPUs of the job); the script ends by importing the module it built.
#
#   git clone https://github.com/Dao-AILab/flash-attention /shared/src/flash-attention   # on a login node
#   sbatch --gres=gpu:h100:1 --cpus-per-task=32 --export=ALL,FLASH_ATTN_SRC=/shared/src/flash-attention slurm/modded/build_flash_attn.sh
#   sbatch --gres=gpu:a100:1 --export=ALL,FA_VERSION=2 slurm/modded/build_flash_attn.sh     # FA2 from the index
#   sbatch --gres=gpu:h100:1 --export=ALL,FA_VERSION=4 slurm/modded/build_flash_attn.sh     # FA4 from the index
#   ... FA_VERSION=4 PIP_ARGS="--no-index --find-links /shared/wheels" ...     # FA4 offline, from downloaded wheels
#   FA_VERSION=2 FLASH_ATTN_SRC=flash_attn-2.8.3.tar.gz bash slurm/modded/build_flash_attn.sh  # a workstation
#
# Knobs (more in slurm/common.sh):
#   FA_VERSION         2 | 3 | 4 (default: 3 where GPU_TYPE's cuda_arch is 9.0, else 2)
#   FLASH_ATTN_SRC     a flash-attention checkout (FA2: its root; FA3: its hopper/ is built) or, for FA2, an
#                      sdist; empty: FA2 from the package index (FLASH_ATTN_SPEC); FA3 needs a checkout
#   FLASH_ATTN_SPEC    what pip installs from the index when FLASH_ATTN_SRC is empty (FA2 default flash-attn;
#                      FA4 default: the pins of environment.yml's `# extra fa4:` line)
#   FLASH_ATTN_MODULE  the module to import at the end (default flash_attn, flash_attn_interface, flash_attn.cute)
#   MAX_JOBS           parallel compile jobs (default: the CPUs of the job, else of this machine)
#   CUDA_ARCHS         compute capabilities to build for, e.g. "8.0 9.0" (default: GPU_TYPE's cuda_arch)
#   BUILD_REQUIRES     checked before the build: Python modules, and cmd:NAME for commands (default
#                      "torch setuptools wheel packaging psutil ninja cmd:nvcc"; FA4: "torch"); empty = no check
#   PIP_ARGS           more pip options (word-split), e.g. "--no-deps" offline, "-v"
set -euo pipefail

# shellcheck disable=SC2034  # read by common.sh: no run directory; one pip process (it runs MAX_JOBS compilers)
NEEDS_RUN_DIR=0 NPROC_PER_NODE=1

# Under sbatch this file runs from a copy in the spool directory, so its own location says nothing
# about the repo: REPO_DIR if given, else this file's repo when run with bash, else the submit dir.
[[ -n ${REPO_DIR:-} || -f $(dirname "${BASH_SOURCE[0]}")/../../slurm/common.sh ]] || REPO_DIR=${SLURM_SUBMIT_DIR:-$PWD}
# shellcheck source=../common.sh
source "${REPO_DIR:-$(dirname "${BASH_SOURCE[0]}")/../..}/slurm/common.sh" ||
  { echo "error: REPO_DIR=$REPO_DIR has no slurm/common.sh; submit from the repo root or set REPO_DIR" >&2; exit 2; }

FA_VERSION=${FA_VERSION:-}            # default needs CUDA_ARCHS: set below
FLASH_ATTN_SRC=${FLASH_ATTN_SRC:-}
FLASH_ATTN_SPEC=${FLASH_ATTN_SPEC:-}
FLASH_ATTN_MODULE=${FLASH_ATTN_MODULE:-}
MAX_JOBS=${MAX_JOBS:-}
CUDA_ARCHS=${CUDA_ARCHS:-}
BUILD_REQUIRES=${BUILD_REQUIRES-default}
PIP_ARGS=${PIP_ARGS:-}

CUDA_ARCHS=${CUDA_ARCHS:-$(gpu_fact "$GPU_TYPE" cuda_arch)}
if [[ -z $FA_VERSION ]]; then
  if [[ $CUDA_ARCHS == 9.0 ]]; then FA_VERSION=3; else FA_VERSION=2; fi
fi
pip_build=(--no-build-isolation)
case $FA_VERSION in
  2) FLASH_ATTN_MODULE=${FLASH_ATTN_MODULE:-flash_attn}
     if [[ -z $FLASH_ATTN_SRC ]]; then
       target=${FLASH_ATTN_SPEC:-flash-attn}
     elif [[ -d $FLASH_ATTN_SRC || -f $FLASH_ATTN_SRC ]]; then
       target=$(realpath "$FLASH_ATTN_SRC")
     else
       common_die "FLASH_ATTN_SRC=$FLASH_ATTN_SRC is neither a checkout nor an sdist"
     fi ;;
  3) FLASH_ATTN_MODULE=${FLASH_ATTN_MODULE:-flash_attn_interface}
     [[ -n $FLASH_ATTN_SRC ]] ||
       common_die "FA_VERSION=3 builds from a checkout: set FLASH_ATTN_SRC to a clone of https://github.com/Dao-AILab/flash-attention"
     [[ -d $FLASH_ATTN_SRC/hopper ]] || common_die "FLASH_ATTN_SRC=$FLASH_ATTN_SRC has no hopper/ folder (FA3's sources)"
     target=$(realpath "$FLASH_ATTN_SRC/hopper") ;;
  4) FLASH_ATTN_MODULE=${FLASH_ATTN_MODULE:-flash_attn.cute}
     [[ -z $FLASH_ATTN_SRC ]] || common_die "FA_VERSION=4 installs wheels, not a checkout: unset FLASH_ATTN_SRC" \
       "(offline: PIP_ARGS=\"--no-index --find-links DIR\" with the wheels in DIR)"
     target=${FLASH_ATTN_SPEC:-$(sed -n 's/^# extra fa4://p' "$REPO_DIR/environment.yml")}
     [[ -n ${target// /} ]] || common_die "$REPO_DIR/environment.yml has no '# extra fa4:' line; set FLASH_ATTN_SPEC"
     [[ $BUILD_REQUIRES != default ]] || BUILD_REQUIRES=torch
     pip_build=() ;;
  *) common_die "FA_VERSION must be 2, 3 or 4, got '$FA_VERSION'" ;;
esac
[[ $BUILD_REQUIRES != default ]] || BUILD_REQUIRES="torch setuptools wheel packaging psutil ninja cmd:nvcc"
[[ $FLASH_ATTN_MODULE =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || common_die "FLASH_ATTN_MODULE must be a module name, got '$FLASH_ATTN_MODULE'"
require_cpus MAX_JOBS

missing=()
for requirement in $BUILD_REQUIRES; do
  if [[ $requirement == cmd:* ]]; then
    command -v "${requirement#cmd:}" >/dev/null || missing+=("$requirement")
  elif ! python -c "import $requirement" 2>/dev/null; then
    missing+=("$requirement")
  fi
done
((${#missing[@]} == 0)) || common_die "the build needs ${missing[*]} (BUILD_REQUIRES) in ENV_PATH=$ENV_PATH;" \
  "add the Python packages to environment.yml (or pip install them) and load a CUDA toolkit that has nvcc"

# FA2's setup.py reads FLASH_ATTN_CUDA_ARCHS ("80;90"), PyTorch's extension builder TORCH_CUDA_ARCH_LIST ("8.0 9.0").
FLASH_ATTN_CUDA_ARCHS=$(echo "$CUDA_ARCHS" | tr -d . | tr ' ' ';')
export MAX_JOBS FLASH_ATTN_CUDA_ARCHS TORCH_CUDA_ARCH_LIST=$CUDA_ARCHS
echo "build: FlashAttention $FA_VERSION from $target for compute capability $CUDA_ARCHS with MAX_JOBS=$MAX_JOBS"
read -ra pip_args <<<"$PIP_ARGS"
read -ra targets <<<"$target"
launch pip install "${pip_build[@]}" "${pip_args[@]}" "${targets[@]}"

python -c '
import importlib, sys
module = importlib.import_module(sys.argv[1])
version = getattr(module, "__version__", None)
print(f"built: import {sys.argv[1]} works (version {version}, {module.__file__})")
' "$FLASH_ATTN_MODULE" || common_die "the build finished but 'import $FLASH_ATTN_MODULE' fails (see above)"
if [[ $FA_VERSION == 4 ]]; then
  # The kernels on this node's GPU: a forward and backward against SDPA (the first call compiles them).
  (cd "$REPO_DIR" && python -m modded_nanogpt.attention_check --backend=fa4) ||
    common_die "flash_attn.cute imports but its kernels failed the check above"
fi
