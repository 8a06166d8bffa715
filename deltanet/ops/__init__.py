"""Sequence-mixing operators. ``delta_rule`` (plain or gated) and ``delta_product`` are the entry
points; they dispatch to a backend.

Backends (the contract: docs/contracts.md):

- ``"triton"``    chunkwise WY algorithm in Triton (GPU; CPU under ``TRITON_INTERPRET=1``)
- ``"recurrent"`` fused recurrent Triton kernel, the decode path
- ``"torch"``     chunkwise WY algorithm in plain PyTorch, any device
- ``"reference"`` step-by-step recurrence, the oracle
- ``"auto"``      ``"triton"`` for CUDA tensors, ``"torch"`` otherwise

The Triton chunk kernels' launch settings are a :class:`ChunkKernelConfig`, chosen per shape by
:func:`select_config`; ``kernel_config=`` overrides them for one call.
"""

from __future__ import annotations

import torch

from .delta_rule import delta_product_reference, delta_rule_chunkwise_torch, delta_rule_reference
from .delta_rule.backward_memory import wy_recomputed_in_backward
from .delta_rule.config import ChunkKernelConfig, device_sms, select_config
from .delta_rule.product import interleave_product, take_last_step
from .packing import PackedSequences

BACKENDS = ("auto", "triton", "recurrent", "torch", "reference")

__all__ = [
    "BACKENDS",
    "ChunkKernelConfig",
    "PackedSequences",
    "chunk_delta_rule",
    "delta_product",
    "delta_product_reference",
    "delta_rule",
    "delta_rule_chunkwise_torch",
    "delta_rule_reference",
    "device_sms",
    "recurrent_delta_rule",
    "select_config",
    "wy_recomputed_in_backward",
]


# The Triton backends are imported on first use, so that ``import deltanet`` works where Triton
# doesn't (macOS, Windows). Plain ``from ... import`` statements (not importlib) keep the
# wrappers traceable by torch.compile(fullgraph=True).
_NO_TRITON = "{} needs Triton (Linux: pip install triton); on other platforms use backend='torch'"


def chunk_delta_rule(q, k, v, beta, *, g=None, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, kernel_config=None):
    """Chunkwise delta rule in Triton (backend ``"triton"``). Same contract as :func:`delta_rule`."""
    try:
        from .delta_rule.chunk import chunk_delta_rule as impl
    except ModuleNotFoundError as e:
        if e.name != "triton":
            raise
        raise ImportError(_NO_TRITON.format("chunk_delta_rule")) from e
    return impl(q, k, v, beta, g=g, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, kernel_config=kernel_config)


def recurrent_delta_rule(q, k, v, beta, *, g=None, scale=None, initial_state=None, output_final_state=False,
                         cu_seqlens=None):
    """Fused recurrent delta rule in Triton (backend ``"recurrent"``). Same contract as :func:`delta_rule`."""
    try:
        from .delta_rule.recurrent import recurrent_delta_rule as impl
    except ModuleNotFoundError as e:
        if e.name != "triton":
            raise
        raise ImportError(_NO_TRITON.format("recurrent_delta_rule")) from e
    return impl(q, k, v, beta, g=g, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens)


_IMPLS = {
    "triton": chunk_delta_rule,
    "recurrent": recurrent_delta_rule,
    "torch": delta_rule_chunkwise_torch,
    "reference": delta_rule_reference,
}


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | PackedSequences | None = None,
    backend: str = "auto",
    kernel_config: ChunkKernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (gated) delta rule ``S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T``,
    ``o_t = scale * S_t^T q_t``.

    Args:
        q, k: ``[B, T, H, K]``; keys are expected L2-normalised (the layer does it).
        v: ``[B, T, H, V]``; ``V`` may differ from ``K``.
        beta: ``[B, T, H]``, in (0, 1) (or (0, 2) when negative eigenvalues are allowed).
        g: ``[B, T, H]`` log decay per token and head (any float dtype, computed in fp32), or
            None for the plain rule. The contract is ``g <= 0`` (decay); ``g > 0`` (growth) is
            outside it (the chunk forms assume ``exp(G_i - G_j) <= 1`` for ``i >= j``).
        scale: multiplies the queries; defaults to ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (``N = B``, or ``len(cu_seqlens) - 1``).
        output_final_state: also return the state after the last token, ``[N, H, K, V]`` float32.
        cu_seqlens: int tensor of sequence boundaries ``[0, ..., T]`` for packed sequences (B == 1),
            or a :class:`PackedSequences` built from it once per batch (``PackedSequences.from_cu_seqlens``:
            the one host read of the boundaries; a raw tensor costs one read per call).
        backend: one of ``BACKENDS``.
        kernel_config: launch settings of the Triton chunk kernels for this call (a
            :class:`ChunkKernelConfig`, e.g. ``dataclasses.replace(select_config(...), warps_wy=8)``),
            or None for the shape's defaults. Only for ``backend="triton"``, or ``"auto"``, where it
            applies when auto picks Triton (CUDA tensors); another backend raises ``ValueError``.

    Returns:
        ``(o, final_state)`` with ``o: [B, T, H, V]`` in ``v.dtype``; ``final_state`` is None
        unless ``output_final_state``.

    Example::

        >>> B, T, H, K, V = 2, 100, 4, 32, 16
        >>> q = torch.randn(B, T, H, K)
        >>> k = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
        >>> v, beta = torch.randn(B, T, H, V), torch.rand(B, T, H)
        >>> o, S = delta_rule(q, k, v, beta, output_final_state=True)
        >>> o.shape, S.shape
        (torch.Size([2, 100, 4, 16]), torch.Size([2, 4, 32, 16]))
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if kernel_config is not None:
        if not isinstance(kernel_config, ChunkKernelConfig):
            raise TypeError(f"kernel_config must be a deltanet.ops.ChunkKernelConfig or None, got "
                            f"{type(kernel_config).__name__}")
        if backend not in ("triton", "auto"):
            raise ValueError(f"kernel_config sets the Triton chunk kernels' launches: it needs backend='triton' "
                             f"(or 'auto'), got backend={backend!r}")
    if backend == "auto":
        backend = "triton" if isinstance(q, torch.Tensor) and q.is_cuda else "torch"
    extra = {"kernel_config": kernel_config} if backend == "triton" and kernel_config is not None else {}
    return _IMPLS[backend](q, k, v, beta, g=g, scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, cu_seqlens=cu_seqlens, **extra)


def delta_product(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | PackedSequences | None = None,
    backend: str = "auto",
    kernel_config: ChunkKernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DeltaProduct: ``n_h`` Householder steps per token. For each token t, ``S <- exp(g_t) S``
    (if gated), then for ``j = 0 .. n_h - 1``: ``S <- (I - b_tj k_tj k_tj^T) S + b_tj k_tj v_tj^T``;
    ``o_t = scale * S^T q_t``. ``n_h = 1`` is :func:`delta_rule`.

    Args:
        q: ``[B, T, H, K]``.
        k: ``[B, T, n_h, H, K]`` (L2-normalised), v: ``[B, T, n_h, H, V]``, beta: ``[B, T, n_h, H]``.
        g: ``[B, T, H]`` or None. Other arguments as :func:`delta_rule` (``cu_seqlens`` counts tokens;
            ``kernel_config`` applies to the rule over the ``T * n_h`` interleaved steps).

    Computed as the delta rule over the interleaved sequence of ``T * n_h`` steps (see
    ``delta_rule/product.py``), on any backend.

    Example::

        >>> B, T, n_h, H, K, V = 2, 50, 2, 4, 32, 16
        >>> q = torch.randn(B, T, H, K)
        >>> k = torch.nn.functional.normalize(torch.randn(B, T, n_h, H, K), dim=-1)
        >>> v, beta = torch.randn(B, T, n_h, H, V), torch.rand(B, T, n_h, H) * 2
        >>> o, S = delta_product(q, k, v, beta, g=-torch.rand(B, T, H), output_final_state=True)
        >>> o.shape, S.shape
        (torch.Size([2, 50, 4, 16]), torch.Size([2, 4, 32, 16]))
    """
    q, k, v, beta, g, cu_seqlens, n_h = interleave_product(q, k, v, beta, g, cu_seqlens)
    o, S = delta_rule(q, k, v, beta, g=g, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, cu_seqlens=cu_seqlens, backend=backend,
                      kernel_config=kernel_config)
    return take_last_step(o, n_h), S
