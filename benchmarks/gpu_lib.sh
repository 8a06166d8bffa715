# Shared by the GPU scripts (benchmarks/gpu_*.sh): source it from the repo root, then set R (the
# results folder) and DEADLINE (seconds after the source line) for `run`.
#
#   now / left       seconds since sourcing / until DEADLINE
#   log MSG          "[t s] MSG" to stdout and $R/timeline.txt
#   run NAME T CMD   CMD with its output in $R/NAME.log, cut at min(T, time left); skipped when
#                    5 s or less are left
#   use_wheels       install .whl/*.whl (e.g. fla's wheels, for side-by-side runs) into /tmp/site;
#                    PYTHONPATH = that + the repo; unpack .whl/mamba_ssm-*.tar.gz (the sdist, for fla's
#                    Mamba2: `pip download --no-deps --no-binary :all: mamba-ssm` fails on its build
#                    step here, so fetch the file from PyPI's JSON API) and point DELTANET_MAMBA_SSM_SRC at it
#   record_env       date, GPUs, Python/torch/triton/transformers/fla versions and the commit
#                    -> $R/env.txt (and stdout). The commit is read from a file COMMIT at the repo
#                    root when there is one (write it before the call, untracked and not ignored so
#                    that it travels: `git log -1 --format='commit %H %s' > COMMIT`): the GPU
#                    machine's copy of the git metadata can lag the working tree that is sent.
#   use_autotune_cache   TRITON_CACHE_DIR = /tmp/triton-cache, seeded with the Triton autotune results
#                    in .triton-autotune/ at the repo root (ignored; carry it) when there are some
#   save_autotune_cache DIR  every autotune result of this call (*.autotune.json, a few KB each) ->
#                    DIR/autotune.tgz; unpack it into .triton-autotune/ for the next call:
#                    `mkdir -p .triton-autotune && tar xzf autotune.tgz -C .triton-autotune`
#                    (a set from an H100, Triton 3.6, fla 0.6.0 — fla's DeltaNet training at T = 2K
#                    and 8K, both regimes — is kept in benchmarks/results/2026-12-07-h100-memory-vs-fla/)
#
# Why the autotune cache: fla autotunes each kernel on its first call at each shape (every config
# compiled and timed: 270 s for one training row of fla's DeltaNet on an H100, 2026-12-06), and
# each call gets a fresh machine. Triton keys a saved result by its own version, the GPU target
# (sm_90: H100 and H200 alike), the kernel's source and the tuning key, so a stale or foreign
# result is never used. Timed figures exclude warm-up either way; cold-start figures use their own
# empty cache (benchmarks/cold_start.py, bench_family.py). deltanet's own kernels do not autotune.
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
  # mamba_ssm's sdist (its Triton SSD kernels for fla's Mamba2; its CUDA extensions are never built):
  # unpacked, not installed (deltanet/bench/mamba_kernels.py loads the kernels from the source tree)
  local sdist
  sdist=$(ls .whl/mamba_ssm-*.tar.gz 2>/dev/null | head -1)
  if [ -n "$sdist" ]; then
    mkdir -p /tmp/mamba_ssm_src && tar xzf "$sdist" -C /tmp/mamba_ssm_src
    export DELTANET_MAMBA_SSM_SRC=/tmp/mamba_ssm_src
  fi
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
use_autotune_cache() {
  export TRITON_CACHE_DIR=/tmp/triton-cache
  mkdir -p "$TRITON_CACHE_DIR"
  if [ -d .triton-autotune ]; then
    cp -r .triton-autotune/. "$TRITON_CACHE_DIR"/
    echo "autotune results seeded: $(find .triton-autotune -name '*.autotune.json' | wc -l)"
  fi
}
save_autotune_cache() {
  (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf "$1/autotune.tgz" -T -)
  echo "autotune results saved: $(tar tzf "$1/autotune.tgz" | wc -l) -> $1/autotune.tgz"
}
