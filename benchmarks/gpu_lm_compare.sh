#!/usr/bin/env bash
# One device call of the language-model comparison (`deltanet bench lm`), one H100, <= 10 min:
#
#   bash benchmarks/gpu_lm_compare.sh OUT MODELS BUDGET_S [DATA] [-- extra bench-lm flags]
#   e.g. bash benchmarks/gpu_lm_compare.sh "$OUT" deltanet,transformer 560 python-site
#        bash benchmarks/gpu_lm_compare.sh "$OUT" gated-deltanet,linear-attn 570 python-site -- --eval-reserve-s 40
#   (evaluation took 17-26 s per 125M model on an H100, 2026-12-06/07: 40 s kept for it, not the
#   default 75, let hybrid-swa train and evaluate inside one 570 s call on 2026-12-07)
#
# Trains (or resumes) the listed models in order until BUDGET_S seconds after the tool starts
# (a model that does not fit pauses with a checkpoint and resumes in the next call while the
# machine is still warm: the work folder is /tmp/lmcmp), evaluates each finished one, and
# writes into OUT: results.jsonl, results.md, loss_vs_tokens.png, the shared tokenizer
# (tokenizer.json, tokenizer_meta.json), log.txt and env.txt.
#
# Across fresh machines: copy OUT's results.jsonl and tokenizer*.json into lmcarry/ at the repo
# root (ignored; name it in the call's `carry`): they seed /tmp/lmcmp, so finished models are
# skipped and every model keeps the same tokenizer. fla's wheels in .whl/ (also carried) are
# installed when present; fla-gla / fla-mamba2 need them (fla-mamba2 also mamba_ssm's sdist in .whl/
# for its Triton SSD kernels: gpu_lib.sh, use_wheels). Triton autotune results: carry
# .triton-autotune/ too; OUT/autotune.tgz holds this call's (gpu_lib.sh).
#
# A two-minute check of every model (fla's included) through the whole path first:
#   LMCMP_DIR=/tmp/lmsmoke bash benchmarks/gpu_lm_compare.sh "$OUT" all 150 stdlib -- --scale smoke
set -u
OUT=${1:?usage: gpu_lm_compare.sh OUT MODELS BUDGET_S [DATA] [-- flags]}
MODELS=${2:?models, e.g. deltanet,transformer}
BUDGET=${3:?budget in seconds}
DATA=${4:-python-site}
shift $(( $# < 4 ? $# : 4 ))
[ "${1:-}" = "--" ] && shift
mkdir -p "$OUT"
R=$OUT
# shellcheck source=benchmarks/gpu_lib.sh
source benchmarks/gpu_lib.sh
use_wheels
use_autotune_cache  # fla-gla / fla-mamba2 autotune on their first steps (gpu_lib.sh)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
W=${LMCMP_DIR:-/tmp/lmcmp}  # another folder for another protocol (e.g. a --scale smoke check)
mkdir -p "$W/tokenizer"
if [ -z "${LMCMP_DIR:-}" ]; then  # lmcarry/ seeds the default folder only: another is another protocol (a smoke check)
  if [ -f lmcarry/results.jsonl ] && [ ! -f "$W/results.jsonl" ]; then cp lmcarry/results.jsonl "$W/"; fi
  if [ -f lmcarry/tokenizer_meta.json ] && [ ! -f "$W/tokenizer/tokenizer_meta.json" ]; then
    cp lmcarry/tokenizer.json lmcarry/tokenizer_meta.json "$W/tokenizer/"
  fi
fi
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
  python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  python3 -c "import fla; print('fla', fla.__version__)" 2>/dev/null || echo "fla not importable"
  cat COMMIT 2>/dev/null || git log -1 --format='commit %H %s' 2>/dev/null  # COMMIT: see gpu_lib.sh
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
python3 -m deltanet.cli bench lm --out "$W" --data "$DATA" --models "$MODELS" --budget-s "$BUDGET" "$@" \
  2>&1 | tee "$OUT/log.txt"
echo "bench lm rc=${PIPESTATUS[0]}"
for f in results.jsonl results.md loss_vs_tokens.png tokenizer/tokenizer.json tokenizer/tokenizer_meta.json; do
  [ -f "$W/$f" ] && cp "$W/$f" "$OUT/"
done
save_autotune_cache "$OUT"
ls -la "$OUT"
