#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for trying the sbatch scripts and for the tests.
#
#   launcher/slurm/local_cluster.sh start DIR     # writes DIR/slurm.conf, starts munged (if needed), slurmctld, slurmd
#   export SLURM_CONF=DIR/slurm.conf              # then: sbatch, squeue, scontrol, scancel ...
#   launcher/slurm/local_cluster.sh stop DIR      # stops what start started, by pid
#
# Needs Debian's slurm-wlm and munge (apt-get install -y slurm-wlm munge) and root. State, spool,
# logs and pid files all live in DIR; the daemons listen on free loopback ports.
set -euo pipefail
cmd=${1:?usage: local_cluster.sh start|stop|status DIR}
dir=$(realpath -m "${2:?usage: local_cluster.sh start|stop|status DIR}")
conf=$dir/slurm.conf

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start() {
  for bin in slurmctld slurmd munged sbatch; do
    command -v "$bin" >/dev/null || { echo "$bin not found: apt-get install -y slurm-wlm munge" >&2; exit 2; }
  done
  [ "$(id -u)" = 0 ] || { echo "the local cluster runs its daemons as root" >&2; exit 2; }
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  host=$(hostname -s)
  cpus=$(nproc --all)              # not plain nproc: it follows OMP_NUM_THREADS
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
  cat > "$conf" <<CONF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
KillWait=20
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge
    munged --force --pid-file="$dir/munged.pid"
  fi
  SLURM_CONF=$conf slurmctld
  SLURM_CONF=$conf slurmd
  for _ in $(seq 1 60); do
    if SLURM_CONF=$conf sinfo -h -o %T 2>/dev/null | grep -qx idle; then
      echo "Slurm is up: export SLURM_CONF=$conf"
      return 0
    fi
    sleep 1
  done
  echo "the node did not come up; see $dir/log" >&2
  exit 1
}

stop() {
  for d in slurmd slurmctld munged; do
    if [ -f "$dir/$d.pid" ]; then
      pid=$(cat "$dir/$d.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$dir/$d.pid"
    fi
  done
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF=$conf sinfo; SLURM_CONF=$conf squeue ;;
  *) echo "usage: local_cluster.sh start|stop|status DIR" >&2; exit 2 ;;
esac
