#!/usr/bin/env bash
# The GPU check in one command of at most 8 minutes on a bare GPU machine (torch present, no network):
# installs d2v_scale's dependencies from a wheel folder made beforehand by `make gpu-wheels` (when they
# are missing), then runs d2v_scale/tools/gpu_bench.py: each configuration under its own timeout, a
# failed one does not stop the others, one table at the end (P1, P2, P3, EMA exactness, the sync-debug
# micro-step, memory).
#
#   launcher/gpu_bench.sh [OUT_DIR]        WHEELS=.whl  BUDGET_S=400 (the runs' share of the 8 minutes)
#   TINY=1 PYTHON=.venv/bin/python launcher/gpu_bench.sh   the same driver with the debug presets (CPU)
#   ONLY=zero2_mb_timm,sync_step ...        a subset of the configurations
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_bench}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
BUDGET_S=${BUDGET_S:-400}
if ! "$PYTHON" -c "import deepspeed, webdataset, braceexpand, fire, termcolor, hjson, pydantic, boto3, soundfile" 2>/dev/null; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_bench: dependencies missing and no wheels in $WHEELS/: run 'make gpu-wheels' where PyPI is reachable and copy $WHEELS/ here" >&2
    exit 2
  fi
  SITE=${SITE:-/tmp/d2v-site}
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "gpu_bench: installing the wheels of $WHEELS/ into $SITE failed" >&2; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$SITE/bin:$PATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout --kill-after=10 $((BUDGET_S + 60)) "$PYTHON" -m d2v_scale.tools.gpu_bench --out "$OUT" --budget_s "$BUDGET_S" \
  ${TINY:+--tiny} ${ONLY:+--only "$ONLY"}
