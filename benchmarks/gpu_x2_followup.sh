#!/usr/bin/env bash
# The measurements the 2026-11-30 runs left open, for the next device session (nvidia-h200-x2).
# Each mode is one device call of ~9.5 minutes; run from the repo root with fla's wheels in .whl/.
#
#   bash benchmarks/gpu_x2_followup.sh OUT_DIR measure
#       GPU 0: fla's warm-up (untimed), then ours and fla's 340M DeltaNet timed in alternation in one
#              process (bench model --interleave), peak memory of each, the hybrids and the
#              Transformer after the compile fix, decoding of both
#       GPU 1: the kernel benchmark with the current defaults (SAVE_AI, one state program per SM)
#              after fla's kernels are compiled, then the full-size GPU tests (the whole log)
#   bash benchmarks/gpu_x2_followup.sh OUT_DIR mqar "MODELS" "LRS"
#       MQAR at T = 512, 64 pairs on both GPUs, 8 workers per GPU (3-4x the steps per job of the
#       20-per-GPU run), e.g. mqar "delta_net linear_attention" "3e-4 1e-3" and then
#       mqar "full_attention hybrid-swa hybrid-global" "3e-4 1e-3"
set -u
OUT=${1:?usage: gpu_x2_followup.sh OUT_DIR measure|mqar [MODELS LRS]}
MODE=${2:?usage: gpu_x2_followup.sh OUT_DIR measure|mqar [MODELS LRS]}
R=$OUT/res
mkdir -p "$R"
DEADLINE=${DEADLINE_S:-570}
. benchmarks/gpu_lib.sh
use_wheels
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton-shared
record_env
M="deltanet.cli bench model"

if [ "$MODE" = measure ]; then
  (
    export CUDA_VISIBLE_DEVICES=0
    run fla_warm_model 300 python3 -m $M --models fla-deltanet --lengths 2048,4096,8192 --warmup 1 --steps 1
    run ab 150 python3 -m $M --models deltanet-340m,fla-deltanet --lengths 2048,4096,8192 --warmup 3 --steps 5 \
      --interleave 4 --out "$R/ab.md"
    run mem 90 python3 -m $M --models deltanet-340m,fla-deltanet --lengths 8192 --warmup 2 --steps 2 --out "$R/mem.md"
    run others 120 python3 -m $M --models hybrid-swa-340m,hybrid-global-340m,transformer-340m --lengths 2048,8192 \
      --warmup 3 --steps 6 --out "$R/others.md"
    run decode 200 python3 -m deltanet.cli bench decode --models deltanet-340m,fla-deltanet --batch 1,32 \
      --prompt 2048 --new-tokens 256 --out "$R/decode.md"
  ) &
  (
    export CUDA_VISIBLE_DEVICES=1
    run fla_warm_kernels 150 python3 - <<'EOF'
import torch
from deltanet.bench.kernels import _inputs, method_fn
for D in (64, 128):
    for T in (1024, 8192):
        q, k, v, b = _inputs(32768 // T, T, 16, D, torch.bfloat16, "cuda")
        method_fn("fla")(q, k, v, b).backward(torch.randn_like(v))
torch.cuda.synchronize()
print("fla kernels warm", flush=True)
EOF
    run bench 150 python3 -m deltanet.bench.kernels --dims 128,64 --lengths 1024,2048,4096,8192,16384 \
      --methods ours,fla,sdpa --warmup 10 --rep 40 --json "$R/bench.jsonl"
    run pytest 400 python3 -m pytest -q -n 8 -p no:cacheprovider --durations=15 \
      tests/ops/test_triton_chunk.py tests/ops/test_recurrent.py
  ) &
  wait
elif [ "$MODE" = mqar ]; then
  MODELS=${3:?mqar needs MODELS}
  LRS=${4:?mqar needs LRS}
  run mqar "$DEADLINE" python3 benchmarks/gpu_mqar.py --out "$OUT/mqar" --models $MODELS --lrs $LRS \
    --workers 8 --deadline $((DEADLINE - 15))
  rm -f "$OUT/mqar/data.pt"
else
  echo "unknown mode $MODE (measure | mqar)"; exit 2
fi
log "all done"
tar -czf "$OUT/all.tgz" -C "$OUT" res $( [ -d "$OUT/mqar" ] && echo mqar ) 2>/dev/null
cd "$R"
cat timeline.txt
for f in ab mem others decode; do [ -f $f.md ] && grep "^|" $f.md | grep -v "^|---"; done
grep -h "^|" bench.log 2>/dev/null
tail -3 pytest.log 2>/dev/null
tail -25 mqar.log 2>/dev/null
true
