"""decode_attention (one query against a static / ring K/V cache) vs causal_attention."""

import pytest
import torch

from deltanet.ops.attention import causal_attention, decode_attention
from tests.utils import assert_close, count_host_reads


@pytest.mark.parametrize("H,Hkv,window", [(4, 4, None), (4, 2, None), (6, 2, 5), (3, 1, 1)],
                         ids=["mha", "gqa", "gqa-window", "mqa-window1"])
def test_decode_attention_matches_causal_attention(H, Hkv, window):
    torch.manual_seed(0)
    B, Tk, D = 3, 11, 8
    q = torch.randn(B, 1, H, D, dtype=torch.float64)
    k, v = torch.randn(2, B, Tk, Hkv, D, dtype=torch.float64).unbind(0)
    key_mask = torch.ones(B, Tk, dtype=torch.long)
    key_mask[1, :4] = 0  # left padding
    key_mask[2, -1] = 0  # the query itself is padding: it still sees itself
    expected = causal_attention(q, k, v, window=window, key_mask=key_mask)
    pos = torch.arange(Tk)
    allow = key_mask.bool() & (pos > Tk - 1 - (window or Tk))[None]
    allow |= (pos == Tk - 1)[None]
    # a ring buffer stores the positions out of order: attention must not care
    perm = torch.randperm(Tk)
    out = decode_attention(q, k[:, perm].transpose(1, 2), v[:, perm].transpose(1, 2), allow[:, perm])
    assert_close("decode attention", out, expected)


def test_decode_attention_rejects_bad_shapes():
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="decode_attention"):
        decode_attention(q, k, k, torch.ones(1, 5, dtype=torch.bool))  # two queries
    with pytest.raises(ValueError, match="decode_attention"):
        decode_attention(q[:, :1], k, k, torch.ones(1, 4, dtype=torch.bool))  # allow of the wrong length


# -- the fused decode step: RoPE + cache write + attention in one Triton launch (or two, split) ---------

import dataclasses  # noqa: E402

from tests.ops._triton_common import DEVICE  # noqa: E402  (TRITON_INTERPRET=1 on CPU)

from deltanet.layers.attention import AttentionMixer, apply_rope  # noqa: E402
from deltanet.models.cache import DecodeCounters, StaticKVCache  # noqa: E402
from deltanet.ops import decode_attention as da  # noqa: E402
from deltanet.ops.decode_attention import (DecodeAttentionConfig, decode_attention_step,  # noqa: E402
                                           decode_attention_step_reference)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
ULP = {torch.float32: 2.0 ** -22, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


@dataclasses.dataclass
class Case:
    B: int
    H: int
    Hkv: int
    D: int
    L: int
    ring: bool
    next: int  # the token's cache position (DecodeCounters.next); 0: the first step, no valid slot yet
    positions: list  # RoPE position per row
    Dv: int | None = None
    pad: bool = True  # invalid slots in the cache and a padded query row (B > 1)


CASES = {
    "B1-mha-D16-ring-wrap": Case(1, 2, 2, 16, 8, True, 13, [13]),
    "B3-gqa-D32-ring-wrap": Case(3, 4, 2, 32, 12, True, 29, [29, 21, 7]),
    "B3-gqa-D32-full": Case(3, 4, 2, 32, 24, False, 17, [17, 9, 12]),
    "B3-mqa-D24-Dv16-full": Case(3, 3, 1, 24, 20, False, 11, [11, 5, 0], Dv=16),
    "B2-mha-D16-first-step": Case(2, 2, 2, 16, 16, False, 0, [0, 0]),
    "B2-gqa4-D16-ring-first-step": Case(2, 4, 1, 16, 8, True, 0, [0, 0]),
    "B1-gqa-D32-full-no-pad": Case(1, 8, 2, 32, 40, False, 33, [33], pad=False),
    "B2-gqa-D16-full-long": Case(2, 4, 2, 16, 700, False, 650, [650, 611]),  # 44 blocks of 16
}
SPLITS = {"one-split": DecodeAttentionConfig(block_l=16, splits=1),
          "split": DecodeAttentionConfig(block_l=16, splits=3),  # 3 programs per (row, KV head) + the combine
          "many-splits": DecodeAttentionConfig(block_l=16, splits=40)}  # the combine folds 32 splits at a time


@pytest.fixture
def _poison(monkeypatch):
    monkeypatch.setattr(da, "POISON", True)  # an unwritten output element is NaN and fails


def _inputs(c: Case, dtype, seed=0):
    """Raw (unrotated) q, k, v of the token, a cache whose unused slots hold large garbage (a slot
    read without being allowed shows up), its validity (left padding of row 1, holes), positions,
    next position and the token's mask (row 1's token is padding)."""
    g = torch.Generator().manual_seed(seed)
    Dv = c.Dv or c.D

    def r(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=g)).to(dtype)

    q, k, v = r(c.B, 1, c.H, c.D), r(c.B, 1, c.Hkv, c.D), r(c.B, 1, c.Hkv, Dv)
    kc, vc = r(c.B, c.Hkv, c.L, c.D), r(c.B, c.Hkv, c.L, Dv)
    filled = min(c.next, c.L) if c.ring else c.next  # slots holding a token so far
    valid = torch.zeros(c.B, c.L, dtype=torch.bool)
    valid[:, :filled] = True
    if c.pad and c.B > 1:
        valid[1, : filled // 2] = False  # row 1: left padding (its tokens are not valid)
        valid[-1, 1::3] = False  # the last row: holes
    kc[~valid[:, None].expand_as(kc[..., 0])] = 300.0  # garbage in the invalid slots
    vc[~valid[:, None].expand_as(vc[..., 0])] = -300.0
    mask = torch.ones(c.B, 1, dtype=torch.long)
    if c.pad and c.B > 1:
        mask[1] = 0
    pos = torch.tensor(c.positions)[:, None]
    to = dict(device=DEVICE)
    return dict(q=q.to(**to), k=k.to(**to), v=v.to(**to), k_cache=kc.to(**to), v_cache=vc.to(**to),
                valid=valid.to(**to), position=pos.to(**to), next_position=torch.tensor(c.next, **to),
                mask=mask.to(**to) if c.pad else None)


def _call(fn, kw, ring, **extra):
    kw = dict(kw)
    args = [kw.pop(n) for n in ("q", "k", "v", "k_cache", "v_cache", "valid", "position", "next_position")]
    return fn(*args, ring=ring, rope_theta=500.0, **kw, **extra)


def _clone(kw, dtype=None):
    out = {}
    for n, x in kw.items():
        if isinstance(x, torch.Tensor):
            x = x.clone()
            if dtype is not None and x.is_floating_point():
                x = x.to(dtype)
        out[n] = x
    return out


@pytest.mark.usefixtures("_poison")
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_fused_step_matches_oracle_and_eager_cache(case, dtype, split):
    """Output against the float64 oracle (RoPE + cache write + masked softmax attention): within
    2x the eager same-dtype composition's error (fp32: also 1e-5 of it); the cache afterwards
    equals the eager step's (k: up to one rounding of the rotation, v and valid exactly)."""
    c = CASES[case]
    kw = _inputs(c, dtype)
    fused, eager, oracle = _clone(kw), _clone(kw), _clone(kw, torch.float64)
    o = _call(decode_attention_step, fused, c.ring, config=SPLITS[split])
    o_eager = _call(decode_attention_step_reference, eager, c.ring)
    o_oracle = _call(decode_attention_step_reference, oracle, c.ring)
    assert o.dtype == dtype and o.shape == (c.B, 1, c.H, c.Dv or c.D)
    assert_close(f"{case} vs oracle", o.double(), o_oracle, baseline=o_eager.double(),
                 floor=1e-5 if dtype == torch.float32 else 1e-3)
    if dtype == torch.float32:
        assert_close(f"{case} vs eager", o, o_eager, rtol=1e-5)
    slot = c.next % c.L if c.ring else c.next
    torch.testing.assert_close(fused["k_cache"], eager["k_cache"], rtol=ULP[dtype], atol=1e-6)
    assert torch.equal(fused["v_cache"], eager["v_cache"]) and torch.equal(fused["valid"], eager["valid"])
    untouched = torch.arange(c.L, device=DEVICE) != slot
    assert torch.equal(fused["k_cache"][:, :, untouched], kw["k_cache"][:, :, untouched])
    assert not torch.equal(fused["k_cache"][:, :, slot], kw["k_cache"][:, :, slot])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cache_after_the_call_equals_static_step(dtype):
    """The op against ``AttentionMixer._static_step`` itself (after ``apply_rope``): same cache
    tensors afterwards, same output; ring wrap-around, a padded token, positions per row."""
    from deltanet.models.presets import get_config

    c = CASES["B3-gqa-D32-ring-wrap"]
    kw = _inputs(c, dtype, seed=3)
    mixer = AttentionMixer(get_config("tiny", num_heads=c.H, num_kv_heads=c.Hkv, head_dim=c.D, rope_theta=500.0),
                           layer_idx=0, window=c.L)
    fused = _clone(kw)
    o = _call(decode_attention_step, fused, c.ring, config=SPLITS["split"])
    state = StaticKVCache(kw["k_cache"].clone(), kw["v_cache"].clone(), kw["valid"].clone(), ring=True)
    counters = DecodeCounters(real=torch.zeros(c.B, dtype=torch.long, device=DEVICE), next=kw["next_position"])
    q, k = (apply_rope(x, kw["position"], 500.0) for x in (kw["q"], kw["k"]))
    o_eager = mixer._static_step(q, k, kw["v"], state, counters, kw["mask"])
    torch.testing.assert_close(fused["k_cache"], state.k, rtol=ULP[dtype], atol=1e-6)
    assert torch.equal(fused["v_cache"], state.v) and torch.equal(fused["valid"], state.valid)
    assert_close("output vs _static_step", o.float(), o_eager.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2)


def test_strided_rows_and_heads_are_read_in_place():
    """q/k/v as column slices of one projection buffer (rows strided), as the fused route passes them."""
    c = CASES["B3-gqa-D32-full"]
    kw = _inputs(c, torch.float32, seed=5)
    B, H, Hkv, D = c.B, c.H, c.Hkv, c.D
    buf = torch.randn(B, 1, (H + 2 * Hkv) * D + 7, device=DEVICE)
    buf[..., : H * D] = kw["q"].reshape(B, 1, -1)
    buf[..., H * D:(H + Hkv) * D] = kw["k"].reshape(B, 1, -1)
    buf[..., (H + Hkv) * D:(H + 2 * Hkv) * D] = kw["v"].reshape(B, 1, -1)
    strided = dict(_clone(kw), q=buf[..., : H * D].view(B, 1, H, D),
                   k=buf[..., H * D:(H + Hkv) * D].view(B, 1, Hkv, D),
                   v=buf[..., (H + Hkv) * D:(H + 2 * Hkv) * D].view(B, 1, Hkv, D))
    assert not strided["q"].is_contiguous()
    dense = _clone(kw)
    with count_host_reads() as reads:  # positions, next position and mask stay on the device (CUDA graphs)
        o_strided = _call(decode_attention_step, strided, c.ring)
    assert not reads, reads
    o_dense = _call(decode_attention_step, dense, c.ring)
    # the cache write is elementwise: bit for bit. The output may differ in the last bits on a GPU:
    # Triton picks a load layout from the strides' alignment (odd strides: no vector loads), and the
    # new token's score is a sum over D / 2 whose order follows that layout
    assert torch.equal(strided["k_cache"], dense["k_cache"]) and torch.equal(strided["v_cache"], dense["v_cache"])
    assert torch.equal(strided["valid"], dense["valid"])
    assert_close("strided vs dense output", o_strided, o_dense, rtol=1e-5)  # a wrong stride: O(1)


def test_fused_step_rejects_bad_input():
    c = CASES["B3-gqa-D32-full"]
    kw = _inputs(c, torch.float32)

    def call(**over):
        return _call(decode_attention_step, {**_clone(kw), **over}, c.ring)

    with pytest.raises(ValueError, match="one token per row"):
        call(q=kw["q"].expand(c.B, 2, c.H, c.D))
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        call(q=kw["q"][:, :, :3])
    with pytest.raises(ValueError, match="even"):
        odd = dict(q=kw["q"][..., :31], k=kw["k"][..., :31], k_cache=kw["k_cache"][..., :31].contiguous())
        call(**odd)
    with pytest.raises(ValueError, match=r"k_cache must have shape \[3, 2, 24, 32\]"):
        call(k_cache=kw["k_cache"][:, :, :, :16].contiguous())
    with pytest.raises(TypeError, match="valid must be a bool"):
        call(valid=kw["valid"].long())
    with pytest.raises(TypeError, match="k must have q's dtype"):
        call(k=kw["k"].half())
    with pytest.raises(TypeError, match="share a float32"):
        call(k_cache=kw["k_cache"].double(), v_cache=kw["v_cache"].double())
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        call(k_cache=kw["k_cache"].transpose(0, 1).contiguous().transpose(0, 1))
    with pytest.raises(ValueError, match="position must be a tensor of shape"):
        call(position=kw["position"][:2])
    with pytest.raises(TypeError, match="next_position must be an integer"):
        call(next_position=torch.tensor(3.0, device=DEVICE))
    with pytest.raises(ValueError, match="mask must be a tensor of shape"):
        call(mask=torch.ones(c.B, 2, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous along its last dim"):
        call(q=kw["q"].transpose(-1, -2).contiguous().transpose(-1, -2))
    with pytest.raises(ValueError, match="block_l"):
        DecodeAttentionConfig(block_l=24)
    with pytest.raises(ValueError, match="splits"):
        DecodeAttentionConfig(splits=0)


def test_select_config_splits_until_the_sms_are_busy():
    """Batch 1 x 8 KV heads on 132 SMs: the slots are split (~2 programs per SM); a program per SM
    already (batch 32 x 8 KV heads, or batch 17): one split; batch 16 (128 programs): three."""
    assert da.select_config(1, 8, 2048, 132).splits == 32
    assert da.select_config(1, 8, 8192, 132).splits == 33
    assert da.select_config(32, 8, 2048, 132).splits == 1
    assert da.select_config(17, 8, 2048, 132).splits == 1
    assert da.select_config(16, 8, 2048, 132).splits == 3
    assert da.select_config(1, 8, 40, 132).splits == 1  # one block of slots: nothing to split
    assert da.select_config(1, 8, 40, 132, head_dim=256).splits == 2  # 32-slot blocks at head dim 256


@pytest.mark.skipif(DEVICE != "cuda", reason="counts compiled Triton kernels")
def test_one_compile_serves_every_cache_length():
    """The cache length and the number of splits are runtime integers: caches of another length (a
    generation of another capacity), divisible by 16 or not, with another split count, launch the
    kernels compiled for the first (H100, 2026-12-07: ~0.9 s of compiling in the first steps of a
    2K-prompt hybrid-global-340m generation otherwise)."""
    def compiled():
        return sum(len(fn.device_caches[torch.cuda.current_device()][0])
                   for fn in (da.decode_attention_kernel, da.decode_attention_combine_kernel))

    def step(L, next_position):
        c = Case(1, 8, 8, 128, L, False, next_position, [next_position], pad=False)
        kw = _inputs(c, torch.bfloat16)
        return _call(decode_attention_step, kw, False, config=DecodeAttentionConfig(splits=33))

    step(2052, 2048)  # 33 blocks of 64: 33 splits
    before = compiled()
    for L, nxt in ((2304, 2100), (2080, 2050), (2560, 2300)):  # 18 / 17 / 20 splits, 2304 divisible by 16
        step(L, nxt)
    assert compiled() == before


def test_custom_op_schema_and_fake():
    """The registered op declares the cache tensors it writes (schema check: mutations match) and
    its fake implementation gives the real output's shape and dtype (torch.compile, CUDA graphs)."""
    c = CASES["B3-gqa-D32-ring-wrap"]
    kw = _inputs(c, torch.bfloat16)
    args = [kw[n] for n in ("q", "k", "v", "k_cache", "v_cache", "valid")]
    args += [kw["position"].reshape(c.B), kw["next_position"], kw["mask"].reshape(c.B),
             da._inv_freq(c.D, 500.0, kw["q"].device), c.D ** -0.5, True, 16, 2, 4]
    torch.library.opcheck(da._op, args, test_utils=("test_schema", "test_faketensor"))
