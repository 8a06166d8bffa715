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
SwiGLU, down + residual, final norm + LM head) at each ``--batch``: microseconds per call (CUDA
graph of 50+ calls, each on its own copy of the weights so that they stream from HBM, not L2) and
the weight bytes streamed as GB/s and as a fraction of the device copy bandwidth (the floor the
kernel is built for); each point's output is checked against the eager composition and for
run-to-run equality. Stage 1 times the default (``select_config``) and ``SPLIT_K`` = 1, 2, 4, 8 for
every shape; stage 2 then tunes ``BN``, ``SPLIT_K`` again, ``BK``, ``num_warps``, ``num_stages`` and
(batch <= 4) ``dot=False`` one knob at a time around the best so far (~60 points a shape and batch). Writes ``decode_gemv.md`` / ``.json`` after every point
(the best ``GemvConfig`` per shape and batch on top); ``--gemv-shapes`` picks shapes by substring.

    python benchmarks/bench_decode_step.py --gemv-sweep --out OUT_DIR --batch 1,32 --budget-s 900

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
import triton


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
# Weight bytes a timed call cycles through (each call reads its own copy of the weights): more than
# an H100's / H200's 50 / 60 MB L2, so that the weights stream from HBM as in a whole decode step
# (the 340M model's 680 MB of bf16 weights never fit L2) instead of being L2 hits after the first call.
GEMV_ROTATE_BYTES = 256 * 2 ** 20
GEMV_SPLITS = (1, 2, 4, 8)


def gemv_stage1(base) -> list:
    """The first pass for every shape: ``SPLIT_K`` around the default (``base``)."""
    return [dataclasses.replace(base, SPLIT_K=s) for s in GEMV_SPLITS]


def gemv_stage2(best, batch: int) -> list:
    """The second pass, one knob at a time around the best so far (coordinate descent: the caller
    moves ``best`` after each knob): a list of candidates per knob."""
    R = dataclasses.replace
    knobs = [[R(best, BN=bn) for bn in (16, 32, 64)],
             [R(best, SPLIT_K=s) for s in GEMV_SPLITS],  # again, at the new BN
             [R(best, BK=bk) for bk in (64, 128, 256, 512)],
             [R(best, num_warps=w) for w in (1, 2, 4, 8)],
             [R(best, num_stages=s) for s in (1, 2, 3, 4, 5)]]
    if batch <= 4:  # no tl.dot (no padding of the rows to 16): narrower column blocks, more programs
        knobs.append([R(best, dot=False, BN=bn, BK=bk, SPLIT_K=s) for bn in (4, 8, 16) for bk in (128, 256)
                      for s in (1, 2, 4)])
    return knobs


class GemvCase:
    """The inputs of one (shape, batch) point: ``copies`` sets of weights (``GEMV_ROTATE_BYTES``)
    that successive calls cycle through, the activations, the default config."""

    def __init__(self, shape: str, batch: int, device: str = "cuda"):
        from deltanet.ops.decode_linear import select_config
        from deltanet.ops.delta_rule.config import device_sms

        self.shape, self.batch = shape, batch
        Ns, C, self.kind = GEMV_SHAPES[shape]
        dev, dt = torch.device(device), torch.bfloat16
        self.nbytes = sum(Ns) * C * 2
        self.copies = max(1, min(64, GEMV_ROTATE_BYTES // self.nbytes))
        g = torch.Generator(device=dev).manual_seed(0)
        self.ws = [[0.03 * torch.randn(n, C, device=dev, dtype=dt, generator=g) for n in Ns]
                   for _ in range(self.copies)]
        self.x = torch.randn(batch, C, device=dev, dtype=dt, generator=g)
        self.nw = 1 + 0.1 * torch.randn(C, device=dev, dtype=dt, generator=g)
        self.res = torch.randn(batch, Ns[0], device=dev, dtype=dt, generator=g)
        self.N_total = Ns[0] if self.kind == "swiglu" else sum(Ns)
        self.default = select_config(batch, self.N_total, dt, K=C, num_sms=device_sms(dev))

    def call(self, ws, config):
        from deltanet.ops.decode_linear import linear_residual_decode, rms_norm_linear_decode, rms_norm_swiglu_decode

        if self.kind == "norm":
            return torch.cat(rms_norm_linear_decode(self.x, self.nw, ws, config=config), -1)
        if self.kind == "swiglu":
            return rms_norm_swiglu_decode(self.x, self.nw, ws[0], ws[1], config=config)
        return linear_residual_decode(self.x, ws[0], self.res, config=config)

    def reference(self):
        from deltanet.ops.decode_linear import decode_linear_reference

        ws = self.ws[0]
        if self.kind == "norm":
            return decode_linear_reference(self.x, ws, self.nw)
        if self.kind == "swiglu":
            return decode_linear_reference(self.x, ws, self.nw, swiglu=True)
        return decode_linear_reference(self.x, ws, residual=self.res)


def gemv_row(case: GemvCase, config, bandwidth: float) -> dict:
    """One (shape, batch, config) point of the GEMV sweep; ``config`` None: the default settings.
    Checks the output against the eager composition (``rel_err``) and that two calls agree bit for
    bit (``deterministic``) before timing."""
    from deltanet.ops.decode_linear import _rows_per_program

    used = config or case.default
    with torch.no_grad():
        out = case.call(case.ws[0], config)
        again = case.call(case.ws[0], config)
        ref = case.reference()
        err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        state = dict(i=0)

        def fn():
            state["i"] = (state["i"] + 1) % case.copies
            return case.call(case.ws[state["i"]], config)
        us = _graph_time(fn, calls=max(50, case.copies))
    gbps = case.nbytes / us / 1e3
    n_blocks = triton.cdiv(case.N_total, used.BN) if case.kind == "swiglu" else sum(
        triton.cdiv(n, used.BN) for n in GEMV_SHAPES[case.shape][0])
    programs = n_blocks * triton.cdiv(case.batch, _rows_per_program(case.batch, used.dot)) * used.SPLIT_K
    return dict(shape=case.shape, batch=case.batch, default=config is None, BN=used.BN, BK=used.BK,
                warps=used.num_warps, stages=used.num_stages, split_k=used.SPLIT_K, dot=used.dot, programs=programs,
                us=round(us, 2), weight_GBps=round(gbps, 1), frac_of_copy_bw=round(gbps / (bandwidth / 1e9), 3),
                rel_err=float(f"{err:.2e}"), deterministic=bool(torch.equal(out, again)))


GEMV_COLS = ["shape", "batch", "default", "BN", "BK", "warps", "stages", "split_k", "dot", "programs", "us",
             "weight_GBps", "frac_of_copy_bw", "rel_err", "deterministic", "error"]


def gemv_sound(r: dict) -> bool:
    """A timed point whose output is sound: within 2e-2 relative error of the eager composition
    and deterministic (only those can be the best setting)."""
    return "us" in r and bool(r.get("deterministic")) and r.get("rel_err", 1.0) <= 2e-2


def gemv_best(rows) -> dict:
    """``{(shape, batch): (default row, fastest row)}`` over the sound rows (:func:`gemv_sound`)."""
    out: dict = {}
    for r in rows:
        if not gemv_sound(r):
            continue
        d, b = out.get((r["shape"], r["batch"]), (None, None))
        d = r if r["default"] and d is None else d
        b = r if b is None or r["us"] < b["us"] else b
        out[(r["shape"], r["batch"])] = (d, b)
    return out


def gemv_markdown(rows, env) -> str:
    best = gemv_best(rows)
    lines = [f"# Decode-step GEMV kernel, launch settings ({env.get('device')}, bf16)", "", "```", json.dumps(env),
             "```", "", "## Best setting per shape", "",
             "| shape | batch | default us | best us | speedup | best GemvConfig | best GB/s | of copy bw |",
             "|---|---|---|---|---|---|---|---|"]
    for (shape, batch), (d, b) in best.items():
        cfg = (f"BN={b['BN']}, BK={b['BK']}, num_warps={b['warps']}, num_stages={b['stages']}, "
               f"SPLIT_K={b['split_k']}, dot={b['dot']}")
        speed = f"{d['us'] / b['us']:.2f}x" if d else ""
        lines.append(f"| {shape} | {batch} | {d['us'] if d else ''} | {b['us']} | {speed} | {cfg} | "
                     f"{b['weight_GBps']} | {b['frac_of_copy_bw']} |")
    lines += ["", "## Every point", "", "| " + " | ".join(GEMV_COLS) + " |", "|" + "---|" * len(GEMV_COLS)]
    for r in rows:
        mark = any(r is b for _, b in best.values())
        lines.append("| " + " | ".join(("**" + str(r.get(c, "")) + "**") if mark and c == "us" else str(r.get(c, ""))
                                       for c in GEMV_COLS) + " |")
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
    """Stage 1 for every (shape, batch) first (the default, then ``SPLIT_K``), so that a short
    budget still covers every shape; then stage 2 (:func:`gemv_stage2`) per shape. Points past the
    budget are not started (counted at the end); no setting is timed twice."""
    rows: list = []
    measured: dict = {}
    skipped = [0]
    batches = [int(x) for x in args.batch.split(",")]
    shapes = [s for s in GEMV_SHAPES if not args.gemv_shapes or any(p in s for p in args.gemv_shapes.split(","))]
    cases: dict = {}
    best: dict = {}

    def point(shape, b, config):
        done = measured.setdefault((shape, b), set())
        if config is not None and config in done:
            return
        if time.perf_counter() - start > args.budget_s:
            skipped[0] += 1
            return
        if config is not None:
            done.add(config)
        key = dict(shape=shape, batch=b, default=config is None)
        if config is not None:
            key.update(BN=config.BN, BK=config.BK, warps=config.num_warps, stages=config.num_stages,
                       split_k=config.SPLIT_K, dot=config.dot)

        def measure():
            if (shape, b) not in cases:
                cases[(shape, b)] = GemvCase(shape, b)
            return gemv_row(cases[(shape, b)], config, bw)
        r = measure_point(args, start, key, measure)
        record(args, "decode_gemv", env, rows, r, gemv_markdown)
        if gemv_sound(r):
            used = config or cases[(shape, b)].default
            done.add(used)
            if (shape, b) not in best or r["us"] < best[(shape, b)][1]:
                best[(shape, b)] = (used, r["us"])

    for shape in shapes:
        for b in batches:
            point(shape, b, None)
            if (shape, b) not in cases:
                continue
            default = cases[(shape, b)].default
            for c in gemv_stage1(default):
                point(shape, b, c)
        cases = {k: v for k, v in cases.items() if k[0] != shape}  # free the weight copies
    for shape in shapes:
        for b in batches:
            if (shape, b) not in best:
                continue
            for knob in range(len(gemv_stage2(best[(shape, b)][0], b))):
                for c in gemv_stage2(best[(shape, b)][0], b)[knob]:  # around the best after the previous knobs
                    point(shape, b, c)
        cases = {}
    print(gemv_markdown(rows, env))
    if skipped[0]:
        print(f"{skipped[0]} points not started: --budget-s {args.budget_s} spent")
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
            if n <= triton.cdiv(L, auto.block_l):
                splits[n] = round(_graph_time(lambda: fused(dataclasses.replace(auto, splits=n))), 2)
        out["splits_us"] = splits
        out["best_splits"] = min(splits, key=splits.get)
        settings = {}  # block_l / warps at the default splits
        for bl, w in ((32, 4), (32, 8), (64, 4), (64, 8), (128, 8)):
            settings[f"{bl}/{w}"] = round(_graph_time(lambda: fused(dataclasses.replace(auto, block_l=bl, num_warps=w))),
                                          2)
        out["block_l/warps_us"] = settings
    return out


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
    p.add_argument("--gemv-shapes", default="", help="--gemv-sweep: comma-separated substrings of the shapes to "
                   "time (default: all)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from deltanet.bench.decode import copy_bandwidth

    start = time.perf_counter()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
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
