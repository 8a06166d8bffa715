"""The DeltaNet mixer against a direct implementation through the reference op (float64)."""

import pytest
import torch
import torch.nn.functional as F

from deltanet.layers import DeltaNetMixer
from deltanet.models import DeltaNetCache, DeltaNetConfig
from deltanet.ops import delta_product_reference, delta_rule_reference
from tests.utils import assert_close

ABLATIONS = {
    "paper": {},
    "no_conv": dict(use_short_conv=False),
    "relu_sum": dict(qk_activation="relu", qk_norm="sum"),
    "elu_sum": dict(qk_activation="elu", qk_norm="sum"),
    "identity_l2": dict(qk_activation="identity"),
    "no_beta": dict(use_beta=False),
    "neg_eigval": dict(allow_neg_eigval=True),
    "output_gate": dict(use_output_gate=True),
    "gated": dict(layer_types=["gated_delta_net"]),
    "gated_product3_neg": dict(layer_types=["gated_delta_product"], num_householder=3, allow_neg_eigval=True),
    "product2": dict(layer_types=["delta_product"], num_householder=2),
    "product3_neg": dict(layer_types=["delta_product"], num_householder=3, allow_neg_eigval=True),
    "gated_sigmoid_gate": dict(layer_types=["gated_delta_net"], output_gate_activation="sigmoid"),
    "output_gate_sigmoid": dict(use_output_gate=True, output_gate_activation="sigmoid"),
}


def _config(**kw):
    base = dict(vocab_size=32, hidden_size=24, num_hidden_layers=1, num_heads=3, head_dim=6,
                delta_backend="torch")
    return DeltaNetConfig(**{**base, **kw})


def _direct(layer: DeltaNetMixer, x: torch.Tensor, gate_act=F.silu) -> torch.Tensor:
    """The paper's mixer written out by hand: F.conv1d for the short conv, the reference op;
    ``gate_act``: the output gate's activation."""
    B, T, _ = x.shape
    H, D = layer.num_heads, layer.head_dim

    def conv(y, mod, act):
        if not layer.use_short_conv:
            return y
        w = mod.weight[:, None, :]  # [C, 1, W] depthwise
        y = F.conv1d(F.pad(y.transpose(1, 2), (mod.kernel_size - 1, 0)), w, groups=y.shape[-1]).transpose(1, 2)
        return F.silu(y) if act else y

    silu_qk = layer.qk_activation == "silu"
    q = conv(layer.q_proj(x), getattr(layer, "q_conv", None), silu_qk)
    k = conv(layer.k_proj(x), getattr(layer, "k_conv", None), silu_qk)
    v = conv(layer.v_proj(x), getattr(layer, "v_conv", None), True)
    if not layer.use_short_conv:  # the paper's activations, applied after the projections
        q, k = (F.silu(q), F.silu(k)) if silu_qk else (q, k)
        v = F.silu(v)
    n = layer.num_householder
    q = q.view(B, T, H, D)
    k, v = (t.view(B, T, n, H, D) for t in (k, v))  # the projections hold the n steps outermost
    act = {"relu": F.relu, "elu": lambda t: F.elu(t) + 1}.get(layer.qk_activation, lambda t: t)
    q, k = act(q), act(k)
    if layer.qk_norm == "l2":
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    else:
        # relu features can be all zero: they stay zero (no division by zero)
        q, k = (torch.where(t.sum(-1, keepdim=True) > 0, t / t.sum(-1, keepdim=True), 0.0) for t in (q, k))
    beta = torch.sigmoid(layer.b_proj(x)).view(B, T, n, H) if layer.use_beta else torch.ones(B, T, n, H, dtype=x.dtype)
    if layer.allow_neg_eigval:
        beta = 2 * beta
    if layer.gated:  # Gated DeltaNet's decay: g = -exp(A_log) softplus(W_a x + dt_bias)
        g = -layer.A_log.exp() * F.softplus(layer.a_proj(x) + layer.dt_bias)
        o, _ = delta_product_reference(q, k, v, beta, g=g)
    elif n > 1:  # DeltaProduct without a forget gate: n Householder steps per token, no decay
        o, _ = delta_product_reference(q, k, v, beta)
    else:
        o, _ = delta_rule_reference(q, k[:, :, 0], v[:, :, 0], beta[:, :, 0])
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.o_norm.eps) * layer.o_norm.weight
    if layer.use_output_gate:
        o = o * gate_act(layer.g_proj(x).view(B, T, H, D))
    return layer.o_proj(o.reshape(B, T, H * D))


@pytest.mark.parametrize("ablation", list(ABLATIONS), ids=list(ABLATIONS))
def test_mixer_matches_direct_implementation(ablation):
    layer = DeltaNetMixer(_config(**ABLATIONS[ablation]), layer_idx=0).double()
    with torch.no_grad():  # a non-trivial norm weight, so a missing norm scale would show
        layer.o_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 70, 24, dtype=torch.float64)
    gate_act = torch.sigmoid if ABLATIONS[ablation].get("output_gate_activation") == "sigmoid" else F.silu
    assert_close(ablation, layer(x), _direct(layer, x, gate_act))


def test_mixer_gradients_match_direct_implementation():
    layer = DeltaNetMixer(_config(), layer_idx=0).double()
    x = torch.randn(1, 40, 24, dtype=torch.float64, requires_grad=True)
    (layer(x) ** 2).sum().backward()
    ours = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    (_direct(layer, x) ** 2).sum().backward()
    theirs = [x.grad] + [p.grad for p in layer.parameters()]
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(f"grad {i}", a, b, rtol=1e-9)


def test_gated_decay_initialisation():
    """A ~ U(0, 16), softplus(dt_bias) = dt log-uniform in [1e-3, 0.1]: decays in (-1.6, 0]."""
    layer = DeltaNetMixer(_config(num_heads=64, head_dim=2, hidden_size=128, layer_types=["gated_delta_net"]), 0)
    A, dt = layer.A_log.exp(), F.softplus(layer.dt_bias)
    assert 0 < A.min() and A.max() <= 16 and A.std() > 2
    assert 1e-3 * 0.999 <= dt.min() and dt.max() <= 0.1 * 1.001
    g = layer._decay(torch.randn(2, 5, 64))
    assert g.dtype == torch.float32 and (g <= 0).all()
    assert layer.use_output_gate and not hasattr(DeltaNetMixer(_config(), 0), "A_log")


@pytest.mark.parametrize("A_range", [(2.0, 3.0), (0.0, 0.16)])
def test_gated_decay_initialisation_range(A_range):
    """``A_init_range``: A ~ U(low, high) per head (the default (0, 16) is tested above); the
    Hugging Face initialisation of a whole model honours it too."""
    from deltanet.models import DeltaNetForCausalLM

    cfg = _config(num_heads=64, head_dim=2, hidden_size=128, layer_types=["gated_delta_net"], A_init_range=A_range)
    for layer in (DeltaNetMixer(cfg, 0), DeltaNetForCausalLM(cfg).model.layers[0].attn):
        A = layer.A_log.exp()
        lo, hi = A_range
        assert max(lo, 1e-4) * 0.999 <= A.min() and A.max() <= hi * 1.001
        assert A.max() - A.min() > 0.5 * (hi - lo)  # drawn over the range, not a constant


def test_sigmoid_gate_decodes_and_keeps_off_the_fused_kernel():
    """The fused decode kernel gates with silu: a sigmoid-gated layer decodes eagerly (even with
    ``decode_kernel="fused"``), and its decode steps match the full forward."""
    cfg = _config(layer_types=["gated_delta_net"], output_gate_activation="sigmoid", decode_kernel="fused")
    layer = DeltaNetMixer(cfg, layer_idx=0).double()
    x = torch.randn(1, 9, 24, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        cache = DeltaNetCache(cfg)
        outs = [layer(x[:, :4], cache=cache)]
        assert not layer.uses_fused_decode(x[:, 4:5].float(), True)
        outs += [layer(x[:, t:t + 1], cache=cache) for t in range(4, 9)]
    assert_close("decoded", torch.cat(outs, 1), y)
    silu = DeltaNetMixer(_config(layer_types=["gated_delta_net"], decode_kernel="fused"), 0)
    with torch.no_grad():
        assert silu.uses_fused_decode(x[:, :1].float(), True)


def test_ungated_product_layer():
    """``delta_product`` has no decay parameters, n_h keys / values / betas per token, and with
    n_h = 1 computes exactly ``delta_net`` (same weights, same outputs)."""
    prod = DeltaNetMixer(_config(layer_types=["delta_product"], num_householder=3), 0)
    assert not prod.gated and not hasattr(prod, "A_log") and not hasattr(prod, "a_proj")
    assert prod.num_householder == 3 and prod.k_proj.out_features == 3 * 18 and prod.b_proj.out_features == 9
    for extra in ({}, dict(allow_neg_eigval=True, use_output_gate=True)):
        one = DeltaNetMixer(_config(layer_types=["delta_product"], num_householder=1, **extra), 0).double()
        plain = DeltaNetMixer(_config(**extra), 0).double()
        plain.load_state_dict(one.state_dict())  # strict: the same parameters
        x = torch.randn(2, 30, 24, dtype=torch.float64)
        assert_close("n_h = 1 vs delta_net", one(x), plain(x))


@pytest.mark.parametrize("kind", ["gated_delta_net", "gated_delta_product", "delta_product"])
def test_gated_padding_and_decoding(kind):
    """Padded tokens neither write nor decay the state; decode steps match the full forward."""
    cfg = _config(layer_types=[kind])
    layer = DeltaNetMixer(cfg, layer_idx=0).double()
    x = torch.randn(1, 9, 24, dtype=torch.float64)
    padded = torch.cat([torch.randn(1, 5, 24, dtype=torch.float64) * 100, x], dim=1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 9)], dim=1)
    c1, c2 = DeltaNetCache(cfg), DeltaNetCache(cfg)
    y = layer(x, cache=c1)
    assert_close("padded", layer(padded, mask=mask, cache=c2)[:, 5:], y)
    assert_close("state", c2.layers[0].recurrent, c1.layers[0].recurrent)
    cache = DeltaNetCache(cfg)
    outs = [layer(x[:, :4], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(4, 9)]
    assert_close("decoded", torch.cat(outs, 1), y)


def test_padding_leaves_the_state_untouched():
    """Left padding: beta = 0 and zero conv input on padded tokens -> same outputs and state."""
    cfg = _config()
    layer = DeltaNetMixer(cfg, layer_idx=0).double()
    x = torch.randn(1, 9, 24, dtype=torch.float64)
    padded = torch.cat([torch.randn(1, 5, 24, dtype=torch.float64) * 100, x], dim=1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 9)], dim=1)
    c1, c2 = DeltaNetCache(cfg), DeltaNetCache(cfg)
    y = layer(x, cache=c1)
    yp = layer(padded, mask=mask, cache=c2)
    assert_close("outputs", yp[:, 5:], y)
    assert_close("state", c2.layers[0].recurrent, c1.layers[0].recurrent)
    for a, b in zip(c2.layers[0].conv, c1.layers[0].conv):
        assert_close("conv state", a, b)


def test_decode_step_uses_the_recurrent_form_and_matches():
    cfg = _config()
    layer = DeltaNetMixer(cfg, layer_idx=0).double()
    x = torch.randn(2, 12, 24, dtype=torch.float64)
    full = layer(x)
    cache = DeltaNetCache(cfg)
    outs = [layer(x[:, :5], cache=cache)]
    for t in range(5, 12):
        outs.append(layer(x[:, t:t + 1], cache=cache))
    assert_close("decoded", torch.cat(outs, dim=1), full)


@pytest.mark.parametrize("ablation", ["paper", "no_conv", "output_gate", "gated_product3_neg"])
def test_recomputed_inputs_and_fused_norm_give_the_same_gradients(ablation):
    from deltanet.layers import RMSNorm

    torch.manual_seed(0)
    cfg = _config(**ABLATIONS[ablation])
    layer = DeltaNetMixer(cfg, layer_idx=0).double()
    norm = RMSNorm(cfg.hidden_size).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
    x = torch.randn(2, 9, cfg.hidden_size, dtype=torch.float64)
    mask = torch.ones(2, 9)
    mask[1, :3] = 0  # left padding goes through the checkpointed region too
    params = [x] + list(layer.parameters()) + list(norm.parameters())

    def grads(recompute, fused_norm):
        layer.recompute_inputs = recompute
        xi = x.clone().requires_grad_()
        y = layer(xi, norm=norm, mask=mask) if fused_norm else layer(norm(xi), mask=mask)
        y.pow(2).sum().backward()
        out = [y.detach(), xi.grad] + [p.grad.clone() for p in params[1:]]
        for p in params[1:]:
            p.grad = None
        return out

    plain = grads(False, False)
    for recompute in (False, True):
        for a, b in zip(grads(recompute, True), plain):
            assert_close(f"recompute={recompute}", a, b)


class _SavesItsInputs(torch.autograd.Function):
    """The delta rule as the Triton op keeps it for backward: its inputs q, k, v, beta as given
    (the torch backend's autograd keeps products of them instead). Backward reruns the torch
    backend with autograd."""

    @staticmethod
    def forward(ctx, q, k, v, beta):
        ctx.save_for_backward(q, k, v, beta)
        with torch.no_grad():
            return delta_rule_torch(q, k, v, beta)[0]

    @staticmethod
    def backward(ctx, do):
        inputs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad():
            o = delta_rule_torch(*inputs)[0]
        return torch.autograd.grad(o, inputs, do)


def delta_rule_saving_inputs(q, k, v, beta, *, g=None, initial_state=None, output_final_state=False,
                             cu_seqlens=None, backend=None):
    """Stand-in for ``deltanet.layers.delta_net.delta_rule`` (plain rule, training batches)."""
    assert g is None and initial_state is None and cu_seqlens is None and not output_final_state
    return _SavesItsInputs.apply(q, k, v, beta), None


def delta_rule_torch(q, k, v, beta):
    from deltanet.ops import delta_rule

    return delta_rule(q, k, v, beta, backend="torch")


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn()`` runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("ablation", ["paper", "no_conv", "identity_l2", "gated", "gated_product3_neg", "product2"])
@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
def test_recomputed_features_keep_less_and_give_the_same_gradients(ablation, packed):
    """``recompute_features``: q, k, v are not kept for the delta rule (rerun from the conv inputs
    in backward); outputs and every gradient equal the default path's exactly (float64)."""
    _check_recomputed_features(ablation, packed)


@pytest.mark.parametrize("ablation", ["paper", "no_conv", "neg_eigval"])
def test_recomputed_features_with_an_op_that_keeps_its_inputs(ablation, monkeypatch):
    """As the Triton op does on the GPU: the op's saved q, k, v become recipes (rerun on
    unpack), and nothing of q, k, v stays; same outputs and gradients."""
    import deltanet.layers.delta_net as mod

    monkeypatch.setattr(mod, "delta_rule", delta_rule_saving_inputs)
    _check_recomputed_features(ablation, False, all_of_qkv=True)


def _check_recomputed_features(ablation, packed, all_of_qkv=False):
    torch.manual_seed(0)
    cfg = _config(**ABLATIONS[ablation])
    layer = DeltaNetMixer(cfg, layer_idx=0).double()
    B, T = (1, 23) if packed else (2, 9)
    cu = torch.tensor([0, 5, 6, 23]) if packed else None
    x = torch.randn(B, T, cfg.hidden_size, dtype=torch.float64)

    def run(recompute):
        layer.recompute_features = recompute
        xi = x.clone().requires_grad_()
        y, saved = _saved_bytes(lambda: layer(xi, cu_seqlens=cu))
        y.pow(2).sum().backward()
        out = [y.detach(), xi.grad] + [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad(set_to_none=True)
        return out, saved

    (want, kept), (got, kept_less) = run(False), run(True)
    for name, a, b in zip(["y", "dx"] + [n for n, _ in layer.named_parameters()], got, want):
        assert torch.equal(a, b), name
    # at least q and k after the L2 norm are no longer kept (the torch backend saves products of v
    # rather than v itself); with an op that keeps its inputs, v too
    n_h = layer.num_householder
    qkv = B * T * layer.num_heads * layer.head_dim * (1 + n_h + (n_h if all_of_qkv else 0)) * 8  # float64
    assert kept - kept_less >= qkv, (kept, kept_less, qkv)


@pytest.mark.parametrize("mode", ["mixer", "block"])
def test_recomputed_features_under_activation_checkpointing(mode, monkeypatch):
    """The region's saved-tensor hooks nest inside torch.utils.checkpoint's: same loss and
    gradients as without checkpointing, with the features kept or rerun."""
    import deltanet.layers.delta_net as mod
    from deltanet.models import DeltaNetForCausalLM

    monkeypatch.setattr(mod, "delta_rule", delta_rule_saving_inputs)
    ids = torch.randint(0, 32, (2, 12))

    def grads(ckpt, features):
        monkeypatch.setattr(DeltaNetMixer, "recompute_features", features)
        torch.manual_seed(0)
        model = DeltaNetForCausalLM(_config(num_hidden_layers=2, activation_checkpointing=ckpt)).double().train()
        model(ids, labels=ids).loss.backward()
        return [p.grad for p in model.parameters()]

    want = grads("none", False)
    for features in (False, True):
        for a, b in zip(grads(mode, features), want):
            assert torch.equal(a, b)
