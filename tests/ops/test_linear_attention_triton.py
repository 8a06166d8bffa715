"""Additive linear attention on the chunk engine's Triton kernels against the float64 recurrence.

``chunk_linear_attention`` (``deltanet/ops/delta_rule/linear.py``): outputs, final states and the
gradients of q, k, v and the initial states, fixed-length and packed batches (odd and empty
documents, documents around the chunk of 64), K != V, fp32 (tight) and bf16 (against PyTorch's
chunkwise form in bf16, DESIGN's 2x rule); the layer's ``backend`` routing. CPU: the Triton
interpreter at small shapes; GPU: compiled, larger shapes.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.ops._triton_common import DEVICE, ON_GPU  # sets TRITON_INTERPRET=1 on CPU before the kernels load
from tests.utils import assert_close, linear_attention_oracle, packed_cu_seqlens

from deltanet.layers.linear_attention import linear_attention
from deltanet.ops.delta_rule.linear import chunk_linear_attention

SCALE = 0.3


def _inputs(B, T, H, K, V, N, seed):
    g = torch.Generator().manual_seed(seed)
    d = dict(generator=g, dtype=torch.float64)
    # L2-normalised keys and queries, as the layers feed them
    q = torch.nn.functional.normalize(torch.randn(B, T, H, K, **d), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, **d), dim=-1)
    v = torch.randn(B, T, H, V, **d)
    S0 = torch.randn(N, H, K, V, **d)
    do, dS = torch.randn(B, T, H, V, **d), torch.randn(N, H, K, V, **d)
    return q, k, v, S0, do, dS


def _oracle(q, k, v, S0, do, dS, lengths_per_row):
    """Float64 outputs, final states and gradients (dq, dk, dv, dS0) of ``<o, do> + <S, dS>``."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v, S0)]
    outs, finals, n0 = [], [], 0
    for b, lengths in enumerate(lengths_per_row):
        rows = [x[b:b + 1] for x in leaves[:3]]
        o, S = linear_attention_oracle(*rows, leaves[3][n0:n0 + len(lengths)], lengths, SCALE)
        outs.append(o)
        finals.append(S)
        n0 += len(lengths)
    o, S = torch.cat(outs), torch.cat(finals)
    grads = torch.autograd.grad((o * do).sum() + (S * dS).sum(), leaves)
    return o.detach(), S.detach(), grads


def _run(fn, q, k, v, S0, do, dS, dtype, **kw):
    leaves = [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)] + [S0.to(DEVICE, torch.float32).requires_grad_()]
    o, S = fn(*leaves[:3], initial_state=leaves[3], **kw)
    loss = (o.double() * do.to(DEVICE)).sum() + (S.double() * dS.to(DEVICE)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return o, S, grads


if ON_GPU:
    FIXED = [(2, 1000, 4, 128, 128), (3, 333, 2, 64, 96)]
    PACKED = {"odd": [1, 63, 64, 65, 640, 129], "empty": [0, 650, 0, 1, 130, 0]}
else:
    FIXED = [(2, 37, 2, 32, 16), (1, 130, 1, 16, 32)]
    PACKED = {"odd": [1, 63, 64, 65, 130], "empty": [0, 65, 0, 1, 70, 0]}
NAMES = ("dq", "dk", "dv", "dS0")


@pytest.mark.parametrize("shape", FIXED, ids=["B{}-T{}-H{}-K{}-V{}".format(*s) for s in FIXED])
def test_fixed_length_float32_matches_the_recurrence(shape):
    B, T, H, K, V = shape
    q, k, v, S0, do, dS = _inputs(B, T, H, K, V, B, seed=T)
    o_ref, S_ref, g_ref = _oracle(q, k, v, S0, do, dS, [[T]] * B)
    o, S, grads = _run(chunk_linear_attention, q, k, v, S0, do, dS, torch.float32, scale=SCALE,
                       output_final_state=True)
    assert o.dtype == torch.float32 and S.dtype == torch.float32 and o.shape == (B, T, H, V)
    assert_close("o", o, o_ref.to(DEVICE))
    assert_close("final state", S, S_ref.to(DEVICE))
    for name, g, gr in zip(NAMES, grads, g_ref):
        assert_close(name, g, gr.to(DEVICE))


@pytest.mark.parametrize("case", list(PACKED))
def test_packed_documents_match_each_document_alone(case):
    """Packed documents (empty ones included, their states passing through) in one call: every
    document's outputs, final state and gradients equal its own recurrence's."""
    lengths = PACKED[case]
    T, N, H, K, V = sum(lengths), len(lengths), 2, 32, 16
    q, k, v, S0, do, dS = _inputs(1, T, H, K, V, N, seed=len(lengths))
    o_ref, S_ref, g_ref = _oracle(q, k, v, S0, do, dS, [lengths])
    o, S, grads = _run(chunk_linear_attention, q, k, v, S0, do, dS, torch.float32, scale=SCALE,
                       output_final_state=True, cu_seqlens=packed_cu_seqlens(lengths, DEVICE))
    assert_close("o", o, o_ref.to(DEVICE))
    assert_close("final states", S, S_ref.to(DEVICE))
    for name, g, gr in zip(NAMES, grads, g_ref):
        assert_close(name, g, gr.to(DEVICE))


def test_bf16_within_twice_the_error_of_pytorch_in_bf16():
    """bf16 inputs (fp32 states inside): errors against the float64 recurrence within 2x those of
    the PyTorch chunkwise form run on the same bf16 inputs, for o, S and every gradient."""
    lengths = PACKED["odd"]
    T, N, H, K, V = sum(lengths), len(lengths), 2, 32, 16
    q, k, v, S0, do, dS = _inputs(1, T, H, K, V, N, seed=7)
    o_ref, S_ref, g_ref = _oracle(q, k, v, S0, do, dS, [lengths])
    cu = packed_cu_seqlens(lengths, DEVICE)
    o, S, grads = _run(chunk_linear_attention, q, k, v, S0, do, dS, torch.bfloat16, scale=SCALE,
                       output_final_state=True, cu_seqlens=cu)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    ob, Sb, gb = _run(linear_attention, q, k, v, S0, do, dS, torch.bfloat16, scale=SCALE, cu_seqlens=cu,
                      backend="torch")
    # the PyTorch form computes in float32 inside; its bf16 baseline is the rounding of its inputs
    # and output, which the Triton route shares: the floor covers the bf16 rounding of dq / dk / dv
    assert_close("o", o, o_ref.to(DEVICE), baseline=ob, floor=1e-2)
    assert_close("final states", S, S_ref.to(DEVICE), baseline=Sb, floor=1e-2)
    for name, g, gb_, gr in zip(NAMES, grads, gb, g_ref):
        assert_close(name, g, gr.to(DEVICE), baseline=gb_, floor=1e-2)


def test_without_initial_or_final_state():
    B, T, H, K, V = 2, 70, 2, 16, 16
    q, k, v, S0, do, _ = _inputs(B, T, H, K, V, B, seed=3)
    o_ref, _, g_ref = _oracle(q, k, v, torch.zeros_like(S0), do, torch.zeros_like(S0), [[T]] * B)
    leaves = [x.to(DEVICE, torch.float32).requires_grad_() for x in (q, k, v)]
    o, S = chunk_linear_attention(*leaves, scale=SCALE)
    assert S is None
    grads = torch.autograd.grad((o.double() * do.to(DEVICE)).sum(), leaves)
    assert_close("o", o, o_ref.to(DEVICE))
    for name, g, gr in zip(NAMES, grads, g_ref):
        assert_close(name, g, gr.to(DEVICE))


def test_layer_backends_agree_and_auto_routes_by_device(monkeypatch):
    """``linear_attention(backend=...)``: the Triton and PyTorch forms agree (float32, packed,
    with states); ``auto`` takes Triton for CUDA tensors only; a one-token step and float64 stay
    on PyTorch."""
    lengths = PACKED["odd"]
    T, N, H, K, V = sum(lengths), len(lengths), 2, 32, 16
    q, k, v, S0, _, _ = _inputs(1, T, H, K, V, N, seed=11)
    args = [x.to(DEVICE, torch.float32) for x in (q, k, v)]
    cu = packed_cu_seqlens(lengths, DEVICE)
    ot, St = linear_attention(*args, initial_state=S0.to(DEVICE, torch.float32), cu_seqlens=cu, backend="triton")
    op, Sp = linear_attention(*args, initial_state=S0.to(DEVICE, torch.float32), cu_seqlens=cu, backend="torch")
    assert_close("o (triton vs torch)", ot, op.double())
    assert_close("states (triton vs torch)", St, Sp.double())
    calls = []
    lin = importlib.import_module("deltanet.ops.delta_rule.linear")  # (ops.delta_rule is also a function)
    real = lin.chunk_linear_attention
    monkeypatch.setattr(lin, "chunk_linear_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    linear_attention(*args, cu_seqlens=cu)
    assert calls == ([1] if ON_GPU else [])
    linear_attention(*(x[:, :1] for x in args))  # one token: the recurrence
    linear_attention(*(x[:, :5].double() for x in args))  # float64: PyTorch
    assert calls == ([1] if ON_GPU else [])
    linear_attention(*args, cu_seqlens=cu, backend="triton")
    assert calls == ([1, 1] if ON_GPU else [1])


def test_bad_inputs_are_named():
    x = torch.randn(1, 8, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="backend"):
        linear_attention(x, x, x, backend="cuda")
    with pytest.raises(ValueError, match="head dims"):
        big = torch.randn(1, 8, 1, 300, device=DEVICE)
        chunk_linear_attention(big, big, big)
    with pytest.raises(ValueError, match="v must have shape"):
        chunk_linear_attention(x, x, torch.randn(1, 7, 2, 16, device=DEVICE))
    with pytest.raises(ValueError, match="B == 1"):
        chunk_linear_attention(torch.randn(2, 8, 2, 16, device=DEVICE), torch.randn(2, 8, 2, 16, device=DEVICE),
                               torch.randn(2, 8, 2, 16, device=DEVICE), cu_seqlens=torch.tensor([0, 3, 8], device=DEVICE))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        chunk_linear_attention(x, x, x, initial_state=torch.zeros(1, 2, 16, 8, device=DEVICE))


def test_linear_attention_model_trains_the_same_on_both_backends(monkeypatch):
    """A model of linear-attention (and delta-rule) layers: one packed training step's loss and
    every parameter gradient with ``delta_backend="triton"`` (each linear-attention layer one call
    of the Triton op, with the documents) equal the PyTorch forms' (float32)."""
    from deltanet.models import DeltaNetForCausalLM, get_config

    lin = importlib.import_module("deltanet.ops.delta_rule.linear")
    real, calls = lin.chunk_linear_attention, []
    monkeypatch.setattr(lin, "chunk_linear_attention",
                        lambda *a, **kw: calls.append(kw["cu_seqlens"] is not None) or real(*a, **kw))

    ids = torch.randint(3, 64, (1, 90), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    cu = torch.tensor([0, 20, 85, 90], device=DEVICE)  # three documents
    out = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        cfg = get_config("tiny", vocab_size=64, delta_backend=backend,
                         layer_types=["linear_attention", "delta_net", "linear_attention", "linear_attention"])
        model = DeltaNetForCausalLM(cfg).to(DEVICE)
        loss = model(input_ids=ids, labels=ids, cu_seqlens=cu).loss
        loss.backward()
        out[backend] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    assert calls == [True] * 3, calls  # the triton model's three layers; the torch model's none
    assert_close("loss", out["triton"][0], out["torch"][0].double())
    for name, g in out["triton"][1].items():
        assert_close(name, g, out["torch"][1][name].double(), rtol=1e-4)
