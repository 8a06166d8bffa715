"""GPU check: ``deltanet train`` and the synthetic tasks train on CUDA as they did before they
shared one training core (``deltanet.training.core``), the CUDA-graph step included.

Run the same script file against the code before the move and after it, then compare::

    git worktree add /tmp/dn-old e93a914                     # the commit before the core
    PYTHONPATH=/tmp/dn-old python benchmarks/gpu_check_train_core.py --out runs/core_old --budget-s 300
    PYTHONPATH=$PWD        python benchmarks/gpu_check_train_core.py --out runs/core_new --budget-s 300
    python benchmarks/gpu_check_train_core.py --compare runs/core_old runs/core_new --out runs/core_cmp

Each case runs twice in one process, so the comparison can tell a change from the GPU's own
run-to-run noise (bf16, atomics): a case passes when old and new differ by at most twice the
larger of the two runs' noise, with a floor of 1e-6 relative. Cases: MQAR with eager steps, MQAR
and parity with the CUDA-graph step (its ``step_mode`` must stay ``cuda_graph``), and a tiny
``deltanet train`` run (bf16 autocast, 2 micro-batches per step). Every case is wrapped in
try/except (the error is recorded and the next case runs), results are written after each case,
and ``--budget-s`` bounds the whole run. Only public APIs that exist on both sides are used.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch


def _mqar_case(model_name: str, graph: bool, device: str) -> dict:
    from deltanet.evaluation.tasks.mqar import make_mqar
    from deltanet.evaluation.tasks.synthetic import TrainConfig, build_model, train_and_evaluate

    dev = torch.device(device)
    (xtr, ytr), (xte, yte) = make_mqar(4096, 64, 8, 256, seed=0), make_mqar(512, 64, 8, 256, seed=1)
    torch.manual_seed(0)
    model = build_model(model_name, width=64, num_layers=2, vocab_size=256, sliding_window=16, max_len=64)
    cfg = TrainConfig(lr=3e-3, epochs=100, max_steps=60, batch_size=64, eval_every=5, warmup_steps=6, device=device,
                      cuda_graph=graph)
    run = train_and_evaluate(model, (xtr.to(dev), ytr.to(dev)), (xte, yte), cfg)
    return {"losses": [c["loss"] for c in run.curve], "accuracy": [c["accuracy"] for c in run.curve],
            "step_mode": run.step_mode, "seconds": run.seconds}


def _parity_case(device: str) -> dict:
    from deltanet.evaluation.tasks.state_tracking import make_parity
    from deltanet.evaluation.tasks.synthetic import TrainConfig, build_model, train_and_evaluate

    dev = torch.device(device)
    x, y = make_parity(2048, 32, seed=0)
    torch.manual_seed(0)
    model = build_model("delta_net", width=64, num_layers=2, vocab_size=2, allow_neg_eigval=True)
    cfg = TrainConfig(lr=3e-3, epochs=100, max_steps=60, batch_size=64, eval_every=5, warmup_steps=6, device=device,
                      cuda_graph=True)
    run = train_and_evaluate(model, (x.to(dev), y.to(dev)), (x[:256], y[:256]), cfg)
    return {"losses": [c["loss"] for c in run.curve], "accuracy": [c["accuracy"] for c in run.curve],
            "step_mode": run.step_mode, "seconds": run.seconds}


def _train_case(tmp: Path, device: str) -> dict:
    from deltanet.training.config import RunConfig
    from deltanet.training.trainer import train

    corpus = tmp / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i in range(24):  # a small deterministic corpus: no download, no tokeniser training
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(200))
        (corpus / f"m{i:02d}.py").write_text(f'"""module {i}"""\n' + body)
    cfg = RunConfig.from_dict({
        "data": str(corpus), "tokenizer": "bytes", "seq_len": 128, "cache_dir": str(tmp / "cache"),
        "batch_size": 8, "grad_accum": 2, "max_steps": 30, "warmup": 3, "lr": 3e-3, "eval_every": 10,
        "eval_batches": 2, "log_every": 1, "sample_tokens": 0, "progress": False, "device": device,
        "out": str(tmp / "run")})
    t0 = time.time()
    train(cfg)
    recs = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r and not r.get("final")]
    return {"losses": [r["loss"] for r in steps], "grad_norms": [r["grad_norm"] for r in steps],
            "val_losses": [r["val_loss"] for r in recs if "val_loss" in r], "seconds": round(time.time() - t0, 2)}


CASES = {
    "mqar_delta_net_eager": lambda tmp, dev: _mqar_case("delta_net", False, dev),
    "mqar_delta_net_graph": lambda tmp, dev: _mqar_case("delta_net", True, dev),
    "mqar_hybrid_swa_graph": lambda tmp, dev: _mqar_case("hybrid-swa", True, dev),
    "parity_delta_net_graph": lambda tmp, dev: _parity_case(dev),
    "train_tiny_bf16_accum2": _train_case,
}


def run(out: Path, budget_s: float, device: str = "cuda") -> None:
    import deltanet

    out.mkdir(parents=True, exist_ok=True)
    res = {"deltanet": str(Path(deltanet.__file__).parent), "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cases": {}}
    t_end = time.time() + budget_s
    for name, fn in CASES.items():
        runs = []
        for rep in range(2):
            if time.time() > t_end:
                runs.append({"error": "skipped: --budget-s spent"})
                continue
            try:
                with tempfile.TemporaryDirectory() as d:
                    runs.append(fn(Path(d), device))
            except Exception as e:  # noqa: BLE001 - record and go on to the next case
                runs.append({"error": f"{type(e).__name__}: {e}"[:400], "traceback": traceback.format_exc()[-2000:]})
            print(f"{name} run {rep}: {json.dumps({k: v for k, v in runs[-1].items() if k != 'traceback'})[:300]}",
                  flush=True)
        res["cases"][name] = runs
        (out / "results.json").write_text(json.dumps(res, indent=1))


def _rel(a: list, b: list) -> float:
    if len(a) != len(b):
        return math.inf
    return max((abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)), default=0.0)


def compare(old_dir: Path, new_dir: Path, out: Path) -> bool:
    old, new = (json.loads((d / "results.json").read_text()) for d in (old_dir, new_dir))
    lines = [f"# Training core: old ({old['deltanet']}) vs new ({new['deltanet']})", "",
             f"{new['gpu']}, torch {new['torch']}, {new['date']}", "",
             "| case | keys | noise old | noise new | old vs new | step_mode old / new | verdict |",
             "|---|---|---|---|---|---|---|"]
    ok_all = True
    for name in CASES:
        o, n = old["cases"].get(name, []), new["cases"].get(name, [])
        if len(o) < 2 or len(n) < 2 or any("error" in r for r in (*o, *n)):
            errs = "; ".join(r["error"] for r in (*o, *n) if "error" in r) or "missing"
            lines.append(f"| {name} | | | | | | ERROR: {errs[:200]} |")
            ok_all = False
            continue
        keys = [k for k in ("losses", "grad_norms", "val_losses") if k in o[0]]
        noise_o = max(_rel(o[0][k], o[1][k]) for k in keys)
        noise_n = max(_rel(n[0][k], n[1][k]) for k in keys)
        diff = max(_rel(o[0][k], n[0][k]) for k in keys)
        modes = f"{o[0].get('step_mode', '-')} / {n[0].get('step_mode', '-')}"
        ok = diff <= max(2 * max(noise_o, noise_n), 1e-6) and o[0].get("step_mode") == n[0].get("step_mode")
        ok_all &= ok
        lines.append(f"| {name} | {', '.join(keys)} | {noise_o:.2e} | {noise_n:.2e} | {diff:.2e} | {modes} | "
                     f"{'same' if ok else 'DIFFERENT'} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return ok_all


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for results.json (or compare.md)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget for all cases")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script (slow)")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"), help="compare two --out directories")
    args = ap.parse_args(argv)
    if args.compare:
        return 0 if compare(*args.compare, args.out) else 1
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("needs CUDA (--device cpu only smoke-tests the script)", file=sys.stderr)
        return 2
    run(args.out, args.budget_s, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
