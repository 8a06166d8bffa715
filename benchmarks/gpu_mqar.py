"""MQAR at the paper's hardest setting on GPUs: time-bounded runs, many per GPU, curves logged.

    python benchmarks/gpu_mqar.py --out runs/gpu_mqar                  # full grid, all GPUs, < 5 min
    python benchmarks/gpu_mqar.py --out runs/gpu_mqar --lrs 5e-4 1e-3 --deadline 570
    python benchmarks/gpu_mqar.py --delta-backend torch ...            # if Triton start-up is too slow
    python benchmarks/gpu_mqar.py --smoke --out /tmp/mqar_smoke        # CPU, ~1-2 minutes

By default the 20 jobs (5 models x 4 widths x 1 lr) share the visible GPUs, 10 worker
processes per GPU, and the per-job training budget is chosen so the grid ends within
``--deadline`` (285 s): one H200 -> 2 rounds of ~100 s; two H200s -> 1 round of ~200 s.

Setting (DeltaNet paper, Fig. 2 hardest panel; Zoology MQAR): sequence 512, 64 key-value
pairs, vocabulary 8192, two layers, widths 64/128/256/512, models delta_net,
linear_attention, full_attention, hybrid-swa, hybrid-global, best accuracy over an lr grid.

Why it looks like this: MQAR needs thousands of steps before accuracy jumps, and these models
are far too small to fill an H200, so each GPU runs ``--workers`` processes side by side, each
pulling (model, width, lr) jobs from a shared queue and training each for at most
``--budget`` seconds (stopping early at ``--stop-accuracy``). ``--deadline`` bounds the whole
process: a worker does not start a job that cannot finish before it. Every finished job is
appended to ``results.jsonl`` at once (a killed run keeps what it finished); at the end the
parent writes ``results.json``, ``table.md``, ``accuracy_vs_width.png`` and
``learning_curves.png``. Data are generated once (seed 0 train, seed 1 test) and shared.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--widths", nargs="+", type=int, default=[64, 128, 256, 512])
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-3])
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
    p.add_argument("--deadline", type=float, default=285.0,
                   help="wall seconds for the whole process; jobs that cannot finish are skipped")
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--stop-accuracy", type=float, default=0.99)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--workers", type=int, default=10,
                   help="processes per device (small models leave an H200 mostly idle)")
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
            devices=["cpu"], workers=2, delta_backend="torch",
        )
    args = p.parse_args(argv)
    if args.devices is None:
        n = torch.cuda.device_count()
        if n == 0:
            p.error("no CUDA device visible; pass --devices cpu or --smoke")
        args.devices = [f"cuda:{i}" for i in range(n)]
    return args


def worker(rank: int, device: str, args: argparse.Namespace, data_path: str, jobs, done, t_start: float) -> None:
    """Pull jobs until the queue is empty or the deadline is near; append each result."""
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
        # Skip what cannot finish (training budget plus a little evaluation) before the deadline.
        if time.time() - t_start + args.budget * 1.05 + 5 > args.deadline:
            done.put({"model": model_name, "width": width, "lr": lr, "skipped": "deadline"})
            continue
        torch.manual_seed(args.seed)
        model = build_model(
            model_name, width=width, num_layers=args.layers, vocab_size=args.vocab_size,
            head_dim=args.head_dim, sliding_window=args.sliding_window, max_len=args.seq_len,
            delta_backend=args.delta_backend,
        )
        cfg = TrainConfig(
            lr=lr, epochs=args.max_steps, max_steps=args.max_steps, time_budget=args.budget,
            batch_size=args.batch_size, eval_every=args.eval_every, eval_batch_size=250,
            stop_accuracy=args.stop_accuracy, schedule="constant", warmup_steps=args.warmup_steps,
            seed=args.seed, device=device,
        )
        t0 = time.time()
        try:
            run = train_and_evaluate(model, (xtr, ytr), (xte, yte), cfg).to_dict()
        except torch.OutOfMemoryError as e:  # report it and keep the worker alive
            run = {"error": f"OOM: {str(e).splitlines()[0]}"}
            torch.cuda.empty_cache()
        res = {"task": "mqar", "seq_len": args.seq_len, "num_pairs": args.num_pairs,
               "model": model_name, "width": width, "lr": lr, "num_layers": args.layers,
               "params": sum(p.numel() for p in model.parameters()), "device": device,
               "worker": rank, "wall_seconds": round(time.time() - t0, 1), **run}
        if "steps" in run and run["seconds"] > 0:
            res["steps_per_second"] = round(run["steps"] / run["seconds"], 2)
        done.put(res)
        del model


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
    # Largest widths first: the slowest jobs start while the deadline is furthest away.
    grid = [(m, w, lr) for w in sorted(args.widths, reverse=True) for m in args.models for lr in args.lrs]
    n_workers = args.workers * len(args.devices)
    if args.budget is None:
        rounds = -(-len(grid) // n_workers)
        args.budget = max(5.0, (args.deadline - 45 - (time.time() - t_start)) / rounds / 1.1)
    print(f"{len(grid)} jobs on {n_workers} workers ({', '.join(args.devices)}), "
          f"{args.budget:.0f} s of training each, deadline {args.deadline:.0f} s", flush=True)
    for job in grid:
        jobs.put(job)
    procs = []
    for d in args.devices:
        for _ in range(args.workers):
            p = ctx.Process(target=worker, args=(len(procs), d, args, str(data_path), jobs, done, t_start))
            p.start()
            procs.append(p)

    results, log = [], (args.out / "results.jsonl").open("a")
    while len(results) < len(grid):
        try:
            res = done.get(timeout=5)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break  # a worker died (its traceback is on stderr); keep what we have
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
                  f"steps={res['steps']} ({res['steps_per_second']:.1f}/s, {res['device']}) {to99} "
                  f"[t={time.time() - t_start:.0f}s]", flush=True)
    for p in procs:
        p.join(timeout=30)
    log.close()
    data_path.unlink(missing_ok=True)

    runs = [r for r in results if "best_accuracy" in r]
    meta = {"command": "python benchmarks/gpu_mqar.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "torch": torch.__version__,
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
