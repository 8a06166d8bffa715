"""The Triton fused recurrent delta rule (the decode path) against the float64 oracle.

CPU: Triton interpreter, small shapes (the recurrent kernels step token by token, which the
interpreter runs slowly); GPU: full size. Buffers start as NaN (see test_triton_chunk.py).
"""

from __future__ import annotations

import pytest
import torch

from tests.ops._triton_common import DEVICE, ON_GPU, chunk_module, recurrence_low_precision, run_with_grads
from tests.utils import assert_close, degenerate_inputs, make_inputs

from deltanet.ops import delta_rule, delta_rule_reference, recurrent_delta_rule

if ON_GPU:
    SHAPES = [(1, 1, 2, 64, 128), (2, 63, 3, 128, 64), (2, 300, 2, 256, 128), (4, 1000, 2, 64, 64)]
else:
    SHAPES = [(1, 1, 2, 16, 32), (2, 33, 1, 32, 16)]
SHAPE_IDS = ["B{}-T{}-H{}-K{}-V{}".format(*s) for s in SHAPES]


@pytest.fixture(autouse=True)
def _poison_buffers(monkeypatch):
    monkeypatch.setattr(chunk_module, "POISON", True)


def _cotangents(B, T, H, K, V, N=None, seed=7):
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(B, T, H, V, generator=g, dtype=torch.float64).to(DEVICE)
    dS = torch.randn(N or B, H, K, V, generator=g, dtype=torch.float64).to(DEVICE)
    return do, dS


def _fp32(inp64):
    return {k: (x.float() if x is not None else None) for k, x in inp64.items()}


@pytest.mark.parametrize("initial_state", [False, True], ids=["h0=0", "h0"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_fp32_matches_reference(shape, initial_state):
    inp64 = make_inputs(*shape, initial_state=initial_state, beta_max=2.0, seed=sum(shape), device=DEVICE)
    do, dS = _cotangents(*shape)
    o_ref, S_ref, g_ref = run_with_grads(delta_rule_reference, inp64, do, dS)
    o, S, grads = run_with_grads(recurrent_delta_rule, _fp32(inp64), do.float(), dS.float())
    assert_close("o", o, o_ref, rtol=1e-5)
    assert_close("final_state", S, S_ref, rtol=1e-5)
    assert set(grads) == set(g_ref)
    for n in grads:
        assert_close(n, grads[n], g_ref[n], rtol=1e-5)


def test_decode_steps_reproduce_the_full_sequence():
    """T = 1 steps carrying the state give the full-sequence outputs and final state."""
    B, T, H, K, V = (8, 20, 4, 64, 64) if ON_GPU else (2, 6, 2, 16, 16)
    inp = _fp32(make_inputs(B, T, H, K, V, initial_state=True, seed=4, device=DEVICE))
    o_full, S_full = recurrent_delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"],
                                          initial_state=inp["initial_state"], output_final_state=True)
    S = inp["initial_state"]
    for t in range(T):
        sl = slice(t, t + 1)
        o_t, S = recurrent_delta_rule(inp["q"][:, sl], inp["k"][:, sl], inp["v"][:, sl], inp["beta"][:, sl],
                                      initial_state=S, output_final_state=True)
        assert_close(f"o[{t}]", o_t, o_full[:, sl], rtol=1e-5)
    assert_close("final_state", S, S_full, rtol=1e-5)


def test_varlen_matches_reference():
    lengths = [100, 1, 257, 64] if ON_GPU else [5, 1, 17]
    T, N, H, K, V = sum(lengths), len(lengths), 2, 32, 16
    inp64 = make_inputs(1, T, H, K, V, initial_state=True, N=N, beta_max=2.0, seed=T, device=DEVICE)
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0)
    do, dS = _cotangents(1, T, H, K, V, N=N)
    o_ref, S_ref, g_ref = run_with_grads(delta_rule_reference, inp64, do, dS, cu_seqlens=cu)
    o, S, grads = run_with_grads(recurrent_delta_rule, _fp32(inp64), do.float(), dS.float(), cu_seqlens=cu)
    assert_close("o", o, o_ref, rtol=1e-5)
    assert_close("final_state", S, S_ref, rtol=1e-5)
    for n in grads:
        assert_close(n, grads[n], g_ref[n], rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_within_twice_the_pytorch_floor(dtype):
    shape = (2, 200, 2, 64, 64) if ON_GPU else (1, 33, 1, 32, 16)
    inp64 = make_inputs(*shape, initial_state=True, seed=11, device=DEVICE)
    do, dS = _cotangents(*shape)
    ref = run_with_grads(delta_rule_reference, inp64, do, dS)
    lowp = {k: (x.to(dtype) if x is not None else None) for k, x in inp64.items()}
    lowp["initial_state"] = inp64["initial_state"].float()
    base = run_with_grads(recurrence_low_precision, lowp, do.to(dtype), dS.float())
    got = run_with_grads(recurrent_delta_rule, lowp, do.to(dtype), dS.float())
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert_close("o", got[0], ref[0], baseline=base[0], floor=1e-3)
    assert_close("final_state", got[1], ref[1], baseline=base[1], floor=1e-3)
    for n in got[2]:
        assert_close(n, got[2][n], ref[2][n], baseline=base[2][n], floor=1e-3)


@pytest.mark.parametrize("case", ["zero_keys", "beta0", "beta2"])
def test_degenerate_inputs_are_finite(case):
    inp = degenerate_inputs(case, T=9, device=DEVICE)
    do, dS = torch.ones_like(inp["v"]), torch.ones_like(inp["initial_state"])
    o, S, grads = run_with_grads(recurrent_delta_rule, inp, do, dS)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    if case == "beta0":
        assert torch.equal(S, inp["initial_state"])


def test_dispatcher_routes_to_recurrent():
    inp = _fp32(make_inputs(1, 5, 1, 16, 16, device=DEVICE))
    args = (inp["q"], inp["k"], inp["v"], inp["beta"])
    assert torch.equal(delta_rule(*args, backend="recurrent")[0], recurrent_delta_rule(*args)[0])


def test_torch_compile_fullgraph_decode_step():
    torch._dynamo.reset()
    inp = _fp32(make_inputs(2, 1, 2, 16, 16, initial_state=True, seed=9, device=DEVICE))

    def step(q, k, v, beta, S):
        return recurrent_delta_rule(q, k, v, beta, initial_state=S, output_final_state=True)

    args = [inp[n] for n in ("q", "k", "v", "beta", "initial_state")]
    o_c, S_c = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    o_e, S_e = step(*args)
    assert torch.equal(o_c, o_e) and torch.equal(S_c, S_e)
