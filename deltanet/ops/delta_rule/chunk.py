"""Chunkwise (gated) delta rule in Triton: launchers, the autograd op, and the public function.

The gate is one optional input through every stage: with ``g`` given, ``wy_fwd_kernel`` writes
G (the within-chunk cumulative log decay, fp32) once, the backward reuses the forward's, and
each kernel takes it with ``USE_G``; without it the kernels compile exactly as before. The
gradient of ``g`` is formed by the kernels that form dq and dk, from their fp32 tiles
(README.md §7): the gated rule launches the same kernels as the plain one, no more.

Forward, three kernels (``kernels/``):

1. ``wy_fwd_kernel``  (chunks x heads): A, (I + A)^-1, W, U             -- UT transform
2. ``h_fwd_kernel``   (sequences x heads x V-blocks): chunk states h, v_new = U - W S
3. ``o_fwd_kernel``   (chunks x heads x V-blocks): O = scale (Q h + tril(Q K^T) v_new)

Backward: the forward hands over ``Ai`` and ``v_new`` (keeping them measured 15% and 3% faster
fwd+bwd than recomputing them, H200 2026-11-30); inside ``wy_recomputed_in_backward``
(``backward_memory``) it keeps only its inputs and the backward reruns ``wy_fwd_kernel`` and
``h_fwd_kernel`` as the forward did (deltanet-340m: 4,096 fewer bytes per token and layer, 3 GiB at
32K tokens); W comes from one product per chunk
(``w_fwd_kernel``), the states again from ``h_fwd_kernel`` as a prefix sum of ``K^T v_new`` (no
solve, no ``W S`` on the sequential path), then the reverse recurrence (``dh_bwd_kernel``, which also forms the intra-chunk dv term) and the
per-chunk gradients: one kernel (``chunk_grads_kernel``) at K <= 64 with 16-bit inputs, otherwise
``dqkw_bwd_kernel`` and the way back through the UT transform, ``wy_bwd_kernel``.

Launch settings: a :class:`~.config.ChunkKernelConfig`, from ``select_config`` once per shape or
given by the caller (``kernel_config=``), passed to every launcher; register and shared-memory
use: benchmarks/kernel_resources.py.

Every tensor is viewed as packed tokens ``[B * T, H, D]``; a fixed-length batch is the packed
case with ``cu_seqlens = [0, T, 2T, ...]``, so there is one code path, and a chunk never
crosses a sequence boundary. The ops are registered with ``torch.library`` (fake
implementations included) so that ``torch.compile`` traces through them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton

from ..packing import PackedSequences
from ..registry import empty_state as _empty_state
from ..registry import register_autograd_op
from . import backward_memory
from .config import ChunkKernelConfig, device_sms, select_config
from .interpreter import interpreted
from .kernels.grads import chunk_grads_kernel
from .kernels.output import dqkw_bwd_kernel, o_fwd_kernel
from .kernels.state import dh_bwd_kernel, h_fwd_kernel
from .kernels.wy import w_fwd_kernel, wy_bwd_kernel, wy_fwd_kernel
from .utils import check_inputs, warn_small_16bit_dims

__all__ = ["chunk_delta_rule"]

BT = 64  # chunk size: the UT transform inverts 64x64 triangles (four 16x16 blocks)
MAX_HEAD_DIM = 256


# Tests set this: every buffer the launchers allocate starts as NaN, so that an element a
# kernel forgets to write shows up in the result instead of passing as stale memory.
POISON = False


def _new(x: torch.Tensor, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    out = x.new_empty(shape if shape else x.shape, dtype=dtype if dtype is not None else x.dtype)
    return out.fill_(float("nan")) if POISON else out


def check_device(x: torch.Tensor, name: str = "q") -> None:
    if not x.is_cuda and not interpreted():
        raise ValueError(
            f"{name} is on {x.device}: the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set "
            "before triton is imported (CPU, slow); use backend='torch' on CPU"
        )


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs get full fp32 products (tf32 would cost ~1e-3 relative error); in bf16/fp16
    # the operands are already low precision and fp32 x fp32 products (the UT solve, the
    # backward through the inverse) use tf32.
    return "ieee" if dtype == torch.float32 else "tf32"


def prepare_inputs(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, g=None):
    """Entry checks shared by the Triton ops: validation, head-dim limit, device. float64 inputs
    are computed in float32 (no fp64 tensor-core path); ``g`` always in float32. Returns
    ``(scale, q, k, v, beta, h0, g, packed)``; ``packed``: the validated
    :class:`~deltanet.ops.packing.PackedSequences` (a raw ``cu_seqlens`` wrapped here), or None."""
    shape = check_inputs(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, g)
    if max(shape.K, shape.V) > MAX_HEAD_DIM:
        raise ValueError(f"the Triton kernels support head dims K, V <= {MAX_HEAD_DIM}, got K={shape.K}, "
                         f"V={shape.V}; use backend='torch'")
    check_device(q)
    if v.dtype == torch.float64:
        q, k, v, beta = q.float(), k.float(), v.float(), beta.float()
    h0 = initial_state.float() if initial_state is not None else None
    g = g.float() if g is not None else None
    return shape.scale, q, k, v, beta, h0, g, shape.packed


def finish_outputs(o, ht, out_dtype, output_final_state):
    """``(o, final_state or None)``, cast back to float64 for float64 inputs."""
    if out_dtype == torch.float64:
        o, ht = o.double(), ht.double()
    return o, (ht if output_final_state else None)


def incoming_grads(do, dht, v):
    """The autograd backward's output gradients as the kernels take them: zeros for an unused
    output ``o``, None for an absent (0-element) or unused final state."""
    if do is None:
        do = torch.zeros_like(v)
    if dht is not None and dht.numel() == 0:
        dht = None
    return do, dht


class ChunkIndex(NamedTuple):
    """Where the chunks are: ``cu`` int32 ``[N + 1]``, ``table [chunks, 2]`` int32 = (sequence,
    chunk within it), ``offsets [N]`` int32 (each sequence's first chunk), ``chunks`` (a host int)."""

    cu: torch.Tensor
    table: torch.Tensor
    offsets: torch.Tensor
    chunks: int


@functools.lru_cache(maxsize=64)
def _fixed_index(B: int, T: int, device: torch.device) -> ChunkIndex:
    NT = triton.cdiv(T, BT)
    cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=device)
    table = torch.stack([torch.arange(B).repeat_interleave(NT), torch.arange(NT).repeat(B)], 1)
    offsets = torch.arange(0, B * NT, NT)
    return ChunkIndex(cu, table.to(torch.int32).to(device), offsets.to(torch.int32).to(device), B * NT)


def chunk_index(cu_seqlens: torch.Tensor | PackedSequences | ChunkIndex | None, B: int, T: int,
                device: torch.device) -> ChunkIndex:
    """The :class:`ChunkIndex` of a batch: built once per shape for fixed-length batches, taken
    from a :class:`PackedSequences` (or an index already built) without reading anything back; a
    raw ``cu_seqlens`` tensor is read to the host here (direct launcher calls only: the ops wrap
    it once at their entry)."""
    if isinstance(cu_seqlens, ChunkIndex):
        return cu_seqlens
    if cu_seqlens is None:
        return _fixed_index(B, T, device)
    packed = PackedSequences.from_cu_seqlens(cu_seqlens, B * T)
    table, offsets = packed.chunks(BT)
    return ChunkIndex(packed.cu_seqlens, table, offsets, table.shape[0])


def _op_index(cu_seqlens: torch.Tensor | None, chunk_table: torch.Tensor | None,
              chunk_offsets: torch.Tensor | None) -> torch.Tensor | ChunkIndex | None:
    """The registered ops' index arguments as ``chunk_fwd`` / ``chunk_bwd`` take them: the table
    built before the op (no host read), else ``cu_seqlens`` as given (a direct call of the op)."""
    if chunk_table is None:
        return cu_seqlens
    return ChunkIndex(cu_seqlens, chunk_table, chunk_offsets, chunk_table.shape[0])


def launch_config(kernel_config: ChunkKernelConfig | None, N: int, H: int, K: int, V: int, x: torch.Tensor,
                  gated: bool) -> ChunkKernelConfig:
    """The caller's config (checked against the shape), or the defaults for this shape and device.
    Fixed per shape, no autotuning: a cold start compiles each kernel once."""
    if kernel_config is not None:
        kernel_config.check_shape(K)
        return kernel_config
    return select_config(N, H, K, V, x.dtype, num_sms=device_sms(x.device), gated=gated, interpreter=interpreted())


def _full(D: int) -> int:
    """A block holding all of a head dim (the state and fused-gradient kernels)."""
    return max(16, triton.next_power_of_2(D))


def _wy(k, v, beta, g, idx, cfg: ChunkKernelConfig):
    """The UT transform: ``(w, u, ai, gc)``; ``gc``: G, the within-chunk cumulative log decay
    (fp32 ``[TT, H]``, written by the same kernel from ``g``), or None for the plain rule."""
    cu, table, _, NTT = idx
    TT, H, K = k.shape
    V = v.shape[-1]
    w, u = _new(k), _new(v)
    ai = _new(k, TT, H, BT, dtype=torch.float32)  # fp32: also the scratch of the in-kernel solve
    gc = _new(g, dtype=torch.float32) if g is not None else None
    wy_fwd_kernel[(NTT, H)](k, v, beta, g if g is not None else beta, gc if gc is not None else beta, w, u, ai, cu,
                            table, H=H, K=K, V=V, BT=BT, BK=cfg.bk, BV=cfg.bv, PREC=_prec(k.dtype),
                            USE_G=g is not None, num_warps=cfg.warps_wy)
    return w, u, ai, gc


def _w(k, beta, gc, ai, idx, cfg: ChunkKernelConfig):
    """W from a stored ``ai`` (no solve)."""
    cu, table, _, NTT = idx
    TT, H, K = k.shape
    w = _new(k)
    w_fwd_kernel[(NTT, H)](k, beta, gc if gc is not None else beta, w, ai, cu, table, H=H, K=K, BT=BT, BK=cfg.bk,
                           PREC=_prec(k.dtype), USE_G=gc is not None, num_warps=cfg.warps_wy)
    return w


def _states(k, w, u, gc, h0, ht, idx, N, cfg: ChunkKernelConfig, v_new=None):
    """Chunk states ``h`` and (unless given) ``v_new``. With ``v_new`` given, ``w`` and ``u`` are
    not read: the states are the prefix sums of ``K^T v_new``."""
    cu, _, offsets, NTT = idx
    TT, H, K = k.shape
    known = v_new is not None
    V = v_new.shape[-1] if known else u.shape[-1]
    h = _new(k, NTT, H, K, V)
    if not known:
        v_new = _new(u)
    BV = cfg.bv_state
    h_fwd_kernel[(triton.cdiv(V, BV), N * H)](
        k, k if known else w, v_new if known else u, v_new, gc if gc is not None else k, h,
        h0 if h0 is not None else k, ht if ht is not None else k, cu, offsets,
        H=H, K=K, V=V, BT=BT, BK=_full(K), BV=BV, USE_H0=h0 is not None, STORE_HT=ht is not None,
        PREC=_prec(k.dtype), ADDR64=cfg.state_addr64, KNOWN_VNEW=known, USE_G=gc is not None,
        num_warps=cfg.warps_state, num_stages=cfg.stages_state)
    return h, v_new


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, ...]`` -> contiguous ``[B * T, H, ...]``."""
    return x.contiguous().flatten(0, 1)


def chunk_fwd(q, k, v, beta, scale: float, h0, output_final_state: bool, cu_seqlens, g=None, *,
              config: ChunkKernelConfig | None = None):
    """Launch the forward (``config``: the launch settings, or None for ``select_config``'s).
    Returns ``(o [B, T, H, V], final_state [N, H, K, V] fp32 or None,
    ai [B * T, H, BT] fp32, v_new [B * T, H, V], gc [B * T, H] fp32 or None)``: ``ai`` (the chunks'
    (I + A)^-1), the pseudo-values ``v_new`` and, gated, ``gc`` (G, the within-chunk cumulative log
    decay) are what the backward reuses. ``cu_seqlens``: None (fixed length), a tensor, a
    ``PackedSequences`` or a ``ChunkIndex`` (see :func:`chunk_index`)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    idx = chunk_index(cu_seqlens, B, T, q.device)
    N = idx[0].numel() - 1
    cfg = launch_config(config, N, H, K, V, q, gated=g is not None)
    q, k, v, beta = _flat(q), _flat(k), _flat(v), _flat(beta)
    h0 = h0.contiguous() if h0 is not None else None
    ht = _new(q, N, H, K, V, dtype=torch.float32) if output_final_state else None
    w, u, ai, gc = _wy(k, v, beta, _flat(g) if g is not None else None, idx, cfg)
    h, v_new = _states(k, w, u, gc, h0, ht, idx, N, cfg)
    del w, u
    o = _new(v)
    cu, table, _, NTT = idx
    o_fwd_kernel[(triton.cdiv(V, cfg.bv_o), NTT, H)](
        q, k, v_new, gc if gc is not None else q, h, o, cu, table, scale, H=H, K=K, V=V, BT=BT, BK=cfg.bk,
        BV=cfg.bv_o, PREC=_prec(q.dtype), USE_G=gc is not None, num_warps=cfg.warps_o,
        num_stages=cfg.stages_o)
    return o.view(B, T, H, V), ht, ai, v_new, gc


def chunk_bwd(q, k, v, beta, scale: float, h0, cu_seqlens, do, dht, ai, v_new, gc=None, *,
              config: ChunkKernelConfig | None = None):
    """Launch the backward (``ai``, ``v_new`` and, gated, ``gc``: the forward's; ``config`` as in
    ``chunk_fwd``). ``ai`` and ``v_new`` None: the forward kept only its inputs, and ``gc`` is then
    the gate ``g`` itself ``[B, T, H]`` (or None): the UT transform and the state pass run again as
    in the forward. Returns ``(dq, dk, dv, dbeta, dh0 or None, dg or None)``, the gradients in the
    input dtype but ``dg [B, T, H]``, fp32 (the gradient of ``g``; None for the plain rule)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    idx = chunk_index(cu_seqlens, B, T, q.device)
    cu, table, offsets, NTT = idx
    N = cu.numel() - 1
    cfg = launch_config(config, N, H, K, V, q, gated=gc is not None)
    q, k, v, beta, do = _flat(q), _flat(k), _flat(v), _flat(beta), _flat(do.to(v.dtype))
    h0 = h0.contiguous() if h0 is not None else None
    dht = dht.contiguous() if dht is not None else None
    prec = _prec(q.dtype)
    if ai is None:  # recompute: the forward's first two kernels again (W, U, Ai, G; h, v_new)
        w, u, ai, gc = _wy(k, v, beta, _flat(gc) if gc is not None else None, idx, cfg)
        h, v_new = _states(k, w, u, gc, h0, None, idx, N, cfg)
        del u
    else:
        w = _w(k, beta, gc, ai, idx, cfg)
        h, _ = _states(k, None, None, gc, h0, None, idx, N, cfg, v_new=v_new)
    gp = gc if gc is not None else q  # (a pointer the kernels ignore without USE_G)
    dh = _new(h)
    dvn = _new(v)
    dh0 = _new(q, N, H, K, V, dtype=torch.float32) if h0 is not None else None
    BV = cfg.bv_state
    dh_bwd_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, w, gp, do, dvn, dh, dht if dht is not None else q,
        dh0 if dh0 is not None else q, cu, offsets, scale, H=H, K=K, V=V, BT=BT, BK=_full(K), BV=BV,
        USE_DHT=dht is not None, STORE_DH0=dh0 is not None, PREC=prec,
        ADDR64=cfg.state_addr64, USE_G=gc is not None,
        num_warps=cfg.warps_state, num_stages=cfg.stages_state)
    del w
    dq, dv, dbeta = _new(q), _new(v), _new(beta)
    # Gated: dg (fp32) is formed by the kernels that form dq and dk, from their fp32 tiles.
    dg = _new(q, *beta.shape, dtype=torch.float32) if gc is not None else None
    if cfg.grads_fused:
        dk = _new(k)
        chunk_grads_kernel[(NTT, H)](
            q, k, v, beta, gp, ai, v_new, h, dh, do, dvn, dq, dk, dv, dbeta, dg if dg is not None else q,
            cu, table, scale, H=H, K=K, V=V, BT=BT, BK=_full(K), BV=cfg.bv_grads, PREC=prec,
            USE_G=gc is not None, num_warps=cfg.warps_grads, num_stages=cfg.stages_grads)
    else:
        states = [h, v_new, dh]
        del h, v_new, dh  # _wy_grads frees them (their last use) before its second kernel
        dk = _wy_grads(q, k, v, beta, gc, ai, states, do, dvn, dq, dv, dbeta, dg, scale, idx, cfg)
    shape = (B, T, H)
    dg = dg.view(shape) if dg is not None else None
    return dq.view(*shape, K), dk.view(*shape, K), dv.view(*shape, V), dbeta.view(shape), dh0, dg


def _wy_grads(q, k, v, beta, gc, ai, states, do, dvn, dq, dv, dbeta, dg, scale, idx, cfg):
    """The two-kernel form of ``chunk_grads_kernel``: ``dqkw_bwd`` (writes dq, dW and a partial
    dK) and the way back through the UT transform. ``states = [h, v_new, dh]`` is emptied after
    its use, so those buffers are freed before the second kernel's. Writes dq, dv, dbeta (and, gated,
    dg: ``dqkw_bwd`` writes one fp32 ``[TT, H]`` part of its terms per K-block, ``wy_bwd`` sums them
    in a fixed order, deterministic, no atomics); returns dk."""
    h, v_new, dh = states
    states.clear()
    cu, table, _, NTT = idx
    TT, H, K = k.shape
    V = v.shape[-1]
    prec = _prec(q.dtype)
    dk_part = _new(k, dtype=torch.float32)
    dw = _new(k)
    gp = gc if gc is not None else q
    parts = triton.cdiv(K, cfg.bk_dqkw)
    dg_part = _new(q, parts, TT, H, dtype=torch.float32) if gc is not None else None
    dgp = dg_part if dg_part is not None else q  # (pointers the kernels ignore without USE_G)
    dqkw_bwd_kernel[(parts, NTT, H)](
        q, k, v_new, gp, h, dh, do, dvn, dq, dk_part, dw, dgp, cu, table, scale, TT * H, H=H, K=K,
        V=V, BT=BT, BK=cfg.bk_dqkw, BV=cfg.bv, PREC=prec, USE_G=gc is not None,
        num_warps=cfg.warps_dqkw, num_stages=cfg.stages_dqkw)
    del h, dh, v_new
    dk = _new(k)
    wy_bwd_kernel[(NTT, H)](
        k, v, beta, gp, ai, dw, dvn, dk_part, dk, dv, dbeta, dgp, dg if dg is not None else q, cu, table, TT * H,
        H=H, K=K, V=V, BT=BT, BK=cfg.bk, BV=cfg.bv, PREC=prec, USE_G=gc is not None,
        DG_PARTS=parts if gc is not None else 1, num_warps=cfg.warps_wyb)
    return dk


# --- torch.library registration -------------------------------------------------------------
# ``kernel_config``: a ChunkKernelConfig as ``to_list()`` (the op schema takes ints, not objects),
# or None for the shape's defaults.

def _config(kernel_config: list[int] | None) -> ChunkKernelConfig | None:
    return ChunkKernelConfig.from_list(kernel_config) if kernel_config is not None else None


def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, scale: float,
            initial_state: torch.Tensor | None, output_final_state: bool,
            cu_seqlens: torch.Tensor | None, g: torch.Tensor | None = None,
            kernel_config: list[int] | None = None, chunk_table: torch.Tensor | None = None,
            chunk_offsets: torch.Tensor | None = None, keep_wy: bool = True) -> tuple[
                torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # chunk_table / chunk_offsets: the PackedSequences' (chunk_delta_rule passes them, so neither
    # this op nor its backward reads cu_seqlens back); None: built here from cu_seqlens.
    # keep_wy: read by the autograd context only (what the backward gets)
    o, ht, ai, v_new, gc = chunk_fwd(q, k, v, beta, scale, initial_state, output_final_state,
                                     _op_index(cu_seqlens, chunk_table, chunk_offsets), g,
                                     config=_config(kernel_config))
    return o, ht if ht is not None else _empty_state(q), ai, v_new, gc if gc is not None else _empty_state(q)


def _fwd_fake(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, g=None, kernel_config=None,
              chunk_table=None, chunk_offsets=None, keep_wy=True):
    B, T, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    ht = q.new_empty(N, H, K, v.shape[-1], dtype=torch.float32) if output_final_state else _empty_state(q)
    ai = q.new_empty(B * T, H, BT, dtype=torch.float32)
    v_new = v.new_empty(B * T, H, v.shape[-1])
    gc = q.new_empty(B * T, H, dtype=torch.float32) if g is not None else _empty_state(q)
    return torch.empty_like(v, memory_format=torch.contiguous_format), ht, ai, v_new, gc


def _bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, scale: float,
            initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, do: torch.Tensor,
            dht: torch.Tensor | None, ai: torch.Tensor | None, v_new: torch.Tensor | None,
            gc: torch.Tensor | None = None,
            kernel_config: list[int] | None = None,
            chunk_table: torch.Tensor | None = None, chunk_offsets: torch.Tensor | None = None) -> tuple[
                torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    idx = _op_index(cu_seqlens, chunk_table, chunk_offsets)
    # gc: the forward's G (the within-chunk cumulative log decay), None for the plain rule; with ai
    # and v_new None (kept inputs only), the gate g itself
    dq, dk, dv, db, dh0, dg = chunk_bwd(q, k, v, beta, scale, initial_state, idx, do, dht, ai, v_new, gc,
                                        config=_config(kernel_config))
    return dq, dk, dv, db, dh0 if dh0 is not None else _empty_state(q), dg if dg is not None else _empty_state(q)


def _bwd_fake(q, k, v, beta, scale, initial_state, cu_seqlens, do, dht, ai, v_new, gc=None,
              kernel_config=None, chunk_table=None, chunk_offsets=None):
    e = functools.partial(torch.empty_like, memory_format=torch.contiguous_format)
    dh0 = torch.empty_like(initial_state) if initial_state is not None else _empty_state(q)
    dG = beta.new_empty(beta.shape, dtype=torch.float32) if gc is not None else _empty_state(q)
    return e(q), e(k), e(v), e(beta), dh0, dG


def _setup_context(ctx, inputs, output):
    q, k, v, beta, scale, initial_state, _, cu_seqlens = inputs[:8]
    rest = tuple(inputs[8:])  # the optional inputs, their defaults where a caller left them out
    g, kernel_config, chunk_table, chunk_offsets, keep_wy = rest + (None, None, None, None, True)[len(rest):]
    # ai: fp32 [B * T, H, 64], 256 B per token and head; v_new: the size of v. The backward
    # would rebuild both and hold them until its end, so keeping them
    # does not raise the op's fwd+bwd peak (a model holds them per layer, like an activation).
    # Gated: G (fp32, 4 B per token and head, the forward's: the backward does not form it again)
    # instead of g. The chunk index (cu_seqlens with its chunk table) is kept as it came in:
    # backward reads nothing back.
    # keep_wy False: neither ai nor v_new, and g itself in G's place (the backward forms G again)
    if keep_wy:
        ai, v_new, gc = output[2], output[3], output[4] if g is not None else None
    else:
        ai, v_new, gc = None, None, g
    ctx.save_for_backward(q, k, v, beta, initial_state, cu_seqlens, ai, v_new, gc, chunk_table, chunk_offsets)
    ctx.scale = scale
    ctx.kernel_config = kernel_config  # the backward launches as the forward did
    # Unused output gradients arrive as None instead of zero tensors: ai's would be a 128 MiB
    # zeros buffer (32K tokens x 16 heads) alive through the whole backward.
    ctx.set_materialize_grads(False)


def _grads(ctx, bwd_op, do, dht, _dai, _dvn, _dgc):
    q, k, v, beta, initial_state, cu_seqlens, ai, v_new, gc, chunk_table, chunk_offsets = ctx.saved_tensors
    do, dht = incoming_grads(do, dht, v)
    dq, dk, dv, db, dh0, dg = bwd_op(q, k, v, beta, ctx.scale, initial_state, cu_seqlens, do, dht, ai, v_new, gc,
                                     ctx.kernel_config, chunk_table, chunk_offsets)
    dg = dg if gc is not None else None
    return dq, dk, dv, db, None, (dh0 if initial_state is not None else None), None, None, dg, None, None, None, None


_fwd_op, _bwd_op = register_autograd_op("chunk_delta_rule", forward=_fwd, forward_fake=_fwd_fake, backward=_bwd,
                                        backward_fake=_bwd_fake, setup_context=_setup_context, grads=_grads)


def chunk_delta_rule(
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
    kernel_config: ChunkKernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise (gated) delta rule in Triton. Same contract as :func:`deltanet.ops.delta_rule`.

    bf16 / fp16 / fp32 inputs, fp32 accumulation; float64 inputs are computed in float32 and
    cast back. Head dims up to 256. Differentiable in q, k, v, beta and initial_state.
    ``kernel_config``: launch settings for this call (forward and backward), or None for
    ``select_config``'s defaults for the shape.

    Example (CUDA, or CPU with ``TRITON_INTERPRET=1`` set before importing triton)::

        >>> B, T, H, K, V = 2, 100, 4, 64, 32
        >>> q = torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16)
        >>> k = torch.nn.functional.normalize(torch.randn_like(q), dim=-1)
        >>> v = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
        >>> beta = torch.rand(B, T, H, device="cuda").sigmoid()
        >>> o, S = chunk_delta_rule(q, k, v, beta, output_final_state=True)
        >>> o.shape, S.dtype
        (torch.Size([2, 100, 4, 32]), torch.float32)
    """
    if kernel_config is not None and not isinstance(kernel_config, ChunkKernelConfig):
        raise TypeError(f"kernel_config must be a deltanet.ops.ChunkKernelConfig or None, got "
                        f"{type(kernel_config).__name__}")
    out_dtype = v.dtype
    warn_small_16bit_dims("chunk_delta_rule", q, v)
    scale, q, k, v, beta, h0, g, packed = prepare_inputs(q, k, v, beta, scale, initial_state, output_final_state,
                                                         cu_seqlens, g)
    if kernel_config is not None:
        kernel_config.check_shape(q.shape[-1])  # before any kernel, as the other input checks
        kernel_config = kernel_config.to_list()
    cu = table = firsts = None
    if packed is not None:  # the chunk table built with it: the op and its backward read nothing back
        cu, (table, firsts) = packed.cu_seqlens, packed.chunks(BT)
    o, ht, _, _, _ = _fwd_op(q, k, v, beta, scale, h0, output_final_state, cu, g, kernel_config, table, firsts,
                             backward_memory.KEEP_WY_FOR_BACKWARD)
    return finish_outputs(o, ht, out_dtype, output_final_state)

