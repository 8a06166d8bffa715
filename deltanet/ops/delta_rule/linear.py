"""Causal additive linear attention on the chunk engine's kernels (Triton): launchers, the
autograd op, the public function.

Additive linear attention, ``S_t = S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``, is the delta
rule without its erase term: the chunk algorithm with ``W = 0`` and ``U = V``, so no UT
transform. The engine's stages cover it unchanged:

- forward: ``h_fwd_kernel`` with the pseudo-values given (``v_new = v``: the chunk states are
  the prefix sums of ``K^T V``), then ``o_fwd_kernel``: ``O = scale (Q h + tril(Q K^T) V)``;
- backward: the states again (the op keeps only its inputs), ``dh_bwd_kernel`` with ``W = 0``
  (its ``dv`` output is then the gradient of ``v`` itself, and the state gradient needs no
  ``W^T dv`` term), and ``dqkw_bwd_kernel``, whose partial key gradient (output and state terms)
  is then all of ``dk``: the way back through the UT transform (``wy_bwd_kernel``) has nothing
  to do.

Same layouts, packed sequences, initial / final states and dtypes as
:func:`~deltanet.ops.delta_rule.chunk.chunk_delta_rule` (fp32 states and accumulation; float64
inputs are computed in float32). The PyTorch chunkwise form (any device, the float64 path) is
``deltanet.layers.linear_attention.linear_attention(..., backend="torch")``.
"""

from __future__ import annotations

import functools

import torch
import triton

from ..registry import empty_state as _empty_state
from ..registry import register_autograd_op
from .chunk import (BT, _flat, _full, _new, _op_index, _prec, _states, chunk_index, finish_outputs, incoming_grads,
                    launch_config, prepare_inputs)
from .kernels.output import dqkw_bwd_kernel, o_fwd_kernel
from .kernels.state import dh_bwd_kernel
from .utils import warn_small_16bit_dims

__all__ = ["chunk_linear_attention"]


def linear_fwd(q, k, v, scale: float, h0, output_final_state: bool, cu_seqlens):
    """``(o [B, T, H, V] in v's dtype, final state [N, H, K, V] fp32 or None)``; ``cu_seqlens``:
    None, a tensor, a ``PackedSequences`` or a ``ChunkIndex``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    idx = chunk_index(cu_seqlens, B, T, q.device)
    N = idx.cu.numel() - 1
    cfg = launch_config(None, N, H, K, V, q, gated=False)
    q, k, v = _flat(q), _flat(k), _flat(v)
    h0 = h0.contiguous() if h0 is not None else None
    ht = _new(q, N, H, K, V, dtype=torch.float32) if output_final_state else None
    h, _ = _states(k, None, None, None, h0, ht, idx, N, cfg, v_new=v)
    o = _new(v)
    o_fwd_kernel[(triton.cdiv(V, cfg.bv_o), idx.chunks, H)](
        q, k, v, q, h, o, idx.cu, idx.table, scale, H=H, K=K, V=V, BT=BT, BK=cfg.bk, BV=cfg.bv_o,
        PREC=_prec(q.dtype), num_warps=cfg.warps_o, num_stages=cfg.stages_o)
    return o.view(B, T, H, V), ht


def linear_bwd(q, k, v, scale: float, h0, cu_seqlens, do, dht):
    """``(dq, dk, dv, dh0 or None)`` in the input dtypes (dh0 fp32); the states are rebuilt from
    the inputs first."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    idx = chunk_index(cu_seqlens, B, T, q.device)
    N = idx.cu.numel() - 1
    cfg = launch_config(None, N, H, K, V, q, gated=False)
    q, k, v, do = _flat(q), _flat(k), _flat(v), _flat(do.to(v.dtype))
    h0 = h0.contiguous() if h0 is not None else None
    dht = dht.contiguous() if dht is not None else None
    prec = _prec(q.dtype)
    h, _ = _states(k, None, None, None, h0, None, idx, N, cfg, v_new=v)
    w = torch.zeros_like(k)  # no erase term: W = 0 in the state gradient's recurrence
    dh, dv = _new(h), _new(v)
    dh0 = _new(q, N, H, K, V, dtype=torch.float32) if h0 is not None else None
    dh_bwd_kernel[(triton.cdiv(V, cfg.bv_state), N * H)](
        q, k, w, q, do, dv, dh, dht if dht is not None else q, dh0 if dh0 is not None else q, idx.cu,
        idx.offsets, scale, H=H, K=K, V=V, BT=BT, BK=_full(K), BV=cfg.bv_state, USE_DHT=dht is not None,
        STORE_DH0=dh0 is not None, PREC=prec, ADDR64=cfg.state_addr64,
        num_warps=cfg.warps_state, num_stages=cfg.stages_state)
    TT = k.shape[0]
    dq, dk, dw = _new(q), _new(k, dtype=torch.float32), w  # dW (unused) overwrites the zeros
    dqkw_bwd_kernel[(triton.cdiv(K, cfg.bk_dqkw), idx.chunks, H)](
        q, k, v, q, h, dh, do, dv, dq, dk, dw, q, idx.cu, idx.table, scale, TT * H, H=H, K=K, V=V, BT=BT,
        BK=cfg.bk_dqkw, BV=cfg.bv, PREC=prec, num_warps=cfg.warps_dqkw, num_stages=cfg.stages_dqkw)
    shape = (B, T, H)
    return dq.view(*shape, K), dk.to(k.dtype).view(*shape, K), dv.view(*shape, V), dh0


# --- torch.library registration -------------------------------------------------------------

def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, initial_state: torch.Tensor | None,
         output_final_state: bool, cu_seqlens: torch.Tensor | None, chunk_table: torch.Tensor | None = None,
         chunk_offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    o, ht = linear_fwd(q, k, v, scale, initial_state, output_final_state,
                       _op_index(cu_seqlens, chunk_table, chunk_offsets))
    return o, ht if ht is not None else _empty_state(q)


def _fwd_fake(q, k, v, scale, initial_state, output_final_state, cu_seqlens, chunk_table=None, chunk_offsets=None):
    B, T, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    ht = q.new_empty(N, H, K, v.shape[-1], dtype=torch.float32) if output_final_state else _empty_state(q)
    return torch.empty_like(v, memory_format=torch.contiguous_format), ht


def _bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, initial_state: torch.Tensor | None,
         cu_seqlens: torch.Tensor | None, do: torch.Tensor, dht: torch.Tensor | None,
         chunk_table: torch.Tensor | None = None, chunk_offsets: torch.Tensor | None = None) -> tuple[
             torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dh0 = linear_bwd(q, k, v, scale, initial_state, _op_index(cu_seqlens, chunk_table, chunk_offsets),
                                 do, dht)
    return dq, dk, dv, dh0 if dh0 is not None else _empty_state(q)


def _bwd_fake(q, k, v, scale, initial_state, cu_seqlens, do, dht, chunk_table=None, chunk_offsets=None):
    e = functools.partial(torch.empty_like, memory_format=torch.contiguous_format)
    return e(q), e(k), e(v), (torch.empty_like(initial_state) if initial_state is not None else _empty_state(q))


def _setup_context(ctx, inputs, output):
    q, k, v, scale, initial_state, _, cu_seqlens = inputs[:7]
    rest = tuple(inputs[7:])
    chunk_table, chunk_offsets = rest + (None, None)[len(rest):]
    # only the inputs: the backward rebuilds the chunk states (one pass, no solve)
    ctx.save_for_backward(q, k, v, initial_state, cu_seqlens, chunk_table, chunk_offsets)
    ctx.scale = scale
    ctx.set_materialize_grads(False)


def _grads(ctx, bwd_op, do, dht):
    q, k, v, initial_state, cu_seqlens, chunk_table, chunk_offsets = ctx.saved_tensors
    do, dht = incoming_grads(do, dht, v)
    dq, dk, dv, dh0 = bwd_op(q, k, v, ctx.scale, initial_state, cu_seqlens, do, dht, chunk_table, chunk_offsets)
    return dq, dk, dv, None, (dh0 if initial_state is not None else None), None, None, None, None


_fwd_op, _bwd_op = register_autograd_op("chunk_linear_attention", forward=_fwd, forward_fake=_fwd_fake,
                                        backward=_bwd, backward_fake=_bwd_fake, setup_context=_setup_context,
                                        grads=_grads)


def chunk_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                           initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                           cu_seqlens=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal additive linear attention in Triton: ``q, k [B, T, H, K]``, ``v [B, T, H, V]``,
    states ``[N, H, K, V]``, ``cu_seqlens`` a tensor or :class:`~deltanet.ops.PackedSequences`
    (``B == 1``). Returns ``(o [B, T, H, V] in v's dtype, final state float32 or None)``;
    differentiable in q, k, v and the initial state. Checks and errors as ``chunk_delta_rule``'s.

    Example (CUDA, or CPU with ``TRITON_INTERPRET=1`` set before importing triton)::

        >>> q = torch.nn.functional.normalize(torch.randn(1, 100, 2, 32, device="cuda"), dim=-1)
        >>> o, S = chunk_linear_attention(q, q, torch.randn(1, 100, 2, 16, device="cuda"), output_final_state=True)
        >>> o.shape, S.shape
        (torch.Size([1, 100, 2, 16]), torch.Size([1, 2, 32, 16]))
    """
    out_dtype = v.dtype
    warn_small_16bit_dims("chunk_linear_attention", q, v)
    ones = q.new_ones(()).expand(q.shape[:3])  # the checks' beta: no such input here
    scale, q, k, v, _, h0, _, packed = prepare_inputs(q, k, v, ones, scale, initial_state, output_final_state,
                                                      cu_seqlens)
    cu = table = firsts = None
    if packed is not None:  # the chunk table built once: the op and its backward read nothing back
        cu, (table, firsts) = packed.cu_seqlens, packed.chunks(BT)
    o, ht = _fwd_op(q, k, v, scale, h0, output_final_state, cu, table, firsts)
    return finish_outputs(o, ht, out_dtype, output_final_state)
