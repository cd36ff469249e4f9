#!/usr/bin/env bash
# Fine-tune on one node, N accelerators: GPUs when there are any, CPU ranks (gloo) otherwise.
#
#   [TASK=image_classification] INIT=runs/vitb TRAIN=/data/in1k/train/index.json VAL=/data/in1k/val/index.json \
#   DS_CONFIG=ds_configs/zero2.json OUT=runs/vitb_ft NPROC=8 launcher/finetune_local.sh [--finetune.layer_decay=0.75 ...]
#
# The recipe follows INIT (or PRESET=vit_base_patch16_ft ...); the configuration, weights and shards
# are checked in this process before any rank starts; the run resumes from OUT's newest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${INIT:?set INIT to the pretrained weights (run directory, weights file or fairseq checkpoint)}"
: "${TRAIN:?set TRAIN to labelled training shards}"
: "${VAL:?set VAL to labelled validation shards}"
TASK=${TASK:-image_classification}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
OUT=${OUT:-runs/finetune}
source launcher/local_ranks.sh
launch finetune --task "$TASK" --init "$INIT" --train "$TRAIN" --val "$VAL" --ds_config "$DS_CONFIG" --out "$OUT" \
  --resume auto ${PRESET:+--preset "$PRESET"} "$@"
