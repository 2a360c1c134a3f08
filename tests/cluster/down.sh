#!/bin/bash
# Stop the local Slurm cluster that tests/cluster/up.sh started under $BASE: cancel its jobs, then stop
# slurmd/slurmctld/slurmdbd/MariaDB (and munged if up.sh started it) by the PIDs in their pid files,
# waiting for the processes themselves (daemons delete their pid file before they have exited).
# BASE itself is kept for its logs; the next up.sh wipes it.
#
#   bash tests/cluster/down.sh            # same BASE as up.sh
set -euo pipefail

BASE=${BASE:-/tmp/localslurm}
STOP_MUNGE=${STOP_MUNGE:-auto}     # auto = only if up.sh started munged; 1 = always; 0 = never
STOP_TIMEOUT_S=${STOP_TIMEOUT_S:-20}

[[ $STOP_MUNGE =~ ^(auto|0|1)$ ]] || { echo "down.sh: error: STOP_MUNGE must be auto, 0 or 1, got '$STOP_MUNGE'" >&2; exit 1; }
if [[ ! -d $BASE/run ]]; then
  echo "down.sh: nothing to stop: $BASE/run does not exist"
  exit 0
fi
export SLURM_CONF=$BASE/etc/slurm.conf

alive() { kill -0 "$1" 2>/dev/null; }

# stop PIDFILE...: SIGTERM the PIDs, wait for them; SIGKILL what is left after STOP_TIMEOUT_S.
stop() {
  local pids=() f pid i left
  for f in "$@"; do
    [[ -s $f ]] || continue
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" && pids+=("$pid")
  done
  [[ ${#pids[@]} -gt 0 ]] || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for ((i = 0; i < STOP_TIMEOUT_S * 10; i++)); do
    left=()
    for pid in "${pids[@]}"; do alive "$pid" && left+=("$pid"); done
    [[ ${#left[@]} -eq 0 ]] && return 0
    sleep 0.1
  done
  echo "down.sh: still alive after ${STOP_TIMEOUT_S}s, sending SIGKILL: ${left[*]}" >&2
  kill -KILL "${left[@]}" 2>/dev/null || true
  return 1
}

no_jobs_left() { [[ -z $(squeue -h -o %i 2>/dev/null) ]]; }

status=0
slurmctld_pid=$BASE/run/slurmctld.pid
if [[ -s $slurmctld_pid ]] && alive "$(<"$slurmctld_pid")"; then
  # End the jobs first, so that no slurmstepd outlives its slurmd.
  scancel --quiet --user=root 2>/dev/null || true
  for ((i = 0; i < STOP_TIMEOUT_S * 10; i++)); do no_jobs_left && break; sleep 0.1; done
  no_jobs_left || { echo "down.sh: jobs still listed after scancel: $(squeue -h -o %i | tr '\n' ' ')" >&2; status=1; }
fi
shopt -s nullglob
stop "$BASE"/run/slurmd-*.pid "$slurmctld_pid" "$BASE/run/slurmdbd.pid" || status=1
stop "$BASE/run/mariadb.pid" || status=1
if [[ $STOP_MUNGE == 1 || ($STOP_MUNGE == auto && -e $BASE/run/munged.started) ]]; then
  stop /run/munge/munged.pid || status=1
  rm -f "$BASE/run/munged.started"
fi
echo "down.sh: stopped ($SECONDS s)"
exit "$status"
