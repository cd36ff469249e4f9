#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for trying the sbatch scripts and for the tests.
#
#   launcher/slurm/local_cluster.sh start DIR     # writes DIR/slurm.conf, starts munged (if needed), slurmctld, slurmd
#   export SLURM_CONF=DIR/slurm.conf              # then: sbatch, squeue, scontrol, scancel ...
#   launcher/slurm/local_cluster.sh stop DIR      # stops what start started, by pid
#   NODES=2 launcher/slurm/local_cluster.sh start DIR   # two nodes: d2v-n1 on 127.0.0.2, d2v-n2 on 127.0.0.3
#
# Needs Debian's slurm-wlm and munge (apt-get install -y slurm-wlm munge) and root. State, spool,
# logs and pid files all live in DIR; the daemons listen on free loopback ports. With NODES=N, N
# slurmd run here (`slurmd -N d2v-nK`), each with its own port, spool and address (127.0.0.K+1, the
# NodeAddr Slurm and the job script use to reach it), sharing this machine's CPUs between them.
set -euo pipefail
cmd=${1:?usage: local_cluster.sh start|stop|status DIR}
dir=$(realpath -m "${2:?usage: local_cluster.sh start|stop|status DIR}")
conf=$dir/slurm.conf
nodes=${NODES:-1}

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
  node_lines() {   # one node on 127.0.0.1, or NODES nodes on 127.0.0.2.. sharing the CPUs and memory
    if [ "$nodes" = 1 ]; then
      echo "NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN"
      return
    fi
    for k in $(seq 1 "$nodes"); do
      echo "NodeName=d2v-n$k NodeAddr=127.0.0.$((k + 1)) NodeHostname=$host Port=$(free_port)" \
           "CPUs=$(( cpus / nodes > 0 ? cpus / nodes : 1 )) RealMemory=$(( mem / nodes )) State=UNKNOWN"
    done
  }
  cat > "$conf" <<CONF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
$([ "$nodes" = 1 ] && echo "SlurmdPort=$(free_port)")
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
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
$(node_lines)
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge
    munged --force --pid-file="$dir/munged.pid"
  fi
  SLURM_CONF=$conf slurmctld
  if [ "$nodes" = 1 ]; then
    SLURM_CONF=$conf slurmd -N "$host"
  else
    for k in $(seq 1 "$nodes"); do SLURM_CONF=$conf slurmd -N "d2v-n$k"; done
  fi
  for _ in $(seq 1 60); do
    if [ "$(SLURM_CONF=$conf sinfo -h -N -o %T 2>/dev/null | grep -cx idle)" = "$nodes" ]; then
      echo "Slurm is up: export SLURM_CONF=$conf"
      return 0
    fi
    sleep 1
  done
  echo "the node did not come up; see $dir/log" >&2
  exit 1
}

stop() {
  for f in "$dir"/slurmd-*.pid "$dir/slurmctld.pid" "$dir/munged.pid"; do
    if [ -f "$f" ]; then
      pid=$(cat "$f")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$f"
    fi
  done
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF=$conf sinfo; SLURM_CONF=$conf squeue ;;
  *) echo "usage: local_cluster.sh start|stop|status DIR" >&2; exit 2 ;;
esac
