"""Short conv, attention op, linear attention, RoPE, RMSNorm against plain formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from deltanet.layers import RMSNorm, ShortConvolution, apply_rope, linear_attention
from deltanet.layers.conv import positions_in_documents
from deltanet.ops.attention import causal_attention
from tests.utils import assert_close, linear_attention_oracle, packed_cu_seqlens


# ---- short convolution -------------------------------------------------------------------

def test_short_conv_matches_conv1d():
    conv = ShortConvolution(6, kernel_size=4, activation=None).double()
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    expected = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.weight[:, None], groups=6).transpose(1, 2)
    assert_close("conv", conv(x)[0], expected)


def test_short_conv_state_continues_the_sequence():
    conv = ShortConvolution(5, kernel_size=4).double()
    x = torch.randn(3, 10, 5, dtype=torch.float64)
    full, _ = conv(x)
    y1, state = conv(x[:, :2], output_state=True)  # fewer tokens than the kernel
    ys = [y1]
    for t in range(2, 10):
        y, state = conv(x[:, t:t + 1], state, output_state=True)
        ys.append(y)
    assert_close("stepwise", torch.cat(ys, 1), full)


@pytest.mark.parametrize("kernel_size", [2, 4])
@pytest.mark.parametrize("prompt", [1, 3, 4, 7])
def test_short_conv_prefill_state_then_chunk_then_steps(prompt, kernel_size):
    """A fresh prefill (the training conv, then its last W - 1 inputs as the state; zeros before a
    prompt shorter than that), a multi-token continuation from the state, then single steps: the
    full sequence's conv, and the state is always the last W - 1 inputs."""
    conv = ShortConvolution(5, kernel_size=kernel_size).double()
    x = torch.randn(2, 12, 5, dtype=torch.float64)
    full, _ = conv(x)
    y0, state = conv(x[:, :prompt], output_state=True)
    padded = F.pad(x, (0, 0, kernel_size - 1, 0))
    assert_close("prefill state", state, padded[:, prompt: prompt + kernel_size - 1])
    y1, state = conv(x[:, prompt:prompt + 3], state, output_state=True)
    ys = [y0, y1]
    for t in range(prompt + 3, 12):
        y, state = conv(x[:, t:t + 1], state, output_state=True)
        ys.append(y)
    assert_close("prefill + chunk + steps", torch.cat(ys, 1), full)
    assert_close("last state", state, x[:, 12 - (kernel_size - 1):])


def test_short_conv_does_not_leak_across_documents():
    conv = ShortConvolution(4, kernel_size=4).double()
    x = torch.randn(1, 12, 4, dtype=torch.float64)
    cu = torch.tensor([0, 2, 7, 12])
    packed, _ = conv(x, cu_seqlens=cu)
    separate = torch.cat([conv(x[:, s:e])[0] for s, e in [(0, 2), (2, 7), (7, 12)]], 1)
    assert_close("packed", packed, separate)
    assert positions_in_documents(cu, 12).tolist() == [0, 1, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4]


# ---- attention op ------------------------------------------------------------------------

def _naive_attention(q, k, v, window=None, docs=None, key_mask=None):
    """Loop over queries; softmax over the visible keys only."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    out = torch.zeros(B, Tq, H, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for i in range(Tq):
            p = Tk - Tq + i
            keys = [j for j in range(p + 1)
                    if (window is None or p - j < window)
                    and (docs is None or docs[j] == docs[p])
                    and (key_mask is None or key_mask[b, j] or j == p)]
            for h in range(H):
                g = h // (H // Hkv)
                s = torch.stack([q[b, i, h] @ k[b, j, g] for j in keys]) / math.sqrt(D)
                out[b, i, h] = torch.softmax(s, 0) @ v[b, keys, g]
    return out


@pytest.mark.parametrize("window", [None, 1, 5], ids=["full", "w1", "w5"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
def test_causal_attention_matches_naive(window, kv_heads):
    q = torch.randn(2, 13, 4, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 13, kv_heads, 8, dtype=torch.float64).unbind(0)
    assert_close("attention", causal_attention(q, k, v, window=window), _naive_attention(q, k, v, window))


def test_causal_attention_decoding_alignment_and_key_mask():
    """Tq < Tk: the last query aligns with the last key; padded keys are invisible."""
    q = torch.randn(2, 3, 2, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 10, 2, 8, dtype=torch.float64).unbind(0)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    for window in (None, 4):
        out = causal_attention(q, k, v, window=window, key_mask=mask)
        assert_close(f"decode w={window}", out, _naive_attention(q, k, v, window, key_mask=mask))


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("use_flex", [False, True], ids=["dense", "flex"])
@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile:UserWarning")
def test_causal_attention_packed_documents(window, use_flex):
    q, k, v = torch.randn(3, 1, 20, 2, 8).unbind(0)
    cu = torch.tensor([0, 6, 7, 20])
    docs = torch.searchsorted(cu[1:], torch.arange(20), right=True).tolist()
    out = causal_attention(q, k, v, window=window, cu_seqlens=cu, use_flex=use_flex)
    assert_close("packed", out, _naive_attention(q.double(), k.double(), v.double(), window, docs).float(), rtol=1e-5)


def test_causal_attention_rejects_bad_input():
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="multiple"):
        causal_attention(q, torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8))
    with pytest.raises(ValueError, match="window"):
        causal_attention(q, q, q, window=0)
    with pytest.raises(ValueError, match="key_mask"):
        causal_attention(q, q, q, key_mask=torch.ones(1, 3))


# ---- linear attention, RoPE, RMSNorm -------------------------------------------------------

def test_linear_attention_matches_recurrence():
    """Values and gradients (of q, k, v and the initial state) against the token-by-token
    recurrence; T = 70 is not a multiple of the chunk, K != V."""
    q, k = torch.randn(2, 2, 70, 2, 4, dtype=torch.float64).unbind(0)
    v = torch.randn(2, 70, 2, 3, dtype=torch.float64)
    S0 = torch.randn(2, 2, 4, 3, dtype=torch.float64)
    do, dS = torch.randn(2, 70, 2, 3, dtype=torch.float64), torch.randn(2, 2, 4, 3, dtype=torch.float64)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, S0)]
    o, S = linear_attention(*inputs[:3], initial_state=inputs[3], chunk_size=16)
    grads = torch.autograd.grad((o * do).sum() + (S * dS).sum(), inputs)
    ref = [x.clone().requires_grad_() for x in (q, k, v, S0)]
    Sr, outs = ref[3], []
    for t in range(70):
        Sr = Sr + torch.einsum("bhk,bhv->bhkv", ref[1][:, t], ref[2][:, t])
        outs.append(torch.einsum("bhk,bhkv->bhv", ref[0][:, t] * 4 ** -0.5, Sr))
    o_ref = torch.stack(outs, 1)
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (Sr * dS).sum(), ref)
    assert_close("o", o, o_ref)
    assert_close("state", S, Sr)
    for name, g, gr in zip(("dq", "dk", "dv", "dS0"), grads, grads_ref):
        assert_close(name, g, gr)
    for t in (0, 69):  # one-token calls (decode steps) take their own path: one recurrence step
        o1, S1 = linear_attention(*(x[:, t:t + 1] for x in inputs[:3]), initial_state=inputs[3])
        S1r = ref[3] + torch.einsum("bhk,bhv->bhkv", ref[1][:, t], ref[2][:, t])
        o1r = torch.einsum("bhk,bhkv->bhv", ref[0][:, t] * 4 ** -0.5, S1r)[:, None]
        g1 = torch.autograd.grad((o1 * do[:, :1]).sum() + (S1 * dS).sum(), inputs, allow_unused=True)
        g1r = torch.autograd.grad((o1r * do[:, :1]).sum() + (S1r * dS).sum(), ref, allow_unused=True)
        assert_close("one-token o", o1, o1r)
        assert_close("one-token state", S1, S1r)
        for name, g, gr in zip(("dq", "dk", "dv", "dS0"), g1, g1r):
            assert_close(f"one-token {name}", g, gr)
    q, k, v = q.detach(), k.detach(), v.detach()
    cu = torch.tensor([0, 30, 70])
    op, _ = linear_attention(q[:1], k[:1], v[:1], cu_seqlens=cu)
    sep = torch.cat([linear_attention(q[:1, s:e], k[:1, s:e], v[:1, s:e])[0] for s, e in [(0, 30), (30, 70)]], 1)
    assert_close("packed", op, sep)


PACKED_CASES = {
    "odd": [1, 63, 64, 65, 130],  # around the chunk of 64: one token, one short, exact, one over, three chunks
    "empty": [0, 65, 0, 1, 130, 0],  # empty documents first, inside and last: their states pass through
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("chunk_size", [64, 16])
@pytest.mark.parametrize("with_state", [True, False], ids=["S0", "noS0"])
@pytest.mark.parametrize("case", list(PACKED_CASES))
def test_packed_linear_attention_matches_per_document_recurrence(case, with_state, chunk_size, dtype):
    """All documents in one pass against the float64 recurrence of each document on its own:
    outputs, final states, and the gradients of q, k, v and the initial states; K != V."""
    lengths = PACKED_CASES[case]
    T, N, H, K, V = sum(lengths), len(lengths), 2, 5, 3
    gen = torch.Generator().manual_seed(len(lengths) + chunk_size)
    d = dict(generator=gen, dtype=torch.float64)
    q, k = torch.randn(2, 1, T, H, K, **d).unbind(0)
    v = torch.randn(1, T, H, V, **d)
    S0 = torch.randn(N, H, K, V, **d) if with_state else torch.zeros(N, H, K, V, dtype=torch.float64)
    do, dS = torch.randn(1, T, H, V, **d), torch.randn(N, H, K, V, **d)
    ref = [x.clone().requires_grad_() for x in (q, k, v, S0)]
    o_ref, S_ref = linear_attention_oracle(*ref, lengths, K ** -0.5)
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (S_ref * dS).sum(), ref if with_state else ref[:3])

    inputs = [x.to(dtype).requires_grad_() for x in (q, k, v, S0)]
    o, S = linear_attention(*inputs[:3], initial_state=inputs[3] if with_state else None, cu_seqlens=packed_cu_seqlens(lengths),
                            chunk_size=chunk_size)
    assert o.dtype == S.dtype == dtype and o.shape == (1, T, H, V) and S.shape == (N, H, K, V)
    grads = torch.autograd.grad((o * do.to(dtype)).sum() + (S * dS.to(dtype)).sum(),
                                inputs if with_state else inputs[:3])
    assert_close("o", o, o_ref)
    offsets = torch.tensor([0, *lengths]).cumsum(0).tolist()
    for i, (s, e) in enumerate(zip(offsets[:-1], offsets[1:])):
        assert_close(f"state of document {i} ({e - s} tokens)", S[i], S_ref[i])
        if e > s:
            assert_close(f"o of document {i}", o[:, s:e], o_ref[:, s:e])
    for name, g, gr in zip(("dq", "dk", "dv", "dS0"), grads, grads_ref):
        assert_close(name, g, gr)


def test_packed_linear_attention_keeps_float32_precision_for_short_documents_late_in_a_long_batch():
    """Positive features (elu + 1 keys, positive values) make a prefix over the whole batch grow
    with T: a state taken as the difference of two such prefixes in float32 lost ~7e-5 of a short
    document's state here (~1e-3 at 32K tokens). Every document, outputs and final state, within
    float32 accuracy of the float64 result (itself checked against the recurrence above)."""
    lengths = [3000, 1, 2, 2000, 1, 63, 2900, 65, 1, 130]
    T, H, K, V = sum(lengths), 1, 16, 8
    gen = torch.Generator().manual_seed(0)
    q, k = (F.elu(torch.randn(1, T, H, K, generator=gen, dtype=torch.float64)) + 1 for _ in range(2))
    v = torch.rand(1, T, H, V, generator=gen, dtype=torch.float64) + 0.5
    cu = packed_cu_seqlens(lengths)
    o_ref, S_ref = linear_attention(q, k, v, cu_seqlens=cu)
    o, S = linear_attention(q.float(), k.float(), v.float(), cu_seqlens=cu)
    offsets = torch.tensor([0, *lengths]).cumsum(0).tolist()
    for i, (s, e) in enumerate(zip(offsets[:-1], offsets[1:])):
        assert_close(f"state of document {i} ({e - s} tokens)", S[i], S_ref[i])
        assert_close(f"o of document {i} ({e - s} tokens)", o[:, s:e], o_ref[:, s:e])


def test_packed_linear_attention_under_autocast_is_as_accurate_as_one_document_at_a_time():
    """Under bf16 autocast the products run in bf16 (as in the unpacked path), but the states are
    summed in float32: the packed path's final states and outputs are no further from the float64
    result than those of the documents run one at a time (whose prefix sum autocast keeps in float32).
    A scan in bf16 was 1.3x further here (against the float32 sums of both)."""
    lengths = [700, 3, 900, 64, 400]
    T, H, K, V = sum(lengths), 2, 32, 32
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, H, K, generator=gen)
    k = F.normalize(torch.randn(1, T, H, K, generator=gen), dim=-1)
    v = torch.randn(1, T, H, V, generator=gen)
    cu = torch.tensor([0, *lengths]).cumsum(0)
    o64, S64 = linear_attention(q.double(), k.double(), v.double(), cu_seqlens=cu)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, S = linear_attention(q, k, v, cu_seqlens=cu)
        alone = [linear_attention(q[:, s:e], k[:, s:e], v[:, s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
    assert S.dtype == torch.float32
    o1, S1 = torch.cat([a[0] for a in alone], 1), torch.cat([a[1] for a in alone])

    def err(x, ref):
        return ((x.double() - ref).norm() / ref.norm()).item()

    assert err(S, S64) <= 1.05 * err(S1, S64), (err(S, S64), err(S1, S64))
    assert err(o, o64) <= 1.05 * err(o1, o64), (err(o, o64), err(o1, o64))


def test_packed_linear_attention_needs_one_row():
    x = torch.randn(2, 8, 1, 4)
    with pytest.raises(ValueError, match="cu_seqlens requires B == 1"):
        linear_attention(x, x, x, cu_seqlens=torch.tensor([0, 3, 8]))


def test_rope_scores_depend_on_relative_position_only():
    q, k = torch.randn(2, 1, 1, 1, 16, dtype=torch.float64).unbind(0)

    def score(pq, pk):
        rq = apply_rope(q, torch.tensor([[pq]]), 10000.0)
        rk = apply_rope(k, torch.tensor([[pk]]), 10000.0)
        return (rq * rk).sum()

    assert torch.allclose(score(7, 3), score(104, 100))
    assert not torch.allclose(score(7, 3), score(7, 4))
    x = torch.randn(1, 3, 2, 16, dtype=torch.float64)
    norms = apply_rope(x, torch.tensor([[0, 5, 900]]), 10000.0).norm(dim=-1)
    assert torch.allclose(norms, x.norm(dim=-1))  # a rotation


def test_rmsnorm_formula_and_gate():
    norm = RMSNorm(8, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
    x, g = torch.randn(2, 3, 2, 8, dtype=torch.float64).unbind(0)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert_close("rmsnorm", norm(x), expected)
    assert_close("gated", norm(x, g), expected * F.silu(g))
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_memory_lean_functions_have_exact_gradients():
    from deltanet.layers.mlp import swiglu_linear
    from deltanet.layers.norm import rms_norm

    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w))
    g, u = (torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    W = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu_linear, (g, u, W))
    assert_close("swiglu", swiglu_linear(g, u, W), (F.silu(g) * u) @ W.t())


def test_memory_lean_functions_under_bf16_autocast():
    from deltanet.layers import SwiGLU

    mlp, norm = SwiGLU(16, 32), RMSNorm(16)
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp(norm(x))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert mlp.down_proj.weight.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    ref = mlp.down_proj(F.silu(mlp.gate_proj(norm(x))) * mlp.up_proj(norm(x)))
    assert_close("bf16 vs fp32", y.float(), ref, rtol=2e-2)


def test_l2_norm_gradient_and_autocast_output_dtype():
    from deltanet.layers.norm import l2_norm, rms_norm

    x = torch.randn(4, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(l2_norm, (x,))
    assert_close("l2", l2_norm(x), F.normalize(x, dim=-1))
    xf = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # float32 residual in, autocast dtype out: the projections share one bf16 copy
        assert rms_norm(xf, torch.ones(8)).dtype == torch.bfloat16
    assert rms_norm(xf, torch.ones(8)).dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compiled_conv_on_cuda_matches_eager(backend, monkeypatch):
    from deltanet.layers.conv import _padded_conv

    monkeypatch.setenv("DELTANET_CONV", backend)  # the Triton kernels, or torch.compile of the code

    conv = ShortConvolution(64, kernel_size=4).cuda()
    x = torch.randn(2, 300, 64, device="cuda", requires_grad=True)
    cu = torch.tensor([0, 100, 300], device="cuda")
    for c in (None, cu):
        xs = x[:1] if c is not None else x
        y, _ = conv(xs, cu_seqlens=c)  # grad enabled on CUDA: the training path
        pos = positions_in_documents(c, 300) if c is not None else None
        ref = _padded_conv.eager(xs, conv.weight, pos, True)
        assert_close("compiled conv", y, ref, rtol=1e-5)
        g1 = torch.autograd.grad(y.sum(), (x, conv.weight))
        g2 = torch.autograd.grad(ref.sum(), (x, conv.weight))
        for a, b in zip(g1, g2):
            assert_close("compiled conv grad", a, b, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 100])
def test_flex_attention_on_cuda_matches_dense(window):
    q, k, v = torch.randn(3, 1, 512, 4, 64, device="cuda", dtype=torch.bfloat16).unbind(0)
    cu = torch.tensor([0, 200, 512], device="cuda")
    for c in (None, cu):
        if window is None and c is None:
            continue
        flex = causal_attention(q, k, v, window=window, cu_seqlens=c)  # compiled FlexAttention
        dense = causal_attention(q.double(), k.double(), v.double(), window=window, cu_seqlens=c, use_flex=False)
        base = causal_attention(q, k, v, window=window, cu_seqlens=c, use_flex=False)
        assert_close("flex", flex, dense, baseline=base, floor=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 100, 700])
def test_flex_attention_with_halo_on_cuda_matches_dense(window):
    """A context-parallel segment's attention: 300 queries aligned to the last of 1000 keys
    (GQA), forward and backward of the compiled FlexAttention block mask with the offset."""
    q = torch.randn(1, 300, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 1000, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    w = torch.randn(1, 300, 4, 64, device="cuda")
    outs = {}
    cases = (("flex", True, torch.bfloat16), ("dense", False, torch.float64), ("base", False, torch.bfloat16))
    for name, flex, dt in cases:
        xs = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o = causal_attention(*xs, window=window, use_flex=flex)
        (o.float() * w).sum().backward()
        outs[name] = [o] + [t.grad for t in xs]
    for i, what in enumerate(("o", "dq", "dk", "dv")):
        assert_close(f"flex {what}", outs["flex"][i], outs["dense"][i], baseline=outs["base"][i], floor=1e-3)


def test_rms_norm_linear_matches_norm_then_linears():
    from deltanet.layers.norm import rms_norm, rms_norm_linear

    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    for d in (8, 4):  # whole rows (block pre-norm) and groups of d (per-head o_norm)
        nw = torch.empty(d, dtype=torch.float64).uniform_(0.5, 2).requires_grad_()
        Ws = [torch.randn(n, 8, dtype=torch.float64, requires_grad=True) for n in (5, 3)]
        assert torch.autograd.gradcheck(lambda a, b, c, e: rms_norm_linear(a, b, [c, e], 1e-6), (x, nw, *Ws))
        h = rms_norm(x.unflatten(-1, (-1, d)), nw, 1e-6).flatten(-2)
        for y, W in zip(rms_norm_linear(x, nw, Ws, 1e-6), Ws):
            assert_close("norm+linear", y, h @ W.t())
    with pytest.raises(ValueError, match="norm_weight"):
        rms_norm_linear(x, torch.ones(3, dtype=torch.float64), [Ws[0]])
    xf = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (y,) = rms_norm_linear(xf, torch.ones(8), [torch.randn(5, 8)])
    assert y.dtype == torch.bfloat16


def test_recomputed_conv_has_exact_gradients():
    from deltanet.layers.conv import _padded_conv, padded_conv

    x = torch.randn(1, 9, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    for doc_pos in (None, positions_in_documents(torch.tensor([0, 4, 9]), 9)):
        for silu in (True, False):
            assert torch.autograd.gradcheck(lambda a, b: padded_conv(a, b, doc_pos, silu), (x, w))
            assert_close("conv", padded_conv(x, w, doc_pos, silu), _padded_conv.eager(x, w, doc_pos, silu))


def test_recompute_in_backward_matches_plain_autograd():
    from deltanet.layers._fused import recompute_in_backward

    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(2, dtype=torch.float64, requires_grad=True)
    fn = lambda a, m: ((a * w).sin() * m, a.exp().sum(-1))  # noqa: E731
    m = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: recompute_in_backward(fn, (a, m), [b, unused]), (x, w))
    # only one output used, and autocast state replayed in backward
    xf = torch.randn(4, 8, requires_grad=True)
    W = torch.randn(5, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (y,) = recompute_in_backward(lambda a: (F.linear(a, W),), (xf,), [W])
        ref = F.linear(xf, W)
    assert y.dtype == torch.bfloat16
    gx, gw = torch.autograd.grad(y.float().sum(), (xf, W))
    rx, rw = torch.autograd.grad(ref.float().sum(), (xf, W))
    assert torch.equal(gx, rx) and torch.equal(gw, rw)


def test_cached_states_do_not_hold_the_prompt():
    """Conv states and sliding-window keys are copies: a view would keep the prefill's whole
    input alive in the cache (H200, 2026-11-30: 11.7 GiB peak decoding the 340M model at batch 32)."""
    from deltanet.layers.attention import AttentionMixer
    from deltanet.models.cache import DeltaNetCache
    from deltanet.models.presets import get_config

    conv = ShortConvolution(8, kernel_size=4)
    _, state = conv(torch.randn(2, 500, 8), output_state=True)
    assert state.shape == (2, 3, 8) and state.untyped_storage().nbytes() == state.numel() * state.element_size()

    cfg = get_config("tiny", layer_types=["sliding_attention"] * 4, sliding_window=16)
    layer = AttentionMixer(cfg, layer_idx=0, window=16)
    cache = DeltaNetCache(cfg)
    x = torch.randn(1, 300, cfg.hidden_size)
    layer(x, position_ids=torch.arange(300)[None], cache=cache)
    for name in ("k", "v"):
        t = getattr(cache.layers[0], name)
        assert t.shape[1] == 16 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


@pytest.mark.parametrize("kind", ["attention", "linear_attention"])
def test_attention_layers_keep_no_normalised_input(kind):
    """The attention and linear-attention mixers take their block's pre-norm with the q/k/v
    projections (``rms_norm_linear``): backward recomputes the normalised input instead of keeping
    it (one ``[tokens, hidden]`` tensor per layer); the forward (with the residual add) and every
    gradient equal the separate norm + projections."""
    from deltanet.layers import AttentionMixer, LinearAttentionMixer
    from deltanet.layers.norm import RMSNorm
    from deltanet.models.presets import get_config

    torch.manual_seed(0)
    cfg = get_config("tiny")
    layer = (AttentionMixer(cfg, layer_idx=0, window=4) if kind == "attention"
             else LinearAttentionMixer(cfg, layer_idx=0))
    norm = RMSNorm(128)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if kind != "attention":
            layer.o_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, 128, requires_grad=True)
    kw = dict(position_ids=torch.arange(7).expand(2, 7)) if kind == "attention" else {}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x, norm=norm, residual=x, **kw)
    h = norm(x)
    assert not any(t.numel() == h.numel() and torch.equal(t.reshape(h.shape), h) for t in saved)
    ref = x + layer(h, **kw)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, norm.weight, *layer.parameters()], dy)
    grads_ref = torch.autograd.grad(ref, [x, norm.weight, *layer.parameters()], dy)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
