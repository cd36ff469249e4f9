#!/usr/bin/env bash
# Multi-node training with the deepspeed launcher and a hostfile (`host slots=N` lines).
#
#   HOSTFILE=launcher/hostfile.example DATA='s3://bucket/in1k/train-{000000..001023}.tar' \
#   PRESET=vit_large_patch16 DS_CONFIG=ds_configs/zero3.json OUT=/shared/runs/vitl \
#   launcher/run_hostfile.sh [--optim.lr=4e-4 ...]
#
# Default: run this once, on the first host; deepspeed reaches every host (this one too) with pdsh
# over passwordless ssh and starts its ranks there, from this checkout's path and this Python's path:
# both must be the same on every host, and OUT must be storage every host mounts at the same path
# (the ranks prove it at start and refuse otherwise). Without ssh (NO_SSH=1): run it on every host
# with NODE_RANK=0..N-1 and MASTER_ADDR=<first host>; each launcher starts its own host's ranks.
#
# Options (environment): MASTER_ADDR (first host), MASTER_PORT (29500), SSH_PORT (for the ssh check
# and pdsh), NO_SSH_CHECK=1, LAUNCHER (pdsh; openmpi, mvapich, impi, mpich, slurm), LAUNCHER_ARGS,
# INCLUDE / EXCLUDE (deepspeed's host filters, e.g. INCLUDE='node001@node002:0,1'), RANK_LOGS=1 (each
# rank's output in OUT/logs/ instead of the console), BIN (the venv's bin), PYTHON (the interpreter
# that runs deepspeed; its path is in the pattern of DeepSpeed's stop, see the README).
#
# Crossing nodes: the variables below go into OUT/deepspeed_env (DS_ENV_FILE: per run, never in the
# checkout), which deepspeed exports on every host: OMP_NUM_THREADS, the network selection
# (GLOO_SOCKET_IFNAME, TP_SOCKET_IFNAME, NCCL_*, TORCH_NCCL_*, FI_* for EFA), TORCH_DISTRIBUTED_DEBUG,
# TORCH_EXTENSIONS_DIR (where DeepSpeed's JIT-built ops live),
# the AWS settings that are not secrets (AWS_PROFILE, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION) and D2V_*.
# Secret keys are not written anywhere: give every host the same ~/.aws/credentials profile.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${HOSTFILE:?set HOSTFILE (see launcher/hostfile.example)}"
: "${DATA:?set DATA to shards (brace pattern, s3:// prefix or index.json)}"
: "${OUT:?set OUT to the run directory, on storage every host mounts at the same path (e.g. /shared/runs/vitl)}"
PRESET=${PRESET:-vit_base_patch16}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
BIN=${BIN:-$PWD/.venv/bin}
PYTHON=${PYTHON:-$BIN/python}
MASTER_PORT=${MASTER_PORT:-29500}
[ -f "$HOSTFILE" ] || { echo "hostfile $HOSTFILE not found" >&2; exit 2; }
OUT=$(realpath -m "$OUT")     # the ranks on the other hosts start in this checkout's path, not this shell's

# the hosts and slots deepspeed will use (its own parser: the same filters, the same errors)
POOL=$("$PYTHON" - "$HOSTFILE" "${INCLUDE:-}" "${EXCLUDE:-}" <<'EOF'
import sys
from deepspeed.launcher.runner import fetch_hostfile, parse_inclusion_exclusion
try:
    pool = parse_inclusion_exclusion(fetch_hostfile(sys.argv[1]), sys.argv[2], sys.argv[3])
except (ValueError, KeyError, TypeError) as e:
    sys.exit(f"hostfile {sys.argv[1]} with INCLUDE={sys.argv[2]!r} EXCLUDE={sys.argv[3]!r}: {e}")
print(sum(len(v) for v in pool.values()), next(iter(pool)))
EOF
)
POOL=$(tail -n 1 <<< "$POOL")       # (DeepSpeed logs its accelerator on stdout)
read -r WORLD FIRST <<< "$POOL"
MASTER_ADDR=${MASTER_ADDR:-$FIRST}

ARGS=(--preset "$PRESET" --data "$DATA" --ds_config "$DS_CONFIG" --out "$OUT" --resume auto "$@")
"$BIN/d2v" check "${ARGS[@]}" --world "$WORLD"

mkdir -p "$OUT"
export DS_ENV_FILE=$OUT/deepspeed_env
ENV_TMP=$DS_ENV_FILE.$(hostname).$$       # NO_SSH=1: every host's launcher writes it
: > "$ENV_TMP"
for v in OMP_NUM_THREADS GLOO_SOCKET_IFNAME TP_SOCKET_IFNAME TORCH_DISTRIBUTED_DEBUG TORCH_EXTENSIONS_DIR AWS_PROFILE \
         AWS_ENDPOINT_URL AWS_DEFAULT_REGION $(compgen -e | grep -E '^(D2V|NCCL|TORCH_NCCL|FI)_' || true); do
  if [ -n "${!v:-}" ]; then echo "$v=${!v}" >> "$ENV_TMP"; fi
done
mv "$ENV_TMP" "$DS_ENV_FILE"

LAUNCH=("$PYTHON" "$BIN/deepspeed" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
        --no_local_rank --launcher "${LAUNCHER:-pdsh}")
[ -z "${SSH_PORT:-}" ] || LAUNCH+=(--ssh_port "$SSH_PORT")
[ "${NO_SSH_CHECK:-0}" != 1 ] || LAUNCH+=(--no_ssh_check)
[ -z "${LAUNCHER_ARGS:-}" ] || LAUNCH+=(--launcher_args "$LAUNCHER_ARGS")
[ -z "${INCLUDE:-}" ] || LAUNCH+=(--include "$INCLUDE")
[ -z "${EXCLUDE:-}" ] || LAUNCH+=(--exclude "$EXCLUDE")
[ "${RANK_LOGS:-0}" != 1 ] || LAUNCH+=(--enable_each_rank_log "$OUT/logs")
if [ "${NO_SSH:-0}" = 1 ]; then
  LAUNCH+=(--no_ssh --node_rank "${NODE_RANK:?set NODE_RANK for NO_SSH=1}")
fi
exec "${LAUNCH[@]}" --module d2v_scale.cli train "${ARGS[@]}"
