"""Fused recurrent delta rule in Triton (the decode path): launchers, autograd op, public function.

One kernel walks the tokens of each sequence with the state in registers; it reads each input
once and writes each output once, so a single decoding step (``T = 1`` with a state) is one
launch. Backward is two passes (``kernels/recurrent.py``). Registered with ``torch.library``
like the chunk op, so ``torch.compile`` traces through it.
"""

from __future__ import annotations

import functools

import torch
import triton

from ..packing import PackedSequences
from .chunk import _new, finish_outputs, incoming_grads, prepare_inputs
from .interpreter import interpreted
from ..registry import empty_state as _empty_state
from ..registry import register_autograd_op
from .gate import decay_terms, gate_grad
from .kernels.recurrent import recurrent_bwd_fwd_kernel, recurrent_bwd_rev_kernel, recurrent_fwd_kernel

__all__ = ["recurrent_delta_rule"]


@functools.lru_cache(maxsize=64)
def _fixed_cu(B: int, T: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, B * T + 1, T, dtype=torch.int32, device=device)


def _cu(cu_seqlens, B, T, device) -> torch.Tensor:
    return _fixed_cu(B, T, device) if cu_seqlens is None else cu_seqlens.to(torch.int32)


def _blocks(N: int, H: int, K: int, V: int) -> tuple[int, int, int]:
    """``(BK, BV, num_warps)``: all of K per program; V split until the grid has work for
    every SM (a decode step at batch 1 has only ``H`` sequences-heads)."""
    BK = max(16, triton.next_power_of_2(K))
    BV = min(max(16, triton.next_power_of_2(V)), 64 if BK <= 128 else 32)
    # (Under the interpreter programs run one after another: fewer, larger ones are faster.)
    while BV > 16 and N * H * triton.cdiv(V, BV) < 264 and not interpreted():
        BV //= 2
    return BK, BV, 4 if BK * BV >= 4096 else 2


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().flatten(0, 1)


def recurrent_fwd(q, k, v, beta, scale: float, h0, output_final_state: bool, cu_seqlens, store_w: bool, g=None):
    """Returns ``(o [B, T, H, V], final state or None, w [B*T, H, V] fp32 or None)``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    cu = _cu(cu_seqlens, B, T, q.device)
    N = cu.numel() - 1
    BK, BV, warps = _blocks(N, H, K, V)
    q, k, v, beta = _flat(q), _flat(k), _flat(v), _flat(beta)
    g = _flat(g) if g is not None else None
    o = _new(v)
    w = _new(v, dtype=torch.float32) if store_w else None
    ht = _new(q, N, H, K, V, dtype=torch.float32) if output_final_state else None
    h0 = h0.contiguous() if h0 is not None else None
    recurrent_fwd_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, v, beta, g if g is not None else beta, o, w if w is not None else o, h0 if h0 is not None else o,
        ht if ht is not None else o, cu, scale, H=H, K=K, V=V, BK=BK, BV=BV,
        USE_H0=h0 is not None, STORE_HT=ht is not None, STORE_W=w is not None, USE_G=g is not None,
        num_warps=warps)
    return o.view(B, T, H, V), ht, w


def recurrent_bwd(q, k, v, beta, scale: float, h0, cu_seqlens, do, dht, g=None):
    """Returns ``(dq, dk, dv, dbeta, dh0 or None, dG or None)`` (``dG``: the per-token terms of the
    gradient of g, ``gate.decay_terms``, from dq and dv before rounding)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    TT = B * T
    cu = _cu(cu_seqlens, B, T, q.device)
    N = cu.numel() - 1
    BK, BV, warps = _blocks(N, H, K, V)
    NV = triton.cdiv(V, BV)
    _, _, w = recurrent_fwd(q, k, v, beta, scale, h0, False, cu_seqlens, store_w=True, g=g)
    q, k, beta, do = _flat(q), _flat(k), _flat(beta), _flat(do)
    gp = _flat(g) if g is not None else beta
    h0 = h0.contiguous() if h0 is not None else None
    dht = dht.contiguous() if dht is not None else None
    du = _new(w)
    dv = _new(v, TT, H, V, dtype=torch.float32 if g is not None else None)
    dk_part = _new(q, NV, TT, H, K, dtype=torch.float32)
    dq_part = _new(dk_part)
    db_part = _new(q, NV, TT, H, dtype=torch.float32)
    dh0 = _new(q, N, H, K, V, dtype=torch.float32) if h0 is not None else None
    grid = (NV, N * H)
    recurrent_bwd_rev_kernel[grid](
        q, k, beta, gp, w, do, dht if dht is not None else w, du, dv, dk_part, db_part,
        dh0 if dh0 is not None else w, cu, scale, H=H, K=K, V=V, BK=BK, BV=BV, TT=TT,
        USE_DHT=dht is not None, STORE_DH0=dh0 is not None, USE_G=g is not None, num_warps=warps)
    recurrent_bwd_fwd_kernel[grid](
        k, beta, gp, w, do, du, h0 if h0 is not None else w, dk_part, dq_part, cu, scale,
        H=H, K=K, V=V, BK=BK, BV=BV, TT=TT, USE_H0=h0 is not None, USE_G=g is not None, num_warps=warps)
    shape = (B, T, H)
    dq = dq_part.sum(0)
    dG = decay_terms(q, dq, v.reshape(TT, H, V), dv).view(shape) if g is not None else None
    dq = dq.to(q.dtype).view(*shape, K)
    dk = dk_part.sum(0).to(k.dtype).view(*shape, K)
    dbeta = db_part.sum(0).to(beta.dtype).view(shape)
    return dq, dk, dv.to(v.dtype).view(*shape, V), dbeta, dh0, dG


def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, scale: float,
            initial_state: torch.Tensor | None, output_final_state: bool,
            cu_seqlens: torch.Tensor | None, g: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    o, ht, _ = recurrent_fwd(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, store_w=False,
                             g=g)
    return o, ht if ht is not None else _empty_state(q)


def _fwd_fake(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, g=None):
    B, T, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    ht = q.new_empty(N, H, K, v.shape[-1], dtype=torch.float32) if output_final_state else _empty_state(q)
    return torch.empty_like(v, memory_format=torch.contiguous_format), ht


def _bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, scale: float,
            initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, do: torch.Tensor,
            dht: torch.Tensor | None, g: torch.Tensor | None = None) -> tuple[
                torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, db, dh0, dG = recurrent_bwd(q, k, v, beta, scale, initial_state, cu_seqlens, do, dht, g)
    return dq, dk, dv, db, dh0 if dh0 is not None else _empty_state(q), dG if dG is not None else _empty_state(q)


def _bwd_fake(q, k, v, beta, scale, initial_state, cu_seqlens, do, dht, g=None):
    e = functools.partial(torch.empty_like, memory_format=torch.contiguous_format)
    dh0 = torch.empty_like(initial_state) if initial_state is not None else _empty_state(q)
    dG = beta.new_empty(beta.shape, dtype=torch.float32) if g is not None else _empty_state(q)
    return e(q), e(k), e(v), e(beta), dh0, dG


def _setup_context(ctx, inputs, output):
    q, k, v, beta, scale, initial_state, _, cu_seqlens = inputs[:8]
    g = inputs[8] if len(inputs) > 8 else None
    ctx.save_for_backward(q, k, v, beta, initial_state, cu_seqlens, g, output[1] if g is not None else None)
    ctx.scale = scale


def _grads(ctx, bwd_op, do, dht):
    q, k, v, beta, initial_state, cu_seqlens, g, ht = ctx.saved_tensors
    do, dht = incoming_grads(do, dht, v)
    dq, dk, dv, db, dh0, dG = bwd_op(q, k, v, beta, ctx.scale, initial_state, cu_seqlens, do, dht, g)
    dg = gate_grad(dG, ht, dht, cu_seqlens, g.dtype) if g is not None else None
    return dq, dk, dv, db, None, (dh0 if initial_state is not None else None), None, None, dg


_fwd_op, _bwd_op = register_autograd_op("recurrent_delta_rule", forward=_fwd, forward_fake=_fwd_fake, backward=_bwd,
                                        backward_fake=_bwd_fake, setup_context=_setup_context, grads=_grads)


def recurrent_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | PackedSequences | None = None,
    g: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused recurrent (gated) delta rule in Triton. Same contract as :func:`deltanet.ops.delta_rule`.

    Meant for decoding (``T = 1`` with a carried state) and short sequences; the chunk op is
    faster for training-length sequences. float64 inputs are computed in float32.

    Example (one decoding step for 8 sequences)::

        >>> B, H, K, V = 8, 4, 64, 64
        >>> S = torch.zeros(B, H, K, V, device="cuda")
        >>> q = torch.randn(B, 1, H, K, device="cuda", dtype=torch.bfloat16)
        >>> k = torch.nn.functional.normalize(torch.randn_like(q), dim=-1)
        >>> v = torch.randn(B, 1, H, V, device="cuda", dtype=torch.bfloat16)
        >>> beta = torch.rand(B, 1, H, device="cuda")
        >>> o, S = recurrent_delta_rule(q, k, v, beta, initial_state=S, output_final_state=True)
        >>> o.shape
        torch.Size([8, 1, 4, 64])
    """
    out_dtype = v.dtype
    scale, q, k, v, beta, h0, g, packed = prepare_inputs(q, k, v, beta, scale, initial_state, output_final_state,
                                                         cu_seqlens, g)
    cu = packed.cu_seqlens if packed is not None else None  # int32, validated: the op reads nothing back
    o, ht = _fwd_op(q, k, v, beta, scale, h0, output_final_state, cu, g)
    return finish_outputs(o, ht, out_dtype, output_final_state)
