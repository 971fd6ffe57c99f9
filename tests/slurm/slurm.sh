#!/usr/bin/env bash
# A real single-node Slurm (22.05, Debian packages) for the workflow's cluster test.
#
#   tests/slurm/slurm.sh install        apt-get the packages if missing (root)
#   tests/slurm/slurm.sh start DIR      write /etc/slurm/{slurm,gres}.conf, start munged,
#                                       slurmctld, slurmd; wait until the node is idle
#   tests/slurm/slurm.sh stop DIR       stop the daemons by their pid files under DIR
#
# Runs as root without systemd.  slurm.conf must sit at the default path: the jobstep
# executor drops SLURM_CONF before its inner srun.  One fake GPU (gres gpu:fake:1 on
# /dev/null) lets GPU rules be submitted with --gpus=1.  Only files carrying the
# maskworks marker are ever overwritten.
set -euo pipefail

MARK="# maskworks test cluster (tests/slurm/slurm.sh)"
CONF=/etc/slurm/slurm.conf
GRES=/etc/slurm/gres.conf

die() { echo "slurm.sh: $*" >&2; exit 1; }

install_pkgs() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    command -v apt-get >/dev/null || die "apt-get not available: cannot install Slurm"
    [ "$(id -u)" = 0 ] || die "installing Slurm needs root"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
    local dir=$1 cpus mem
    for f in "$CONF" "$GRES"; do
        if [ -e "$f" ] && ! grep -qF "$MARK" "$f"; then
            die "$f exists and was not written by this script; refusing to overwrite it"
        fi
    done
    cpus=$(nproc)
    # The rules ask for what real volumes need (up to 16 GB); the node declares 64 GB whatever
    # this machine has (config_overrides: slurmd does not check it), so jobs run with the
    # shipped resources while the demo itself stays small.
    mem=64000
    mkdir -p /etc/slurm "$dir/state" "$dir/spool"
    cat >"$CONF" <<CONF
$MARK
ClusterName=maskworks
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=600
AccountingStorageType=accounting_storage/none
# Memory limits enforced as a cluster does (no cgroups here): a job step over its --mem is killed
# (OUT_OF_MEMORY), polled every second.
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
JobCompType=jobcomp/none
SchedulerType=sched/backfill
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:fake:1 State=UNKNOWN
PartitionName=main Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
    cat >"$GRES" <<GRESCONF
$MARK
AutoDetect=off
NodeName=localhost Name=gpu Type=fake File=/dev/null
GRESCONF
}

start() {
    local dir=${1:?usage: slurm.sh start DIR}
    [ "$(id -u)" = 0 ] || die "the test cluster runs as root"
    install_pkgs
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    write_conf "$dir"
    # munge: key from the package (create one if missing), daemon as the munge user.
    [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    if ! munge -n >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
        for _ in $(seq 50); do munge -n >/dev/null 2>&1 && [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
        munge -n >/dev/null 2>&1 || die "munged did not start"
        # Stopped by this pid file later (a munged that was already running is left alone).
        cp /run/munge/munged.pid "$dir/munged.pid"
    fi
    slurmctld
    for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
    slurmd -N localhost
    for _ in $(seq 150); do
        state=$(sinfo -h -N -o '%t' 2>/dev/null | head -n1)
        case "$state" in idle) echo "slurm up: node localhost idle ($dir)"; return 0 ;; esac
        sleep 0.2
    done
    tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
    die "node did not become idle (state: ${state:-none})"
}

stop() {
    local dir=${1:?usage: slurm.sh stop DIR}
    for d in slurmd slurmctld munged; do
        pidfile="$dir/$d.pid"
        [ -s "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid" || true
        fi
        rm -f "$pidfile"
    done
    echo "slurm stopped ($dir)"
}

case "${1:-}" in
    install) install_pkgs ;;
    start) start "${2:-}" ;;
    stop) stop "${2:-}" ;;
    *) die "usage: slurm.sh install | start DIR | stop DIR" ;;
esac
