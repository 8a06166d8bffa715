"""Which calls go through ``torch.compile`` or the Triton short conv on CUDA, checked on CPU.

On the H200 an eager fp32 elementwise chain in the training path cost deltanet-340m 45% of its
speed (results/2026-11-30-h200-x2-model.md) while every CPU test passed. These tests pretend the
tensors are on CUDA (``_fused._compiles_on`` patched to accept any device), replace ``torch.compile``
by a recorder and the Triton ``short_conv`` (``layers/conv.py``) by a recording stand-in, then check
that a training step routes the elementwise glue -- including the no-autograd forward of the
recomputed mixer input region -- through the compiled wrappers and the short conv through Triton
(or, with ``DELTANET_CONV=torch`` or without Triton, through the compiled ``_padded_conv``), and
that inference (decoding) stays eager.
"""

from __future__ import annotations

import pytest
import torch

import deltanet.layers._fused as fz
import deltanet.layers.conv as conv_mod
from deltanet.layers.delta_net import DeltaNetMixer
from deltanet.models import DeltaNetForCausalLM, get_config


@pytest.fixture
def compile_log(monkeypatch):
    """``[(function name, grad enabled)]`` for every call that would have run compiled."""
    log = []

    def recorder(fn, *args, **kwargs):
        def run(*a, **kw):
            log.append((fn.__name__, torch.is_grad_enabled()))
            return fn(*a, **kw)
        return run

    monkeypatch.setattr(torch, "compile", recorder)
    for wrapper in fz.REGISTRY:  # compiled versions are made on first use: start without any
        monkeypatch.setattr(wrapper, "compiled", None)
    monkeypatch.setattr(fz, "_compiles_on", lambda x: True)  # every device counts as CUDA

    def short_conv(x, weight, doc_pos, silu):  # stands in for the Triton kernels (CUDA only)
        log.append(("short_conv", torch.is_grad_enabled()))
        return conv_mod._padded_conv.eager(x, weight, doc_pos, silu)

    monkeypatch.setattr(conv_mod, "_triton_short_conv", lambda: short_conv)
    monkeypatch.delenv("DELTANET_CONV", raising=False)
    yield log


def _model():
    torch.manual_seed(0)
    return DeltaNetForCausalLM(get_config("tiny", vocab_size=64, delta_backend="torch"))


@pytest.mark.parametrize("conv", ["triton", "torch", "no-triton"])
@pytest.mark.parametrize("recompute", [False, True])
def test_training_step_runs_the_glue_compiled(compile_log, monkeypatch, recompute, conv):
    monkeypatch.setattr(DeltaNetMixer, "recompute_inputs", recompute)
    monkeypatch.setattr(DeltaNetMixer, "recompute_features", False)  # its routing: the test below
    if conv == "torch":
        monkeypatch.setenv("DELTANET_CONV", "torch")
    elif conv == "no-triton":
        monkeypatch.setattr(conv_mod, "_triton_short_conv", lambda: None)
    conv_name, other = ("short_conv", "_padded_conv") if conv == "triton" else ("_padded_conv", "short_conv")
    model = _model().train()
    ids = torch.randint(0, 64, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    names = {name for name, _ in compile_log}
    # the fused norm + projections and the SwiGLU + down projection: their elementwise parts
    # (_norm_*, _swiglu*) compiled, the Functions eager
    assert {"_norm_fwd", "_norm_apply", "_norm_bwd", conv_name, "l2_norm", "_swiglu", "_swiglu_bwd",
            "rms_norm"} <= names, names
    assert other not in names, names
    if recompute:
        # the input region's forward runs without autograd and must still be compiled ...
        no_grad = {name for name, grad in compile_log if not grad}
        assert {"_norm_fwd", conv_name} <= no_grad, compile_log
        # ... and its rerun in backward too
        assert (conv_name, True) in compile_log
    else:  # only the autograd-free parts inside the norm's and the SwiGLU's Functions run without autograd
        assert all(grad or name.startswith(("_norm_", "_swiglu")) for name, grad in compile_log), compile_log
    assert fz._FORCE is False  # restored after the recomputing forward


def test_conv_switch_rejects_unknown_values(compile_log, monkeypatch):
    monkeypatch.setenv("DELTANET_CONV", "cuda")
    x = torch.randn(1, 4, 2, requires_grad=True)
    with pytest.raises(ValueError, match="DELTANET_CONV"):
        conv_mod.padded_conv(x, torch.ones(2, 4), None, True)


def test_float64_conv_keeps_the_compiled_path(compile_log):
    x = torch.randn(1, 4, 2, dtype=torch.float64, requires_grad=True)
    conv_mod.padded_conv(x, torch.ones(2, 4, dtype=torch.float64), None, True)
    assert compile_log == [("_padded_conv", True)]


def test_inference_stays_eager(compile_log):
    model = _model().eval()
    ids = torch.randint(3, 64, (1, 8))
    with torch.no_grad():
        model(input_ids=ids)
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert compile_log == []


def test_recomputed_features_run_compiled_forward_and_in_backward(compile_log, monkeypatch):
    """``recompute_features``: the conv + q/k norm region runs compiled without autograd in the
    forward; in backward one compiled rerun with autograd serves both the delta rule's unpack of
    q, k, v and the region's own backward (three convs per layer, not six)."""
    import deltanet.layers.delta_net as mixer_mod
    from tests.layers.test_delta_net import delta_rule_saving_inputs

    monkeypatch.setattr(DeltaNetMixer, "recompute_features", True)
    monkeypatch.setattr(mixer_mod, "delta_rule", delta_rule_saving_inputs)  # keeps q, k, v as the Triton op
    model = _model().train()
    ids = torch.randint(0, 64, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    forward = list(compile_log)
    assert ("short_conv", False) in forward and ("l2_norm", False) in forward, forward
    assert ("short_conv", True) not in forward
    loss.backward()
    backward = compile_log[len(forward):]
    assert ("short_conv", False) not in backward, backward
    assert backward.count(("short_conv", True)) == 3 * model.config.num_hidden_layers, backward
    assert ("l2_norm", True) in backward, backward
    assert fz._FORCE is False


def _region_model(w):
    def f(x):
        a = x * 2
        region = fz.RecomputedRegion(lambda t: ((t * w).sin(),), (a,), [w])
        (y,) = region.outputs
        with region.consumers():
            return y * y
    return f


def test_recomputed_region_inputs_go_through_saved_tensor_hooks():
    """What a region keeps (its inputs) is packed by the saved-tensor hooks active when it is built,
    as any saved tensor: ``save_on_cpu`` and counting hooks see it, and a checkpoint around the
    region drops it and recomputes it (gradients unchanged)."""
    from torch.utils.checkpoint import checkpoint

    w = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    f = _region_model(w)
    f(x).sum().backward()
    ref = (x.grad.clone(), w.grad.clone())
    packed = []

    def pack(t):
        packed.append(tuple(t.shape))
        return t

    for run in ("hooks", "checkpoint"):
        x.grad = w.grad = None
        if run == "hooks":
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = f(x)
            assert packed == [(4, 3)]  # the region's input; its outputs' consumers save recipes
        else:
            out = checkpoint(f, x, use_reentrant=False)
        out.sum().backward()
        torch.testing.assert_close(x.grad, ref[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(w.grad, ref[1], rtol=1e-12, atol=0)


# Where the inference-routing tests run: CUDA where there is one (compiled kernels), else the CPU
# with the Triton interpreter (the CPU suite's conftest sets TRITON_INTERPRET=1).
GLUE_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def glue_log(monkeypatch):
    """CUDA inference routing, on ``GLUE_DEVICE``: on the CPU ``_fused._infers_on`` accepts any
    device, so no-grad calls take the forward-only Triton kernels (``deltanet.ops.glue``, run by the
    interpreter) and the Triton short conv; every call is recorded as ``(kernel, grad enabled)``."""
    from deltanet.ops import glue

    log = []
    for name in ("row_norm", "swiglu", "rope"):
        real = getattr(glue, name)

        def recorded(*a, _real=real, _name=name, **kw):
            log.append((f"{_name}:{kw.get('kind', 'rms')}" if _name == "row_norm" else _name, torch.is_grad_enabled()))
            return _real(*a, **kw)

        monkeypatch.setattr(glue, name, recorded)
    real_conv = conv_mod._triton_short_conv

    def short_conv_recorded():
        kernel = real_conv()

        def run(*a):
            log.append(("short_conv", torch.is_grad_enabled()))
            return kernel(*a)
        return run

    monkeypatch.setattr(conv_mod, "_triton_short_conv", short_conv_recorded)
    monkeypatch.delenv("DELTANET_CONV", raising=False)
    if GLUE_DEVICE.type == "cpu":  # on a GPU the real rule (CUDA tensors) holds
        monkeypatch.setattr(fz, "_infers_on", lambda x: True)
    yield log


INFERENCE_MIXES = {"delta": None, "gated+swa": ["gated_delta_net", "sliding_attention", "delta_net", "linear_attention"]}


def _inference_model(mix):
    torch.manual_seed(0)
    kw = {} if INFERENCE_MIXES[mix] is None else dict(layer_types=INFERENCE_MIXES[mix], sliding_window=4)
    return DeltaNetForCausalLM(get_config("tiny", vocab_size=64, delta_backend="torch", **kw)).to(GLUE_DEVICE).eval()


@pytest.mark.parametrize("mix", list(INFERENCE_MIXES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inference_takes_the_glue_kernels(glue_log, monkeypatch, mix, dtype):
    """A no-grad forward (a prefill) runs every norm, the SwiGLU product, the short convs and the
    rotary embedding of q and k as one Triton kernel each, with the logits of the eager code (up to a sum's order); generation with
    them gives the eager tokens."""
    model = _inference_model(mix).to(dtype)
    cfg = model.config
    ids = torch.randint(3, 64, (2, 9), device=GLUE_DEVICE)
    with torch.no_grad():
        monkeypatch.setattr(fz, "_infers_on", lambda x: False)
        ref = model(input_ids=ids).logits
        ref_tokens = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert glue_log == []
        monkeypatch.setattr(fz, "_infers_on", lambda x: True)
        got = model(input_ids=ids).logits
    kinds = [name for name, _ in glue_log]
    assert all(not grad for _, grad in glue_log)
    L = cfg.num_hidden_layers
    delta = sum(t in ("delta_net", "gated_delta_net") for t in cfg.layer_types)
    # the blocks' two pre-norms and the final norm; per delta-rule layer the output norm (gated
    # or not) and the q / k L2 norms and its three convs; every MLP's product
    assert kinds.count("row_norm:rms") >= 2 * L + 1 + delta, kinds
    assert kinds.count("row_norm:l2") >= 2 * delta, kinds
    assert kinds.count("swiglu") == L, kinds
    assert kinds.count("short_conv") >= 3 * delta, kinds
    assert kinds.count("rope") == 2 * sum("attention" in t and t != "linear_attention" for t in cfg.layer_types), kinds
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got.float(), ref.float(), **tol)
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    if dtype == torch.float32:
        assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("recompute", ["features", "inputs", "none"])
def test_training_never_takes_the_glue_kernels(glue_log, monkeypatch, recompute):
    """With autograd (and in the no-grad forward of a recomputed region, which its rerun in backward
    must match) the glue stays on the training path."""
    monkeypatch.setattr(DeltaNetMixer, "recompute_features", recompute == "features")
    monkeypatch.setattr(DeltaNetMixer, "recompute_inputs", recompute == "inputs")
    model = _inference_model("gated+swa").train()
    ids = torch.randint(3, 64, (2, 9), device=GLUE_DEVICE)
    model(input_ids=ids, labels=ids).loss.backward()
    assert [name for name, _ in glue_log if name != "short_conv"] == [], glue_log
    convs = [grad for name, grad in glue_log if name == "short_conv"]
    if GLUE_DEVICE.type == "cpu":
        # CPU training takes the recomputing PyTorch conv, and so does the recomputed region's forward
        assert convs == [], glue_log
    else:
        # CUDA training's conv is the Triton kernel (logged with grad enabled); the no-grad forward of
        # a recomputed region takes that same kernel, matched by its rerun in backward
        assert any(convs), glue_log  # training took the Triton conv (grad enabled)
        assert convs.count(False) <= convs.count(True), glue_log


def test_float64_inference_stays_eager(glue_log):
    model = _inference_model("delta").double()
    with torch.no_grad():
        model(input_ids=torch.randint(3, 64, (1, 6), device=GLUE_DEVICE))
    assert glue_log == []


def test_rope_with_position_ids_broadcast_over_the_batch(glue_log):
    """``position_ids`` of one row for a batch of several (allowed by the eager rotation) stays on the
    eager code; per-row positions take the kernel. Same values either way."""
    from deltanet.layers.attention import apply_rope

    x = torch.randn(3, 5, 2, 8, device=GLUE_DEVICE)
    pos = torch.arange(5, device=GLUE_DEVICE)[None]
    with torch.no_grad():
        one = apply_rope(x, pos, 1e4)
        assert glue_log == []
        per_row = apply_rope(x, pos.expand(3, 5), 1e4)
        assert glue_log == [("rope", False)]
    torch.testing.assert_close(one, per_row, rtol=1e-6, atol=1e-6)


def test_inference_mode_takes_the_glue_kernels(glue_log):
    """``torch.inference_mode`` (as ``deltanet eval`` and serving code use) routes like ``no_grad``."""
    model = _inference_model("delta")
    ids = torch.randint(3, 64, (1, 6), device=GLUE_DEVICE)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    n = len(glue_log)
    assert n > 0
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    assert len(glue_log) == 2 * n
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
