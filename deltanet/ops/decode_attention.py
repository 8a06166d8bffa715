"""The attention core of a one-token decode step against a static K/V cache, fused: kernels,
launcher, custom op, public function, reference.

Between its input projections and ``o_proj``, an attention layer's cached decode step rotates q
and the new k (RoPE at each row's position), writes the new key and value into the cache slot of
the step's position (``next``; ``next mod L`` for a sliding-window ring) together with the slot's
validity bit, and attends over every valid slot plus the new token itself. Eagerly that is ~45
small kernels (RoPE's casts and trig, three ``index_copy_``, matmuls, masking, softmax);
:func:`decode_attention_step` does it in one launch, or two when the slots are split
(flash-decoding):

- ``decode_attention_kernel``: one program per (row, KV head, split of the slots). It rotates the
  row's query heads of its KV-head group (``G = H / Hkv``, grouped-query attention: query head
  ``h`` reads KV head ``h // G``) and the new key in float32 as :func:`apply_rope` does, rounding
  to the activation dtype; then an online softmax (scores, max and sum in float32) over its
  slots. Split 0 also owns the new token: it writes its key and value into the cache slot, takes
  its score from registers (the slot is excluded from every program's loop, so nothing reads back
  what this step writes) and starts its running sums from it; split 0 of KV head 0 writes
  ``valid[b, slot]``. With one split the program normalises and writes the output itself.
- ``decode_attention_combine_kernel`` (more than one split): per (row, query head), the splits'
  partial maxima, sums and outputs folded into the output.

Splits: at batch 1 the 8 KV heads of the 340M hybrids would leave most of an H100's 132 SMs idle,
so the slots are split until about two programs per SM are running (:func:`select_config`).

Numerics follow the eager step (``AttentionMixer._static_step`` + ``decode_attention``): RoPE in
float32 rounded to the activation dtype, q then rounded to the cache dtype, q.k products
accumulated in float32, softmax in float32; the probabilities are rounded to the cache dtype for
the ``p @ V`` product (as the eager step does; float32 caches keep float32), the output to q's
dtype. The eager step also rounds the scores to the cache dtype before the softmax; the kernel
does not (closer to the float64 oracle). Inference only (no autograd).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .delta_rule.config import device_sms
from .delta_rule.interpreter import interpreted  # importing applies the interpreter fixes (bf16 tl.dot)
from .pdl import launch_options, pdl_for, pdl_wait

__all__ = ["DecodeAttentionConfig", "decode_attention_step", "decode_attention_step_reference",
           "select_config", "supports"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256
MAX_GROUP = 64  # query heads per KV head (rows of the score tile)
MAX_SPLITS = 256

# Whether decode_kernel "auto" takes this step on CUDA (``AttentionMixer``); "fused" always does.
# On since its CUDA tests passed and it was timed against the eager core on an H100 (2026-12-07,
# ``benchmarks/bench_decode_step.py --attention``: 7-12x at batch 1, 1.2-1.8x at batch 32, 2K
# window and 8K full caches). False gives "auto" the eager core back.
FUSED_ATTENTION_BY_DEFAULT = True

# Tests set this: the output starts as NaN, so an element the kernels forget to write shows up.
POISON = False


# The cache length and its split are plain integers, never specialised on (not even on divisibility
# by 16): one compile serves every cache length, so a generation of a new length (a new capacity:
# prompt + max_new_tokens) pays no Triton compile in its first steps (~0.9 s measured on an H100).
@triton.jit(do_not_specialize=["L", "CHUNK", "NS"])
def decode_attention_kernel(q, k, v, k_cache, v_cache, valid, pos, next_pos, mask, inv_freq, o,
                            part_m, part_l, part_o,
                            stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_pos, stride_mask,
                            scale, L, CHUNK, NS,
                            H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                            D: tl.constexpr, DV: tl.constexpr, BH: tl.constexpr, BV: tl.constexpr,
                            BL: tl.constexpr, SPLIT: tl.constexpr, RING: tl.constexpr, HAS_MASK: tl.constexpr,
                            IEEE: tl.constexpr, PDL: tl.constexpr = False):
    """Program ``(b * HKV + kvh, split)``: query heads ``kvh * G ...`` of row ``b`` over the
    slots ``split * CHUNK ...`` of KV head ``kvh`` (``NS`` splits; ``SPLIT``: more than one). Keys
    are handled as their two RoPE halves (``[.., D/2]`` each), so the rotation never moves data across lanes.
    ``PDL``: programmatic dependent launch (``deltanet.ops.pdl``): wait for the previous kernel first."""
    pdl_wait(PDL)
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    b, kvh = i_bh // HKV, i_bh % HKV
    HALF: tl.constexpr = D // 2
    cdt = k_cache.dtype.element_ty
    o_g, o_d, o_v = tl.arange(0, GP), tl.arange(0, BH), tl.arange(0, BV)
    m_g, m_d, m_v = o_g < G, o_d < HALF, o_v < DV

    # RoPE angles of this row's position, float32 as apply_rope (inv_freq computed by PyTorch)
    p_b = tl.load(pos + b * stride_pos).to(tl.float32)
    ang = p_b * tl.load(inv_freq + o_d, mask=m_d, other=0.0)
    cos, sin = tl.cos(ang), tl.sin(ang)

    # the group's query heads, rotated, rounded to q's dtype (apply_rope) and then to the cache's
    qh = kvh * G + o_g
    p_q = q + b * stride_qb + qh[:, None] * stride_qh + o_d[None, :]
    m_q = m_g[:, None] & m_d[None, :]
    q1 = tl.load(p_q, mask=m_q, other=0.0).to(tl.float32)
    q2 = tl.load(p_q + HALF, mask=m_q, other=0.0).to(tl.float32)
    r1 = (q1 * cos[None, :] - q2 * sin[None, :]).to(q.dtype.element_ty).to(cdt)  # [GP, BH]
    r2 = (q2 * cos[None, :] + q1 * sin[None, :]).to(q.dtype.element_ty).to(cdt)

    # the new token: key rotated the same way, key and value as the cache stores them
    p_k = k + b * stride_kb + kvh * stride_kh + o_d
    k1 = tl.load(p_k, mask=m_d, other=0.0).to(tl.float32)
    k2 = tl.load(p_k + HALF, mask=m_d, other=0.0).to(tl.float32)
    n1 = (k1 * cos - k2 * sin).to(k.dtype.element_ty).to(cdt)  # [BH]
    n2 = (k2 * cos + k1 * sin).to(k.dtype.element_ty).to(cdt)
    v_new = tl.load(v + b * stride_vb + kvh * stride_vh + o_v, mask=m_v, other=0.0).to(cdt)  # [BV]
    nxt = tl.load(next_pos)
    if RING:
        slot = nxt % L
    else:
        slot = nxt  # a preallocated cache: the caller keeps next < L (ensure_capacity)
    base_k = k_cache + (b * HKV + kvh).to(tl.int64) * L * D
    base_v = v_cache + (b * HKV + kvh).to(tl.int64) * L * DV
    if i_s == 0:
        # the one writer of this (row, KV head)'s slot; every program's loop below skips the slot,
        # so no program reads it while (or after) it is written: the race is never observed
        ok = slot < L  # never out of bounds, even if the capacity was not grown
        tl.store(base_k + slot * D + o_d, n1, mask=m_d & ok)
        tl.store(base_k + slot * D + HALF + o_d, n2, mask=m_d & ok)
        tl.store(base_v + slot * DV + o_v, v_new, mask=m_v & ok)
        if kvh == 0:  # valid[b, slot]: read by no program of this step (the slot is skipped)
            if HAS_MASK:
                real = tl.load(mask + b * stride_mask) != 0
            else:
                real = True
            tl.store(valid + b * L + slot, real, mask=ok)

    # the running softmax starts from the new token in split 0 (its score from registers), empty elsewhere
    s_new = (tl.sum(r1.to(tl.float32) * n1.to(tl.float32)[None, :], 1)
             + tl.sum(r2.to(tl.float32) * n2.to(tl.float32)[None, :], 1)) * scale  # [GP]
    first = i_s == 0
    m_i = tl.where(first, s_new, float("-inf"))
    l_i = tl.where(first, 1.0, 0.0) + tl.zeros([GP], dtype=tl.float32)
    acc = tl.where(first, v_new.to(tl.float32)[None, :], 0.0) + tl.zeros([GP, BV], dtype=tl.float32)

    start = i_s * CHUNK
    end = tl.minimum(start + CHUNK, L)
    for l0 in range(start, end, BL):
        o_l = l0 + tl.arange(0, BL)
        ok_l = (o_l < end) & (o_l != slot)
        ok_l = ok_l & (tl.load(valid + b * L + o_l, mask=ok_l, other=0) != 0)
        b_k1 = tl.load(base_k + o_l[:, None] * D + o_d[None, :], mask=ok_l[:, None] & m_d[None, :], other=0.0)
        b_k2 = tl.load(base_k + o_l[:, None] * D + HALF + o_d[None, :], mask=ok_l[:, None] & m_d[None, :],
                       other=0.0)
        if IEEE:  # float32 caches: full float32 products (tf32 would cost ~1e-3 relative error)
            s = tl.dot(r1, tl.trans(b_k1), input_precision="ieee") + tl.dot(r2, tl.trans(b_k2), input_precision="ieee")
        else:
            s = tl.dot(r1, tl.trans(b_k1)) + tl.dot(r2, tl.trans(b_k2))  # [GP, BL] float32
        s = tl.where(ok_l[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: no inf - inf
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        b_v = tl.load(base_v + o_l[:, None] * DV + o_v[None, :], mask=ok_l[:, None] & m_v[None, :], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, b_v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(cdt), b_v)
        m_i = m_new

    m_out = m_g[:, None] & m_v[None, :]
    row = b * H + qh  # [GP]: (row, query head)
    if not SPLIT:
        out = acc / l_i[:, None]
        tl.store(o + row[:, None] * DV + o_v[None, :], out.to(o.dtype.element_ty), mask=m_out)
    else:
        tl.store(part_m + row * NS + i_s, m_i, mask=m_g)
        tl.store(part_l + row * NS + i_s, l_i, mask=m_g)
        tl.store(part_o + (row[:, None] * NS + i_s) * DV + o_v[None, :], acc, mask=m_out)


@triton.jit(do_not_specialize=["NS"])
def decode_attention_combine_kernel(part_m, part_l, part_o, o, NS, NSB: tl.constexpr,
                                    DV: tl.constexpr, BV: tl.constexpr, PDL: tl.constexpr = False):
    """Program ``b * H + h``: the ``NS`` splits' partial softmax states folded into the output,
    ``NSB`` splits at a time with a running maximum (one compile for any ``NS``). Split 0 always
    holds the new token, so the first block's maximum is finite; empty splits weigh 0."""
    pdl_wait(PDL)
    i = tl.program_id(0)
    o_v = tl.arange(0, BV)
    m_v = o_v < DV
    m_run = float("-inf")
    den = 0.0
    acc = tl.zeros([BV], dtype=tl.float32)
    for s0 in range(0, NS, NSB):
        o_s = s0 + tl.arange(0, NSB)
        m_s = o_s < NS
        m = tl.load(part_m + i * NS + o_s, mask=m_s, other=float("-inf"))
        m_new = tl.maximum(m_run, tl.max(m, 0))
        alpha = tl.exp(m_run - m_new)  # 0 before the first block
        w = tl.exp(m - m_new)  # [NSB]
        den = den * alpha + tl.sum(tl.load(part_l + i * NS + o_s, mask=m_s, other=0.0) * w, 0)
        part = tl.load(part_o + (i * NS + o_s[:, None]) * DV + o_v[None, :], mask=m_s[:, None] & m_v[None, :],
                       other=0.0)
        acc = acc * alpha + tl.sum(part * w[:, None], 0)
        m_run = m_new
    tl.store(o + i * DV + o_v, (acc / den).to(o.dtype.element_ty), mask=m_v)


@dataclasses.dataclass(frozen=True)
class DecodeAttentionConfig:
    """Launch settings: ``block_l`` slots per loop step (a power of two >= 16), ``splits`` of the
    slots (None: :func:`select_config`'s choice; 1: one program per row and KV head, one launch),
    ``num_warps``."""

    block_l: int = 64
    splits: int | None = None
    num_warps: int = 4

    def __post_init__(self):
        if not (isinstance(self.block_l, int) and self.block_l >= 16 and self.block_l & (self.block_l - 1) == 0):
            raise ValueError(f"DecodeAttentionConfig.block_l must be a power of two >= 16, got {self.block_l!r}")
        if self.splits is not None and not (isinstance(self.splits, int) and 1 <= self.splits <= MAX_SPLITS):
            raise ValueError(f"DecodeAttentionConfig.splits must be None or an int in [1, {MAX_SPLITS}], "
                             f"got {self.splits!r}")
        if self.num_warps not in (1, 2, 4, 8):
            raise ValueError(f"DecodeAttentionConfig.num_warps must be 1, 2, 4 or 8, got {self.num_warps!r}")


def select_config(B: int, Hkv: int, L: int, num_sms: int, head_dim: int = 128) -> DecodeAttentionConfig:
    """Split the ``L`` slots when ``B * Hkv`` programs leave SMs idle, to ~2 programs per SM (one
    block of ``block_l`` slots per split at least); with a program per SM already, one split.
    Measured on an H100 (2026-12-07, hybrid-swa-340m's shape, 8 KV heads, head dim 128, bf16):
    batch 1, 2K / 8K slots: 32 / 33 splits within 1% of the best of 1-64; batch 32 (256 programs):
    one split 93 / 345 us, two 114 / 414 us. ``block_l`` / ``num_warps``: compiled for sm_90
    (Triton 3.9), 64 slots and 8 warps keep head dim 128 at 121-196 registers without spills (bf16
    and fp32, 1 or 8 query heads per KV head; 4 warps: 255 and a spill), head dim 256 takes 32
    slots (200 registers). ``benchmarks/bench_decode_step.py --attention`` times other settings."""
    block_l = 64 if head_dim <= 128 else 32
    num_warps = 8 if head_dim >= 128 else 4
    blocks = triton.cdiv(L, block_l)
    programs = B * Hkv
    splits = 1 if programs >= num_sms else max(1, min(blocks, MAX_SPLITS, triton.cdiv(2 * num_sms, programs)))
    return DecodeAttentionConfig(block_l=block_l, splits=splits, num_warps=num_warps)


@functools.lru_cache(maxsize=32)
def _inv_freq(D: int, theta: float, device: torch.device) -> torch.Tensor:
    # apply_rope's frequencies, by the same PyTorch expression (bit for bit); made once per shape,
    # before any captured step (the first decode step runs eagerly)
    return 1.0 / (theta ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            valid: torch.Tensor, position: torch.Tensor, next_position: torch.Tensor, mask: torch.Tensor | None,
            inv_freq: torch.Tensor, scale: float, ring: bool, block_l: int, splits: int,
            num_warps: int) -> torch.Tensor:
    B, _, H, D = q.shape
    Hkv, L, Dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    G = H // Hkv
    o = torch.empty(B, 1, H, Dv, dtype=q.dtype, device=q.device)
    if POISON:
        o.fill_(float("nan"))
    BL = block_l
    chunk = triton.cdiv(triton.cdiv(L, BL), splits) * BL  # whole blocks per split
    NS = triton.cdiv(L, chunk)
    part_m = part_l = part_o = o  # absent with one split (never touched)
    if NS > 1:
        part_m = torch.empty(B * H * NS, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_o = torch.empty(B * H * NS * Dv, dtype=torch.float32, device=q.device)
    pdl = pdl_for(q)
    launch = launch_options(pdl)
    decode_attention_kernel[(B * Hkv, NS)](
        q, k, v, k_cache, v_cache, valid, position, next_position, mask if mask is not None else position, inv_freq,
        o, part_m, part_l, part_o, q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2),
        position.stride(0), mask.stride(0) if mask is not None else 0, scale, L, chunk, NS,
        H=H, HKV=Hkv, G=G, GP=max(16, triton.next_power_of_2(G)), D=D, DV=Dv,
        BH=max(16, triton.next_power_of_2(D // 2)), BV=max(16, triton.next_power_of_2(Dv)), BL=BL, SPLIT=NS > 1,
        RING=ring, HAS_MASK=mask is not None, IEEE=k_cache.dtype == torch.float32, PDL=pdl,
        num_warps=num_warps, **launch)
    if NS > 1:
        decode_attention_combine_kernel[(B * H,)](part_m, part_l, part_o, o, NS, NSB=32, DV=Dv,
                                                  BV=max(16, triton.next_power_of_2(Dv)), PDL=pdl, num_warps=4,
                                                  **launch)
    return o


_op = torch.library.custom_op("deltanet::decode_attention_step", _launch,
                              mutates_args=("k_cache", "v_cache", "valid"))


@_op.register_fake
def _launch_fake(q, k, v, k_cache, v_cache, valid, position, next_position, mask, inv_freq, scale, ring, block_l,
                 splits, num_warps):
    return q.new_empty(q.shape[0], 1, q.shape[2], v_cache.shape[3])


def supports(head_dim: int, cache_dtype: torch.dtype) -> bool:
    """Whether :func:`decode_attention_step` takes this head dim and cache dtype (callers fall
    back to the eager step otherwise)."""
    return head_dim % 2 == 0 and 2 <= head_dim <= MAX_HEAD_DIM and cache_dtype in DTYPES


def _validate(q, k, v, k_cache, v_cache, valid, position, next_position, mask, rope_theta) -> None:
    def tensor(name, x, ndim, what):
        if not isinstance(x, torch.Tensor) or x.ndim != ndim:
            raise ValueError(f"{name} must be a {ndim}-D tensor {what}, got "
                             f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")

    tensor("q", q, 4, "[B, 1, H, D]")
    tensor("k", k, 4, "[B, 1, Hkv, D]")
    tensor("v", v, 4, "[B, 1, Hkv, Dv]")
    tensor("k_cache", k_cache, 4, "[B, Hkv, L, D]")
    tensor("v_cache", v_cache, 4, "[B, Hkv, L, Dv]")
    tensor("valid", valid, 2, "[B, L]")
    B, T, H, D = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    Dv = v_cache.shape[3]
    if T != 1:
        raise ValueError(f"q must hold one token per row ([B, 1, H, D]), got {list(q.shape)}")
    if q.dtype not in DTYPES:
        raise TypeError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    if D % 2 or D > MAX_HEAD_DIM:
        raise ValueError(f"the head dim D must be even (RoPE's half split) and <= {MAX_HEAD_DIM}, got {D}")
    if Dv > MAX_HEAD_DIM or Dv == 0:
        raise ValueError(f"the value head dim Dv must be in [1, {MAX_HEAD_DIM}], got {Dv}")
    if Hkv == 0 or H % Hkv or H // Hkv > MAX_GROUP:
        raise ValueError(f"the query heads H = {H} must be a multiple of the KV heads Hkv = {Hkv}, at most "
                         f"{MAX_GROUP} per KV head")
    for name, x, shape in (("k", k, (B, 1, Hkv, D)), ("v", v, (B, 1, Hkv, Dv)), ("k_cache", k_cache, (B, Hkv, L, D)),
                           ("v_cache", v_cache, (B, Hkv, L, Dv)), ("valid", valid, (B, L))):
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device}, q on {q.device}")
    if L == 0:
        raise ValueError("the cache must have at least one slot (L >= 1)")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(3) != 1:
            raise ValueError(f"{name} must be contiguous along its last dim (rows and heads may be strided)")
    if k_cache.dtype not in DTYPES or v_cache.dtype != k_cache.dtype:
        raise TypeError(f"k_cache and v_cache must share a float32, bfloat16 or float16 dtype, got "
                        f"{k_cache.dtype} and {v_cache.dtype}")
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor, got {valid.dtype}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("valid", valid)):
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is written in place)")
    for name, x, shapes in (("position", position, ((B,), (B, 1))), ("next_position", next_position, ((), (1,))),
                            ("mask", mask, ((B,), (B, 1)))):
        if name == "mask" and x is None:
            continue
        if not isinstance(x, torch.Tensor) or tuple(x.shape) not in shapes:
            raise ValueError(f"{name} must be a tensor of shape {' or '.join(str(list(s)) for s in shapes)}, got "
                             f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.is_floating_point() or x.is_complex():
            raise TypeError(f"{name} must be an integer (or bool) tensor, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device}, q on {q.device} (it is read on the device, never on the host)")
    if not (isinstance(rope_theta, (int, float)) and rope_theta > 0):
        raise ValueError(f"rope_theta must be a positive number, got {rope_theta!r}")


def decode_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, valid: torch.Tensor, position: torch.Tensor,
                          next_position: torch.Tensor, *, ring: bool, mask: torch.Tensor | None = None,
                          rope_theta: float = 10000.0, scale: float | None = None,
                          config: DecodeAttentionConfig | None = None) -> torch.Tensor:
    """One decode token per row: RoPE of q and k, the new key/value into the cache, attention.

    Args:
        q: ``[B, 1, H, D]``; k: ``[B, 1, Hkv, D]``; v: ``[B, 1, Hkv, Dv]``, one dtype, NOT rotated
            (rows and heads may be strided, e.g. column slices of one projection buffer).
        k_cache, v_cache: ``[B, Hkv, L, D]`` / ``[B, Hkv, L, Dv]`` (float32, bfloat16 or float16)
            and ``valid [B, L]`` bool: the static cache, written in place.
        position: ``[B]`` (or ``[B, 1]``) RoPE position of each row's token, a device tensor.
        next_position: ``[]`` the token's cache position (``DecodeCounters.next``); its slot is
            ``next_position`` (``ring``: ``next_position mod L``). A preallocated cache must hold it
            (``next_position < L``); the key is not written otherwise.
        mask: ``[B]`` (or ``[B, 1]``), 0 where the token is padding: ``valid[b, slot]`` takes it.
            The token attends to itself either way (no row is all masked).
        rope_theta: RoPE base; ``scale``: softmax scale, default ``D ** -0.5``.

    Returns ``[B, 1, H, Dv]`` in q's dtype: query head ``h`` over KV head ``h // (H / Hkv)``'s
    valid slots and the new token. Same result and cache as ``AttentionMixer._static_step`` after
    ``apply_rope`` (:func:`decode_attention_step_reference`).

    Example (CUDA, or CPU with ``TRITON_INTERPRET=1`` set before importing triton)::

        >>> B, H, Hkv, D, L = 2, 4, 2, 16, 8
        >>> kc, vc = torch.zeros(2, B, Hkv, L, D).unbind(0)
        >>> valid = torch.zeros(B, L, dtype=torch.bool)
        >>> o = decode_attention_step(torch.randn(B, 1, H, D), torch.randn(B, 1, Hkv, D), torch.randn(B, 1, Hkv, D),
        ...                           kc, vc, valid, torch.tensor([3, 5]), torch.tensor(5), ring=True)  # doctest: +SKIP
        >>> o.shape, valid[:, 5].tolist()  # doctest: +SKIP
        (torch.Size([2, 1, 4, 16]), [True, True])
    """
    _validate(q, k, v, k_cache, v_cache, valid, position, next_position, mask, rope_theta)
    if config is not None and not isinstance(config, DecodeAttentionConfig):
        raise TypeError(f"config must be a DecodeAttentionConfig or None, got {type(config).__name__}")
    if not q.is_cuda and not interpreted():
        raise ValueError(f"q is on {q.device}: the Triton decode kernels need CUDA tensors, or TRITON_INTERPRET=1 "
                         "set before triton is imported (CPU, slow); use decode_kernel='eager' on CPU")
    B, _, H, D = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    auto = select_config(B, Hkv, L, device_sms(q.device), max(D, v_cache.shape[3]))
    if config is None:
        config = auto
    elif config.splits is None:
        config = dataclasses.replace(config, splits=auto.splits)
    scale = D ** -0.5 if scale is None else float(scale)
    return _op(q, k, v, k_cache, v_cache, valid, position.reshape(B), next_position.reshape(()),
               mask.reshape(B) if mask is not None else None, _inv_freq(D, float(rope_theta), q.device), scale,
               bool(ring), config.block_l, config.splits, config.num_warps)


def decode_attention_step_reference(q, k, v, k_cache, v_cache, valid, position, next_position, *, ring: bool,
                                    mask=None, rope_theta: float = 10000.0, scale: float | None = None):
    """What :func:`decode_attention_step` computes, op by op as the eager layer does (RoPE as
    ``apply_rope``: float32 math, float64 for float64 inputs, rounded to the input dtype; the
    cache write of ``_static_step``; ``decode_attention``). Any device and dtype (float64: the
    oracle); updates the cache in place and returns ``[B, 1, H, Dv]``."""
    from .attention import decode_attention

    B, _, _, D = q.shape
    L = k_cache.shape[2]
    ct = torch.promote_types(q.dtype, torch.float32)
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, D, 2, device=q.device, dtype=ct) / D))
    ang = position.reshape(B, 1, 1, 1).to(ct) * inv_freq  # [B, 1, 1, D/2]
    cos, sin = ang.cos(), ang.sin()

    def rope(x):
        x1, x2 = x.to(ct).chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    q, k = rope(q), rope(k)
    nxt = next_position.reshape(1).long()
    slot = nxt % L if ring else nxt
    k_cache.index_copy_(2, slot, k.transpose(1, 2).to(k_cache.dtype))
    v_cache.index_copy_(2, slot, v.transpose(1, 2).to(v_cache.dtype))
    real = mask.reshape(B, 1).bool() if mask is not None else torch.ones_like(valid[:, :1])
    valid.index_copy_(1, slot, real)
    allow = valid | (torch.arange(L, device=q.device) == slot)
    return decode_attention(q, k_cache, v_cache, allow, scale=scale)
