"""Shared by the Triton kernel tests: interpreter setup, a low-precision PyTorch baseline, runners.

Importing this module sets ``TRITON_INTERPRET=1`` when no GPU is present, before the kernel
modules are imported (Triton reads the variable when a kernel is decorated), so the same tests
run on CPU in CI and at full size on a GPU.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    if "deltanet.ops.delta_rule.chunk" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton kernels were imported before TRITON_INTERPRET=1 was set; "
                           "run the kernel tests in their own process")
    os.environ["TRITON_INTERPRET"] = "1"

chunk_module = importlib.import_module("deltanet.ops.delta_rule.chunk")
DEVICE = "cuda" if ON_GPU else "cpu"

GRAD_NAMES = ("dq", "dk", "dv", "dbeta", "dh0")


def run_with_grads(fn, inp: dict, do: torch.Tensor, dS: torch.Tensor | None, **kw):
    """Call ``fn`` on fresh leaf copies of ``inp``; backprop ``<o, do> + <S, dS>``.

    Returns ``(o, S, {grad name: tensor})`` (``dh0`` only when there is an initial state).
    """
    leaves = {k: (x.detach().clone().requires_grad_(True) if x is not None else None) for k, x in inp.items()}
    o, S = fn(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], initial_state=leaves["initial_state"],
              output_final_state=dS is not None, **kw)
    loss = (o.double() * do.double()).sum()
    if dS is not None:
        loss = loss + (S.double() * dS.double()).sum()
    loss.backward()
    grads = {n: leaves[k].grad for n, k in zip(GRAD_NAMES, ("q", "k", "v", "beta", "initial_state"))
             if leaves[k] is not None}
    return o.detach(), (S.detach() if S is not None else None), grads


def recurrence_low_precision(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False,
                             cu_seqlens=None, g=None):
    """The delta rule as PyTorch would compute it in ``q.dtype``: the token-level products in
    that dtype, the state carried in fp32 (the contract's state dtype). This is the "same
    computation in the same low precision" of the tolerance rule
    (docs/numerics.md); fixed-length batches only. ``g``:
    the gated rule."""
    assert cu_seqlens is None
    B, T, H, K = q.shape
    dt = q.dtype
    scale = K ** -0.5 if scale is None else scale
    S = initial_state.float() if initial_state is not None else q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32)
    outs = []
    for t in range(T):
        k_t, v_t, b_t = k[:, t], v[:, t], beta[:, t].to(dt)
        if g is not None:  # the decay in fp32, on the fp32 state
            S = S * g[:, t].float().exp()[..., None, None]
        v_old = torch.einsum("bhk,bhkv->bhv", k_t, S.to(dt))
        u = (b_t[..., None] * (v_t - v_old)).to(dt)
        S = S + torch.einsum("bhk,bhv->bhkv", k_t, u).float()
        outs.append(torch.einsum("bhk,bhkv->bhv", (q[:, t] * scale).to(dt), S.to(dt)))
    return torch.stack(outs, 1).to(v.dtype), (S if output_final_state else None)
