"""The decode-step GEMV kernel (``deltanet.ops.decode_linear``) against its PyTorch composition.

Each public function against the eager layer code it replaces (``rms_norm_linear``, ``F.silu(g) *
u`` with ``swiglu_linear``, ``residual + F.linear``) and, for the low-precision dtypes, both against
the float64 oracle: the kernel may be at most 2x as far from it as PyTorch in the same dtype.
Odd widths (48, 80), batches 1 / 3 / 5 and 70 (two row blocks), strided input rows, outputs
pre-filled with NaN. CPU: the Triton interpreter; GPU: compiled, wider shapes too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.ops._triton_common import DEVICE, ON_GPU  # sets TRITON_INTERPRET=1 on CPU before the kernels load
from tests.utils import assert_close

from deltanet.layers.mlp import swiglu_linear
from deltanet.layers.norm import rms_norm_linear
from deltanet.ops import decode_linear as dl
from deltanet.ops.decode_linear import (GemvConfig, decode_linear_reference, linear_residual_decode,
                                        rms_norm_linear_decode, rms_norm_swiglu_decode)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
BATCHES = [1, 3, 5, 70] if not ON_GPU else [1, 3, 5, 32, 64, 70]
WIDTHS = [32, 48, 64, 80] if not ON_GPU else [48, 80, 1024]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(dl, "POISON", True)  # an unwritten output element is NaN and fails


def _r(*shape, dtype, s=1.0, g):
    return (s * torch.randn(*shape, generator=g)).to(device=DEVICE, dtype=dtype)


def _check(name, out, ref_same_dtype, oracle, dtype):
    """fp32: the kernel equals the eager composition to 1e-5; bf16 / fp16: within 2x PyTorch's own
    error against the float64 oracle, and near the eager composition in the same dtype."""
    if dtype == torch.float32:
        assert_close(name, out.double(), ref_same_dtype.double(), rtol=1e-5)
        return
    assert_close(name, out.double(), oracle, baseline=ref_same_dtype.double(), floor=1e-3)
    assert_close(f"{name} vs eager", out.float(), ref_same_dtype.float(), rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("C", WIDTHS)
@pytest.mark.parametrize("M", BATCHES)
def test_norm_and_projections_equal_rms_norm_linear(M, C, dtype):
    g = torch.Generator().manual_seed(M * 1000 + C)
    x = _r(M, 1, C, dtype=dtype, g=g)
    nw = _r(C, dtype=torch.float32, g=g).abs() + 0.5
    Ns = [C, 5, 80, 1, 48, 17]  # q-like, beta-like, wider than C, a single row, odd sizes
    ws = [_r(n, C, dtype=dtype, s=C ** -0.5, g=g) for n in Ns]
    out = rms_norm_linear_decode(x, nw, ws, 1e-6)
    with torch.no_grad():
        eager = rms_norm_linear(x, nw, ws, 1e-6)  # the eager layer's function
        oracle = rms_norm_linear(x.double(), nw.double(), [w.double() for w in ws], 1e-6)
    assert len(out) == len(Ns)
    for i, (o, e, r) in enumerate(zip(out, eager, oracle)):
        assert o.shape == (M, 1, Ns[i]) and o.dtype == dtype
        _check(f"projection {i}", o, e, r, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [1, 5, 70])
def test_projections_without_norm_and_strided_rows(M, dtype):
    """No norm (the mixer without a pre-norm), input rows strided (a column slice of a wider tensor)."""
    g = torch.Generator().manual_seed(M)
    C = 48
    wide = _r(M, 2 * C + 3, dtype=dtype, g=g)
    x = wide[:, 3:C + 3]
    assert x.stride(0) == 2 * C + 3
    ws = [_r(n, C, dtype=dtype, s=C ** -0.5, g=g) for n in (80, 3)]
    out = rms_norm_linear_decode(x, None, ws)
    for i, w in enumerate(ws):
        _check(f"projection {i}", out[i], F.linear(x, w), F.linear(x.double(), w.double()), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("C,I", [(32, 64), (48, 80), (80, 48)] if not ON_GPU else [(48, 80), (1024, 2816)])
@pytest.mark.parametrize("M", [1, 3, 5, 70])
def test_mlp_kernels_equal_swiglu(M, C, I, dtype):
    """rmsnorm + gate/up + silu(g) * u, then down + residual: the eager SwiGLU block's MLP half."""
    g = torch.Generator().manual_seed(M + C)
    x = _r(M, 1, C, dtype=dtype, g=g)
    nw = _r(C, dtype=torch.float32, g=g).abs() + 0.5
    wg, wu = (_r(I, C, dtype=dtype, s=C ** -0.5, g=g) for _ in range(2))
    wd = _r(C, I, dtype=dtype, s=I ** -0.5, g=g)
    p = rms_norm_swiglu_decode(x, nw, wg, wu, 1e-6)
    y = linear_residual_decode(p, wd, x)
    with torch.no_grad():
        eager_g, eager_u = rms_norm_linear(x, nw, [wg, wu], 1e-6)
        eager_p = F.silu(eager_g) * eager_u
        eager_y = x + swiglu_linear(eager_g, eager_u, wd)
        og, ou = rms_norm_linear(x.double(), nw.double(), [wg.double(), wu.double()], 1e-6)
        oracle_p = F.silu(og) * ou
        oracle_y = x.double() + oracle_p @ wd.double().t()
    assert p.shape == (M, 1, I) and y.shape == (M, 1, C) and y.dtype == dtype
    _check("silu(g) * u", p, eager_p, oracle_p, dtype)
    _check("x + down", y, eager_y, oracle_y, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [1, 3, 70])
def test_linear_residual(M, dtype):
    g = torch.Generator().manual_seed(M)
    x, r = _r(M, 80, dtype=dtype, g=g), _r(M, 48, dtype=dtype, s=4.0, g=g)
    w = _r(48, 80, dtype=dtype, s=80 ** -0.5, g=g)
    _check("r + x W^T", linear_residual_decode(x, w, r), r + F.linear(x, w), r.double() + x.double() @ w.double().t(),
           dtype)
    _check("x W^T", linear_residual_decode(x, w), F.linear(x, w), x.double() @ w.double().t(), dtype)


@pytest.mark.parametrize("config", [GemvConfig(BN=32, BK=16, num_warps=2, num_stages=2),
                                    GemvConfig(BN=64, BK=128, num_warps=8, num_stages=4)], ids=["narrow-k", "wide-n"])
def test_launch_settings_change_nothing(config):
    """Every ``GemvConfig`` computes the same thing (K walked in more or fewer blocks, a block of
    columns spanning two matrices' boundaries differently)."""
    g = torch.Generator().manual_seed(3)
    x = _r(5, 1, 48, dtype=torch.float32, g=g)
    nw = _r(48, dtype=torch.float32, g=g)
    ws = [_r(n, 48, dtype=torch.float32, g=g) for n in (80, 5, 17)]
    for a, b in zip(rms_norm_linear_decode(x, nw, ws, config=config), rms_norm_linear_decode(x, nw, ws)):
        assert_close("config", a, b, rtol=1e-5)
    p = rms_norm_swiglu_decode(x, nw, ws[0], ws[0].flip(0), config=config)
    assert_close("swiglu config", p, rms_norm_swiglu_decode(x, nw, ws[0], ws[0].flip(0)), rtol=1e-5)
    r = linear_residual_decode(p, _r(48, 80, dtype=torch.float32, g=g), x, config=config)
    assert r.shape == x.shape and torch.isfinite(r).all()
    with pytest.raises(ValueError, match="GemvConfig.BN must be a power of two >= 16"):
        GemvConfig(BN=24)
    with pytest.raises(TypeError, match="config must be a GemvConfig"):
        linear_residual_decode(p, ws[0].t().contiguous(), config=dict(BN=16))


def test_reference_is_the_eager_composition():
    """The reference the docs point to computes the eager layer's roundings (bf16: bit for bit)."""
    g = torch.Generator().manual_seed(0)
    x = _r(3, 48, dtype=torch.bfloat16, g=g)
    nw = _r(48, dtype=torch.float32, g=g)
    ws = [_r(n, 48, dtype=torch.bfloat16, g=g) for n in (16, 5)]
    with torch.no_grad():
        assert torch.equal(decode_linear_reference(x, ws, nw), torch.cat(rms_norm_linear(x, nw, ws, 1e-6), -1))


def test_validates_its_inputs():
    g = torch.Generator().manual_seed(0)
    x = _r(2, 48, dtype=torch.float32, g=g)
    w = _r(16, 48, dtype=torch.float32, g=g)
    with pytest.raises(ValueError, match=r"weights\[1\] must have shape \[N, 48\]"):
        rms_norm_linear_decode(x, None, [w, w[:, :40]])
    with pytest.raises(TypeError, match=r"weights\[0\] must have x's dtype"):
        rms_norm_linear_decode(x, None, [w.double()])
    with pytest.raises(ValueError, match="weights must be a list of 1 to 8"):
        rms_norm_linear_decode(x, None, [w] * 9)
    with pytest.raises(ValueError, match="must be contiguous"):
        rms_norm_linear_decode(x, None, [_r(48, 16, dtype=torch.float32, g=g).t()])
    with pytest.raises(ValueError, match=r"norm_weight must have shape \[48\]"):
        rms_norm_linear_decode(x, torch.ones(32, device=DEVICE), [w])
    with pytest.raises(ValueError, match="SwiGLU takes two weights of the same shape"):
        rms_norm_swiglu_decode(x, None, w, w[:8])
    with pytest.raises(ValueError, match=r"residual must have shape \[2, 16\]"):
        linear_residual_decode(x, w, x)
    with pytest.raises(TypeError, match="x must be a float32, bfloat16 or float16"):
        linear_residual_decode(x.long(), w)
    with pytest.raises(ValueError, match="x must be contiguous along its last dim"):
        rms_norm_linear_decode(_r(48, 2, dtype=torch.float32, g=g).t(), None, [w])


# -- split-K and the register-product path -------------------------------------------------------------

def _same_as(name, out, base, dtype):
    """Two launch settings: the same fp32 sums up to accumulation order, so the same outputs up to
    a rounding flip of the final dtype (float32: 1e-5)."""
    assert_close(name, out.double(), base.double(), rtol={torch.float32: 1e-5, torch.bfloat16: 4e-3,
                                                          torch.float16: 1e-3}[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [1, 3, 17, 65])
@pytest.mark.parametrize("split", [2, 3, 8], ids=lambda s: f"split{s}")
def test_split_k_equals_unsplit_and_oracle(split, M, dtype):
    """Every function with ``SPLIT_K`` > 1 against the float64 oracle, the eager composition and
    the unsplit kernel: C = 80 channels in BK = 16 blocks (split 3: ranges of 32, the last cut at
    80; split 8: 16-channel ranges, the last three empty and stored as zeros), several matrices
    of odd widths, 65 rows (two row blocks); the NaN-filled workspace catches an unwritten partial."""
    g = torch.Generator().manual_seed(split * 100 + M)
    C, I = 80, 40
    cfg, one = GemvConfig(BK=16, SPLIT_K=split), GemvConfig(BK=16)
    x = _r(M, C, dtype=dtype, g=g)
    nw = _r(C, dtype=torch.float32, g=g).abs() + 0.5
    ws = [_r(n, C, dtype=dtype, s=C ** -0.5, g=g) for n in (40, 24, 5, 17)]  # q/k/v/beta-like, not multiples of BN
    out = rms_norm_linear_decode(x, nw, ws, 1e-6, config=cfg)
    with torch.no_grad():
        eager = rms_norm_linear(x, nw, ws, 1e-6)
        oracle = rms_norm_linear(x.double(), nw.double(), [w.double() for w in ws], 1e-6)
    for i, (o, b) in enumerate(zip(out, rms_norm_linear_decode(x, nw, ws, 1e-6, config=one))):
        assert o.shape == (M, ws[i].shape[0]) and o.dtype == dtype
        _check(f"projection {i}", o, eager[i], oracle[i], dtype)
        _same_as(f"projection {i} vs SPLIT_K=1", o, b, dtype)
    assert all(torch.equal(a, b) for a, b in zip(out, rms_norm_linear_decode(x, nw, ws, 1e-6, config=cfg)))

    wg, wu = ws[0], _r(I, C, dtype=dtype, s=C ** -0.5, g=g)
    wd = _r(C, I, dtype=dtype, s=I ** -0.5, g=g)
    p = rms_norm_swiglu_decode(x, nw, wg, wu, 1e-6, config=cfg)
    y = linear_residual_decode(p, wd, x, config=cfg)
    with torch.no_grad():
        eager_g, eager_u = rms_norm_linear(x, nw, [wg, wu], 1e-6)
        og, ou = oracle[0], rms_norm_linear(x.double(), nw.double(), [wu.double()], 1e-6)[0]
    _check("silu(g) * u", p, F.silu(eager_g) * eager_u, F.silu(og) * ou, dtype)
    _same_as("silu(g) * u vs SPLIT_K=1", p, rms_norm_swiglu_decode(x, nw, wg, wu, 1e-6, config=one), dtype)
    # down + residual on the kernel's own p, so that only this launch's error is measured
    _check("x + down", y, x + F.linear(p, wd), x.double() + p.double() @ wd.double().t(), dtype)
    _same_as("x + down vs SPLIT_K=1", y, linear_residual_decode(p, wd, x, config=one), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [1, 3, 5])
@pytest.mark.parametrize("config", [GemvConfig(BN=8, BK=32, dot=False), GemvConfig(BN=4, BK=16, SPLIT_K=3, dot=False)],
                         ids=["bn8", "bn4-split3"])
def test_register_products_equal_dot(config, M, dtype):
    """``dot=False`` (rows per program up to 4: M = 5 takes two row blocks) against the oracle and
    the ``tl.dot`` path: norm + projections, SwiGLU, residual."""
    g = torch.Generator().manual_seed(M)
    C = 48
    x = _r(M, C, dtype=dtype, g=g)
    nw = _r(C, dtype=torch.float32, g=g).abs() + 0.5
    ws = [_r(n, C, dtype=dtype, s=C ** -0.5, g=g) for n in (20, 5)]
    out = rms_norm_linear_decode(x, nw, ws, config=config)
    with torch.no_grad():
        eager = rms_norm_linear(x, nw, ws, 1e-6)
        oracle = rms_norm_linear(x.double(), nw.double(), [w.double() for w in ws], 1e-6)
    for i, (o, b) in enumerate(zip(out, rms_norm_linear_decode(x, nw, ws))):
        _check(f"projection {i}", o, eager[i], oracle[i], dtype)
        _same_as(f"projection {i} vs dot", o, b, dtype)
    wu = _r(20, C, dtype=dtype, s=C ** -0.5, g=g)
    _same_as("swiglu vs dot", rms_norm_swiglu_decode(x, nw, ws[0], wu, config=config),
             rms_norm_swiglu_decode(x, nw, ws[0], wu), dtype)
    r = _r(M, 20, dtype=dtype, g=g)
    y = linear_residual_decode(x, ws[0], r, config=config)
    _check("r + x W^T", y, r + F.linear(x, ws[0]), r.double() + x.double() @ ws[0].double().t(), dtype)


def test_select_config_splits_the_few_column_shapes():
    """The 340M decode shapes on a 132-SM GPU: SPLIT_K for >= 1.5 programs per SM, at most one
    split per BK block; no split without K, on one SM (CPU) or with programs enough."""
    sc = dl.select_config
    bf16 = torch.bfloat16
    assert sc(1, 1024, bf16, K=1024, num_sms=132).SPLIT_K == 4  # o_proj: 64 column blocks
    assert sc(1, 1024, bf16, K=2816, num_sms=132).SPLIT_K == 4  # down projection
    assert sc(32, 1024, bf16, K=2816, num_sms=132).SPLIT_K == 4
    assert sc(1, 2816, bf16, K=1024, num_sms=132).SPLIT_K == 2  # gate/up: 176 blocks
    assert sc(1, 4104, bf16, K=1024, num_sms=132).SPLIT_K == 1  # the input projections: 257 blocks
    assert sc(1, 32000, bf16, K=1024, num_sms=132).SPLIT_K == 1  # LM head
    assert sc(1, 1024, bf16, K=512, num_sms=132).SPLIT_K == 2  # two BK = 256 blocks only
    assert sc(1, 1024, bf16, K=64, num_sms=132).SPLIT_K == 1
    assert sc(1, 1024, bf16).SPLIT_K == 1 and sc(1, 1024, bf16, K=1024, num_sms=1).SPLIT_K == 1
    assert sc(65, 1024, bf16, K=1024, num_sms=132).SPLIT_K == 2  # two row blocks: 128 programs


@pytest.mark.parametrize("key", list(dl.MEASURED), ids=lambda k: "rows{}-N{}-K{}".format(*k))
def test_measured_settings_are_taken_and_exact(key, monkeypatch):
    """Each measured setting (H100 sweep, bf16): calls without a config at its shape take it (the
    launch records its settings), and the result is within 2x PyTorch's bf16 error of the float64
    oracle (split-K included); float32 and other shapes keep the rule."""
    rows, N_total, K = key
    M = 1 if rows == 16 else rows
    assert dl.measured_config(M, N_total, K, torch.bfloat16) is dl.MEASURED[key]
    assert dl.measured_config(M, N_total, K, torch.float32) is None
    assert dl.measured_config(M, N_total + 16, K, torch.bfloat16) is None
    launched = []
    real = dl._op

    def spy(*a):
        launched.append(a[6:11])  # block_n, block_k, num_warps, num_stages, split_k
        return real(*a)

    monkeypatch.setattr(dl, "_op", spy)
    g = torch.Generator().manual_seed(N_total + K)
    bf16 = torch.bfloat16
    x = _r(M, 1, K, dtype=bf16, g=g)
    nw = _r(K, dtype=torch.float32, g=g).abs() + 0.5
    if K == 2816:  # the down projection, with the residual
        w, r = _r(N_total, K, dtype=bf16, s=K ** -0.5, g=g), _r(M, 1, N_total, dtype=bf16, g=g)
        out = linear_residual_decode(x, w, r)
        eager, oracle = decode_linear_reference(x, [w], residual=r), r.double() + x.double() @ w.double().t()
    elif N_total == 2816:  # MLP gate / up + SwiGLU
        wg, wu = (_r(N_total, K, dtype=bf16, s=K ** -0.5, g=g) for _ in range(2))
        out = rms_norm_swiglu_decode(x, nw, wg, wu)
        eager = decode_linear_reference(x, [wg, wu], nw, swiglu=True)
        with torch.no_grad():
            og, ou = rms_norm_linear(x.double(), nw.double(), [wg.double(), wu.double()], 1e-6)
        oracle = F.silu(og) * ou
    else:  # the input projections: q, k, v, beta (, a), output gate
        Ns = [1024, 1024, 1024, 8] + ([8] if N_total == 4112 else []) + [1024]
        ws = [_r(n, K, dtype=bf16, s=K ** -0.5, g=g) for n in Ns]
        out = torch.cat(rms_norm_linear_decode(x, nw, ws), -1)
        eager = decode_linear_reference(x, ws, nw)
        with torch.no_grad():
            oracle = torch.cat(rms_norm_linear(x.double(), nw.double(), [w.double() for w in ws], 1e-6), -1)
    c = dl.MEASURED[key]
    assert launched == [(c.BN, c.BK, c.num_warps, c.num_stages, c.SPLIT_K)]
    _check(f"measured {key}", out, eager, oracle, bf16)


@pytest.mark.parametrize("kwargs,field", [(dict(SPLIT_K=0), "SPLIT_K"), (dict(SPLIT_K=65), "SPLIT_K"),
                                          (dict(SPLIT_K=2.0), "SPLIT_K"), (dict(dot=1), "dot"),
                                          (dict(BN=8), "BN"), (dict(BN=2, dot=False), "BN"), (dict(BK=8), "BK"),
                                          (dict(num_warps=3), "num_warps"), (dict(num_stages=0), "num_stages")],
                         ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{x}" for k, x in v.items()))
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"GemvConfig.{field} must"):
        GemvConfig(**kwargs)


def test_split_op_traces_and_passes_opcheck():
    """The split-K launch inside the custom op: schema and fake tensor (opcheck), and a full-graph
    torch.compile (the workspace's size follows the shapes; no host reads)."""
    g = torch.Generator().manual_seed(0)
    x = _r(3, 48, dtype=torch.float32, g=g)
    nw = _r(48, dtype=torch.float32, g=g)
    ws = [_r(n, 48, dtype=torch.float32, g=g) for n in (20, 5)]
    torch.library.opcheck(torch.ops.deltanet.decode_linear.default, (x, ws, nw, None, 1e-6, False, 16, 16, 4, 3, 2, True),
                          test_utils=("test_schema", "test_faketensor"))
    cfg = GemvConfig(BK=16, SPLIT_K=2)

    def f(x, r):
        return linear_residual_decode(x, ws[0], r, config=cfg)
    r = _r(3, 20, dtype=torch.float32, g=g)
    assert_close("compiled split", torch.compile(f, fullgraph=True, backend="aot_eager")(x, r), f(x, r), rtol=1e-6)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_split_k_replays_from_a_cuda_graph(monkeypatch):
    """Split-K's two launches and its workspace inside a captured graph: replays on new inputs equal
    eager calls bit for bit (with split-K on by default, the default config at the 340M down
    projection's shape on a 132-SM GPU splits the same way)."""
    monkeypatch.setattr(dl, "SPLIT_K_BY_DEFAULT", True)
    g = torch.Generator().manual_seed(0)
    x, r = _r(1, 2816, dtype=torch.bfloat16, g=g), _r(1, 1024, dtype=torch.bfloat16, g=g)
    w = _r(1024, 2816, dtype=torch.bfloat16, s=2816 ** -0.5, g=g)
    cfg = GemvConfig(SPLIT_K=4)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        linear_residual_decode(x, w, r, config=cfg)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = linear_residual_decode(x, w, r, config=cfg)
    for seed in (1, 2):
        x.copy_(_r(1, 2816, dtype=torch.bfloat16, g=torch.Generator().manual_seed(seed)))
        graph.replay()
        assert torch.equal(y, linear_residual_decode(x, w, r, config=cfg))
        assert torch.equal(y, linear_residual_decode(x, w, r))  # the default splits this shape the same way
