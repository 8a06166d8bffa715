"""The DeltaNet token mixer (Yang et al., NeurIPS 2024, §3 and Fig. 2) and its gated family.

    q, k, v = SiLU(ShortConv(W x))           (causal depthwise conv, kernel 4)
    q, k    = q / |q|, k / |k|                (L2 norm; keys must be unit length for the rule)
    beta    = sigmoid(W_b x)                  (per head; 2*sigmoid with negative eigenvalues)
    o       = delta_rule(q, k, v, beta)
    y       = W_o RMSNorm_head(o)             (optionally * SiLU(W_g x), or * sigmoid(W_g x))

Layer types (``config.layer_types``):

- ``"delta_net"``: the above.
- ``"gated_delta_net"`` (Gated DeltaNet): plus a per-head decay
  ``g = -exp(A_log) * softplus(W_a x + dt_bias)`` (``delta_rule(..., g=g)``) and the output
  gate always on. ``config.A_init_range`` sets the range of the decay rate ``A`` at
  initialisation, ``config.output_gate_activation`` the gate's activation (silu or sigmoid).
- ``"gated_delta_product"`` (gated DeltaProduct): as ``gated_delta_net`` with
  ``config.num_householder`` keys, values and betas per token (``delta_product``).
- ``"delta_product"`` (DeltaProduct without a forget gate): as ``delta_net`` with
  ``config.num_householder`` keys, values and betas per token, no decay; the output gate follows
  ``config.use_output_gate``. With ``num_householder = 1`` it computes exactly ``delta_net``.

Ablation switches (config): no short conv, q/k activation silu / relu / elu+1 / identity,
q/k norm l2 / sum, no beta (beta = 1).

Padding (``mask``): padded tokens get a zero conv input and ``beta = 0``, which leaves the
recurrent state untouched, so a left-padded row computes exactly what the unpadded row does.

Decoding (one token against a cache): ``decode_kernel`` (config field, or the attribute of a
layer) picks the route. ``"fused"``: everything between the input projections and the output
projection is one Triton kernel (``deltanet.ops.delta_rule.decode``: conv step, q / k feature
map, beta, decay, the n_h delta-rule steps, read-out, output norm and gate; conv and recurrent
states updated in place), the pre-norm with every input projection is one GEMV kernel and the
output projection with the block's residual add another (``deltanet.ops.decode_linear``; the
block runs its MLP in two more: 5 ops per block and token, 5 to 8 kernels as split-K adds its
small reduction kernel to the shapes with few output columns). ``"eager"``: the same step op by
op (the reference; ~70-100 small kernels per layer). ``"auto"`` (default): fused on CUDA where
the decode backend is Triton's recurrent kernel (``FUSED_DECODE_BY_DEFAULT``; its CUDA tests,
tests/models/test_fused_decode.py and tests/ops/test_decode_linear.py, passed on an H200 on
2026-12-06), eager elsewhere. Never fused on CPU, in float64 or under autograd.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import delta_product, delta_rule, wy_recomputed_in_backward
from ..ops.delta_rule.product import interleave_product, take_last_step
from ..parallel.context import segment_delta_rule
from ..parallel.halo import check_layer_documents, exchange_conv_halos, segment_group
from ._fused import RecomputedRegion, recompute_in_backward
from .conv import ShortConvolution
from .norm import RMSNorm, l2_norm, rms_norm_linear

__all__ = ["DECODE_KERNELS", "DELTA_TYPES", "DeltaNetMixer", "GATED_TYPES", "PRODUCT_TYPES", "qk_feature",
           "takes_fused_decode"]

GATED_TYPES = ("gated_delta_net", "gated_delta_product")
PRODUCT_TYPES = ("gated_delta_product", "delta_product")  # n_h = config.num_householder
DELTA_TYPES = ("delta_net", "gated_delta_net", "gated_delta_product", "delta_product")  # all run by DeltaNetMixer


# "auto" takes the fused decode kernels on CUDA (they passed their CUDA tests: module docstring);
# False makes every default decode step the eager route again.
FUSED_DECODE_BY_DEFAULT = True


def qk_feature(x: torch.Tensor, activation: str, norm: str) -> torch.Tensor:
    """The q/k feature map: activation then normalisation over the head dim (``[..., K]``)."""
    if activation == "relu":
        x = F.relu(x)
    elif activation == "elu":
        x = F.elu(x) + 1.0
    # "silu" is applied by the short conv (or by the caller without one); "identity" is a no-op
    if norm == "l2":
        return l2_norm(x)
    # sum norm (positive feature maps): the delta rule's stability needs |k| <= 1, which holds
    # for non-negative k with unit sum
    return x / x.sum(-1, keepdim=True).clamp_min(1e-6)


DECODE_KERNELS = ("auto", "fused", "eager")
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def takes_fused_decode(decode_kernel: str, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a one-token decode step of ``x`` (``[B, 1, hidden]``) through layers with ``weight``
    takes the fused Triton kernels (``decode_kernel``: ``"fused"``; ``"auto"``: on CUDA once
    ``FUSED_DECODE_BY_DEFAULT`` is on; ``"eager"``: never): no autograd, a float32 / bf16 / fp16
    model whose weights have the activations' dtype."""
    if decode_kernel not in DECODE_KERNELS:
        raise ValueError(f"decode_kernel must be one of {list(DECODE_KERNELS)}, got {decode_kernel!r}")
    if (decode_kernel == "eager" or x.shape[1] != 1 or x.dtype not in _FUSED_DTYPES or weight.dtype != x.dtype
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return False
    return decode_kernel == "fused" or (FUSED_DECODE_BY_DEFAULT and x.device.type == "cuda")


def resolve_backend(backend: str, T: int, device: torch.device, decoding: bool) -> str:
    """The delta-rule backend for one call.

    Single-token decode steps take the recurrent form (the chunkwise path would pad one token to
    a whole chunk): the fused recurrent Triton kernel where the chunk backend is Triton ("auto"
    on CUDA, or "triton" asked for), the step-by-step reference otherwise.
    """
    if decoding and T == 1:
        if backend == "triton" or (backend == "auto" and device.type == "cuda"):
            return "recurrent"
        if backend in ("auto", "torch"):
            return "reference"
    return backend


class DeltaNetMixer(nn.Module):
    """DeltaNet sequence mixer, ``[B, T, hidden] -> [B, T, hidden]``.

    Example::

        >>> from deltanet.models.presets import get_config
        >>> layer = DeltaNetMixer(get_config("tiny"), layer_idx=0)
        >>> layer(torch.randn(2, 7, layer.hidden_size)).shape
        torch.Size([2, 7, 128])
    """

    # Training memory option: rerun norm + q/k/v/beta projections + short conv in backward (one
    # extra GEMM of [tokens, hidden] x [hidden, 3 * H * D] per layer) instead of keeping the conv
    # inputs, three [tokens, H * D] tensors per layer (6 KB per token at the 340M width, ~4.5 GiB
    # at 24 layers x 32K tokens). Off by default: on the H200 it cost 6% of deltanet-340m's
    # training speed for 37.4 -> 31.2 GiB (results/2026-11-30-h200-x2-model.md). Set it to True on
    # an instance or the class when memory is the limit. (Skipped inside an outer torch.compile,
    # whose partitioner chooses what to keep.)
    recompute_inputs: bool = False
    # Training memory: the delta rule's q, k, v (after short conv + SiLU and the q/k norm, three
    # [tokens, H * D] tensors per layer, 6 KB per token at the 340M width, ~4.5 GiB at 24 layers x
    # 32K tokens) are not kept; backward reruns conv + norm from the conv inputs, which are kept
    # anyway (memory-bound passes, no GEMM; one rerun serves the op and the region's backward).
    # Same values and gradients (tests/layers/test_delta_net.py). Set it to False on an instance
    # or the class to keep them (benchmarks/gpu_memory_check.py times both). (Not used under an
    # outer torch.compile, with a cache, with padding masks, or with recompute_inputs, which
    # already keeps less.)
    recompute_features: bool = True
    # Training memory: the Triton chunk op keeps only its inputs for backward, which reruns the UT
    # transform and the state pass (``deltanet.ops.wy_recomputed_in_backward``), instead of also
    # keeping the chunks' (I + A)^-1 and the pseudo-values v_new: 4,096 B fewer per token and layer
    # at the 340M width. On an H100 (2026-12-07, deltanet-340m, 32K tokens per step, beside fla
    # 0.6.0 in one process) it took the peak from 27.81 to 24.81 GiB with bf16 parameters (0.88x ->
    # 0.79x fla's 31.47) and from 33.13 to 30.12 GiB under autocast (0.79x -> 0.72x), tokens/s within
    # that run's noise (+0.4, -2.4, -7.6, +9.5% at the four points; the rerun costs ~4% of a step by the
    # kernel timings). Set it to False on an instance or the class to keep them (the op's own
    # default, which then follows ``wy_recomputed_in_backward``). Read when the forward runs; an
    # activation-checkpointing rerun runs the same forward, so it makes the same choice.
    recompute_wy: bool = True

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        kind = config.layer_types[layer_idx] if layer_idx < len(config.layer_types) else "delta_net"
        # The gated family: a decay per token and head, the output gate always on; the product
        # types (gated or not): n_h Householder steps per token.
        self.gated = kind in GATED_TYPES
        self.num_householder = config.num_householder if kind in PRODUCT_TYPES else 1
        self.qk_activation, self.qk_norm = config.qk_activation, config.qk_norm
        self.use_beta, self.allow_neg_eigval = config.use_beta, config.allow_neg_eigval
        self.use_short_conv = config.use_short_conv
        self.use_output_gate = config.use_output_gate or self.gated
        self.A_init_range = tuple(getattr(config, "A_init_range", (0.0, 16.0)))
        self.backend = config.delta_backend
        self.decode_kernel = getattr(config, "decode_kernel", "auto")  # one-token cached steps: see the docstring
        inner = self.num_heads * self.head_dim
        n_h = self.num_householder

        self.q_proj = nn.Linear(self.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, n_h * inner, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, n_h * inner, bias=False)
        if self.use_beta:
            self.b_proj = nn.Linear(self.hidden_size, n_h * self.num_heads, bias=False)
        if self.gated:
            self.a_proj = nn.Linear(self.hidden_size, self.num_heads, bias=False)
            self.A_log = nn.Parameter(torch.empty(self.num_heads))
            self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
            self.reset_decay_parameters()
        if self.use_short_conv:
            qk_act = "silu" if self.qk_activation == "silu" else None
            self.q_conv = ShortConvolution(inner, config.conv_size, activation=qk_act)
            self.k_conv = ShortConvolution(n_h * inner, config.conv_size, activation=qk_act)
            self.v_conv = ShortConvolution(n_h * inner, config.conv_size, activation="silu")
        if self.use_output_gate:
            self.g_proj = nn.Linear(self.hidden_size, inner, bias=False)
        self.o_norm = RMSNorm(self.head_dim, eps=config.norm_eps,
                              gate_activation=getattr(config, "output_gate_activation", "silu"))
        self.o_proj = nn.Linear(inner, self.hidden_size, bias=False)

    @torch.no_grad()
    def reset_decay_parameters(self, init=nn.init) -> None:
        """The usual (Mamba-2 / Gated DeltaNet) initialisation of the decay: ``A ~ U(0, 16)``
        (``config.A_init_range``), ``dt`` log-uniform in ``[1e-3, 0.1]`` (floor 1e-4) with
        ``dt_bias = softplus^-1(dt)``, so that ``softplus(W_a x + dt_bias)`` starts near ``dt``.
        ``init``: the module providing ``copy_`` (Hugging Face's skips tensors loaded from a
        checkpoint)."""
        H = self.num_heads
        A = torch.empty(H).uniform_(*self.A_init_range).clamp_min(1e-4)
        dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp_min(1e-4)
        copy_ = getattr(init, "copy_", torch.Tensor.copy_)  # torch.nn.init has none
        copy_(self.A_log, A.log())
        copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))

    def _decay(self, a: torch.Tensor) -> torch.Tensor:
        """``g = -exp(A_log) * softplus(a + dt_bias)``, ``[B, T, H]`` in float32 (float64 in a
        float64 model); always <= 0."""
        dt = torch.promote_types(a.dtype, torch.float32)
        return -self.A_log.to(dt).exp() * F.softplus(a.to(dt) + self.dt_bias.to(dt))

    def _projection_layers(self) -> list:
        """The input projections in the order of :meth:`_split_projections`: q, k, v, then beta's,
        the decay's and the output gate's where the layer has them."""
        layers = [self.q_proj, self.k_proj, self.v_proj]
        layers += [self.b_proj] if self.use_beta else []
        layers += [self.a_proj] if self.gated else []
        layers += [self.g_proj] if self.use_output_gate else []
        return layers

    def _split_projections(self, out) -> tuple:
        """``(q, k, v, b or None, a or None, g or None)`` from the outputs of
        :meth:`_projection_layers`: ``a`` feeds the decay, ``g`` the output gate."""
        q, k, v = out[:3]
        b = out[3] if self.use_beta else None
        a = out[3 + self.use_beta] if self.gated else None
        g = out[-1] if self.use_output_gate else None
        return q, k, v, b, a, g

    def _input_projections(self, x, norm):
        """``(q, k, v, b or None, a or None, g or None)`` of ``norm(x)`` (or of ``x`` without a
        norm)."""
        layers = self._projection_layers()
        if norm is not None:  # one function: backward recomputes norm(x) instead of keeping it
            out = rms_norm_linear(x, norm.weight, [lin.weight for lin in layers], norm.eps)
        else:
            out = [lin(x) for lin in layers]
        return self._split_projections(out)

    def uses_fused_decode(self, x: torch.Tensor, decoding: bool, cu_seqlens=None, context_parallel=None) -> bool:
        """Whether a forward of ``x`` takes the fused decode step (``decode_kernel``; see the module
        docstring): one token against a filled cache, no autograd, a float32 / bf16 / fp16 model."""
        if not takes_fused_decode(self.decode_kernel, x, self.q_proj.weight):
            return False
        if self.use_output_gate and self.o_norm.gate_activation != "silu":  # the kernel's gate is silu
            return False
        if (not decoding or cu_seqlens is not None or context_parallel is not None or self.head_dim > 256
                or (self.use_short_conv and self.q_conv.kernel_size < 2)):
            return False
        return self.decode_kernel == "fused" or resolve_backend(self.backend, 1, x.device, True) == "recurrent"

    def _fused_decode_step(self, x, norm, mask, state, residual=None):
        """One token (``x: [B, 1, hidden]``) in three kernels: pre-norm + every input projection
        (``rms_norm_linear_decode``), the fused delta-rule step (the cache's conv and recurrent
        states updated in place, made contiguous / float32 first if they are not), and the output
        projection with the residual add (``linear_residual_decode``; ``residual + out``)."""
        from ..ops.decode_linear import linear_residual_decode, rms_norm_linear_decode
        from ..ops.delta_rule.decode import delta_rule_decode_step

        B, H, D = x.shape[0], self.num_heads, self.head_dim
        out = rms_norm_linear_decode(x[:, 0], norm.weight if norm is not None else None,
                                     [lin.weight for lin in self._projection_layers()],
                                     norm.eps if norm is not None else 0.0)
        q, k, v, b, a, g = self._split_projections(out)  # [B, ...]: column slices of one buffer (rows strided)
        convs = weights = None
        if self.use_short_conv:
            W = self.q_conv.kernel_size
            if state.conv is None:
                state.conv = tuple(q.new_zeros(B, W - 1, t.shape[-1]) for t in (q, k, v))
            convs = tuple(c if c.dtype == q.dtype and c.is_contiguous() else c.to(q.dtype).contiguous()
                          for c in state.conv)
            if any(a is not b for a, b in zip(convs, state.conv)):
                state.conv = convs  # (the same tuple otherwise: a captured step then copies nothing back)
            weights = tuple(mod.weight.contiguous() for mod in (self.q_conv, self.k_conv, self.v_conv))
        if state.recurrent.dtype != torch.float32 or not state.recurrent.is_contiguous():
            state.recurrent = state.recurrent.float().contiguous()
        o = delta_rule_decode_step(
            q, k, v, state.recurrent, conv_states=convs, conv_weights=weights, beta=b,
            decay=(a, self.A_log, self.dt_bias) if self.gated else None,
            mask=mask[:, 0] if mask is not None else None, norm_weight=self.o_norm.weight,
            gate=g, norm_eps=self.o_norm.eps, qk_activation=self.qk_activation,
            qk_norm=self.qk_norm, allow_neg_eigval=self.use_beta and self.allow_neg_eigval)  # [B, H, D], normalised
        return linear_residual_decode(o.view(B, 1, H * D), self.o_proj.weight, residual)

    def _features(self, x, norm, mask, cu_seqlens, conv_in, want_state: bool, cp_group=None, conv: bool = True):
        """``(q, k, v, b, a, g, conv_states)``: projections of ``norm(x)``, then (``conv``) the
        short conv (or the bare activation); q is ``[B, T, H*D]``, k and v ``[B, T, n_h*H*D]``,
        before the q/k norm. ``cp_group``: context parallelism, a process group or a
        :class:`SegmentLayout` (the conv's halo comes from the earlier ranks)."""
        q, k, v, b, a, g = self._input_projections(x, norm)  # [B, T, H*D] (b: [B, T, n_h*H], a: [B, T, H])
        if self.use_short_conv and mask is not None:  # zero conv inputs on padding: a fresh start
            m = mask[..., None].to(q.dtype)
            q, k, v = q * m, k * m, v * m
        if not conv:
            return q, k, v, b, a, g, None
        q, k, v, conv_out = self._conv(q, k, v, cu_seqlens, conv_in, want_state, cp_group)
        return q, k, v, b, a, g, conv_out

    def _conv(self, q, k, v, cu_seqlens, conv_in, want_state: bool, cp_group=None):
        """Short conv + activation of the projections (or the bare activation without a conv)."""
        conv_out = None
        if self.use_short_conv:
            if cp_group is not None and self.q_conv.kernel_size > 1:
                # context parallelism: the conv's window reaches into the earlier ranks' segments
                conv_in = exchange_conv_halos((q, k, v), self.q_conv.kernel_size - 1, cp_group)
            q, cq = self.q_conv(q, conv_in[0], cu_seqlens, want_state)
            k, ck = self.k_conv(k, conv_in[1], cu_seqlens, want_state)
            v, cv = self.v_conv(v, conv_in[2], cu_seqlens, want_state)
            conv_out = (cq, ck, cv)
        else:
            if self.qk_activation == "silu":
                q, k = F.silu(q), F.silu(k)
            v = F.silu(v)
        return q, k, v, conv_out

    def _qkv(self, q, k, v, cu_seqlens):
        """Training: conv + activation, then the q/k feature map; q ``[B, T, H, D]``, k and v
        ``[B, T, n_h, H, D]`` (the recomputed region of ``recompute_features``)."""
        B, T = q.shape[:2]
        q, k, v, _ = self._conv(q, k, v, cu_seqlens, (None, None, None), False)
        q = qk_feature(q.view(B, T, self.num_heads, self.head_dim), self.qk_activation, self.qk_norm)
        k = qk_feature(k.view(B, T, self.num_householder, self.num_heads, self.head_dim),
                       self.qk_activation, self.qk_norm)
        return q, k, v.view(B, T, self.num_householder, self.num_heads, self.head_dim)

    def forward(self, x, *, norm=None, mask=None, cu_seqlens=None, cache=None, context_parallel=None, residual=None,
                **_):
        """``x: [B, T, hidden]``; ``mask: [B, T]`` (1 = token, 0 = padding); ``cu_seqlens``: packed
        documents (a :class:`~deltanet.ops.packing.PackedSequences` from the model); ``cache``: a
        :class:`~deltanet.models.cache.DeltaNetCache` updated in place; ``norm``: an
        :class:`RMSNorm` applied to ``x`` first (the block's pre-norm, fused with the input
        projections so that its output is not kept for backward); ``context_parallel``: a
        process group (or a :class:`~deltanet.parallel.SegmentLayout`) whose ranks hold
        consecutive segments of the same rows (:mod:`deltanet.parallel.context`); packed
        documents then come as the layout's ``documents``, ``cu_seqlens`` its ``local_documents``;
        ``residual``: returns ``residual + mixer(x)`` (the block's residual add, fused with the
        output projection on the fused decode route)."""
        # the model hands down a SegmentLayout (built once per forward; the conv halos read it),
        # the delta rule needs its group
        cp = segment_group(context_parallel)
        if cp is not None and cache is not None:
            raise ValueError("context_parallel cannot be combined with a cache")
        check_layer_documents(context_parallel, cu_seqlens)
        state = cache.layers[self.layer_idx] if cache is not None else None  # a RecurrentState
        decoding = state is not None and state.recurrent is not None
        if self.uses_fused_decode(x, decoding, cu_seqlens, cp):
            return self._fused_decode_step(x, norm, mask, state, residual)
        y = self._forward(x, norm, mask, cu_seqlens, state, decoding, context_parallel, cp)
        return y if residual is None else residual + y

    def _forward(self, x, norm, mask, cu_seqlens, state, decoding, context_parallel, cp):
        """``forward`` without the residual add (every route but the fused decode step)."""
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        conv_in = state.conv if decoding and state.conv is not None else (None, None, None)
        region = None
        # (neither recompute under context parallelism: the halo exchange must not rerun inside backward)
        if (self.recompute_features and not self.recompute_inputs and state is None and mask is None and cp is None
                and torch.is_grad_enabled() and not torch.compiler.is_compiling()):
            q, k, v, b, a, g, _ = self._features(x, norm, mask, cu_seqlens, conv_in, False, conv=False)
            convs = [mod.weight for mod in (self.q_conv, self.k_conv, self.v_conv)] if self.use_short_conv else []
            region = RecomputedRegion(lambda qi, ki, vi, cs: self._qkv(qi, ki, vi, cs), (q, k, v, cu_seqlens), convs)
            q, k, v = region.outputs
        elif (self.recompute_inputs and state is None and cp is None and torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):  # an outer compile decides by itself
            # training: keep only x; norm, projections and conv are rerun in backward
            # (cu_seqlens, no gradient, rides in the closure: it may be a PackedSequences)
            feats = recompute_in_backward(
                lambda xx, mm: [t for t in self._features(xx, norm, mm, cu_seqlens, conv_in, False)[:6] if t is not None],
                (x, mask), [p for mod in (self, norm) if mod is not None for p in mod.parameters()])
            feats = iter(feats)
            q, k, v = next(feats), next(feats), next(feats)
            b = next(feats) if self.use_beta else None
            a = next(feats) if self.gated else None
            g = next(feats) if self.use_output_gate else None
        else:
            q, k, v, b, a, g, conv_out = self._features(x, norm, mask, cu_seqlens, conv_in, state is not None,
                                                        context_parallel)
        n_h = self.num_householder
        m = mask[..., None].to(q.dtype) if mask is not None else None  # [B, T, 1]
        if region is None:
            q = q.view(B, T, H, D)
            k, v = (t.view(B, T, n_h, H, D) for t in (k, v))  # [B, T, n_h, H, D]
            q = qk_feature(q, self.qk_activation, self.qk_norm)
            k = qk_feature(k, self.qk_activation, self.qk_norm)

        if self.use_beta:
            beta = b.to(torch.promote_types(b.dtype, torch.float32)).sigmoid().view(B, T, n_h, H)
            if self.allow_neg_eigval:
                beta = beta * 2.0
        else:
            beta = q.new_ones(B, T, n_h, H)
        decay = self._decay(a) if self.gated else None  # [B, T, H] fp32
        if m is not None:
            beta = beta * m[..., None].to(beta.dtype)  # beta = 0: padded tokens neither erase nor write
            k = k * m[..., None, None]
            if decay is not None:
                decay = decay * m.to(decay.dtype)  # nor decay the state
        beta = beta.to(q.dtype)

        backend = resolve_backend(self.backend, T, x.device, decoding)
        kw = dict(g=decay, initial_state=state.recurrent if decoding else None,
                  output_final_state=state is not None, cu_seqlens=cu_seqlens, backend=backend)
        wy = (wy_recomputed_in_backward() if self.recompute_wy and state is None and torch.is_grad_enabled()
              else contextlib.nullcontext())
        with region.consumers() if region is not None else contextlib.nullcontext(), wy:
            if cp is not None:
                # DeltaProduct is the delta rule over the interleaved n_h steps per token (n_h = 1: as is)
                # (packed documents: this segment's, interleaved alike)
                qi, ki, vi, bi, gi, docs, _ = interleave_product(q, k, v, beta, decay, cu_seqlens)
                o, final = segment_delta_rule(qi, ki, vi, bi, g=gi, documents=docs, group=cp, backend=backend)
                o = take_last_step(o, n_h)
            elif n_h == 1:
                o, final = delta_rule(q, k[:, :, 0], v[:, :, 0], beta[:, :, 0], **kw)  # o: [B, T, H, D]
            else:
                o, final = delta_product(q, k, v, beta, **kw)
        del q, k, v
        if state is not None:
            state.recurrent = final
            if self.use_short_conv:
                state.conv = conv_out

        if self.use_output_gate:
            o = self.o_norm(o, g.view(B, T, H, D))
            return self.o_proj(o.reshape(B, T, H * D))
        # per-head RMSNorm fused with o_proj: backward recomputes the normalised o
        return rms_norm_linear(o.reshape(B, T, H * D), self.o_norm.weight, [self.o_proj.weight], self.o_norm.eps)[0]
