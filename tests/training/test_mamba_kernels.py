"""fla's Mamba2 yardstick on mamba_ssm's Triton SSD kernels (deltanet/bench/mamba_kernels.py).

The equality test needs fla and an unpacked mamba_ssm source tree (``DELTANET_MAMBA_SSM_SRC``),
neither of which CI installs: it runs where both are present (the GPU machine's setup, or a
developer's ``pip install --target`` of fla's wheels plus the sdist), under the Triton
interpreter on CPU.
"""

from __future__ import annotations

import contextlib
import os
import types

import pytest
import torch

from deltanet.bench import mamba_kernels


def test_source_tree_is_found_or_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"DELTANET_MAMBA_SSM_SRC=.*no mamba_ssm/ops/triton/ssd_combined.py"):
        mamba_kernels._package_root(tmp_path)
    nested = tmp_path / "mamba_ssm-9.9" / "mamba_ssm" / "ops" / "triton"
    nested.mkdir(parents=True)
    (nested / "ssd_combined.py").write_text("")
    assert mamba_kernels._package_root(tmp_path) == tmp_path / "mamba_ssm-9.9"  # the sdist's top folder
    assert mamba_kernels._package_root(tmp_path / "mamba_ssm-9.9") == tmp_path / "mamba_ssm-9.9"


def _cpu_shims(monkeypatch):
    """What mamba_ssm's launchers ask of CUDA, answered for CPU tensors (interpreter only)."""
    import triton.runtime.autotuner as autotuner

    monkeypatch.setattr(torch.cuda, "device", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda *a, **k: types.SimpleNamespace(multi_processor_count=4))
    # the interpreter has no timer: every config "takes" the same time, the first is kept
    monkeypatch.setattr(autotuner.Autotuner, "_bench", lambda self, *a, config=None, **k: [1.0, 1.0, 1.0])


@pytest.mark.skipif(not os.environ.get(mamba_kernels.ENV), reason=f"needs {mamba_kernels.ENV} (mamba_ssm source)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter check (the GPU run trains through it)")
def test_stepwise_training_call_equals_fla_pytorch_mamba2(monkeypatch):
    pytest.importorskip("fla")
    if os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it without CUDA unless the user set it to 0
        pytest.skip("needs the Triton interpreter: mamba_ssm's kernels run on CPU tensors only through it")
    _cpu_shims(monkeypatch)
    what = mamba_kernels.enable()
    assert "Triton kernels" in what and "in steps" in what
    import fla.layers.mamba2 as L

    torch.manual_seed(0)
    layer = L.Mamba2(num_heads=4, head_dim=16, hidden_size=32, state_size=16, expand=2, n_groups=1,
                     chunk_size=16, layer_idx=0).train()
    with torch.no_grad():  # away from the initialisation's special values
        layer.D.uniform_(0.5, 1.5)
        layer.dt_bias.normal_()
        layer.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 40, 32, requires_grad=True)  # 40: a partial last chunk
    params = dict(layer.named_parameters())

    def grads(out):
        w = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
        return torch.autograd.grad((out * w).sum(), [x, *params.values()])

    ref = layer.torch_forward(x)[0]  # fla's PyTorch SSD
    g_ref = grads(ref)
    out = L.mamba_split_conv1d_scan_combined(
        layer.in_proj(x), layer.conv1d.weight.squeeze(1), layer.conv1d.bias, layer.dt_bias,
        -torch.exp(layer.A_log.float()), D=layer._get_D(), chunk_size=layer.chunk_size, activation=layer.activation,
        rmsnorm_weight=layer.norm.weight, rmsnorm_eps=layer.norm.eps, outproj_weight=layer.out_proj.weight,
        outproj_bias=layer.out_proj.bias, headdim=None if layer.D_has_hdim else layer.head_dim,
        ngroups=layer.n_groups, norm_before_gate=layer.norm_before_gate)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(["x", *params], grads(out), g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")
