"""Training peak memory and tokens/s, deltanet-340m vs fla 0.6.0's DeltaNet, in both regimes.

One GPU call: ``python benchmarks/gpu_memory_check.py OUT_DIR --budget-s 540``. At T = 2048 and
8192 (32K tokens per step, untied embeddings: fla's 374M DeltaNet shape, fused AdamW) and in both
training regimes — ``bf16`` (``model.to(torch.bfloat16)``, no autocast) and ``autocast`` (float32
parameters under bf16 autocast) — it measures:

1. ours (defaults: fused linear cross-entropy) and fla's DeltaNet (its defaults), the pairs the
   target is stated on (peak memory <= 0.8x fla's, tokens/s >= 1.3x fla's, T = 2K-8K);
2. the A/B of our memory choices named in ``--variants``, run point by point (each regime and T:
   every variant, in the order given), as the budget allows: q, k, v of the
   delta rule kept for backward (``DeltaNetMixer.recompute_features = False``; the default reruns
   them from the conv inputs), the mixer's input recompute (``DeltaNetMixer.recompute_inputs``),
   ``ours-keep-wy``: the chunk op keeping the chunks' (I + A)^-1 and v_new for backward
   (``DeltaNetMixer.recompute_wy = False``; the default keeps only its inputs and reruns the UT
   transform and the state pass: 4,096 fewer bytes per token and layer), and ``ours-before``: the
   plain (materialised-logits) loss with q, k, v and the WY tiles kept, as before the memory changes;
3. first of all, a quick check that the fused loss equals the plain one on the GPU (bf16 and
   float32 parameters; loss and gradients).

``--rounds`` (default 2) passes over all of that, and the table gives each point's median
tokens/s with the rounds' range: ten timed steps of one row moved by up to 17% between calls on an
H100 (2026-12-07), more than the differences the table is read for. Peak memory does not move.

Every row is appended to ``OUT_DIR/memory.jsonl`` as it finishes and ``memory.md`` /
``memory.json`` are rewritten, so a call cut short keeps what it measured. A run that would not
fit in what is left of ``--budget-s`` (estimated from the runs before it) is recorded as
skipped; a second call into the same folder (e.g. ``--variants ours-recompute-features,...``) adds
its rows to the same table. Peak memory is ``torch.cuda.max_memory_allocated`` over warmup + timed steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from deltanet.bench.model import FLA, SMOKE, bench_train, environment

# label -> (model name, bench_train keyword arguments, DeltaNetMixer switches)
VARIANTS = {
    "ours": ("deltanet-340m", {}, {}),
    "fla": (FLA, {}, {}),
    "ours-keep-features": ("deltanet-340m", {}, dict(recompute_features=False)),
    "ours-recompute-inputs": ("deltanet-340m", {}, dict(recompute_inputs=True)),
    "ours-keep-wy": ("deltanet-340m", {}, dict(recompute_wy=False)),
    "ours-before": ("deltanet-340m", dict(fused_loss=False), dict(recompute_features=False, recompute_wy=False)),
}
SWITCHES = ("recompute_inputs", "recompute_features", "recompute_wy")


def loss_check(device: torch.device, smoke: bool = False) -> list[dict]:
    """Fused vs plain loss of a small deltanet model on the GPU: relative errors of the loss and
    of every gradient (the plain loss in float32 is the reference)."""
    from deltanet.models import DeltaNetForCausalLM, get_config

    rows = []
    for regime in ("bf16", "autocast"):
        row = dict(check="fused vs plain loss", regime=regime)
        try:
            outs = []
            for fused in (True, False):
                torch.manual_seed(0)
                shape = SMOKE if smoke else dict(num_hidden_layers=2)
                cfg = get_config("deltanet-340m", fuse_linear_cross_entropy=fused, tie_word_embeddings=False,
                                 **shape)
                model = DeltaNetForCausalLM(cfg).to(device).train()
                if regime == "bf16":
                    model = model.bfloat16()
                ids = torch.randint(0, cfg.vocab_size, (2, 64) if smoke else (4, 2048), device=device,
                                    generator=torch.Generator(device=device).manual_seed(0))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=regime == "autocast"):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                outs.append((loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}))
            (lf, gf), (lp, gp) = outs
            row["loss_fused"], row["loss_plain"] = round(lf.item(), 5), round(lp.item(), 5)
            errs = {n: ((gf[n] - gp[n]).norm() / gp[n].norm().clamp_min(1e-30)).item() for n in gp}
            row["max_grad_rel_err"] = max(errs.values())
            row["worst_param"] = max(errs, key=errs.get)
            row["lm_head_grad_rel_err"] = errs["lm_head.weight"]
        except Exception as e:  # record, carry on with the benchmark
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _summary(rows: list[dict]) -> dict:
    """``{(regime, T, variant): dict(tps=median tokens/s, lo, hi, n, peak=max peak GiB)}`` over the
    measured rows (every round), in the order the points first appear."""
    out: dict = {}
    for r in rows:
        if "tokens_per_s" in r:
            out.setdefault((r["regime"], r["T"], r["variant"]), []).append(r)
    summary = {}
    for key, rs in out.items():
        tps = sorted(r["tokens_per_s"] for r in rs)
        peaks = [r["peak_mem_GiB"] for r in rs if "peak_mem_GiB" in r]  # (none on the CPU)
        summary[key] = dict(tps=statistics.median(tps), lo=tps[0], hi=tps[-1], n=len(tps),
                            peak=max(peaks) if peaks else None)
    return summary


def _render(out: Path, env: dict, checks: list[dict], rows: list[dict]) -> None:
    lines = ["SMOKE RUN: tiny models, numbers meaningless", ""] if env.get("note") else []
    lines += ["# Training memory and speed: deltanet-340m vs fla DeltaNet (untied, 32K tokens/step)", "",
             "  ".join(f"{k}: {v}" for k, v in env.items()), ""]
    lines += ["## Fused vs plain loss (GPU)", "", "| regime | loss fused | loss plain | max grad rel err | worst | error |",
              "|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['regime']} | {c.get('loss_fused', '-')} | {c.get('loss_plain', '-')} | "
                     f"{c.get('max_grad_rel_err', '-')} | {c.get('worst_param', '-')} | {c.get('error', '')} |")
    summary = _summary(rows)
    lines += ["", "## Peak memory and tokens/s (median over the rounds)", "",
              "| regime | T | variant | tokens/s | rounds (min-max) | peak GiB | memory / fla | speed / fla |",
              "|---|---|---|---|---|---|---|---|"]
    for (regime, T, variant), m in summary.items():
        f = summary.get((regime, T, "fla"))
        mem = spd = "-"
        if f and variant != "fla":
            mem = f"{m['peak'] / f['peak']:.2f}x" if m["peak"] and f["peak"] else "-"
            spd = f"{m['tps'] / f['tps']:.2f}x"
        lines.append(f"| {regime} | {T} | {variant} | {m['tps']:.0f} | {m['n']} ({m['lo']}-{m['hi']}) | "
                     f"{m['peak'] if m['peak'] is not None else '-'} | {mem} | {spd} |")
    lines += ["", "Target: memory / fla <= 0.80 and speed / fla >= 1.3 for `ours` in both regimes, T = 2K-8K.", "",
              "## Every row", "", "| round | regime | T | variant | tokens/s | peak GiB | note |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        note = r.get("error") or r.get("skipped") or ""
        lines.append(f"| {r.get('round', 0)} | {r['regime']} | {r['T']} | {r['variant']} | {r.get('tokens_per_s', '-')} | "
                     f"{r.get('peak_mem_GiB', '-')} | {note} |")
    (out / "memory.md").write_text("\n".join(lines) + "\n")
    (out / "memory.json").write_text(json.dumps(dict(environment=env, loss_check=checks, rows=rows), indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder for memory.md / memory.json / memory.jsonl")
    ap.add_argument("--budget-s", type=float, default=540.0, help="total wall-clock budget")
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2,
                    help="passes over every (regime, T, variant) point; the table shows each point's median "
                         "(tokens/s moved by up to 17%% between calls on an H100, 2026-12-07)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--regimes", default="bf16,autocast")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"labels from {list(VARIANTS)}")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script only")
    ap.add_argument("--no-loss-check", action="store_true",
                    help="skip the fused-vs-plain loss check (it passed on an H100, 2026-12-06; ~1-2 min of compiles)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.lengths, args.tokens, args.steps, args.warmup = "32,64", 128, 1, 1
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.smoke else "cuda")
    env = environment(device, " ".join(["python", "benchmarks/gpu_memory_check.py", *(argv or sys.argv[1:])]))
    if args.smoke:
        env["note"] = "smoke"
    lengths = [int(x) for x in args.lengths.split(",")]
    regimes = args.regimes.split(",")
    variants = args.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    jsonl = args.out / "memory.jsonl"
    # rows of earlier calls into the same folder stay in the table (run the variants in a second call)
    rows: list[dict] = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    checks = [] if args.no_loss_check else loss_check(device, args.smoke)
    _render(args.out, env, checks, rows)
    # point by point (regime, T), every variant at each in the order given: a call cut short has whole
    # comparisons at the points it reached
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    plan = [(rnd, v, reg, T) for rnd in range(args.rounds) for reg in regimes for T in lengths for v in variants]
    durations: dict[str, list[float]] = {}
    from deltanet.layers.delta_net import DeltaNetMixer

    DEFAULTS = {sw: getattr(DeltaNetMixer, sw) for sw in SWITCHES}
    for rnd, label, regime, T in plan:
        name, kw, switches = VARIANTS[label]
        left = args.budget_s - (time.perf_counter() - t_start)
        # a variant's first run carries one-off costs (compilation; fla's autotuning: 240 s of one row
        # on an H100, 2026-12-07, against ~40 s for later rows), so the estimate is its quickest run so
        # far, or the quickest of any variant before its first: a row that overruns is only cut, the
        # rows before it are written
        seen = durations.get(label) or [t for ts in durations.values() for t in ts]
        need = min(seen, default=60.0)
        row = dict(variant=label, model=name, regime=regime, T=T, round=rnd)
        if left < need * 1.2:
            row["skipped"] = f"budget: {left:.0f} s left, ~{need:.0f} s needed"
        else:
            for sw in SWITCHES:
                setattr(DeltaNetMixer, sw, switches.get(sw, DEFAULTS[sw]))
            t0 = time.perf_counter()
            try:
                row.update(bench_train(name, T, tokens=args.tokens, steps=args.steps, warmup=args.warmup,
                                       device=device, regime=regime, tie_word_embeddings=False,
                                       smoke=args.smoke, **kw))
            except Exception as e:  # bench_train reports its own errors; this catches the rest
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            finally:
                for sw in SWITCHES:
                    setattr(DeltaNetMixer, sw, DEFAULTS[sw])
            durations.setdefault(label, []).append(time.perf_counter() - t0)
            row["wall_s"] = round(durations[label][-1], 1)
            row["variant"] = label
        print(json.dumps(row), flush=True)
        rows.append(row)
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        _render(args.out, env, checks, rows)
    print((args.out / "memory.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
