#!/usr/bin/env bash
# Decoding on one GPU (H100): the CUDA-graph capture tests, then `deltanet bench decode` in parts,
# most important first. Every part writes its own files under OUT (markdown + JSON after every
# row, a log per part, env.txt, timeline.txt); a part that fails or runs out of time does not
# stop the others.
#
#   bash benchmarks/gpu_decode.sh OUT [BUDGET_S=560] [PARTS=tests,loop,graph,eager,context]
#
# parts:  tests    GPU tests: captured step == eager decoding for every layer mix (fp32 / bf16),
#                  captured loop == eager loop (greedy and sampled)
#         loop     our captured decode loop: deltanet-340m, hybrid-swa-340m, hybrid-global-340m,
#                  transformer-340m; batch 1 and 32; 2K prompt, 256 new tokens
#         graph    HF generate with CUDA-graph steps, the same models + fla's DeltaNet side by side
#         eager    HF generate with eager steps (the "before" of the 5x target), the same models
#         context  deltanet-340m, captured loop, batch 1, prompt 2K vs 32K (cache and peak memory)
#         fusedtests  GPU tests of the fused decode route (decode_kernel="fused"): the GEMV kernels
#                  against PyTorch, the fused rule step, fused == eager decoding, kernels per layer
#         fused    the whole captured step, fused route vs eager route: deltanet-340m,
#                  gated-deltanet-340m, hybrid-swa-340m at batch 1 and 32 (2K prompt, 256 new tokens:
#                  tokens/s, step ms, fraction of the bandwidth floor, kernels per step), then the
#                  per-kernel profile of both routes and their greedy tokens compared
#         gemv     the decode-step GEMV kernel alone on the 340M projections, batch 1 and 32: default
#                  launch settings vs a grid (GB/s against the copy bandwidth; the best marked)
# Two calls within a 10-minute limit: PARTS=tests,loop,graph then PARTS=eager,context;
# the fused decode route alone: PARTS=fusedtests,fused,gemv.
set -u
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_decode.sh OUT [BUDGET_S] [PARTS]}
R=$OUT
mkdir -p "$R"
# shellcheck source=benchmarks/gpu_lib.sh
source benchmarks/gpu_lib.sh
DEADLINE=${2:-560}
PARTS=${3:-tests,loop,graph,eager,context}
use_wheels
export PYTHONUNBUFFERED=1
record_env
OURS=deltanet-340m,hybrid-swa-340m,hybrid-global-340m,transformer-340m
COMMON="--batch 1,32 --prompt 2048 --new-tokens 256"
budget() { echo $(( $(left) - ${1:-10} )); }   # a part's --budget-s: stop starting points near the deadline
for part in ${PARTS//,/ }; do
  case $part in
    tests) run tests 200 python3 -m pytest -q -rs tests/models/test_cuda_graph.py tests/models/test_decoding.py \
             -k "on_cuda" ;;
    loop) run loop 240 python3 -m deltanet.cli bench decode --models $OURS --paths loop $COMMON \
            --budget-s "$(budget 30)" --out "$R/decode_loop.md" ;;
    graph) run graph 300 python3 -m deltanet.cli bench decode --models $OURS,fla-deltanet --paths generate \
             --cuda-graph on $COMMON --budget-s "$(budget 40)" --out "$R/decode_generate_graph.md" ;;
    eager) run eager 420 python3 -m deltanet.cli bench decode --models $OURS --paths generate --cuda-graph off \
             $COMMON --budget-s "$(budget 40)" --out "$R/decode_generate_eager.md" ;;
    context) run context 150 python3 -m deltanet.cli bench decode --models deltanet-340m --paths loop --batch 1 \
               --prompt 2048,32768 --new-tokens 256 --budget-s "$(budget 30)" --out "$R/decode_context.md" ;;
    # -v, no -x: one line per test, every failure named even if the part is cut at its limit (the
    # first CUDA run of test_fused_decode.py, H100 2026-12-06, had ~25 failures a quiet log did not name)
    fusedtests) run fusedtests 240 python3 -m pytest -v -rfs --tb=short -n 8 -p no:cacheprovider \
                  tests/models/test_fused_decode.py tests/ops/test_decode_linear.py ;;
    fused) run fused_loop 200 python3 -m deltanet.cli bench decode --models deltanet-340m,gated-deltanet-340m,hybrid-swa-340m \
             --paths loop --decode-kernel eager,fused $COMMON --budget-s "$(budget 30)" --out "$R/decode_fused_loop.md"
           run fused_profile 150 python3 benchmarks/profile_decode_step.py --models deltanet-340m,hybrid-swa-340m \
             --batch 1,32 --prompt 2048 --steps 20 --modes eager,graph --decode-kernels eager,fused --check \
             --budget-s "$(budget 20)" --out "$R/decode_fused_profile.md" ;;
    gemv) b=$(budget 20); [ "$b" -gt 220 ] && b=220
          run gemv 240 python3 benchmarks/bench_decode_step.py --gemv-sweep --batch 1,32 --budget-s "$b" --out "$R" ;;
    *) log "unknown part $part" ;;
  esac
done
log "done"
