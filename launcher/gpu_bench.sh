#!/usr/bin/env bash
# The README's GPU benchmark table on one GPU: the data2vec 2.0 step beside a plain timm peer in the
# same process (efficiency ratio from FLOPs counted by FlopCounterMode), plus the phase breakdown.
#
#   launcher/gpu_bench.sh [OUT_DIR]          (D2V="python3 -m d2v_scale.cli" by default)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_bench}
D2V=${D2V:-python3 -m d2v_scale.cli}
mkdir -p "$OUT"
bench() {  # name, then bench step arguments
  local name=$1; shift
  echo "== $name" | tee "$OUT/$name.log"
  $D2V bench step --steps 10 --warmup 3 "$@" 2>&1 | tee -a "$OUT/$name.log"
}
G0="--data.global_batch=0"
bench vith_zero2_mb32_ckpt --preset vit_huge_patch14 --ds_config ds_configs/zero2.json --data.batch_size=32 $G0 \
  --model.grad_checkpointing=true --compare timm --peer_batch_size 64
bench vith_zero2_mb8_breakdown --preset vit_huge_patch14 --ds_config ds_configs/zero2.json --data.batch_size=8 $G0 \
  --breakdown
bench vith_zero0_autocast_mb32_ckpt --preset vit_huge_patch14 --ds_config ds_configs/zero0_autocast.json \
  --data.batch_size=32 $G0 --model.grad_checkpointing=true --compare timm --peer_batch_size 64
bench vitb_zero2_mb64 --preset vit_base_patch16 --ds_config ds_configs/zero2.json --data.batch_size=64 $G0 \
  --compare timm --peer_batch_size 256
bench audio_large_zero2_mb4_ckpt --preset audio_large --ds_config ds_configs/zero2.json --data.batch_size=4 $G0 \
  --model.grad_checkpointing=true --compare timm --peer_batch_size 16
bench text_base_zero2_mb16 --preset text_base --ds_config ds_configs/zero2.json --data.batch_size=16 $G0 \
  --compare timm --peer_batch_size 64
bench vith_zero2_mb32_compiled --preset vit_huge_patch14 --ds_config ds_configs/zero2.json --data.batch_size=32 $G0 \
  --model.grad_checkpointing=true --run.compile=true --compare timm --peer_batch_size 64
grep -H "efficiency d2v2 / peer\|device busy" "$OUT"/*.log
# the headline configuration: ZeRO-3 student with the host-offloaded, partitioned teacher, against ZeRO-2
bench vith_zero3_sharded_mb32_ckpt --preset vit_huge_patch14 --ds_config ds_configs/zero3.json --data.batch_size=32 $G0 \
  --model.grad_checkpointing=true --teacher.placement=sharded --breakdown
bench vith_zero3_replicated_mb32_ckpt --preset vit_huge_patch14 --ds_config ds_configs/zero3.json --data.batch_size=32 $G0 \
  --model.grad_checkpointing=true --teacher.placement=replicated --breakdown
bench vith_zero2_mb32_ckpt_breakdown --preset vit_huge_patch14 --ds_config ds_configs/zero2.json --data.batch_size=32 $G0 \
  --model.grad_checkpointing=true --breakdown
bench audio_large_zero3_sharded_mb4 --preset audio_large --ds_config ds_configs/zero3.json --data.batch_size=4 $G0 \
  --teacher.placement=sharded --breakdown
bench audio_large_zero2_mb4 --preset audio_large --ds_config ds_configs/zero2.json --data.batch_size=4 $G0 --breakdown
$D2V bench ema --preset vit_huge_patch14 --gathered false 2>&1 | tee "$OUT/ema_vith.log"
grep -H "step time\|EMA update" "$OUT"/vith_zero*_mb32_ckpt*.log "$OUT"/audio_large_zero*.log
