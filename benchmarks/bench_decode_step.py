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
"""

from __future__ import annotations

import argparse
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
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from deltanet.bench.decode import copy_bandwidth

    start = time.perf_counter()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    import triton

    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               copy_GBps=round(bw / 1e9, 1), date=time.strftime("%Y-%m-%d"))
    rows = []
    for kind in args.layers.split(","):
        for b in (int(x) for x in args.batch.split(",")):
            if time.perf_counter() - start > args.budget_s:
                r = dict(layer=kind, batch=b, error="skipped: budget spent")
            else:
                try:
                    r = row(kind, b, bw)
                except Exception as e:  # a failing point is recorded; the sweep goes on
                    r = dict(layer=kind, batch=b, error=f"{type(e).__name__}: {str(e)[:200]}")
            print(json.dumps(r), flush=True)
            rows.append(r)
            with open(os.path.join(args.out, "decode_step.json"), "w") as f:
                json.dump(dict(env=env, rows=rows), f, indent=1)
            with open(os.path.join(args.out, "decode_step.md"), "w") as f:
                f.write(markdown(rows, env))
    print(markdown(rows, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
