"""The fused decode step (one Triton kernel per delta-rule layer and token) against the eager step.

Op level: ``delta_rule_decode_step`` against ``delta_rule_decode_step_reference`` (outputs, new
conv states, new recurrent state; K != V, head dims up to 256, every layer option). Layer and
model level: the mixer's fused route against its eager route over several consecutive steps with
left padding and a padded new token, greedy decoding through ``generate`` and the captured-step
function, and the number of ops (CPU) / CUDA kernels a step launches.

CPU: the kernel runs in the Triton interpreter at small shapes; GPU: compiled, larger shapes, and
the CUDA-graph / kernel-count checks.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.ops._triton_common import DEVICE, ON_GPU  # sets TRITON_INTERPRET=1 on CPU before the kernels load
from tests.utils import assert_close

import deltanet.layers._fused as fz
from deltanet.models import DeltaNetConfig, DeltaNetForCausalLM, set_decode_kernel
from deltanet.models import cuda_graph
from deltanet.models.cache import RecurrentState
from deltanet.ops.delta_rule.decode import delta_rule_decode_step, delta_rule_decode_step_reference

RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]

# op-level cases: (B, H, K, V, n_h, options)
if ON_GPU:
    SHAPES = [(1, 8, 128, 128), (3, 4, 64, 128), (2, 2, 256, 256), (4, 3, 100, 36)]
else:
    SHAPES = [(2, 2, 16, 32), (1, 2, 32, 16), (1, 1, 256, 64)]  # the last: V in two blocks
SHAPE_IDS = ["B{}-H{}-K{}-V{}".format(*s) for s in SHAPES]
OPTIONS = {
    "plain": dict(),
    "gated": dict(decay=True, gate=True),
    "product2": dict(n_h=2),
    "gated_product2_neg": dict(n_h=2, decay=True, neg=True, gate=True),
    "neg_eigval": dict(neg=True),
    "masked": dict(mask=True, decay=True),
    "no_conv_no_beta": dict(conv=False, beta=False),
    "relu_sum": dict(act="relu", norm="sum"),
    "elu_sum": dict(act="elu", norm="sum"),
    "identity": dict(act="identity"),
    "no_output_norm": dict(output_norm=False),
}


def _op_inputs(B, H, K, V, dtype, *, n_h=1, conv=True, beta=True, decay=False, mask=False, gate=False,
               output_norm=True, neg=False, act="silu", norm="l2", W=4, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, dt=dtype, s=1.0):
        return (s * torch.randn(*shape, generator=g)).to(device=DEVICE, dtype=dt)

    kw = dict(q=r(B, H * K), k=r(B, n_h * H * K), v=r(B, n_h * H * V), state=r(B, H, K, V, dt=torch.float32, s=0.3),
              qk_activation=act, qk_norm=norm, allow_neg_eigval=neg)
    if conv:
        kw["conv_states"] = (r(B, W - 1, H * K), r(B, W - 1, n_h * H * K), r(B, W - 1, n_h * H * V))
        kw["conv_weights"] = (r(H * K, W, dt=torch.float32), r(n_h * H * K, W, dt=torch.float32),
                              r(n_h * H * V, W, dt=torch.float32))
    if beta:
        kw["beta"] = r(B, n_h * H)
    if decay:
        kw["decay"] = (r(B, H), r(H, dt=torch.float32), r(H, dt=torch.float32))
    if mask:
        kw["mask"] = (torch.arange(B, device=DEVICE) % 2 == 0).long()  # odd rows are padding
    if output_norm:
        kw["norm_weight"] = r(V, dt=torch.float32)
    if gate:
        kw["gate"] = r(B, H * V)
    return kw


def _clone(kw):
    return {k: (tuple(t.clone() for t in x) if isinstance(x, tuple) else x.clone() if isinstance(x, torch.Tensor)
                else x) for k, x in kw.items()}


def _call(fn, kw):
    kw = dict(kw)
    return fn(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("state"), **kw)


# (on CPU the head of 256, whose V runs in two blocks, takes only the fullest option: interpreter time)
CASES = [(s, o) for s in SHAPES for o in OPTIONS if ON_GPU or s[2] < 256 or o == "gated_product2_neg"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,option", CASES, ids=[f"{SHAPE_IDS[SHAPES.index(s)]}-{o}" for s, o in CASES])
def test_op_matches_reference_over_steps(shape, option, dtype):
    """Three consecutive steps, each with fresh projections, carrying conv and recurrent states."""
    opts = OPTIONS[option]
    fused = _clone(_op_inputs(*shape, dtype, **opts))
    ref = _clone(fused)
    S0 = fused["state"].clone()
    for step in range(3):
        fresh = _op_inputs(*shape, dtype, **opts, seed=step + 1)
        for kw in (fused, ref):
            kw.update({n: fresh[n].clone() for n in ("q", "k", "v", "beta", "gate") if n in fresh})
            if "decay" in fresh:
                kw["decay"] = (fresh["decay"][0].clone(), *kw["decay"][1:])
        o = _call(delta_rule_decode_step, fused)
        o_ref = _call(delta_rule_decode_step_reference, ref)
        rtol = RTOL[dtype]
        assert o.dtype == dtype and o.shape == (shape[0], shape[1], shape[3])
        assert_close(f"o step {step}", o.float(), o_ref.float(), rtol=rtol)
        assert_close(f"state step {step}", fused["state"], ref["state"], rtol=rtol)
        for name, a, b in zip("qkv", fused.get("conv_states", ()), ref.get("conv_states", ())):
            assert torch.equal(a, b), f"conv state {name}, step {step}"  # a shift and a copy: exact
    if opts.get("mask"):
        pad = fused["mask"] == 0
        assert torch.equal(fused["state"][pad], S0[pad])  # padding rows: bit for bit untouched
        assert not torch.equal(fused["state"][~pad], S0[~pad])


def test_op_validates_its_inputs():
    kw = _op_inputs(2, 2, 16, 16, torch.float32)
    with pytest.raises(TypeError, match="state must be a contiguous float32"):
        _call(delta_rule_decode_step, {**kw, "state": kw["state"].double()})
    with pytest.raises(ValueError, match=r"v must have shape \[2, 32\]"):
        _call(delta_rule_decode_step, {**kw, "v": kw["v"][:, :16]})
    with pytest.raises(ValueError, match="conv_states and conv_weights together"):
        _call(delta_rule_decode_step, {**kw, "conv_weights": None})
    with pytest.raises(ValueError, match="gate .* needs norm_weight"):
        _call(delta_rule_decode_step, {**kw, "norm_weight": None, "gate": kw["q"].clone()})
    with pytest.raises(ValueError, match="qk_activation"):
        _call(delta_rule_decode_step, {**kw, "qk_activation": "gelu"})


# -- the layer: fused route against the eager route ----------------------------------------------------

VOCAB = 50
LAYERS = {
    "delta_net": dict(layer_types=["delta_net"]),
    "output_gate": dict(layer_types=["delta_net"], use_output_gate=True),
    "neg_eigval": dict(layer_types=["delta_net"], allow_neg_eigval=True),
    "gated": dict(layer_types=["gated_delta_net"]),
    "delta_product2": dict(layer_types=["delta_product"], num_householder=2),
    "gated_product2_neg": dict(layer_types=["gated_delta_product"], num_householder=2, allow_neg_eigval=True),
    "no_conv_relu_sum": dict(layer_types=["delta_net"], use_short_conv=False, qk_activation="relu", qk_norm="sum"),
}


def _model(dtype=torch.float32, **kw) -> DeltaNetForCausalLM:
    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_heads=2, intermediate_size=64, pad_token_id=0,
               bos_token_id=None, eos_token_id=None, delta_backend="auto", sliding_window=5)
    cfg.update(kw)
    cfg.setdefault("num_hidden_layers", len(cfg["layer_types"]))
    torch.manual_seed(0)
    return DeltaNetForCausalLM(DeltaNetConfig(**cfg)).to(device=DEVICE, dtype=dtype).eval()


class OpCounter(TorchDispatchMode):
    """Counts the ops a block dispatches that launch work (not views, dtype queries or allocations)."""

    SKIP = ("aten.promote_types", "aten._unsafe_view", "aten.empty", "aten.new_empty")

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not func.is_view and not name.startswith(self.SKIP):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


FUSED_OP = "deltanet.delta_rule_decode_step.default"
GEMV_OP = "deltanet.decode_linear.default"
ATTN_OP = "deltanet.decode_attention_step.default"


def _steps(model, route, prompt, prompt_mask, new_ids, new_mask):
    """Prefill eagerly, then one-token steps along ``route``: logits and every recurrent entry.
    Plain forwards, not the CUDA-graph step a CUDA model takes by default (replays dispatch no op
    to count; the captured step has its own tests below)."""
    model.cuda_graph_decoding = False
    set_decode_kernel(model, "eager")
    with torch.no_grad():
        cache = model(prompt, attention_mask=prompt_mask, use_cache=True).past_key_values
        set_decode_kernel(model, route)
        mask, logits = prompt_mask, []
        for t in range(new_ids.shape[1]):
            mask = torch.cat([mask, new_mask[:, t:t + 1]], 1)
            with OpCounter() as counter:
                logits.append(model(new_ids[:, t:t + 1], attention_mask=mask, past_key_values=cache).logits)
            n_delta = sum(isinstance(e, RecurrentState) for e in cache.layers)
            assert counter.ops[FUSED_OP] == (n_delta if route == "fused" else 0), counter.ops
    return torch.cat(logits, 1), cache


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_fused_layer_steps_equal_eager_steps(layer, dtype):
    """Row 1 is left-padded by 3 and its third new token is padding; 5 consecutive steps: logits,
    conv states and recurrent states of the fused route equal the eager route's."""
    model = _model(dtype, **LAYERS[layer])
    B, T, N = 2, 7, 5
    prompt = torch.randint(1, VOCAB, (B, T), device=DEVICE)
    prompt_mask = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    prompt_mask[1, :3] = 0
    new_ids = torch.randint(1, VOCAB, (B, N), device=DEVICE)
    new_mask = torch.ones(B, N, dtype=torch.long, device=DEVICE)
    new_mask[1, 2] = 0
    out = {route: _steps(model, route, prompt, prompt_mask, new_ids, new_mask) for route in ("eager", "fused")}
    rtol = RTOL[dtype] if dtype != torch.bfloat16 else 3e-2  # bf16 logits after several rounded steps
    assert_close(f"{layer} logits", out["fused"][0].float(), out["eager"][0].float(), rtol=rtol)
    for (i, fused), eager in zip(enumerate(out["fused"][1].layers), out["eager"][1].layers):
        assert_close(f"{layer} state {i}", fused.recurrent, eager.recurrent.float(), rtol=rtol)
        for name, a, b in zip("qkv", fused.conv or (), eager.conv or ()):
            assert_close(f"{layer} conv state {name}", a.float(), b.float(), rtol=rtol)


def test_padded_new_token_leaves_the_state_bit_for_bit():
    model = _model(torch.float32, **LAYERS["gated_product2_neg"])
    set_decode_kernel(model, "fused")
    ids = torch.randint(1, VOCAB, (2, 6), device=DEVICE)
    mask = torch.ones(2, 7, dtype=torch.long, device=DEVICE)
    mask[0, -1] = 0
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        before = cache.layers[0].recurrent.clone()
        model(ids[:, :1], attention_mask=mask, past_key_values=cache)
    after = cache.layers[0].recurrent
    assert torch.equal(after[0], before[0]) and not torch.equal(after[1], before[1])


def test_fused_mixer_step_is_three_ops(monkeypatch):
    """The fused mixer step dispatches three ops: pre-norm + every input projection (one GEMV
    kernel), the fused delta-rule step, and o_proj (+ residual); the op-by-op eager step ~15x as
    many (on CUDA the eager route's norms and convs take the inference glue kernels: switched off
    here, as on the CPU)."""
    monkeypatch.setattr(fz, "_infers_on", lambda x: False)
    model = _model(torch.float32, **LAYERS["gated"])
    block = model.model.layers[0]
    mixer = block.attn
    x = torch.randn(2, 1, 32, device=DEVICE)
    mask = torch.ones(2, 1, dtype=torch.long, device=DEVICE)
    counts, outs = {}, {}
    with torch.no_grad():
        cache = model(torch.randint(1, VOCAB, (2, 6), device=DEVICE), use_cache=True).past_key_values
        for route in ("eager", "fused"):
            mixer.decode_kernel = route
            own = copy.deepcopy(cache)
            with OpCounter() as counter:
                outs[route] = mixer(x, norm=block.attn_norm, mask=mask, cache=own, residual=x)
            counts[route] = counter
    assert counts["fused"].ops == Counter({FUSED_OP: 1, GEMV_OP: 2}), counts["fused"].ops
    assert counts["eager"].ops[GEMV_OP] == 0
    assert counts["eager"].total >= 15 * counts["fused"].total, (counts["eager"].total, counts["fused"].total)
    assert_close("mixer + residual", outs["fused"], outs["eager"], rtol=1e-5)


MIXES = {
    "delta": ["delta_net"] * 2,
    "gated_swa_hybrid": ["gated_delta_net", "sliding_attention", "gated_delta_product"],
    "all": ["delta_net", "sliding_attention", "linear_attention", "full_attention", "delta_product"],
}


GREEDY_MIXES = {**MIXES, "gated": ["gated_delta_net"] * 2, "product": ["delta_product", "gated_delta_product"]}
COUNT_MIXES = {**GREEDY_MIXES, "hybrid_global": ["delta_net", "sliding_attention", "full_attention", "delta_net"]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mix", list(GREEDY_MIXES))
def test_greedy_generate_fused_equals_eager(mix, dtype):
    """Whole-model greedy decoding (left-padded batch of 3) gives identical tokens on both routes;
    the fused route runs every projection, the MLPs and the rule step in the fused kernels."""
    model = _model(dtype, layer_types=GREEDY_MIXES[mix])
    prompt = torch.randint(1, VOCAB, (3, 8), device=DEVICE)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    out = {}
    for route in ("eager", "fused"):
        set_decode_kernel(model, route)
        out[route] = model.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                    return_dict_in_generate=True, output_scores=True)
    assert torch.equal(out["fused"].sequences, out["eager"].sequences)
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    assert_close(mix, torch.stack(out["fused"].scores).float(), torch.stack(out["eager"].scores).float(), rtol=rtol)


class _PerBlock:
    """Op counts of each block's forward (an :class:`OpCounter` entered and left by module hooks)
    and of everything outside the blocks (``outside``)."""

    def __init__(self, blocks):
        self.counts = [Counter() for _ in blocks]
        self.handles = []
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(lambda m, a, i=i: self._enter(i)))
            self.handles.append(block.register_forward_hook(lambda m, a, o: self._exit()))
        self.outside = OpCounter()
        self._inner = None

    def _enter(self, i):
        self.outside.__exit__(None, None, None)
        self._inner = OpCounter().__enter__()
        self._i = i

    def _exit(self):
        self._inner.__exit__(None, None, None)
        self.counts[self._i] += self._inner.ops
        self.outside.__enter__()

    def __enter__(self):
        self.outside.__enter__()
        return self

    def __exit__(self, *exc):
        self.outside.__exit__(*exc)
        for h in self.handles:
            h.remove()


# Ops a delta-rule block's fused decode step dispatches: pre-norm + input projections, the rule
# step, o_proj + residual, MLP norm + gate/up + SwiGLU, down + residual (on CUDA: 5 kernels at these
# tests' widths; at the 340M model's, split-K GEMVs add a reduction kernel each).
FUSED_OPS_PER_DELTA_BLOCK = 5
# An attention block's captured step on the fused route: the same four GEMV ops around ONE op for
# RoPE + cache write + attention (on CUDA: 5 kernels, 6 when the slots are split: + the combine).
FUSED_OPS_PER_ATTENTION_BLOCK = 5


@pytest.mark.parametrize("mix", ["delta", "gated", "product", "gated_swa_hybrid", "hybrid_global"])
def test_captured_step_op_count(mix, monkeypatch):
    """Ops per block of the step function CUDA captures (``DecodeGraph._step``, run eagerly on CPU):
    a delta-rule block is exactly FUSED_OPS_PER_DELTA_BLOCK ops on the fused route (>= 60 eager),
    an attention block (sliding or full) FUSED_OPS_PER_ATTENTION_BLOCK: four GEMV ops and the fused
    attention step (>= 40 eager), and outside the blocks the step is embedding, positions, counters
    and ONE op for the final norm + LM head. The eager route is counted op by op (its inference glue
    kernels, CUDA only, switched off)."""
    monkeypatch.setattr(cuda_graph, "GRAPH_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(fz, "_infers_on", lambda x: False)
    types = COUNT_MIXES[mix]
    model = _model(torch.float32, layer_types=types)
    ids = torch.randint(1, VOCAB, (3, 6), device=DEVICE)
    counts = {}
    for route in ("eager", "fused"):
        set_decode_kernel(model, route)
        with torch.no_grad():
            cache = model(ids, use_cache=True).past_key_values
            graph = cuda_graph.DecodeGraph(model, cache)
            graph(ids[:, -1:])  # the first (eager) step
            with _PerBlock(model.model.layers) as per_block:
                graph._step()
        counts[route] = per_block
    fused, eager = counts["fused"], counts["eager"]
    for i, kind in enumerate(types):
        ops = fused.counts[i]
        if kind.endswith(("delta_net", "delta_product")):
            assert ops == Counter({FUSED_OP: 1, GEMV_OP: 4}), (i, kind, ops)
            assert sum(ops.values()) <= FUSED_OPS_PER_DELTA_BLOCK
            assert sum(eager.counts[i].values()) >= 60, (i, eager.counts[i])
        else:
            assert ops == Counter({GEMV_OP: 4, ATTN_OP: 1}), (i, kind, ops)
            assert sum(ops.values()) == FUSED_OPS_PER_ATTENTION_BLOCK
            assert sum(eager.counts[i].values()) >= 40, (i, eager.counts[i])
        assert eager.counts[i][GEMV_OP] == 0 and eager.counts[i][ATTN_OP] == 0
    assert fused.outside.ops[GEMV_OP] == 1 and fused.outside.total <= 8, fused.outside.ops


@pytest.mark.parametrize("route,default_on,expect", [("fused", False, 1), ("auto", False, 0), ("auto", True, 1),
                                                      ("eager", True, 0)])
def test_fused_attention_step_follows_its_default_switch(route, default_on, expect, monkeypatch):
    """The attention step of the fused route: "fused" always takes it; "auto" (where it fuses the
    projections, i.e. on CUDA: forced here) only once FUSED_ATTENTION_BY_DEFAULT is on; "eager"
    never. The GEMV projections follow the route either way."""
    from deltanet.layers import attention as attention_layer
    from deltanet.ops import decode_attention

    monkeypatch.setattr(cuda_graph, "GRAPH_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(decode_attention, "FUSED_ATTENTION_BY_DEFAULT", default_on)
    real = attention_layer.takes_fused_decode
    monkeypatch.setattr(attention_layer, "takes_fused_decode",  # "auto" as on CUDA
                        lambda kernel, x, w: kernel != "eager" and (kernel == "fused" or real("fused", x, w)))
    model = _model(torch.float32, layer_types=["sliding_attention"])
    set_decode_kernel(model, route)
    ids = torch.randint(1, VOCAB, (2, 6), device=DEVICE)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        graph = cuda_graph.DecodeGraph(model, cache)
        graph(ids[:, -1:])  # the first (eager) step
        with OpCounter() as counter:
            graph._step()
    assert counter.ops[ATTN_OP] == expect, counter.ops
    assert (counter.ops[GEMV_OP] >= 2) == (route != "eager"), counter.ops


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_captured_hybrid_fused_attention_equals_eager(dtype, monkeypatch):
    """A hybrid (delta_net + sliding + full attention, GQA) decoding greedily through the captured
    step function (eager on CPU) on the fused route, whose attention layers run the fused attention
    step against the static cache: left padding, a ring that wraps (window 5, 8 + 6 positions), a
    preallocated full-attention cache. Same tokens as the eager route (plain forwards, growing K/V)
    and as the eager route through the same static-cache step; scores within tolerance."""
    monkeypatch.setattr(cuda_graph, "GRAPH_DEVICES", ("cuda", "cpu"))
    model = _model(dtype, layer_types=["delta_net", "sliding_attention", "full_attention"], num_heads=4,
                   num_kv_heads=2, hidden_size=64, head_dim=16)
    prompt = torch.randint(1, VOCAB, (3, 8), device=DEVICE)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    mask[2, :1] = 0
    out = {}
    for name, route, graph in (("eager", "eager", False), ("eager_static", "eager", True), ("fused", "fused", True)):
        set_decode_kernel(model, route)
        model.cuda_graph_decoding = graph
        with OpCounter() as counter:
            out[name] = model.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                       return_dict_in_generate=True, output_scores=True)
        # 2 attention layers x 5 steps (CUDA: the replays of the captured step dispatch no op)
        n_attn = counter.ops[ATTN_OP]
        assert n_attn == 0 if name != "fused" else n_attn == 2 * 5 if not ON_GPU else n_attn >= 2, (name, n_attn)
    rtol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    scores = {n: torch.stack(o.scores).float() for n, o in out.items()}
    # CUDA, bf16 / fp16: the first steps only (another accumulation order may flip a near-tie later)
    n = 6 if dtype == torch.float32 or not ON_GPU else 3
    for ref in ("eager", "eager_static"):
        assert torch.equal(out["fused"].sequences[:, :8 + n], out[ref].sequences[:, :8 + n]), ref
        assert_close(f"scores vs {ref}", scores["fused"][:n], scores[ref][:n], rtol=rtol)


def test_captured_step_function_with_the_fused_route(monkeypatch):
    """``DecodeGraph._step`` (the function CUDA captures; eager on CPU) with the fused route: the
    same tokens as eager steps, and the states are updated in their own tensors (no copy-back)."""
    monkeypatch.setattr(cuda_graph, "GRAPH_DEVICES", ("cuda", "cpu"))
    model = _model(torch.float32, layer_types=MIXES["gated_swa_hybrid"])
    prompt = torch.randint(1, VOCAB, (2, 6), device=DEVICE)
    out = {}
    for route, graph in (("eager", False), ("fused", True)):
        set_decode_kernel(model, route)
        model.cuda_graph_decoding = graph
        out[route] = model.generate(prompt, max_new_tokens=7, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out["fused"].sequences, out["eager"].sequences)
    cache = out["fused"].past_key_values
    g = cache._decode_graph
    assert g.steps == 6
    for entry, rec, conv in g.recurrent:
        assert entry.recurrent is rec and all(a is b for a, b in zip(entry.conv, conv))


@pytest.mark.parametrize("route,default_on,expect", [("eager", True, False), ("auto", False, False),
                                                      ("auto", True, ON_GPU), ("fused", False, True)])
def test_decode_kernel_switch_routes_every_fused_kernel(route, default_on, expect, monkeypatch):
    """"eager" never takes a fused kernel; "auto" follows FUSED_DECODE_BY_DEFAULT (on CUDA only);
    "fused" always: the rule step and the GEMV kernels (mixer, MLP, attention) alike."""
    from deltanet.layers import delta_net

    monkeypatch.setattr(delta_net, "FUSED_DECODE_BY_DEFAULT", default_on)
    model = _model(torch.float32, layer_types=["gated_delta_net", "sliding_attention"])
    model.cuda_graph_decoding = False  # the plain forward (the graph step also fuses the LM head: 9 on CUDA)
    set_decode_kernel(model, route)
    ids = torch.randint(1, VOCAB, (2, 5), device=DEVICE)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        with OpCounter() as counter:
            model(ids[:, -1:], past_key_values=cache)
    assert counter.ops[FUSED_OP] == (1 if expect else 0), counter.ops
    assert counter.ops[GEMV_OP] == (8 if expect else 0), counter.ops  # 4 per block


def test_config_rejects_unknown_decode_kernel():
    with pytest.raises(ValueError, match="decode_kernel"):
        DeltaNetConfig(decode_kernel="triton")
    with pytest.raises(ValueError, match="decode_kernel"):
        set_decode_kernel(_model(layer_types=["delta_net"]), "fast")


# -- CUDA: kernels per step and the captured graph -----------------------------------------------------

@pytest.mark.skipif(not ON_GPU, reason="counts CUDA kernels and captures CUDA graphs")
@pytest.mark.parametrize("mix", ["delta", "gated_swa_hybrid"])
def test_cuda_kernels_per_step(mix, monkeypatch):
    """The captured loop's step, run eagerly under the profiler: one fused rule kernel per delta-rule
    layer, one fused attention kernel per attention layer, four GEMV kernels per block and one for
    the final norm + LM head, and far
    fewer kernels than the eager route; and the eager route's inference glue kernels (norms,
    SwiGLU, convs) launch fewer kernels than its op-by-op step."""
    from deltanet.bench.decode import count_step_kernels

    model = _model(torch.bfloat16, layer_types=MIXES[mix])
    glue = count_step_kernels(model, batch=2, decode_kernel="eager")["kernels"]
    monkeypatch.setattr(fz, "_infers_on", lambda x: False)  # the eager route op by op
    n_delta = sum(t != "sliding_attention" and t != "full_attention" and t != "linear_attention"
                  for t in MIXES[mix])
    n_attn = sum(t in ("sliding_attention", "full_attention") for t in MIXES[mix])
    counts = {route: count_step_kernels(model, batch=2, decode_kernel=route) for route in ("eager", "fused")}
    assert counts["fused"]["fused_kernels"] == n_delta, counts
    # the step the captured loop replays runs on the static cache: its attention layers take the fused step
    assert counts["fused"]["attention_kernels"] == n_attn and counts["eager"]["attention_kernels"] == 0, counts
    assert counts["fused"]["gemv_kernels"] == 4 * len(MIXES[mix]) + 1, counts
    assert counts["eager"]["fused_kernels"] == counts["eager"]["gemv_kernels"] == 0, counts
    assert counts["eager"]["kernels"] - counts["fused"]["kernels"] >= 50 * n_delta, counts
    assert counts["fused"]["kernels"] < glue < counts["eager"]["kernels"], (glue, counts)


@pytest.mark.skipif(not ON_GPU, reason="counts CUDA kernels")
def test_cuda_kernels_per_delta_layer():
    """CUDA kernels a delta-rule layer adds to a decode step on the fused route: 4- and 2-layer
    models differ by exactly 2 x FUSED_OPS_PER_DELTA_BLOCK kernels."""
    from deltanet.bench.decode import count_step_kernels

    k = {n: count_step_kernels(_model(torch.bfloat16, layer_types=["gated_delta_net"] * n), batch=3,
                               decode_kernel="fused")["kernels"] for n in (2, 4)}
    assert k[4] - k[2] == 2 * FUSED_OPS_PER_DELTA_BLOCK, k


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mix", list(MIXES))
def test_captured_graph_fused_equals_eager_on_cuda(mix, dtype):
    """The captured step (replayed) with the fused route against eager steps on the eager route."""
    model = _model(dtype, layer_types=MIXES[mix])
    prompt = torch.randint(1, VOCAB, (4, 33), device="cuda")
    out = {}
    for route, graph in (("eager", False), ("fused", True)):
        set_decode_kernel(model, route)
        model.cuda_graph_decoding = graph
        out[route] = model.generate(prompt, max_new_tokens=24, do_sample=False, return_dict_in_generate=True,
                                    output_scores=True)
    g = out["fused"].past_key_values._decode_graph
    assert g.graph is not None and g.steps == 23
    scores_f, scores_e = torch.stack(out["fused"].scores).float(), torch.stack(out["eager"].scores).float()
    if dtype == torch.float32:
        assert torch.equal(out["fused"].sequences, out["eager"].sequences)
        assert_close("scores", scores_f, scores_e, rtol=1e-4)
    else:  # bf16: compare the first steps (rounding may flip a near-tie later)
        assert torch.equal(out["fused"].sequences[:, :36], out["eager"].sequences[:, :36])
        assert (scores_f[1:3] - scores_e[1:3]).abs().max() < 0.05 * scores_e[1:3].abs().max()
