"""One delta-rule layer's decode step on a GPU: the fused kernel against the eager step.

Per layer type and batch (the 340M shape: hidden 1024, 8 heads of 128, bf16), three timings, each
of 50 calls replayed from one CUDA graph (launch cost as in captured decoding):

- ``mixer_us``: the whole mixer step (pre-norm, input projections, middle, output projection),
  ``decode_kernel`` fused or eager;
- ``op_us``: the fused op alone (``delta_rule_decode_step``), with the state traffic it implies
  (recurrent state read + written) as GB/s against the device copy bandwidth;
- ``kernels``: CUDA kernels (+ memcpy / memset) one mixer step launches (torch profiler).

    python benchmarks/bench_decode_step.py --out OUT_DIR [--budget-s 120]

Writes ``decode_step.md`` and ``decode_step.json`` into OUT_DIR after every row; a failing row is
recorded and the sweep goes on.

``--gemv-sweep``: instead, the decode-step GEMV kernel (``deltanet.ops.decode_linear``) alone on
the 340M model's projections (pre-norm + input projections, o_proj + residual, MLP gate/up +
SwiGLU, down + residual, final norm + LM head) at each ``--batch``, for its default launch
settings and a grid of ``GemvConfig`` values: microseconds per call (CUDA graph of 50 calls) and
the weight bytes streamed as GB/s and as a fraction of the device copy bandwidth (the floor the
kernel is built for). Writes ``decode_gemv.md`` / ``.json``; the best setting per shape and batch
is marked, to replace ``select_config``'s guesses.

    python benchmarks/bench_decode_step.py --gemv-sweep --out OUT_DIR --batch 1,32 --budget-s 300

``--attention``: instead, an attention layer's decode step against its static K/V cache (the 340M
hybrids' shape: 8 query and 8 KV heads of 128, bf16) at each ``--batch``, for a sliding-window ring
of 2,048 slots (full, the slot wrapping) and a full-attention cache of 8,192 slots (8,000 valid):
``fused_us`` the fused attention step (``deltanet.ops.decode_attention``: RoPE + cache write +
attention, default launch settings) against ``eager_us`` the eager core it replaces (``apply_rope``
of q and k + ``AttentionMixer._static_step``), the kernels of each, the K/V bytes read as GB/s and
as a fraction of the copy bandwidth, the fused output's relative error against the eager core's
and against a float64 oracle, the whole mixer step (norm + projections + core + o_proj) on both
routes, and the fused step at other slot splits (``splits_us``) and launch settings (``block_l/warps_us``,
slots per loop step / warps, at the default splits): to replace ``select_config``'s guesses.
Writes ``decode_attention.md`` / ``.json``.

    python benchmarks/bench_decode_step.py --attention --out OUT_DIR --batch 1,32 --budget-s 300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch


def _graph_time(fn, calls: int = 50, reps: int = 5) -> float:
    """Microseconds per ``fn()`` call, from a CUDA graph of ``calls`` calls (best of ``reps``)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def _kernels(fn) -> int:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.device_type == DeviceType.CUDA for e in prof.events())


def row(kind: str, batch: int, bandwidth: float) -> dict:
    from deltanet.layers import DeltaNetMixer, RMSNorm
    from deltanet.models import DeltaNetCache, get_config
    from deltanet.ops.delta_rule.decode import delta_rule_decode_step

    cfg = get_config("deltanet-340m", num_hidden_layers=1, layer_types=[kind])
    dev, dt = torch.device("cuda"), torch.bfloat16
    mixer = DeltaNetMixer(cfg, 0).to(dev, dt).eval()
    norm = RMSNorm(cfg.hidden_size).to(dev, dt)
    H, D, n_h, W = mixer.num_heads, mixer.head_dim, mixer.num_householder, cfg.conv_size
    cache = DeltaNetCache(cfg)
    entry = cache.layers[0]
    entry.recurrent = 0.1 * torch.randn(batch, H, D, D, device=dev)
    entry.conv = tuple(torch.randn(batch, W - 1, c, device=dev, dtype=dt) for c in (H * D, n_h * H * D, n_h * H * D))
    x = torch.randn(batch, 1, cfg.hidden_size, device=dev, dtype=dt)
    out = dict(layer=kind, batch=batch, heads=H, head_dim=D, n_h=n_h)
    with torch.no_grad():
        for route in ("fused", "eager"):
            mixer.decode_kernel = route

            def step():
                return mixer(x, norm=norm, cache=cache)
            out[f"mixer_us_{route}"] = round(_graph_time(step), 2)
            out[f"kernels_{route}"] = _kernels(step)
        q = torch.randn(batch, H * D, device=dev, dtype=dt)
        k, v = (torch.randn(batch, n_h * H * D, device=dev, dtype=dt) for _ in range(2))
        beta = torch.randn(batch, n_h * H, device=dev, dtype=dt)
        decay = (torch.randn(batch, H, device=dev, dtype=dt), mixer.A_log, mixer.dt_bias) if mixer.gated else None
        weights = tuple(m.weight for m in (mixer.q_conv, mixer.k_conv, mixer.v_conv))

        def op():
            return delta_rule_decode_step(q, k, v, entry.recurrent, conv_states=entry.conv, conv_weights=weights,
                                          beta=beta, decay=decay, norm_weight=mixer.o_norm.weight)
        us = _graph_time(op)
        state_bytes = 2 * entry.recurrent.numel() * 4
        out["op_us"] = round(us, 2)
        out["state_GBps"] = round(state_bytes / us / 1e3, 1)
        out["frac_of_copy_bw"] = round(state_bytes / us / 1e3 / (bandwidth / 1e9), 3)
    return out


# The 340M model's decode-step projections: (weight rows per matrix, input width, kind)
GEMV_SHAPES = {
    "delta in-proj (q,k,v,b,g)": ([1024, 1024, 1024, 8, 1024], 1024, "norm"),
    "gated in-proj (q,k,v,b,a,g)": ([1024, 1024, 1024, 8, 8, 1024], 1024, "norm"),
    "o_proj + residual": ([1024], 1024, "residual"),
    "MLP gate/up + SwiGLU": ([2816, 2816], 1024, "swiglu"),
    "MLP down + residual": ([1024], 2816, "residual"),
    "final norm + LM head": ([32000], 1024, "norm"),
}


def gemv_configs():
    from deltanet.ops.decode_linear import GemvConfig

    return [GemvConfig(BN=bn, BK=bk, num_warps=w, num_stages=st)
            for bn in (16, 32) for bk in (128, 256) for w in (4,) for st in (3, 4)]


def gemv_row(shape: str, batch: int, config, bandwidth: float) -> dict:
    """One (shape, batch, config) point of the GEMV sweep; ``config`` None: the default settings."""
    from deltanet.ops.decode_linear import (linear_residual_decode, rms_norm_linear_decode, rms_norm_swiglu_decode,
                                            select_config)

    Ns, C, kind = GEMV_SHAPES[shape]
    dev, dt = torch.device("cuda"), torch.bfloat16
    ws = [0.02 * torch.randn(n, C, device=dev, dtype=dt) for n in Ns]
    x = torch.randn(batch, C, device=dev, dtype=dt)
    nw = torch.ones(C, device=dev, dtype=dt)
    res = torch.randn(batch, Ns[0], device=dev, dtype=dt)
    used = config or select_config(batch, Ns[0] if kind == "swiglu" else sum(Ns), dt)
    if kind == "norm":
        def fn():
            return rms_norm_linear_decode(x, nw, ws, config=config)
    elif kind == "swiglu":
        def fn():
            return rms_norm_swiglu_decode(x, nw, ws[0], ws[1], config=config)
    else:
        def fn():
            return linear_residual_decode(x, ws[0], res, config=config)
    us = _graph_time(fn)
    nbytes = sum(w.numel() for w in ws) * 2
    gbps = nbytes / us / 1e3
    return dict(shape=shape, batch=batch, default=config is None, BN=used.BN, BK=used.BK, warps=used.num_warps,
                stages=used.num_stages, us=round(us, 2), weight_GBps=round(gbps, 1),
                frac_of_copy_bw=round(gbps / (bandwidth / 1e9), 3))


def gemv_markdown(rows, env) -> str:
    best: dict = {}
    for r in rows:
        if "us" in r:
            key = (r["shape"], r["batch"])
            best[key] = min(best.get(key, float("inf")), r["us"])
    cols = ["shape", "batch", "default", "BN", "BK", "warps", "stages", "us", "weight_GBps", "frac_of_copy_bw",
            "best", "error"]
    lines = [f"# Decode-step GEMV kernel, launch settings ({env.get('device')}, bf16)", "", "```", json.dumps(env),
             "```", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        r = dict(r, best="**best**" if "us" in r and r["us"] == best.get((r["shape"], r["batch"])) else "")
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def measure_point(args, start, key: dict, fn) -> dict:
    """``fn()``'s row, or ``key`` with the reason it has none: the budget is spent, or the point
    failed (recorded; the sweep goes on)."""
    if time.perf_counter() - start > args.budget_s:
        return dict(key, error="skipped: budget spent")
    try:
        return fn()
    except Exception as e:
        return dict(key, error=f"{type(e).__name__}: {str(e)[:200]}")


def record(args, stem: str, env, rows: list, r: dict, render) -> None:
    """Append ``r``, print it and rewrite ``OUT/stem.json`` / ``.md`` (a cut run keeps its rows)."""
    print(json.dumps(r), flush=True)
    rows.append(r)
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(render(rows, env))


def gemv_sweep(args, env, bw, start) -> int:
    rows = []
    for shape in GEMV_SHAPES:
        for b in (int(x) for x in args.batch.split(",")):
            for config in [None, *gemv_configs()]:
                key = dict(shape=shape, batch=b, default=config is None)
                if config is not None:
                    key.update(BN=config.BN, BK=config.BK, warps=config.num_warps, stages=config.num_stages)
                r = measure_point(args, start, key, lambda: gemv_row(shape, b, config, bw))
                record(args, "decode_gemv", env, rows, r, gemv_markdown)
    print(gemv_markdown(rows, env))
    return 0


# The attention caches timed by --attention: (name, capacity L, ring, tokens seen before the step)
ATTENTION_CACHES = (("window 2K (ring)", 2048, True, 5000), ("full 8K", 8192, False, 8000))
ATTENTION_SPLITS = (1, 2, 4, 8, 16, 32, 64)


def attention_row(cache_name: str, batch: int, bandwidth: float) -> dict:
    """One (cache, batch) point of the attention sweep (see the module docstring)."""
    from deltanet.layers import RMSNorm
    from deltanet.layers.attention import AttentionMixer, apply_rope
    from deltanet.models import DeltaNetCache, get_config
    from deltanet.models.cache import DecodeCounters, StaticKVCache
    from deltanet.ops.decode_attention import decode_attention_step, decode_attention_step_reference, select_config

    _, L, ring, seen = next(c for c in ATTENTION_CACHES if c[0] == cache_name)
    cfg = get_config("hybrid-swa-340m" if ring else "hybrid-global-340m", num_hidden_layers=1,
                     layer_types=["sliding_attention" if ring else "full_attention"])
    dev, dt = torch.device("cuda"), torch.bfloat16
    mixer = AttentionMixer(cfg, 0, window=cfg.sliding_window if ring else None).to(dev, dt).eval()
    norm = RMSNorm(cfg.hidden_size).to(dev, dt)
    H, Hkv, D = mixer.num_heads, mixer.num_kv_heads, mixer.head_dim
    g = torch.Generator(device=dev).manual_seed(0)
    kc = torch.randn(batch, Hkv, L, D, device=dev, dtype=dt, generator=g)
    vc = torch.randn(batch, Hkv, L, D, device=dev, dtype=dt, generator=g)
    valid = torch.zeros(batch, L, dtype=torch.bool, device=dev)
    valid[:, :min(seen, L)] = True
    nxt = torch.tensor(seen, device=dev)
    pos = torch.full((batch, 1), seen, device=dev)
    q = torch.randn(batch, 1, H, D, device=dev, dtype=dt, generator=g)
    k, v = (torch.randn(batch, 1, Hkv, D, device=dev, dtype=dt, generator=g) for _ in range(2))
    state = StaticKVCache(kc, vc, valid, ring=ring)
    counters = DecodeCounters(real=torch.full((batch,), seen, device=dev), next=nxt)
    auto = select_config(batch, Hkv, L, torch.cuda.get_device_properties(dev).multi_processor_count, D)
    out = dict(cache=cache_name, batch=batch, L=L, heads=H, kv_heads=Hkv, head_dim=D, splits=auto.splits,
               block_l=auto.block_l, warps=auto.num_warps)
    with torch.no_grad():
        def fused(config=None):
            return decode_attention_step(q, k, v, kc, vc, valid, pos, nxt, ring=ring, rope_theta=mixer.rope_theta,
                                         config=config)

        def eager():
            return mixer._static_step(apply_rope(q, pos, mixer.rope_theta), apply_rope(k, pos, mixer.rope_theta), v,
                                      state, counters, None)

        # accuracy first (the timed calls rewrite the same slot with the same values)
        o_f, o_e = fused().double(), eager().double()
        o_64 = decode_attention_step_reference(q.double(), k.double(), v.double(), kc.double(), vc.double(),
                                               valid.clone(), pos, nxt, ring=ring, rope_theta=mixer.rope_theta)
        out["rel_err_vs_eager"] = float((o_f - o_e).norm() / o_e.norm())
        out["rel_err_fused_vs_fp64"] = float((o_f - o_64).norm() / o_64.norm())
        out["rel_err_eager_vs_fp64"] = float((o_e - o_64).norm() / o_64.norm())
        for name, fn in (("fused", fused), ("eager", eager)):
            out[f"{name}_us"] = round(_graph_time(fn), 2)
            out[f"kernels_{name}"] = _kernels(fn)
        nbytes = 2 * batch * Hkv * min(seen + 1, L) * D * 2  # K and V of the attended slots
        out["kv_GBps"] = round(nbytes / out["fused_us"] / 1e3, 1)
        out["frac_of_copy_bw"] = round(nbytes / out["fused_us"] / 1e3 / (bandwidth / 1e9), 3)
        out["speedup"] = round(out["eager_us"] / out["fused_us"], 2)
        cache = DeltaNetCache(cfg)
        cache.layers[0], cache.counters = state, counters
        x = torch.randn(batch, 1, cfg.hidden_size, device=dev, dtype=dt, generator=g)
        for route in ("fused", "eager"):
            mixer.decode_kernel = route

            def step():
                return mixer(x, position_ids=pos, mask=None, cache=cache, norm=norm, residual=x)
            out[f"mixer_us_{route}"] = round(_graph_time(step), 2)
            out[f"mixer_kernels_{route}"] = _kernels(step)
        splits = {}
        for n in ATTENTION_SPLITS:
            if n <= triton_cdiv(L, auto.block_l):
                splits[n] = round(_graph_time(lambda: fused(dataclasses.replace(auto, splits=n))), 2)
        out["splits_us"] = splits
        out["best_splits"] = min(splits, key=splits.get)
        settings = {}  # block_l / warps at the default splits
        for bl, w in ((32, 4), (32, 8), (64, 4), (64, 8), (128, 8)):
            settings[f"{bl}/{w}"] = round(_graph_time(lambda: fused(dataclasses.replace(auto, block_l=bl, num_warps=w))),
                                          2)
        out["block_l/warps_us"] = settings
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def attention_markdown(rows, env) -> str:
    cols = ["cache", "batch", "splits", "fused_us", "eager_us", "speedup", "kernels_fused", "kernels_eager", "kv_GBps",
            "frac_of_copy_bw", "mixer_us_fused", "mixer_us_eager", "mixer_kernels_fused", "mixer_kernels_eager",
            "rel_err_vs_eager", "rel_err_fused_vs_fp64", "rel_err_eager_vs_fp64", "best_splits", "splits_us",
            "block_l", "warps", "block_l/warps_us", "error"]
    lines = [f"# An attention layer's decode step against its static K/V cache, fused vs eager core "
             f"({env.get('device')}, bf16)", "", "```", json.dumps(env), "```", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def attention_sweep(args, env, bw, start) -> int:
    rows = []
    for cache_name, *_ in ATTENTION_CACHES:
        for b in (int(x) for x in args.batch.split(",")):
            r = measure_point(args, start, dict(cache=cache_name, batch=b), lambda: attention_row(cache_name, b, bw))
            record(args, "decode_attention", env, rows, r, attention_markdown)
    print(attention_markdown(rows, env))
    return 0


def markdown(rows, env) -> str:
    cols = ["layer", "batch", "n_h", "mixer_us_fused", "mixer_us_eager", "kernels_fused", "kernels_eager", "op_us",
            "state_GBps", "frac_of_copy_bw", "error"]
    lines = [f"# One delta-rule layer's decode step, fused vs eager ({env.get('device')}, bf16)", "",
             "```", json.dumps(env), "```", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--budget-s", type=float, default=120)
    p.add_argument("--batch", default="1,8,32,128")
    p.add_argument("--layers", default="delta_net,gated_delta_net,gated_delta_product")
    p.add_argument("--gemv-sweep", action="store_true", help="time the decode-step GEMV kernel's launch settings")
    p.add_argument("--attention", action="store_true",
                   help="time an attention layer's decode step against its static cache: fused vs eager core")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from deltanet.bench.decode import copy_bandwidth

    start = time.perf_counter()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    import triton

    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               copy_GBps=round(bw / 1e9, 1), date=time.strftime("%Y-%m-%d"))
    if args.gemv_sweep:
        return gemv_sweep(args, env, bw, start)
    if args.attention:
        return attention_sweep(args, env, bw, start)
    rows = []
    for kind in args.layers.split(","):
        for b in (int(x) for x in args.batch.split(",")):
            r = measure_point(args, start, dict(layer=kind, batch=b), lambda: row(kind, b, bw))
            record(args, "decode_step", env, rows, r, markdown)
    print(markdown(rows, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
