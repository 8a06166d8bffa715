"""The fused decode step of a DeltaNet mixer: launcher, custom op, public function, reference.

One token of one layer, from its raw input projections to the normalised (and gated) output
that goes into the output projection, as ONE kernel launch (``kernels/decode.py``): short conv +
activation of q, k, v with the conv states shifted in place, the q / k feature map, beta, the
decay of the gated rule, the ``n_h`` delta-rule steps on the recurrent state (in place) and the
read-out with the per-head output RMSNorm and gate. The eager layer runs ~70-100 small kernels
for the same work (see ``DeltaNetMixer``). :func:`delta_rule_decode_step_reference` is the same
step in plain PyTorch, with the eager layer's roundings.

Registered as a ``torch.library`` custom op that mutates the states, so ``torch.compile`` and
CUDA-graph capture see one op. Inference only (no autograd).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton

from .chunk import MAX_HEAD_DIM, check_device
from .interpreter import interpreted  # noqa: F401  (applies the interpreter fixes on CPU)
from ..pdl import launch_options, pdl_for
from .kernels.decode import ACT_ELU, ACT_IDENTITY, ACT_RELU, ACT_SILU, NORM_L2, NORM_SUM, decode_step_kernel

__all__ = ["delta_rule_decode_step", "delta_rule_decode_step_reference"]

QK_ACTIVATIONS = {"silu": ACT_SILU, "relu": ACT_RELU, "elu": ACT_ELU, "identity": ACT_IDENTITY}
QK_NORMS = {"l2": NORM_L2, "sum": NORM_SUM}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _blocks(K: int, V: int) -> tuple[int, int, int]:
    """``(BK, BV, num_warps)``: all of K per program, V in blocks of at most 8K state elements
    (head dim 128: two blocks, 256: eight). Compiled for sm_90 (Triton 3.9), 8 warps keep the
    kernel at 170-240 registers without spills for head dims 128 and 256 and n_h up to 3; 16K-element
    blocks or 4 warps spilled."""
    BK = max(16, triton.next_power_of_2(K))
    BV = min(max(16, triton.next_power_of_2(V)), max(16, 8192 // BK))
    return BK, BV, 8 if BK * BV >= 4096 else 4


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, conv_q: torch.Tensor, conv_k: torch.Tensor,
            conv_v: torch.Tensor, w_q: Optional[torch.Tensor], w_k: Optional[torch.Tensor],
            w_v: Optional[torch.Tensor], b: Optional[torch.Tensor], a: Optional[torch.Tensor],
            A_log: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor], mask: Optional[torch.Tensor],
            state: torch.Tensor, gate: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor],
            scale: float, eps: float, num_householder: int, conv_size: int, qk_activation: int, qk_norm: int,
            neg_eigval: bool) -> torch.Tensor:
    B, H, K, V = state.shape
    o = torch.empty(B, H, V, dtype=v.dtype, device=v.device)
    BK, BV, warps = _blocks(K, V)
    use_conv = conv_q.numel() > 0
    any_ = q  # a pointer for absent inputs (never read)
    pdl = pdl_for(q)
    decode_step_kernel[(B * H,)](
        q, k, v, conv_q if use_conv else any_, conv_k if use_conv else any_, conv_v if use_conv else any_,
        w_q if use_conv else any_, w_k if use_conv else any_, w_v if use_conv else any_,
        b if b is not None else any_, a if a is not None else any_, A_log if A_log is not None else any_,
        dt_bias if dt_bias is not None else any_, mask if mask is not None else any_, state,
        gate if gate is not None else any_, norm_weight if norm_weight is not None else any_, o,
        q.stride(0), k.stride(0), v.stride(0), b.stride(0) if b is not None else 0,
        a.stride(0) if a is not None else 0, mask.stride(0) if mask is not None else 0,
        gate.stride(0) if gate is not None else 0, scale, eps,
        H=H, K=K, V=V, BK=BK, BV=BV, NH=num_householder, NHP=triton.next_power_of_2(num_householder),
        W=conv_size, USE_CONV=use_conv, QK_ACT=qk_activation, QK_NORM=qk_norm, USE_BETA=b is not None,
        NEG_EIG=neg_eigval, USE_G=a is not None, HAS_MASK=mask is not None, NORM=norm_weight is not None,
        USE_GATE=gate is not None, PDL=pdl, num_warps=warps, **launch_options(pdl))
    return o


_op = torch.library.custom_op("deltanet::delta_rule_decode_step", _launch,
                              mutates_args=("conv_q", "conv_k", "conv_v", "state"))


@_op.register_fake
def _launch_fake(q, k, v, conv_q, conv_k, conv_v, w_q, w_k, w_v, b, a, A_log, dt_bias, mask, state, gate,
                 norm_weight, scale, eps, num_householder, conv_size, qk_activation, qk_norm, neg_eigval):
    B, H, _, V = state.shape
    return v.new_empty(B, H, V)


def _check(name: str, x, shape: tuple, dtype=None, device=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {list(shape)}, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} (the device of state)")


def _validate(q, k, v, state, conv_states, conv_weights, beta, decay, mask, norm_weight, gate, qk_activation,
              qk_norm) -> tuple[int, int]:
    """Shapes, dtypes and devices of a decode step; returns ``(n_h, W)`` (W = 0 without a conv)."""
    if not isinstance(state, torch.Tensor) or state.ndim != 4:
        raise ValueError(f"state must be a [B, H, K, V] tensor, got {getattr(state, 'shape', state)}")
    B, H, K, V = state.shape
    dev = state.device
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise TypeError(f"state must be a contiguous float32 tensor (updated in place), got {state.dtype}"
                        f"{'' if state.is_contiguous() else ', not contiguous'}")
    if max(K, V) > MAX_HEAD_DIM:
        raise ValueError(f"the fused decode step supports head dims K, V <= {MAX_HEAD_DIM}, got K={K}, V={V}")
    if not isinstance(q, torch.Tensor) or q.dtype not in DTYPES:
        raise TypeError(f"q must be a float32, bfloat16 or float16 tensor, got {getattr(q, 'dtype', type(q))}")
    _check("q", q, (B, H * K), device=dev)
    if not isinstance(k, torch.Tensor) or k.ndim != 2 or k.shape[0] != B or k.shape[1] % (H * K) or k.shape[1] == 0:
        raise ValueError(f"k must have shape [B, n_h * H * K] = [{B}, n_h * {H * K}], got "
                         f"{list(getattr(k, 'shape', []))}")
    n_h = k.shape[1] // (H * K)
    _check("k", k, (B, n_h * H * K), q.dtype, dev)
    _check("v", v, (B, n_h * H * V), q.dtype, dev)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(1) != 1:
            raise ValueError(f"{name} must be contiguous along its last dim (rows may be strided)")
    if qk_activation not in QK_ACTIVATIONS:
        raise ValueError(f"qk_activation must be one of {list(QK_ACTIVATIONS)}, got {qk_activation!r}")
    if qk_norm not in QK_NORMS:
        raise ValueError(f"qk_norm must be one of {list(QK_NORMS)}, got {qk_norm!r}")
    W = 0
    if (conv_states is None) != (conv_weights is None):
        raise ValueError("give conv_states and conv_weights together (or neither: no short conv)")
    if conv_states is not None:
        if len(conv_states) != 3 or len(conv_weights) != 3:
            raise ValueError("conv_states and conv_weights must be (q, k, v) triples")
        W = conv_weights[0].shape[-1] if isinstance(conv_weights[0], torch.Tensor) else 0
        if W < 2:
            raise ValueError(f"the fused decode step needs a conv kernel size >= 2, got {W}")
        for name, cs, cw, C in zip("qkv", conv_states, conv_weights, (H * K, n_h * H * K, n_h * H * V)):
            _check(f"conv_states[{name}]", cs, (B, W - 1, C), q.dtype, dev)
            _check(f"conv_weights[{name}]", cw, (C, W), device=dev)
            if not (cs.is_contiguous() and cw.is_contiguous()):
                raise ValueError(f"conv_states[{name}] and conv_weights[{name}] must be contiguous")
    if beta is not None:
        _check("beta", beta, (B, n_h * H), device=dev)
    if decay is not None:
        if len(decay) != 3:
            raise ValueError("decay must be (a [B, H], A_log [H], dt_bias [H])")
        a, A_log, dt_bias = decay
        _check("decay a", a, (B, H), device=dev)
        _check("A_log", A_log, (H,), device=dev)
        _check("dt_bias", dt_bias, (H,), device=dev)
    if mask is not None:
        _check("mask", mask, (B,), device=dev)
    if gate is not None and norm_weight is None:
        raise ValueError("gate (the output gate) needs norm_weight (the output RMSNorm)")
    if norm_weight is not None:
        _check("norm_weight", norm_weight, (V,), device=dev)
    if gate is not None:
        _check("gate", gate, (B, H * V), q.dtype, dev)
    for name, x in (("beta", beta), ("gate", gate), ("norm_weight", norm_weight),
                    *zip(("decay a", "A_log", "dt_bias"), decay or ())):
        if x is not None and x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along its last dim")
    return n_h, W


def delta_rule_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    *,
    conv_states: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    conv_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    beta: torch.Tensor | None = None,
    decay: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    mask: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    scale: float | None = None,
    norm_eps: float = 1e-6,
    qk_activation: str = "silu",
    qk_norm: str = "l2",
    allow_neg_eigval: bool = False,
) -> torch.Tensor:
    """One decode step of a DeltaNet-family mixer in one kernel; returns ``o [B, H, V]`` and
    updates ``state`` and ``conv_states`` in place.

    Args:
        q, k, v: the token's raw projections ``[B, H*K]``, ``[B, n_h*H*K]``, ``[B, n_h*H*V]``
            (channel ``(j*H + h)*K + d`` for step j, head h; rows may be strided, e.g. slices of
            one concatenated projection). ``n_h > 1``: DeltaProduct.
        state: ``[B, H, K, V]`` float32, contiguous: the recurrent state, updated in place.
        conv_states, conv_weights: the short convs' last ``W - 1`` inputs ``[B, W-1, C]`` (dtype of
            q, contiguous; shifted in place) and weights ``[C, W]`` of q, k, v; None: no conv.
        beta: beta logits ``[B, n_h*H]`` (``sigmoid``, ``2 sigmoid`` with ``allow_neg_eigval``);
            None: beta = 1.
        decay: ``(a [B, H], A_log [H], dt_bias [H])``: the gated rule,
            ``g = -exp(A_log) softplus(a + dt_bias)``; None: no decay.
        mask: ``[B]``, 0 where the token is padding: the recurrent state is left exactly as it
            was and the conv states take a zero input (as the eager layer does).
        norm_weight, gate: the output RMSNorm over V (weight ``[V]``) and its gate
            ``[B, H*V]`` (``* silu(gate)``); None: ``o`` is returned unnormalised.
        scale: of the read-out, default ``K ** -0.5``.
        qk_activation, qk_norm: the feature map (``"silu" | "relu" | "elu" | "identity"``,
            ``"l2" | "sum"``); v always takes SiLU.

    Example (a gated DeltaNet layer with 2 heads of 16, conv size 4, batch 3)::

        >>> B, H, D, W = 3, 2, 16, 4
        >>> S = torch.zeros(B, H, D, D)
        >>> convs = tuple(torch.zeros(B, W - 1, H * D) for _ in range(3))
        >>> weights = tuple(torch.randn(H * D, W) for _ in range(3))
        >>> decay = (torch.randn(B, H), torch.zeros(H), torch.zeros(H))
        >>> o = delta_rule_decode_step(torch.randn(B, H * D), torch.randn(B, H * D), torch.randn(B, H * D), S,
        ...                            conv_states=convs, conv_weights=weights, beta=torch.randn(B, H),
        ...                            decay=decay, norm_weight=torch.ones(D))  # doctest: +SKIP
        >>> o.shape  # doctest: +SKIP
        torch.Size([3, 2, 16])
    """
    n_h, W = _validate(q, k, v, state, conv_states, conv_weights, beta, decay, mask, norm_weight, gate,
                       qk_activation, qk_norm)
    check_device(q)
    K = state.shape[2]
    scale = K ** -0.5 if scale is None else float(scale)
    cs = conv_states if conv_states is not None else (q.new_empty(0),) * 3  # (the op's schema takes tensors)
    cw = conv_weights if conv_weights is not None else (None, None, None)
    a, A_log, dt_bias = decay if decay is not None else (None, None, None)
    return _op(q, k, v, *cs, *cw, beta, a, A_log, dt_bias, mask, state, gate, norm_weight, scale, float(norm_eps),
               n_h, max(W, 1), QK_ACTIVATIONS[qk_activation], QK_NORMS[qk_norm], bool(allow_neg_eigval))


def delta_rule_decode_step_reference(
    q, k, v, state, *, conv_states=None, conv_weights=None, beta=None, decay=None, mask=None, norm_weight=None,
    gate=None, scale=None, norm_eps: float = 1e-6, qk_activation: str = "silu", qk_norm: str = "l2",
    allow_neg_eigval: bool = False,
) -> torch.Tensor:
    """:func:`delta_rule_decode_step` in plain PyTorch, op by op as the eager layer computes it
    (same roundings to the input dtype between ops); any device. Same arguments, same in-place
    updates."""
    n_h, W = _validate(q, k, v, state, conv_states, conv_weights, beta, decay, mask, norm_weight, gate,
                       qk_activation, qk_norm)
    B, H, K, V = state.shape
    dt, f32 = q.dtype, torch.float32
    scale = K ** -0.5 if scale is None else float(scale)
    m = mask.ne(0).to(dt)[:, None] if mask is not None else None  # [B, 1]

    def feature(x, conv, weight, act):
        if conv is not None:
            if m is not None:
                x = x * m
            xe = torch.cat([conv, x[:, None]], 1)  # [B, W, C]
            y = torch.einsum("bwc,cw->bc", xe.to(f32), weight.to(f32))
            conv.copy_(xe[:, 1:])
            y = (F.silu(y) if act == "silu" else y).to(dt)
        else:
            y = F.silu(x) if act == "silu" else x
        if act == "relu":
            y = F.relu(y)
        elif act == "elu":
            y = F.elu(y) + 1.0
        return y

    convs = conv_states if conv_states is not None else (None, None, None)
    weights = conv_weights if conv_weights is not None else (None, None, None)
    qf = feature(q, convs[0], weights[0], qk_activation).view(B, H, K)
    kf = feature(k, convs[1], weights[1], qk_activation).view(B, n_h, H, K)
    vf = feature(v, convs[2], weights[2], "silu").view(B, n_h, H, V)
    if qk_norm == "l2":
        qf, kf = (x.to(f32).mul(torch.rsqrt(x.to(f32).pow(2).sum(-1, keepdim=True) + 1e-12)).to(dt) for x in (qf, kf))
    else:
        qf, kf = (x / x.sum(-1, keepdim=True).clamp_min(1e-6) for x in (qf, kf))
    b = (beta.to(f32).sigmoid() * (2.0 if allow_neg_eigval else 1.0)).view(B, n_h, H) if beta is not None \
        else torch.ones(B, n_h, H, device=q.device)
    g = None
    if decay is not None:
        a, A_log, dt_bias = decay
        g = -A_log.to(f32).exp() * F.softplus(a.to(f32) + dt_bias.to(f32))  # [B, H]
    if m is not None:
        b = b * m[:, :, None].to(f32)
        kf = kf * m[:, :, None, None]
        g = g * m.to(f32) if g is not None else None
    b = b.to(dt)
    S = state
    if g is not None:
        S = S * g.exp()[:, :, None, None]
    for j in range(n_h):
        k_j, v_j, b_j = kf[:, j].to(f32), vf[:, j].to(f32), b[:, j].to(f32)
        w = v_j - torch.einsum("bhk,bhkv->bhv", k_j, S)
        S = S + k_j[..., None] * (b_j[..., None] * w)[:, :, None]
    state.copy_(S)
    o = (scale * torch.einsum("bhk,bhkv->bhv", qf.to(f32), S)).to(v.dtype)
    if norm_weight is None:
        return o
    of = o.to(f32)
    y = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + norm_eps) * norm_weight.to(f32)
    if gate is not None:
        y = y * F.silu(gate.view(B, H, V).to(f32))
    return y.to(o.dtype)
