"""Bad input raises ValueError / TypeError naming the argument, for every public entry point."""

from __future__ import annotations

import re

import pytest
import torch

from deltanet.ops import delta_rule, delta_rule_chunkwise_torch, delta_rule_reference
from tests.utils import make_inputs

B, T, H, K, V = 2, 10, 3, 8, 4


def _good():
    return make_inputs(B, T, H, K, V, dtype=torch.float32)


def _varlen():
    inp = make_inputs(1, T, H, K, V, dtype=torch.float32)
    inp["cu_seqlens"] = torch.tensor([0, 4, T])
    return inp


def _set(name, value, base=_good):
    def make():
        inp = base()
        inp[name] = value(inp) if callable(value) else value
        return inp
    return make


CASES = {
    # (inputs factory, exception type, message fragment)
    "q_not_tensor": (_set("q", [[1.0]]), TypeError, "q must be a torch.Tensor"),
    "q_rank": (_set("q", lambda i: i["q"][0]), ValueError, "q must have shape [B, T, H, K]"),
    "q_int": (_set("q", lambda i: i["q"].long()), TypeError, "q must have a floating-point dtype"),
    "k_shape": (_set("k", lambda i: i["k"][:, :-1]), ValueError, "k must have the shape of q"),
    "v_rank": (_set("v", lambda i: i["v"][..., 0]), ValueError, "v must have shape [B, T, H, V]"),
    "v_T_mismatch": (_set("v", lambda i: i["v"][:, :-1]), ValueError, "v must have shape [B, T, H, V]"),
    "beta_shape": (_set("beta", lambda i: i["beta"][..., None]), ValueError, "beta must have shape [B, T, H]"),
    "beta_H_mismatch": (_set("beta", lambda i: i["beta"][..., :1]), ValueError, "beta must have shape [B, T, H]"),
    "beta_int": (_set("beta", lambda i: (i["beta"] > 0.5).int()), TypeError, "beta must have a floating-point"),
    "mixed_dtypes": (_set("v", lambda i: i["v"].double()), TypeError, "q, k and v must share one dtype"),
    "T0": (lambda: make_inputs(1, 1, 1, 2, 2) | {"q": torch.zeros(1, 0, 1, 2), "k": torch.zeros(1, 0, 1, 2),
                                                  "v": torch.zeros(1, 0, 1, 2), "beta": torch.zeros(1, 0, 1)},
           ValueError, "sizes must be >= 1"),
    "state_shape": (_set("initial_state", torch.zeros(B, H, V, K)), ValueError, "initial_state must have shape [N, H, K, V]"),
    "state_not_tensor": (_set("initial_state", 0.0), TypeError, "initial_state must be a torch.Tensor"),
    "state_int": (_set("initial_state", torch.zeros(B, H, K, V, dtype=torch.long)), TypeError, "initial_state must have a floating"),
    "cu_with_B2": (_set("cu_seqlens", torch.tensor([0, 4, T])), ValueError, "cu_seqlens requires B == 1"),
    "cu_float": (_set("cu_seqlens", torch.tensor([0.0, 4.0, T]), _varlen), TypeError, "cu_seqlens must have dtype int32 or int64"),
    "cu_list": (_set("cu_seqlens", [0, 4, T], _varlen), TypeError, "cu_seqlens must be a 1-D integer torch.Tensor"),
    "cu_2d": (_set("cu_seqlens", torch.tensor([[0, T]]), _varlen), ValueError, "cu_seqlens must be 1-D"),
    "cu_short": (_set("cu_seqlens", torch.tensor([0]), _varlen), ValueError, "cu_seqlens must be 1-D with at least 2"),
    "cu_not_zero_start": (_set("cu_seqlens", torch.tensor([1, 4, T]), _varlen), ValueError, "cu_seqlens must start at 0"),
    "cu_not_ending_at_T": (_set("cu_seqlens", torch.tensor([0, 4, T - 1]), _varlen), ValueError, "cu_seqlens must end at T"),
    "cu_not_increasing": (_set("cu_seqlens", torch.tensor([0, 6, 4, T]), _varlen), ValueError, "strictly increasing"),
    "cu_empty_sequence": (_set("cu_seqlens", torch.tensor([0, 4, 4, T]), _varlen), ValueError, "strictly increasing"),
    "cu_state_count": (_set("initial_state", torch.zeros(3, H, K, V), _varlen), ValueError, "N = len(cu_seqlens) - 1"),
    "scale_str": (_set("scale", "0.5"), TypeError, "scale must be a float"),
    "scale_nan": (_set("scale", float("nan")), ValueError, "scale must be finite"),
    "final_state_flag": (_set("output_final_state", "yes"), TypeError, "output_final_state must be a bool"),
}


def _call(fn, inp, **extra):
    kw = {k: inp[k] for k in ("initial_state", "cu_seqlens", "scale", "output_final_state") if k in inp}
    return fn(inp["q"], inp["k"], inp["v"], inp["beta"], **kw, **extra)


@pytest.mark.parametrize("fn", [delta_rule, delta_rule_chunkwise_torch, delta_rule_reference],
                         ids=["delta_rule", "chunkwise_torch", "reference"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises(case, fn):
    make, exc, fragment = CASES[case]
    with pytest.raises(exc, match=re.escape(fragment)):
        _call(fn, make())


def test_mixed_devices():
    meta = torch.device("meta")
    inp = _good()
    inp["beta"] = inp["beta"].to(meta)
    with pytest.raises(ValueError, match="beta is on meta but q is on cpu"):
        _call(delta_rule, inp)
    inp = _good()
    inp["initial_state"] = torch.zeros(B, H, K, V, device=meta)
    with pytest.raises(ValueError, match="initial_state is on meta"):
        _call(delta_rule, inp)


@pytest.mark.parametrize("backend", ["cuda", "", None, "TORCH"])
def test_unknown_backend(backend):
    with pytest.raises(ValueError, match="backend must be one of"):
        _call(delta_rule, _good(), backend=backend)


@pytest.mark.parametrize("chunk_size", [0, -1, 2.0, True])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        _call(delta_rule_chunkwise_torch, _good(), chunk_size=chunk_size)


def test_good_input_passes():
    o, s = _call(delta_rule, _varlen() | {"output_final_state": True})
    assert o.shape == (1, T, H, V) and s.shape == (2, H, K, V)


@pytest.mark.parametrize("dtype,K,V,warns", [
    (torch.bfloat16, 48, 32, True), (torch.float16, 64, 16, True), (torch.bfloat16, 64, 64, False),
    (torch.float32, 32, 16, False),
])
def test_16bit_small_head_dims_on_cuda_warn(dtype, K, V, warns):
    """The known GPU defect (16-bit, head dims below 64, H100 + Triton 3.6) is announced, on CUDA only."""
    import types
    import warnings

    from deltanet.ops.delta_rule.utils import warn_small_16bit_dims

    def fake(last, cuda=True):
        return types.SimpleNamespace(is_cuda=cuda, dtype=dtype, shape=(1, 8, 2, last))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_small_16bit_dims("chunk_delta_rule", fake(K), fake(V))
        warn_small_16bit_dims("chunk_delta_rule", fake(K, cuda=False), fake(V, cuda=False))  # CPU: never
    assert len(caught) == int(warns)
    if warns:
        assert issubclass(caught[0].category, RuntimeWarning)
        assert f"K = {K}, V = {V}" in str(caught[0].message) and "float32" in str(caught[0].message)
