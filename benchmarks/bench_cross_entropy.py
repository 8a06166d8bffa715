"""The fused linear cross-entropy's chunk step on one GPU: the Triton row kernel against the PyTorch
elementwise passes it replaced, and the plain loss (materialised logits, float32 ``F.cross_entropy``).

Forward + backward of the loss over ``N`` tokens of hidden size ``D`` against a ``V``-word output
matrix, bf16 parameters (or fp32 parameters under bf16 autocast): ``triton.testing.do_bench``
median milliseconds, peak memory above the inputs, and the kernel path's relative error against
the PyTorch path (loss and both gradients).

    python benchmarks/bench_cross_entropy.py --out results/ce.md [--tokens 8192,32768] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deltanet.models import loss as loss_module  # noqa: E402


def _plain(h, w, y):
    return F.cross_entropy((h @ w.t()).float(), y, ignore_index=-100)


def _run(fn, h, w, y):
    h.grad = w.grad = None
    loss = fn(h, w, y)
    loss.backward()
    return loss


def _fused(kernel):
    def fn(h, w, y):
        loss_module.KERNEL = kernel
        return loss_module.fused_linear_cross_entropy(h, w, y, chunk_size=2048)
    return fn


def _measure(name, fn, h, w, y, autocast):
    from triton.testing import do_bench
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else torch.autocast("cuda", enabled=False)
    with ctx:
        _run(fn, h, w, y)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _run(fn, h, w, y)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = do_bench(lambda: _run(fn, h, w, y), warmup=5, rep=50)
        loss = _run(fn, h, w, y)
    return {"path": name, "ms": ms, "peak_mib": peak, "loss": loss.item(), "dh": h.grad.clone(), "dw": w.grad.clone()}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", default="8192,32768")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--regimes", default="bf16,autocast")
    ap.add_argument("--budget-s", type=float, default=120)
    a = ap.parse_args(argv)
    t0 = time.time()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# Fused linear cross-entropy, {torch.cuda.get_device_name()} ({time.strftime('%Y-%m-%d', time.gmtime())})",
             "", f"torch {torch.__version__}; D = {a.hidden}, V = {a.vocab}, chunk 2048; fwd+bwd, do_bench median", "",
             "| regime | tokens | path | ms | peak MiB over inputs | rel err loss / dh / dw vs PyTorch chunk |",
             "| --- | --- | --- | --- | --- | --- |"]
    rows = []
    for regime in a.regimes.split(","):
        for n in (int(t) for t in a.tokens.split(",")):
            if time.time() - t0 > a.budget_s:
                lines.append(f"| {regime} | {n} | (budget spent) | | | |")
                continue
            g = torch.Generator(device="cuda").manual_seed(0)
            pdt = torch.bfloat16 if regime == "bf16" else torch.float32
            h = torch.randn(n, a.hidden, device="cuda", generator=g).to(pdt).requires_grad_()
            w = (0.02 * torch.randn(a.vocab, a.hidden, device="cuda", generator=g)).to(pdt).requires_grad_()
            y = torch.randint(0, a.vocab, (n,), device="cuda", generator=g)
            res = [_measure(name, fn, h, w, y, regime == "autocast")
                   for name, fn in (("plain logits", _plain), ("fused, PyTorch chunk", _fused("torch")),
                                    ("fused, Triton chunk", _fused("triton")))]
            ref = res[1]
            for r in res:
                err = "" if r is ref else f"{abs(r['loss'] - ref['loss']) / abs(ref['loss']):.1e} / {_rel(r['dh'], ref['dh']):.1e} / {_rel(r['dw'], ref['dw']):.1e}"
                lines.append(f"| {regime} | {n} | {r['path']} | {r['ms']:.2f} | {r['peak_mib']:.0f} | {err} |")
                rows.append({k: v for k, v in r.items() if k not in ("dh", "dw")} | {"regime": regime, "tokens": n})
            out.write_text("\n".join(lines) + "\n")
            del h, w, y, res
            torch.cuda.empty_cache()
    loss_module.KERNEL = "auto"
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
