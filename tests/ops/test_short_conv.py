"""The Triton short convolution against the float64 PyTorch reference (``layers/conv.py``).

On CPU the kernels run under the Triton interpreter at small shapes (``_triton_common`` sets
``TRITON_INTERPRET=1`` before they are imported); on a GPU the same tests run compiled. Every
buffer the launchers allocate starts as NaN, so an unwritten element fails a test.
"""

from __future__ import annotations

from tests.ops._triton_common import DEVICE, ON_GPU  # noqa: I001 (first: sets TRITON_INTERPRET)

import re

import pytest
import torch

import deltanet.layers._fused as fz
import deltanet.ops.short_conv as sc
from deltanet.layers.conv import ShortConvolution, _padded_conv, positions_in_documents
from deltanet.ops.short_conv import short_conv
from tests.utils import assert_close


@pytest.fixture(autouse=True)
def _poison_buffers(monkeypatch):
    monkeypatch.setattr(sc, "POISON", True)


def _doc_pos(T: int, seed: int) -> torch.Tensor:
    """Positions inside random documents: some of length 1, boundaries anywhere (not on blocks)."""
    g = torch.Generator().manual_seed(seed)
    cuts = set(torch.randint(1, max(T, 2), (max(T // 6, 1),), generator=g).tolist())
    if T >= 4:
        cuts |= {1, 2, T - 1}  # two one-token documents first, one last
    cu = torch.tensor([0, *sorted(c for c in cuts if 0 < c < T), T])
    return positions_in_documents(cu, T)


def _inputs(B, T, C, W, docs, seed):
    """float64 ``x [B, T, C]``, ``w [C, W]``, ``dy``, and ``doc_pos`` or None."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    w = torch.randn(C, W, generator=g, dtype=torch.float64) * W ** -0.5
    dy = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    doc_pos = _doc_pos(T, seed).to(DEVICE) if docs else None
    return x.to(DEVICE), w.to(DEVICE), dy.to(DEVICE), doc_pos


def _leaf(x, layout):
    """``x`` as a leaf tensor laid out as a channel slice of a wider tensor (``"slice"``, like q,
    k, v of one projection), a transposed one (``"transposed"``: copied by ``short_conv``), or
    contiguous."""
    B, T, C = x.shape
    if layout == "slice":
        x = torch.full((B, T, C + 7), float("nan"), dtype=x.dtype, device=x.device)[..., 3:3 + C].copy_(x)
    elif layout == "transposed":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        x = x.clone()
    return x.requires_grad_()


def _run(fn, x, w, dy, doc_pos, silu, layout="contiguous"):
    """``(y, dx, dw)`` of ``fn`` on leaf copies of ``x`` (in ``layout``) and ``w``."""
    xl, wl = _leaf(x.detach(), layout), w.detach().clone().requires_grad_()
    y = fn(xl, wl, doc_pos, silu)
    dx, dw = torch.autograd.grad(y, (xl, wl), dy.to(y.dtype))
    return y.detach(), dx, dw


def _reference(x, w, dy, doc_pos, silu):
    return _run(_padded_conv.eager, x.double(), w.double(), dy.double(), doc_pos, silu)


# (B, T, C, W, documents, layout of x)
CASES = [
    (1, 1, 5, 4, False, "contiguous"),
    (3, 1, 72, 2, True, "slice"),
    (3, 3, 5, 2, True, "contiguous"),
    (1, 3, 300, 4, False, "slice"),
    (3, 17, 72, 4, True, "slice"),
    (1, 17, 300, 2, False, "transposed"),
    (1, 130, 300, 4, True, "contiguous"),
    (3, 130, 5, 2, True, "slice"),
    (1, 130, 72, 4, False, "slice"),
    (1, 40, 24, 1, True, "contiguous"),
    (1, 40, 24, 8, True, "contiguous"),
]
CASE_IDS = ["B{}-T{}-C{}-W{}-{}-{}".format(B, T, C, W, "docs" if d else "nodocs", lay) for B, T, C, W, d, lay in CASES]


@pytest.mark.parametrize("silu", [True, False], ids=["silu", "identity"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fp32_matches_float64_reference(case, silu):
    B, T, C, W, docs, layout = case
    x, w, dy, doc_pos = _inputs(B, T, C, W, docs, seed=B * T + C + W)
    ref = _reference(x, w, dy, doc_pos, silu)
    got = _run(short_conv, x.float(), w.float(), dy.float(), doc_pos, silu, layout)
    for name, a, r in zip(("y", "dx", "dw"), got, ref):
        assert a.dtype == torch.float32
        assert_close(name, a, r, rtol=1e-5)


@pytest.fixture
def _bf16_rounds_to_nearest(monkeypatch):
    """The Triton 3.6 interpreter truncates float32 -> bfloat16 casts (twice the rounding error);
    compiled kernels round to nearest even. Make the interpreter round like the GPU, so that the
    bf16 tolerances below mean the same on both."""
    if ON_GPU:
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = src.data.astype(np.float32).view(np.uint32)
            out = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
            out[np.isnan(src.data)] = 0x7FC0
            return interpreter.TensorHandle(out, tl.bfloat16)
        return original(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)


def _bf16_ulp_check(name, got, ref32):
    """``got`` within 2 bf16 ulps (at the output's scale) of fp32 math on the same inputs, rounded."""
    ref = ref32.to(got.dtype).float()
    scale = ref.abs().max().item()
    err = (got.float() - ref).abs().max().item()
    assert err <= 2 * 2 ** -7 * scale, f"{name}: max error {err:.3e} > 2 bf16 ulps of {scale:.3e}"


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=["w-fp32", "w-bf16"])
@pytest.mark.parametrize("case", [CASES[4], CASES[6], CASES[7]], ids=[CASE_IDS[4], CASE_IDS[6], CASE_IDS[7]])
@pytest.mark.usefixtures("_bf16_rounds_to_nearest")
def test_bf16_within_rounding(case, w_dtype):
    """bf16 ``x`` (fp32 weight as under autocast, or bf16): vs float64 at most 2x as far as
    PyTorch's own bf16 computation (docs/numerics.md), and within 2 ulps of fp32 math on the same inputs."""
    B, T, C, W, docs, layout = case
    x, w, dy, doc_pos = _inputs(B, T, C, W, docs, seed=7 + T)
    xb, wb, dyb = x.bfloat16(), w.to(w_dtype), dy.bfloat16()
    ref = _reference(xb, wb, dyb, doc_pos, True)
    base = _run(_padded_conv.eager, xb, wb, dyb, doc_pos, True)
    ref32 = _run(_padded_conv.eager, xb.float(), wb.float(), dyb.float(), doc_pos, True)
    got = _run(short_conv, xb, wb, dyb, doc_pos, True, layout)
    for name, a, r, b, r32 in zip(("y", "dx", "dw"), got, ref, base, ref32):
        assert a.dtype == b.dtype, name
        assert_close(name, a, r, baseline=b)
        if a.dtype == torch.bfloat16:
            _bf16_ulp_check(name, a, r32)
        else:  # fp32 dw: fp32 sums of the same fp32 products
            assert_close(name, a, r32, rtol=1e-5)


def test_small_blocks(monkeypatch):
    """Many blocks in T and C, R-row steps that overrun the last block, documents across blocks."""
    monkeypatch.setattr(sc, "FWD", dict(BT=8, BC=16, num_warps=1))
    for name in ("BWD", "BWD_DOCS"):
        monkeypatch.setattr(sc, name, dict(BT=8, BC=16, R=4, num_warps=1))
    x, w, dy, doc_pos = _inputs(2, 37, 40, 4, True, seed=3)
    ref = _reference(x, w, dy, doc_pos, True)
    got = _run(short_conv, x.float(), w.float(), dy.float(), doc_pos, True, "slice")
    for name, a, r in zip(("y", "dx", "dw"), got, ref):
        assert_close(name, a, r, rtol=1e-5)


def test_int32_doc_pos_and_weight_only_grad():
    x, w, dy, doc_pos = _inputs(1, 20, 8, 4, True, seed=5)
    x, w = x.float(), w.float().requires_grad_()
    y = short_conv(x, w, doc_pos.int())
    (dw,) = torch.autograd.grad(y, w, dy.float())
    ref = _reference(x, w, dy, doc_pos, True)
    assert_close("y", y, ref[0])
    assert_close("dw", dw, ref[2])


def test_layer_routes_training_to_triton(monkeypatch):
    """``ShortConvolution`` on the CUDA training route (``_compiles_on`` patched on CPU) runs the
    Triton kernels and matches the eager path (``DELTANET_DISABLE_FUSION=1``), with documents."""
    monkeypatch.setattr(fz, "_compiles_on", lambda x: True)
    monkeypatch.delenv("DELTANET_CONV", raising=False)
    torch.manual_seed(0)
    conv = ShortConvolution(48, kernel_size=4).to(DEVICE)
    x = torch.randn(2, 21, 48, device=DEVICE)
    cu = torch.tensor([0, 5, 6, 21], device=DEVICE)
    dy = torch.randn_like(x)

    def step():
        conv.zero_grad()
        xl = x.clone().requires_grad_()
        y, _ = conv(xl, cu_seqlens=cu)
        y.backward(dy)
        return y.detach(), xl.grad, conv.weight.grad.clone(), type(y.grad_fn).__name__

    *got, node = step()
    assert "short_conv" in node, node  # the custom op's autograd node
    monkeypatch.setenv("DELTANET_DISABLE_FUSION", "1")
    *ref, node = step()
    assert "short_conv" not in node, node
    for name, a, r in zip(("y", "dx", "dw"), got, ref):
        assert_close(name, a, r, rtol=1e-5)


def test_recomputed_region_runs_triton_both_times(monkeypatch):
    """``recompute_in_backward`` (the mixer's ``recompute_inputs``): its no-grad forward and its
    rerun in backward both take the Triton route; gradients match the eager path."""
    monkeypatch.setattr(fz, "_compiles_on", lambda x: True)
    monkeypatch.delenv("DELTANET_CONV", raising=False)
    launches = []
    for name in ("short_conv_fwd", "short_conv_bwd"):
        launcher = getattr(sc, name)
        monkeypatch.setattr(sc, name, lambda *a, _f=launcher, _n=name: launches.append(_n) or _f(*a))
    torch.manual_seed(0)
    conv = ShortConvolution(40, kernel_size=3).to(DEVICE)
    x = torch.randn(2, 19, 40, device=DEVICE)
    dy = torch.randn_like(x)

    def step():
        conv.zero_grad()
        xl = x.clone().requires_grad_()
        (y,) = fz.recompute_in_backward(lambda a: (conv(a)[0],), (xl,), list(conv.parameters()))
        y.backward(dy)
        return y.detach(), xl.grad, conv.weight.grad.clone()

    got = step()
    assert launches == ["short_conv_fwd", "short_conv_fwd", "short_conv_bwd"], launches
    monkeypatch.setenv("DELTANET_DISABLE_FUSION", "1")
    ref = step()
    assert len(launches) == 3
    for name, a, r in zip(("y", "dx", "dw"), got, ref):
        assert_close(name, a, r, rtol=1e-5)


def test_torch_compile_fullgraph_traces_through_the_op():
    """Registered as torch.library custom ops: no graph break, same values and gradients."""
    torch._dynamo.reset()
    x, w, dy, doc_pos = (t.float() if t is not None and t.is_floating_point() else t
                         for t in _inputs(2, 23, 10, 4, True, seed=5))
    x, w = x.requires_grad_(), w.requires_grad_()

    def f(x, w, doc_pos):
        return (short_conv(x, w, doc_pos, True) * dy).sum()

    loss_c = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, doc_pos)
    grads_c = torch.autograd.grad(loss_c, (x, w))
    loss_e = f(x, w, doc_pos)
    grads_e = torch.autograd.grad(loss_e, (x, w))
    assert_close("loss", loss_c, loss_e, rtol=1e-6)
    for name, a, b in zip(("dx", "dw"), grads_c, grads_e):
        assert_close(name, a, b, rtol=1e-6)


@pytest.mark.parametrize("train", [True, False], ids=["training", "inference"])
def test_outer_compile_of_the_layer_keeps_the_triton_op(monkeypatch, train):
    """``torch.compile(fullgraph=True)`` of a CUDA training step (``_compiles_on`` patched on CPU)
    traces through the Triton op; under no_grad it traces the PyTorch conv instead."""
    monkeypatch.setattr(fz, "_compiles_on", lambda x: True)
    monkeypatch.delenv("DELTANET_CONV", raising=False)
    torch._dynamo.reset()
    ops = []

    def backend(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch.manual_seed(0)
    conv = ShortConvolution(24, kernel_size=4).to(DEVICE)
    x = torch.randn(2, 13, 24, device=DEVICE, requires_grad=train)
    compiled = torch.compile(lambda a: conv(a)[0], fullgraph=True, backend=backend)
    with torch.set_grad_enabled(train):
        y = compiled(x)
        ref = _padded_conv.eager(x, conv.weight, None, True)
    assert any("short_conv" in o for o in ops) == train, ops
    assert_close("y", y, ref, rtol=1e-5)
    if train:
        dx, dw = torch.autograd.grad(y.sum(), (x, conv.weight))
        rx, rw = torch.autograd.grad(ref.sum(), (x, conv.weight))
        assert_close("dx", dx, rx, rtol=1e-5)
        assert_close("dw", dw, rw, rtol=1e-5)


@pytest.mark.parametrize("docs", [False, True], ids=["nodocs", "docs"])
def test_custom_ops_pass_opcheck(docs):
    x, w, dy, doc_pos = (t.float() if t is not None and t.is_floating_point() else t
                         for t in _inputs(1, 9, 6, 4, docs, seed=6))
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.deltanet.short_conv_fwd.default, (x, w, doc_pos, True), test_utils=checks)
    torch.library.opcheck(torch.ops.deltanet.short_conv_bwd.default, (x, w, doc_pos, dy, True), test_utils=checks)


BAD = {
    # (call arguments (x, weight, doc_pos, silu) from good ones, exception, message fragment)
    "x_not_tensor": (lambda x, w, p: ([[1.0]], w, p, True), TypeError, "x must be a torch.Tensor"),
    "x_rank": (lambda x, w, p: (x[0], w, p, True), ValueError, "x must have shape [B, T, C]"),
    "x_float64": (lambda x, w, p: (x.double(), w, p, True), TypeError, "x must be float16, bfloat16 or float32"),
    "weight_not_tensor": (lambda x, w, p: (x, 1.0, p, True), TypeError, "weight must be a torch.Tensor"),
    "weight_C": (lambda x, w, p: (x, w[:-1], p, True), ValueError, "weight must have shape [C, W] with C = 6"),
    "weight_rank": (lambda x, w, p: (x, w[:, 0], p, True), ValueError, "weight must have shape [C, W]"),
    "weight_W0": (lambda x, w, p: (x, w[:, :0], p, True), ValueError, "kernel size W must be in [1, 8]"),
    "weight_W9": (lambda x, w, p: (x, w.repeat(1, 3)[:, :9], p, True), ValueError, "kernel size W must be in [1, 8]"),
    "weight_int": (lambda x, w, p: (x, w.long(), p, True), TypeError, "weight must be float16, bfloat16 or float32"),
    "doc_pos_float": (lambda x, w, p: (x, w, p.float(), True), TypeError, "doc_pos must have an integer dtype"),
    "doc_pos_bool": (lambda x, w, p: (x, w, p > 0, True), TypeError, "doc_pos must have an integer dtype"),
    "doc_pos_T": (lambda x, w, p: (x, w, p[:-1], True), ValueError, "doc_pos must have shape [T]"),
    "doc_pos_not_tensor": (lambda x, w, p: (x, w, [0, 1], True), TypeError, "doc_pos must be None or a torch.Tensor"),
    "silu_str": (lambda x, w, p: (x, w, p, "silu"), TypeError, "silu must be a bool"),
    "weight_device": (lambda x, w, p: (x, w.to("meta"), p, True), ValueError, "weight is on meta"),
    "doc_pos_device": (lambda x, w, p: (x, w, p.to("meta"), True), ValueError, "doc_pos is on meta"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises(name):
    make, exc, fragment = BAD[name]
    x = torch.randn(2, 5, 6, device=DEVICE)
    w = torch.randn(6, 4, device=DEVICE)
    p = torch.arange(5, device=DEVICE)
    with pytest.raises(exc, match=re.escape(fragment)):
        short_conv(*make(x, w, p))


@pytest.mark.skipif(ON_GPU, reason="CPU tensors are the case")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(sc, "interpreted", lambda: False)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        short_conv(torch.randn(1, 3, 2), torch.randn(2, 4))
