"""What autograd keeps for backward: saved bytes per token per layer, by module, on the CPU.

Runs one forward (no backward) of a DeltaNet block (or a small model) at the width of a preset
under ``torch.autocast("cpu", bfloat16)`` inside ``torch.autograd.graph.saved_tensors_hooks``
and counts every saved tensor once per storage (views of one buffer are not double counted).
Each storage is charged to the first module/code line that saved it.

The delta rule runs with the "torch" backend on the CPU, but what is charged for it is what the
Triton op (``deltanet/ops/delta_rule/chunk.py``) saves on the GPU: its inputs q, k, v, beta
(counted through the hook, shared with whoever else saved them) plus its float32 ``ai`` buffer
``[B*T, H, 64]`` (added analytically). The CPU run of the torch backend is hidden from autograd.

The estimate for training adds fp32 weights (4 B), grads (4 B) and AdamW moments (8 B) per
parameter, and the bf16 weight copies autocast keeps for one forward. It ignores the CUDA
caching allocator's fragmentation, the loss's transient buffers and backward temporaries.
Note: on CUDA the elementwise glue is compiled (``deltanet/layers/_fused.py``), and Inductor
chooses its own saved set; this script measures the eager code path.

Examples::

    python benchmarks/activation_memory.py                       # deltanet-340m, 1 block, T=1024
    python benchmarks/activation_memory.py --layers 2 --tokens 2048 --train-tokens 32768
    python benchmarks/activation_memory.py --recompute        # rerun norm/projections/conv in backward
"""

from __future__ import annotations

import argparse
import collections
import os
import traceback

import torch

import deltanet.layers.delta_net as delta_net_mod
from deltanet.models import DeltaNetForCausalLM, get_config
from deltanet.models.modeling import DeltaNetBlock
from deltanet.ops import delta_rule

AI_CHUNK = 64  # the Triton op's ai buffer: fp32 [B*T, H, 64]
GIB = 2 ** 30


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
                    backend="auto", **_):
    if initial_state is not None or cu_seqlens is not None:
        raise ValueError("the measurement stand-in supports plain training batches only")
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


def measure(module: torch.nn.Module, inputs, tokens: int, *, call=None):
    """Run ``module(*inputs)`` recording saved tensors. -> (rows, params_bytes_saved) where rows
    maps (module name, origin) -> [bytes, dtypes, count]; parameter storages are not counted."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in module.parameters()}
    param_shapes = {tuple(p.shape) for p in module.parameters()}
    seen: set[int] = set()
    rows: dict = collections.OrderedDict()
    stack: list[str] = []
    weight_copies = 0

    def pre(name):
        return lambda *_: stack.append(name)

    def post(*_):
        stack.pop()

    handles = []
    for name, m in module.named_modules():
        handles.append(m.register_forward_pre_hook(pre(name or "<root>")))
        handles.append(m.register_forward_hook(post))

    def pack(t):
        nonlocal weight_copies
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr in param_ptrs or ptr in seen or s.nbytes() == 0:
            return t
        seen.add(ptr)
        origin = _origin()
        if tuple(t.shape) in param_shapes and tokens not in t.shape:
            weight_copies += s.nbytes()  # autocast's bf16 copy of a weight (per step, not per token)
            return t
        key = (stack[-1] if stack else "<root>", origin)
        row = rows.setdefault(key, [0, set(), 0])
        row[0] += s.nbytes()
        row[1].add(str(t.dtype).replace("torch.", ""))
        row[2] += 1
        return t

    old = delta_net_mod.delta_rule
    delta_net_mod.delta_rule = _delta_stand_in
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            (call or module)(*inputs)
    finally:
        delta_net_mod.delta_rule = old
        for h in handles:
            h.remove()
    return rows, weight_copies


def _category(name: str, origin: str) -> str:
    leaf = name.split(".")[-1]
    if "_delta_stand_in" in origin:
        return "delta op (q,k,v,beta)"
    if "[checkpoint]" in origin:
        return "pre-norm input x, fp32 residual (recomputed attn_norm+proj+conv)"
    if "rms_norm_linear" in origin:
        if "_input_projections" in origin:
            return "pre-norm input x, fp32 residual (attn_norm+q/k/v/b proj)"
        if "delta_net.py" in origin:
            return "delta output o (o_norm+o_proj)"
        return "pre-norm input x, fp32 residual (mlp_norm+gate/up proj)"
    if leaf in ("q_proj", "k_proj", "v_proj", "b_proj", "g_proj", "o_proj"):
        return f"proj input ({leaf})"
    if leaf in ("q_conv", "k_conv", "v_conv"):
        return "short conv input / intermediates"
    if leaf in ("attn_norm", "mlp_norm", "norm"):
        return f"RMSNorm ({leaf})"
    if leaf == "o_norm":
        return "o_norm (head RMSNorm)"
    if leaf in ("mlp", "gate_proj", "up_proj", "down_proj"):
        return "SwiGLU (g, u)"
    if "l2_norm" in origin:
        return "q/k L2 norm (output = delta op's q, k)"
    if leaf == "attn":
        return "mixer glue (v, beta: delta op inputs)"
    return f"other ({leaf})"


def report(rows, tokens: int, layers: int, heads: int, title: str) -> float:
    """Print per-token-per-layer bytes by category and by origin; return the total (B/token/layer)."""
    cats: dict = collections.defaultdict(int)
    print(f"\n== {title}: {tokens} tokens, {layers} layer(s); bytes per token per layer ==")
    for (name, origin), (nbytes, dtypes, n) in rows.items():
        per = nbytes / tokens / layers
        cats[_category(name, origin)] += per
        print(f"  {per:8.1f}  {name:<18} {origin:<80} {','.join(sorted(dtypes))} x{n}")
    ai = AI_CHUNK * 4 * heads  # fp32 [T, H, 64] per layer
    cats["delta op ai (Triton, fp32)"] += ai
    print("  -- by category --")
    for c, v in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"  {v:8.1f}  {c}")
    total = sum(cats.values())
    print(f"  {total:8.1f}  TOTAL (incl. {ai} B Triton ai)")
    return total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="deltanet-340m")
    ap.add_argument("--tokens", type=int, default=2048, help="T of the measured forward (B = 1; not a weight dimension)")
    ap.add_argument("--layers", type=int, default=2, help="layers of the small model run (0: skip)")
    ap.add_argument("--train-tokens", type=int, default=32768)
    ap.add_argument("--train-layers", type=int, default=None, help="default: the preset's")
    ap.add_argument("--params", type=float, default=None, help="parameters (default: counted)")
    ap.add_argument("--recompute", action="store_true",
                    help="DeltaNetMixer.recompute_inputs = True (rerun the mixer's input region in backward "
                         "instead of keeping the short conv inputs; the default keeps them)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    delta_net_mod.DeltaNetMixer.recompute_inputs = args.recompute
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = get_config(args.preset, delta_backend="torch")
    T = args.tokens

    block = DeltaNetBlock(cfg, 0)
    x = torch.randn(1, T, cfg.hidden_size, requires_grad=True)
    rows, wc_block = measure(block, (x,), T)
    per_layer = report(rows, T, 1, cfg.num_heads, "one block (input x is the fp32 residual stream)")

    embed_and_head = 0.0
    if args.layers:
        small = DeltaNetForCausalLM(get_config(args.preset, delta_backend="torch", num_hidden_layers=args.layers,
                                                fuse_linear_cross_entropy=True))
        ids = torch.randint(0, cfg.vocab_size, (1, T))
        rows2, _ = measure(small, (ids,), T, call=lambda i: small(i, labels=i).loss)
        total2 = report(rows2, T, args.layers, cfg.num_heads, f"{args.layers}-layer model with fused loss")
        # what the model saves beyond layers x one block: embeddings, final norm, loss
        embed_and_head = total2 * args.layers - per_layer * args.layers
        print(f"  outside the blocks: {embed_and_head:.1f} B/token")

    L = args.train_layers or cfg.num_hidden_layers
    n_params = args.params or sum(p.numel() for p in DeltaNetForCausalLM(
        get_config(args.preset, num_hidden_layers=L)).parameters())
    acts = (per_layer * L + embed_and_head) * args.train_tokens
    states = 16 * n_params
    bf16_weights = wc_block * L  # autocast's bf16 weight copies that backward holds on to
    print(f"\n== estimate: {args.preset}, {L} layers, {args.train_tokens} tokens/step ==")
    print(f"  activations saved     {acts / GIB:7.2f} GiB ({per_layer:.0f} B/token/layer)")
    print(f"  weights+grads+AdamW   {states / GIB:7.2f} GiB ({n_params / 1e6:.1f}M params x 16 B)")
    print(f"  bf16 weight copies    {bf16_weights / GIB:7.2f} GiB (kept for backward by the blocks)")
    print(f"  total                 {(acts + states + bf16_weights) / GIB:7.2f} GiB  (measured on the H200: ours 37.4 GiB, 31.2 with --recompute; fla 0.6.0 41.5)")


if __name__ == "__main__":
    main()
