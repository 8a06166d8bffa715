"""Where a decode step's time goes: the kernels of one token, counted and timed per step.

On an H100 (2026-12-06) the captured decode step of deltanet-340m took 4.5 ms at batch 1, 20x
the floor of streaming its weights once. This script says which kernels make up the step, so that
fusion work aims at the right ones. For each model and batch it prefills a random prompt, then
profiles ``--steps`` one-token steps (``torch.profiler``, CPU + CUDA activity):

- ``eager``: the step launched kernel by kernel (``model.cuda_graph_decoding = False``): every
  kernel's device time; the wall time per step includes the launch gaps;
- ``graph``: the same step replayed as a CUDA graph (our models' default): wall time per step,
  and the kernels where the profiler sees inside graph replays (CUPTI does on recent drivers);
- ``prefill`` (not in the default ``--modes``): the prompt's forward as ``decode`` runs it (attention
  mask, ``use_cache=True``, ``logits_to_keep=1``), one "step" per prompt: wall time, prompt tokens/s,
  kernels; ``forward``: the same forward without a cache (no final states or conv states kept),
  the yardstick prefill should match (on an H100, 2026-12-07, a 2K prompt at batch 32 took 454 ms,
  ~144K tokens/s: less than training's forward + backward).

Each of those per ``--decode-kernels`` route (``eager``: op by op; ``fused``: per block the fused
kernels of ``decode_kernel="fused"``: norm + projections, the delta-rule step, o_proj + residual,
MLP norm + gate/up + SwiGLU, down + residual; see ``deltanet.models.set_decode_kernel``).

Per (model, batch, route, mode) it writes: wall ms per step and tokens/s, the weight-streaming
floor (parameter bytes a step reads / device copy bandwidth) and the step's fraction of it,
kernels per step, the sum of kernel device time per step (if that sum is close to the graph's
wall time the step is bound by its kernels' work, not by launches), and the top kernels by device
time per step with their counts, grouped into families (GEMM, Triton, elementwise, reduction,
copy, other). ``--check`` adds a row per (model, batch): ``--steps`` greedy steps on the fused
route (captured) against the eager route (eager steps) from the same prompt: tokens equal, and
the largest logit difference of the first step relative to the logits' range. Output: ``OUT.md``
and ``OUT.json``, rewritten after every row; ``--budget-s`` skips the points that no longer fit.

    python benchmarks/profile_decode_step.py --out OUT/decode_profile.md \\
        --models deltanet-340m,hybrid-swa-340m --batch 1,32 --prompt 2048 --steps 20 \\
        --decode-kernels eager,fused --check --budget-s 400
    python benchmarks/profile_decode_step.py --smoke --out /tmp/p.md    # tiny model on the CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from deltanet.bench.model import _error, _free, _sync, build_model, environment

PROMPT_MODES = ("prefill", "forward")  # a "step" is the prompt's whole forward, not one token


def family(name: str) -> str:
    """A coarse kernel family from a kernel's name."""
    n = name.lower()
    if any(s in n for s in ("gemm", "gemv", "cutlass", "sm90_xmma", "cublas", "nvjet", "splitk")):
        return "GEMM"
    if "at::native" in n:  # ATen's own CUDA kernels (their names contain "_kernel" too)
        if "copy" in n:
            return "copy"
        return "reduction" if "reduce" in n else "elementwise"
    if "memcpy" in n or "memset" in n:
        return "copy"
    if n.startswith("triton") or "_kernel" in n:
        return "Triton"
    return "other"


def _kernels(prof) -> dict[str, tuple[int, float]]:
    """``{kernel name: (calls, device µs)}`` over the profiled region (kernels and device copies:
    the events with self device time)."""
    out: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None)
        if t is None:  # older torch
            t = getattr(ev, "self_cuda_time_total", 0.0)
        if t and t > 0 and not ev.key.startswith(("aten::", "cuda", "Memcpy DtoH")):
            out[ev.key][0] += ev.count
            out[ev.key][1] += t
    return {k: (c, t) for k, (c, t) in out.items()}


def _cpu_ops(prof) -> dict[str, tuple[int, float]]:
    """CPU runs (``--smoke``): top-level ``aten::`` ops by self CPU time."""
    return {ev.key: (ev.count, ev.self_cpu_time_total) for ev in prof.key_averages()
            if ev.key.startswith("aten::") and ev.self_cpu_time_total > 0}


def _weight_floor_ms(model, bandwidth: float | None) -> float | None:
    from deltanet.bench.decode import weight_bytes_per_step

    return weight_bytes_per_step(model) / bandwidth * 1e3 if bandwidth else None


def profile_steps(name: str, batch: int, *, prompt: int, steps: int, mode: str, device: torch.device,
                  smoke: bool, top: int, decode_kernel: str = "eager", bandwidth: float | None = None) -> dict:
    """One row: ``steps`` profiled one-token steps of ``name`` at ``batch`` in ``mode`` on the
    ``decode_kernel`` route."""
    row: dict = dict(model=name, batch=batch, prompt=prompt, decode_kernel=decode_kernel, mode=mode, steps=steps)
    model = None
    try:
        from deltanet.models import set_decode_kernel

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = build_model(name, smoke=smoke).to(device=device, dtype=dtype).eval()
        if not hasattr(model, "cuda_graph_decoding"):
            raise ValueError(f"{name}: our models only")
        set_decode_kernel(model, decode_kernel)
        model.cuda_graph_decoding = mode == "graph"
        g = torch.Generator(device=device).manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device=device, generator=g)
        with torch.no_grad():
            out = model(ids, use_cache=True, logits_to_keep=1)  # no [B, T, vocab] logits
            cache = out.cache
            tok = out.logits[:, -1:].argmax(-1)

            def step(tok):
                o = model(tok, past_key_values=cache, use_cache=True)
                return o.logits[:, -1:].argmax(-1)

            if mode in PROMPT_MODES:
                mask = torch.ones_like(ids)

                def step(tok):
                    if mode == "prefill":
                        return model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1).logits
                    return model(ids, logits_to_keep=1).logits

            for _ in range(3):  # warm: compiles, autotunes, captures the graph
                tok = step(tok)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                tok = step(tok)
            _sync(device)
            wall = (time.perf_counter() - t0) / steps
            row["wall_ms_per_step"] = round(wall * 1e3, 3)
            row["tokens_per_s"] = round(batch * (prompt if mode in PROMPT_MODES else 1) / wall, 1)
            floor = _weight_floor_ms(model, bandwidth) if mode not in PROMPT_MODES else None
            if floor is not None:
                row["weight_floor_ms"] = round(floor, 3)
                row["floor_frac"] = round(floor / (wall * 1e3), 3)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    tok = step(tok)
                _sync(device)
        kernels = _kernels(prof) if device.type == "cuda" else _cpu_ops(prof)
        row["kernels_per_step"] = round(sum(c for c, _ in kernels.values()) / steps, 1)
        row["kernel_ms_per_step"] = round(sum(t for _, t in kernels.values()) / steps / 1e3, 3)
        fam: dict[str, list] = defaultdict(lambda: [0.0, 0.0])
        for k, (c, t) in kernels.items():
            fam[family(k)][0] += c / steps
            fam[family(k)][1] += t / steps
        row["families"] = {f: dict(per_step=round(c, 1), us_per_step=round(t, 1))
                           for f, (c, t) in sorted(fam.items(), key=lambda kv: -kv[1][1])}
        ranked = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]
        row["top"] = [dict(kernel=k[:120], family=family(k), per_step=round(c / steps, 1),
                           us_per_step=round(t / steps, 1)) for k, (c, t) in ranked]
    except Exception as e:  # OOM, a kernel error: record it and go on
        row["error"] = _error(e)
    finally:
        del model
        _free()
    return row


def check_routes(name: str, batch: int, *, prompt: int, steps: int, device: torch.device, smoke: bool) -> dict:
    """One row: greedy steps of the fused route (captured on CUDA) against the eager route (eager
    steps) from one prompt: ``tokens_equal`` (all steps), ``first_mismatch`` (step index or None),
    ``logit_diff_rel`` (first step: max |fused - eager| / (max - min) of the eager logits)."""
    row: dict = dict(model=name, batch=batch, prompt=prompt, mode="check", steps=steps)
    model = None
    try:
        from deltanet.models import set_decode_kernel

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = build_model(name, smoke=smoke).to(device=device, dtype=dtype).eval()
        g = torch.Generator(device=device).manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device=device, generator=g)
        runs = {}
        for route, graph in (("eager", False), ("fused", True)):
            set_decode_kernel(model, route)
            model.cuda_graph_decoding = graph
            with torch.no_grad():
                out = model(ids, use_cache=True, logits_to_keep=1)
                cache, logits = out.cache, out.logits[:, -1].float()
                toks, first = [], None
                tok = logits.argmax(-1, keepdim=True)
                for _ in range(steps):
                    toks.append(tok)
                    step_logits = model(tok, past_key_values=cache, use_cache=True).logits[:, -1].float()
                    first = step_logits if first is None else first
                    tok = step_logits.argmax(-1, keepdim=True)
            runs[route] = (torch.cat(toks, 1), first)
        (te, le), (tf, lf) = runs["eager"], runs["fused"]
        same = (te == tf).all(0)
        row["tokens_equal"] = bool(same.all())
        row["first_mismatch"] = None if bool(same.all()) else int((~same).nonzero()[0, 0])
        row["logit_diff_rel"] = round(float((lf - le).abs().max() / (le.max() - le.min()).clamp_min(1e-6)), 5)
    except Exception as e:
        row["error"] = _error(e)
    finally:
        del model
        _free()
    return row


def render(env: dict, rows: list[dict]) -> str:
    lines = ["# Decode step profile", "", "  ".join(f"{k}: {v}" for k, v in env.items()), "",
             "| model | batch | route | mode | wall ms / step | tokens/s | weight floor ms | floor frac | kernels / step "
             "| kernel ms / step | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["mode"] == "check":
            continue
        lines.append(f"| {r['model']} | {r['batch']} | {r.get('decode_kernel', '-')} | {r['mode']} | "
                     f"{r.get('wall_ms_per_step', '-')} | {r.get('tokens_per_s', '-')} | {r.get('weight_floor_ms', '-')} | "
                     f"{r.get('floor_frac', '-')} | {r.get('kernels_per_step', '-')} | {r.get('kernel_ms_per_step', '-')} | "
                     f"{r.get('error', '')} |")
    checks = [r for r in rows if r["mode"] == "check"]
    if checks:
        lines += ["", "## Fused (captured) vs eager route: greedy steps from one prompt", "",
                  "| model | batch | steps | tokens equal | first mismatch | first-step logit diff / range | error |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['batch']} | {r['steps']} | {r.get('tokens_equal', '-')} | "
                  f"{r.get('first_mismatch', '-')} | {r.get('logit_diff_rel', '-')} | {r.get('error', '')} |"
                  for r in checks]
    for r in rows:
        if "top" not in r:
            continue
        lines += ["", f"## {r['model']}, batch {r['batch']}, {r.get('decode_kernel', 'eager')} route, {r['mode']}", "",
                  "families: " + ", ".join(f"{f} {v['per_step']} kernels / {v['us_per_step']} µs"
                                           for f, v in r["families"].items()), "",
                  "| kernel | family | per step | µs per step |", "|---|---|---|---|"]
        lines += [f"| `{t['kernel']}` | {t['family']} | {t['per_step']} | {t['us_per_step']} |" for t in r["top"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="markdown file (a .json is written beside it)")
    ap.add_argument("--models", default="deltanet-340m")
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--modes", default="eager,graph")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--decode-kernels", default="eager,fused", help="routes of the one-token step: eager, fused, auto")
    ap.add_argument("--check", action="store_true", help="also compare the fused route's greedy steps with eager's")
    ap.add_argument("--budget-s", type=float, default=None, help="skip the points that start after this many seconds")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script only")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    if any(m not in ("eager", "graph", *PROMPT_MODES) for m in modes):
        ap.error(f"--modes takes eager, graph, prefill and/or forward, got {args.modes!r}")
    routes = args.decode_kernels.split(",")
    if any(r not in ("auto", "fused", "eager") for r in routes):
        ap.error(f"--decode-kernels takes auto, fused and/or eager, got {args.decode_kernels!r}")
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        args.prompt, args.models = min(args.prompt, 16), "deltanet-340m"
    env = environment(device, " ".join(["python", "benchmarks/profile_decode_step.py", *(argv or sys.argv[1:])]))
    bandwidth = None
    if device.type == "cuda":
        from deltanet.bench.decode import copy_bandwidth

        bandwidth = copy_bandwidth(device)
        env["copy_GBps"] = round(bandwidth / 1e9, 1)
    start = time.perf_counter()
    # the prompt's forward (prefill, forward) does not take the decode route: once per model and batch
    whole = [m for m in modes if m in PROMPT_MODES]
    points = [(name, B, route, mode) for name in args.models.split(",") for B in (int(b) for b in args.batch.split(","))
              for route in [*routes, *(["check"] if args.check else [])]
              for mode in (["check"] if route == "check"
                           else [m for m in modes if m not in whole] + (whole if route == routes[0] else []))]
    rows = []
    for name, B, route, mode in points:
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            row = dict(model=name, batch=B, decode_kernel=route, mode=mode, error="skipped: --budget-s spent")
        elif route == "check":
            row = check_routes(name, B, prompt=args.prompt, steps=args.steps, device=device, smoke=args.smoke)
        else:
            steps = min(args.steps, 5) if mode in whole else args.steps
            row = profile_steps(name, B, prompt=args.prompt, steps=steps, mode=mode, device=device,
                                smoke=args.smoke, top=args.top, decode_kernel=route, bandwidth=bandwidth)
        print(json.dumps({k: v for k, v in row.items() if k != "top"}), flush=True)
        rows.append(row)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            f.write(render(env, rows))
        with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
            json.dump(dict(environment=env, rows=rows), f, indent=1)
    print(render(env, rows))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
