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
source launcher/local_ranks.sh
launch train --preset "$PRESET" --data "$DATA" --ds_config "$DS_CONFIG" --out "$OUT" --resume auto "$@"
