"""Inputs and runners shared by the gated-delta-rule / DeltaProduct oracle tests (every backend)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.utils import assert_close, make_inputs

from deltanet.ops import delta_product, delta_product_reference, delta_rule, delta_rule_reference

NAMES = ("q", "k", "v", "beta", "g", "initial_state")


def gated_inputs(B, T, H, K, V, *, n_h=None, seed=0, N=None, initial_state=True, g_min=-3.0, strong=False,
                 device="cpu"):
    """float64 inputs with a log decay ``g`` in ``[g_min, 0]``. ``n_h``: DeltaProduct layout.
    ``strong``: every third token decays by ``exp(-20)`` (within-chunk sums far below -1e3)."""
    inp = make_inputs(B, T, H, K, V, initial_state=initial_state, N=N, beta_max=2.0, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    g = torch.rand(B, T, H, generator=gen, dtype=torch.float64) * g_min
    if strong:
        g[:, ::3] = -20.0
    inp["g"] = g
    if n_h is not None:
        inp["k"] = F.normalize(torch.randn(B, T, n_h, H, K, generator=gen, dtype=torch.float64), dim=-1)
        inp["v"] = torch.randn(B, T, n_h, H, V, generator=gen, dtype=torch.float64)
        inp["beta"] = torch.rand(B, T, n_h, H, generator=gen, dtype=torch.float64) * 2
    return {k: (x.to(device) if x is not None else None) for k, x in inp.items()}


def cotangents(inp, seed=7):
    gen = torch.Generator().manual_seed(seed)
    B, T, H, _ = inp["q"].shape
    V, K = inp["v"].shape[-1], inp["q"].shape[-1]
    N = inp["initial_state"].shape[0] if inp["initial_state"] is not None else B
    dev = inp["q"].device
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64).to(dev)
    dS = torch.randn(N, H, K, V, generator=gen, dtype=torch.float64).to(dev)
    return do, dS


def run(fn, inp, do, dS, *, cast=None, **kw):
    """Call ``fn`` on leaf copies of ``inp`` (``cast``: dtype of q, k, v, beta, g; states fp32),
    backprop ``<o, do> + <S, dS>``; returns ``(o, S, {name: grad})`` in float64."""
    leaves = {}
    for n, x in inp.items():
        if x is None:
            leaves[n] = None
            continue
        x = x.detach()
        if cast is not None:
            x = x.float() if n == "initial_state" else x.to(cast)
        leaves[n] = x.clone().requires_grad_(True)
    o, S = fn(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], g=leaves["g"],
              initial_state=leaves["initial_state"], output_final_state=True, **kw)
    loss = (o.double() * do.double()).sum() + (S.double() * dS.double()).sum()
    loss.backward()
    grads = {n: leaves[n].grad.double() for n in NAMES if leaves.get(n) is not None}
    return o.double().detach(), S.double().detach(), grads


def dg_scale(inp, grads_ref) -> torch.Tensor:
    """The size of the terms dg is a difference of: ``sum_{s >= t} |q_s . dq_s| + |v_s . dv_s|``.

    Under strong decay dg itself is tiny (exp(-20) and below) while those terms are O(1), so
    its attainable fp32 accuracy is relative to them, not to dg. (Packed sequences: the sum runs
    over the whole row, a looser scale.)"""
    q, v = inp["q"].double(), inp["v"].double()
    tv = (v * grads_ref["v"]).sum(-1).abs()
    if v.ndim == 5:  # DeltaProduct: every step of the token
        tv = tv.sum(2)
    t = (q * grads_ref["q"]).sum(-1).abs() + tv
    return t.flip(1).cumsum(1).flip(1)


def check(label, got, ref, *, inp=None, dbeta_baseline=None, **kw):
    """Every output and gradient within ``kw`` (``assert_close``). With ``inp`` (strong decay),
    dg is compared relative to :func:`dg_scale` instead of its own size. With ``dbeta_baseline``
    (dbeta of the PyTorch chunk form in the same precision), dbeta may also be off by twice that
    form's error: dbeta_t is a dot product over V whose terms cancel, so its relative error is
    bounded by its conditioning, not by the kernel (one token and one head: a single scalar)."""
    o, S, grads = got
    o_ref, S_ref, g_ref = ref
    assert_close(f"{label}: o", o, o_ref, **kw)
    assert_close(f"{label}: final_state", S, S_ref, **kw)
    assert set(grads) == set(g_ref), (set(grads), set(g_ref))
    for n in grads:
        if n == "g" and inp is not None:
            assert torch.isfinite(grads[n]).all(), f"{label}: dg not finite"
            err = (grads[n] - g_ref[n]).norm() / dg_scale(inp, g_ref).norm()
            assert err <= kw.get("rtol", 1e-5), f"{label}: dg error {err:.3e} relative to its terms"
            continue
        if n == "beta" and dbeta_baseline is not None:
            assert_close(f"{label}: dbeta", grads[n], g_ref[n], baseline=dbeta_baseline,
                         floor=kw.get("rtol", 1e-5))
            continue
        assert_close(f"{label}: d{n}", grads[n], g_ref[n], **kw)


def rule(backend):
    return lambda *a, **kw: delta_rule(*a, backend=backend, **kw)


def product(backend):
    return lambda *a, **kw: delta_product(*a, backend=backend, **kw)


ORACLE_RULE = delta_rule_reference
ORACLE_PRODUCT = delta_product_reference
