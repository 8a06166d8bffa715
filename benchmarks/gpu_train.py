"""Train a DeltaNet LM for a fixed wall-clock budget and summarise throughput, MFU and the curve.

    python benchmarks/gpu_train.py OUT_DIR                      # deltanet-125m, 300 s, 1 GPU
    python benchmarks/gpu_train.py OUT_DIR --max-time-s 600 --nproc 1
    python benchmarks/gpu_train.py OUT_DIR --smoke              # tiny CPU version (CI / laptops)
    python benchmarks/gpu_train.py OUT_DIR -- --compile         # anything after -- goes to `deltanet train`

Corpus (``stdlib-all``): every ``.py`` file of the running interpreter's standard library,
its test suites included (~31 MB, ~8M tokens): real text, present offline. At GPU speed a
5-minute run sees it several times, so the validation curve flattens or turns up late: this
run measures throughput and MFU, not model quality. Tokenising (first run only) and start-up
are outside ``--max-time-s``; compilation / autotuning of the first steps is inside it.

Writes ``OUT_DIR/run/`` (the run directory: metrics.jsonl, loss.png, checkpoint),
``OUT_DIR/summary.json`` and ``OUT_DIR/summary.md`` (a dated results document with the
hardware, versions, the exact command, tokens/s, MFU and the validation curve).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--max-time-s", type=float, default=300.0)
    p.add_argument("--preset", default="deltanet-125m")
    p.add_argument("--nproc", type=int, default=1, help="GPUs (torchrun processes)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=16, help="per GPU")
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--lr", type=float, default=0.0, help="0 = the trainer's auto (1e-3 for 125m)")
    p.add_argument("--data", default="stdlib-all", help="default: the stdlib's .py files with its tests (~31 MB)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run to check the script works")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep OUT_DIR/run/checkpoints (125m + AdamW state is ~1.5 GB; removed by default)")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # more `deltanet train` flags after --
    a = p.parse_args(argv[:len(argv) - len(extra) - (1 if "--" in argv else 0)])

    run_dir = a.out / "run"
    train = ["train", "--preset", a.preset, "--data", a.data, "--vocab-size", str(a.vocab_size),
             "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size), "--lr", str(a.lr),
             "--warmup", "100", "--max-steps", "1000000", "--max-time-s", str(a.max_time_s),
             "--eval-every", "200", "--eval-batches", "8", "--log-every", "10", "--out", str(run_dir),
             "--sample-tokens", "64"]
    if a.smoke:
        train = ["train", "--preset", "tiny", "--data", a.data if "--data" in sys.argv else "stdlib",
                 "--tokenizer", "bytes", "--seq-len", "64", "--batch-size", "4", "--max-steps", "1000000",
                 "--max-time-s", str(min(a.max_time_s, 20.0)), "--eval-every", "20", "--eval-batches", "2",
                 "--log-every", "5", "--out", str(run_dir), "--sample-tokens", "16", "--device", "cpu",
                 "--model", "hidden_size=64", "--model", "num_hidden_layers=2"]
    train += extra
    if a.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
               "-m", "deltanet.cli", *train]
    else:
        cmd = [sys.executable, "-m", "deltanet.cli", *train]
    a.out.mkdir(parents=True, exist_ok=True)
    print("$", shlex.join(cmd), flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd)
    wall = time.time() - t0
    if rc != 0:
        print(f"training failed with exit code {rc}", file=sys.stderr)
        return rc
    summary = summarise(run_dir, wall, cmd)
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (a.out / "summary.md").write_text(markdown(summary))
    if not a.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    print(json.dumps({k: summary[k] for k in ("tokens_per_s", "mfu", "final_val_loss", "final_val_bpb", "steps")}))
    return 0


def summarise(run_dir: Path, wall: float, cmd: list[str]) -> dict:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    steps = [r for r in recs if "tok_per_s" in r]
    last = max(r["step"] for r in recs)  # the final record (time budget) may fall between log steps
    steady = [r for r in steps if r["step"] > max(10, last // 10)] or steps  # skip compile / autotune warmup
    vals = [r for r in recs if "val_loss" in r]
    cfg = json.loads((run_dir / "config.json").read_text())
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "date": time.strftime("%Y-%m-%d"), "hardware": gpu, "world_size": cfg.get("world_size", 1),
        "torch": torch.__version__, "python": platform.python_version(), "command": shlex.join(cmd),
        "preset": cfg["train"]["preset"], "seq_len": cfg["data"]["seq_len"],
        "tokens_per_step": cfg["train"]["batch_size"] * cfg["data"]["seq_len"] * cfg["train"]["grad_accum"]
        * cfg.get("world_size", 1),
        "steps": last, "tokens": last * steps[-1]["tokens"] // steps[-1]["step"], "wall_s": round(wall, 1),
        "first_step_s": steps[0]["elapsed_s"],
        "tokens_per_s": round(statistics.median(r["tok_per_s"] for r in steady), 1),
        "mfu": round(statistics.median(r["mfu"] for r in steady), 4) if "mfu" in steady[0] else None,
        "final_val_loss": vals[-1]["val_loss"] if vals else None,
        "final_val_bpb": vals[-1]["val_bpb"] if vals else None,
        "val_curve": [(r["step"], round(r["val_loss"], 4)) for r in vals],
    }


def markdown(s: dict) -> str:
    mfu = f"{100 * s['mfu']:.1f}% (of the spec dense bf16 peak)" if s["mfu"] is not None else "n/a (CPU)"
    rows = "\n".join(f"| {step} | {loss} |" for step, loss in s["val_curve"])
    return f"""# DeltaNet training run — {s['preset']} on {s['hardware']} ({s['date']})

- world size {s['world_size']}, torch {s['torch']}, Python {s['python']}
- {s['tokens_per_step']:,} tokens per step (seq_len {s['seq_len']}), {s['steps']:,} steps, {s['tokens']:,} tokens
- **throughput {s['tokens_per_s']:,.0f} tokens/s** (median over steady-state steps), MFU {mfu}
- first step (compile / autotune included): {s['first_step_s']:.1f} s; whole command {s['wall_s']:.0f} s
- final validation loss {s['final_val_loss']:.4f}, bits per byte {s['final_val_bpb']:.4f}

Command: `{s['command']}`

Loss curve: `run/loss.png`; every step's numbers: `run/metrics.jsonl`.

| step | validation loss |
|---|---|
{rows}
"""


if __name__ == "__main__":
    sys.exit(main())
