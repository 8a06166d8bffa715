"""Input validation shared by every delta-rule backend.

Every public entry point calls :func:`check_inputs` before touching a kernel, so that bad
input surfaces as a ``ValueError`` / ``TypeError`` naming the argument and the expected
shape, never as a Triton crash or a silently wrong answer.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..packing import PackedSequences, check_cu_seqlens

__all__ = ["DeltaRuleShape", "check_inputs", "seq_lengths"]


@dataclass(frozen=True)
class DeltaRuleShape:
    """Sizes of one validated call: ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]``."""

    B: int
    T: int
    H: int
    K: int
    V: int
    N: int  # number of sequences: B, or len(cu_seqlens) - 1
    scale: float
    packed: PackedSequences | None = None  # cu_seqlens, validated, with its host copy and chunk table

    @property
    def offsets(self) -> tuple[int, ...] | None:
        """``cu_seqlens`` on the host, or None for a fixed-length batch."""
        return self.packed.offsets if self.packed is not None else None


# 16-bit inputs with a head dim below this gave wrong results on an H100 with Triton 3.6 (the gated
# rule at K = 48, V = 32 and linear attention at K = 32, V = 16; the same cases are right in fp32 on
# the GPU and in every precision under the CPU interpreter): benchmarks/results/2026-12-07-h100-decode-reuse-family.md
SMALL_DIM_16BIT = 64


def warn_small_16bit_dims(op: str, q: torch.Tensor, v: torch.Tensor) -> None:
    """Warn (once per call site) about the known GPU defect at 16-bit head dims below 64 (not
    inside ``torch.compile``'s tracing, where a warning would break a full graph)."""
    if torch.compiler.is_compiling():
        return
    if (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and min(q.shape[-1], v.shape[-1]) < SMALL_DIM_16BIT):
        warnings.warn(
            f"{op}: {str(q.dtype).removeprefix('torch.')} inputs with head dims K = {q.shape[-1]}, "
            f"V = {v.shape[-1]} (below {SMALL_DIM_16BIT}) gave wrong results on an H100 with Triton 3.6 "
            "(a known, not yet located defect: docs/numerics.md); use float32 inputs or head dims >= 64",
            RuntimeWarning, stacklevel=3)


def _check_tensor(name: str, x, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got {tuple(x.shape)}")


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | PackedSequences | None,
    g: torch.Tensor | None = None,
) -> DeltaRuleShape:
    """Validate a delta-rule call and return its sizes. Raises ValueError / TypeError.

    ``g`` (optional, ``[B, T, H]`` float): the per-token log decay of the gated rule.
    ``cu_seqlens``: a raw tensor is validated and wrapped into a :class:`PackedSequences` here
    (its one host read); a ``PackedSequences`` is taken as built (checked against T and q's device)."""
    _check_tensor("q", q, 4, "[B, T, H, K]")
    B, T, H, K = q.shape
    _check_tensor("k", k, 4, "[B, T, H, K]")
    _check_tensor("v", v, 4, "[B, T, H, V]")
    _check_tensor("beta", beta, 3, "[B, T, H]")
    if tuple(k.shape) != (B, T, H, K):
        raise ValueError(f"k must have the shape of q [B, T, H, K] = {(B, T, H, K)}, got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v must have shape [B, T, H, V] with (B, T, H) = {(B, T, H)}, got {tuple(v.shape)}")
    V = v.shape[3]
    if tuple(beta.shape) != (B, T, H):
        raise ValueError(f"beta must have shape [B, T, H] = {(B, T, H)}, got {tuple(beta.shape)}")
    if min(B, T, H, K, V) < 1:
        raise ValueError(f"all sizes must be >= 1, got B={B}, T={T}, H={H}, K={K}, V={V}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q: {q.dtype}, k: {k.dtype}, v: {v.dtype}")
    if g is not None:
        _check_tensor("g", g, 3, "[B, T, H]")
        if tuple(g.shape) != (B, T, H):
            raise ValueError(f"g must have shape [B, T, H] = {(B, T, H)}, got {tuple(g.shape)}")
    for name, x in (("k", k), ("v", v), ("beta", beta), ("g", g)):
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; all inputs must share a device")
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool, got {type(output_final_state).__name__}")

    if scale is None:
        scale = K ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")

    N, packed = B, None
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, PackedSequences):
            check_cu_seqlens(cu_seqlens)
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
        if B != 1:
            raise ValueError(f"cu_seqlens requires B == 1 (sequences packed along T), got B = {B}")
        packed = PackedSequences.from_cu_seqlens(cu_seqlens, T)  # a raw tensor: its one host read
        N = packed.num_seqs

    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor):
            raise TypeError(f"initial_state must be a torch.Tensor of shape [N, H, K, V], got {type(initial_state).__name__}")
        if not initial_state.is_floating_point():
            raise TypeError(f"initial_state must have a floating-point dtype, got {initial_state.dtype}")
        if tuple(initial_state.shape) != (N, H, K, V):
            raise ValueError(
                f"initial_state must have shape [N, H, K, V] = {(N, H, K, V)} "
                f"(N = {'len(cu_seqlens) - 1' if cu_seqlens is not None else 'B'}), got {tuple(initial_state.shape)}"
            )
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")
    return DeltaRuleShape(B=B, T=T, H=H, K=K, V=V, N=N, scale=float(scale), packed=packed)


def seq_lengths(shape: DeltaRuleShape) -> list[tuple[int, int, int]]:
    """``[(batch index, start, end)]`` for each sequence of a (possibly packed) batch."""
    if shape.offsets is None:
        return [(b, 0, shape.T) for b in range(shape.B)]
    return [(0, s, e) for s, e in zip(shape.offsets[:-1], shape.offsets[1:])]
