"""Short-convolution benchmark: the Triton ``short_conv`` against the compiled PyTorch code.

    python benchmarks/bench_conv.py                 # the two default shapes, bf16 x, fp32 weight
    python benchmarks/bench_conv.py --docs          # also with packed-document positions
    python benchmarks/bench_conv.py --sweep         # also launch settings of the Triton kernels

Times (medians: the forward replayed from a CUDA graph, the forward + backward replayed from
the graphs of ``torch.cuda.make_graphed_callables`` -- GPU time -- and also launched call by call)
the forward and forward + backward of
``deltanet.ops.short_conv.short_conv`` and of ``torch.compile`` of
``deltanet.layers.conv._padded_conv`` (the path before; ``DELTANET_CONV=torch`` in training),
``W = 4`` with SiLU, and prints the bandwidth each achieves on the ideal traffic: forward reads
``x`` and writes ``y``; forward + backward also reads ``x`` and ``dy`` and writes ``dx`` (5 passes
over a ``[B, T, C]`` tensor). The ceiling printed first is a device-to-device copy (read + write).
Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = ((16, 2048, 1024), (4, 8192, 1024))
# (BT, BC, num_warps) and (BT, BC, R, num_warps)
FWD_SWEEP = ((16, 128, 2), (8, 256, 2), (16, 256, 4), (8, 512, 4), (32, 256, 4), (32, 128, 2))
BWD_SWEEP = ((128, 256, 4, 2), (256, 128, 8, 2), (256, 128, 4, 2), (128, 128, 8, 2), (128, 256, 2, 2),
             (128, 128, 4, 1), (256, 256, 4, 2), (256, 64, 8, 1), (64, 128, 4, 2))


def _bench(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def _bench_graph(fn) -> float:
    """GPU time of ``fn`` (no autograd) replayed from a CUDA graph."""
    import triton.testing
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")


def _graphed(fn, xr, wr, doc_pos):
    """``fn(x, w)`` with its forward and backward replayed from CUDA graphs
    (``torch.cuda.make_graphed_callables``): called one at a time, a forward + backward of
    ~0.2 ms is bound by Python and launch overhead on some hosts. Plain ``fn`` if capture fails.

    On an H200 (2026-11-30, torch 2.11) captures failed ("operation failed due to a previous error
    during capture") after a warning that the inputs' AccumulateGrad nodes, created by earlier
    backward passes on the default stream, did not match the capture's stream. Hence fresh leaf
    tensors for the capture (no autograd history) and one retry."""
    for attempt in (1, 2):
        try:
            torch.cuda.synchronize()
            xg, wg = xr.detach().requires_grad_(), wr.detach().requires_grad_()
            return torch.cuda.make_graphed_callables(lambda a, b: fn(a, b, doc_pos, True), (xg, wg))
        except Exception as e:  # report, don't stop: the launched time is still printed
            print(f"  (CUDA graph capture {attempt} failed: {type(e).__name__}: {str(e).splitlines()[0]})")
            torch.cuda.synchronize()
    print("  (fwd+bwd launched instead of replayed)")
    return lambda a, b: fn(a, b, doc_pos, True)


def _doc_pos(T: int, device, mean_len: int = 600) -> torch.Tensor:
    from deltanet.layers.conv import positions_in_documents
    g = torch.Generator().manual_seed(0)
    cuts = torch.randperm(T - 1, generator=g)[: max(T // mean_len, 1)] + 1
    cu = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([T])])
    return positions_in_documents(cu, T).to(device)


def run(shapes, dtype: torch.dtype, W: int, docs: bool, sweep: bool) -> None:
    import triton

    import deltanet.ops.short_conv as sc
    from deltanet.layers.conv import _padded_conv

    dev = torch.device("cuda")
    # one static-shape compilation per shape, as in training (one shape per run); 2 shapes x
    # with/without documents x grad/no-grad stay under the recompile limit
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    compiled = torch.compile(_padded_conv.eager, dynamic=False)
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {triton.__version__}, "
          f"x {dtype}, weight float32, W = {W}, SiLU")
    big = torch.empty(2 ** 30, dtype=torch.uint8, device=dev)
    ms = _bench(lambda: big.clone())
    print(f"copy ceiling: {2 * big.numel() / ms / 1e6:.0f} GB/s (1 GiB read + write, {ms:.3f} ms)")
    big = None  # free it
    rows = []
    # every input drawn before any graph capture (a failed capture leaves the CUDA RNG unusable)
    torch.manual_seed(0)
    inputs = [(torch.randn(B, T, C, device=dev, dtype=dtype), torch.randn(C, W, device=dev) * W ** -0.5,
               torch.randn(B, T, C, device=dev, dtype=dtype), _doc_pos(T, dev)) for B, T, C in shapes]
    for (B, T, C), (x, w, dy, docs_pos) in zip(shapes, inputs):
        pass_bytes = x.numel() * x.element_size()
        for doc_pos in ([None, docs_pos] if docs else [None]):
            tag = f"[{B}, {T}, {C}]" + (" docs" if doc_pos is not None else "")
            if doc_pos is None:
                ms = _bench(lambda: x.clone())
                print(f"[{B}, {T}, {C}]: copy of x {ms:.3f} ms, {2 * pass_bytes / ms / 1e6:.0f} GB/s")
            # the two must agree before their times mean anything
            xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
            y_ref = compiled(xr, wr, doc_pos, True)
            dx_ref, dw_ref = torch.autograd.grad(y_ref, (xr, wr), dy)
            y = sc.short_conv(xr, wr, doc_pos, True)
            dx, dw = torch.autograd.grad(y, (xr, wr), dy)
            err = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                      for a, b in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)))
            print(f"{tag}: max relative difference Triton vs compiled {err:.1e} (y, dx, dw)")
            for name, fn in (("triton", sc.short_conv), ("compiled", compiled)):
                def fwd():
                    with torch.no_grad():
                        return fn(x, w, doc_pos, True)

                def fwd_bwd(f=lambda a, b: fn(a, b, doc_pos, True)):
                    return torch.autograd.grad(f(xr, wr), (xr, wr), dy)

                t_l = _bench(fwd_bwd)
                t_f, t_fb = _bench_graph(fwd), _bench(functools.partial(fwd_bwd, _graphed(fn, xr, wr, doc_pos)))
                rows.append((tag, name, t_f, 2 * pass_bytes / t_f / 1e6, t_fb, 5 * pass_bytes / t_fb / 1e6, t_l))
            if sweep:
                _sweep(sc, x, w, doc_pos, dy, pass_bytes, tag)
    print("\nGPU time from CUDA-graph replays; 'launched': fwd+bwd called one at a time (host overhead included)")
    print(f"{'shape':<24}{'impl':<10}{'fwd ms':>9}{'GB/s':>7}{'fwd+bwd ms':>12}{'GB/s':>7}{'launched ms':>13}")
    for tag, name, t_f, bw_f, t_fb, bw_fb, t_l in rows:
        print(f"{tag:<24}{name:<10}{t_f:>9.3f}{bw_f:>7.0f}{t_fb:>12.3f}{bw_fb:>7.0f}{t_l:>13.3f}")


def _differs(got, ref) -> float:
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(got, ref))


def _sweep(sc, x, w, doc_pos, dy, pass_bytes, tag) -> None:
    """Launch settings of the two kernels (``sc.FWD``; ``sc.BWD`` or ``sc.BWD_DOCS``), each
    timed alone and compared with the default settings' results."""
    bwd_cfg = sc.BWD_DOCS if doc_pos is not None else sc.BWD
    fwd0, bwd0 = dict(sc.FWD), dict(bwd_cfg)
    y0 = sc.short_conv_fwd(x, w, doc_pos, True)
    g0 = sc.short_conv_bwd(x, w, doc_pos, dy, True)
    try:
        for BT, BC, warps in FWD_SWEEP:
            sc.FWD.update(BT=BT, BC=BC, num_warps=warps)
            d = _differs([sc.short_conv_fwd(x, w, doc_pos, True)], [y0])
            ms = _bench(lambda: sc.short_conv_fwd(x, w, doc_pos, True))
            print(f"{tag} fwd BT={BT} BC={BC} warps={warps}: {ms:.3f} ms, {2 * pass_bytes / ms / 1e6:.0f} GB/s"
                  f" (differs from default by {d:.1e})")
        sc.FWD.update(fwd0)
        for BT, BC, R, warps in BWD_SWEEP:
            bwd_cfg.update(BT=BT, BC=BC, R=R, num_warps=warps)
            d = _differs(sc.short_conv_bwd(x, w, doc_pos, dy, True), g0)
            ms = _bench(lambda: sc.short_conv_bwd(x, w, doc_pos, dy, True))
            print(f"{tag} bwd BT={BT} BC={BC} R={R} warps={warps}: {ms:.3f} ms, {3 * pass_bytes / ms / 1e6:.0f} GB/s"
                  f" (differs from default by {d:.1e})")
    finally:
        sc.FWD.update(fwd0)
        bwd_cfg.update(bwd0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES),
                   help="comma-separated BxTxC (default: %(default)s)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--width", type=int, default=4, help="kernel size W")
    p.add_argument("--docs", action="store_true", help="also with packed-document positions")
    p.add_argument("--sweep", action="store_true", help="also time launch settings of the Triton kernels")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_conv.py needs a CUDA GPU: torch.cuda.is_available() is False", file=sys.stderr)
        return 1
    try:
        import triton  # noqa: F401
    except ModuleNotFoundError:
        print("bench_conv.py needs Triton (pip install triton)", file=sys.stderr)
        return 1
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    run(shapes, getattr(torch, args.dtype), args.width, args.docs, args.sweep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
