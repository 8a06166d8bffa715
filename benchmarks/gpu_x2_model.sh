#!/usr/bin/env bash
# Two-GPU call (nvidia-h200-x2) for the model benchmark after the model-speed fix (ran at commit
# f18ee7d, results/2026-11-30-h200-x2-model.md, when recompute was the default and the second
# part was --no-recompute; the flags below are today's):
#   GPU 0: our models -- deltanet-340m with each training-memory setting (default = conv inputs
#          kept, input region recomputed, whole-model torch.compile, fusion off), a per-kernel profile of one step, then
#          the hybrids and the Transformer
#   GPU 1: fla's DeltaNet (cold: its first steps compile and autotune), then the state-kernel
#          V-block sweep of the chunk op
#   bash benchmarks/gpu_x2_model.sh OUT_DIR        (repo root, fla wheels in .whl/; ~5 minutes)
set -u
OUT=${1:?usage: gpu_x2_model.sh OUT_DIR}
. benchmarks/gpu_lib.sh
begin_call "$OUT" 400
M="deltanet.cli bench model --warmup 3 --steps 8"

lane0() {
  export CUDA_VISIBLE_DEVICES=0
  run ours_default 120 python3 -m $M --models deltanet-340m --lengths 2048,8192 --out "$R/ours_default.md"
  run ours_recompute 90 python3 -m $M --models deltanet-340m --lengths 2048,8192 --recompute --out "$R/ours_recompute.md"
  run ours_compile 150 python3 -m $M --models deltanet-340m --lengths 2048,8192 --compile --out "$R/ours_compile.md"
  DELTANET_DISABLE_FUSION=1 run ours_nofusion 60 python3 -m $M --models deltanet-340m --lengths 2048 --out "$R/ours_nofusion.md"
  run profile 60 python3 - <<'PY'
import torch
from deltanet.bench.model import build_model
m = build_model("deltanet-340m").cuda().train()
opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
ids = torch.randint(0, 32000, (16, 2048), device="cuda")
def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = m(input_ids=ids, labels=ids).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
for _ in range(3): step()
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(2): step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=60))
PY
  run ours_all 200 python3 -m $M --models hybrid-swa-340m,hybrid-global-340m,transformer-340m,deltanet-340m \
    --lengths 2048,4096,8192 --out "$R/ours_all.md"
}

lane1() {
  export CUDA_VISIBLE_DEVICES=1
  run fla_model 330 python3 -m $M --models fla-deltanet --lengths 2048,4096,8192 --out "$R/fla_model.md"
  run state_sweep 60 python3 benchmarks/tune_kernels.py --no-profile --check --variants old,bvs16,bvs32,bvs64,ppsm1 \
    --dims 128,64 --lengths 4096,8192,16384 --warmup 5 --rep 25
}
lane1 &
lane0
wait
log "all done"
tar -czf "$OUT/all.tgz" -C "$OUT" res 2>/dev/null
cd "$R"
cat timeline.txt
for f in ours_default ours_recompute ours_compile ours_nofusion ours_all fla_model; do [ -f $f.md ] && grep "^|" $f.md | grep -v "^|---\|^| model"; done
head -50 profile.log | cut -c1-200
grep "^CHOICE\|^|" state_sweep.log
for f in *.log; do grep -q "Traceback" "$f" && { echo "--- errors in $f"; grep -h "Error" "$f" | tail -3; }; done
true
