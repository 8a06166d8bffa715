"""The PyTorch chunkwise delta rule (and the dispatcher) against the float64 step-by-step oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltanet.ops import delta_rule, delta_rule_chunkwise_torch, delta_rule_reference
from tests.utils import DEGENERATE_CASES, assert_close, degenerate_inputs, make_inputs

SHAPES = [  # (B, T, H, K, V)
    (1, 1, 1, 16, 16),
    (2, 63, 3, 16, 8),
    (2, 64, 1, 8, 32),
    (1, 65, 3, 32, 16),
    (1, 1000, 2, 16, 24),
]


def _run(fn, inp, **kw):
    return fn(inp["q"], inp["k"], inp["v"], inp["beta"], initial_state=inp["initial_state"], **kw)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-H{}-K{}-V{}".format(*s))
@pytest.mark.parametrize("chunk_size", [16, 32, 64], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("initial_state", [False, True], ids=["h0=0", "h0"])
def test_chunkwise_matches_reference_fp64(shape, chunk_size, initial_state):
    B, T, H, K, V = shape
    inp = make_inputs(B, T, H, K, V, initial_state=initial_state, beta_max=2.0, seed=T + K)
    o_ref, s_ref = _run(delta_rule_reference, inp, output_final_state=True)
    o, s = _run(delta_rule_chunkwise_torch, inp, output_final_state=True, chunk_size=chunk_size)
    assert o.dtype == torch.float64 and s.dtype == torch.float64
    assert_close("o", o, o_ref)
    assert_close("final_state", s, s_ref)


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0], ids=lambda s: f"scale{s}")
def test_custom_scale(scale):
    inp = make_inputs(2, 70, 2, 16, 8, seed=1)
    o_ref, _ = _run(delta_rule_reference, inp, scale=scale)
    o, _ = _run(delta_rule_chunkwise_torch, inp, scale=scale, chunk_size=32)
    assert_close("o", o, o_ref)
    # The default is K ** -0.5, and scale only multiplies the output.
    o_default, _ = _run(delta_rule_chunkwise_torch, inp)
    assert_close("o(scale)/scale", o / scale, o_default / 16 ** -0.5)


def test_no_state_by_default():
    inp = make_inputs(1, 10, 1, 4, 4)
    _, s = _run(delta_rule_chunkwise_torch, inp)
    assert s is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_inputs(dtype):
    """fp32/bf16/fp16 inputs: output in v.dtype, state in fp32, error at the rounding floor."""
    inp64 = make_inputs(2, 100, 2, 32, 16, initial_state=True, seed=3)
    o_ref, s_ref = _run(delta_rule_reference, inp64, output_final_state=True)
    inp = {k: (x.to(dtype) if x is not None and k != "initial_state" else x) for k, x in inp64.items()}
    inp["initial_state"] = inp64["initial_state"].float()
    o, s = _run(delta_rule_chunkwise_torch, inp, output_final_state=True)
    assert o.dtype == dtype and s.dtype == torch.float32
    # Baseline: the oracle evaluated on the same rounded inputs, its output rounded to dtype.
    inp_rounded = {k: (x.double() if x is not None else None) for k, x in inp.items()}
    o_base, s_base = _run(delta_rule_reference, inp_rounded, output_final_state=True)
    assert_close("o", o, o_ref, baseline=o_base.to(dtype), floor=1e-5)
    assert_close("final_state", s, s_ref, baseline=s_base.float(), floor=1e-5)


# ---------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_gradcheck_fp64(varlen):
    torch.manual_seed(0)
    if varlen:
        B, T, N = 1, 11, 3
        cu = torch.tensor([0, 2, 7, 11])
    else:
        B, T, N, cu = 2, 9, 2, None
    inp = make_inputs(B, T, 2, 3, 4, initial_state=True, N=N, requires_grad=True, beta_max=2.0)

    def fn(q, k, v, beta, h0):
        o, s = delta_rule_chunkwise_torch(q, k, v, beta, initial_state=h0, output_final_state=True,
                                          cu_seqlens=cu, chunk_size=4)
        return o, s

    args = (inp["q"], inp["k"], inp["v"], inp["beta"], inp["initial_state"])
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("T", [63, 130], ids=lambda t: f"T{t}")
def test_gradients_match_reference(T):
    inp = make_inputs(2, T, 2, 16, 24, initial_state=True, requires_grad=True, beta_max=2.0, seed=T)
    names = ["q", "k", "v", "beta", "initial_state"]
    g = torch.Generator().manual_seed(1)
    do = torch.randn(2, T, 2, 24, generator=g, dtype=torch.float64)
    ds = torch.randn(2, 2, 16, 24, generator=g, dtype=torch.float64)
    grads = {}
    for fn in (delta_rule_reference, delta_rule_chunkwise_torch):
        o, s = _run(fn, inp, output_final_state=True)
        grads[fn] = torch.autograd.grad((o * do).sum() + (s * ds).sum(), [inp[n] for n in names])
    for n, g_ref, g in zip(names, grads[delta_rule_reference], grads[delta_rule_chunkwise_torch]):
        assert_close(f"d{n}", g, g_ref)


# ---------------------------------------------------------------------------------- varlen


@pytest.mark.parametrize("lengths", [[1, 63, 64, 65], [200], [7, 1, 130]], ids=lambda l: "-".join(map(str, l)))
def test_varlen_matches_loop_over_sequences(lengths):
    T, N, H, K, V = sum(lengths), len(lengths), 2, 16, 8
    cu = torch.tensor([0] + lengths).cumsum(0)
    inp = make_inputs(1, T, H, K, V, initial_state=True, N=N, seed=len(lengths), requires_grad=True)
    o, s = _run(delta_rule_chunkwise_torch, inp, output_final_state=True, cu_seqlens=cu, chunk_size=32)
    dq, dh0 = torch.autograd.grad(o.square().sum() + s.sum(), [inp["q"], inp["initial_state"]])
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        single = {n: (x[:, a:b] if n != "initial_state" else x[i : i + 1]) for n, x in inp.items()}
        o_i, s_i = _run(delta_rule_reference, single, output_final_state=True)
        assert_close(f"o[seq {i}]", o[:, a:b], o_i)
        assert_close(f"final_state[seq {i}]", s[i : i + 1], s_i)
        dq_i, dh0_i = torch.autograd.grad(o_i.square().sum() + s_i.sum(), [inp["q"], inp["initial_state"]])
        assert_close(f"dq[seq {i}]", dq[:, a:b], dq_i[:, a:b])
        assert_close(f"dh0[seq {i}]", dh0[i], dh0_i[i])


def test_varlen_states_do_not_leak():
    """Changing sequence 0 must not change anything of sequence 1."""
    cu = torch.tensor([0, 40, 100])
    inp = make_inputs(1, 100, 2, 8, 8, seed=5)
    o1, s1 = _run(delta_rule_chunkwise_torch, inp, output_final_state=True, cu_seqlens=cu)
    inp["v"] = inp["v"].clone()
    inp["v"][:, :40] += 10.0
    o2, s2 = _run(delta_rule_chunkwise_torch, inp, output_final_state=True, cu_seqlens=cu)
    assert torch.equal(o1[:, 40:], o2[:, 40:]) and torch.equal(s1[1], s2[1])
    assert not torch.allclose(o1[:, :40], o2[:, :40])


# ---------------------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 2), T=st.integers(1, 90), H=st.integers(1, 3), K=st.integers(1, 20),
    V=st.integers(1, 20), C=st.sampled_from([1, 3, 16, 64]), beta_max=st.floats(0.0, 2.0),
    h0=st.booleans(), seed=st.integers(0, 2**16),
)
def test_property_random_shapes(B, T, H, K, V, C, beta_max, h0, seed):
    inp = make_inputs(B, T, H, K, V, initial_state=h0, beta_max=beta_max, seed=seed)
    o_ref, s_ref = _run(delta_rule_reference, inp, output_final_state=True)
    o, s = _run(delta_rule_chunkwise_torch, inp, output_final_state=True, chunk_size=C)
    assert_close("o", o, o_ref, rtol=1e-9)
    assert_close("final_state", s, s_ref, rtol=1e-9)


# ---------------------------------------------------------------------------------- degenerate


@pytest.mark.parametrize("case", DEGENERATE_CASES)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_degenerate_inputs_are_finite(case, backend):
    inp = degenerate_inputs(case)
    inp = {k: (x.requires_grad_(True) if x is not None else None) for k, x in inp.items()}
    o, s = delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"], initial_state=inp["initial_state"],
                      output_final_state=True, backend=backend)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    grads = torch.autograd.grad(o.sum() + s.sum(), [x for x in inp.values()])
    assert all(torch.isfinite(g).all() for g in grads)
    if case == "beta0":  # beta = 0: the state never changes, o_t = scale * h0^T q_t
        expected = torch.einsum("bthk,bhkv->bthv", inp["q"] * 16 ** -0.5, inp["initial_state"])
        assert_close("o(beta=0)", o, expected)
        assert torch.allclose(s, inp["initial_state"])


# ---------------------------------------------------------------------------------- memory


def test_autograd_memory_is_per_chunk_not_per_token():
    """Saved activations must not grow like T*K*V (one state per token): at K = V = 128 they
    are O(T*(K + V + C) + T/C*K*V), several times below T*K*V."""
    T, K, V = 1024, 128, 128
    inp = make_inputs(1, T, 1, K, V, dtype=torch.float32, requires_grad=True)
    saved = []

    def pack(x):
        saved.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        o, _ = _run(delta_rule_chunkwise_torch, inp)
    per_token_states = T * K * V * 4
    assert sum(saved) < per_token_states / 4, f"saved {sum(saved)} bytes"
    o.sum().backward()


# ---------------------------------------------------------------------------------- dispatch


def test_auto_backend_on_cpu_is_torch_chunkwise():
    inp = make_inputs(1, 50, 2, 8, 8, initial_state=True)
    o_auto, s_auto = _run(delta_rule, inp, output_final_state=True)
    o_t, s_t = _run(delta_rule_chunkwise_torch, inp, output_final_state=True)
    assert torch.equal(o_auto, o_t) and torch.equal(s_auto, s_t)
    o_r, _ = _run(delta_rule, inp, backend="reference")
    assert_close("o", o_auto, o_r)
