"""Shared test helpers: input factories and the one ``assert_close`` of the tolerance rule
(docs/numerics.md)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections import Counter

import torch
import torch.nn.functional as F

__all__ = ["assert_close", "count_host_reads", "linear_attention_oracle", "make_inputs", "packed_cu_seqlens", "rel_err"]

# The Tensor methods that bring a tensor's values to the host (on CUDA: a synchronisation).
HOST_READS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__index__", "__float__", "__iter__")


@contextlib.contextmanager
def count_host_reads():
    """Count the host reads that deltanet's own code makes of integer and boolean tensors (index
    metadata such as ``cu_seqlens``, not activations) while the block runs: yields a ``Counter`` of
    ``(method, caller file, line)``. Reads inside torch or triton (FlexAttention's block-mask
    builder, the Triton interpreter) are theirs, not counted.

    Patches the methods of ``torch.Tensor`` itself (a ``TorchFunctionMode`` does not see the
    reads inside ``torch.library`` custom ops, where the kernel launchers run)."""
    reads = Counter()
    patched = {}
    package = os.path.abspath(importlib.util.find_spec("deltanet").submodule_search_locations[0]) + os.sep

    def wrap(name, method):
        def counted(self, *args, **kwargs):
            if not (self.is_floating_point() or self.is_complex()):
                frame = sys._getframe(1)
                if os.path.abspath(frame.f_code.co_filename).startswith(package):
                    where = os.path.relpath(frame.f_code.co_filename, os.path.dirname(package.rstrip(os.sep)))
                    reads[(name, where, frame.f_lineno)] += 1
            return method(self, *args, **kwargs)
        return counted

    for name in HOST_READS:
        patched[name] = (name in vars(torch.Tensor), getattr(torch.Tensor, name))
        setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    try:
        yield reads
    finally:
        for name, (own, method) in patched.items():
            if own:
                setattr(torch.Tensor, name, method)
            else:
                delattr(torch.Tensor, name)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (absolute error if ``expected`` is 0)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    denom = e.norm().item()
    err = (a - e).norm().item()
    return err / denom if denom > 0 else err


def assert_close(
    name: str,
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    baseline: torch.Tensor | None = None,
    ratio: float = 2.0,
    floor: float = 1e-5,
    rtol: float | None = None,
) -> float:
    """Compare ``actual`` with the float64 oracle ``expected`` (the rule: docs/numerics.md).

    - With ``baseline`` (the same computation done by PyTorch in the same low precision):
      ``rel_err(actual) <= ratio * rel_err(baseline) + floor`` (FlashAttention's scheme).
    - Without: ``rel_err(actual) <= rtol`` (default 1e-5 for float32, 1e-10 for float64).

    NaN or Inf anywhere fails. Returns the relative error.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{name}: {(~torch.isfinite(actual)).sum().item()} non-finite values")
    err = rel_err(actual, expected)
    if baseline is not None:
        limit = ratio * rel_err(baseline, expected) + floor
    else:
        limit = rtol if rtol is not None else (1e-10 if actual.dtype == torch.float64 else 1e-5)
    if not err <= limit:
        raise AssertionError(f"{name}: relative error {err:.3e} > allowed {limit:.3e}")
    return err


def make_inputs(
    B: int,
    T: int,
    H: int,
    K: int,
    V: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    beta_max: float = 1.0,
    initial_state: bool = False,
    N: int | None = None,
    requires_grad: bool = False,
) -> dict[str, torch.Tensor | None]:
    """Random delta-rule inputs: L2-normalised keys, ``beta ~ U(0, beta_max)``, an optional
    ``[N, H, K, V]`` float32/64 initial state (``N`` defaults to ``B``). Fresh per seed."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    k = F.normalize(torch.randn(B, T, H, K, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=g, dtype=torch.float64) * beta_max
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    h0 = torch.randn(N or B, H, K, V, generator=g, dtype=torch.float64) if initial_state else None
    out = {
        "q": q.to(device=device, dtype=dtype),
        "k": k.to(device=device, dtype=dtype),
        "v": v.to(device=device, dtype=dtype),
        "beta": beta.to(device=device, dtype=dtype),
        "initial_state": h0.to(device=device, dtype=state_dtype) if h0 is not None else None,
    }
    if requires_grad:
        for x in out.values():
            if x is not None:
                x.requires_grad_(True)
    return out


DEGENERATE_CASES = ("zero_keys", "beta0", "beta2", "T1", "huge_values")


def degenerate_inputs(case: str, *, T: int = 100, device: str | torch.device = "cpu") -> dict:
    """float32 inputs (B=1, H=2, K=V=16, an initial state) for the no-NaN tests: all-zero keys,
    beta = 0, beta = 2, a single token (``T1``), or values scaled by 1e4 (``huge_values``)."""
    if case not in DEGENERATE_CASES:
        raise ValueError(f"case must be one of {DEGENERATE_CASES}, got {case!r}")
    inp = make_inputs(1, 1 if case == "T1" else T, 2, 16, 16, initial_state=True, dtype=torch.float32,
                      seed=2, device=device)
    if case == "zero_keys":
        inp["k"] = torch.zeros_like(inp["k"])
    elif case in ("beta0", "beta2"):
        inp["beta"] = torch.full_like(inp["beta"], 0.0 if case == "beta0" else 2.0)
    elif case == "huge_values":
        inp["v"] = inp["v"] * 1e4
    return inp


def linear_attention_oracle(q, k, v, S0, lengths, scale):
    """Float64 oracle of additive linear attention (``[1, T, ...]``, documents packed along T, each
    from its ``S0[i]``), by its definition: ``o_t = scale (S0^T q_t + sum_{s <= t} (q_t . k_s) v_s)``
    with the sum over the document's tokens, final state ``S0 + sum_s k_s v_s^T``. The masked
    ``[T, T]`` form, not the recurrence token by token: the same numbers, without a graph of
    ``T`` state-sized steps (minutes at T = 1000 on a GPU machine's CPU). Returns
    ``(o [1, T, H, V], final states [N, H, K, V])``."""
    outs, finals, t = [], [], 0
    for i, n in enumerate(lengths):
        qd, kd, vd = q[0, t:t + n], k[0, t:t + n], v[0, t:t + n]  # [n, H, *]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        scores = torch.einsum("thk,shk->hts", qd, kd).masked_fill(~causal, 0.0)
        outs.append(scale * (torch.einsum("thk,hkv->thv", qd, S0[i]) + torch.einsum("hts,shv->thv", scores, vd)))
        finals.append(S0[i] + torch.einsum("shk,shv->hkv", kd, vd))
        t += n
    out = torch.cat(outs)[None] if outs else q.new_zeros(1, 0, *v.shape[2:])
    return out, torch.stack(finals)


def packed_cu_seqlens(lengths, device="cpu"):
    """``cu_seqlens`` of documents of ``lengths`` on ``device``: a raw tensor, or where a document
    is empty (which ``from_cu_seqlens`` rejects) a ``PackedSequences`` built past the validation."""
    from deltanet.ops.packing import PackedSequences

    offsets = (0, *torch.tensor(lengths).cumsum(0).tolist())
    if min(lengths) > 0:
        return torch.tensor(offsets, device=device)
    return PackedSequences._build(torch.tensor(offsets, dtype=torch.int32, device=device), offsets)
