"""Programmatic dependent launch of the decode kernels (``deltanet.ops.pdl``): never taken where it
cannot run; on a GPU of compute capability 9+, the same bits as without it, captured in a graph too."""

import pytest
import torch

from tests.ops._triton_common import ON_GPU  # sets TRITON_INTERPRET=1 on CPU before the kernels load

from deltanet.models import set_decode_kernel
from deltanet.ops import decode_linear as dl
from deltanet.ops import pdl

HOPPER = ON_GPU and torch.cuda.get_device_capability()[0] >= 9


def test_off_by_default_and_never_on_the_cpu(monkeypatch):
    """Off unless switched on; switched on, CPU tensors (the interpreter) still never take it."""
    assert pdl.PDL_DECODE is False
    x = torch.zeros(2, 3)
    assert pdl.pdl_for(x) is False
    monkeypatch.setattr(pdl, "PDL_DECODE", True)
    assert pdl.pdl_for(x) is False


@pytest.mark.skipif(ON_GPU, reason="CPU tensors need the interpreter; on a GPU machine the kernels are compiled")
def test_kernels_run_with_the_switch_on_where_it_cannot_apply(monkeypatch):
    """With the switch on, a CPU call of the GEMV (interpreter) computes what it does with it off."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 40, generator=g)
    ws = [torch.randn(24, 40, generator=g) * 0.1 for _ in range(2)]
    cfg = dl.GemvConfig(BN=16, BK=16, SPLIT_K=2)
    ref = dl.rms_norm_swiglu_decode(x, torch.ones(40), *ws, config=cfg)
    monkeypatch.setattr(pdl, "PDL_DECODE", True)
    assert torch.equal(dl.rms_norm_swiglu_decode(x, torch.ones(40), *ws, config=cfg), ref)


@pytest.mark.skipif(not HOPPER, reason="programmatic dependent launch needs a GPU of compute capability 9+")
@pytest.mark.parametrize("M", [1, 32])
def test_gemvs_equal_bit_for_bit(monkeypatch, M):
    """Every GEMV form (norm + several weights, SwiGLU, residual; split-K and not) gives the same
    bits with PDL on: the weights are prefetched into L2 before the wait, everything else after."""
    g = torch.Generator().manual_seed(M)
    bf16 = torch.bfloat16

    def r(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=g)).to("cuda", bf16)

    x, res = r(M, 1, 1024), r(M, 1, 1024)
    nw = r(1024).abs() + 0.5
    wq = [r(n, 1024, s=1024 ** -0.5) for n in (1024, 1024, 1024, 8, 1024)]
    wg, wu = r(2816, 1024, s=1024 ** -0.5), r(2816, 1024, s=1024 ** -0.5)
    wd = r(1024, 2816, s=2816 ** -0.5)
    h = r(M, 1, 2816)

    def run():
        out = list(dl.rms_norm_linear_decode(x, nw, wq))
        out.append(dl.rms_norm_swiglu_decode(x, nw, wg, wu))
        out.append(dl.linear_residual_decode(h, wd, res))
        for split in (1, 4):
            out.append(dl.linear_residual_decode(h, wd, res, config=dl.GemvConfig(SPLIT_K=split)))
        return out

    off = run()
    monkeypatch.setattr(pdl, "PDL_DECODE", True)
    on = run()
    for a, b in zip(on, off):
        assert torch.equal(a, b)


@pytest.mark.skipif(not HOPPER, reason="programmatic dependent launch needs a GPU of compute capability 9+")
@pytest.mark.parametrize("layer_types", [["delta_net", "sliding_attention", "gated_delta_product"],
                                         ["gated_delta_net", "full_attention"]], ids=["delta+swa+product", "gated+full"])
def test_captured_decoding_equals_without(monkeypatch, layer_types):
    """A whole model's captured decode loop (fused rule steps, GEMVs, attention steps and their split
    combine, all with PDL edges inside the graph) gives the tokens and logits it gives without."""
    from deltanet.models import DeltaNetConfig, DeltaNetForCausalLM
    from deltanet.models.decoding import decode

    torch.manual_seed(0)
    cfg = DeltaNetConfig(vocab_size=97, hidden_size=64, num_heads=2, intermediate_size=128, pad_token_id=0,
                         bos_token_id=None, eos_token_id=None, layer_types=layer_types,
                         num_hidden_layers=len(layer_types), sliding_window=7)
    model = DeltaNetForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    set_decode_kernel(model, "fused")
    prompt = torch.randint(1, 97, (3, 21), device="cuda")
    off = decode(model, prompt, max_new_tokens=20)
    monkeypatch.setattr(pdl, "PDL_DECODE", True)
    on = decode(model, prompt, max_new_tokens=20)
    assert on.graph and torch.equal(on.tokens, off.tokens)
    for a, b in zip(on.cache.tensors(), off.cache.tensors()):
        assert torch.equal(a, b)
