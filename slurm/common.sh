# shellcheck shell=bash
# The one prologue shared by every sbatch script in slurm/. Source it, do not run it:
#
#   source "$REPO_DIR/slurm/common.sh"          # (the script finds it first, see train_shakespeare.sh)
#   run_trainer nanogpt.train --batch_size=16         # or: launch MODULE ARGS...
#
# It reads the knobs below, validates them (the error names the knob), activates the environment
# (activate_env.sh: conda env or venv at ENV_PATH), takes node and GPU counts from the SLURM_*
# variables of the job (never typed twice: a knob that is set must agree with them), prints the job's
# provenance, makes the run directory, cds to the repo root and defines:
#   launch MODULE ARGS...     python -m MODULE ARGS, one process per GPU (torchrun), on every node (srun),
#                             forwarding TERM/INT/USR1/USR2 to the trainer (preemption, scancel --signal)
#   launch_trainer MODULE ARGS...  launch, then, if the trainer stopped on SIGUSR1/SIGUSR2 after writing a
#                             checkpoint (the --signal=B:USR1@120 of the scripts' headers: time limit, preemption
#                             notice, scancel --signal), requeue the job (REQUEUE); it resumes from RUN_DIR
#   run_trainer MODULE ARGS...  launch_trainer MODULE with RECIPE, DATASET_DIR, RUN_DIR, DEVICE, ARGS, EXTRA_ARGS
#   require_token_dir KNOB HINT...  the directory in KNOB exists and holds token files, else exit 2
#   gpu_fact GPU_TYPE COLUMN  one value from slurm/gpus.tsv
#   sbatch_args               the sbatch options that the knobs ask for (used by SUBMIT=1)
# Outside a Slurm job (bash slurm/...sh on a workstation) the same script runs the same trainer locally.
# With SUBMIT=1 outside a job, the script instead submits itself: sbatch $(sbatch_args) $SBATCH_FLAGS SCRIPT,
# after a dry pass of the same script (CHECK_ONLY=1: every check, no launch) has passed.
# In a batch job every launch is a job step (srun), so `scancel --signal=USR1 JOBID` reaches the trainer as
# well as `scancel --signal=USR1 --batch JOBID` does. A script that needs no run directory (data
# preparation, builds) sets NEEDS_RUN_DIR=0 before sourcing this file; a training script sets the defaults of
# its RECIPE and DATASET_DIR knobs there (DEFAULT_RECIPE, and DEFAULT_DATASET: a folder of DATA_DIR).

# ---- knobs (environment variables); empty = derived as described -----------------------------------
GPU_TYPE=${GPU_TYPE:-}              # a gpu_type of slurm/gpus.tsv; default: the type the job asked for
                                    # (--gres=gpu:TYPE:N), else h100
NUM_NODES=${NUM_NODES:-}            # default: SLURM_JOB_NUM_NODES in a job, else 1
GPUS_PER_NODE=${GPUS_PER_NODE:-}    # default: SLURM_GPUS_ON_NODE in a job; else the visible GPUs
                                    # (nvidia-smi; 0 without); 1 when submitting (SUBMIT=1)
NUM_GPUS=${NUM_GPUS:-}              # default: NUM_NODES * GPUS_PER_NODE (if set, it must agree)
NPROC_PER_NODE=${NPROC_PER_NODE:-}  # trainer processes per node; default: GPUS_PER_NODE on cuda, 1 on cpu
GRAD_ACC_STEPS=${GRAD_ACC_STEPS:-}  # empty = the trainer derives it from its total batch size
CPUS_PER_GPU=${CPUS_PER_GPU:-8}     # --cpus-per-task when submitting; OMP threads per process
DEVICE=${DEVICE:-auto}              # auto | cuda | cpu; auto = cuda when nvidia-smi lists a GPU
PARTITION=${PARTITION:-}            # sbatch_args/SUBMIT only; empty = the site's default partition
ACCOUNT=${ACCOUNT:-}                # sbatch_args/SUBMIT only; empty = your default account
QOS=${QOS:-}                        # sbatch_args/SUBMIT only; empty = the default QOS
TIME=${TIME:-}                      # sbatch_args/SUBMIT only, e.g. 01:00:00; empty = the script's #SBATCH --time
SUBMIT=${SUBMIT:-0}                 # 1 = outside a job, submit this script with sbatch_args and exit
SBATCH_FLAGS=${SBATCH_FLAGS:-}      # more sbatch options for SUBMIT=1 (word-split), e.g. "--test-only"
RUN_NAME=${RUN_NAME:-}              # default: <job name>-<job id> (array jobs: <name>-<array id>_<task>)
RUN_DIR=${RUN_DIR:-}                # default: $RUNS_DIR/$RUN_NAME; a requeued job reuses it and resumes
RDZV_PORT=${RDZV_PORT:-}            # multi-node rendezvous port on the first node; default 29500 + job id % 1000
RECIPE=${RECIPE:-${DEFAULT_RECIPE:-}}  # training scripts: the trainer's recipe; default: the script's DEFAULT_RECIPE
                                    # (none: the trainer's own defaults)
DATASET_DIR=${DATASET_DIR:-}        # training scripts: the token directory; default: $DATA_DIR/$DEFAULT_DATASET
EXTRA_ARGS=${EXTRA_ARGS:-}          # more --key=value for the trainer (word-split)
REQUEUE=${REQUEUE:-auto}            # 1 = after the trainer stopped on SIGUSR1/SIGUSR2 with a checkpoint, scontrol
                                    # requeue the job (it resumes from RUN_DIR); 0 = just exit; auto = 1 in a batch job
MAX_REQUEUES=${MAX_REQUEUES:-20}    # no requeue once the job has restarted this often (SLURM_RESTART_COUNT)
# DATA_DIR, RUNS_DIR, REPO_DIR, CONDA_SH, ENV_PATH: see activate_env.sh (defaults <repo>/data, <repo>/runs).

# ---- helpers ---------------------------------------------------------------------------------------
common_die() { echo "error: $*" >&2; exit 2; }

# gpu_fact GPU_TYPE COLUMN: print COLUMN of GPU_TYPE's row in gpus.tsv; fails (status 1) if either is unknown.
gpu_fact() {
  awk -F'\t' -v type="$1" -v column="$2" '
    /^#/ || NF == 0 { next }
    !header_seen { for (i = 1; i <= NF; i++) if ($i == column) col = i; header_seen = 1; next }
    col && $1 == type { print $col; found = 1; exit }
    END { exit (col && found) ? 0 : 1 }' "$GPUS_TSV"
}

gpu_types() { awk -F'\t' '/^#/ || NF == 0 { next } seen++ { printf "%s ", $1 }' "$GPUS_TSV"; }

# require_int KNOB MIN: the knob's value must be an integer >= MIN.
require_int() {
  local value=${!1}
  [[ $value =~ ^[0-9]+$ ]] && ((10#$value >= $2)) ||
    common_die "$1 must be an integer >= $2, got '$value'"
}

in_slurm_job() { [[ -n ${SLURM_JOB_ID:-} ]]; }
# In a job but not inside a job step: the batch script (or an salloc shell), where launch starts a step.
in_batch_script() { in_slurm_job && [[ -z ${SLURM_STEP_ID:-} ]]; }

# The GPU type the job asked for, from scontrol (Slurm sets no environment variable with it).
job_gpu_type() {
  local job
  job=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null) || return 0
  [[ $job =~ TresPer(Node|Job|Task)=[^[:space:]]*gpu:([A-Za-z][A-Za-z0-9_]*)[:=][0-9] ]] &&
    echo "${BASH_REMATCH[2]}"
}

visible_gpu_count() {
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]] && command -v nvidia-smi >/dev/null; then
    local ids
    IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
    echo "${#ids[@]}"
  elif command -v nvidia-smi >/dev/null; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
  else
    echo 0
  fi
}

nvidia_smi_works() { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; }

# A knob the user set must agree with what Slurm allocated; an empty one takes Slurm's value.
agree_with_slurm() {  # agree_with_slurm KNOB SLURM_VALUE SBATCH_OPTION
  if [[ -z ${!1} ]]; then
    printf -v "$1" '%s' "$2"
  elif [[ ${!1} != "$2" ]]; then
    common_die "$1=${!1} but the job has $2 (from Slurm); drop $1 or submit with $3"
  fi
}

resolve_counts() {
  if in_slurm_job; then
    agree_with_slurm NUM_NODES "${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}" "--nodes=$NUM_NODES"
    agree_with_slurm GPUS_PER_NODE "${SLURM_GPUS_ON_NODE:-0}" "--gres=gpu:TYPE:$GPUS_PER_NODE"
    local asked
    asked=$(job_gpu_type)
    [[ -z $asked ]] || agree_with_slurm GPU_TYPE "$asked" "--gres=gpu:$GPU_TYPE:N"
  else
    NUM_NODES=${NUM_NODES:-1}
    if [[ -z $GPUS_PER_NODE ]]; then
      if [[ $SUBMIT == 1 ]]; then GPUS_PER_NODE=1; else GPUS_PER_NODE=$(visible_gpu_count); fi
    fi
  fi
  GPU_TYPE=${GPU_TYPE:-h100}
  require_int NUM_NODES 1
  require_int GPUS_PER_NODE 0
  require_int CPUS_PER_GPU 1
  [[ -z $GRAD_ACC_STEPS ]] || require_int GRAD_ACC_STEPS 1
  require_int MAX_REQUEUES 0
  case $REQUEUE in
    auto) if in_batch_script; then REQUEUE=1; else REQUEUE=0; fi ;;
    0 | 1) ;;
    *) common_die "REQUEUE must be auto, 0 or 1, got '$REQUEUE'" ;;
  esac
  gpu_fact "$GPU_TYPE" gpu_type >/dev/null ||
    common_die "GPU_TYPE='$GPU_TYPE' is not in $GPUS_TSV (known: $(gpu_types)); add a row or pick one"
  local total=$((10#$NUM_NODES * 10#$GPUS_PER_NODE))
  if [[ -n $NUM_GPUS ]]; then
    require_int NUM_GPUS 0
    ((10#$NUM_GPUS == total)) ||
      common_die "NUM_GPUS=$NUM_GPUS but NUM_NODES * GPUS_PER_NODE = $NUM_NODES * $GPUS_PER_NODE = $total"
  fi
  NUM_GPUS=$total
  case $DEVICE in
    auto) if nvidia_smi_works; then DEVICE=cuda; else DEVICE=cpu; fi ;;
    cuda | cpu) ;;
    *) common_die "DEVICE must be auto, cuda or cpu, got '$DEVICE'" ;;
  esac
  if [[ -z $NPROC_PER_NODE ]]; then
    if [[ $DEVICE == cuda ]] && ((10#$GPUS_PER_NODE > 0)); then NPROC_PER_NODE=$GPUS_PER_NODE; else NPROC_PER_NODE=1; fi
  fi
  require_int NPROC_PER_NODE 1
  export GPU_TYPE NUM_NODES GPUS_PER_NODE NUM_GPUS NPROC_PER_NODE GRAD_ACC_STEPS CPUS_PER_GPU DEVICE REQUEUE
}

# sbatch_args: the sbatch options the knobs ask for, one per line.
sbatch_args() {
  local gpus=$((10#$GPUS_PER_NODE)) cpus
  cpus=$((10#$CPUS_PER_GPU * (gpus > 0 ? gpus : 1)))
  echo "--nodes=$NUM_NODES"
  echo "--ntasks-per-node=1"
  echo "--cpus-per-task=$cpus"
  ((gpus == 0)) || echo "--gres=gpu:$GPU_TYPE:$gpus"
  [[ -z $PARTITION ]] || echo "--partition=$PARTITION"
  [[ -z $ACCOUNT ]] || echo "--account=$ACCOUNT"
  [[ -z $QOS ]] || echo "--qos=$QOS"
  [[ -z $TIME ]] || echo "--time=$TIME"
}

submit_self() {  # submit_self SCRIPT: sbatch SCRIPT with the knobs' options; the job inherits the knobs
  local text args extra
  # Resolve in a subshell: the job must inherit the knobs as the user gave them, not as resolved on
  # this (login) node, where DEVICE=auto would become cpu.
  text=$(resolve_counts && sbatch_args) || exit 2
  mapfile -t args <<<"$text"
  read -ra extra <<<"$SBATCH_FLAGS"
  echo "submitting: sbatch ${args[*]} ${extra[*]} $1"
  exec sbatch "${args[@]}" "${extra[@]}" "$1"
}

print_provenance() {
  echo "==== job provenance ($(date -Is))"
  echo "host: $(hostname)  slurm node: ${SLURMD_NODENAME:-none}  job: ${SLURM_JOB_ID:-none} (${SLURM_JOB_NAME:-})"
  if in_slurm_job && [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
    echo "nodes: $(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | paste -sd " " -)"
  fi
  echo "gpu_type: $GPU_TYPE  nodes: $NUM_NODES  gpus/node: $GPUS_PER_NODE  gpus: $NUM_GPUS  procs/node: $NPROC_PER_NODE  device: $DEVICE"
  echo "repo: $REPO_DIR  git: $(git_sha)"
  echo "python: $(command -v python) ($(python -c 'import sys; print(sys.version.split()[0])' 2>&1))"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  else
    echo "nvidia-smi: not found (no NVIDIA driver on this node)"
  fi
  echo "SLURM_* variables:"
  env | grep '^SLURM_' | sort | sed 's/^/  /' || true
  if [[ ${NEEDS_RUN_DIR:-1} == 1 ]]; then echo "run_dir: $RUN_DIR"; else echo "run_dir: none"; fi
  echo "===="
}

git_sha() {
  local sha dirty=""
  if [[ -f $REPO_DIR/.snapshot.json ]]; then  # a code snapshot made by python -m slurm.submit: no .git
    sed -n 's/^ *"git_describe": "\(.*\)",\{0,1\}$/\1 (snapshot)/p' "$REPO_DIR/.snapshot.json"
    return 0
  fi
  command -v git >/dev/null || { echo "unknown (git not installed)"; return 0; }
  sha=$(git -C "$REPO_DIR" rev-parse HEAD 2>/dev/null) || { echo "unknown (no commit)"; return 0; }
  [[ -z $(git -C "$REPO_DIR" status --porcelain 2>/dev/null) ]] || dirty=" (dirty)"
  echo "$sha$dirty"
}

default_run_name() {
  local script_name=${1##*/} id
  if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then
    id=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
  elif [[ -n ${SLURM_JOB_ID:-} ]]; then
    id=$SLURM_JOB_ID
  else
    id=local-$(date +%Y%m%d-%H%M%S)
  fi
  echo "${SLURM_JOB_NAME:-${script_name%.sh}}-$id"
}

# run_forwarding_signals CMD...: run CMD and wait for it; TERM/INT/USR1/USR2 sent to this shell (scancel,
# sbatch --signal=B:USR1@90, preemption) are passed on to CMD, and the status of CMD is returned.
run_forwarding_signals() {
  "$@" &
  local child=$! status sig
  for sig in TERM INT USR1 USR2; do
    # shellcheck disable=SC2064  # the child PID and signal are fixed now, on purpose
    trap "echo 'launch: forwarding SIG$sig to $child' >&2; kill -s $sig $child 2>/dev/null || true" "$sig"
  done
  while true; do
    wait "$child" && status=0 || status=$?
    # wait also returns (status > 128) when a trapped signal arrives while CMD still runs: keep waiting.
    kill -0 "$child" 2>/dev/null || break
  done
  trap - TERM INT USR1 USR2
  return "$status"
}

# step_cpus: CPUs for a job step on this node. srun of Slurm 22.05-23.02 does not take --cpus-per-task from
# the job, and a step that asks for 1 CPU is confined to it where cgroups are enforced.
step_cpus() { echo "${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"; }

# launch MODULE ARGS...: python -m MODULE ARGS with NPROC_PER_NODE processes on each of NUM_NODES nodes.
launch() {
  local module=$1 cmd node_cmd
  shift
  if [[ ${CHECK_ONLY:-0} == 1 ]]; then  # SUBMIT=1's dry pass: every check passed, nothing runs here
    echo "checks passed; would launch $module"
    exit 0
  fi
  local signals=--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2
  if ((NUM_NODES > 1)); then
    in_slurm_job || common_die "NUM_NODES=$NUM_NODES needs a Slurm job (sbatch --nodes=$NUM_NODES)"
    local rdzv_host
    rdzv_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    RDZV_PORT=${RDZV_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
    # One torchrun per node; they meet at a c10d rendezvous hosted on the first node of the job.
    node_cmd=(torchrun --nnodes="$NUM_NODES" --nproc-per-node="$NPROC_PER_NODE"
      --rdzv-backend=c10d --rdzv-endpoint="$rdzv_host:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID"
      "$signals" -m "$module" "$@")
    if in_batch_script; then
      cmd=(srun --nodes="$NUM_NODES" --ntasks-per-node=1 --cpus-per-task="$(step_cpus)" --kill-on-bad-exit=1
        "${node_cmd[@]}")
    elif [[ ${SLURM_STEP_NUM_TASKS:-} == "$NUM_NODES" && ${SLURM_STEP_NUM_NODES:-} == "$NUM_NODES" ]]; then
      cmd=("${node_cmd[@]}")  # already one task per node (srun --ntasks-per-node=1 bash SCRIPT)
    else
      common_die "inside a job step, NUM_NODES=$NUM_NODES needs one task per node (srun --ntasks-per-node=1)," \
        "this step has ${SLURM_STEP_NUM_TASKS:-?} tasks on ${SLURM_STEP_NUM_NODES:-?} nodes; or sbatch the script"
    fi
  else
    if ((NPROC_PER_NODE > 1)); then
      node_cmd=(torchrun --standalone --nproc-per-node="$NPROC_PER_NODE" "$signals" -m "$module" "$@")
    else
      node_cmd=(python -m "$module" "$@")
    fi
    if in_batch_script; then
      # A job step: Slurm's --signal and `scancel --signal` (without --batch) reach job steps only.
      cmd=(srun --nodes=1 --ntasks=1 --cpus-per-task="$(step_cpus)" --kill-on-bad-exit=1 "${node_cmd[@]}")
    else
      cmd=("${node_cmd[@]}")
    fi
  fi
  echo "launch: ${cmd[*]}"
  run_forwarding_signals "${cmd[@]}"
}

# stop_since EPOCH RUN_DIR: the reason of the trainer's stop when the newest end/stop record of
# RUN_DIR/metrics.jsonl is a "stop" written at or after EPOCH (seconds), else nothing. The newest record decides,
# not a count: a resumed trainer may move records of later steps aside, and a stop of an earlier launch is not
# this launch's. The record is read by the run directory's own reader (nanogpt.rundir.last_record).
stop_since() {
  python - "$1" "$2" <<'PY'
import sys
from nanogpt.rundir import last_record
last = last_record(sys.argv[2], ("end", "stop"))
if last and last["kind"] == "stop" and float(last.get("time") or 0) >= float(sys.argv[1]):
    print(str(last.get("reason", "")) or "unknown")
PY
}

EXIT_REQUEUED=75  # the status of a script that requeued its job (EX_TEMPFAIL: it runs again)

# launch_trainer MODULE ARGS...: launch a trainer that honours the run directory contract, then act on how it
# stopped. A "stop" record this launch wrote, as the newest end/stop record of RUN_DIR/metrics.jsonl (stop_since),
# says it wrote a checkpoint and exited on a signal:
# after SIGUSR1/SIGUSR2 (time limit or preemption notice) the job is requeued (REQUEUE=1) and exits
# EXIT_REQUEUED, or, without requeue, the script ends with status 0 and says how to resume. Otherwise the
# trainer's status is returned. (torchrun itself exits non-zero after passing a signal on, even when its
# workers stopped cleanly, hence the run directory decides, not the status.)
launch_trainer() {
  local started reason status=0
  started=$(($(date +%s) - 2))  # 2 s of slack for the clock of another node (rank 0 writes the records)
  launch "$@" || status=$?
  reason=$(stop_since "$started" "$RUN_DIR") || true
  if [[ -z $reason ]]; then
    return "$status"
  fi
  case $reason in
    "signal SIGUSR1" | "signal SIGUSR2")
      if [[ $REQUEUE == 1 ]] && in_slurm_job; then
        if ((${SLURM_RESTART_COUNT:-0} >= MAX_REQUEUES)); then
          echo "requeue: not requeueing job $SLURM_JOB_ID: it has restarted ${SLURM_RESTART_COUNT:-0} times" \
            "(MAX_REQUEUES=$MAX_REQUEUES); resubmit with RUN_DIR=$RUN_DIR to resume" >&2
          return 0
        fi
        echo "requeue: the trainer stopped on $reason after a checkpoint; requeueing job $SLURM_JOB_ID" \
          "(restart $((${SLURM_RESTART_COUNT:-0} + 1)), at most $MAX_REQUEUES); it resumes from $RUN_DIR"
        # Slurm ends this run of the job (SIGTERM to its processes) as soon as it accepts the requeue: leave
        # with EXIT_REQUEUED rather than die of it, so a caller (slurm/jobs.py) knows what happened.
        trap '' TERM
        scontrol requeue "$SLURM_JOB_ID" ||
          common_die "scontrol requeue $SLURM_JOB_ID failed (submitted with --no-requeue?); resubmit with RUN_DIR=$RUN_DIR to resume"
        exit "$EXIT_REQUEUED"
      fi
      ;;
  esac
  echo "stopped on $reason after a checkpoint; run the same command with RUN_DIR=$RUN_DIR to resume"
  return 0
}

# run_trainer MODULE ARGS...: launch_trainer MODULE [RECIPE] --data_dir=DATASET_DIR --run_dir=RUN_DIR --device=DEVICE
# ARGS EXTRA_ARGS: the command line both trainers take (nanogpt.config: the recipe first, then --key=value; the
# later of two settings wins, so EXTRA_ARGS win over the script's ARGS). No RECIPE: the trainer's own defaults.
# Both trainers derive gradient accumulation themselves, so a GRAD_ACC_STEPS knob is refused first.
run_trainer() {
  local module=$1 extra_args
  shift
  case $module in
    nanogpt.train) refuse_grad_acc_steps "$module" \
      "--total_batch_size (tokens per optimizer step); set EXTRA_ARGS=--total_batch_size=N instead" ;;
    modded_nanogpt.train_gpt) refuse_grad_acc_steps "$module" "its world size (8 / GPUs); change the batch with EXTRA_ARGS" ;;
  esac
  read -ra extra_args <<<"$EXTRA_ARGS"
  launch_trainer "$module" ${RECIPE:+"$RECIPE"} --data_dir="$DATASET_DIR" --run_dir="$RUN_DIR" --device="$DEVICE" \
    "$@" "${extra_args[@]}"
}

# require_token_dir KNOB HINT...: the directory named by KNOB exists and holds token files (*.bin); else
# exit 2, printing the HINT lines (the commands that prepare it).
require_token_dir() {
  local knob=$1 dir=${!1}
  shift
  if [[ ! -d $dir ]]; then
    echo "error: $knob=$dir does not exist (DATA_DIR=$DATA_DIR). Prepare it first:" >&2
  elif ! compgen -G "$dir/*.bin" >/dev/null; then
    echo "error: $knob=$dir holds no token files (*.bin); prepare it first:" >&2
  else
    return 0
  fi
  printf '  %s\n' "$@" >&2
  exit 2
}

# refuse_grad_acc_steps TRAINER HOW: GRAD_ACC_STEPS is set but TRAINER derives accumulation itself (HOW), so the
# knob would be silently ignored: exit 2.
refuse_grad_acc_steps() {
  [[ -z $GRAD_ACC_STEPS ]] && return 0
  echo "error: GRAD_ACC_STEPS=$GRAD_ACC_STEPS: $1 derives gradient accumulation from $2" >&2
  exit 2
}

# prepare_data MODULE ARGS...: launch MODULE ARGS EXTRA_ARGS (word-split), the preparer of a data script, then
# say where the data went (OUT_DIR).
prepare_data() {
  local extra_args
  read -ra extra_args <<<"$EXTRA_ARGS"
  launch "$@" "${extra_args[@]}"
  echo "prepared: $OUT_DIR"
}

# require_cpus KNOB: an empty KNOB becomes the CPUs of the job (step_cpus), outside a job those of this
# machine; then it must be an integer >= 1.
require_cpus() {
  if [[ -z ${!1} ]]; then
    if in_slurm_job; then printf -v "$1" '%s' "$(step_cpus)"; else printf -v "$1" '%s' "$(nproc)"; fi
  fi
  require_int "$1" 1
}

# ---- prologue --------------------------------------------------------------------------------------
[[ ${BASH_SOURCE[0]} != "$0" ]] || { echo "error: source slurm/common.sh from an sbatch script; do not run it" >&2; exit 2; }
COMMON_SCRIPT=${BASH_SOURCE[${#BASH_SOURCE[@]} - 1]}   # the outermost script, the one sbatch runs
# REPO_DIR unset: the script found this file in its own repo (its preamble), which is then the repo.
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
[[ -d $REPO_DIR/nanogpt && -f $REPO_DIR/slurm/common.sh ]] ||
  common_die "REPO_DIR=$REPO_DIR is not the repo root (no nanogpt/ and slurm/common.sh there); submit from the repo root or set REPO_DIR"
REPO_DIR=$(cd "$REPO_DIR" && pwd)
GPUS_TSV=$REPO_DIR/slurm/gpus.tsv
[[ $SUBMIT == 0 || $SUBMIT == 1 ]] || common_die "SUBMIT must be 0 or 1, got '$SUBMIT'"
if [[ $SUBMIT == 1 ]] && ! in_slurm_job; then
  # First the script's own checks (knobs, data, environment) as a run would make them, without launching
  # (CHECK_ONLY), so a request the job would refuse is refused here instead of after the queue wait.
  SUBMIT=0 CHECK_ONLY=1 bash "$COMMON_SCRIPT" >/dev/null || common_die "not submitted: the check above failed"
  submit_self "$COMMON_SCRIPT"
fi
resolve_counts
export REPO_DIR
# shellcheck source=../activate_env.sh
source "$REPO_DIR/activate_env.sh" || common_die "could not activate the environment (ENV_PATH=${ENV_PATH:-}); run: bash setup_env.sh"
cd "$REPO_DIR" || common_die "cannot cd to REPO_DIR=$REPO_DIR"
[[ -n $DATASET_DIR || -z ${DEFAULT_DATASET:-} ]] || DATASET_DIR=$DATA_DIR/$DEFAULT_DATASET
if [[ ${NEEDS_RUN_DIR:-1} == 1 ]]; then
  RUN_NAME=${RUN_NAME:-$(default_run_name "$COMMON_SCRIPT")}
  [[ $RUN_NAME =~ ^[A-Za-z0-9._-]+$ ]] || common_die "RUN_NAME must be a plain name (letters, digits, . _ -), got '$RUN_NAME'"
  RUN_DIR=${RUN_DIR:-$RUNS_DIR/$RUN_NAME}
  mkdir -p "$RUN_DIR" || common_die "cannot create RUN_DIR=$RUN_DIR"
  export RUN_NAME RUN_DIR
fi
if in_slurm_job; then
  if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    # Without this each process would start one thread per core of the whole node.
    OMP_NUM_THREADS=$(($(step_cpus) / NPROC_PER_NODE))
    export OMP_NUM_THREADS=$((OMP_NUM_THREADS > 0 ? OMP_NUM_THREADS : 1))
  fi
  export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}  # the job log shows each line when it is printed
fi
print_provenance
