"""Kernel benchmark: the delta-rule ops against fla and SDPA attention (``deltanet bench kernels``).

Times forward and forward+backward with ``triton.testing.do_bench`` (median) at a fixed number
of tokens per call (``B = tokens / T``), for each head dim and sequence length, and prints
Mtok/s, achieved TFLOP/s and peak memory. FLOPs are counted for the chunkwise forward as
``6 d^2 + 10 C d`` per token and head (C = 64); forward+backward counts 3x the forward.

Example::

    deltanet bench kernels --dims 64,128 --lengths 1024,4096 --methods ours,fla
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

METHODS = ("ours", "fla", "fla_recurrent", "ours_recurrent", "sdpa")
C = 64


def _inputs(B, T, H, D, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=g)
    k = F.normalize(torch.randn(B, T, H, D, device=device, dtype=torch.float32, generator=g), dim=-1).to(dtype)
    v = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=g)
    beta = torch.rand(B, T, H, device=device, dtype=dtype, generator=g).sigmoid()
    return [x.requires_grad_() for x in (q, k, v, beta)]


def method_fn(name: str):
    """``f(q, k, v, beta) -> o`` for one method (imports fla lazily: it is optional)."""
    if name == "ours":
        from deltanet.ops import chunk_delta_rule
        return lambda q, k, v, b: chunk_delta_rule(q, k, v, b)[0]
    if name == "ours_recurrent":
        from deltanet.ops import recurrent_delta_rule
        return lambda q, k, v, b: recurrent_delta_rule(q, k, v, b)[0]
    if name == "fla":
        from fla.ops.delta_rule import chunk_delta_rule as fla_chunk
        return lambda q, k, v, b: fla_chunk(q, k, v, b)[0]
    if name == "fla_recurrent":
        from fla.ops.delta_rule import fused_recurrent_delta_rule
        return lambda q, k, v, b: fused_recurrent_delta_rule(q, k, v, b)[0]
    if name == "sdpa":
        def sdpa(q, k, v, b):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            return o.transpose(1, 2)
        return sdpa
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")


def fwd_flops(tokens: int, H: int, d: int) -> float:
    return tokens * H * (6 * d * d + 10 * C * d)


def bench_one(name, T, D, *, tokens=32768, H=16, dtype=torch.bfloat16, device="cuda", warmup=25, rep=100):
    """Returns a dict with fwd / fwd+bwd times (ms), Mtok/s, TFLOP/s and peak memory (GiB)."""
    from triton.testing import do_bench

    B = max(1, tokens // T)
    f = method_fn(name)
    q, k, v, beta = _inputs(B, T, H, D, dtype, device)
    do = torch.randn_like(v)
    row = dict(method=name, D=D, T=T, B=B, H=H)

    def fwd():
        with torch.no_grad():
            f(q, k, v, beta)

    def fwd_bwd():
        f(q, k, v, beta).backward(do)

    t0 = time.perf_counter()
    fwd_bwd()  # compile (+ any autotuning) outside the timings
    torch.cuda.synchronize()
    row["first_call_s"] = time.perf_counter() - t0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    grads = [q, k, v, beta]
    row["fwd_ms"] = do_bench(fwd, warmup=warmup, rep=rep, return_mode="median")
    row["fwdbwd_ms"] = do_bench(fwd_bwd, warmup=warmup, rep=rep, grad_to_none=grads, return_mode="median")
    n = B * T
    flops = fwd_flops(n, H, D)
    row["fwd_mtok_s"] = n / row["fwd_ms"] / 1e3
    row["fwdbwd_mtok_s"] = n / row["fwdbwd_ms"] / 1e3
    row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
    row["fwdbwd_tflops"] = 3 * flops / row["fwdbwd_ms"] / 1e9
    return row


def bench_decode_step(name: str, B: int, D: int, *, H: int = 16, dtype=torch.bfloat16, device="cuda",
                      warmup: int = 25, rep: int = 100) -> dict:
    """One decoding step (T = 1 with an fp32 state in and out, no autograd) at batch ``B``:
    median time (us), tokens/s and the state bytes moved per second (read + write)."""
    from triton.testing import do_bench

    if name == "ours_recurrent":
        from deltanet.ops import recurrent_delta_rule as fn
    elif name == "fla_recurrent":
        from fla.ops.delta_rule import fused_recurrent_delta_rule as fn
    else:
        raise ValueError(f"decode step: method must be ours_recurrent or fla_recurrent, got {name!r}")
    q, k, v, beta = (x.detach() for x in _inputs(B, 1, H, D, dtype, device))
    h0 = torch.randn(B, H, D, D, device=device, dtype=torch.float32) * 0.1

    def step():
        with torch.no_grad():
            return fn(q, k, v, beta, initial_state=h0, output_final_state=True)

    step()
    torch.cuda.synchronize()
    us = do_bench(step, warmup=warmup, rep=rep, return_mode="median") * 1e3
    return dict(method=name, kind="decode_step", B=B, D=D, H=H, step_us=us, tokens_per_s=B / us * 1e6,
                state_GBps=2 * h0.numel() * 4 / us / 1e3)


def format_table(rows: list[dict]) -> str:
    """One line per (D, T): fwd+bwd Mtok/s per method and ours / fla."""
    by = {}
    for r in rows:
        by.setdefault((r["D"], r["T"]), {})[r["method"]] = r
    methods = [m for m in METHODS if any(m in v for v in by.values())]
    head = "| D | T | " + " | ".join(f"{m} fwd / fwd+bwd Mtok/s" for m in methods) + " | ours/fla fwd+bwd | peak GiB ours / fla |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (D, T), v in sorted(by.items()):
        cells = []
        for m in methods:
            r = v.get(m)
            cells.append(f"{r['fwd_mtok_s']:.1f} / {r['fwdbwd_mtok_s']:.1f}" if r and "fwd_ms" in r else (r or {}).get("error", "–")[:20])
        o, fl = v.get("ours", {}), v.get("fla", {})
        ratio = f"{fl['fwdbwd_ms'] / o['fwdbwd_ms']:.2f}x" if "fwdbwd_ms" in o and "fwdbwd_ms" in fl else "–"
        mem = f"{o.get('peak_gib', float('nan')):.2f} / {fl.get('peak_gib', float('nan')):.2f}"
        lines.append(f"| {D} | {T} | " + " | ".join(cells) + f" | {ratio} | {mem} |")
    return "\n".join(lines)


def format_decode_table(rows: list[dict]) -> str:
    """One line per decoding-step measurement (:func:`bench_decode_step` rows)."""
    lines = ["| D | batch | method | step us | tokens/s | state GB/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "step_us" in r:
            lines.append(f"| {r['D']} | {r['B']} | {r['method']} | {r['step_us']:.1f} | {r['tokens_per_s']:.0f} | "
                         f"{r['state_GBps']:.0f} |")
        else:
            lines.append(f"| {r['D']} | {r['B']} | {r['method']} | {r['error'][:60]} | | |")
    return "\n".join(lines)


def _record(row: dict, json_path: str | None) -> None:
    print(json.dumps(row), flush=True)
    if json_path:
        with open(json_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def run_sweep(dims: list[int], lengths: list[int], methods: list[str], *, tokens: int = 32768, heads: int = 16,
              max_recurrent_T: int = 4096, warmup: int = 25, rep: int = 100,
              json_path: str | None = None) -> list[dict]:
    """:func:`bench_one` for every (head dim, length, method), recurrent methods only up to
    ``max_recurrent_T``; a failing measurement is a row with its error and the sweep goes on.
    Prints each row as a JSON line (and appends it to ``json_path``); returns the rows."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {METHODS}")
    rows = []
    for D in dims:
        for T in lengths:
            for m in methods:
                if "recurrent" in m and T > max_recurrent_T:
                    continue
                try:
                    r = bench_one(m, T, D, tokens=tokens, H=heads, warmup=warmup, rep=rep)
                except Exception as e:  # one failing method must not end the sweep
                    r = dict(method=m, D=D, T=T, error=f"{type(e).__name__}: {e}"[:300])
                torch.cuda.empty_cache()
                rows.append(r)
                _record(r, json_path)
    return rows


def run_decode_steps(dims: list[int], batches: list[int], methods: list[str], *, heads: int = 16, warmup: int = 25,
                     rep: int = 100, json_path: str | None = None) -> list[dict]:
    """:func:`bench_decode_step` for every (head dim, batch, recurrent method in ``methods``);
    rows printed and recorded as in :func:`run_sweep`."""
    rows = []
    for D in dims:
        for B in batches:
            for m in (m for m in methods if "recurrent" in m):
                try:
                    r = bench_decode_step(m, B, D, H=heads, warmup=warmup, rep=rep)
                except Exception as e:
                    r = dict(method=m, kind="decode_step", B=B, D=D, error=f"{type(e).__name__}: {e}"[:300])
                rows.append(r)
                _record(r, json_path)
    return rows
