"""MQAR at the paper's hardest setting on GPUs: time-bounded runs, many per GPU, curves logged.

    python benchmarks/gpu_mqar.py --out runs/gpu_mqar --deadline 540     # the whole grid, all GPUs
    python benchmarks/gpu_mqar.py --out runs/gpu_mqar --lrs 5e-4 1e-3    # one lr list for every width
    python benchmarks/gpu_mqar.py --no-cuda-graph ...                    # eager steps only
    python benchmarks/gpu_mqar.py --smoke --out /tmp/mqar_smoke          # CPU, ~1-2 minutes

Setting (DeltaNet paper, Fig. 2 hardest panel; Zoology MQAR): sequence 512, 64 key-value
pairs, vocabulary 8192, two layers, widths 64/128/256/512, models delta_net,
linear_attention, full_attention, hybrid-swa, hybrid-global, best accuracy over an lr grid.
The lr grid depends on the width (``--lr-grid``, default ``DEFAULT_LR_GRID``: wide models get
smaller rates; Zoology sweeps 1e-4 ... 1e-2 for every width).

Why it looks like this: MQAR needs thousands of steps before accuracy jumps, and these models
are far too small to fill an H200, so each GPU runs several processes side by side (start the
CUDA MPS daemon first, so that they run concurrently instead of time-sliced:
``nvidia-cuda-mps-control -d`` before, ``echo quit | nvidia-cuda-mps-control`` after; the
2026-11-30 runs used 12-20 processes per H200), each pulling (model, width, lr) jobs from a shared queue and training
each for at most ``--budget`` seconds (stopping early at ``--stop-accuracy``). By default
(``--workers 0``) every job gets a worker, so the whole grid runs in one round. Each training
step is one CUDA-graph replay (``--cuda-graph``, on by default): checked against an eager step
once, falling back to eager steps if capture or check fails (``step_mode`` of each result).

Jobs are queued by priority: ``--models`` order first (delta_net and linear_attention lead),
widest first within a model. ``--deadline`` bounds the whole process: a job starts only with
at least ``--min-budget`` seconds left, and trains for ``min(budget, time left)``. Every
finished job is appended to ``results.jsonl`` at once and every evaluation to
``progress.jsonl`` (a killed run keeps its finished jobs and the curves of the others); at
the end the parent writes ``results.json``, ``table.md``, ``accuracy_vs_width.png`` and
``learning_curves.png``. Data are generated once (seed 0 train, seed 1 test) and shared.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from deltanet.evaluation.tasks.mqar import best_over_lr, make_mqar, results_table
from deltanet.evaluation.tasks.synthetic import (
    TrainConfig,
    build_model,
    plot_accuracy_vs_width,
    plot_learning_curves,
    train_and_evaluate,
)

MODELS = ["delta_net", "linear_attention", "full_attention", "hybrid-swa", "hybrid-global"]

# Learning rates per width: two rates a factor ~3 apart, lower for wider models. At lr 1e-3 the
# first run (2026-11-30) learned at d = 64-256 for attention and the hybrids, while no model
# learned at d = 512 (even full attention) and DeltaNet at d = 64 was still rising slowly.
DEFAULT_LR_GRID = "64:1e-3,3e-3 128:5e-4,1.5e-3 256:3e-4,1e-3 512:1.5e-4,5e-4"


def parse_lr_grid(text: str) -> dict[int, list[float]]:
    """``"64:1e-3,3e-3 128:5e-4"`` -> ``{64: [1e-3, 3e-3], 128: [5e-4]}``.

    >>> parse_lr_grid("64:1e-3,3e-3 512:1e-4")
    {64: [0.001, 0.003], 512: [0.0001]}
    """
    grid = {}
    for item in text.split():
        width, _, lrs = item.partition(":")
        try:
            grid[int(width)] = [float(x) for x in lrs.split(",") if x]
        except ValueError:
            raise ValueError(f"bad --lr-grid entry {item!r}: expected WIDTH:LR[,LR...]") from None
        if not grid[int(width)] or any(not lr > 0 for lr in grid[int(width)]):
            raise ValueError(f"bad --lr-grid entry {item!r}: expected WIDTH:LR[,LR...] with LR > 0")
    return grid


def job_grid(models: list[str], widths: list[int], lrs_for: dict[int, list[float]]) -> list[tuple[str, int, float]]:
    """(model, width, lr) in priority order: model order first, then widest first, then lr.

    >>> job_grid(["a", "b"], [64, 512], {64: [1e-3], 512: [1e-4, 3e-4]})
    [('a', 512, 0.0001), ('a', 512, 0.0003), ('a', 64, 0.001), ('b', 512, 0.0001), ('b', 512, 0.0003), ('b', 64, 0.001)]
    """
    return [(m, w, lr) for m in models for w in sorted(widths, reverse=True) for lr in lrs_for[w]]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--widths", nargs="+", type=int, default=[64, 128, 256, 512])
    p.add_argument("--lrs", nargs="+", type=float, default=None,
                   help="one lr list for every width (overrides --lr-grid)")
    p.add_argument("--lr-grid", default=DEFAULT_LR_GRID,
                   help="lrs per width, 'WIDTH:LR,LR WIDTH:LR,...' (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--num-pairs", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--sliding-window", type=int, default=64)
    p.add_argument("--delta-backend", default="auto",
                   help="deltanet.ops backend of the delta layers: auto (Triton on CUDA) | torch | ...")
    p.add_argument("--train-size", type=int, default=100_000)
    p.add_argument("--test-size", type=int, default=1_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--budget", type=float, default=None,
                   help="training seconds per job; default: fit the grid into --deadline, i.e. "
                   "(deadline - 45 s start-up) / rounds / 1.1, rounds = ceil(jobs / workers)")
    p.add_argument("--min-budget", type=float, default=60.0,
                   help="a job starts only if it can train this long before the deadline; "
                   "it trains for min(budget, time left)")
    p.add_argument("--deadline", type=float, default=285.0,
                   help="wall seconds for the whole process; jobs that cannot finish are skipped")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="replay each training step as a CUDA graph (checked once against an "
                   "eager step; falls back to eager steps on any failure)")
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--stop-accuracy", type=float, default=0.99)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--workers", type=int, default=0,
                   help="processes per device (small models leave an H200 mostly idle); "
                   "0: enough for every job to run at once, at most 24 per device")
    p.add_argument("--devices", nargs="+", default=None,
                   help="default: every visible CUDA device (cpu in --smoke)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/gpu_mqar"))
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU version of the same pipeline (seq 64, 4 pairs, vocab 128)")
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        # Smoke defaults; flags given explicitly still win.
        p.set_defaults(
            seq_len=64, num_pairs=4, vocab_size=128, widths=[32, 64],
            models=["delta_net", "linear_attention"], train_size=4096, test_size=256,
            batch_size=32, budget=15.0, deadline=150.0, eval_every=50, warmup_steps=20,
            devices=["cpu"], workers=2, delta_backend="torch", min_budget=1.0,
            lr_grid="32:1e-3,3e-3 64:1e-3",
        )
    args = p.parse_args(argv)
    try:
        grid = parse_lr_grid(args.lr_grid)
    except ValueError as e:
        p.error(str(e))
    if args.lrs is not None:
        grid = {w: list(args.lrs) for w in args.widths}
    missing = [w for w in args.widths if w not in grid]
    if missing:
        p.error(f"--lr-grid has no learning rates for widths {missing}")
    args.lrs_for = {w: grid[w] for w in args.widths}
    if args.devices is None:
        n = torch.cuda.device_count()
        if n == 0:
            p.error("no CUDA device visible; pass --devices cpu or --smoke")
        args.devices = [f"cuda:{i}" for i in range(n)]
    return args


def worker(rank: int, device: str, args: argparse.Namespace, data_path: str, jobs, done, t_start: float) -> None:
    """Pull jobs until the queue is empty or the deadline is near; report each result and each
    evaluation. Exits after an error other than out-of-memory (its CUDA context may be broken;
    the jobs left in the queue go to the other workers)."""
    if device == "cpu":
        torch.set_num_threads(1)  # workers share the cores
    else:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    data = torch.load(data_path, mmap=True)
    # The whole data set lives on the device (int16: 100k x 512 is 100 MB), no per-step copies.
    xtr, ytr, xte, yte = (data[k].to(device) for k in ("xtr", "ytr", "xte", "yte"))
    while True:
        try:
            model_name, width, lr = jobs.get_nowait()
        except queue.Empty:
            return
        job = {"model": model_name, "width": width, "lr": lr}
        # Train for the budget, or for what is left before the deadline (less ~5% + 10 s for
        # the evaluations and the model set-up); skip the job when that is too short.
        left = (args.deadline - (time.time() - t_start) - 10) / 1.05
        budget = min(args.budget, left)
        if budget < args.min_budget:
            done.put({**job, "skipped": "deadline"})
            continue
        torch.manual_seed(args.seed)
        model = build_model(
            model_name, width=width, num_layers=args.layers, vocab_size=args.vocab_size,
            head_dim=args.head_dim, sliding_window=args.sliding_window, max_len=args.seq_len,
            delta_backend=args.delta_backend,
        )
        cfg = TrainConfig(
            lr=lr, epochs=args.max_steps, max_steps=args.max_steps, time_budget=budget,
            batch_size=args.batch_size, eval_every=args.eval_every, eval_batch_size=250,
            stop_accuracy=args.stop_accuracy, schedule="constant", warmup_steps=args.warmup_steps,
            seed=args.seed, device=device, cuda_graph=args.cuda_graph,
        )
        t0 = time.time()
        fatal = False
        try:
            run = train_and_evaluate(model, (xtr, ytr), (xte, yte), cfg,
                                     on_eval=lambda row: done.put({"progress": {**job, **row}})).to_dict()
        except torch.OutOfMemoryError as e:  # report it and keep the worker alive
            run = {"error": f"OOM: {str(e).splitlines()[0]}"}
            del model
            model = None
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - report, then leave: the context may be broken
            run = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}",
                   "traceback": traceback.format_exc()[-3000:]}
            fatal = True
        res = {"task": "mqar", "seq_len": args.seq_len, "num_pairs": args.num_pairs,
               **job, "num_layers": args.layers,
               "params": sum(p.numel() for p in model.parameters()) if model is not None else None,
               "device": device, "worker": rank, "budget": round(budget, 1),
               "wall_seconds": round(time.time() - t0, 1), **run}
        if "steps" in run and run["seconds"] > 0:
            res["steps_per_second"] = round(run["steps"] / run["seconds"], 2)
        done.put(res)
        del model
        if fatal:
            return


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    data_path = args.out / "data.pt"
    mk = dict(vocab_size=args.vocab_size, seed=args.seed)
    xtr, ytr = make_mqar(args.train_size, args.seq_len, args.num_pairs, **mk)
    xte, yte = make_mqar(args.test_size, args.seq_len, args.num_pairs, **{**mk, "seed": args.seed + 1})
    torch.save({k: v.to(torch.int16) for k, v in
                dict(xtr=xtr, ytr=ytr, xte=xte, yte=yte).items()}, data_path)
    print(f"data: {args.train_size} train / {args.test_size} test, T={args.seq_len} P={args.num_pairs} "
          f"V={args.vocab_size} ({time.time() - t_start:.0f}s)", flush=True)

    ctx = mp.get_context("spawn")
    jobs, done = ctx.Queue(), ctx.Queue()
    # Priority order (models as listed, widest first): with fewer workers than jobs the first
    # ones start at once, the rest when a worker frees up (early stop at 99%).
    grid = job_grid(args.models, args.widths, args.lrs_for)
    if args.workers <= 0:
        args.workers = min(24, -(-len(grid) // len(args.devices)))
    n_workers = args.workers * len(args.devices)
    if args.budget is None:
        rounds = -(-len(grid) // n_workers)
        args.budget = max(5.0, (args.deadline - 45 - (time.time() - t_start)) / rounds / 1.1)
    mps = os.environ.get("CUDA_MPS_PIPE_DIRECTORY") if args.devices[0] != "cpu" else None
    print(f"{len(grid)} jobs on {n_workers} workers ({', '.join(args.devices)}, "
          f"{'MPS at ' + mps if mps else 'no MPS'}), {args.budget:.0f} s of training each, "
          f"cuda graph {'on' if args.cuda_graph else 'off'}, deadline {args.deadline:.0f} s", flush=True)
    for job in grid:
        jobs.put(job)
    procs = []
    for d in args.devices:
        for _ in range(args.workers):
            p = ctx.Process(target=worker, args=(len(procs), d, args, str(data_path), jobs, done, t_start))
            p.start()
            procs.append(p)

    results, log = [], (args.out / "results.jsonl").open("a")
    progress = (args.out / "progress.jsonl").open("a")
    while len(results) < len(grid):
        try:
            res = done.get(timeout=5)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break  # a worker died (its traceback is on stderr); keep what we have
            continue
        if "progress" in res:  # one evaluation of a running job
            progress.write(json.dumps({**res["progress"], "t": round(time.time() - t_start, 1)}) + "\n")
            progress.flush()
            continue
        results.append(res)
        log.write(json.dumps(res) + "\n")
        log.flush()
        if "skipped" in res or "error" in res:
            print(f"{res['model']:>16} d={res['width']:<4} lr={res['lr']:<7g} "
                  f"{res.get('skipped') or res.get('error')}", flush=True)
        else:
            to99 = (f"99% at step {res['steps_to_99']} / {res['seconds_to_99']:.0f}s"
                    if res["steps_to_99"] is not None else "not at 99%")
            print(f"{res['model']:>16} d={res['width']:<4} lr={res['lr']:<7g} acc={res['best_accuracy']:.4f} "
                  f"steps={res['steps']} ({res.get('steps_per_second', 0):.1f}/s, {res['device']}, "
                  f"{res['step_mode']}) {to99} [t={time.time() - t_start:.0f}s]", flush=True)
    for p in procs:
        p.join(timeout=30)
    log.close()
    progress.close()
    data_path.unlink(missing_ok=True)

    runs = [r for r in results if "best_accuracy" in r]
    meta = {"command": "python benchmarks/gpu_mqar.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "lrs_for"},
            "lr_grid": {str(w): lrs for w, lrs in args.lrs_for.items()},
            "torch": torch.__version__, "mps_pipe_directory": mps,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "wall_seconds": round(time.time() - t_start, 1)}
    (args.out / "results.json").write_text(json.dumps({**meta, "results": results}, indent=1))
    if runs:
        table = results_table(runs)
        (args.out / "table.md").write_text(f"{table}\n")
        print(table)
        plot_accuracy_vs_width(best_over_lr(runs).values(), args.out / "accuracy_vs_width.png",
                               panel_key=lambda r: f"seq_len={r['seq_len']}, pairs={r['num_pairs']}",
                               title="MQAR accuracy vs model width")
        plot_learning_curves(runs, args.out / "learning_curves.png",
                             label=lambda r: f"{r['model']} d={r['width']} lr={r['lr']:g}")
    print(f"{len(runs)}/{len(grid)} jobs finished in {time.time() - t_start:.0f}s; wrote {args.out}/")
    return 0 if runs else 1


if __name__ == "__main__":
    sys.exit(main())
