#!/usr/bin/env bash
# Check a checkout on one GPU in one or two calls (<= 10 minutes each): the GPU tests of the parts that change
# most (chunk kernels and their launch config, packed sequences, captured decoding), then the
# headline figures, most important first. Each part has its own time limit and log under OUT; a
# part that fails or runs out of time does not stop the others.
#
#   bash benchmarks/gpu_verify.sh OUT [BUDGET_S=560] [PARTS=tests,kernels,memory,decode]
#
# All four parts take longer than one 10-minute call (H100, 2026-12-06: tests 227 s at -n 8, kernels
# ~110 s for the plain rule, memory > 160 s, decode ~60 s): pass PARTS to split them over two calls.
#
# parts:  tests    pytest on CUDA: chunk op (full-size cases), kernel config, packed sequences,
#                  captured decode step / loop for every layer mix
#         kernels  plain delta rule fwd+bwd vs fla 0.6.0 (32K tokens x 16 heads, bf16, D = 64, 128)
#         memory   deltanet-340m vs fla's DeltaNet: peak memory and tokens/s, bf16 parameters and
#                  fp32 parameters + autocast (benchmarks/gpu_memory_check.py)
#         decode   deltanet bench decode, captured loop: deltanet-340m and the two hybrids,
#                  batch 1 and 32, 2K prompt, 256 new tokens
#         profile  (not in the default PARTS) the kernels of one decode step on the fused route, replayed
#                  from its CUDA graph: counts, device time, families (benchmarks/profile_decode_step.py)
#         decode_kernel  (not in the default list) the fused decode step against the eager step:
#                  deltanet-340m, gated-deltanet-340m, gated-deltaproduct-340m through the captured
#                  loop, batch 1 and 32, with kernels per step counted
#         gated    (not in the default list) the gated rule and DeltaProduct (n_h = 2) vs fla, fwd+bwd, with
#                  fla's gated backward run past its Triton-version refusal (timed; its errors reported)
#         gated_speed  (not in the default list) the gated rule, the plain rule and DeltaProduct (n_h = 2), fwd+bwd,
#                  ours beside fla (its gated backward run past its refusal), no oracle check: speed only
#         family_tests  (not in the default list) the gated rule's and DeltaProduct's tests on CUDA (Triton against
#                  the float64 oracle: fla's peer shapes, fp16, varlen with initial states, gradients of all)
#         memory_long  (not in the default list) the memory part alone in one call: 540 s, no loss check
#                  (fla's first steps autotune for minutes: 270 s measured one row, 2026-12-06)
#         ce       (not in the default list) the fused linear cross-entropy's chunk step: Triton row kernel
#                  vs the PyTorch passes vs plain logits, fwd+bwd ms and peak memory (bench_cross_entropy.py)
#         ckpt     (not in the default list) CUDA tests of activation checkpointing and the compiled glue, then
#                  deltanet-340m's tokens/s and peak memory in each activation_checkpointing mode (bench model)
#         newdecode (not in the default list) the fused decode route's newest kernels: their CUDA tests
#                  (attention step, split-K GEMVs, captured decoding; checkpointing + compiled glue), the
#                  captured loop of the three 340M mixes on the fused route, the attention step vs the
#                  eager core (the GEMV sweep is its own part, gemv)
#         ckpt_bench  the ckpt part's bench model alone (its tests are also in newdecode's)
#         gemv     the GEMV sweep at batch 1 (stage 1): split-K and the dot-free variant against the default
#         gemv32   the same sweep at batch 32, where the replayed step's 97 GEMVs take 1.1-1.2 ms (H100,
#                  2026-12-07: ~12 us each against ~7 at batch 1; every program re-reads the [32, C] input,
#                  twice with the norm's pre-pass)
#         mqar_gated  (a call of its own) MQAR at the paper's hardest setting (T = 512, 64 pairs), widths 64 and
#                  128: DeltaNet beside Gated DeltaNet and its gate / decay-init variants (benchmarks/gpu_mqar.py)
#         gated_tune  (not in the default list) the gated rule's launch settings: the defaults vs 8 warps in
#                  chunk_grads / the state kernels / wy_bwd (spill-free on sm_90), fwd and fwd+bwd, checked
#                  against the fp32 PyTorch form (benchmarks/tune_kernels.py --gated)
#         plain_tune  (not in the default list) the plain rule's launch settings at D = 128, where the profile of a
#                  deltanet-340m step finds wy_fwd the costliest delta-rule kernel (~half the copy bandwidth) and
#                  wy_bwd spills 264 B/thread at 4 warps (Triton 3.6): the defaults vs 8 warps in each
#         census   (not in the default list) what a training forward keeps for backward, per token per layer and
#                  by site, deltanet-340m vs fla's DeltaNet, both regimes (benchmarks/saved_tensors_census.py)
#         prefill  (not in the default list) the 2K prompt's forward as decode() runs it (mask, cache kept) vs
#                  the same forward without a cache: wall ms, tokens/s, kernels (profile_decode_step.py
#                  --modes prefill,forward), deltanet-340m and hybrid-swa-340m, batch 1 and 32
#         glue     (not in the default list) the inference glue kernels (deltanet/ops/glue.py): their CUDA tests with
#                  the routing, decoding and captured-step tests (eager decode steps take them too), then the
#                  prefill part's profile (what a 2K prompt's forward costs with them)
#         decode_step  (not in the default list) one layer's decode step, fused vs eager, from CUDA
#                  graphs: microseconds, kernels, the fused op's state bandwidth (bench_decode_step.py)
#         linear   (not in the default list) additive linear attention on the chunk engine's kernels
#                  (deltanet/ops/delta_rule/linear.py): its CUDA tests, then training tokens/s and peak memory
#                  of linear-attn-340m beside deltanet-340m (T = 2K, 32K tokens, bf16 autocast)
#         decode_ab  (not in the default list) the decode GEMVs' measured settings and the capture without
#                  empty_cache, each against its alternative: their CUDA tests, then the captured loop of
#                  deltanet-340m and hybrid-swa-340m at batch 1 and 32 as shipped, with the rule's GEMV
#                  settings (MEASURED cleared), with torch's capture (EMPTY_CACHE_ON_CAPTURE) and with
#                  programmatic dependent launch (deltanet.ops.pdl.PDL_DECODE)
#         linear_check  (not in the default list) linear attention's Triton route against its PyTorch form at
#                  full size: the op's errors vs float64 (bf16 / fp32, fixed / packed), and the loss curves of
#                  linear-attn-340m cut to 4 layers on bench model's fixed batch, per route
#                  (benchmarks/check_linear_backends.py)
#         reuse    (not in the default list) kept decode steps and generate's fast path: their CUDA tests, then
#                  bench decode (loop and generate paths; a first and a warm generation per row) of the three
#                  340M mixes at batch 1 and 32, and deltanet-340m's decode memory at 2K vs 32K prompts
#         retest   (not in the default list) the CUDA tests last found failing on a GPU (2026-12-07: routing of
#                  the recomputed conv, GEMV counts with the LM head's, bf16 token ties in captured decoding)
#                  and the fused decode attention's tests (one compile for every cache length), linear attention's
#                  tests (bf16 at K = 32, V = 16: 0.33 off on the GPU, open) and the delta rule's 16-bit tests,
#                  now with small head dims on the GPU too
#         train_profile  (not in the default list) where a training step's time goes, deltanet-340m vs fla's
#                  DeltaNet at T = 2K, both regimes (untied, 32K tokens): kernel time per step by category and
#                  the top kernels (deltanet bench model --profile)
# fla's wheels in .whl/ (carried) are installed when present; without them the fla rows say so.
# Triton autotune results in .triton-autotune/ (carried) spare fla's first calls their tuning; the
# call leaves this call's in OUT/autotune.tgz (benchmarks/gpu_lib.sh says how to carry them on).
set -u
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_verify.sh OUT [BUDGET_S] [PARTS]}
R=$OUT
mkdir -p "$R"
# shellcheck source=benchmarks/gpu_lib.sh
source benchmarks/gpu_lib.sh
DEADLINE=${2:-560}
PARTS=${3:-tests,kernels,memory,decode}
use_wheels
use_autotune_cache
export PYTHONUNBUFFERED=1
record_env
for part in ${PARTS//,/ }; do
  case $part in
    # -v: one line per finished test, so a part cut at its time limit still names its failures
    tests) run tests 300 python3 -m pytest -v -rfs --tb=short -n 8 -p no:cacheprovider tests/models/test_fused_decode.py \
             tests/ops/test_triton_chunk.py tests/ops/test_kernel_config.py tests/ops/test_packing.py \
             tests/models/test_packed_sequences.py tests/models/test_cuda_graph.py tests/models/test_decoding.py ;;
    kernels) run kernels 100 python3 benchmarks/bench_family.py --out "$R/kernels" --parts env,speed --ops plain \
               --dims 64,128 --lengths 1024,4096,16384 --budget 90 ;;
    memory) run memory 160 python3 benchmarks/gpu_memory_check.py "$R/memory" --budget-s 150 --variants ours,fla ;;
    decode) run decode 130 python3 -m deltanet.cli bench decode --models deltanet-340m,hybrid-swa-340m,hybrid-global-340m \
              --paths loop --batch 1,32 --prompt 2048 --new-tokens 256 --budget-s 110 --out "$R/decode_loop.md" ;;
    profile) run profile 120 python3 benchmarks/profile_decode_step.py --out "$R/decode_profile.md" \
               --models deltanet-340m,hybrid-swa-340m --batch 1,32 --prompt 2048 --steps 20 --modes graph \
               --decode-kernels fused --budget-s 100 ;;
    decode_kernel) run decode_kernel 200 python3 -m deltanet.cli bench decode \
              --models deltanet-340m,gated-deltanet-340m,gated-deltaproduct-340m --paths loop --batch 1,32 \
              --prompt 2048 --new-tokens 256 --decode-kernel fused,eager --budget-s 180 --out "$R/decode_kernel.md" ;;
    gated) run gated 270 python3 benchmarks/bench_family.py --out "$R/gated" --parts env,check,speed --ops gated,product \
             --dims 64,128 --lengths 1024,4096,16384 --budget 255 --fla-past-guard ;;
    gated_speed) run gated_speed 250 python3 benchmarks/bench_family.py --out "$R/gated_speed" --parts env,speed \
                   --ops gated,plain,product --libs ours,fla --dims 64,128 --lengths 1024,4096,16384 --budget 235 \
                   --fla-past-guard ;;
    family_tests) # the 16-bit small-head-dim failures first, alone: their tracebacks print even if the rest is cut
                  run family_lowp 90 python3 -m pytest -v -rfs --tb=short -n 6 -p no:cacheprovider \
                    tests/ops/test_family_triton.py -k "dg_in_kernel_low_precision"
                  run family_tests 240 python3 -m pytest -v -rfs --tb=short -n 8 -p no:cacheprovider \
                    tests/ops/test_family_triton.py tests/ops/test_family.py -k "not dg_in_kernel_low_precision" ;;
    memory_long) run memory 560 python3 benchmarks/gpu_memory_check.py "$R/memory" --budget-s 540 --variants ours,fla,ours-keep-wy \
                   --no-loss-check ;;
    ce) run ce 100 python3 benchmarks/bench_cross_entropy.py --out "$R/cross_entropy.md" --budget-s 80 ;;
    ckpt|ckpt_bench) [ "$part" = ckpt ] && run ckpt_tests 150 python3 -m pytest -v -rfs --tb=short -n 8 -p no:cacheprovider \
            tests/models/test_activation_checkpointing.py tests/layers/test_compiled_grads.py tests/layers/test_fused_routing.py
          run ckpt 200 python3 -m deltanet.cli bench model --models deltanet-340m --lengths 2048,8192 --tokens 32768 \
            --activation-checkpointing none,mixer,mlp,block --steps 8 --warmup 4 --out "$R/ckpt.md" ;;
    newdecode) run newdecode_tests 200 python3 -m pytest -v -rfs --tb=short -n 8 -p no:cacheprovider \
                 tests/ops/test_decode_attention.py tests/ops/test_decode_linear.py tests/models/test_fused_decode.py \
                 tests/models/test_activation_checkpointing.py tests/layers/test_compiled_grads.py tests/layers/test_fused_routing.py
               # the fused route as it ships (no split-K), then with split-K on: same models, batches
               for split in 0 1; do
                 run "newdecode_loop_split$split" 75 python3 -c "import sys; import deltanet.ops.decode_linear as L
L.SPLIT_K_BY_DEFAULT = bool($split)
from deltanet.cli import main
sys.exit(main(sys.argv[1:]))" bench decode --models deltanet-340m,hybrid-swa-340m --paths loop --batch 1,32 \
                   --prompt 2048 --new-tokens 256 --decode-kernel fused --budget-s 65 --out "$R/decode_fused_split$split.md"
               done
               run newdecode_attn 70 python3 benchmarks/bench_decode_step.py --attention --out "$R/attention" \
                 --batch 1,32 --budget-s 60 ;;
    reuse) run reuse_tests 150 python3 -m pytest -v -rfs --tb=short -n 8 -p no:cacheprovider \
             tests/models/test_graph_reuse.py tests/models/test_fast_generate.py tests/models/test_decoding.py
           # first generation of each shape (capture timed) and a warm one (the kept step), through the loop
           # and through Hugging Face's generate (greedy: the captured loop), and 2K vs 32K prompts' memory
           run reuse_decode 235 python3 -m deltanet.cli bench decode \
             --models deltanet-340m,transformer-340m,hybrid-global-340m,hybrid-swa-340m \
             --paths loop,generate --batch 1,32 --prompt 2048 --new-tokens 256 --budget-s 225 --out "$R/decode_reuse.md"
           run reuse_context 120 python3 -m deltanet.cli bench decode --models deltanet-340m --paths loop --batch 1 \
             --prompt 2048,32768 --new-tokens 256 --budget-s 110 --out "$R/decode_context.md" ;;
    decode_ab) run decode_ab_tests 150 python3 -m pytest -v -rfs --tb=short -n 8 -p no:cacheprovider \
                 tests/ops/test_decode_linear.py tests/models/test_decoding.py tests/ops/test_pdl.py
               # the captured loop as it ships, without the measured GEMV settings, with torch's capture
               # (empty_cache first), with programmatic dependent launch: same models and batches, one row each
               for v in ships rule_gemv torch_capture pdl; do
                 run "decode_ab_$v" 80 python3 -c "import sys; import deltanet.ops.decode_linear as L, deltanet.models.cuda_graph as G, deltanet.ops.pdl as P
if '$v' == 'rule_gemv': L.MEASURED.clear()
if '$v' == 'torch_capture': G.EMPTY_CACHE_ON_CAPTURE = True
if '$v' == 'pdl': P.PDL_DECODE = True
from deltanet.cli import main
sys.exit(main(sys.argv[1:]))" bench decode --models deltanet-340m,hybrid-swa-340m --paths loop --batch 1,32 \
                   --prompt 2048 --new-tokens 256 --budget-s 70 --out "$R/decode_ab_$v.md"
               done ;;
    gemv) run newdecode_gemv 100 python3 benchmarks/bench_decode_step.py --gemv-sweep --out "$R/gemv" --batch 1 \
                 --budget-s 90 ;;
    gemv32) run gemv32 200 python3 benchmarks/bench_decode_step.py --gemv-sweep --out "$R/gemv32" --batch 32 \
                 --budget-s 180 ;;
    mqar_gated) run mqar_gated 560 python3 benchmarks/gpu_mqar.py --out "$R/mqar_gated" --widths 64 128 --deadline 540 \
                  --models delta_net gated_delta_net gated_delta_net-sigmoid gated_delta_net-slowdecay \
                  gated_delta_net-sigmoid+slowdecay ;;
    gated_tune) run gated_tune 300 python3 benchmarks/tune_kernels.py --gated --dims 64,128 --lengths 1024,16384 \
                  --variants old,o_g8,o_s8,o_wyb8 --check --combine --no-profile --choose "$R/gated_choice.json" \
                  --json "$R/gated_tune.jsonl" ;;
    plain_tune) run plain_tune 240 python3 benchmarks/tune_kernels.py --dims 128 --lengths 2048,8192 \
                  --variants old,o_wy8,o_wyb8 --check --combine --no-profile --choose "$R/plain_choice.json" \
                  --json "$R/plain_tune.jsonl" ;;
    census) run census 240 python3 benchmarks/saved_tensors_census.py --out "$R/census" --budget-s 200 ;;
    linear) run linear_tests 120 python3 -m pytest -v -rfs --tb=short -n 8 -p no:cacheprovider \
              tests/ops/test_linear_attention_triton.py
            run linear_bench 150 python3 -m deltanet.cli bench model --models linear-attn-340m,deltanet-340m \
              --lengths 2048 --steps 10 --warmup 3 --out "$R/linear_bench.md" ;;
    linear_check) run linear_check 180 python3 benchmarks/check_linear_backends.py --out "$R/linear_check.json" ;;
    retest) run retest 180 python3 -m pytest -v -rfs --tb=short -n 8 -p no:cacheprovider tests/ops/test_decode_attention.py \
              tests/layers/test_fused_routing.py::test_training_never_takes_the_glue_kernels \
              tests/models/test_fused_decode.py::test_cuda_kernels_per_step \
              tests/models/test_cuda_graph.py::test_captured_graph_matches_eager_decoding_on_cuda \
              tests/ops/test_linear_attention_triton.py tests/ops/test_triton_chunk.py::test_low_precision_within_twice_the_pytorch_floor ;;
    glue) run glue_tests 300 python3 -m pytest -v -rfs --tb=short -n 8 -p no:cacheprovider tests/ops/test_glue.py \
            tests/layers/test_fused_routing.py tests/layers/test_compiled_grads.py tests/models/test_fused_decode.py \
            tests/models/test_decoding.py tests/models/test_cuda_graph.py ;&  # then the prefill part
    prefill) run prefill 120 python3 benchmarks/profile_decode_step.py --out "$R/prefill.md" \
               --models deltanet-340m,hybrid-swa-340m --batch 1,32 --prompt 2048 --modes prefill,forward \
               --decode-kernels auto --steps 5 --budget-s 100 ;;
    train_profile) run train_profile 200 python3 -m deltanet.cli bench model --models deltanet-340m,fla-deltanet \
                     --lengths 2048 --regimes bf16,autocast --untied --steps 5 --warmup 3 --profile 3 \
                     --out "$R/train_profile.md" ;;
    decode_step) run decode_step 90 python3 benchmarks/bench_decode_step.py --out "$R/decode_step" --budget-s 75 ;;
    *) log "unknown part $part" ;;
  esac
done
save_autotune_cache "$R"
log "done"
