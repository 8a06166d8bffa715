"""decode_attention (one query against a static / ring K/V cache) vs causal_attention."""

import pytest
import torch

from deltanet.ops.attention import causal_attention, decode_attention
from tests.utils import assert_close


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
