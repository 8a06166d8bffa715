#!/usr/bin/env bash
# Two-GPU calls (nvidia-h200-x2) for the long runs. The 10-minute training outlives one device
# command (600 s at most), so it is started in its own process session and collected by a
# second, short call while the machine is still warm:
#
#   bash benchmarks/gpu_x2_train.sh OUT_DIR start    # GPU 0: deltanet-125m for 600 s (detached)
#                                                    # GPU 1: MQAR at the paper's setting (~9 min)
#   bash benchmarks/gpu_x2_train.sh OUT_DIR finish   # torchrun DDP on both GPUs (short), then
#                                                    # wait for the training and collect it
set -u
OUT=${1:?usage: gpu_x2_train.sh OUT_DIR start|finish}
MODE=${2:?usage: gpu_x2_train.sh OUT_DIR start|finish}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
T0=$(date +%s)
collect_train() {  # what the training wrote so far (no checkpoints) -> OUT/train.tgz
  tar -czf "$OUT/train.tgz" -C /tmp --exclude=checkpoints --exclude=tensorboard train train.log 2>/dev/null
  tail -4 /tmp/train.log
}
if [ "$MODE" = start ]; then
  { date -u; nvidia-smi --query-gpu=index,name,driver_version --format=csv; cat COMMIT 2>/dev/null; } | tee "$OUT/env.txt"
  # The detached run works from its own copy: the device tool re-sends (replaces) the working
  # tree for the next command, which broke the 2026-11-30 run's last step.
  rm -rf /tmp/deltanet-src && cp -r "$PWD" /tmp/deltanet-src
  (cd /tmp/deltanet-src && CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/deltanet-src setsid nohup \
    python3 benchmarks/gpu_train.py /tmp/train --max-time-s 600 >/tmp/train.log 2>&1 </dev/null &)
  CUDA_VISIBLE_DEVICES=1 timeout 565 python3 benchmarks/gpu_mqar.py --out "$OUT/mqar" --workers 20 \
    --lrs 1e-3 --deadline 550 >"$OUT/mqar.log" 2>&1
  echo "mqar rc=$? after $(( $(date +%s) - T0 )) s"
  tail -30 "$OUT/mqar.log"
  rm -f "$OUT/mqar/data.pt"; tar -czf "$OUT/mqar.tgz" -C "$OUT" mqar && rm -rf "$OUT/mqar"
  collect_train
else
  # DDP over NCCL on both GPUs (the training still runs on GPU 0 for its last minute: this
  # checks that torchrun + NCCL work and that the losses fall; its tokens/s are not clean)
  timeout 100 python3 benchmarks/gpu_train.py /tmp/ddp --nproc 2 --max-time-s 30 >"$OUT/ddp.log" 2>&1
  echo "ddp rc=$? after $(( $(date +%s) - T0 )) s"
  tar -czf "$OUT/ddp.tgz" -C /tmp --exclude=checkpoints --exclude=tensorboard ddp 2>/dev/null
  tail -5 "$OUT/ddp.log"
  n=0
  while [ ! -s /tmp/train/summary.json ] && pgrep -f gpu_train.py >/dev/null && [ $n -lt 150 ]; do sleep 3; n=$((n + 3)); done
  collect_train
  cat /tmp/train/summary.md 2>/dev/null
fi
