"""What autograd keeps for backward: saved bytes per token per layer, by category, on the CPU.

Runs one forward (loss included, no backward) of a small model at the width of a preset inside
``torch.autograd.graph.saved_tensors_hooks`` and counts every saved tensor once per storage
(views of one buffer are not double counted), charged to the first code line that saved it.
Two training regimes (``--regime``):

- ``bf16``: ``model.to(torch.bfloat16)``, no autocast (parameters, residual stream and grads
  in bf16);
- ``autocast``: float32 parameters under ``torch.autocast("cpu", bfloat16)`` (float32 residual
  stream; autocast's bf16 weight copies are per step, not per token, and reported apart).

The delta rule runs with the "torch" backend on the CPU, but what is charged for it is what the
Triton op (``deltanet/ops/delta_rule/chunk.py``) saves on the GPU: its inputs q, k, v, beta
(counted through the hook, shared with whoever else saved them); with ``--keep-wy``
(``DeltaNetMixer.recompute_wy = False``) also, added analytically, its float32 ``ai`` buffer
``[B*T, H, 64]`` and ``v_new`` (the size of v), which the mixers' default has the op rerun in
backward instead (since 2026-12-07; the published 2026-12-06 CPU figures counted them). The CPU
run of the torch backend is hidden from autograd.

Besides bytes, the script flags float32 tensors of activation size (upcasts kept for backward)
and tensors saved twice with the same values under another storage or dtype (duplicates).

The estimate for a training step adds weights, grads and AdamW moments (16 B per parameter
with float32 parameters, 8 B with bf16 ones). It ignores the CUDA caching allocator's
fragmentation and backward temporaries. On CUDA the elementwise glue is compiled
(``deltanet/layers/_fused.py``) and the short conv runs as Triton kernels; both keep the same
tensors as the eager code measured here (tested in ``tests/layers/test_fused_routing.py``).

Examples::

    python benchmarks/activation_memory.py                          # deltanet-340m, both regimes
    python benchmarks/activation_memory.py --regime bf16 --loss plain   # the materialised-logits loss
    python benchmarks/activation_memory.py --recompute              # rerun norm/projections/conv in backward
    python benchmarks/activation_memory.py --keep-features          # keep q, k, v for the delta rule
    python benchmarks/activation_memory.py --json saved.json        # the numbers, machine-readable
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import traceback
import weakref

import torch

import deltanet.layers._fused as fz
import deltanet.layers.delta_net as delta_net_mod
from deltanet.models import DeltaNetForCausalLM, get_config
from deltanet.ops import delta_rule

AI_CHUNK = 64  # the Triton op's ai buffer: fp32 [B*T, H, 64]
GIB = 2 ** 30


def _keeps_wy() -> bool:
    """Whether the Triton op keeps its ai and v_new tiles for backward (``DeltaNetMixer.recompute_wy``)."""
    return not delta_net_mod.DeltaNetMixer.recompute_wy


class _TritonLikeDelta(torch.autograd.Function):
    """Forward by any backend with autograd off; saves what the Triton op saves (its inputs)."""

    @staticmethod
    def forward(ctx, q, k, v, beta):
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            o, _ = delta_rule(q, k, v, beta, backend="torch")
        ctx.save_for_backward(q, k, v, beta)
        return o

    @staticmethod
    def backward(ctx, do):  # pragma: no cover - only forwards are measured
        raise RuntimeError("measurement stand-in: no backward")


def _delta_stand_in(q, k, v, beta, *, initial_state=None, output_final_state=False, cu_seqlens=None,
                    backend="auto", g=None, **_):
    if initial_state is not None or cu_seqlens is not None or g is not None:
        raise ValueError("the measurement stand-in supports plain (ungated) training batches only")
    return _TritonLikeDelta.apply(q, k, v, beta), None


def _origin() -> str:
    """The two innermost frames of deltanet code on the stack (skipping this file): the saving
    line and its caller, e.g. ``layers/norm.py:158 rms_norm_linear <- layers/mlp.py:78``."""
    frames = []
    for fr in reversed(traceback.extract_stack()):
        f = fr.filename.replace(os.sep, "/")
        if "/deltanet/" in f and "activation_memory" not in f and "/_fused.py" not in f:
            mark = " [checkpoint]" if not frames and ("checkpoint(" in (fr.line or "") or "recompute_in_backward(" in (fr.line or "")) else ""
            frames.append(f"{f.split('/deltanet/')[-1]}:{fr.lineno} {fr.name}{mark}")
            if len(frames) == 2:
                break
    return " <- ".join(frames) or "?"


def _fingerprint(t: torch.Tensor):
    """Values of ``t`` rounded to bf16, summarised: equal for a tensor and its dtype copies."""
    v = t.detach().to(torch.bfloat16).double()
    return tuple(t.shape), round(v.sum().item(), 3), round(v.abs().sum().item(), 3), round(v.pow(2).sum().item(), 3)


@contextlib.contextmanager
def module_stack(model: torch.nn.Module):
    """Yields the names of the modules a forward is inside, innermost last (``"<root>"`` for the
    model itself), kept up to date by forward hooks removed on exit."""
    stack: list[str] = []

    def enter(name):
        def hook(*_):
            stack.append(name)
        return hook

    def leave(*_):  # returns None: a forward hook's return value would replace the module's output
        stack.pop()

    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(enter(name or "<root>")))
        handles.append(m.register_forward_hook(leave))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


class StorageSorter:
    """Sorts the tensors autograd saves during one forward of ``model`` over ``tokens`` tokens:
    ``sort(t)`` is None for a storage not to count (a parameter's, an empty one, or one seen
    before: views of one buffer count once), ``"step"`` for a weight-shaped tensor without a
    token dimension (autocast's bf16 weight copies, the fused loss's weight gradient: per step,
    not per token), else ``"token"``.

    A storage is "seen" while a tensor saved from it is alive: a saved tensor that the forward
    releases (the PyTorch chunk form under CPU autocast drops some of its bf16 casts) frees its
    address for a new buffer, which must count as new. Matching addresses alone undercounted
    ``saved_tensors_census.py``'s CPU run by up to 1.4% (2 layers, autocast), differently from one
    process to the next; this script's stand-in op releases nothing (same output either way)."""

    def __init__(self, model: torch.nn.Module, tokens: int):
        params = list(model.parameters())
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.param_shapes = {tuple(p.shape) for p in params} | {tuple(p.shape)[::-1] for p in params}
        self.tokens = tokens
        self.seen: dict[int, list[weakref.ref]] = {}  # address -> the saved tensors on it

    def sort(self, t: torch.Tensor) -> str | None:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr in self.param_ptrs or s.nbytes() == 0:
            return None
        savers = self.seen.get(ptr)
        if savers is not None and any(r() is not None for r in savers):
            savers.append(weakref.ref(t))
            return None
        self.seen[ptr] = [weakref.ref(t)]
        return "step" if tuple(t.shape) in self.param_shapes and self.tokens not in t.shape else "token"


def measure(model: torch.nn.Module, call, tokens: int, *, autocast: bool):
    """Run ``call()`` recording saved tensors. -> dict with ``rows`` ((module, origin) ->
    [bytes, dtypes, count, fp32 bytes]), ``per_step`` (bytes of weight-shaped tensors: autocast's
    bf16 weight copies, the fused loss's weight gradient) and ``duplicates`` (origin pairs that
    saved the same values twice, with the bytes of the second copy)."""
    storages = StorageSorter(model, tokens)
    prints: dict = {}
    rows: dict = collections.OrderedDict()
    per_step: dict = collections.defaultdict(int)
    duplicates: dict = collections.defaultdict(int)
    region_origin = []  # set while a RecomputedRegion's inputs are charged

    def pack(t):
        kind = storages.sort(t)
        if kind is None:
            return t
        s = t.untyped_storage()
        origin = region_origin[0] if region_origin else _origin()
        if kind == "step":
            per_step[origin] += s.nbytes()
            return t
        if t.is_floating_point() and t.numel() >= tokens:
            fp = _fingerprint(t)
            if fp in prints and t.abs().sum() > 0:
                duplicates[(prints[fp], origin)] += s.nbytes()
            prints.setdefault(fp, origin)
        key = (stack[-1] if stack else "<root>", origin)  # stack: module_stack below, entered before call()
        row = rows.setdefault(key, [0, set(), 0, 0])
        row[0] += s.nbytes()
        row[1].add(str(t.dtype).replace("torch.", ""))
        row[2] += 1
        row[3] += s.nbytes() if t.dtype == torch.float32 else 0
        return t

    region_init = fz.RecomputedRegion.__init__

    def charged_init(region, fn, inputs, params):
        # the region keeps its inputs itself (for its rerun), not through save_for_backward
        region_origin.append("recomputed region inputs (RecomputedRegion)")
        try:
            for t in inputs:
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    pack(t)
        finally:
            region_origin.clear()
        region_init(region, fn, inputs, params)

    old = delta_net_mod.delta_rule
    delta_net_mod.delta_rule = _delta_stand_in
    fz.RecomputedRegion.__init__ = charged_init
    try:
        with module_stack(model) as stack, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            call()
    finally:
        delta_net_mod.delta_rule = old
        fz.RecomputedRegion.__init__ = region_init
    return dict(rows=rows, per_step=dict(per_step), duplicates=dict(duplicates))


def category(name: str, origin: str) -> str:
    """The category of one saving site (module name + code origin)."""
    leaf = name.split(".")[-1]
    inner = origin.split(" <- ")[0]
    if "_delta_stand_in" in origin:
        return "delta op inputs (q, k, v, beta)"
    if "RecomputedRegion" in origin:
        return "short conv inputs (q/k/v projections)"
    if "[checkpoint]" in origin:
        return "recomputed region input (checkpoint)"
    if "loss.py" in inner or "cross_entropy" in inner or name.endswith("lm_head") or (
            name == "<root>" and "modeling.py" in inner):
        return "logits / loss"
    if "rms_norm_linear" in inner:
        if "_input_projections" in origin:
            return "residual x at attn_norm + q/k/v/b proj"
        if "delta_net.py" in origin:
            return "delta output o at o_norm + o_proj"
        return "residual x at mlp_norm + gate/up proj"
    if leaf in ("q_conv", "k_conv", "v_conv"):
        return "short conv inputs (q/k/v projections)"
    if "l2_norm" in origin:
        return "q, k after L2 norm (also the delta op's q, k)"
    if leaf == "mlp":
        return "SwiGLU g, u"
    if leaf == "attn":
        return "mixer glue (beta, v, gates)"
    if leaf == "norm":
        return "final norm input"
    if leaf == "embed_tokens":
        return "token ids"
    return f"other ({leaf}: {inner})"


def summarise(result: dict, tokens: int, layers: int, heads: int, head_dim: int, itemsize: int) -> dict:
    """-> per-layer and outside-the-blocks bytes per token by category (fp32 share apart), the
    Triton op's ``ai`` and ``v_new`` buffers added to the per-layer part."""
    layer, outside = collections.defaultdict(float), collections.defaultdict(float)
    fp32 = collections.defaultdict(float)
    for (name, origin), (nbytes, _dtypes, _n, f32) in result["rows"].items():
        cat = category(name, origin)
        if name.startswith("model.layers."):
            layer[cat] += nbytes / tokens / layers
            fp32[cat] += f32 / tokens / layers
        else:
            outside[cat] += nbytes / tokens
            fp32[cat] += f32 / tokens
    if _keeps_wy():
        layer["delta op ai (Triton, fp32)"] += AI_CHUNK * 4 * heads  # fp32 [T, H, 64] per layer
        fp32["delta op ai (Triton, fp32)"] += AI_CHUNK * 4 * heads
        layer["delta op v_new (Triton)"] += heads * head_dim * itemsize
    return dict(per_layer=dict(layer), outside=dict(outside), fp32=dict(fp32),
                per_layer_total=sum(layer.values()), outside_total=sum(outside.values()),
                per_step_bytes=sum(result["per_step"].values()),
                duplicates={f"{a}  ==  {b}": n / tokens for (a, b), n in result["duplicates"].items()})


def report(result: dict, summary: dict, title: str, tokens: int, layers: int, verbose: bool) -> None:
    print(f"\n== {title}: {tokens} tokens, {layers} layer(s) ==")
    if verbose:
        for (name, origin), (nbytes, dtypes, n, _f) in result["rows"].items():
            print(f"  {nbytes / tokens:8.1f}  {name:<26} {origin:<84} {','.join(sorted(dtypes))} x{n}")
    print("  bytes per token per layer (of which float32):")
    for c, v in sorted(summary["per_layer"].items(), key=lambda kv: -kv[1]):
        print(f"  {v:8.0f}  ({summary['fp32'].get(c, 0):6.0f})  {c}")
    print(f"  {summary['per_layer_total']:8.0f}            TOTAL per layer")
    print("  bytes per token outside the blocks:")
    for c, v in sorted(summary["outside"].items(), key=lambda kv: -kv[1]):
        print(f"  {v:8.0f}  ({summary['fp32'].get(c, 0):6.0f})  {c}")
    print(f"  per step (weight-shaped: autocast bf16 copies, fused-loss weight grad): "
          f"{summary['per_step_bytes'] / 2**20:.1f} MiB")
    for pair, v in summary["duplicates"].items():
        print(f"  DUPLICATE ({v:.0f} B/token): {pair}")


def analyse(preset: str, regime: str, loss: str, tokens: int, layers: int, verbose: bool = False,
            **overrides) -> dict:
    """One measured forward of a ``layers``-layer ``preset`` model; returns the summary."""
    torch.manual_seed(0)
    cfg = get_config(preset, delta_backend="torch", num_hidden_layers=layers,
                     fuse_linear_cross_entropy=loss == "fused", **overrides)
    model = DeltaNetForCausalLM(cfg).train()
    if regime == "bf16":
        model = model.to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens))
    result = measure(model, lambda: model(ids, labels=ids).loss, tokens, autocast=regime == "autocast")
    summary = summarise(result, tokens, layers, cfg.num_heads, cfg.head_dim, 2)  # v is bf16 in both regimes
    report(result, summary, f"{preset}, {regime}, {loss} loss", tokens, layers, verbose)
    return summary


def estimate(summary: dict, regime: str, preset: str, train_layers: int | None, train_tokens: int,
             **overrides) -> dict:
    cfg = get_config(preset, **overrides)
    L = train_layers or cfg.num_hidden_layers
    with torch.device("meta"):
        n_params = sum(p.numel() for p in DeltaNetForCausalLM(
            get_config(preset, num_hidden_layers=L, **overrides)).parameters())
    acts = (summary["per_layer_total"] * L + summary["outside_total"]) * train_tokens
    states = (16 if regime == "autocast" else 8) * n_params
    per_step = summary["per_step_bytes"]  # the 2-layer run's; the loss part does not grow with L
    total = acts + states + per_step
    print(f"  estimate, {L} layers, {train_tokens} tokens/step: activations {acts / GIB:.2f} GiB + "
          f"weights/grads/AdamW {states / GIB:.2f} GiB ({n_params / 1e6:.1f}M params) = {total / GIB:.2f} GiB")
    return dict(activations_GiB=acts / GIB, states_GiB=states / GIB, total_GiB=total / GIB, params=n_params)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="deltanet-340m")
    ap.add_argument("--regime", choices=("bf16", "autocast", "both"), default="both")
    ap.add_argument("--loss", choices=("fused", "plain", "default"), default="fused",
                    help="fused linear cross-entropy, the materialised-logits loss, or the config default")
    ap.add_argument("--tokens", type=int, default=512, help="T of the measured forward (B = 1)")
    ap.add_argument("--layers", type=int, default=2, help="layers of the measured model")
    ap.add_argument("--train-tokens", type=int, default=32768)
    ap.add_argument("--train-layers", type=int, default=None, help="default: the preset's")
    ap.add_argument("--untied", action="store_true", help="untied input/output embeddings (fla's 374M shape)")
    ap.add_argument("--recompute", action="store_true",
                    help="DeltaNetMixer.recompute_inputs = True (rerun the mixer's input region in backward "
                         "instead of keeping the short conv inputs; the default keeps them)")
    ap.add_argument("--keep-features", action="store_true",
                    help="DeltaNetMixer.recompute_features = False (keep q, k, v of the delta rule for backward "
                         "instead of rerunning conv + q/k norm from the conv inputs)")
    ap.add_argument("--keep-wy", action="store_true",
                    help="DeltaNetMixer.recompute_wy = False: the Triton chunk op keeps its ai / v_new tiles for "
                         "backward (counted; the default keeps only its inputs and reruns them)")
    ap.add_argument("--compiled", action="store_true",
                    help="run the elementwise glue through torch.compile as on CUDA (Inductor's CPU backend; "
                         "its partitioner picks what to keep; the short conv then runs as compiled PyTorch)")
    ap.add_argument("--verbose", action="store_true", help="every saving site, not only the categories")
    ap.add_argument("--json", help="write the summaries here")
    args = ap.parse_args(argv)
    delta_net_mod.DeltaNetMixer.recompute_inputs = args.recompute
    delta_net_mod.DeltaNetMixer.recompute_features = not args.keep_features
    delta_net_mod.DeltaNetMixer.recompute_wy = not args.keep_wy
    if args.compiled:
        fz._compiles_on = lambda x: True
        os.environ["DELTANET_CONV"] = "torch"
    loss = args.loss
    if loss == "default":
        loss = "fused" if get_config(args.preset).fuse_linear_cross_entropy else "plain"
    out = {}
    for regime in (("bf16", "autocast") if args.regime == "both" else (args.regime,)):
        over = dict(tie_word_embeddings=False) if args.untied else {}
        s = analyse(args.preset, regime, loss, args.tokens, args.layers, args.verbose, **over)
        s["estimate"] = estimate(s, regime, args.preset, args.train_layers, args.train_tokens, **over)
        out[regime] = s
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(preset=args.preset, loss=loss, tokens=args.tokens, layers=args.layers,
                           recompute=args.recompute, recompute_features=not args.keep_features,
                           saved_buffers=_keeps_wy(), regimes=out), f, indent=1)


if __name__ == "__main__":
    main()
