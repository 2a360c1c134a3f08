#!/bin/bash
# Start a throw-away Slurm cluster on this machine, for the test suite (and for trying the sbatch
# scripts by hand). Debian's slurmctld + several slurmd "nodes" on one host, munge, and (WITH_DBD=1)
# a private MariaDB + slurmdbd so that sacct works. Everything lives under $BASE and listens on
# 127.0.0.1 only; the GPUs are fake (character devices), typed per node, so jobs that ask for
# `--gres=gpu:h100:8` are scheduled and see CUDA_VISIBLE_DEVICES=0..7. tests/README.md says what it needs
# (root, Debian's slurm packages) and how the test suite uses it.
#
#   sudo bash tests/cluster/up.sh                 # nodes h100-1, h100-2 (8 GPUs each), a100-1 (8 GPUs)
#   export SLURM_CONF=/tmp/localslurm/etc/slurm.conf; sinfo; sbatch --gres=gpu:h100:1 --wrap hostname
#   bash tests/cluster/down.sh                    # stops every daemon this script started
#
# Needs root (daemons, mknod, /etc/hosts) and Debian packages, which it installs when missing.
# Exit status: 0 = cluster up; 77 = this machine cannot host it (not root, no apt-get, packages could not
# be installed): callers such as the pytest fixture skip on 77; anything else is a real failure.
set -euo pipefail

BASE=${BASE:-/tmp/localslurm}              # all state, config, logs, fake devices; wiped on every start
NODE_SPEC=${NODE_SPEC:-"h100:2:8 a100:1:8"} # TYPE:NODES:GPUS_PER_NODE ... -> nodes h100-1, h100-2, a100-1
CPUS_PER_NODE=${CPUS_PER_NODE:-64}         # declared, not real (SlurmdParameters=config_overrides)
MEM_MB=${MEM_MB:-1000000}                  # declared, not real
WITH_DBD=${WITH_DBD:-1}                    # 1 = private MariaDB + slurmdbd so sacct works; 0 = no accounting
PARTITION=${PARTITION:-debug}              # the one partition, default for every job
SLURMCTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMDBD_PORT=${SLURMDBD_PORT:-6819}
MARIADB_PORT=${MARIADB_PORT:-3307}         # not 3306, so a system MariaDB is left alone
SLURMD_PORT_BASE=${SLURMD_PORT_BASE:-6830} # node k listens on SLURMD_PORT_BASE + k
START_TIMEOUT_S=${START_TIMEOUT_S:-60}     # how long to wait for every node to turn idle
REQUEUE_DELAY_S=${REQUEUE_DELAY_S:-5}      # a requeued job may start again after this long (AuthInfo=cred_expire;
                                           # Slurm's default is 120 s, its minimum 5 s)

EXIT_CANNOT_RUN=77
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HOST=$(hostname -s)
MARKER=.localslurm   # written into BASE, so a later start only ever wipes a directory it made itself

die() { echo "up.sh: error: $*" >&2; exit 1; }
cannot_run() { echo "up.sh: cannot start a local Slurm cluster here: $*" >&2; exit "$EXIT_CANNOT_RUN"; }
elapsed() { echo "up.sh: $1 ($SECONDS s)"; }

check_knobs() {
  [[ $WITH_DBD == 0 || $WITH_DBD == 1 ]] || die "WITH_DBD must be 0 or 1, got '$WITH_DBD'"
  [[ -n $BASE && $BASE == /* && $BASE != / ]] || die "BASE must be an absolute path other than /, got '$BASE'"
  [[ $PARTITION =~ ^[A-Za-z0-9_-]+$ ]] || die "PARTITION must be a plain name, got '$PARTITION'"
  [[ $REQUEUE_DELAY_S =~ ^[0-9]+$ ]] && ((REQUEUE_DELAY_S >= 5)) ||
    die "REQUEUE_DELAY_S must be an integer >= 5 (Slurm's minimum cred_expire), got '$REQUEUE_DELAY_S'"
  local spec type nodes gpus
  [[ -n ${NODE_SPEC// /} ]] || die "NODE_SPEC is empty (expected e.g. 'h100:2:8 a100:1:8')"
  for spec in $NODE_SPEC; do
    IFS=: read -r type nodes gpus <<<"$spec"
    [[ $type =~ ^[a-z0-9_]+$ && $nodes =~ ^[1-9][0-9]*$ && $gpus =~ ^[1-9][0-9]*$ ]] ||
      die "NODE_SPEC entry '$spec' is not TYPE:NODES:GPUS_PER_NODE (e.g. h100:2:8)"
  done
  if [[ -e $BASE && ! -e $BASE/$MARKER && -n $(ls -A "$BASE") ]]; then
    die "BASE=$BASE exists, is not empty and was not made by up.sh; refusing to wipe it (pick another BASE)"
  fi
}

install_packages() {
  local need=(slurmctld slurmd sinfo munged)
  local pkgs=(slurmctld slurmd slurm-client munge)
  if [[ $WITH_DBD == 1 ]]; then need+=(slurmdbd mariadbd); pkgs+=(slurmdbd mariadb-server); fi
  local cmd missing=0
  for cmd in "${need[@]}"; do
    command -v "$cmd" >/dev/null || [[ -x /usr/sbin/$cmd ]] || missing=1
  done
  [[ $missing == 1 ]] || return 0
  command -v apt-get >/dev/null || cannot_run "Slurm packages are missing and there is no apt-get to install them (${pkgs[*]})"
  echo "up.sh: installing ${pkgs[*]}"
  # The postinst scripts say "policy-rc.d denied execution of start" in containers: harmless, we start
  # the daemons ourselves below.
  apt-get update -q || cannot_run "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" </dev/null ||
    cannot_run "apt-get install ${pkgs[*]} failed"
  elapsed "packages installed"
}

start_munge() {
  mkdir -p /run/munge && chown munge:munge /run/munge
  if [[ ! -s /etc/munge/munge.key ]]; then   # normally made by the munge package's postinst
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  fi
  if ! munge -n </dev/null >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    touch "$BASE/run/munged.started"       # down.sh stops munged only if we started it
  fi
  munge -n </dev/null | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"
}

fresh_base() {
  if [[ -e $BASE ]]; then
    if [[ -e $BASE/$MARKER ]]; then   # a cluster from an earlier start (check_knobs refused anything else)
      BASE=$BASE bash "$HERE/down.sh" || die "could not stop the cluster already running in $BASE"
      rm -rf "$BASE"
    fi
  fi
  mkdir -p "$BASE"/{etc,state,run,log,dev,db,spool}
  touch "$BASE/$MARKER"
}

# Fake GPUs, gres.conf and the NodeName lines; sets NODE_NAMES and NODE_LINES.
make_nodes() {
  local spec type nodes gpus k i port=$SLURMD_PORT_BASE gres="AutoDetect=off"
  NODE_NAMES=() NODE_LINES=""
  for spec in $NODE_SPEC; do
    IFS=: read -r type nodes gpus <<<"$spec"
    mkdir -p "$BASE/dev/$type"
    # slurmd only sets CUDA_VISIBLE_DEVICES for GRES backed by character/block devices; 1,3 is /dev/null.
    for ((k = 0; k < gpus; k++)); do mknod "$BASE/dev/$type/gpu$k" c 1 3; done
    gres+=$'\n'"NodeName=$type-[1-$nodes] Name=gpu Type=$type File=$BASE/dev/$type/gpu[0-$((gpus - 1))]"
    for ((i = 1; i <= nodes; i++)); do
      port=$((port + 1))
      NODE_NAMES+=("$type-$i")
      mkdir -p "$BASE/spool/$type-$i"
      NODE_LINES+=$'\n'"NodeName=$type-$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS_PER_NODE RealMemory=$MEM_MB Gres=gpu:$type:$gpus State=UNKNOWN"
      # Scripts use the first node name as the rendezvous host (MASTER_ADDR), so it must resolve.
      grep -qE "^127\.0\.0\.1[[:space:]]+$type-$i\$" /etc/hosts || echo "127.0.0.1 $type-$i" >>/etc/hosts
    done
  done
  printf '%s\n' "$gres" >"$BASE/etc/gres.conf"
}

write_slurm_conf() {
  local accounting
  if [[ $WITH_DBD == 1 ]]; then
    accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$SLURMDBD_PORT
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux"
  else
    accounting="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
  fi
  # batch_sched_delay=0: otherwise every batch job waits ~3 s before it starts. sched_interval=1: the main
  # scheduler runs every second, so a requeued job starts as soon as REQUEUE_DELAY_S has passed, not up to
  # 60 s later (the default).
  # EnforcePartLimits=ALL: otherwise impossible requests (--nodes=3 on 2 nodes) pend forever instead of
  # being rejected at submission.
  cat >"$BASE/etc/slurm.conf" <<CONF
ClusterName=localcluster
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmctldPort=$SLURMCTLD_PORT
AuthType=auth/munge
AuthInfo=cred_expire=$REQUEUE_DELAY_S
CredType=cred/munge
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
$accounting
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
EnforcePartLimits=ALL
GresTypes=gpu
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=300
MailProg=/bin/true
$NODE_LINES
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.1 s until it succeeds.
wait_for() {
  local seconds=$1 what=$2 i
  shift 2
  for ((i = 0; i < seconds * 10; i++)); do
    "$@" && return 0
    sleep 0.1
  done
  echo "up.sh: error: timed out after ${seconds}s waiting for $what" >&2
  return 1
}

show_log_tails() {
  local f
  for f in "$BASE"/log/*; do
    [[ -s $f ]] || continue
    echo "----- tail of $f" >&2
    tail -n 15 "$f" >&2
  done
}

mariadb_alive() { mariadb-admin --no-defaults --socket="$BASE/db/mysql.sock" -uroot ping >/dev/null 2>&1; }
slurmdbd_started() { [[ -s $BASE/run/slurmdbd.pid ]] && grep -q "started" "$BASE/log/slurmdbd.log" 2>/dev/null; }

start_accounting() {
  mariadb-install-db --no-defaults --user=root --datadir="$BASE/db/data" \
    --auth-root-authentication-method=normal --skip-test-db >"$BASE/log/install-db.log" 2>&1 ||
    die "mariadb-install-db failed, see $BASE/log/install-db.log"
  setsid /usr/sbin/mariadbd --no-defaults --user=root --datadir="$BASE/db/data" --socket="$BASE/db/mysql.sock" \
    --pid-file="$BASE/run/mariadb.pid" --bind-address=127.0.0.1 --port="$MARIADB_PORT" \
    --log-error="$BASE/log/mariadb.err" --innodb-buffer-pool-size=64M --skip-log-bin </dev/null >/dev/null 2>&1 &
  wait_for 30 "MariaDB on port $MARIADB_PORT" mariadb_alive || { show_log_tails; exit 1; }
  # A throw-away database on loopback, gone with BASE: the password protects nothing.
  mariadb --no-defaults --socket="$BASE/db/mysql.sock" -uroot -e \
    "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  cat >"$BASE/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$SLURMDBD_PORT
SlurmUser=root
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MARIADB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
CONF
  chmod 600 "$BASE/etc/slurmdbd.conf"   # slurmdbd reads it from dirname($SLURM_CONF) and insists on 600
  (cd "$BASE" && setsid /usr/sbin/slurmdbd </dev/null >"$BASE/log/slurmdbd.out" 2>&1)
  wait_for 30 "slurmdbd" slurmdbd_started || { show_log_tails; exit 1; }
}

all_nodes_idle() { [[ $(sinfo -h -N -o %T 2>/dev/null | sort -u | tr '\n' ' ') == "idle " ]]; }

main() {
  check_knobs
  [[ $(id -u) == 0 ]] || cannot_run "needs root (daemons, mknod, /etc/hosts); running as $(id -un)"
  install_packages
  fresh_base
  start_munge
  make_nodes
  write_slurm_conf
  export SLURM_CONF=$BASE/etc/slurm.conf
  if [[ $WITH_DBD == 1 ]]; then start_accounting; elapsed "accounting up"; fi
  # slurmctld and slurmd daemonize themselves and write their pid files (down.sh stops them by PID).
  (cd "$BASE" && setsid /usr/sbin/slurmctld -f "$SLURM_CONF" </dev/null >"$BASE/log/slurmctld.out" 2>&1) ||
    { show_log_tails; die "slurmctld did not start"; }
  local node
  for node in "${NODE_NAMES[@]}"; do   # Debian's build has MULTIPLE_SLURMD: one slurmd per node name
    (cd "$BASE" && setsid /usr/sbin/slurmd -f "$SLURM_CONF" -N "$node" </dev/null >"$BASE/log/slurmd-$node.out" 2>&1) ||
      { show_log_tails; die "slurmd -N $node did not start"; }
  done
  if ! wait_for "$START_TIMEOUT_S" "every node to be idle" all_nodes_idle; then
    sinfo -N -o "%N %T %E" >&2 || true
    show_log_tails
    exit 1
  fi
  sinfo -N -o "%N %T %c %m %G"
  elapsed "cluster up"
  echo "export SLURM_CONF=$SLURM_CONF"
}

main "$@"
