"""The gated delta rule and DeltaProduct on the reference and PyTorch chunkwise backends, against
the float64 oracles (``delta_rule_reference`` with ``g``; ``delta_product_reference``, written
from the definition, not through the interleaving)."""

from __future__ import annotations

import pytest
import torch

from tests.ops.family_cases import (ORACLE_PRODUCT, ORACLE_RULE, check, cotangents, gated_inputs, product, rule,
                                    run)
from tests.utils import assert_close, make_inputs

from deltanet.ops import delta_product, delta_rule, delta_rule_chunkwise_torch, delta_rule_reference

SHAPES = [(1, 1, 1, 16, 16), (2, 63, 3, 16, 8), (1, 65, 1, 8, 32), (2, 130, 3, 16, 24)]
IDS = ["B{}-T{}-H{}-K{}-V{}".format(*s) for s in SHAPES]


def test_reference_decay_is_exact_with_beta_zero():
    """beta = 0: no writes, only decay, so S_T = exp(sum g) S_0 and o_t = scale exp(G_t) S_0^T q_t."""
    inp = gated_inputs(2, 20, 3, 8, 4, seed=1)
    inp["beta"] = torch.zeros_like(inp["beta"])
    o, S = delta_rule_reference(inp["q"], inp["k"], inp["v"], inp["beta"], g=inp["g"],
                                initial_state=inp["initial_state"], output_final_state=True)
    G = inp["g"].cumsum(1)  # [B, T, H]
    S_exp = inp["initial_state"] * G[:, -1].exp()[..., None, None]
    o_exp = 8 ** -0.5 * torch.einsum("bthk,bhkv->bthv", inp["q"], inp["initial_state"]) * G.exp()[..., None]
    assert_close("S", S, S_exp, rtol=1e-12)
    assert_close("o", o, o_exp, rtol=1e-12)


def test_zero_decay_is_the_plain_rule():
    inp = gated_inputs(1, 70, 2, 16, 8, seed=2)
    for fn in (delta_rule_reference, delta_rule_chunkwise_torch):
        a = fn(inp["q"], inp["k"], inp["v"], inp["beta"], g=torch.zeros_like(inp["g"]),
               initial_state=inp["initial_state"], output_final_state=True)
        b = fn(inp["q"], inp["k"], inp["v"], inp["beta"], initial_state=inp["initial_state"], output_final_state=True)
        assert_close("o", a[0], b[0], rtol=1e-12)
        assert_close("S", a[1], b[1], rtol=1e-12)


@pytest.mark.parametrize("strong", [False, True], ids=["g", "g-20"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_gated_torch_matches_reference_values_and_grads(shape, strong):
    inp = gated_inputs(*shape, seed=sum(shape), strong=strong)
    do, dS = cotangents(inp)
    ref = run(ORACLE_RULE, inp, do, dS)
    for C in (16, 64):
        got = run(delta_rule_chunkwise_torch, inp, do, dS, chunk_size=C)
        dg, dg_ref = got[2].pop("g"), ref[2]["g"]
        check(f"C{C}", (got[0], got[1], got[2]), (ref[0], ref[1], {n: x for n, x in ref[2].items() if n != "g"}),
              rtol=1e-9)
        # With strong decay dg is tiny (~exp(-20)) and is the difference of O(1) terms in the chunk
        # form (through exp(G_C - G_j) and exp(G_i)): its error is then relative to those terms.
        assert_close(f"C{C}: dg", dg, dg_ref, rtol=1e-6 if strong else 1e-9)


def test_gated_strong_decay_is_finite_and_forgets():
    """g = -20 everywhere: cumulative sums reach -1280 within a chunk; each token then sees only
    itself (exp(-20) ~ 2e-9), so o_t ~ scale beta_t (q_t . k_t) v_t."""
    inp = gated_inputs(1, 64, 2, 16, 8, seed=3)
    inp["g"] = torch.full_like(inp["g"], -20.0)
    do, dS = cotangents(inp)
    ref = run(ORACLE_RULE, inp, do, dS)
    got = run(delta_rule_chunkwise_torch, inp, do, dS, cast=torch.float32)
    dg, dg_ref = got[2].pop("g"), ref[2].pop("g")
    check("fp32", got, ref, rtol=1e-5)
    # dg ~ exp(-20) here, a difference of O(1) terms: its fp32 error is measured against those.
    assert torch.isfinite(dg).all()
    assert (dg - dg_ref).norm() <= 1e-5 * ref[2]["v"].norm()
    o_local = 16 ** -0.5 * (inp["beta"] * (inp["q"] * inp["k"]).sum(-1))[..., None] * inp["v"]
    assert_close("o ~ local", got[0], o_local, rtol=1e-6)


@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_gated_gradcheck_fp64(varlen):
    B, T, N, cu = (1, 11, 3, torch.tensor([0, 2, 7, 11])) if varlen else (2, 9, 2, None)
    inp = gated_inputs(B, T, 2, 3, 4, N=N, seed=4)
    args = tuple(inp[n].clone().requires_grad_() for n in ("q", "k", "v", "beta", "g", "initial_state"))

    def fn(q, k, v, beta, g, h0):
        return delta_rule_chunkwise_torch(q, k, v, beta, g=g, initial_state=h0, output_final_state=True,
                                          cu_seqlens=cu, chunk_size=4)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_gated_varlen_matches_loop_over_sequences(backend):
    lengths = [5, 65, 1, 40]
    T, N = sum(lengths), len(lengths)
    inp = gated_inputs(1, T, 2, 16, 8, N=N, seed=5)
    cu = torch.tensor([0] + lengths).cumsum(0)
    do, dS = cotangents(inp)
    got = run(rule(backend), inp, do, dS, cu_seqlens=cu)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        one = {n: x[:, s:e] for n, x in inp.items() if n != "initial_state"}
        one["initial_state"] = inp["initial_state"][i : i + 1]
        o, S, grads = run(ORACLE_RULE, one, do[:, s:e], dS[i : i + 1])
        assert_close(f"seq {i}: o", got[0][:, s:e], o, rtol=1e-9)
        assert_close(f"seq {i}: S", got[1][i : i + 1], S, rtol=1e-9)
        assert_close(f"seq {i}: dg", got[2]["g"][:, s:e], grads["g"], rtol=1e-9)
        assert_close(f"seq {i}: dh0", got[2]["initial_state"][i : i + 1], grads["initial_state"], rtol=1e-9)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("n_h", [1, 2, 3])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_product_matches_step_by_step_oracle(backend, n_h, gated):
    inp = gated_inputs(2, 37, 3, 16, 8, n_h=n_h, seed=n_h)
    if not gated:
        inp["g"] = None
    do, dS = cotangents(inp)
    ref = run(ORACLE_PRODUCT, inp, do, dS)
    got = run(product(backend), inp, do, dS)
    check(f"{backend} n_h={n_h}", got, ref, rtol=1e-9)


def test_product_varlen_and_strong_decay():
    lengths = [3, 40, 1]
    inp = gated_inputs(1, sum(lengths), 2, 8, 16, n_h=2, N=3, seed=6, strong=True)
    cu = torch.tensor([0] + lengths).cumsum(0)
    do, dS = cotangents(inp)
    ref = run(ORACLE_PRODUCT, inp, do, dS, cu_seqlens=cu)
    got = run(product("torch"), inp, do, dS, cu_seqlens=cu)
    check("varlen", got, ref, rtol=1e-9)


def test_product_with_one_step_is_the_delta_rule():
    inp = gated_inputs(1, 30, 2, 8, 8, seed=7)
    a = delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"], g=inp["g"], backend="torch")[0]
    b = delta_product(inp["q"], inp["k"][:, :, None], inp["v"][:, :, None], inp["beta"][:, :, None], g=inp["g"],
                      backend="torch")[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gated_low_precision_g_is_computed_in_fp32(dtype):
    """g in a low-precision dtype is upcast: the result equals the one with g rounded then fp32."""
    inp = gated_inputs(1, 50, 2, 16, 8, seed=8)
    args = (inp["q"].float(), inp["k"].float(), inp["v"].float(), inp["beta"].float())
    a, _ = delta_rule_chunkwise_torch(*args, g=inp["g"].to(dtype))
    b, _ = delta_rule_chunkwise_torch(*args, g=inp["g"].to(dtype).float())
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------- validation

def _p(B=1, T=4, n=2, H=2, K=8, V=4):
    return (torch.randn(B, T, H, K), torch.randn(B, T, n, H, K), torch.randn(B, T, n, H, V), torch.rand(B, T, n, H))


@pytest.mark.parametrize("fn", [delta_rule, delta_rule_chunkwise_torch, delta_rule_reference],
                         ids=["delta_rule", "torch", "reference"])
@pytest.mark.parametrize("g, exc, msg", [
    (torch.zeros(2, 5, 3), ValueError, "g must have shape [B, T, H]"),
    (torch.zeros(2, 5), ValueError, "g must have shape [B, T, H] (3 dims)"),
    (torch.zeros(2, 5, 3, dtype=torch.long), TypeError, "g must have a floating-point dtype"),
    ([0.0], TypeError, "g must be a torch.Tensor"),
], ids=["shape", "rank", "int", "list"])
def test_bad_g_raises(fn, g, exc, msg):
    inp = make_inputs(2, 4, 3, 8, 4, dtype=torch.float32)
    with pytest.raises(exc, match=__import__("re").escape(msg)):
        fn(inp["q"], inp["k"], inp["v"], inp["beta"], g=g)


@pytest.mark.parametrize("change, exc, msg", [
    (lambda a: (a[0], a[1][:, :, :1].expand(-1, -1, 3, -1, -1), a[2], a[3]), ValueError, "v must have shape [B, T, n_h, H, V]"),
    (lambda a: (a[0], a[1], a[2], a[3][:, :, :1]), ValueError, "beta must have shape [B, T, n_h, H]"),
    (lambda a: (a[0], a[1][:, :, 0], a[2], a[3]), ValueError, "k must have shape [B, T, n_h, H, K] (5 dims)"),
    (lambda a: (a[0], a[1][..., :4], a[2], a[3]), ValueError, "k must have shape [B, T, n_h, H, K]"),
    (lambda a: (a[0], a[1], a[2].long(), a[3]), TypeError, "v must have a floating-point dtype"),
], ids=["v-n_h", "beta-n_h", "k-rank", "k-K", "v-int"])
def test_bad_product_inputs_raise(change, exc, msg):
    args = change(_p())
    with pytest.raises(exc, match=__import__("re").escape(msg)):
        delta_product(*args, backend="torch")


def test_bad_product_g_raises():
    with pytest.raises(ValueError, match=r"g must have shape \[B, T, H\]"):
        delta_product(*_p(), g=torch.zeros(1, 4, 2, 1), backend="torch")
