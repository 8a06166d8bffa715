"""The delta-rule family on the GPU, side by side with fla: correctness, speed, memory, cold start.

    python benchmarks/bench_family.py --out results_dir [--budget 500] [--parts env,cold,check,pytest,speed]

Gated vs plain rule, ours only (about 90 s on an H100, compilation included):

    python benchmarks/bench_family.py --out gated_vs_plain --parts env,speed --ops gated,plain \
        --libs ours --dims 64,128 --lengths 1024,2048,4096,8192,16384 --budget 90

Parts (each in its own try/except; results are rewritten after every measurement, so a run cut
short still leaves what it measured):

- ``env``: GPU, torch, triton, fla versions.
- ``cold``: the first fwd+bwd of each op (gated rule, DeltaProduct n_h = 2, plain rule) in a
  fresh process with an empty Triton cache (D = 128, T = 4096, 8 sequences, bf16).
- ``check``: relative errors against the float64 oracle (``delta_rule_reference`` /
  ``delta_product_reference`` on the GPU) of ours and of fla at fla's peer cases: head dim 100
  (not a power of two), bf16 and fp16, the gradient through the final state only, varlen with
  initial states, DeltaProduct n_h = 2; o, the final state and every gradient (dg included).
- ``pytest``: ``tests/ops/test_family_triton.py`` and ``tests/ops/test_family.py`` at GPU sizes,
  log in ``pytest.log``.
- ``speed``: ``triton.testing.do_bench`` medians of fwd+bwd, 32K tokens x 16 heads, bf16,
  D = 64 / 128, T = 1K..16K: ours vs fla ``chunk_gated_delta_rule``, ours vs fla
  ``chunk_gated_delta_product`` (n_h = 2), ours vs fla ``chunk_delta_rule`` (plain); Mtok/s and
  peak memory of one fwd+bwd; ``--libs ours`` times ours alone. With both the gated and the plain
  rule, the report adds their ratio.

Writes ``family.json`` and ``family.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OPS = ("gated", "product", "plain")
DEVICE = "cuda"  # --smoke: "cpu" (Triton interpreter), tiny shapes, to exercise the script without a GPU


# ---------------------------------------------------------------------------------- inputs

def make_inputs(op, B, T, H, D, dtype, device=None, n_h=2, seed=0, h0=False, N=None, g_scale=1.0):
    """Leaf tensors ``q, k, v, beta, g, h0`` for ``op``; keys L2-normalised, beta in (0, 2) for
    the plain / product rule (negative eigenvalues), g = logsigmoid(randn) (fla's test gates)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    kshape = (B, T, n_h, H, D) if op == "product" else (B, T, H, D)
    q = r(B, T, H, D)
    k = F.normalize(r(*kshape), dim=-1)
    v = r(*kshape)
    beta = torch.rand(*kshape[:-1], generator=gen) * (2.0 if op != "gated" else 1.0)
    g = F.logsigmoid(r(B, T, H)) * g_scale if op != "plain" else None
    s0 = r(N or B, H, D, D) if h0 else None
    out = dict(q=q, k=k, v=v, beta=beta, g=g, h0=s0)
    for name, x in out.items():
        if x is None:
            continue
        x = x.to(device or DEVICE, torch.float32 if name in ("g", "h0") else dtype)
        out[name] = x.requires_grad_(True)
    return out


def ours(op):
    from deltanet.ops import delta_product, delta_rule

    def f(x, cu=None, out_state=False):
        fn = delta_product if op == "product" else delta_rule
        return fn(x["q"], x["k"], x["v"], x["beta"], g=x["g"], initial_state=x["h0"], output_final_state=out_state,
                  cu_seqlens=cu, backend="triton")
    return f


def torch_chunk(op):
    """The PyTorch chunkwise form on the same low-precision inputs. It computes in fp32 and rounds
    its outputs to the input dtype, so its error is the rounding floor of the outputs alone."""
    from deltanet.ops import delta_product, delta_rule

    def f(x, cu=None, out_state=False):
        fn = delta_product if op == "product" else delta_rule
        return fn(x["q"], x["k"], x["v"], x["beta"], g=x["g"], initial_state=x["h0"], output_final_state=out_state,
                  cu_seqlens=cu, backend="torch")
    return f


FLA_PAST_GUARD = False  # --fla-past-guard


def fla(op):
    """fla's op with our argument convention (fla takes product keys as ``[B, T * n_h, H, K]``).

    fla 0.6.0 refuses its gated backward on Hopper with Triton 3.4-3.7.0 (its issue #640: wrong
    results from one kernel on that stack). With ``--fla-past-guard`` the refusal is switched off so
    that its speed can still be timed; the check part then reports how far its results are off.
    """
    if FLA_PAST_GUARD and op in ("gated", "product"):
        import fla.ops.common.chunk_o as fla_chunk_o

        fla_chunk_o.TRITON_ABOVE_3_7_1 = True
    if op == "gated":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fn

        def f(x, cu=None, out_state=False):
            return fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"], output_final_state=out_state,
                      cu_seqlens=cu)
    elif op == "product":
        from fla.ops.gated_delta_product import chunk_gated_delta_product as fn

        def f(x, cu=None, out_state=False):
            B, T, n_h, H, D = x["k"].shape
            return fn(x["q"], x["k"].reshape(B, T * n_h, H, D), x["v"].reshape(B, T * n_h, H, -1), x["g"],
                      x["beta"].reshape(B, T * n_h, H), num_householder=n_h, initial_state=x["h0"],
                      output_final_state=out_state, cu_seqlens=cu)
    else:
        from fla.ops.delta_rule import chunk_delta_rule as fn

        def f(x, cu=None, out_state=False):
            return fn(x["q"], x["k"], x["v"], x["beta"], initial_state=x["h0"], output_final_state=out_state,
                      cu_seqlens=cu)
    return f


def oracle(op):
    from deltanet.ops import delta_product_reference, delta_rule_reference

    def f(x, cu=None, out_state=False):
        fn = delta_product_reference if op == "product" else delta_rule_reference
        return fn(x["q"], x["k"], x["v"], x["beta"], g=x["g"], initial_state=x["h0"], output_final_state=out_state,
                  cu_seqlens=cu)
    return f


# ---------------------------------------------------------------------------------- parts

def part_env():
    import triton

    info = dict(gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)", torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d"))
    try:
        import fla

        info["fla"] = getattr(fla, "__version__", "?")
    except Exception as e:  # fla is the yardstick; the rest runs without it
        info["fla"] = f"not importable: {e}"
    return info


def cold_one(op, lib):
    """In a fresh process: the first fwd+bwd (compilation included) at D = 128, T = 4096, B = 8."""
    x = make_inputs(op, 8, 4096, 16, 128, torch.bfloat16)
    f = ours(op) if lib == "ours" else fla(op)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    o, _ = f(x)
    o.backward(torch.randn_like(o))
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def part_cold(record, deadline):
    rows = []
    for op in OPS:
        for lib in ("ours", "fla"):
            if time.time() > deadline:
                rows.append(dict(op=op, lib=lib, skipped="time budget"))
                continue
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TRITON_CACHE_DIR": cache,
                       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
                try:
                    cmd = [sys.executable, __file__, "--cold-one", op, lib] + (["--fla-past-guard"] if FLA_PAST_GUARD else [])
                    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(10, min(60, deadline - time.time())))
                    line = [ln for ln in p.stdout.splitlines() if ln.startswith("COLD ")]
                    rows.append(dict(op=op, lib=lib, seconds=float(line[-1].split()[1])) if line else
                                dict(op=op, lib=lib, error=p.stderr[-2000:]))
                except Exception as e:
                    rows.append(dict(op=op, lib=lib, error=repr(e)))
            record(rows)
    return rows


def _grads(x):
    return {f"d{n}": t.grad.double() for n, t in x.items() if t is not None and t.grad is not None}


def _run(f, x, do, dS, cu=None):
    for t in x.values():
        if t is not None:
            t.grad = None
    o, S = f(x, cu, True)
    loss = (o.double() * do).sum() + (S.double() * dS).sum()
    loss.backward()
    return dict(o=o.double().detach(), S=S.double().detach(), **_grads(x))


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


CHECKS = [  # (label, op, dtype, B, T, H, D, varlen lengths or None, cotangent mode)
    ("gated D=100 bf16", "gated", torch.bfloat16, 2, 1000, 4, 100, None, "both"),
    ("gated D=100 fp16", "gated", torch.float16, 2, 1000, 4, 100, None, "both"),
    ("gated D=128 bf16 grad via final state only", "gated", torch.bfloat16, 2, 500, 4, 128, None, "state"),
    ("gated D=64 bf16 varlen + h0", "gated", torch.bfloat16, 1, 3164, 4, 64, [100, 1000, 1, 2000, 63], "both"),
    ("product n_h=2 D=128 bf16", "product", torch.bfloat16, 2, 500, 4, 128, None, "both"),
    ("product n_h=2 D=64 bf16 varlen + h0", "product", torch.bfloat16, 1, 1164, 4, 64, [100, 1000, 1, 63], "both"),
    ("plain D=100 bf16 (beta in (0, 2))", "plain", torch.bfloat16, 2, 1000, 4, 100, None, "both"),
]


def part_check(record, deadline):
    rows = []
    for label, op, dtype, B, T, H, D, lens, mode in CHECKS:
        if time.time() > deadline:
            rows.append(dict(case=label, skipped="time budget"))
            record(rows)
            continue
        row = dict(case=label)
        try:
            N = len(lens) if lens else B
            cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0) if lens else None
            x = make_inputs(op, B, T, H, D, dtype, h0=True, N=N, seed=len(label))
            gen = torch.Generator(device="cpu").manual_seed(1)
            do = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64).to(DEVICE)
            dS = torch.randn(N, H, D, D, generator=gen, dtype=torch.float64).to(DEVICE)
            if mode == "state":
                do.zero_()
            # The float64 step-by-step oracle runs on the CPU: on a GPU its per-step launches made one
            # case take over a minute (H100, 2026-12-06).
            x64 = {n: (t.detach().cpu().double().requires_grad_(True) if t is not None else None)
                   for n, t in x.items()}
            ref = _run(oracle(op), x64, do.cpu(), dS.cpu(), cu.cpu() if cu is not None else None)
            ref = {n: t.to(DEVICE) for n, t in ref.items()}
            mine = _run(ours(op), x, do, dS, cu)
            row["ours"] = {n: _rel(mine[n], ref[n]) for n in ref}
            try:
                floor = _run(torch_chunk(op), x, do, dS, cu)
                row["torch"] = {n: _rel(floor[n], ref[n]) for n in ref if n in floor}
            except Exception as e:
                row["torch"] = {"error": repr(e)[:300]}
            try:
                theirs = _run(fla(op), x, do, dS, cu)
                row["fla"] = {n: _rel(theirs[n], ref[n]) for n in ref if n in theirs}
            except Exception as e:
                row["fla"] = {"error": repr(e)[:300]}
        except Exception:
            row["error"] = traceback.format_exc()[-2000:]
        rows.append(row)
        record(rows)
    return rows


def part_pytest(out: Path, deadline):
    timeout = max(10, deadline - time.time())
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "tests/ops/test_family_triton.py", "tests/ops/test_family.py"]
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        (out / "pytest.log").write_text(p.stdout + p.stderr)
        return dict(rc=p.returncode, tail=(p.stdout + p.stderr)[-600:])
    except subprocess.TimeoutExpired as e:
        (out / "pytest.log").write_text(str(e.stdout or "") + "\nTIMEOUT")
        return dict(rc=None, tail="timeout")


def bench_one(op, lib, T, D, *, tokens=32768, H=16):
    from triton.testing import do_bench

    B = max(1, tokens // T)
    x = make_inputs(op, B, T, H, D, torch.bfloat16)
    f = ours(op) if lib == "ours" else fla(op)
    do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)

    def fwd_bwd():
        f(x)[0].backward(do)

    leaves = [t for t in x.values() if t is not None]
    t0 = time.perf_counter()
    fwd_bwd()
    torch.cuda.synchronize()
    row = dict(op=op, lib=lib, D=D, T=T, B=B, first_call_s=time.perf_counter() - t0)
    for t in leaves:
        t.grad = None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    row["fwdbwd_ms"] = do_bench(fwd_bwd, warmup=25, rep=100, grad_to_none=leaves, return_mode="median")
    row["mtok_s"] = B * T / row["fwdbwd_ms"] / 1e3
    return row


def part_speed(record, deadline, dims, lengths, ops, libs=("ours", "fla")):
    rows = []
    # shape outermost: a run cut short by the budget still has every op (and lib) at the shapes it reached
    for D in dims:
        for T in lengths:
            for op in ops:
                for lib in libs:
                    if time.time() > deadline:
                        rows.append(dict(op=op, lib=lib, D=D, T=T, skipped="time budget"))
                        continue
                    try:
                        rows.append(bench_one(op, lib, T, D))
                    except Exception as e:
                        rows.append(dict(op=op, lib=lib, D=D, T=T, error=repr(e)[:500]))
                    torch.cuda.empty_cache()
                    record(rows)
    return rows


# ---------------------------------------------------------------------------------- report

def markdown(res: dict) -> str:
    lines = [f"# Delta-rule family vs fla ({res.get('env', {}).get('gpu', '?')}, {res.get('env', {}).get('date', '')})", ""]
    lines.append("Environment: `" + json.dumps(res.get("env", {})) + "`")
    lines.append("")
    lines.append("Command: `" + res.get("command", "") + "`")
    if res.get("speed"):
        lines += ["", "## fwd+bwd, 32K tokens x 16 heads, bf16 (Mtok/s, higher is better; peak = extra GiB of one fwd+bwd)", "",
                  "| op | D | T | ours Mtok/s | fla Mtok/s | ours / fla | ours peak | fla peak |", "|---|---|---|---|---|---|---|---|"]
        by = {(r["op"], r["D"], r["T"], r["lib"]): r for r in res["speed"] if "mtok_s" in r}
        keys = sorted({(r["op"], r["D"], r["T"]) for r in res["speed"]}, key=lambda k: (OPS.index(k[0]), k[1], k[2]))
        for op, D, T in keys:
            a, b = by.get((op, D, T, "ours")), by.get((op, D, T, "fla"))
            fmt = lambda r, k, f="{:.2f}": f.format(r[k]) if r else "–"  # noqa: E731
            ratio = f"{a['mtok_s'] / b['mtok_s']:.2f}x" if a and b else "–"
            lines.append(f"| {op} | {D} | {T} | {fmt(a, 'mtok_s')} | {fmt(b, 'mtok_s')} | {ratio} | "
                         f"{fmt(a, 'peak_extra_gib')} | {fmt(b, 'peak_extra_gib')} |")
        if any(op == "gated" for op, _, _ in keys) and any(op == "plain" for op, _, _ in keys):
            lines += ["", "Gated vs plain rule, ours (same shapes; gated / plain time, 1.00 = the gate is free):", "",
                      "| D | T | gated Mtok/s | plain Mtok/s | gated / plain time |", "|---|---|---|---|---|"]
            for D, T in sorted({(D, T) for _, D, T in keys}):
                a, b = by.get(("gated", D, T, "ours")), by.get(("plain", D, T, "ours"))
                if a and b:
                    lines.append(f"| {D} | {T} | {a['mtok_s']:.2f} | {b['mtok_s']:.2f} | "
                                 f"{a['fwdbwd_ms'] / b['fwdbwd_ms']:.2f}x |")
        errs = [r for r in res["speed"] if "error" in r or "skipped" in r]
        for r in errs:
            lines.append(f"- {r['op']} {r['lib']} D={r['D']} T={r['T']}: "
                         + str(r.get('error') or r.get('skipped')).replace("\n", " ")[-300:])
    if res.get("cold"):
        lines += ["", "## Cold start: first fwd+bwd in a fresh process, empty Triton cache (D=128, T=4096, B=8)", "",
                  "| op | ours (s) | fla (s) |", "|---|---|---|"]
        by = {(r["op"], r["lib"]): r for r in res["cold"]}
        for op in OPS:
            cell = lambda lib: (f"{by[(op, lib)]['seconds']:.1f}" if "seconds" in by.get((op, lib), {})  # noqa: E731
                                else str(by.get((op, lib), {}).get("error", by.get((op, lib), {}).get("skipped", "–")))
                                .replace("\n", " ")[-80:])
            lines.append(f"| {op} | {cell('ours')} | {cell('fla')} |")
    if res.get("check"):
        lines += ["", "## Relative error vs the float64 oracle (ours / PyTorch chunkwise, fp32 math on the same inputs / fla)", ""]
        for r in res["check"]:
            if "ours" not in r:
                lines.append(f"- {r['case']}: {r.get('error', r.get('skipped'))}")
                continue
            cells = ", ".join(f"{n} {v:.2e} / {r.get('torch', {}).get(n, float('nan')):.2e}"
                              f" / {r.get('fla', {}).get(n, float('nan')):.2e}"
                              for n, v in r["ours"].items())
            lines.append(f"- {r['case']}: {cells}" + (f" (fla: {r['fla']['error']})" if "error" in r.get("fla", {}) else ""))
    if res.get("pytest"):
        lines += ["", "## pytest (tests/ops/test_family_triton.py, tests/ops/test_family.py)", "",
                  f"rc = {res['pytest'].get('rc')}; tail:", "", "```", res["pytest"].get("tail", ""), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("family_out"))
    p.add_argument("--budget", type=float, default=520, help="total seconds; parts left after it are skipped")
    p.add_argument("--parts", default="env,check,speed,cold,pytest")
    p.add_argument("--dims", default="64,128")
    p.add_argument("--lengths", default="1024,4096,16384")
    p.add_argument("--ops", default="gated,product,plain")
    p.add_argument("--libs", default="ours,fla", help="speed part: whose ops to time (ours, fla or both)")
    p.add_argument("--smoke", action="store_true", help="CPU (Triton interpreter), tiny check shapes: tests the script")
    p.add_argument("--fla-past-guard", action="store_true",
                   help="run fla's gated backward past its Triton-version refusal (time it; its errors are reported)")
    p.add_argument("--cold-one", nargs=2, metavar=("OP", "LIB"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    global FLA_PAST_GUARD
    FLA_PAST_GUARD = args.fla_past_guard
    if args.smoke:
        global DEVICE, CHECKS
        DEVICE = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported
        CHECKS = [(label, op, dt, B, max(1, T // 20), H, 16, [max(1, n // 20) for n in lens] if lens else None, m)
                  for label, op, dt, B, T, H, D, lens, m in CHECKS]
        CHECKS = [(c[0], c[1], c[2], c[3], sum(c[7]) if c[7] else c[4], *c[5:]) for c in CHECKS]
    if args.cold_one:
        print(f"COLD {cold_one(*args.cold_one):.3f}", flush=True)
        return 0
    start = time.time()
    deadline = start + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    res = {"command": "python benchmarks/bench_family.py " + " ".join(argv if argv is not None else sys.argv[1:])}

    def save():
        res["elapsed_s"] = round(time.time() - start, 1)
        (args.out / "family.json").write_text(json.dumps(res, indent=1, default=str))
        (args.out / "family.md").write_text(markdown(res))

    def recorder(key):
        def record(rows):
            res[key] = rows
            save()
        return record

    parts = args.parts.split(",")
    # Share the budget: check, cold starts and pytest get capped slices; the speed sweep takes
    # what the parts after it leave.
    caps = {"check": 150, "cold": 120, "pytest": 120}
    for i, part in enumerate(parts):
        later = sum(caps.get(p_, 0) for p_ in parts[i + 1:])
        until = min(deadline - later, time.time() + caps.get(part, 1e9))
        try:
            if part == "env":
                res["env"] = part_env()
            elif part == "check":
                part_check(recorder("check"), until)
            elif part == "speed":
                part_speed(recorder("speed"), until, [int(d) for d in args.dims.split(",")],
                           [int(t) for t in args.lengths.split(",")], args.ops.split(","), args.libs.split(","))
            elif part == "cold":
                part_cold(recorder("cold"), until)
            elif part == "pytest":
                res["pytest"] = part_pytest(args.out, until)
            else:
                res.setdefault("errors", []).append(f"unknown part {part}")
        except Exception:
            res.setdefault("errors", []).append(f"{part}: {traceback.format_exc()[-2000:]}")
        save()
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
