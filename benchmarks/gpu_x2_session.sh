#!/usr/bin/env bash
# One call on a two-GPU H200 machine (device kind nvidia-h200-x2) that checks and times the
# kernels and the models. Two lanes, one per GPU, in two phases, so that nothing that is timed
# shares its GPU with anything else:
#
#   phase 1  GPU 0: untimed work -- cold starts (fresh caches), fla's first calls (its Triton
#                   compilation and autotuning fill the shared cache for phase 2), our launch
#                   variants compiled in parallel, the full-size GPU tests, errors vs float64
#            GPU 1: our models timed: training tokens/s + peak memory, then decoding
#   phase 2  GPU 0: launch-variant sweep -> choice, kernel benchmark vs fla / SDPA with the
#                   choice, decode-step benchmark, per-kernel profile
#            GPU 1: fla's model timed (compiled in phase 1), fla decoding, then our
#                   deltanet-340m again with the sweep's choice
#
#   bash benchmarks/gpu_x2_session.sh OUT_DIR     (repo root; fla wheels in .whl/; ~9 minutes)
#
# Everything lands in OUT_DIR/res (one log per part) and OUT_DIR/all.tgz; the summary is
# printed last. Env: DEADLINE_S (default 575: every part is cut to end before it).
set -u
OUT=${1:?usage: gpu_x2_session.sh OUT_DIR}
. benchmarks/gpu_lib.sh
export TOKENIZERS_PARALLELISM=false
begin_call "$OUT" 575

# Launch variants for the sweep (benchmarks/tune_kernels.py VARIANTS).
VARIANTS=${VARIANTS:-old,o_wy8,o_wyb8,o_dqkw8,o_saveai,o_split8,o_addr,o_bvmax32,o_dense8,new,new_wy4}
SWEEP="--dims 128,64 --lengths 1024,8192"

lane0_phase1() {
  export CUDA_VISIBLE_DEVICES=0
  run cold_op 60 python3 benchmarks/cold_start.py op
  run cold_model 120 python3 benchmarks/cold_start.py model
  # fla's first calls, in the background: its 2-layer model (cold: its first step compiles and
  # autotunes), the 340m model at every benchmarked length (fills the cache for lane 1's timed
  # run), and its kernels (chunk + fused recurrent, D = 64/128/256, and the decode step).
  ( run fla_cold_model 200 python3 benchmarks/cold_start.py model --fla --keep-cache
    run fla_warm_model 150 python3 -m deltanet.cli bench model --models fla-deltanet --lengths 2048,4096,8192 \
      --warmup 1 --steps 1 ) &
  run fla_warm_kernels 240 python3 - <<'EOF2' &
import time, torch
from deltanet.bench.kernels import _inputs, method_fn, bench_decode_step
for name in ("fla", "fla_recurrent"):
    f = method_fn(name)
    for D in (64, 128, 256):
        for T in ((1024, 8192, 16384) if name == "fla" else (1024, 2048)):
            t0 = time.perf_counter()
            try:
                q, k, v, b = _inputs(32768 // T, T, 16, D, torch.bfloat16, "cuda")
                f(q, k, v, b).backward(torch.randn_like(v))
                torch.cuda.synchronize()
                print(f"{name} D={D} T={T}: first fwd+bwd {time.perf_counter() - t0:.1f} s", flush=True)
            except Exception as e:
                print(f"{name} D={D} T={T}: {type(e).__name__}: {str(e)[:200]}", flush=True)
for D in (64, 128):
    for B in (1, 256):
        bench_decode_step("fla_recurrent", B, D, warmup=1, rep=1)
print("fla kernels warm", flush=True)
EOF2
  for V in ${VARIANTS//,/ }; do
    run "compile_$V" 150 python3 benchmarks/tune_kernels.py --compile-only --variants "$V" $SWEEP &
  done
  run pytest 150 python3 -m pytest -q -n 6 -p no:cacheprovider --durations=15 \
    tests/ops/test_triton_chunk.py tests/ops/test_recurrent.py
  run compare 90 python3 benchmarks/gpu_check_kernels.py --parts compare --out "$R/check"
  wait
  log "lane 0 phase 1 done"
}

lane1_phase1() {
  export CUDA_VISIBLE_DEVICES=1
  run model_ours 260 python3 -m deltanet.cli bench model \
    --models deltanet-340m,hybrid-swa-340m,hybrid-global-340m,transformer-340m --lengths 2048,4096,8192 \
    --warmup 3 --steps 6 --out "$R/model_ours.md"
  if grep -q '"model": "deltanet-340m".*"error"' "$R/model_ours.log"; then  # fused glue failed on CUDA?
    DELTANET_DISABLE_FUSION=1 run model_ours_eager 120 python3 -m deltanet.cli bench model \
      --models deltanet-340m --lengths 2048,8192 --warmup 3 --steps 6 --out "$R/model_ours_eager.md"
  fi
  run decode_ours 120 python3 -m deltanet.cli bench decode --models deltanet-340m --batch 1,32 \
    --prompt 2048 --new-tokens 256 --out "$R/decode_ours.md"
  log "lane 1 phase 1 done"
}

lane0_phase2() {
  export CUDA_VISIBLE_DEVICES=0
  run tune 120 python3 benchmarks/tune_kernels.py --no-profile --check --combine --variants "$VARIANTS" $SWEEP \
    --warmup 5 --rep 25 --json "$R/tune.jsonl" --choose "$R/tune_choice.json"
  # the benchmark runs the defaults (select_config); the sweep's choice is reported in tune_choice.json
  log "tune choice (not applied): $(cat "$R/tune_choice.json" 2>/dev/null)"
  run bench 150 python3 -m deltanet.bench.kernels --dims 128,64 --lengths 1024,2048,4096,8192,16384 \
    --methods ours,fla,sdpa,ours_recurrent,fla_recurrent --max-recurrent-T 2048 --warmup 10 --rep 40 \
    --json "$R/bench.jsonl"
  run bench256 50 python3 -m deltanet.bench.kernels --dims 256 --lengths 1024,4096,16384 \
    --methods ours,fla,sdpa --warmup 10 --rep 30 --json "$R/bench.jsonl"
  run decode_step 40 python3 -m deltanet.bench.kernels --dims 128,64 --decode-batches 1,8,32,128,256 \
    --methods ours_recurrent,fla_recurrent --json "$R/decode_step.jsonl"
  run profile 40 python3 benchmarks/tune_kernels.py --variants old --dims 128,64 --lengths 1024,16384 \
    --warmup 1 --rep 1
  log "lane 0 phase 2 done"
}

lane1_phase2() {
  export CUDA_VISIBLE_DEVICES=1
  run model_fla 150 python3 -m deltanet.cli bench model --models fla-deltanet --lengths 2048,4096,8192 \
    --warmup 3 --steps 6 --out "$R/model_fla.md"
  run decode_fla 120 python3 -m deltanet.cli bench decode --models fla-deltanet --batch 1,32 \
    --prompt 2048 --new-tokens 256 --out "$R/decode_fla.md"
  log "lane 1 phase 2 done"
}

lane0_phase1 &
P0=$!
lane1_phase1
# lane 1 waits for lane 0's phase 1 (fla compiled), but not past 300 s into the call
while kill -0 $P0 2>/dev/null && [ "$(now)" -lt 300 ]; do sleep 2; done
lane1_phase2 &
P1=$!
wait $P0
lane0_phase2
wait $P1
log "all done"

tar -czf "$OUT/all.tgz" -C "$OUT" res 2>/dev/null
cd "$R"
echo "===== timeline"; cat timeline.txt
for f in cold_op cold_model fla_cold_model; do grep -h "^COLD" $f.log 2>/dev/null; done
grep -h "first fwd+bwd" fla_warm_kernels.log 2>/dev/null | tail -4
tail -3 pytest.log 2>/dev/null
grep -h "^|" check/compare.log 2>/dev/null
grep -h "^CHOICE\|^COMBO\|^|" tune.log 2>/dev/null
grep -h "^|" bench.log bench256.log decode_step.log 2>/dev/null
grep -h "^PROFILE" profile.log 2>/dev/null
for f in model_ours model_ours_eager model_ours_tuned model_fla decode_ours decode_fla; do
  [ -f $f.md ] && grep "^|" $f.md
done
for f in *.log; do grep -l "Traceback\|Error" "$f" >/dev/null 2>&1 && { echo "--- errors in $f"; grep -h "Error" "$f" | tail -3; }; done
true
