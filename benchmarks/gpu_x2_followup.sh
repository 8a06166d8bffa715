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
#   bash benchmarks/gpu_x2_followup.sh OUT_DIR kernels
#       GPU 0: every launch variant of tune_kernels.py compiled in parallel, then the sweep
#              (one setting at a time, checked against the fp32 oracle) at D = 128, 64 x
#              T = 1K, 8K, 16K, then the full-size GPU tests of the chunk op
#       GPU 1: fla's kernels compiled (untimed), per-kernel profiles of ours and fla, the kernel
#              benchmark (ours, fla, SDPA) with the committed defaults, the recurrent-op tests
#   bash benchmarks/gpu_x2_followup.sh OUT_DIR final
#       GPU 0: fla's kernels compiled, a two-variant check of the state V-block rule at D = 128,
#              T = 8K / 16K, the kernel benchmark (ours with the winner, fla, SDPA), the full-size
#              GPU tests, then the hybrids and the Transformer
#       GPU 1: fla's 340M model compiled, then ours and fla's timed in alternation (bench model
#              --interleave: tokens/s and peak memory of each)
#   bash benchmarks/gpu_x2_followup.sh OUT_DIR profile_model
#       Where the 340M models' step time goes (bench model --profile: kernel time per step by
#       category, top kernels), ours and fla's at T = 2K / 4K / 8K, one model per GPU (fla's
#       compile, ~250 s, on GPU 1 while ours runs on GPU 0), then ours vs fla interleaved again;
#       on GPU 0 after ours: decoding through generate (batch 1 and 32, 2K prompt, 256 new tokens),
#       ours and fla's.
#   bash benchmarks/gpu_x2_followup.sh OUT_DIR conv
#       The Triton short convolution: GPU 0 runs its tests and micro-benchmark, our 340M model's
#       step profile, decoding of ours and fla's, then (time permitting) the hybrids and the
#       Transformer;
#       GPU 1 compiles fla's model (untimed), then times ours vs fla interleaved at 2K / 4K / 8K.
#   bash benchmarks/gpu_x2_followup.sh OUT_DIR decode_graph
#       GPU 0: the CUDA-graph decoding, short-conv, layer and model-backend tests; graph vs eager
#              generate of the 340M model (same tokens?); decoding of ours (graph and eager) and
#              fla's; the conv micro-benchmark with the capture fix
#       GPU 1: fla's and our 340M model each alone at T = 2K / 8K: tokens/s and peak memory in one run
#   bash benchmarks/gpu_x2_followup.sh OUT_DIR decode_alone
#       GPU 0: decoding of fla's and ours (graph and eager), with no compilation on the other GPU
#       GPU 1: the CUDA-graph decoding and short-conv tests, then the layer and model-backend tests
#   bash benchmarks/gpu_x2_followup.sh OUT_DIR mqar ["MODELS"] ["LR_GRID"]
#       MQAR at T = 512, 64 pairs on both GPUs, the whole grid in one round: 5 models x 4 widths
#       x 2 lrs per width (gpu_mqar.py's DEFAULT_LR_GRID) = 40 jobs, 20 processes per GPU under
#       CUDA MPS (started here, checked, stopped at the end; without it the processes are
#       time-sliced), each step one CUDA-graph replay (eager if capture fails). MODELS / LR_GRID
#       narrow it, e.g. mqar "delta_net linear_attention" "64:1e-3,3e-3 128:5e-4,1.5e-3 ...".
#       Results: OUT_DIR/mqar/ (results.jsonl per finished job, progress.jsonl per evaluation).
set -u
OUT=${1:?usage: gpu_x2_followup.sh OUT_DIR measure|kernels|final|profile_model|conv|decode_graph|decode_alone|mqar [MODELS LR_GRID]}
MODE=${2:?usage: gpu_x2_followup.sh OUT_DIR measure|kernels|final|profile_model|conv|decode_graph|decode_alone|mqar [MODELS LR_GRID]}
. benchmarks/gpu_lib.sh
begin_call "$OUT" 570
M="deltanet.cli bench model"

# Parts several modes share (each mode gives its own time budgets, in seconds)
fla_then_ab() {  # WARM AB: fla's 340M model compiled (untimed), then ours vs fla in alternation
  run fla_warm_model "$1" python3 -m $M --models fla-deltanet --lengths 2048,4096,8192 --warmup 1 --steps 1
  run ab "$2" python3 -m $M --models deltanet-340m,fla-deltanet --lengths 2048,4096,8192 --warmup 3 --steps 5 \
    --interleave 4 --out "$R/ab.md"
}
decode_both() {  # BUDGET: generate after a 2K prompt, 256 new tokens, batch 1 and 32, ours and fla's
  run decode "$1" python3 -m deltanet.cli bench decode --models deltanet-340m,fla-deltanet --batch 1,32 \
    --prompt 2048 --new-tokens 256 --out "$R/decode.md"
}
hybrids_and_transformer() {  # BUDGET WARMUP STEPS
  run others "$1" python3 -m $M --models hybrid-swa-340m,hybrid-global-340m,transformer-340m --lengths 2048,8192 \
    --warmup "$2" --steps "$3" --out "$R/others.md"
}

if [ "$MODE" = measure ]; then
  (
    export CUDA_VISIBLE_DEVICES=0
    fla_then_ab 300 150
    run mem 90 python3 -m $M --models deltanet-340m,fla-deltanet --lengths 8192 --warmup 2 --steps 2 --out "$R/mem.md"
    hybrids_and_transformer 120 3 6
    decode_both 200
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
elif [ "$MODE" = kernels ]; then
  SHAPES="--dims 128,64 --lengths 1024,8192,16384"
  (
    export CUDA_VISIBLE_DEVICES=0
    log "compiling our variants"
    VARS=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import tune_kernels as t; print(' '.join(t.VARIANTS))")
    for v in $VARS; do
      timeout 150 python3 benchmarks/tune_kernels.py --compile-only --variants "$v" $SHAPES >"$R/compile_$v.log" 2>&1 &
      while [ "$(jobs -rp | wc -l)" -ge 10 ]; do sleep 1; done
    done
    wait
    log "compiled: $(grep -l 'compiled .* T=16384' "$R"/compile_*.log | wc -l) variants"
    run sweep 280 python3 benchmarks/tune_kernels.py --check --combine --no-profile $SHAPES --warmup 5 --rep 25 \
      --choose "$R/choice.json" --json "$R/sweep.jsonl"
    run pytest_chunk 600 python3 -m pytest -q -n 8 -p no:cacheprovider --durations=15 tests/ops/test_triton_chunk.py
  ) &
  (
    export CUDA_VISIBLE_DEVICES=1
    run fla_warm_kernels 170 python3 - <<'EOF2'
import torch
from deltanet.bench.kernels import _inputs, method_fn
for D in (128, 64):
    for T in (1024, 8192, 16384):
        q, k, v, b = _inputs(32768 // T, T, 16, D, torch.bfloat16, "cuda")
        method_fn("fla")(q, k, v, b).backward(torch.randn_like(v))
        torch.cuda.synchronize()
        print("fla warm", D, T, flush=True)
EOF2
    run profile 60 python3 benchmarks/tune_kernels.py --profile-only --profile-methods ours,fla --dims 128,64 \
      --lengths 1024,16384
    run bench 170 python3 -m deltanet.bench.kernels --dims 128,64 --lengths 1024,2048,4096,8192,16384 \
      --methods ours,fla,sdpa --warmup 10 --rep 40 --json "$R/bench.jsonl"
    run pytest_rec 600 python3 -m pytest -q -n 6 -p no:cacheprovider --durations=10 tests/ops/test_recurrent.py
  ) &
  wait
elif [ "$MODE" = profile_model ]; then
  (
    export CUDA_VISIBLE_DEVICES=0
    run prof_ours 200 python3 -m $M --models deltanet-340m --lengths 2048,4096,8192 --warmup 3 --steps 5 \
      --profile 3 --out "$R/prof_ours.md"
    decode_both 330
  ) &
  (
    export CUDA_VISIBLE_DEVICES=1
    run prof_fla 420 python3 -m $M --models fla-deltanet --lengths 2048,4096,8192 --warmup 3 --steps 5 \
      --profile 3 --out "$R/prof_fla.md"
    run ab 140 python3 -m $M --models deltanet-340m,fla-deltanet --lengths 4096 --warmup 3 --steps 5 \
      --interleave 4 --out "$R/ab.md"
  ) &
  wait
  grep -h "^PROFILE\|^  top" "$R/prof_ours.log" "$R/prof_fla.log"
elif [ "$MODE" = conv ]; then
  (
    export CUDA_VISIBLE_DEVICES=0
    run pytest_conv 90 python3 -m pytest -q -p no:cacheprovider tests/ops/test_short_conv.py tests/layers
    run bench_conv 60 python3 benchmarks/bench_conv.py
    run prof_ours 110 python3 -m $M --models deltanet-340m --lengths 2048,4096,8192 --warmup 3 --steps 5 \
      --profile 3 --out "$R/prof_ours.md"
    decode_both 260
    hybrids_and_transformer 100 2 4
  ) &
  (
    export CUDA_VISIBLE_DEVICES=1
    fla_then_ab 280 220
  ) &
  wait
  grep -h "^PROFILE" "$R/prof_ours.log"
  tail -3 "$R/pytest_conv.log"; cat "$R/bench_conv.log" | tail -12
elif [ "$MODE" = decode_graph ]; then
  (
    export CUDA_VISIBLE_DEVICES=0
    run pytest_gpu 150 python3 -m pytest -q -n 4 -p no:cacheprovider tests/models/test_cuda_graph.py \
      tests/ops/test_short_conv.py tests/layers tests/models/test_triton_backend.py
    run graph_check 70 python3 - <<'EOF3'
import time, torch
from deltanet.bench.model import build_model
torch.manual_seed(0)
model = build_model("deltanet-340m").to("cuda", torch.bfloat16).eval()
ids = torch.randint(3, 32000, (8, 1024), device="cuda")
gen = dict(max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0, eos_token_id=None,
           return_dict_in_generate=True, output_scores=True)
out = {}
for graph in (False, True, True):
    model.cuda_graph_decoding = graph
    torch.cuda.synchronize(); t = time.perf_counter()
    out[graph] = model.generate(ids, **gen)
    torch.cuda.synchronize()
    print(f"cuda_graph={graph}: {time.perf_counter() - t:.2f} s", flush=True)
same = torch.equal(out[True].sequences, out[False].sequences)
diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(out[True].scores, out[False].scores))
print(f"deltanet-340m bf16, 8 x 1024 prompt, 128 new tokens: sequences equal {same}, max |score diff| {diff:.3g}")
EOF3
    run decode 260 python3 -m deltanet.cli bench decode --models deltanet-340m,fla-deltanet --cuda-graph both \
      --batch 1,32 --prompt 2048 --new-tokens 256 --out "$R/decode.md"
    run bench_conv 60 python3 benchmarks/bench_conv.py
  ) &
  (
    export CUDA_VISIBLE_DEVICES=1
    run mem 480 python3 -m $M --models fla-deltanet,deltanet-340m --lengths 2048,8192 --warmup 3 --steps 5 \
      --out "$R/mem.md"
  ) &
  wait
  tail -3 "$R/pytest_gpu.log"; tail -4 "$R/graph_check.log"; tail -12 "$R/bench_conv.log"
elif [ "$MODE" = decode_alone ]; then
  (
    export CUDA_VISIBLE_DEVICES=0
    run decode 330 python3 -m deltanet.cli bench decode --models fla-deltanet,deltanet-340m --cuda-graph both \
      --batch 1,32 --prompt 2048 --new-tokens 256 --out "$R/decode.md"
  ) &
  (
    export CUDA_VISIBLE_DEVICES=1
    run pytest_graph_conv 200 python3 -m pytest -q -n 4 -p no:cacheprovider tests/models/test_cuda_graph.py \
      tests/ops/test_short_conv.py
    run pytest_layers 250 python3 -m pytest -q -n 4 -p no:cacheprovider tests/layers tests/models/test_triton_backend.py
  ) &
  wait
  tail -2 "$R/pytest_graph_conv.log" "$R/pytest_layers.log"
elif [ "$MODE" = final ]; then
  (
    export CUDA_VISIBLE_DEVICES=0
    for v in old ppsm095; do
      timeout 150 python3 benchmarks/tune_kernels.py --compile-only --variants $v --dims 128 --lengths 8192,16384 \
        >"$R/compile_$v.log" 2>&1 &
    done
    run fla_warm_kernels 150 python3 - <<'EOF2'
import torch
from deltanet.bench.kernels import _inputs, method_fn
for D in (128, 64):
    q, k, v, b = _inputs(32, 1024, 16, D, torch.bfloat16, "cuda")
    method_fn("fla")(q, k, v, b).backward(torch.randn_like(v))
    torch.cuda.synchronize()
    print("fla warm", D, flush=True)
EOF2
    wait
    run sweep 60 python3 benchmarks/tune_kernels.py --check --no-profile --variants old,ppsm095 --dims 128 \
      --lengths 8192,16384 --warmup 5 --rep 30 --choose "$R/choice.json"
    log "sweep choice (not applied; the benchmark runs the defaults): $(cat "$R/choice.json" 2>/dev/null)"
    run bench 150 python3 -m deltanet.bench.kernels --dims 128,64 --lengths 1024,2048,4096,8192,16384 \
      --methods ours,fla,sdpa --warmup 10 --rep 40 --json "$R/bench.jsonl"
    run pytest_chunk 230 python3 -m pytest -q -n 8 -p no:cacheprovider --durations=15 tests/ops/test_triton_chunk.py
    run pytest_rec 60 python3 -m pytest -q -n 6 -p no:cacheprovider --durations=5 tests/ops/test_recurrent.py
    hybrids_and_transformer 150 3 6
  ) &
  (
    export CUDA_VISIBLE_DEVICES=1
    fla_then_ab 300 200
  ) &
  wait
elif [ "$MODE" = mqar ]; then
  MODELS=${3:-delta_net linear_attention full_attention hybrid-swa hybrid-global}
  GRID=${4:-}
  mps_start
  # gpu_mqar.py ends its jobs by its own deadline and then writes tables and plots; `run` cuts
  # it 20 s after that deadline at the latest (finished jobs are in results.jsonl either way)
  run mqar "$(( $(left) - 10 ))" python3 benchmarks/gpu_mqar.py --out "$OUT/mqar" --models $MODELS \
    ${GRID:+--lr-grid "$GRID"} --deadline $(( $(left) - 30 ))
  mps_stop
  rm -f "$OUT/mqar/data.pt"
else
  echo "unknown mode $MODE (measure | kernels | final | profile_model | conv | mqar)"; exit 2
fi
log "all done"
tar -czf "$OUT/all.tgz" -C "$OUT" res $( [ -d "$OUT/mqar" ] && echo mqar ) 2>/dev/null
cd "$R"
cat timeline.txt
for f in ab mem others decode; do [ -f $f.md ] && grep "^|" $f.md | grep -v "^|---"; done
grep -h "^|" bench.log sweep.log 2>/dev/null
grep -h "PROFILE\|CHOICE\|COMBO" profile.log sweep.log 2>/dev/null
for f in pytest.log pytest_chunk.log pytest_rec.log; do [ -f $f ] && tail -3 $f; done
tail -25 mqar.log 2>/dev/null
true
