#!/usr/bin/env bash
# One device call that measures everything the GPU issues ask for, each part time-boxed so one
# slow part cannot eat the others:
#   kernels  (tuning sweep + kernel benchmark vs fla and SDPA)   benchmarks/gpu_kernels_final.sh
#   model    (training tokens/s + peak memory vs fla, decode)     deltanet bench model / decode
#   train    (deltanet-125m on the installed Python sources)     benchmarks/gpu_train.py
# Usage (repo root, on the GPU machine, with fla's wheels in .whl/):
#   bash benchmarks/gpu_session.sh OUT_DIR [part ...]   # parts: kernels model-ours model-fla decode train
set -u
OUT=${1:?usage: gpu_session.sh OUT_DIR [parts]}; shift
PARTS=${*:-kernels model-ours model-fla decode train}
mkdir -p "$OUT/res"
R=$OUT/res DEADLINE=0
. benchmarks/gpu_lib.sh
use_wheels
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
record_env

part() {  # part NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2
  echo "=== $name (timeout ${t}s): $*"
  local t0=$SECONDS
  timeout "$t" "$@" > "$OUT/res/$name.log" 2>&1
  echo "=== $name rc=$? in $((SECONDS - t0))s"
}
for p in $PARTS; do
  case $p in
    kernels) part kernels "${KERNELS_TIMEOUT:-210}" bash benchmarks/gpu_kernels_final.sh "$OUT/res/kernels" ;;
    model-ours) part model-ours "${MODEL_TIMEOUT:-110}" python3 -m deltanet.cli bench model \
             --models deltanet-340m,transformer-340m,hybrid-swa-340m --lengths 2048,8192 --warmup 3 --steps 5 \
             --out "$OUT/res/model-ours.md" ;;
    model-fla) part model-fla "${FLA_TIMEOUT:-210}" python3 -m deltanet.cli bench model \
             --models fla-deltanet --lengths 2048,8192 --warmup 3 --steps 5 --out "$OUT/res/model-fla.md" ;;
    decode) part decode "${DECODE_TIMEOUT:-80}" python3 -m deltanet.cli bench decode \
             --models deltanet-340m,fla-deltanet --batch 1,32 --prompt 2048 --new-tokens 128 --repeats 1 \
             --out "$OUT/res/decode.md" ;;
    train) part train "${TRAIN_TIMEOUT:-170}" python3 benchmarks/gpu_train.py "$OUT/res/train" \
             --max-time-s "${TRAIN_SECONDS:-90}" ;;
    *) echo "unknown part $p" ;;
  esac
done
# At most 8 files come back: one archive with everything, plus the tables.
tar -czf "$OUT/all.tgz" -C "$OUT" res
for f in "$OUT"/res/*.md "$OUT"/res/*/*.md; do [ -f "$f" ] && { echo "----- $f"; cat "$f"; }; done
for f in "$OUT"/res/*.log; do echo "----- tail $f"; tail -5 "$f"; done
