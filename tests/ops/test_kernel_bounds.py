"""Every load and store of the chunk kernels stays inside its tensors (CPU, the Triton interpreter).

A kernel that reads past a tensor gets on a GPU either another allocation's bytes or an "illegal
memory access" that poisons the process; the interpreter would read host memory silently. Here
``tests/ops/_bounds.py`` checks every interpreted access against the launch's tensor arguments,
for the forward and backward of the plain, gated and linear-attention chunk ops and DeltaProduct
on hostile packed batches (one-token and chunk-edge documents), K != V, and with the GPU's
launch settings (``select_config(interpreter=False)``: narrower blocks, the V-split of the state
kernels) as well as the interpreter's.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from tests.ops._bounds import OutOfBounds, checked_bounds
from tests.ops._triton_common import ON_GPU

pytestmark = pytest.mark.skipif(ON_GPU, reason="checks the interpreter's accesses (CPU)")

LENGTHS = [1, 63, 64, 65, 130, 2]


@pytest.fixture(params=["interpreter", "gpu"])
def launch_settings(request, monkeypatch):
    """The interpreter's launch settings, or those select_config picks for a 132-SM GPU."""
    if request.param == "gpu":
        config = importlib.import_module("deltanet.ops.delta_rule.config")
        select = config.select_config
        for name in ("deltanet.ops.delta_rule.chunk", "deltanet.ops.delta_rule.linear"):
            module = importlib.import_module(name)
            if hasattr(module, "select_config"):
                monkeypatch.setattr(module, "select_config", lambda *a, **kw: select(
                    *a, **{**kw, "interpreter": False, "num_sms": 132}))
    return request.param


def _inputs(K, V, dtype, gated=False, steps=1):
    torch.manual_seed(0)
    T, H, N = sum(LENGTHS), 2, len(LENGTHS)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    q = F.normalize(torch.randn(1, T, H, K), dim=-1).to(dtype)
    k = F.normalize(torch.randn(1, T * steps, H, K), dim=-1).to(dtype)
    v = torch.randn(1, T * steps, H, V).to(dtype)
    beta = torch.rand(1, T * steps, H).to(dtype)
    g = -torch.rand(1, T, H) if gated else None
    h0 = torch.randn(N, H, K, V)
    return q, k, v, beta, g, h0, cu


@pytest.mark.parametrize("rule", ["delta", "gated", "linear", "product"])
@pytest.mark.parametrize("dims", [(32, 16), (16, 48)], ids=lambda d: f"K{d[0]}-V{d[1]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_chunk_ops_stay_inside_their_tensors(rule, dims, dtype, launch_settings):
    from deltanet.layers.linear_attention import linear_attention
    from deltanet.ops import chunk_delta_rule, delta_product

    K, V = dims
    steps = 2 if rule == "product" else 1
    q, k, v, beta, g, h0, cu = _inputs(K, V, dtype, gated=rule == "gated", steps=steps)
    leaves = [x.requires_grad_() for x in (q, k, v, beta, h0) + ((g,) if g is not None else ())]
    with checked_bounds() as log:
        if rule == "linear":
            o, S = linear_attention(q, k, v, initial_state=h0, cu_seqlens=cu, backend="triton")
        elif rule == "product":
            o, S = delta_product(q, k.unflatten(1, (-1, steps)), v.unflatten(1, (-1, steps)),
                                 beta.unflatten(1, (-1, steps)), initial_state=h0, output_final_state=True,
                                 cu_seqlens=cu, backend="triton")
        else:
            o, S = chunk_delta_rule(q, k, v, beta, g=g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        (o.float().square().sum() + S.square().sum()).backward()
    assert len(log.launches) >= 4 and log.accesses > 0  # forward and backward kernels were checked
    assert all(torch.isfinite(x.grad).all() for x in leaves if x.grad is not None)


def test_an_access_outside_every_tensor_is_caught():
    """The checker itself: a kernel reading from the wrong place is named (the shifted read lands
    64 MiB past its input, outside both tensors of the launch)."""
    import triton
    import triton.language as tl
    from triton.runtime.errors import InterpreterError

    @triton.jit
    def copy_kernel(x, y, n, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.arange(0, BLOCK)
        tl.store(y + r, tl.load(x + SHIFT + r, mask=r < n), mask=r < n)

    x, y = torch.randn(10), torch.empty(10)
    with checked_bounds() as log:
        copy_kernel[(1,)](x, y, 10, SHIFT=0, BLOCK=16)
    assert torch.equal(x, y) and log.launches == ["copy_kernel"] and log.accesses == 20
    # the interpreter re-raises a kernel's exception as its InterpreterError, the message kept
    with pytest.raises((OutOfBounds, InterpreterError), match=r"copy_kernel: load of 10 element\(s\) outside every tensor"):
        with checked_bounds():
            copy_kernel[(1,)](x, y, 10, SHIFT=2**24, BLOCK=16)
