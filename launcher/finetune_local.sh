#!/usr/bin/env bash
# Fine-tune on one node, N accelerators: GPUs when there are any, CPU ranks (gloo) otherwise.
#
#   INIT=runs/vitb TRAIN=/data/in1k/train/index.json VAL=/data/in1k/val/index.json \
#   DS_CONFIG=ds_configs/zero2.json OUT=runs/vitb_ft NPROC=8 launcher/finetune_local.sh [--finetune.layer_decay=0.75 ...]
#
# The recipe follows INIT (or PRESET=vit_base_patch16_ft ...); the configuration, weights and shards
# are checked in this process before any rank starts; the run resumes from OUT's newest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${INIT:?set INIT to the pretrained weights (run directory, weights file or fairseq checkpoint)}"
: "${TRAIN:?set TRAIN to labelled training shards}"
: "${VAL:?set VAL to labelled validation shards}"
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
OUT=${OUT:-runs/finetune}
BIN=${BIN:-.venv/bin}
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
else
  NPROC=${NPROC:-2}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one core per CPU rank
fi
ARGS=(--task image_classification --init "$INIT" --train "$TRAIN" --val "$VAL" --ds_config "$DS_CONFIG"
      --out "$OUT" --resume auto ${PRESET:+--preset "$PRESET"} "$@")
"$BIN/d2v" check "${ARGS[@]}" --world "$NPROC"
exec "$BIN/deepspeed" --num_accelerators "$NPROC" --no_local_rank --master_port "${MASTER_PORT:-29500}" \
  --module d2v_scale.cli finetune "${ARGS[@]}"
