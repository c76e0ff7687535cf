#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the real `torchx run -s slurm` test (tests/test_slurm.py).
#
#   bash scripts/slurm-local.sh start    # install slurm-wlm + munge if missing, start munged, slurmctld, slurmd
#   bash scripts/slurm-local.sh status   # exit 0 when the node is up (sinfo answers)
#   bash scripts/slurm-local.sh stop     # stop what `start` started
#
# Everything Slurm writes (slurm.conf, state, spool, logs, pid files) lives in $SIDVID_SLURM_DIR
# (default /tmp/sidvid-slurm); clients find the cluster with SLURM_CONF=$SIDVID_SLURM_DIR/slurm.conf
# (the test sets it itself). Needs root (the daemons run as root, SlurmUser=root: fine for CI,
# not for a shared machine) and, when Slurm is not installed, apt-get (Debian's slurm-wlm).
# No cgroups: proctrack/linuxproc, task/none. Accounting is real (slurmdbd over a MariaDB whose data
# directory is $SIDVID_SLURM_DIR/mysql): `torchx run -s slurm` asks `sacct` for the job's state
# right after submitting, and `torchx status` / `sacct -j ID` answer from it.
# Exit 3 means "cannot run Slurm here" (not root, no apt-get, install failed); the test skips then.
set -Eeuo pipefail

DIR="${SIDVID_SLURM_DIR:-/tmp/sidvid-slurm}"
CONF="$DIR/slurm.conf"
CTLD_PORT="${SIDVID_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${SIDVID_SLURMD_PORT:-6818}"
DBD_PORT="${SIDVID_SLURMDBD_PORT:-6819}"
MYSQL_PORT="${SIDVID_MYSQL_PORT:-16819}"  # 127.0.0.1 only
MYSQL_RUN="$DIR/mysqld"  # the server runs as mysql: its socket, pid and log live in a directory of its own
MYSQL_SOCK="$MYSQL_RUN/mysqld.sock"
NODE="$(hostname -s)"
export SLURM_CONF="$CONF"

say() { echo "slurm-local: $*" >&2; }
STARTING=0
cannot() {
    say "cannot start Slurm: $*"
    if [ "$STARTING" = 1 ]; then stop >/dev/null 2>&1 || true; fi  # leave nothing half-started
    exit 3
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || cannot "slurm-wlm/munge are not installed and there is no apt-get"
    say "installing slurm-wlm, slurmdbd, munge and mariadb-server (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm slurmdbd munge mariadb-server; } \
        >"$DIR/apt.log" 2>&1 || cannot "apt-get install slurm-wlm slurmdbd munge mariadb-server failed (see $DIR/apt.log)"
}

write_conf() {
    local mem_kb mem_mb cpus
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    mem_mb=$((mem_kb / 1024 * 95 / 100))  # a little under the total: slurmd's own count is never less
    cpus="${SIDVID_SLURM_CPUS:-2}"
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat >"$CONF" <<CONF
# Written by scripts/slurm-local.sh: one node, this machine, no cgroups, no accounting.
ClusterName=sidvid-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=3600
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
    # slurmdbd reads slurmdbd.conf beside $SLURM_CONF; it must be private to SlurmUser.
    cat >"$DIR/slurmdbd.conf" <<CONF
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
AuthType=auth/munge
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=sidvid-local
StorageLoc=sidvid_slurm_acct
CONF
    chmod 0600 "$DIR/slurmdbd.conf"
}

start_mariadb() {
    local data="$DIR/mysql"
    if [ ! -d "$data/mysql" ]; then
        mkdir -p "$data"
        chown mysql:mysql "$data" 2>/dev/null || true
        mariadb-install-db --user=mysql --datadir="$data" --auth-root-authentication-method=socket \
            --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 || cannot "mariadb-install-db failed (see $DIR/log)"
    fi
    chmod 0755 "$DIR"
    mkdir -p "$MYSQL_RUN"
    chown mysql:mysql "$MYSQL_RUN" 2>/dev/null || true
    mariadbd --no-defaults --user=mysql --datadir="$data" --socket="$MYSQL_SOCK" --bind-address=127.0.0.1 --port="$MYSQL_PORT" \
        --pid-file="$MYSQL_RUN/mariadb.pid" --log-error="$MYSQL_RUN/mariadb.log" --innodb-buffer-pool-size=64M \
        >/dev/null 2>&1 &
    for _ in $(seq 100); do
        if mariadb --no-defaults --socket="$MYSQL_SOCK" -u root -e 'select 1' >/dev/null 2>&1; then
            # slurmdbd's account (over TCP; root is socket-authenticated only)
            mariadb --no-defaults --socket="$MYSQL_SOCK" -u root -e "
                CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'sidvid-local';
                GRANT ALL ON sidvid_slurm_acct.* TO 'slurm'@'127.0.0.1';" \
                || cannot "could not create the slurm database user"
            return
        fi
        sleep 0.2
    done
    cannot "mariadbd does not answer (see $MYSQL_RUN/mariadb.log)"
}

start_slurmdbd() {
    /usr/sbin/slurmdbd
    for _ in $(seq 100); do
        if sacctmgr -n list cluster format=cluster >/dev/null 2>&1; then
            sacctmgr -i -Q add cluster sidvid-local >/dev/null 2>&1 || true
            return
        fi
        sleep 0.2
    done
    cannot "slurmdbd does not answer (see $DIR/log/slurmdbd.log)"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # a munged is already answering
    fi
    local key=/etc/munge/munge.key
    if [ ! -s "$key" ]; then
        say "creating the munge key $key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then mungekey --create --keyfile="$key" --force; else
            dd if=/dev/urandom bs=1 count=1024 of="$key" status=none; fi
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    if id munge >/dev/null 2>&1; then
        chown munge:munge "$key" /run/munge /var/lib/munge /var/log/munge /etc/munge
        chmod 0400 "$key"
        chmod 0755 /run/munge
        runuser -u munge -- /usr/sbin/munged
    else
        chmod 0400 "$key"
        /usr/sbin/munged --force
    fi
    touch "$DIR/munged.started"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.2
    done
    cannot "munged does not answer"
}

node_state() { { sinfo -h -N -n "$NODE" -o %t 2>/dev/null || true; } | head -n1; }  # never fails: "" when down

start() {
    [ "$(id -u)" = 0 ] || cannot "needs root (to install packages and run the daemons)"
    mkdir -p "$DIR"
    if [ -f "$CONF" ] && [ "$(node_state)" = idle ]; then
        say "already up ($CONF)"
        return
    fi
    install
    STARTING=1
    trap 'say "start failed; stopping what started"; stop >/dev/null 2>&1' ERR
    write_conf
    start_munge
    start_mariadb
    start_slurmdbd
    /usr/sbin/slurmctld -f "$CONF" -i
    /usr/sbin/slurmd -f "$CONF" -N "$NODE"
    local state=""
    for _ in $(seq 120); do
        state="$(node_state)"
        case "$state" in
            idle) say "up: node $NODE idle ($CONF)"; return ;;
            down*|drain*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    say "node $NODE is not idle after 60 s (state: ${state:-none}); logs in $DIR/log"
    tail -n 20 "$DIR"/log/*.log >&2 || true
    stop
    exit 1
}

kill_pidfile() {
    local f="$1" pid
    [ -f "$f" ] || return 0
    pid="$(cat "$f")"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$f"
}

stop() {
    [ -d "$DIR" ] || return 0
    # Jobs first (nothing of ours outlives the cluster), then the daemons we started.
    scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    for f in "$DIR"/slurmd-*.pid; do kill_pidfile "$f"; done
    kill_pidfile "$DIR/slurmctld.pid"
    kill_pidfile "$DIR/slurmdbd.pid"
    kill_pidfile "$MYSQL_RUN/mariadb.pid"
    if [ -f "$DIR/munged.started" ]; then
        kill_pidfile /run/munge/munged.pid
        rm -f "$DIR/munged.started"
    fi
    say "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) [ "$(node_state)" = idle ] || [ "$(node_state)" = alloc ] || [ "$(node_state)" = mix ] ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
