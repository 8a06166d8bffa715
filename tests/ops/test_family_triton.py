"""The gated delta rule and DeltaProduct on the Triton backends (chunk and fused recurrent),
against the float64 oracles: values, final states and the gradients of everything, dg included.

On CPU the kernels run under the Triton interpreter at small shapes; on a GPU at larger ones.
Every buffer the chunk launchers allocate starts as NaN (an unwritten element fails).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.ops._triton_common import DEVICE, ON_GPU, chunk_module, recurrence_low_precision
from tests.ops.family_cases import (ORACLE_PRODUCT, ORACLE_RULE, check, cotangents, dg_scale, gated_inputs, product,
                                    rule, run)
from tests.utils import assert_close

from deltanet.ops import chunk_delta_rule, device_sms, recurrent_delta_rule, select_config

if ON_GPU:
    SHAPES = [(1, 1, 2, 128, 128), (2, 63, 3, 64, 128), (1, 65, 2, 100, 100), (2, 1000, 4, 128, 64),
              (1, 300, 2, 256, 256)]
else:
    SHAPES = [(1, 1, 1, 16, 32), (2, 63, 3, 32, 16), (1, 65, 2, 16, 48), (1, 130, 1, 64, 32)]
IDS = ["B{}-T{}-H{}-K{}-V{}".format(*s) for s in SHAPES]
BACKENDS = {"triton": chunk_delta_rule, "recurrent": recurrent_delta_rule}


@pytest.fixture(autouse=True)
def _poison_buffers(monkeypatch):
    monkeypatch.setattr(chunk_module, "POISON", True)


@pytest.mark.parametrize("strong", [False, True], ids=["g", "g-20"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_gated_fp32_matches_reference(backend, shape, strong):
    if backend == "recurrent" and shape[1] > 100 and not ON_GPU:
        pytest.skip("the recurrent kernel steps token by token: under the interpreter T <= 65 is enough")
    inp = gated_inputs(*shape, seed=sum(shape), strong=strong, device=DEVICE)
    do, dS = cotangents(inp)
    ref = run(ORACLE_RULE, inp, do, dS)
    got = run(BACKENDS[backend], inp, do, dS, cast=torch.float32)
    # 5e-5: the gated chunk form has a few more fp32 roundings per element than the plain one
    check(backend, got, ref, rtol=5e-5, inp=inp if strong else None)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_gated_varlen_with_initial_states(backend):
    lengths = [5, 65, 1, 70] if backend == "triton" else [5, 20, 1, 9]
    T, N = sum(lengths), len(lengths)
    inp = gated_inputs(1, T, 2, 32, 16, N=N, seed=T, device=DEVICE)
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0)
    do, dS = cotangents(inp)
    ref = run(ORACLE_RULE, inp, do, dS, cu_seqlens=cu)
    got = run(BACKENDS[backend], inp, do, dS, cast=torch.float32, cu_seqlens=cu)
    check(f"{backend} varlen", got, ref, rtol=2e-5)


@pytest.mark.parametrize("final_state_grad", [True, False], ids=["dS", "no-dS"])
def test_gated_gradient_through_the_final_state_only(final_state_grad):
    """The loss reads only the final state (or only o): dg still matches (its last-token term).
    Mild decay, so that the initial state's gradient does not underflow fp32 (exp(-105) would)."""
    inp = gated_inputs(2, 70, 2, 16, 16, seed=12, g_min=-0.05, device=DEVICE)
    do, dS = cotangents(inp)
    if final_state_grad:
        do = torch.zeros_like(do)
    else:
        dS = torch.zeros_like(dS)
    ref = run(ORACLE_RULE, inp, do, dS)
    got = run(chunk_delta_rule, inp, do, dS, cast=torch.float32)
    check("chunk", got, ref, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_gated_low_precision_within_twice_the_pytorch_floor(backend, dtype):
    shape = (2, 65, 2, 32, 16) if not ON_GPU else (2, 1000, 4, 100, 128)
    inp = gated_inputs(*shape, seed=13, device=DEVICE)
    do, dS = cotangents(inp)
    ref = run(ORACLE_RULE, inp, do, dS)
    base = run(recurrence_low_precision, inp, do.to(dtype), dS.float(), cast=dtype)
    got = run(BACKENDS[backend], inp, do.to(dtype), dS.float(), cast=dtype)
    ratio = 4.0 if (dtype == torch.bfloat16 and not ON_GPU) else 2.0  # interpreter bf16 rounding (see test_triton_chunk)
    assert_close("o", got[0], ref[0], baseline=base[0], ratio=ratio, floor=1e-3)
    assert_close("final_state", got[1], ref[1], baseline=base[1], ratio=ratio, floor=1e-3)
    for n in got[2]:
        if n != "g":
            assert_close(f"d{n}", got[2][n], ref[2][n], baseline=base[2][n], ratio=ratio, floor=1e-3)
    # dg is a difference of terms ~100x its size at this decay (g in [-3, 0]; README.md §7): its
    # error is at the input precision relative to those terms, but up to ~8x the recurrence's.
    err = (got[2]["g"] - ref[2]["g"]).norm() / dg_scale(inp, ref[2]).norm()
    assert err <= 2e-3, f"dg error {err:.2e} relative to its terms"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gated_low_precision_dg_under_mild_decay(dtype):
    """With mild decay (g in [-0.1, 0]) dg is within the 2x rule of the low-precision recurrence."""
    shape = (2, 65, 2, 32, 16) if not ON_GPU else (2, 1000, 4, 100, 128)
    inp = gated_inputs(*shape, seed=13, g_min=-0.1, device=DEVICE)
    do, dS = cotangents(inp)
    ref = run(ORACLE_RULE, inp, do, dS)
    base = run(recurrence_low_precision, inp, do.to(dtype), dS.float(), cast=dtype)
    got = run(chunk_delta_rule, inp, do.to(dtype), dS.float(), cast=dtype)
    ratio = 4.0 if (dtype == torch.bfloat16 and not ON_GPU) else 2.0
    assert_close("dg", got[2]["g"], ref[2]["g"], baseline=base[2]["g"], ratio=ratio, floor=1e-3)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_product_matches_step_by_step_oracle(backend, gated):
    inp = gated_inputs(2, 40 if backend == "triton" else 20, 2, 16, 32, n_h=2, seed=14, device=DEVICE)
    if not gated:
        inp["g"] = None
    do, dS = cotangents(inp)
    ref = run(ORACLE_PRODUCT, inp, do, dS)
    got = run(product(backend), inp, do, dS, cast=torch.float32)
    check(f"{backend} product", got, ref, rtol=2e-5)


def test_product_three_steps_varlen_strong_decay():
    lengths = [3, 30, 1]
    inp = gated_inputs(1, sum(lengths), 2, 16, 16, n_h=3, N=3, seed=15, strong=True, device=DEVICE)
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0)
    do, dS = cotangents(inp)
    ref = run(ORACLE_PRODUCT, inp, do, dS, cu_seqlens=cu)
    got = run(product("triton"), inp, do, dS, cast=torch.float32, cu_seqlens=cu)
    check("product varlen", got, ref, rtol=2e-5, inp=inp)


# Launch settings a tuning sweep may pick: the gate path must hold in each.
VARIANTS = {
    "two-kernel-grads": dict(grads_fused=False),
    "fused-grads": dict(grads_fused=True, bv_grads=16),
    "state-int32-offsets": dict(state_addr64=False),
    "narrow-blocks": dict(bk=16, bv=16, bv_state=16, bv_o=16, bk_dqkw=16),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gated_launch_variants_match_reference(variant):
    cfg = select_config(2, 3, 32, 48, torch.float32, num_sms=device_sms(DEVICE), gated=True,
                        interpreter=chunk_module.interpreted())
    cfg = dataclasses.replace(cfg, **VARIANTS[variant])
    inp = gated_inputs(2, 63, 3, 32, 48, seed=16, strong=True, device=DEVICE)
    do, dS = cotangents(inp)
    ref = run(ORACLE_RULE, inp, do, dS)
    got = run(chunk_delta_rule, inp, do, dS, cast=torch.float32, kernel_config=cfg)
    check(variant, got, ref, rtol=2e-5, inp=inp)


def test_gated_op_passes_opcheck():
    inp = gated_inputs(1, 20, 1, 16, 16, seed=17, device=DEVICE)
    f = {k: x.float() for k, x in inp.items()}
    args = (f["q"], f["k"], f["v"], f["beta"], 16 ** -0.5, f["initial_state"], True, None, f["g"])
    torch.library.opcheck(torch.ops.deltanet.chunk_delta_rule_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_gated_torch_compile_fullgraph():
    torch._dynamo.reset()
    inp = gated_inputs(2, 40, 2, 16, 16, seed=18, device=DEVICE)
    names = ("q", "k", "v", "beta", "g", "initial_state")
    args = [inp[n].float().clone().requires_grad_() for n in names]

    def f(q, k, v, beta, g, h0):
        o, S = chunk_delta_rule(q, k, v, beta, g=g, initial_state=h0, output_final_state=True)
        return (o * o).sum() + S.sum()

    loss_c = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    grads_c = torch.autograd.grad(loss_c, args)
    grads_e = torch.autograd.grad(f(*args), args)
    for n, gc, ge in zip(names, grads_c, grads_e):
        assert_close(f"d{n}", gc, ge, rtol=1e-6)


def test_dispatch_and_g_validation():
    inp = gated_inputs(1, 10, 2, 16, 16, seed=19, device=DEVICE)
    f = {k: x.float() for k, x in inp.items()}
    a, _ = rule("triton")(f["q"], f["k"], f["v"], f["beta"], g=f["g"])
    b, _ = chunk_delta_rule(f["q"], f["k"], f["v"], f["beta"], g=f["g"])
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"g must have shape \[B, T, H\]"):
        chunk_delta_rule(f["q"], f["k"], f["v"], f["beta"], g=f["g"][:, :-1])
    with pytest.raises(ValueError, match=r"g must have shape \[B, T, H\]"):
        recurrent_delta_rule(f["q"], f["k"], f["v"], f["beta"], g=f["g"][..., None])
