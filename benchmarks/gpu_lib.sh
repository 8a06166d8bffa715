# Shared by the device-call scripts (benchmarks/gpu_*.sh): source it from the repo root, then
# set R (the results folder) and, for `run`, DEADLINE (seconds after the source line), or call
# begin_call, which sets both.
#
#   now / left       seconds since sourcing / until DEADLINE
#   log MSG          "[t s] MSG" to stdout and $R/timeline.txt
#   run NAME T CMD   CMD with its output in $R/NAME.log, cut at min(T, time left); skipped when
#                    5 s or less are left
#   use_wheels       install .whl/*.whl (fla, carried) into /tmp/site; PYTHONPATH = that + the repo
#   record_env       date, GPUs, Python/torch/triton/transformers/fla versions and the commit
#                    -> $R/env.txt (and stdout)
#   mps_start / mps_stop   CUDA MPS daemon for several processes per GPU (see below)
#   begin_call OUT S  the two-GPU call scripts' start: R = OUT/res (created), DEADLINE = $DEADLINE_S
#                     or S, fla's wheels installed, one Triton cache for all processes
#                     (/tmp/triton-shared: fla compiled once), environment recorded
START=$(date +%s)
now() { echo $(( $(date +%s) - START )); }
left() { echo $(( DEADLINE - $(now) )); }
log() { echo "[$(now) s] $*" | tee -a "$R/timeline.txt"; }
run() {
  local name=$1 t=$2; shift 2
  local l; l=$(left); [ "$t" -gt "$l" ] && t=$l
  if [ "$t" -le 5 ]; then log "skip $name (no time left)"; return 0; fi
  log "start $name (<= ${t}s)"
  timeout "$t" "$@" >"$R/$name.log" 2>&1
  log "end $name rc=$?"
}
use_wheels() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
  else
    export PYTHONPATH=$PWD
  fi
}
begin_call() {
  R=$1/res
  mkdir -p "$R"
  DEADLINE=${DEADLINE_S:-$2}
  use_wheels
  export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton-shared
  record_env
}
record_env() {
  {
    date -u; nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
    python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'gpus', torch.cuda.device_count())"
    python3 -c "import fla; print('fla', fla.__version__)" || echo "fla not importable"
    cat COMMIT 2>/dev/null || git log -1 --format='commit %H %s' 2>/dev/null
  } >"$R/env.txt" 2>&1
  cat "$R/env.txt"
}
# mps_start        start the CUDA MPS control daemon (pipes and logs under /tmp) so that the
#                  processes sharing a GPU run concurrently instead of time-sliced; checks that a
#                  CUDA process can still start on every GPU and otherwise stops it again.
#                  Never fails: without MPS everything runs as before. Sets MPS=on|off.
# mps_stop         stop the daemon if mps_start started it
MPS=off
mps_start() {
  if ! command -v nvidia-cuda-mps-control >/dev/null 2>&1; then log "mps: no nvidia-cuda-mps-control"; return 0; fi
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d >"$R/mps.log" 2>&1 &&
     timeout 90 python3 -c "import torch
assert torch.cuda.device_count() > 0, 'no GPU visible'
for i in range(torch.cuda.device_count()):
    torch.ones(1, device=f'cuda:{i}').add_(1); torch.cuda.synchronize(i)
print('mps probe ok on', torch.cuda.device_count(), 'GPUs')" >>"$R/mps.log" 2>&1; then
    MPS=on; log "mps: on ($(tail -1 "$R/mps.log"))"
  else
    log "mps: failed, running without it ($(tail -1 "$R/mps.log"))"
    echo quit | nvidia-cuda-mps-control >/dev/null 2>&1
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
}
mps_stop() {
  [ "$MPS" = on ] || return 0
  echo quit | timeout 20 nvidia-cuda-mps-control >/dev/null 2>&1
  cp "$CUDA_MPS_LOG_DIRECTORY/control.log" "$R/mps-control.log" 2>/dev/null
  MPS=off; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  log "mps: stopped"
}
