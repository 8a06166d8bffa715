"""GPU check: additive linear attention's two routes, the Triton chunk kernels
(``deltanet.ops.delta_rule.linear``) and the PyTorch chunkwise form, at full size.

1. The op: ``[B, T, H, K] = [4, 2048, 8, 128]`` (and a packed batch), bf16 and fp32 inputs with
   L2-normalised q / k as the layers feed it; output, final state and the gradients of q, k, v
   and the initial state against the PyTorch form run in float64 on the same inputs (relative
   max errors, with the PyTorch form's own fp32 error beside them as the yardstick).
2. Head dims: bf16 inputs, packed documents of 1-640 tokens and a fixed-length batch, ``(K, V)``
   from 16 to 128, both
   additive linear attention and the delta rule's chunk op (``delta_rule(backend="triton")``)
   against their PyTorch forms in float64, the PyTorch forms' bf16 errors beside them (H100,
   2026-12-07: the linear op's bf16 output was 0.33 off at K = 32, V = 16 on the GPU, 3.7e-3 under
   the CPU interpreter; the next sweep, at commit 8b8d0e8, faulted with an illegal memory access
   at the first small case, which poisoned the process's CUDA context for every later one).
   Then the small cases again under
   other launch settings of the state and output kernels (``ChunkKernelConfig`` fields: pipeline
   stages, addressing, warps), and on head dims zero-padded to 64 (same values; whether padding is
   a workaround): a setting that clears the error names the kernel and the cause.
   Every case runs in a worker process; a fault replaces the worker and runs the faulting case
   again alone with ``CUDA_LAUNCH_BLOCKING=1``, whose frames name the launch that faulted.
3. The model: ``linear-attn-340m`` cut to ``--layers`` layers (and ``deltanet-340m`` the same)
   trained ``--steps`` steps on one fixed random batch as ``deltanet bench model`` does (AdamW
   lr 1e-4, bf16 autocast), once per route from the same initial weights: the loss curves.

    python benchmarks/check_linear_backends.py --out runs/linear_check.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import time

import torch
import torch.nn.functional as F


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def op_case(rule: str, dtype: torch.dtype, base: torch.dtype, K: int, V: int, device: torch.device, *,
            B: int = 1, T: int = 0, H: int = 2, lengths: list[int] | None = None, seed: int = 0,
            pad_to: int | None = None) -> dict:
    """Relative max errors of the Triton route (``rule``: ``"linear"``, additive linear attention,
    or ``"delta"``, the delta rule's chunk op) on ``dtype`` inputs, and of the PyTorch form in
    ``base`` beside them, against the PyTorch form in float64 on the same rounded inputs: output,
    final state, the gradients of every input and of the initial state. ``lengths``: documents
    packed in one row (``B = 1``, ``T = sum``); else ``B`` rows of ``T`` tokens. ``pad_to``: the
    Triton route runs on head dims zero-padded to at least this (the padded rows and columns of
    the state stay zero: the same values), its outputs cut back: whether wider tiles avoid a fault."""
    from deltanet.layers.linear_attention import linear_attention
    from deltanet.ops import delta_rule

    cu = None
    if lengths is not None:
        B, T = 1, sum(lengths)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device, dtype=torch.int32)
    N = B if cu is None else len(lengths)
    g = torch.Generator(device=device).manual_seed(seed)
    d = dict(device=device, generator=g, dtype=torch.float64)
    q = F.normalize(torch.randn(B, T, H, K, **d), dim=-1)  # L2-normalised, as the layers feed them
    k = F.normalize(torch.randn(B, T, H, K, **d), dim=-1)
    v = torch.randn(B, T, H, V, **d)
    beta = torch.rand(B, T, H, **d)
    h0, do, dht = torch.randn(N, H, K, V, **d), torch.randn(B, T, H, V, **d), torch.randn(N, H, K, V, **d)
    ins = [x.to(dtype) for x in (q, k, v)] + ([beta.to(dtype)] if rule == "delta" else [])

    def run(backend, cast):
        # fresh leaves every run (``.to`` of the same dtype would hand back the shared tensor itself)
        xs = [x.to(cast).clone().requires_grad_() for x in ins]
        s0 = h0.to(torch.float64 if cast == torch.float64 else torch.float32).clone().requires_grad_()
        args, state = list(xs), s0
        pk = pv = 0
        if pad_to and backend == "triton":
            pk, pv = max(0, pad_to - K), max(0, pad_to - V)
            args[0], args[1], args[2] = F.pad(xs[0], (0, pk)), F.pad(xs[1], (0, pk)), F.pad(xs[2], (0, pv))
            state = F.pad(s0, (0, pv, 0, pk))
        scale = K ** -0.5  # the unpadded head dim's (the default would take the padded one)
        if rule == "delta":
            o, S = delta_rule(*args, scale=scale, initial_state=state, output_final_state=True, cu_seqlens=cu,
                              backend=backend)
        else:
            o, S = linear_attention(*args, scale=scale, initial_state=state, cu_seqlens=cu, backend=backend)
        o, S = o[..., :V], S[..., :K, :V]
        ((o.double() * do).sum() + (S.double() * dht).sum()).backward()
        return [o.detach(), S.detach()] + [x.grad for x in xs] + [s0.grad]

    names = ["o", "final_state", "dq", "dk", "dv"] + (["dbeta"] if rule == "delta" else []) + ["dh0"]
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    got = run("triton", dtype)
    ref = run("torch", torch.float64)
    baseline = run("torch", base)
    layout = f"packed {len(lengths)} documents" if lengths is not None else f"B{B} T{T}"
    tag = lambda t: str(t).replace("torch.", "")  # noqa: E731
    return {"case": f"{rule} K{K} V{V} H{H} {layout} {tag(dtype)}",
            "triton_rel_err": {n: _rel(a, r) for n, a, r in zip(names, got, ref)},
            f"torch_{tag(base)}_rel_err": {n: _rel(a, r) for n, a, r in zip(names, baseline, ref)},
            "finite": all(bool(torch.isfinite(a).all()) for a in got),
            "seconds": round(time.perf_counter() - t0, 2)}


def model_case(name: str, backend: str, layers: int, steps: int, batch: int, T: int, device: torch.device) -> dict:
    from deltanet.bench.model import build_model

    torch.manual_seed(0)
    model = build_model(name, num_hidden_layers=layers).to(device).train()
    for m in model.modules():
        if hasattr(m, "backend") and type(m).__name__ == "LinearAttentionMixer":
            m.backend = backend
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, T), device=device, generator=g)
    losses, norms = [], []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        norms.append(round(float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))), 4))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(float(loss), 4))
    return {"case": f"model {name} x{layers} {backend}", "losses": losses, "grad_norms": norms}


_FAULTS = ("illegal memory access", "CUDA error", "Triton Error [CUDA]", "unspecified launch failure")


def run_case(spec: dict) -> dict:
    """One case in this (worker) process: ``spec`` = ``{"fn", "args", "kwargs", "label", "fields"}``;
    ``fields``: launch settings (``ChunkKernelConfig`` fields) replaced in linear attention's
    config. An exception becomes the row's ``error``, with the library frames it came through."""
    import importlib
    import traceback

    fn = {"op_case": op_case, "model_case": model_case}[spec["fn"]]
    linear_mod = importlib.import_module("deltanet.ops.delta_rule.linear")
    select = linear_mod.launch_config
    if spec.get("fields"):
        linear_mod.launch_config = lambda *a, **kw: dataclasses.replace(select(*a, **kw), **spec["fields"])
    args = [getattr(torch, a[len("torch."):]) if isinstance(a, str) and a.startswith("torch.") else a
            for a in spec["args"]]
    try:
        row = fn(*args, torch.device(spec.get("device", "cuda")), **spec.get("kwargs", {}))
    except Exception as e:  # record and go on: every case is informative on its own
        frames = [f"{f.filename.rsplit('/deltanet/', 1)[-1]}:{f.lineno} {f.name}"
                  for f in traceback.extract_tb(e.__traceback__) if "/deltanet/" in f.filename]
        row = {"case": f"{spec['fn']} {spec['args']}", "error": f"{type(e).__name__}: {str(e).splitlines()[0]}",
               "frames": frames[-6:]}
    finally:
        linear_mod.launch_config = select
    row["case"] += f" [{spec['label']}]" if spec.get("label") else ""
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=13)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    args = ap.parse_args()
    bf16, fp32 = "torch.bfloat16", "torch.float32"
    odd = [1, 63, 64, 65, 640, 129]
    specs = []
    for dtype in (bf16, fp32):  # full size, against the PyTorch form's fp32 error
        specs.append(dict(fn="op_case", args=["linear", dtype, fp32, 128, 128], kwargs=dict(B=4, T=2048, H=8)))
        specs.append(dict(fn="op_case", args=["linear", dtype, fp32, 128, 128],
                          kwargs=dict(H=8, lengths=[1000, 1, 3096, 4095])))
    for K, V in ((32, 16), (16, 16), (16, 32), (32, 32), (64, 16), (64, 64), (128, 128)):  # head dims, bf16
        for rule in ("linear", "delta"):
            for layout in (dict(lengths=odd), dict(B=2, T=700)):
                specs.append(dict(fn="op_case", args=[rule, bf16, bf16, K, V], kwargs=dict(layout, seed=7)))
    variants = {"stages_state=2": dict(stages_state=2), "stages_state=1": dict(stages_state=1),
                "state_addr64=False": dict(state_addr64=False), "warps_state=8": dict(warps_state=8),
                "stages_o=1": dict(stages_o=1), "warps_o=8": dict(warps_o=8)}
    for label, fields in variants.items():  # the small shapes under other launch settings
        for K, V in ((32, 16), (16, 16)):
            specs.append(dict(fn="op_case", args=["linear", bf16, bf16, K, V], kwargs=dict(lengths=odd, seed=7),
                              label=label, fields=fields))
    for rule in ("linear", "delta"):  # the small shapes on zero-padded head dims (a workaround, if it holds)
        for K, V in ((32, 16), (16, 16)):
            specs.append(dict(fn="op_case", args=[rule, bf16, bf16, K, V], kwargs=dict(lengths=odd, seed=7, pad_to=64),
                              label="padded to 64"))
    for name, backend in (("linear-attn-340m", "triton"), ("linear-attn-340m", "torch"), ("deltanet-340m", "auto")):
        specs.append(dict(fn="model_case", args=[name, backend, args.layers, args.steps, args.batch, args.seq_len]))

    # One worker process runs the cases in turn. A fault ("illegal memory access") poisons the
    # CUDA context for the rest of its process: the worker is then replaced, and the faulting
    # case run again alone with CUDA_LAUNCH_BLOCKING=1, so its frames name the kernel launch.
    rows, pool = [], None

    def fresh_pool(blocking: bool):
        os.environ["CUDA_LAUNCH_BLOCKING"] = "1" if blocking else "0"
        return concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def save(row):
        print(json.dumps(row), flush=True)
        rows.append(row)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)

    for spec in specs:
        pool = pool or fresh_pool(False)
        try:
            row = pool.submit(run_case, spec).result()
        except concurrent.futures.process.BrokenProcessPool as e:
            row = {"case": f"{spec['fn']} {spec['args']}", "error": f"worker died: {e}"}
        if any(f in row.get("error", "") for f in _FAULTS) or "worker died" in row.get("error", ""):
            pool.shutdown(cancel_futures=True)
            pool = fresh_pool(True)
            try:
                row["blocking_rerun"] = pool.submit(run_case, spec).result()
            except concurrent.futures.process.BrokenProcessPool as e:
                row["blocking_rerun"] = {"error": f"worker died: {e}"}
            pool.shutdown(cancel_futures=True)
            pool = None
        save(row)
    if pool is not None:
        pool.shutdown()


if __name__ == "__main__":
    main()
