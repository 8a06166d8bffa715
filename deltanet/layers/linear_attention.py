"""Additive linear attention, the paper's baseline: ``S_t = S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``.

Same projections, short convolutions, q/k feature map and output norm as the DeltaNet mixer;
only the state update differs (no erase term, no beta), so ablations isolate the delta rule.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.packing import PackedSequences, as_packed
from ..parallel.context import segment_linear_attention
from ..parallel.halo import check_layer_documents, exchange_conv_halos, segment_group
from .conv import ShortConvolution
from .delta_net import qk_feature
from .norm import RMSNorm, rms_norm_linear

__all__ = ["LinearAttentionMixer", "linear_attention"]


def _chunked(q, k, v, S, C: int):
    """One batch of sequences: ``q, k: [N, T, H, K]``, ``v: [N, T, H, V]``, ``S: [N, H, K, V]``.

    All chunks at once (no Python loop over chunks): each chunk's ``K^T V``, their exclusive
    prefix sum gives the state entering every chunk, then ``O = Q S_c + tril(Q K^T) V`` per chunk.
    The tail is padded with zeros (zero keys and values add nothing to the state).
    """
    N, T, H, K = q.shape
    V = v.shape[-1]
    nc = -(-T // C)
    if nc * C != T:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, nc * C - T)) for x in (q, k, v))
    qc, kc, vc = (x.view(N, nc, C, H, x.shape[-1]).permute(0, 3, 1, 2, 4) for x in (q, k, v))  # [N, H, nc, C, D]
    kv = (kc.transpose(-1, -2) @ vc).to(q.dtype)  # [N, H, nc, K, V]; summed in q's dtype under autocast too
    prefix = torch.cumsum(kv, dim=2)
    states = S[:, :, None] + torch.cat([torch.zeros_like(kv[:, :, :1]), prefix[:, :, :-1]], dim=2)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    attn = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0)
    o = qc @ states + attn @ vc  # [N, H, nc, C, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(N, nc * C, H, V)[:, :T]
    return o, S + prefix[:, :, -1]


def _packed_chunked(q, k, v, S0, packed: PackedSequences, C: int):
    """Packed documents in one pass: ``q, k: [T, H, K]``, ``v: [T, H, V]``, ``S0: [N, H, K, V]`` or None.

    Every document is laid out from a chunk boundary (its last chunk padded with zero keys), so no
    chunk mixes two documents; the chunks come from ``packed.chunks(C)`` (built once per batch, on
    the device). Then, as :func:`_chunked` for all documents' chunks at once: each chunk's
    ``K^T V``, a prefix sum over the chunks of its own document gives the state entering every
    chunk, ``O = Q S_c + tril(Q K^T) V``, and the outputs are gathered back to the packed
    positions. A fixed number of tensor ops (plus ``log2`` of the longest document's chunk count
    for the scan); no Python loop over documents or chunks, no host read.
    """
    T, H, K = q.shape
    V = v.shape[-1]
    N, dev = packed.num_seqs, q.device
    table, firsts = packed.chunks(C)  # (document, chunk within it) of each chunk; each document's first chunk
    nc = table.shape[0]
    if nc == 0:  # only empty documents: nothing to attend to, the states pass through
        return q.new_zeros(0, H, V), (q.new_zeros(N, H, K, V) if S0 is None else S0 + 0)
    cu = packed.cu_seqlens.long()
    doc, cin, firsts = table[:, 0].long(), table[:, 1].long(), firsts.long()
    # The packed token at every padded position, gathered straight into [chunk, head, row] order
    # (contiguous for the batched products: a permuted view would be copied by every one). Past a
    # document's end the index is clamped and its key zeroed: it adds nothing to the state, later
    # rows of its chunk are padding too (the tril keeps earlier rows from seeing it), and its
    # output row is never gathered back.
    tok = (cu[doc] + cin * C)[:, None] + torch.arange(C, device=dev)  # [nc, C]
    valid = (tok < cu[doc + 1][:, None])[:, None, :, None]
    rows = (tok.clamp_(max=T - 1)[:, None, :] * H + torch.arange(H, device=dev)[:, None]).flatten()  # [nc * H * C]
    qc = q.reshape(T * H, K).index_select(0, rows).view(nc, H, C, K)
    kc = k.reshape(T * H, K).index_select(0, rows).view(nc, H, C, K) * valid
    vc = v.reshape(T * H, V).index_select(0, rows).view(nc, H, C, V)
    # in q's dtype (float32 / float64) before the scan: under autocast the product comes out in bf16,
    # and the scan's adds (unlike the cumsum of _chunked, which autocast runs in float32) would
    # accumulate the states in bf16
    kv = (kc.transpose(-1, -2) @ vc).to(q.dtype)  # [nc, H, K, V]
    # Segmented inclusive scan over each document's chunks (Hillis-Steele: after the step of
    # width s every chunk holds the sum of its last 2s chunks of the same document), in
    # ceil(log2(longest document's chunks)) steps. Not one cumsum over the whole batch with the
    # prefix at each document's start subtracted: with positive features (elu + 1, silu) that
    # prefix grows over all T tokens, and in float32 a short document late in a 32K-token batch
    # lost ~1e-3 of its state to the cancellation (the per-document loop: 1e-7); a float64 cumsum
    # fixes that but moves twice the bytes over several passes. The scan adds only within a document.
    P, s, longest = kv, 1, -(-packed.max_len // C)
    while s < longest:
        P = torch.cat([P[:s], torch.addcmul(P[s:], P[:-s], (cin[s:] >= s).to(P.dtype)[:, None, None, None])])
        s *= 2
    # entering chunk c: its document's earlier chunks (exactly 0 at a first chunk, where P == kv;
    # elsewhere a difference of sums of the same document only), on top of the initial state
    states = P - kv
    ends = firsts + (cu[1:] - cu[:-1] + C - 1) // C  # one past each document's last chunk
    final = P.index_select(0, (ends - 1).clamp_(min=0)) * (ends > firsts).to(P.dtype)[:, None, None, None]
    if S0 is not None:
        states, final = states + S0[doc], final + S0
    causal = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
    attn = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0)
    o = qc @ states + attn @ vc  # [nc, H, C, V]
    # token t of document d sits at row (t - cu[d]) of chunks from firsts[d] on
    d = packed.doc_ids
    pos = torch.arange(T, device=dev) - cu[d]
    out = ((firsts[d] + pos // C)[:, None] * H + torch.arange(H, device=dev)) * C + (pos % C)[:, None]  # [T, H]
    return o.view(nc * H * C, V).index_select(0, out.flatten()).view(T, H, V), final


LINEAR_BACKENDS = ("auto", "triton", "torch")


def linear_attention(q, k, v, *, scale=None, initial_state=None, cu_seqlens=None, chunk_size: int = 64,
                     backend: str = "auto"):
    """Causal additive linear attention, chunkwise.

    Layouts as :func:`deltanet.ops.delta_rule`: ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]``,
    states ``[N, H, K, V]``; ``cu_seqlens`` a tensor or a
    :class:`~deltanet.ops.packing.PackedSequences` (documents packed along T, ``B == 1``; all
    documents in one pass, :func:`_packed_chunked`). Returns
    ``(o [B, T, H, V] in v.dtype, final_state float32)`` (float64 for float64 inputs).

    ``backend``: ``"triton"`` the delta-rule engine's chunk kernels with no erase term
    (:func:`deltanet.ops.delta_rule.linear.chunk_linear_attention`: 16-bit inputs stay 16-bit,
    fp32 states; chunks of 64), ``"torch"`` this module's PyTorch form (float32 inside, any
    ``chunk_size``), ``"auto"`` Triton for CUDA tensors of at most 16 or 32 bits and head dims
    up to 256 with more than one token (a one-token step is the recurrence itself), PyTorch otherwise.

    Example::

        >>> q, k, v = torch.randn(3, 1, 10, 2, 4).unbind(0)
        >>> o, S = linear_attention(q, k, v)
        >>> o.shape, S.shape
        (torch.Size([1, 10, 2, 4]), torch.Size([1, 2, 4, 4]))
    """
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"backend must be one of {LINEAR_BACKENDS}, got {backend!r}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if backend == "auto":
        backend = ("triton" if q.is_cuda and T > 1 and v.dtype != torch.float64 and max(K, V) <= 256
                   and _triton_available() else "torch")
    if backend == "triton":
        from ..ops.delta_rule.linear import chunk_linear_attention

        if not (q.dtype == k.dtype == v.dtype):  # e.g. fp32 q / k from the feature map under autocast
            q, k = q.to(v.dtype), k.to(v.dtype)
        o, S = chunk_linear_attention(q, k, v, scale=scale, initial_state=initial_state, output_final_state=True,
                                      cu_seqlens=cu_seqlens)
        return o, S
    scale = K ** -0.5 if scale is None else scale
    dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    out_dtype = v.dtype
    q, k, v = q.to(dtype) * scale, k.to(dtype), v.to(dtype)
    if cu_seqlens is None:
        S0 = initial_state.to(dtype) if initial_state is not None else q.new_zeros(B, H, K, V)
        if T == 1:  # a decode step: the recurrence itself, not a token padded to a chunk
            S = S0 + torch.einsum("bhk,bhv->bhkv", k[:, 0], v[:, 0])
            return torch.einsum("bhk,bhkv->bhv", q[:, 0], S)[:, None].to(out_dtype), S
        o, S = _chunked(q, k, v, S0, chunk_size)
        return o.to(out_dtype), S
    if B != 1:
        raise ValueError(f"cu_seqlens requires B == 1, got B = {B}")
    packed = as_packed(cu_seqlens, T)  # a raw tensor's one host read; a PackedSequences: none
    S0 = initial_state.to(dtype) if initial_state is not None else None
    o, S = _packed_chunked(q[0], k[0], v[0], S0, packed, chunk_size)
    return o[None].to(out_dtype), S


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class LinearAttentionMixer(nn.Module):
    """Additive linear attention mixer, ``[B, T, hidden] -> [B, T, hidden]``.

    Example::

        >>> from deltanet.models.presets import get_config
        >>> layer = LinearAttentionMixer(get_config("tiny"), layer_idx=0)
        >>> layer(torch.randn(2, 7, 128)).shape
        torch.Size([2, 7, 128])
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size, self.num_heads, self.head_dim = config.hidden_size, config.num_heads, config.head_dim
        self.qk_activation, self.qk_norm = config.qk_activation, config.qk_norm
        self.use_short_conv = config.use_short_conv
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(self.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, inner, bias=False)
        if self.use_short_conv:
            qk_act = "silu" if self.qk_activation == "silu" else None
            self.q_conv = ShortConvolution(inner, config.conv_size, activation=qk_act)
            self.k_conv = ShortConvolution(inner, config.conv_size, activation=qk_act)
            self.v_conv = ShortConvolution(inner, config.conv_size, activation="silu")
        self.o_norm = RMSNorm(self.head_dim, eps=config.norm_eps)
        self.o_proj = nn.Linear(inner, self.hidden_size, bias=False)
        # the config's delta-rule backend, mapped onto this op's two forms
        self.backend = config.delta_backend if config.delta_backend in ("auto", "triton") else "torch"

    def forward(self, x, *, mask=None, cu_seqlens=None, cache=None, context_parallel=None, norm=None, residual=None,
                **_):
        """``context_parallel``: a process group or :class:`~deltanet.parallel.SegmentLayout` whose
        ranks hold consecutive segments of the same rows: the short convolutions' windows and the
        additive state come from the earlier ranks (:func:`~deltanet.parallel.context_parallel_linear_attention`);
        packed documents as the layout's ``documents`` (``cu_seqlens``: its ``local_documents``).
        ``norm``: an :class:`RMSNorm` applied to ``x`` first, fused with the q/k/v projections (its
        output is recomputed in backward, not kept); ``residual``: returns ``residual + mixer(x)``."""
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        if context_parallel is not None:
            if cache is not None or mask is not None:
                raise ValueError("context_parallel cannot be combined with a cache or a padding mask")
            check_layer_documents(context_parallel, cu_seqlens)
        state = cache.layers[self.layer_idx] if cache is not None else None  # a RecurrentState
        decoding = state is not None and state.recurrent is not None
        m = mask[..., None].to(x.dtype) if mask is not None else None

        if norm is not None:
            q, k, v = rms_norm_linear(x, norm.weight, [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight],
                                      norm.eps)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            if m is not None:
                q, k, v = q * m, k * m, v * m
            conv_in = state.conv if decoding else (None, None, None)
            if context_parallel is not None and self.q_conv.kernel_size > 1:
                # the conv's window reaches into the earlier ranks' segments
                conv_in = exchange_conv_halos((q, k, v), self.q_conv.kernel_size - 1, context_parallel)
            want = state is not None
            q, cq = self.q_conv(q, conv_in[0], cu_seqlens, want)
            k, ck = self.k_conv(k, conv_in[1], cu_seqlens, want)
            v, cv = self.v_conv(v, conv_in[2], cu_seqlens, want)
        else:
            if self.qk_activation == "silu":
                q, k = F.silu(q), F.silu(k)
            v = F.silu(v)
        q, k, v = (t.view(B, T, H, D) for t in (q, k, v))
        q = qk_feature(q, self.qk_activation, self.qk_norm)
        k = qk_feature(k, self.qk_activation, self.qk_norm)
        if m is not None:
            k = k * m[..., None]  # padded tokens write nothing into the state

        if context_parallel is not None:
            o = segment_linear_attention(q, k, v, documents=cu_seqlens, group=segment_group(context_parallel))
            final = None
        else:
            o, final = linear_attention(q, k, v, initial_state=state.recurrent if decoding else None,
                                        cu_seqlens=cu_seqlens, backend=self.backend)
        if state is not None:
            state.recurrent = final
            if self.use_short_conv:
                state.conv = (cq, ck, cv)
        # per-head RMSNorm fused with o_proj: backward recomputes the normalised o
        y = rms_norm_linear(o.reshape(B, T, H * D), self.o_norm.weight, [self.o_proj.weight], self.o_norm.eps)[0]
        return y if residual is None else residual + y
