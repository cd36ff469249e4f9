#!/usr/bin/env bash
# One node, N accelerators: GPUs when there are any, CPU ranks (gloo) otherwise.
#
#   DATA='/data/shards/index.json' PRESET=vit_base_patch16 DS_CONFIG=ds_configs/zero2.json \
#   OUT=runs/vitb NPROC=8 launcher/run_local.sh [--optim.lr=5e-4 ...]
#
# The configuration is checked in this process before any rank starts; the run resumes from
# OUT/checkpoints/latest when there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA:?set DATA to shards (brace pattern, directory or index.json)}"
PRESET=${PRESET:-vit_base_patch16_debug}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
OUT=${OUT:-runs/$PRESET}
BIN=${BIN:-.venv/bin}
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
else
  NPROC=${NPROC:-2}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one core per CPU rank
fi
ARGS=(--preset "$PRESET" --data "$DATA" --ds_config "$DS_CONFIG" --out "$OUT" --resume auto "$@")
"$BIN/d2v" check "${ARGS[@]}" --world "$NPROC"
exec "$BIN/deepspeed" --num_accelerators "$NPROC" --no_local_rank --master_port "${MASTER_PORT:-29500}" \
  --module d2v_scale.cli train "${ARGS[@]}"
