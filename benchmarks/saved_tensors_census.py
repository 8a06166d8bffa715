"""What each model keeps for backward, measured on the device it trains on: ours vs fla's DeltaNet.

``benchmarks/activation_memory.py`` counts our model on the CPU with a stand-in for the Triton op;
this script runs the real thing (our Triton kernels and compiled glue, or fla's kernels) on a GPU,
so the same census covers fla's DeltaNet, whose kernels cannot run on the CPU.

For each model and training regime it runs one training forward (loss included, no backward)
inside ``torch.autograd.graph.saved_tensors_hooks`` at two depths, ``--layers`` L and 2L, and
counts every saved tensor once per storage (views of one buffer are not double counted),
charged to the innermost module and the innermost frame of the model's own code
(``deltanet/...`` or ``fla/...``). The difference between the two depths divided by L is what one
layer keeps per token; the rest is outside the blocks (embedding, final norm, loss). Beside
the hooked count it records how much the forward left allocated on the device
(``torch.cuda.memory_allocated`` after the forward minus before, also per layer by the same
difference): tensors an autograd Function keeps as plain attributes of ``ctx`` are invisible to
the hooks but not to the allocator. Under autocast the allocator's count also holds the bf16 copies
of the weights autocast makes once per step (per layer: 2 bytes per parameter, spread over the
measured tokens), which the hooks report apart.

Regimes: ``bf16`` (``model.to(torch.bfloat16)``, no autocast) and ``autocast`` (float32
parameters, bf16 autocast). Weight-shaped tensors (autocast's bf16 weight copies) are per step,
not per token, and reported apart. Every model runs a warm-up forward first (Triton autotuning
and compilation happen outside the measurement).

    python benchmarks/saved_tensors_census.py --out DIR                   # deltanet-340m vs fla-deltanet
    python benchmarks/saved_tensors_census.py --out DIR --models deltanet-340m --device cpu --tokens 256 --layers 1

Writes ``DIR/census.json`` (every site, both depths) and ``DIR/census.md`` (per-layer sites
sorted by bytes per token, per model and regime, then the totals side by side).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from activation_memory import StorageSorter, module_stack  # the CPU count's module stack and storage rules
from deltanet.bench.model import FLA, build_model, environment

PACKAGES = ("/deltanet/", "/fla/")


def _origin() -> str:
    """The two innermost frames of the model's own code on the stack (not this file), the saving
    line's function and its caller: ``deltanet/layers/norm.py:rms_norm_linear <- deltanet/layers/mlp.py:forward``."""
    frames = []
    for fr in reversed(traceback.extract_stack()):
        f = fr.filename.replace(os.sep, "/")
        if "saved_tensors_census" in f:
            continue
        pkg = next((p for p in PACKAGES if p in f), None)
        if pkg is not None:
            frames.append(f"{pkg.strip('/')}/{f.split(pkg)[-1]}:{fr.name}")
            if len(frames) == 2:
                break
    return " <- ".join(frames) or "torch"


def _site_module(name: str) -> str:
    """``model.layers.3.attn.q_conv1d`` -> ``layers.*.attn.q_conv1d`` (one site for every layer)."""
    parts = name.split(".")
    if parts and parts[0] == "model":
        parts = parts[1:]
    return ".".join("*" if p.isdigit() else p for p in parts) or "<root>"


def census(model: torch.nn.Module, call, tokens: int, *, autocast: bool, device: torch.device) -> dict:
    """Run ``call()`` (a forward) recording saved tensors. -> dict with ``sites``
    ("module | origin" -> [bytes, count, dtypes]), ``per_step`` (bytes of weight-shaped tensors)
    and ``allocated`` (device bytes the forward left allocated; CUDA only, else None)."""
    storages = StorageSorter(model, tokens)
    sites: dict = collections.defaultdict(lambda: [0, 0, set()])
    per_step = collections.defaultdict(int)

    def pack(t):
        kind = storages.sort(t)
        if kind is None:
            return t
        nbytes = t.untyped_storage().nbytes()
        origin = _origin()
        if kind == "step":
            per_step[origin] += nbytes
            return t
        row = sites[f"{_site_module(stack[-1] if stack else '')} | {origin}"]  # stack: module_stack below
        row[0] += nbytes
        row[1] += 1
        row[2].add(str(t.dtype).replace("torch.", ""))
        return t

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device) if cuda else None
    with module_stack(model) as stack, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = call()
    if cuda:
        torch.cuda.synchronize(device)
    allocated = torch.cuda.memory_allocated(device) - before if cuda else None
    del loss  # frees the graph and what it kept
    return dict(sites={k: [v[0], v[1], sorted(v[2])] for k, v in sites.items()}, per_step=dict(per_step),
                allocated=allocated)


def measure(name: str, regime: str, layers: int, tokens: int, device: torch.device, warmup: bool = True) -> dict:
    """One model at one depth: a warm-up forward (Triton autotuning, compilation), then the census
    of a forward. No backward runs: only the forward decides what is kept (and fla's backward
    kernels autotune for minutes on a fresh machine)."""
    torch.manual_seed(0)
    model = build_model(name, num_hidden_layers=layers, tie_word_embeddings=False)
    model = model.to(device=device, dtype=torch.bfloat16 if regime == "bf16" else None).train()
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=regime == "autocast")

    def forward():
        return model(input_ids=ids, labels=ids).loss

    if warmup:
        with torch.autocast(**amp):
            forward()  # graph freed on return
    result = census(model, forward, tokens, autocast=regime == "autocast", device=device)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def per_layer(shallow: dict, deep: dict, layers: int, tokens: int) -> dict:
    """Bytes per token: each site of the deeper run (``2 * layers`` blocks) charged per layer when
    its module is inside a block (``layers.*``), else outside the blocks. Cross-checks by depth
    difference (deep - shallow over the extra layers), which needs no module names: the hooked
    total (``hooked_diff_per_layer``) and what the allocator holds (``allocated_per_layer``)."""
    sites = {}
    for key, (nbytes, _n, dtypes) in deep["sites"].items():
        inside = key.startswith("layers.")
        sites[key] = dict(per_layer=nbytes / tokens / (2 * layers) if inside else 0.0,
                          outside=0.0 if inside else nbytes / tokens, dtypes=dtypes)

    def total(r):
        return sum(v[0] for v in r["sites"].values())

    out = dict(sites=sites,
               per_layer_total=sum(s["per_layer"] for s in sites.values()),
               outside_total=sum(s["outside"] for s in sites.values()),
               hooked_diff_per_layer=(total(deep) - total(shallow)) / layers / tokens,
               per_step_bytes=sum(deep["per_step"].values()))
    if shallow["allocated"] is not None:
        out["allocated_per_layer"] = (deep["allocated"] - shallow["allocated"]) / layers / tokens
        out["allocated_outside"] = shallow["allocated"] / tokens - out["allocated_per_layer"] * layers
    return out


def markdown(results: dict, env: dict, tokens: int, layers: int) -> str:
    lines = ["# Saved tensors per token: what a training forward keeps for backward", "",
             "  ".join(f"{k}: {v}" for k, v in env.items()), "",
             f"One forward of each model at {layers} and {2 * layers} layers, {tokens} tokens (B = 1), "
             f"untied embeddings. Sites: the {2 * layers}-layer run, a block's sites divided by its "
             "blocks; `by difference`: the hooked total of both depths, deep - shallow over the extra layers. "
             "`allocated`: what the forward left allocated on the device (the hooks miss tensors kept "
             "as plain ctx attributes; the allocator does not; under autocast it also holds the "
             "per-step bf16 weight copies).", ""]
    lines += ["| model | regime | hooked B/token/layer | by difference | allocated B/token/layer | hooked B/token outside "
              "| allocated B/token outside | per step (weight-shaped) MiB |", "|---|---|---|---|---|---|---|---|"]
    for (model, regime), r in results.items():
        if "error" in r:
            lines.append(f"| {model} | {regime} | error: {r['error']} | | | | | |")
            continue
        lines.append(f"| {model} | {regime} | {r['per_layer_total']:.0f} | {r['hooked_diff_per_layer']:.0f} "
                     f"| {r.get('allocated_per_layer', float('nan')):.0f} "
                     f"| {r['outside_total']:.0f} | {r.get('allocated_outside', float('nan')):.0f} "
                     f"| {r['per_step_bytes'] / 2**20:.1f} |")
    for (model, regime), r in results.items():
        if "error" in r:
            continue
        lines += ["", f"## {model}, {regime}: per layer, bytes per token", "", "| bytes | site (module \\| code) | dtypes |",
                  "|---|---|---|"]
        for key, s in sorted(r["sites"].items(), key=lambda kv: -kv[1]["per_layer"]):
            if abs(s["per_layer"]) >= 0.5:
                lines.append(f"| {s['per_layer']:.0f} | {key} | {','.join(s['dtypes'])} |")
        lines += ["", "Outside the blocks:", "", "| bytes | site | dtypes |", "|---|---|---|"]
        for key, s in sorted(r["sites"].items(), key=lambda kv: -kv[1]["outside"]):
            if abs(s["outside"]) >= 0.5:
                lines.append(f"| {s['outside']:.0f} | {key} | {','.join(s['dtypes'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="results folder")
    ap.add_argument("--models", default=f"deltanet-340m,{FLA}", help="comma-separated: presets and/or fla-deltanet")
    ap.add_argument("--regimes", default="bf16,autocast")
    ap.add_argument("--tokens", type=int, default=8192, help="T of the measured forward (B = 1)")
    ap.add_argument("--layers", type=int, default=2, help="L: the census runs at L and 2L layers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="start no model/regime after this")
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.layers < 1:
        raise ValueError(f"--tokens and --layers must be >= 1, got {args.tokens}, {args.layers}")
    regimes = [r for r in args.regimes.split(",") if r]
    bad = [r for r in regimes if r not in ("bf16", "autocast")]
    if bad:
        raise ValueError(f"--regimes takes bf16 and/or autocast, got {bad}")
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device, " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])))
    t0 = time.perf_counter()
    results: dict = {}
    raw: dict = {}
    for model in [m for m in args.models.split(",") if m]:
        for regime in regimes:
            if time.perf_counter() - t0 > args.budget_s:
                results[(model, regime)] = dict(error="skipped: over --budget-s")
                continue
            try:
                shallow = measure(model, regime, args.layers, args.tokens, device)
                deep = measure(model, regime, 2 * args.layers, args.tokens, device)
                results[(model, regime)] = per_layer(shallow, deep, args.layers, args.tokens)
                raw[f"{model} {regime}"] = dict(shallow=shallow, deep=deep)
            except Exception as e:  # a missing optional package, OOM: record it, go on
                results[(model, regime)] = dict(error=f"{type(e).__name__}: {e}"[:300])
            r = results[(model, regime)]
            print(f"[{time.perf_counter() - t0:6.1f} s] {model} {regime}: "
                  + (r["error"] if "error" in r else f"{r['per_layer_total']:.0f} B/token/layer hooked, "
                     f"{r.get('allocated_per_layer', float('nan')):.0f} allocated"), flush=True)
            (out / "census.md").write_text(markdown(results, env, args.tokens, args.layers))
            (out / "census.json").write_text(json.dumps(dict(
                env=env, tokens=args.tokens, layers=args.layers,
                results={f"{m} {r}": v for (m, r), v in results.items()}, raw=raw), indent=1))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
