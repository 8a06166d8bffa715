"""The chunk op's typed launch settings: ``select_config`` reproduces the selection it replaced,
``kernel_config=`` reaches the kernels and keeps the numerics, bad configs fail loudly, and the
retired ``DELTANET_CHUNK_TUNING`` environment variable does nothing.

The old selection (``chunk._configs`` with its ``TUNING`` dict and environment overrides) was
recorded at commit e93a914 into ``tests/ops/data/``: its choice for a grid of shapes, devices and
dtypes, and every kernel launch (constexprs, warps, stages) of a forward + backward at 32K tokens x
16 heads. Kernels run under the Triton interpreter on CPU (small shapes), compiled on a GPU.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests.ops._triton_common import DEVICE, chunk_module, run_with_grads
from tests.utils import assert_close, make_inputs

from deltanet.ops import (ChunkKernelConfig, chunk_delta_rule, delta_product, delta_rule, delta_rule_reference,
                          device_sms, select_config)

DATA = Path(__file__).parent / "data"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Switches of the old selection whose non-default paths were deleted (measured slower, never
# chosen): the recorded selection must have had them at the value the code now always takes.
RETIRED = {"SAVE_AI": 1, "SAVE_VNEW": 1, "WY_BATCHED": 1, "WY_MERGE_TF32": 1, "WY_SPLIT_WU": 0}


def _full(D: int) -> int:
    return max(16, 1 << (D - 1).bit_length())


def test_select_config_reproduces_the_recorded_selection():
    rec = json.loads((DATA / "chunk_configs_e93a914.json").read_text())
    keys = rec["keys"]
    assert len(rec["rows"]) > 2000
    for N, H, K, V, dtype, gated, sms, interp, i in rec["rows"]:
        old = dict(zip(keys, rec["configs"][i]))
        cfg = select_config(N, H, K, V, DTYPES[dtype], num_sms=sms, gated=gated, interpreter=interp)
        new = {}
        for key in keys:
            if key in RETIRED:
                new[key] = RETIRED[key]
            elif key == "BKF":  # all of K: fixed by the shape, not a setting
                new[key] = _full(K)
            else:
                new[key] = int(getattr(cfg, key.lower()))
        assert new == old, f"N={N} H={H} K={K} V={V} {dtype} gated={gated} sms={sms} interpreter={interp}"


class _Spy:
    """Stands in for a kernel: records each launch's keyword arguments, then launches it (or, with
    ``run=False``, only records)."""

    def __init__(self, name, kernel, log, run=True):
        self.name, self.kernel, self.log, self.run = name, kernel, log, run

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, dict(kwargs)))
            if self.run:
                return self.kernel[grid](*args, **kwargs)
        return launch


def _spy_kernels(monkeypatch, run=True) -> list:
    log = []
    for attr, fn in list(vars(chunk_module).items()):
        if attr.endswith("_kernel"):
            monkeypatch.setattr(chunk_module, attr, _Spy(attr[: -len("_kernel")], fn, log, run))
    return log


def _launches_of_old(name: str, kw: dict) -> tuple[str, dict]:
    """A recorded launch in today's terms: the W-only recompute is ``w_fwd`` (formerly ``wu_fwd``
    with ``STORE_U=False``), and the deleted switches' constexprs are gone."""
    kw = dict(kw)
    if name == "wy_fwd":
        assert (kw.pop("BATCHED_INV"), kw.pop("STORE_WU"), kw.pop("MERGE_PREC")) == (True, True, kw["PREC"])
    if name == "wu_fwd":
        assert kw.pop("STORE_U") is False
        name = "w_fwd"
        kw.pop("V"), kw.pop("BV")  # W only: no V side
    return name, kw


def test_default_launches_are_the_recorded_ones(monkeypatch):
    rec = json.loads((DATA / "chunk_launches_e93a914.json").read_text())
    log = _spy_kernels(monkeypatch, run=False)
    for case in rec["cases"]:
        c = case["case"]
        B, T, H, K, V, dt = c["B"], c["T"], c["H"], c["K"], c["V"], DTYPES[c["dtype"]]
        meta = dict(device="meta")
        q, k = (torch.empty(B, T, H, K, dtype=dt, **meta) for _ in range(2))
        v, do = (torch.empty(B, T, H, V, dtype=dt, **meta) for _ in range(2))
        beta = torch.empty(B, T, H, dtype=dt, **meta)
        states = [torch.empty(B, H, K, V, dtype=torch.float32, **meta) if c["states"] else None for _ in range(2)]
        g = torch.empty(B, T, H, dtype=torch.float32, **meta) if c["gated"] else None
        cfg = select_config(B, H, K, V, dt, num_sms=c["num_sms"], gated=c["gated"])
        log.clear()
        _, _, ai, v_new, gc = chunk_module.chunk_fwd(q, k, v, beta, K ** -0.5, states[0], c["states"], None, g,
                                                     config=cfg)
        chunk_module.chunk_bwd(q, k, v, beta, K ** -0.5, states[0], None, do, states[1], ai, v_new, gc, config=cfg)
        # The gated rule's three chunk_cumsum launches (G in the forward, G again in the backward,
        # dg's reverse sum) moved into wy_fwd and the gradient kernels: its launches are the plain one's.
        old = [_launches_of_old(name, kw) for name, kw in case["launches"] if name != "chunk_cumsum"]
        assert [n for n, _ in log] == [n for n, _ in old], c
        for (name, got), (_, want) in zip(log, old):
            # every recorded argument as before (arguments added since may be present too)
            assert {a: got.get(a) for a in want} == want, (c, name)


def _small_case(seed=11, dtype=torch.float32):
    inp64 = make_inputs(2, 63, 3, 32, 48, initial_state=True, beta_max=2.0, seed=seed, device=DEVICE)
    g = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(2, 63, 3, 48, generator=g, dtype=torch.float64).to(DEVICE)
    dS = torch.randn(2, 3, 32, 48, generator=g, dtype=torch.float64).to(DEVICE)
    inp = {k: (x.to(dtype) if k != "initial_state" else x.float()) for k, x in inp64.items()}
    return inp64, inp, do, dS


def _check_against_reference(name, kernel_config):
    inp64, inp, do, dS = _small_case()
    ref = run_with_grads(delta_rule_reference, inp64, do, dS)
    got = run_with_grads(delta_rule, inp, do.float(), dS.float(), backend="triton", kernel_config=kernel_config)
    for a, b, what in [(got[0], ref[0], "o"), (got[1], ref[1], "final_state")] + [
            (got[2][n], ref[2][n], n) for n in ref[2]]:
        assert_close(f"{name}: {what}", a, b, rtol=1e-5)


def _default_small():
    return select_config(2, 3, 32, 48, torch.float32, num_sms=device_sms(DEVICE),
                         interpreter=chunk_module.interpreted())


# Each override changes what is launched; each must stay exact (fp32 vs the float64 oracle).
OVERRIDES = {
    "narrow-blocks-2-warps": dict(bk=16, bv=16, bv_state=16, bv_o=16, bk_dqkw=16, warps_wy=2, warps_state=2,
                                  warps_o=2, warps_wyb=2, warps_dqkw=2, stages_state=1, stages_o=1),
    # chunk_grads_kernel in fp32 (by default only 16-bit inputs take it), several V-blocks
    "fused-grads-bv16": dict(grads_fused=True, bv_grads=16, warps_grads=8),
    "state-int32-offsets": dict(state_addr64=False),  # the K > 64 default, here at small K
    "o-all-of-v": dict(bv_o=64, warps_o=8),
}


@pytest.mark.parametrize("name", list(OVERRIDES))
def test_override_reaches_the_launches_and_stays_exact(name, monkeypatch):
    default = _default_small()
    cfg = dataclasses.replace(default, **OVERRIDES[name])
    assert cfg != default
    log = _spy_kernels(monkeypatch)
    _check_against_reference(name, cfg)
    seen = {n: kw for n, kw in log}  # the last launch of each kernel
    o = seen["o_fwd"]
    assert (o["BV"], o["num_warps"], o["num_stages"]) == (cfg.bv_o, cfg.warps_o, cfg.stages_o)
    h = seen["h_fwd"]
    assert (h["BV"], h["num_warps"], h["num_stages"], h["ADDR64"]) == (
        cfg.bv_state, cfg.warps_state, cfg.stages_state, cfg.state_addr64)
    assert (seen["wy_fwd"]["BK"], seen["wy_fwd"]["BV"], seen["wy_fwd"]["num_warps"]) == (cfg.bk, cfg.bv, cfg.warps_wy)
    assert ("chunk_grads" in seen) == cfg.grads_fused and ("dqkw_bwd" in seen) != cfg.grads_fused
    if cfg.grads_fused:
        assert (seen["chunk_grads"]["BV"], seen["chunk_grads"]["num_warps"]) == (cfg.bv_grads, cfg.warps_grads)
    else:
        assert (seen["dqkw_bwd"]["BK"], seen["dqkw_bwd"]["num_warps"]) == (cfg.bk_dqkw, cfg.warps_dqkw)
        assert seen["wy_bwd"]["num_warps"] == cfg.warps_wyb


def test_delta_product_passes_the_config_on(monkeypatch):
    B, T, n_h, H, K, V = 1, 20, 2, 2, 16, 16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, T, H, K, generator=g)
    k = torch.nn.functional.normalize(torch.randn(B, T, n_h, H, K, generator=g), dim=-1)
    v, beta = torch.randn(B, T, n_h, H, V, generator=g), torch.rand(B, T, n_h, H, generator=g)
    cfg = dataclasses.replace(select_config(B, H, K, V, torch.float32, num_sms=1), warps_o=2, bv_state=16)
    log = _spy_kernels(monkeypatch)
    o, _ = delta_product(*(x.to(DEVICE) for x in (q, k, v, beta)), backend="triton", kernel_config=cfg)
    assert dict(log)["o_fwd"]["num_warps"] == 2
    ref, _ = delta_product(q.double(), k.double(), v.double(), beta.double(), backend="reference")
    assert_close("product o", o, ref, rtol=1e-5)


def test_environment_variable_is_gone(monkeypatch):
    """``DELTANET_CHUNK_TUNING`` was read at every call; now it is not read at all (not even parsed)."""
    inp64, inp, do, dS = _small_case(seed=5)
    log = _spy_kernels(monkeypatch)
    base = run_with_grads(chunk_delta_rule, inp, do.float(), dS.float())
    plain = list(log)
    for value in ('{"GRADS_FUSED": 1, "BV_STATE_MAX": 16, "WARPS_WY": 2, "SAVE_VNEW": 0}', "not json {"):
        monkeypatch.setenv("DELTANET_CHUNK_TUNING", value)
        log.clear()
        got = run_with_grads(chunk_delta_rule, inp, do.float(), dS.float())
        assert log == plain
        assert torch.equal(got[0], base[0]) and all(torch.equal(got[2][n], base[2][n]) for n in base[2])
    assert not hasattr(chunk_module, "TUNING")


# --- bad configs and bad uses -------------------------------------------------------------------

@pytest.mark.parametrize("change, error, match", [
    (dict(warps_wy=3), ValueError, "warps_wy must be a power of two"),
    (dict(warps_state=64), ValueError, "warps_state"),
    (dict(bk=8), ValueError, "bk must be a power of two"),
    (dict(bv_state=48), ValueError, "bv_state"),
    (dict(bv_o=512), ValueError, "bv_o"),
    (dict(stages_state=0), ValueError, "stages_state must be >= 1"),
    (dict(bv=32.0), TypeError, "bv must be an int"),
    (dict(warps_o=True), TypeError, "warps_o must be an int"),
    (dict(grads_fused=1), TypeError, "grads_fused must be a bool"),
], ids=lambda x: str(x) if not isinstance(x, dict) else "-".join(f"{k}={v}" for k, v in x.items()))
def test_invalid_config_fields_raise(change, error, match):
    with pytest.raises(error, match=match):
        dataclasses.replace(select_config(1, 1, 64, 64, torch.bfloat16, num_sms=132), **change)


def test_config_round_trips_through_the_op_argument():
    cfg = dataclasses.replace(select_config(4, 16, 128, 64, torch.bfloat16, num_sms=132), grads_fused=False,
                              state_addr64=True, warps_wy=8)
    values = cfg.to_list()
    assert all(type(x) is int for x in values)
    assert ChunkKernelConfig.from_list(values) == cfg
    with pytest.raises(ValueError, match="expected"):
        ChunkKernelConfig.from_list(values[:-1])


def test_wrong_kernel_config_uses_raise_before_any_kernel(monkeypatch):
    inp = make_inputs(1, 10, 1, 16, 16, dtype=torch.float32, device=DEVICE)
    args = (inp["q"], inp["k"], inp["v"], inp["beta"])
    cfg = select_config(1, 1, 16, 16, torch.float32, num_sms=1)
    log = _spy_kernels(monkeypatch)
    with pytest.raises(TypeError, match="kernel_config must be a deltanet.ops.ChunkKernelConfig"):
        delta_rule(*args, backend="triton", kernel_config={"WARPS_WY": 4})
    with pytest.raises(TypeError, match="kernel_config must be a deltanet.ops.ChunkKernelConfig"):
        chunk_delta_rule(*args, kernel_config=cfg.to_list())
    for backend in ("torch", "reference", "recurrent"):
        with pytest.raises(ValueError, match="kernel_config .* needs backend='triton'"):
            delta_rule(*args, backend=backend, kernel_config=cfg)
    q = torch.randn(1, 4, 1, 256, device=DEVICE)
    big = dataclasses.replace(select_config(1, 1, 256, 256, torch.float32, num_sms=1), grads_fused=True)
    with pytest.raises(ValueError, match="grads_fused=True needs K <= 128"):
        chunk_delta_rule(q, q, q, torch.rand(1, 4, 1, device=DEVICE), kernel_config=big)
    assert log == []


@pytest.mark.parametrize("kwargs, error", [
    (dict(N=0, H=1, K=64, V=64, dtype=torch.bfloat16, num_sms=132), ValueError),
    (dict(N=1, H=1, K=64, V=64, dtype=torch.bfloat16, num_sms=0), ValueError),
    (dict(N=1, H=1, K=64, V=64, dtype=torch.int32, num_sms=132), TypeError),
    (dict(N=1, H=1, K=64, V=64, dtype="bf16", num_sms=132), TypeError),
])
def test_select_config_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error):
        select_config(**kwargs)


def test_auto_backend_on_cpu_accepts_a_config():
    """``backend="auto"`` runs PyTorch on CPU tensors; a config for the GPU path is not an error there."""
    inp = make_inputs(1, 10, 1, 16, 16, dtype=torch.float32)
    cfg = select_config(1, 1, 16, 16, torch.float32, num_sms=132)
    o, _ = delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"], kernel_config=cfg)
    ref, _ = delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"], backend="torch")
    assert torch.equal(o, ref)


def test_torch_compile_fullgraph_with_a_kernel_config():
    """The config crosses the custom op as ints: no graph break, same values and gradients."""
    torch._dynamo.reset()
    cfg = dataclasses.replace(_default_small(), bv_o=16, grads_fused=True)
    inp = make_inputs(2, 40, 2, 16, 32, dtype=torch.float32, seed=9, device=DEVICE)
    args = [inp[n].clone().requires_grad_() for n in ("q", "k", "v", "beta")]

    def f(q, k, v, beta):
        return (chunk_delta_rule(q, k, v, beta, kernel_config=cfg)[0] ** 2).sum()

    loss_c = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    grads_c = torch.autograd.grad(loss_c, args)
    grads_e = torch.autograd.grad(f(*args), args)
    assert_close("loss", loss_c, f(*args), rtol=1e-6)
    for gc, ge in zip(grads_c, grads_e):
        assert_close("grad", gc, ge, rtol=1e-6)
