# Sourced by the one-node launchers (run_local.sh, finetune_local.sh): how many ranks this node
# runs (its GPUs when there are any, else NPROC CPU ranks on gloo, one core each) and `launch`.
BIN=${BIN:-.venv/bin}
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
else
  NPROC=${NPROC:-2}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

# launch COMMAND ARGS...: `d2v check` in this process (nothing starts on bad input), then the ranks
launch() {
  local cmd=$1
  shift
  "$BIN/d2v" check "$@" --world "$NPROC"
  exec "$BIN/deepspeed" --num_accelerators "$NPROC" --no_local_rank --master_port "${MASTER_PORT:-29500}" \
    --module d2v_scale.cli "$cmd" "$@"
}
