"""Mamba-2's Triton SSD kernels for fla's Mamba2 yardstick, without building ``mamba_ssm``.

fla's ``Mamba2`` layer runs fast only with the ``mamba_ssm`` package: without it, it falls back
to a PyTorch form of the SSD scan that materialises ``(batch, chunks, chunk, chunk, heads, state)``
products (~100 GB for one 16 x 2048 micro-batch at ``bench lm``'s 125M shape) and cannot train
there. The kernels it wants (``mamba_chunk_scan_combined``, ``selective_state_update``) are plain
Triton in ``mamba_ssm/ops/triton``; only the package's ``__init__`` (which imports its CUDA
extensions) and the fused training entry point (whose convolution is the ``causal_conv1d`` CUDA
extension) need a build, which the GPU machine (no network, no matching wheels) cannot do.

:func:`enable` loads the Triton modules from an unpacked ``mamba_ssm`` source tree (its sdist
``mamba_ssm-*.tar.gz`` from PyPI, unpacked; the folder in ``DELTANET_MAMBA_SSM_SRC``)
without running the package's ``__init__``, and hands them to fla's layer. The fused training
call ``mamba_split_conv1d_scan_combined(zxbcdt, ...)`` is replaced by the same computation in
steps: depthwise causal convolution + SiLU (PyTorch), ``mamba_chunk_scan_combined`` (the SSD
kernels, D skip), the gated RMSNorm over each group (``rmsnorm_fn``, as the fused call does) and
the output projection. Values equal the fused call's up to rounding; it keeps more activations.

An installed, importable ``mamba_ssm`` is used as it is (only the fused call is replaced when the
``causal_conv1d`` extension it needs is missing).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["ENV", "PYTORCH_FALLBACK", "enable", "split_conv1d_scan"]

ENV = "DELTANET_MAMBA_SSM_SRC"

# what `enable` found, for the results file (one per process)
_STATE: dict = {}
# `enable`'s answer when no mamba_ssm kernels could be loaded: fla keeps its PyTorch SSD
PYTORCH_FALLBACK = "fla's PyTorch SSD (mamba_ssm not available)"


def _package_root(src: Path) -> Path:
    """The folder that holds ``mamba_ssm/ops/triton/ssd_combined.py`` (the sdist's top or its parent)."""
    for cand in (src, *sorted(p for p in src.glob("mamba_ssm-*") if p.is_dir())):
        if (cand / "mamba_ssm" / "ops" / "triton" / "ssd_combined.py").is_file():
            return cand
    raise FileNotFoundError(f"{ENV}={src}: no mamba_ssm/ops/triton/ssd_combined.py under it (expected an "
                            "unpacked mamba_ssm source tree, e.g. its sdist)")


def _namespace(name: str, path: Path) -> None:
    """Register ``name`` as a package at ``path`` without executing its ``__init__``."""
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    mod = importlib.util.module_from_spec(spec)
    mod.__path__ = [str(path)]
    sys.modules[name] = mod


def _load_ssd(src: str | os.PathLike | None):
    """``(ssd_combined, selective_state_update, layernorm_gated, origin)``: from an importable
    ``mamba_ssm``, else from the source tree ``src``; None if neither."""
    try:
        from mamba_ssm.ops.triton import layernorm_gated, selective_state_update, ssd_combined
        return ssd_combined, selective_state_update, layernorm_gated, "mamba_ssm (installed)"
    except Exception:  # not installed, or its __init__ failed on a missing CUDA extension
        for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
            del sys.modules[name]
    if not src:
        return None
    root = _package_root(Path(src))
    pkg = root / "mamba_ssm"
    _namespace("mamba_ssm", pkg)
    for sub in ("ops", "ops/triton", "utils"):
        _namespace("mamba_ssm." + sub.replace("/", "."), pkg / sub)
    ssd = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    ssu = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
    lng = importlib.import_module("mamba_ssm.ops.triton.layernorm_gated")
    version = root.name.split("-", 1)[1] if root.name.startswith("mamba_ssm-") else "source"
    return ssd, ssu, lng, f"mamba_ssm {version} Triton kernels from source (no CUDA extensions)"


def split_conv1d_scan(ssd, layernorm_gated):
    """``mamba_split_conv1d_scan_combined`` in steps (same arguments and result), on ``ssd``'s
    ``mamba_chunk_scan_combined`` and ``layernorm_gated``'s ``rmsnorm_fn``."""
    chunk_scan, rmsnorm_fn = ssd.mamba_chunk_scan_combined, layernorm_gated.rmsnorm_fn

    def fn(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None, seq_idx=None,
           dt_limit=(0.0, float("inf")), return_final_states=False, activation="silu", rmsnorm_weight=None,
           rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None, ngroups=1,
           norm_before_gate=True):
        if activation not in ("silu", "swish"):
            raise ValueError(f"activation must be silu or swish, got {activation!r}")
        nheads = D.shape[0]
        if D.dim() == 2:
            headdim = D.shape[1]
        elif headdim is None:
            raise ValueError("headdim is required when D is per head")
        dim = nheads * headdim
        dstate = (zxbcdt.shape[-1] - 2 * dim - nheads) // ngroups // 2
        if zxbcdt.shape[-1] != 2 * dim + 2 * ngroups * dstate + nheads:
            raise ValueError(f"zxbcdt: last dim {zxbcdt.shape[-1]} does not split into z, xBC, dt "
                             f"(dim {dim}, {ngroups} groups, {nheads} heads)")
        z, xbc, dt = torch.split(zxbcdt, [dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
        width = conv1d_weight.shape[-1]
        xbc = F.conv1d(F.pad(xbc.transpose(1, 2), (width - 1, 0)), conv1d_weight.unsqueeze(1), conv1d_bias,
                       groups=xbc.shape[-1]).transpose(1, 2)
        x, b, c = torch.split(F.silu(xbc), [dim, ngroups * dstate, ngroups * dstate], dim=-1)
        out = chunk_scan(x.unflatten(-1, (nheads, headdim)), dt, A, b.unflatten(-1, (ngroups, dstate)),
                         c.unflatten(-1, (ngroups, dstate)), chunk_size, D=D,
                         z=None if rmsnorm_weight is not None else z.unflatten(-1, (nheads, headdim)),
                         dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx, dt_softplus=True,
                         dt_limit=dt_limit, return_final_states=return_final_states)
        out, final = (out if return_final_states else (out, None))
        out = out.flatten(-2)
        if rmsnorm_weight is not None:
            out = rmsnorm_fn(out, rmsnorm_weight, None, z=z, eps=rmsnorm_eps, group_size=dim // ngroups,
                             norm_before_gate=norm_before_gate)
        if outproj_weight is not None:
            out = F.linear(out, outproj_weight, outproj_bias)
        return (out, final) if return_final_states else out

    return fn


def enable(src: str | os.PathLike | None = None) -> str:
    """Give fla's Mamba2 layer mamba_ssm's Triton SSD kernels (``src`` or ``$DELTANET_MAMBA_SSM_SRC``:
    an unpacked mamba_ssm source tree, used when the package is not importable). Returns what the
    layer will run, for the results; idempotent."""
    if _STATE:
        return _STATE["ssd"]
    try:
        import fla.layers.mamba2 as layer
    except ModuleNotFoundError:  # an fla without the layer (or a stand-in): nothing to give kernels to
        _STATE["ssd"] = "fla's own (no fla.layers.mamba2 to give kernels to)"
        return _STATE["ssd"]
    loaded = _load_ssd(src if src is not None else os.environ.get(ENV))
    if loaded is None:
        _STATE["ssd"] = PYTORCH_FALLBACK
        return _STATE["ssd"]
    ssd, ssu, lng, origin = loaded
    layer.mamba_chunk_scan_combined = ssd.mamba_chunk_scan_combined
    layer.selective_state_update = ssu.selective_state_update
    layer.is_fast_path_available = True
    if getattr(ssd, "causal_conv1d_fwd_function", None) is None:  # the fused call needs causal_conv1d's CUDA op
        layer.mamba_split_conv1d_scan_combined = split_conv1d_scan(ssd, lng)
        origin += "; training: conv + SiLU (PyTorch), mamba_chunk_scan_combined, gated RMSNorm, out_proj in steps"
    else:
        layer.mamba_split_conv1d_scan_combined = ssd.mamba_split_conv1d_scan_combined
    _STATE["ssd"] = origin
    return origin
