"""The cross-entropy row kernel (``deltanet.ops.cross_entropy``): loss rows and the gradient written
over the logits, against the float64 oracle (``F.cross_entropy`` and autograd on a float64 copy) and
the PyTorch version of the same contract in the same dtype. Vocabularies of 1, 53 and 300 (several
column blocks with a partial last one when ``BLOCK_V`` is 64), ignored rows, large logits (the
online max must hold), a label out of range (NaN loss, not another class), bad arguments named.
CPU: the Triton interpreter; GPU: compiled, a 32K vocabulary too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import triton

from tests.ops._triton_common import DEVICE, ON_GPU  # sets TRITON_INTERPRET=1 on CPU before the kernels load
from tests.utils import assert_close

from deltanet.ops import cross_entropy as ce
from deltanet.ops.cross_entropy import softmax_cross_entropy_grad_, softmax_cross_entropy_grad_reference_

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
ROOT = Path(__file__).resolve().parents[2]
VOCABS = [1, 53, 300] + ([32000] if ON_GPU else [])


def _case(N, V, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(N, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (N,), generator=g)
    y[1::4] = -100
    return z.to(DEVICE), y.to(DEVICE)


def _oracle(z, y):
    """Per-row loss and d(mean loss)/d logits in float64."""
    z = z.detach().double().requires_grad_()
    rows = F.cross_entropy(z, y, ignore_index=-100, reduction="none")
    count = (y != -100).sum().clamp_min(1)
    (rows.sum() / count).backward()
    return rows.detach(), z.grad, count


@pytest.fixture(params=[4096, 64], ids=["block4096", "block64"])
def block(request, monkeypatch):
    monkeypatch.setattr(ce, "BLOCK_V", request.param)  # 64: several column blocks, a partial last one
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("V", VOCABS, ids=lambda v: f"V{v}")
def test_kernel_matches_the_oracle_and_pytorch(V, dtype, block):
    z64, y = _case(37, V)
    rows_ref, grad_ref, count = _oracle(z64, y)
    z, zt = z64.to(dtype), z64.to(dtype)
    rows = softmax_cross_entropy_grad_(z, y, count)
    rows_t = softmax_cross_entropy_grad_reference_(zt, y, count)
    assert rows.dtype == torch.float32 and z.dtype == dtype
    if dtype == torch.float32:
        assert_close("loss rows", rows, rows_ref, rtol=1e-5)
        assert_close("grad", z, grad_ref, rtol=1e-5)
    else:  # the logits' rounding dominates: as close as PyTorch in the same dtype, or nearly
        assert_close("loss rows", rows, rows_ref, baseline=rows_t, floor=1e-3)
        assert_close("grad", z, grad_ref, baseline=zt, floor=1e-3)
    ignored = (y == -100).nonzero()[:, 0]
    assert rows[ignored].abs().max() == 0 and z[ignored].float().abs().max() == 0


def test_large_logits_stay_finite(block):
    """Logits near the float32 range's comfortable edge: max-subtracted in every block."""
    z64, y = _case(9, 300, scale=1.0)
    z64 = z64 + 80.0
    z64[:, 250:] += 400.0  # the largest values only in a late block: the running max must rescale
    rows_ref, grad_ref, count = _oracle(z64, y)
    z = z64.float()
    rows = softmax_cross_entropy_grad_(z, y, count)
    assert_close("loss rows", rows, rows_ref, rtol=1e-5)
    assert_close("grad", z, grad_ref, rtol=1e-5)


def test_all_ignored_rows_give_zeros():
    z, y = _case(8, 53)
    y[:] = -100
    z = z.float()
    rows = softmax_cross_entropy_grad_(z, y, torch.ones((), dtype=torch.int64, device=DEVICE))
    assert rows.abs().max() == 0 and z.abs().max() == 0


def test_label_out_of_range_gives_nan_not_another_class():
    z, y = _case(6, 53)
    z = z.float()
    y[0], y[2] = 53, -5
    rows = softmax_cross_entropy_grad_(z, y, (y != -100).sum())
    assert torch.isnan(rows[0]) and torch.isnan(rows[2])
    assert torch.isfinite(rows[3:]).all()
    if not ON_GPU:  # the PyTorch path raises in gather (on a GPU: a device-side assert, fatal to the process)
        with pytest.raises((RuntimeError, IndexError)):
            softmax_cross_entropy_grad_reference_(z, y, (y != -100).sum())


def test_bad_arguments_are_named():
    z, y = _case(4, 10)
    c = torch.ones((), device=DEVICE)
    with pytest.raises(TypeError, match="logits"):
        softmax_cross_entropy_grad_(z, y, c)  # float64: the PyTorch path's business
    with pytest.raises(TypeError, match="logits"):
        softmax_cross_entropy_grad_(z.float()[0], y, c)
    with pytest.raises(ValueError, match="contiguous"):
        softmax_cross_entropy_grad_(z.float().t(), y[:1].repeat(10), c)
    with pytest.raises(ValueError, match="labels"):
        softmax_cross_entropy_grad_(z.float(), y[:-1], c)
    with pytest.raises(ValueError, match="labels"):
        softmax_cross_entropy_grad_(z.float(), y.float(), c)
    with pytest.raises(ValueError, match="count"):
        softmax_cross_entropy_grad_(z.float(), y, torch.ones(2, device=DEVICE))


_COMPILE = r"""
from triton.compiler import ASTSource
from benchmarks.kernel_resources import resource_usage
from deltanet.ops.cross_entropy import BLOCK_V, _ce_grad_kernel
for dt in ("bf16", "fp32"):
    sig = {"z": f"*{dt}", "stride_z": "i32", "labels": "*i64", "count": "*i64", "loss": "*fp32", "V": "i32",
           "ignore_index": "i32", "BV": "constexpr"}
    regs, stack, _ = resource_usage(ASTSource(fn=_ce_grad_kernel, signature=sig, constexprs={"BV": BLOCK_V}),
                                    dict(num_warps=8))
    print(dt, regs, stack)
"""


@pytest.mark.skipif(not all(os.access(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", t),
                                      os.X_OK) for t in ("ptxas", "cuobjdump")),
                    reason="Triton's bundled ptxas / cuobjdump not found: no offline sm_90 compile")
def test_kernel_compiles_for_sm90_without_spills():
    """What the interpreter cannot show: the kernel compiles for an H100 / H200 (sm_90, Triton's own
    compiler, no GPU needed) for bf16 and fp32 logits at the default block, with no register spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, "-c", _COMPILE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.strip().splitlines()]
    assert [row[0] for row in rows] == ["bf16", "fp32"], r.stdout
    for dt, regs, stack in rows:
        assert int(stack) == 0, f"{dt}: {stack} B of spill stack per thread ({regs} registers)"
        assert int(regs) <= 128, r.stdout
