"""The forward-only glue kernels (``deltanet.ops.glue``) against the eager code they stand in for.

On CPU the Triton interpreter runs them (tests/conftest.py); on a GPU the same tests run compiled.
Each kernel must give what the eager layer code gives up to the order of a row's sum: float32
exactly to rounding, bf16 / fp16 within one rounding of the output.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltanet.layers.attention import rope_angles, rotate
from deltanet.layers.mlp import _swiglu
from deltanet.layers.norm import _norm_fwd, gated_rms_norm, l2_norm, rms_norm
from deltanet.ops import glue

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
       torch.float16: dict(rtol=2e-3, atol=1e-5)}


def _x(shape, dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(DEVICE)


def _close(got, ref, dtype):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    torch.testing.assert_close(got.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,d", [((2, 7, 64), 64), ((3, 5, 4 * 24), 24), ((1, 33, 100), 100), ((5, 1024), 1024),
                                     ((2, 3, 2048), 2048)])
def test_rms_norm_groups_match_the_eager_norm(dtype, shape, d):
    """Over groups of d channels (the per-head output norm) and whole rows (the blocks' norms);
    power-of-two and odd group sizes, a row count that leaves a partial tile, weight in float32 (a
    float32 model's parameter) and in the input dtype."""
    x = _x(shape, dtype)
    for w in (_x((d,), torch.float32, seed=1, scale=1.0), _x((d,), dtype, seed=2, scale=1.0)):
        ref, _ = _norm_fwd.eager(x, w, 1e-6, d, dtype)
        _close(glue.row_norm(x, d, weight=w, eps=1e-6), ref, dtype)
        if d == shape[-1]:
            _close(glue.row_norm(x, d, weight=w, eps=1e-6), rms_norm.eager(x, w, 1e-6), dtype)


def test_float32_input_in_the_autocast_dtype():
    """Under autocast the norm of a float32 residual stream is returned in bf16 (``out_dtype``)."""
    x, w = _x((4, 9, 128), torch.float32), _x((128,), torch.float32, seed=1)
    ref, _ = _norm_fwd.eager(x, w, 1e-5, 128, torch.bfloat16)
    _close(glue.row_norm(x, 128, weight=w, eps=1e-5, out_dtype=torch.bfloat16), ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [16, 100, 128])
def test_l2_norm_matches(dtype, d):
    x = _x((2, 11, 3, d), dtype)
    x[0, 0, 0] = 0  # an all-zero row: eps keeps it finite (0 out)
    got = glue.row_norm(x, d, kind="l2", eps=1e-12)
    _close(got, l2_norm.eager(x, 1e-12), dtype)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["silu", "sigmoid"])
def test_gated_rms_norm_matches(dtype, activation):
    x, g = _x((2, 13, 4, 32), dtype), _x((2, 13, 4, 32), dtype, seed=3)
    w = _x((32,), torch.float32, seed=1, scale=1.0)
    got = glue.row_norm(x, 32, weight=w, gate=g, gate_activation=activation, eps=1e-5)
    _close(got, gated_rms_norm.eager(x, g, w, 1e-5, activation), dtype)


def test_strided_inputs_are_read_as_laid_out():
    """A column slice of a wider buffer (as a split projection output) and a transposed tensor."""
    buf = _x((3, 10, 3 * 64), torch.bfloat16)
    x = buf[..., 64:128]
    w = _x((64,), torch.float32, seed=1)
    ref, _ = _norm_fwd.eager(x, w, 1e-6, 64, torch.bfloat16)
    _close(glue.row_norm(x, 64, weight=w), ref, torch.bfloat16)
    xt = _x((64, 6), torch.float32).t()
    _close(glue.row_norm(xt, 64, kind="l2"), l2_norm.eager(xt), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 2047, 2048, 5000])
def test_swiglu_matches_silu_times_u(dtype, n):
    g, u = _x((n,), dtype), _x((n,), dtype, seed=5)
    _close(glue.swiglu(g, u), _swiglu.eager(g, u), dtype)
    g2, u2 = _x((3, 7, 40), dtype), _x((3, 7, 40), dtype, seed=5)
    _close(glue.swiglu(g2, u2), F.silu(g2) * u2, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H,D", [(4, 64), (3, 100), (16, 128), (1, 8)])
def test_rope_matches_the_eager_rotation(dtype, H, D):
    """Positions far apart and out of order (left padding, packed documents), odd head counts,
    D / 2 not a power of two; q as a head view of a projection output."""
    B, T = 2, 7
    pos = torch.tensor([[0, 0, 1, 2, 3, 4, 5], [8000, 3, 17, 0, 1, 2, 32767]], device=DEVICE)
    cos, sin = rope_angles(pos, D, 1e4)
    x = _x((B, T, H * D), dtype).view(B, T, H, D)
    _close(glue.rope(x, cos, sin), rotate.eager(x, cos, sin), dtype)
    wide = _x((B, T, 2 * H * D), dtype)[..., H * D:].view(B, T, H, D)  # row stride 2 H D
    _close(glue.rope(wide, cos, sin), rotate.eager(wide, cos, sin), dtype)


def test_empty_inputs():
    x = torch.empty(0, 7, 64, device=DEVICE)
    assert glue.row_norm(x, 64).shape == (0, 7, 64)
    assert glue.swiglu(x, x).shape == (0, 7, 64)


def test_bad_inputs_are_named():
    x = _x((2, 3, 64), torch.float32)
    with pytest.raises(ValueError, match="d must be a positive int dividing"):
        glue.row_norm(x, 48)
    with pytest.raises(ValueError, match="d must be a positive int dividing"):
        glue.row_norm(x, 0)
    with pytest.raises(ValueError, match="d must be at most"):
        glue.row_norm(torch.zeros(1, 2 * glue.MAX_D, device=DEVICE), 2 * glue.MAX_D)
    with pytest.raises(ValueError, match="kind must be one of"):
        glue.row_norm(x, 64, kind="layer")
    with pytest.raises(ValueError, match=r"weight must be a \[64\] tensor"):
        glue.row_norm(x, 64, weight=torch.ones(32, device=DEVICE))
    with pytest.raises(ValueError, match="gate must have the shape of x"):
        glue.row_norm(x, 64, gate=x[:, :2])
    with pytest.raises(ValueError, match="gate_activation must be"):
        glue.row_norm(x, 64, gate=x, gate_activation="tanh")
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        glue.row_norm(x.double(), 64)
    with pytest.raises(TypeError, match="out_dtype must be"):
        glue.row_norm(x, 64, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="x must be a tensor"):
        glue.row_norm([1.0], 1)
    with pytest.raises(TypeError, match="u must have g's dtype"):
        glue.swiglu(x, x.half())
    with pytest.raises(ValueError, match="u must have the shape of g"):
        glue.swiglu(x, x[:1])
    cos, sin = rope_angles(torch.zeros(2, 3, dtype=torch.long, device=DEVICE), 16, 1e4)
    with pytest.raises(ValueError, match="even D"):
        glue.rope(x[..., :15].reshape(2, 3, 1, 15), cos, sin)
    with pytest.raises(ValueError, match=r"cos must be a \[2, 3, 1, 8\] tensor"):
        glue.rope(x[..., :16].reshape(2, 3, 1, 16), cos[:1], sin)
    with pytest.raises(TypeError, match="sin must be a float32 tensor"):
        glue.rope(x[..., :16].reshape(2, 3, 1, 16), cos, sin.double())
