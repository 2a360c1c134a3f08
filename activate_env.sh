# shellcheck shell=bash
# Activate the project's environment and export its roots. Source it from the repo root or anywhere:
#
#   . ./activate_env.sh            # safe to source twice, and under `set -euo pipefail`
#
# Knobs (values you already set are kept):
#   ENV_PATH   the environment made by setup_env.sh (default: the one it recorded in .env_path, else
#              $HOME/conda_envs/nanogpt_env): a conda env
#              (has conda-meta/) or a venv (has bin/activate)
#   CONDA_SH   conda's etc/profile.d/conda.sh, for a conda env (default: from `conda` on PATH, else
#              $HOME/miniforge3)
#   REPO_DIR   default: the directory of this file
#   DATA_DIR   datasets root (default $REPO_DIR/data)
#   RUNS_DIR   run directories root (default $REPO_DIR/runs)

_nanogpt_activate() {
  local here env_path conda_sh
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  # ENV_PATH, else the one setup_env.sh set up last (.env_path beside this file), else the default.
  env_path=${ENV_PATH:-}
  if [[ -z $env_path && -s $here/.env_path ]]; then
    env_path=$(<"$here/.env_path")
  fi
  env_path=${env_path:-$HOME/conda_envs/nanogpt_env}
  if [[ -d $env_path/conda-meta ]]; then
    conda_sh=${CONDA_SH:-}
    if [[ -z $conda_sh ]] && command -v conda >/dev/null; then
      conda_sh=$(conda info --base 2>/dev/null)/etc/profile.d/conda.sh
    fi
    conda_sh=${conda_sh:-$HOME/miniforge3/etc/profile.d/conda.sh}
    if [[ ! -f $conda_sh ]]; then
      echo "activate_env.sh: $env_path is a conda env but conda.sh was not found at CONDA_SH=$conda_sh" >&2
      return 1
    fi
    # shellcheck source=/dev/null
    source "$conda_sh" && conda activate "$env_path" || return 1
  elif [[ -f $env_path/bin/activate ]]; then
    # shellcheck source=/dev/null
    source "$env_path/bin/activate" || return 1
  else
    echo "activate_env.sh: no environment at ENV_PATH=$env_path; create it with: bash setup_env.sh" >&2
    return 1
  fi
  export ENV_PATH=$env_path
  export REPO_DIR=${REPO_DIR:-$here}
  export DATA_DIR=${DATA_DIR:-$REPO_DIR/data}
  export RUNS_DIR=${RUNS_DIR:-$REPO_DIR/runs}
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  echo "activate_env.sh must be sourced: . ./activate_env.sh" >&2
  exit 2
fi
# conda's and venv's activation scripts read unset variables: run them with nounset off, then restore it.
_nanogpt_nounset=0
[[ $- == *u* ]] && _nanogpt_nounset=1
set +u
_nanogpt_activate && _nanogpt_status=0 || _nanogpt_status=$?
[[ $_nanogpt_nounset == 1 ]] && set -u
unset -f _nanogpt_activate
unset _nanogpt_nounset
# `return` keeps the caller's shell (and its set -e) in charge of what a failure means.
return "$_nanogpt_status" 2>/dev/null || true
