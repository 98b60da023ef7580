#!/usr/bin/env bash
# Bring up a one-node Slurm cluster (munge + slurmctld + slurmd) on this machine, as root.
# Idempotent: installs the Debian packages only when missing, rewrites the config only when
# it changed, starts each daemon only when it is not answering, and waits for the node to be idle.
# Used by tests/test_slurm_e2e.py and CI; exits non-zero with a message when Slurm cannot start.
set -euo pipefail

[[ $(id -u) -eq 0 ]] || { echo "setup_local_slurm: must run as root" >&2; exit 2; }
NODE=$(hostname -s)
CPUS=$(nproc)
CONF=/etc/slurm/slurm.conf
LOG=/var/log/slurm

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || { echo "setup_local_slurm: no slurm and no apt-get" >&2; exit 3; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge: a key readable only by the munge user, and the daemon answering on its socket.
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key && chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || { echo "setup_local_slurm: munged did not start" >&2; exit 4; }
fi

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOG"
NEW_CONF=$(cat <<CONF
# Written by launch/slurm/setup_local_slurm.sh: a one-node test cluster.
ClusterName=dsv3test
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=10
NodeName=$NODE CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
)
restart=0
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$NEW_CONF" ]]; then
  printf '%s\n' "$NEW_CONF" > "$CONF"
  restart=1
fi

stop_pidfile() {  # stop the daemon recorded in a pid file, if it is alive
  local pid
  pid=$(cat "$1" 2>/dev/null || true)
  if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
}
alive() { local pid; pid=$(cat "$1" 2>/dev/null || true); [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; }

if (( restart )); then
  stop_pidfile /run/slurmd.pid
  stop_pidfile /run/slurmctld.pid
fi
alive /run/slurmctld.pid || /usr/sbin/slurmctld
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
alive /run/slurmd.pid || /usr/sbin/slurmd

for _ in $(seq 150); do
  state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
  case $state in
    idle|mixed|allocated) echo "setup_local_slurm: node $NODE $state ($CPUS CPUs)"; exit 0 ;;
    down*|drain*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.2
done
echo "setup_local_slurm: node $NODE not ready (state: ${state:-none}); see $LOG/" >&2
exit 5
