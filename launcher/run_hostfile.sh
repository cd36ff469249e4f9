#!/usr/bin/env bash
# Multi-node training with the deepspeed launcher and a hostfile (`host slots=N` lines).
#
#   HOSTFILE=launcher/hostfile.example DATA='s3://bucket/in1k/train-{000000..001023}.tar' \
#   PRESET=vit_large_patch16 DS_CONFIG=ds_configs/zero3.json OUT=/shared/runs/vitl \
#   launcher/run_hostfile.sh [--optim.lr=4e-4 ...]
#
# Default: run this once, on the first host; deepspeed reaches the others with pdsh over passwordless
# ssh and forwards the variables listed in ./.deepspeed_env (written below) plus NCCL_*, PYTHON*, UCX_*.
# Without ssh (NO_SSH=1): run it on every host with NODE_RANK=0..N-1 and MASTER_ADDR=<first host>;
# each launcher starts its own host's ranks.
#
# Crossing nodes: OMP_NUM_THREADS, the AWS settings that are not secrets (AWS_PROFILE,
# AWS_ENDPOINT_URL, AWS_DEFAULT_REGION) and D2V_* go into .deepspeed_env. Secret keys are not
# written anywhere: give every host the same ~/.aws/credentials profile (a shared home does it).
# NCCL: set NCCL_SOCKET_IFNAME (e.g. ib0 or eth0) and, on InfiniBand, NCCL_IB_HCA; NCCL_DEBUG=WARN
# shows connection problems. The run directory (OUT) must be on storage every host sees.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${HOSTFILE:?set HOSTFILE (see launcher/hostfile.example)}"
: "${DATA:?set DATA to shards (brace pattern, s3:// prefix or index.json)}"
PRESET=${PRESET:-vit_base_patch16}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
OUT=${OUT:-runs/$PRESET}
BIN=${BIN:-$PWD/.venv/bin}
MASTER_PORT=${MASTER_PORT:-29500}
[ -f "$HOSTFILE" ] || { echo "hostfile $HOSTFILE not found" >&2; exit 2; }
WORLD=$(awk '!/^[[:space:]]*(#|$)/ { for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { split($i, s, "="); n += s[2] } } END { print n }' "$HOSTFILE")
HOSTS=$(awk '!/^[[:space:]]*(#|$)/ {print $1}' "$HOSTFILE")
MASTER_ADDR=${MASTER_ADDR:-$(echo "$HOSTS" | head -n 1)}

: > .deepspeed_env
for v in OMP_NUM_THREADS AWS_PROFILE AWS_ENDPOINT_URL AWS_DEFAULT_REGION $(compgen -e | grep '^D2V_' || true); do
  if [ -n "${!v:-}" ]; then echo "$v=${!v}" >> .deepspeed_env; fi
done

ARGS=(--preset "$PRESET" --data "$DATA" --ds_config "$DS_CONFIG" --out "$OUT" --resume auto "$@")
"$BIN/d2v" check "${ARGS[@]}" --world "$WORLD"
LAUNCH=("$BIN/deepspeed" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --no_local_rank)
if [ "${NO_SSH:-0}" = 1 ]; then
  LAUNCH+=(--no_ssh --node_rank "${NODE_RANK:?set NODE_RANK for NO_SSH=1}")
fi
exec "${LAUNCH[@]}" --module d2v_scale.cli train "${ARGS[@]}"
