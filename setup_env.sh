#!/bin/bash
# One-time bootstrap of the project's Python environment; idempotent (a second run changes nothing and
# takes seconds). Then: `. ./activate_env.sh`.
#
#   bash setup_env.sh                                   # conda env if there is a conda, else a venv
#   ENV_PATH=/scratch/$USER/nanogpt_env bash setup_env.sh
#   ENV_BACKEND=venv bash setup_env.sh                  # never conda
#   TORCH_INDEX_URL=<PyTorch's CPU wheel index> bash setup_env.sh   # CPU build on a GPU-less machine
#   ATTENTION=fa4 bash setup_env.sh                     # + FlashAttention 4 (Hopper/Blackwell GPU nodes)
#
# What it does:
#   1. reads python's version and the pip pins from environment.yml (the one list of versions);
#   2. picks the backend: the kind of an existing ENV_PATH (conda env or venv) if there is one; else
#      conda (CONDA_SH, `conda` on PATH, or MINIFORGE_DIR); else it installs Miniforge into MINIFORGE_DIR
#      if the download works (it fails fast without network); else a venv from PYTHON, and says so;
#   3. installs torch (TORCH_SPEC, from TORCH_INDEX_URL if given, falling back to the default index if
#      that cannot be reached), then the other pins; skipped when the stamp in ENV_PATH says this
#      environment.yml + TORCH_SPEC + TORCH_INDEX_URL is already installed and every pin is present;
#   4. after an install, prints the frozen package list (also kept in ENV_PATH/pip_freeze.txt);
#   5. remembers ENV_PATH in .env_path beside this script, so later runs, activate_env.sh and the Makefile
#      use the same environment without ENV_PATH exported in every shell.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ENV_PATH_FILE=$HERE/.env_path                         # the environment this script set up last (not tracked)
CONDA_SH=${CONDA_SH:-}                                # conda's etc/profile.d/conda.sh; empty = find it
ENV_PATH=${ENV_PATH:-$( [[ -s $ENV_PATH_FILE ]] && cat "$ENV_PATH_FILE" || echo "$HOME/conda_envs/nanogpt_env")}  # where the environment lives
ENV_BACKEND=${ENV_BACKEND:-auto}                      # auto | conda | venv
PYTHON=${PYTHON:-python3}                             # the interpreter a venv is made from
TORCH_SPEC=${TORCH_SPEC:-}                            # what pip installs for torch; default: environment.yml's pin
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}                  # wheel index for torch only (a CPU or other-CUDA build); empty = default index
MINIFORGE_DIR=${MINIFORGE_DIR:-$HOME/miniforge3}      # where Miniforge is installed when there is no conda
MINIFORGE_URL=${MINIFORGE_URL:-https://github.com/conda-forge/miniforge/releases/latest/download/Miniforge3-$(uname)-$(uname -m).sh}
CONNECT_TIMEOUT_S=${CONNECT_TIMEOUT_S:-10}            # give up on an unreachable download host this fast
FORCE=${FORCE:-0}                                     # 1 = run pip even when the stamp says nothing changed
ATTENTION=${ATTENTION:-}                              # an optional extra of environment.yml: fa4 (FlashAttention 4's kernels)

ENV_YML=$HERE/environment.yml
STAMP_NAME=.nanogpt_setup_stamp

say() { echo "setup_env.sh: $*"; }
die() { echo "setup_env.sh: error: $*" >&2; exit 1; }

[[ $ENV_BACKEND =~ ^(auto|conda|venv)$ ]] || die "ENV_BACKEND must be auto, conda or venv, got '$ENV_BACKEND'"
[[ $FORCE == 0 || $FORCE == 1 ]] || die "FORCE must be 0 or 1, got '$FORCE'"
[[ -n $ENV_PATH && $ENV_PATH != / ]] || die "ENV_PATH must name a directory, got '$ENV_PATH'"
[[ -f $ENV_YML ]] || die "$ENV_YML not found"

# ---- environment.yml --------------------------------------------------------------------------------
# The pip pins: the items indented under `- pip:`, without comments.
read_pip_pins() {
  awk '
    /^[[:space:]]*#/ { next }
    match($0, /^[[:space:]]*- pip:[[:space:]]*$/) { pip_indent = index($0, "-"); in_pip = 1; next }
    in_pip {
      if (index($0, "-") > pip_indent && $0 ~ /^[[:space:]]+- /) {
        sub(/^[[:space:]]+- /, ""); sub(/[[:space:]]+#.*$/, ""); print; next
      }
      if ($0 !~ /^[[:space:]]*$/) in_pip = 0
    }' "$ENV_YML"
}
PYTHON_PIN=$(sed -n 's/^[[:space:]]*- python=\([0-9.]*\)[[:space:]]*$/\1/p' "$ENV_YML")
[[ -n $PYTHON_PIN ]] || die "$ENV_YML has no '- python=X.Y' dependency"
mapfile -t ALL_PINS < <(read_pip_pins)
[[ ${#ALL_PINS[@]} -gt 0 ]] || die "$ENV_YML has no pins under '- pip:'"
OTHER_PINS=()
YML_TORCH_PIN=""
for pin in "${ALL_PINS[@]}"; do
  [[ $pin =~ ^[A-Za-z0-9._-]+==[^[:space:]]+$ ]] || die "$ENV_YML: pip pin '$pin' is not NAME==VERSION"
  if [[ ${pin%%==*} == torch ]]; then YML_TORCH_PIN=$pin; else OTHER_PINS+=("$pin"); fi
done
[[ -n $YML_TORCH_PIN ]] || die "$ENV_YML: no torch==VERSION pin under '- pip:'"
TORCH_SPEC=${TORCH_SPEC:-$YML_TORCH_PIN}
# An optional extra: the pins of a `# extra NAME: PIN PIN ...` line of environment.yml (comments, so conda ignores them).
if [[ -n $ATTENTION ]]; then
  extras=$(sed -n 's/^# extra \([a-z0-9_-]*\):.*/\1/p' "$ENV_YML" | paste -sd' ')
  extra_line=$(grep -E "^# extra ${ATTENTION//[^a-z0-9_-]/_}:" "$ENV_YML" || true)
  [[ -n $extra_line ]] || die "ATTENTION=$ATTENTION is not an extra of environment.yml (extras: ${extras:-none})"
  read -ra extra_pins <<<"${extra_line#*:}"
  for pin in "${extra_pins[@]}"; do
    [[ $pin =~ ^[A-Za-z0-9._-]+==[^[:space:]]+$ ]] || die "$ENV_YML: extra $ATTENTION pin '$pin' is not NAME==VERSION"
    OTHER_PINS+=("$pin")
  done
fi

# ---- backend ----------------------------------------------------------------------------------------
find_conda_sh() {  # prints conda.sh or nothing
  if [[ -n $CONDA_SH ]]; then
    [[ -f $CONDA_SH ]] || die "CONDA_SH=$CONDA_SH does not exist"
    echo "$CONDA_SH"
  elif command -v conda >/dev/null && [[ -f $(conda info --base 2>/dev/null)/etc/profile.d/conda.sh ]]; then
    echo "$(conda info --base)/etc/profile.d/conda.sh"
  elif [[ -f $MINIFORGE_DIR/etc/profile.d/conda.sh ]]; then
    echo "$MINIFORGE_DIR/etc/profile.d/conda.sh"
  fi
}

install_miniforge() {  # installs Miniforge into MINIFORGE_DIR; status 1 (with the reason) if it cannot
  command -v curl >/dev/null || { say "no curl: cannot download Miniforge"; return 1; }
  local installer
  installer=$(mktemp --suffix=.sh)
  say "no conda found: downloading Miniforge ($MINIFORGE_URL)"
  if ! curl -fsSL --connect-timeout "$CONNECT_TIMEOUT_S" --max-time 900 -o "$installer" "$MINIFORGE_URL"; then
    rm -f "$installer"
    say "Miniforge download failed (no network to it?)"
    return 1
  fi
  bash "$installer" -b -p "$MINIFORGE_DIR" || { rm -f "$installer"; die "the Miniforge installer failed"; }
  rm -f "$installer"
}

choose_backend() {
  local existing=""
  if [[ -d $ENV_PATH/conda-meta ]]; then existing=conda
  elif [[ -x $ENV_PATH/bin/python && -f $ENV_PATH/bin/activate ]]; then existing=venv
  elif [[ -e $ENV_PATH && -n $(ls -A "$ENV_PATH") ]]; then
    die "ENV_PATH=$ENV_PATH exists but is neither a conda env nor a venv; remove it or pick another ENV_PATH"
  fi
  if [[ -n $existing ]]; then
    [[ $ENV_BACKEND == auto || $ENV_BACKEND == "$existing" ]] ||
      die "ENV_PATH=$ENV_PATH is a $existing but ENV_BACKEND=$ENV_BACKEND; remove it or pick another ENV_PATH"
    BACKEND=$existing   # pip runs through the env's own python: no conda needed for an existing env
    say "using the existing $existing at $ENV_PATH"
    return
  fi
  if [[ $ENV_BACKEND != venv ]]; then
    CONDA_SH=$(find_conda_sh)
    if [[ -z $CONDA_SH ]] && install_miniforge; then CONDA_SH=$MINIFORGE_DIR/etc/profile.d/conda.sh; fi
    if [[ -n $CONDA_SH ]]; then BACKEND=conda; return; fi
    [[ $ENV_BACKEND == auto ]] || die "ENV_BACKEND=conda but there is no conda and Miniforge could not be installed"
    say "falling back to a venv made by $PYTHON (no conda, no Miniforge)"
  fi
  BACKEND=venv
}

create_conda_env() {
  # conda makes python (and any other non-pip dependency); pip then installs the pins, so a conda env
  # and a venv get the very same packages.
  local conda_only
  conda_only=$(mktemp --suffix=.yml)
  awk '/^[[:space:]]*- pip:/ { exit } { print }' "$ENV_YML" >"$conda_only"
  # shellcheck source=/dev/null
  source "$CONDA_SH"
  say "creating conda env $ENV_PATH (python=$PYTHON_PIN)"
  conda env create -y -p "$ENV_PATH" -f "$conda_only" || { rm -f "$conda_only"; die "conda env create failed"; }
  rm -f "$conda_only"
}

create_venv() {
  command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found; install python$PYTHON_PIN or set PYTHON"
  local version
  version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [[ $version == "$PYTHON_PIN" ]] ||
    die "PYTHON=$PYTHON is Python $version but environment.yml pins python=$PYTHON_PIN; set PYTHON to a python$PYTHON_PIN"
  say "creating venv $ENV_PATH with $PYTHON ($version)"
  mkdir -p "$(dirname "$ENV_PATH")"
  local errors
  errors=$(mktemp)
  if "$PYTHON" -m venv "$ENV_PATH" 2>"$errors"; then rm -f "$errors"; return 0; fi
  rm -rf "$ENV_PATH"
  # Debian ships ensurepip separately; as root, install it rather than send the user off to do it.
  if grep -q ensurepip "$errors" && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    rm -f "$errors"
    say "installing Debian's python3-venv (ensurepip is missing)"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv </dev/null
    "$PYTHON" -m venv "$ENV_PATH" || die "$PYTHON -m venv failed even after installing python3-venv"
  else
    cat "$errors" >&2
    rm -f "$errors"
    die "$PYTHON -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
  fi
}

check_env_python() {
  local version
  version=$("$(env_python)" -c 'import sys; print("%d.%d" % sys.version_info[:2])') ||
    die "the python of ENV_PATH=$ENV_PATH does not run; remove $ENV_PATH and run again"
  [[ $version == "$PYTHON_PIN" ]] ||
    die "ENV_PATH=$ENV_PATH has Python $version but environment.yml pins python=$PYTHON_PIN; remove it or pick another ENV_PATH"
}

# ---- packages ---------------------------------------------------------------------------------------
env_python() { echo "$ENV_PATH/bin/python"; }

# Every NAME==VERSION pin installed at that version (a local label such as +cpu is accepted)?
pins_installed() {
  "$(env_python)" - "$@" <<'PY'
import sys
from importlib import metadata
missing = []
for pin in sys.argv[1:]:
    if "==" not in pin:  # e.g. a TORCH_SPEC that is a URL or a range: its presence is enough
        continue
    name, version = pin.split("==", 1)
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        missing.append(f"{name} (not installed)")
        continue
    if have.split("+")[0] != version:
        missing.append(f"{name} {have} (want {version})")
if missing:
    print("setup_env.sh: not yet as pinned: " + ", ".join(missing))
sys.exit(1 if missing else 0)
PY
}

stamp_value() {
  { cat "$ENV_YML"; echo "TORCH_SPEC=$TORCH_SPEC"; echo "TORCH_INDEX_URL=$TORCH_INDEX_URL"; echo "ATTENTION=$ATTENTION"; } |
    sha256sum | cut -d' ' -f1
}

gpu_driver_found() { command -v nvidia-smi >/dev/null || [[ -e /proc/driver/nvidia/version ]]; }

install_torch() {
  local pip=("$(env_python)" -m pip install --no-input)
  if [[ -n $TORCH_INDEX_URL ]]; then
    say "installing $TORCH_SPEC from TORCH_INDEX_URL=$TORCH_INDEX_URL"
    "${pip[@]}" --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC" && return 0
    say "could not install $TORCH_SPEC from TORCH_INDEX_URL (unreachable?); falling back to the default index"
  elif ! gpu_driver_found; then
    say "no NVIDIA driver here: installing $TORCH_SPEC from the default index (on Linux that is the CUDA" \
      "build, which runs on CPU too; for the smaller CPU build set TORCH_INDEX_URL to PyTorch's CPU wheel index)"
  fi
  "${pip[@]}" "$TORCH_SPEC"
}

main() {
  BACKEND=""
  choose_backend
  if [[ ! -x $(env_python) ]]; then
    if [[ $BACKEND == conda ]]; then create_conda_env; else create_venv; fi
  fi
  check_env_python
  local stamp_file=$ENV_PATH/$STAMP_NAME want
  want=$(stamp_value)
  if [[ $FORCE == 0 && -f $stamp_file && $(<"$stamp_file") == "$want" ]] && pins_installed "$TORCH_SPEC" "${OTHER_PINS[@]}"; then
    say "$ENV_PATH is up to date with environment.yml (TORCH_SPEC=$TORCH_SPEC); nothing to install"
  else
    install_torch
    say "installing the pins of environment.yml"
    # torch is given again as TORCH_SPEC so that the resolver keeps the build installed above.
    "$(env_python)" -m pip install --no-input "$TORCH_SPEC" "${OTHER_PINS[@]}"
    pins_installed "$TORCH_SPEC" "${OTHER_PINS[@]}" || die "pip finished but the pins above are not installed"
    echo "$want" >"$stamp_file"
    "$(env_python)" -m pip freeze --all >"$ENV_PATH/pip_freeze.txt"
    echo "---- frozen package list of $ENV_PATH ($BACKEND), kept in $ENV_PATH/pip_freeze.txt"
    cat "$ENV_PATH/pip_freeze.txt"
    echo "----"
  fi
  echo "$ENV_PATH" >"$ENV_PATH_FILE"
  say "done ($SECONDS s). Activate with: . ./activate_env.sh (it reads ENV_PATH=$ENV_PATH from .env_path)"
}

main "$@"
