"""Programmatic dependent launch (PDL) for the decode step's Triton kernels: experimental, off.

A captured decode step of the 340M model is ~130 kernels of a few microseconds each, launched back
to back; the time is inside them (their ramp-up and first memory round trips), not in gaps between
them. With PDL (Hopper and later: the launch attribute ``launch_pdl``, and ``griddepcontrol`` in the
kernels) a kernel's programs become resident while its predecessor still runs: each program first
lets its successor launch (``gdc_launch_dependents``), asks L2 for what no kernel writes (the GEMVs'
weights: :func:`prefetch_rows`), then waits for its predecessor to finish (``gdc_wait``: the predecessor's writes are
visible after it) before it reads anything a kernel wrote. Everything else about the step is
unchanged, and the results are bit for bit the same.

``PDL_DECODE`` switches it on for the decode kernels (``decode_linear``, the fused delta-rule step,
the fused attention step). Off until a GPU run has timed it against the default (``bash
benchmarks/gpu_verify.sh OUT 560 decode_ab``). The Triton interpreter cannot run ``griddepcontrol``
(inline PTX), so the kernels never take it there.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .delta_rule.interpreter import interpreted

__all__ = ["PDL_DECODE", "launch_options", "pdl_for", "pdl_wait", "prefetch_rows"]

PDL_DECODE = False


@functools.lru_cache(maxsize=None)
def _major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def pdl_for(x: torch.Tensor) -> bool:
    """Whether a decode kernel launched for ``x`` uses PDL: ``PDL_DECODE`` on, a CUDA tensor of a
    device of compute capability 9 or later, compiled kernels (not the interpreter)."""
    if not (PDL_DECODE and x.is_cuda) or interpreted():
        return False
    return _major(x.device.index if x.device.index is not None else torch.cuda.current_device()) >= 9


def launch_options(pdl: bool) -> dict:
    """The Triton launch keywords of a kernel launched with PDL (``launch_pdl``), or none."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """With ``PDL``: let the next kernel launch, then wait until this one's predecessor has
    finished and its writes are visible. Without: nothing."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def prefetch_rows(w, o_n, m_n, k0, C: tl.constexpr, K_SPLIT: tl.constexpr, LINE: tl.constexpr):
    """Ask L2 for rows ``o_n`` (mask ``m_n``), columns ``k0 .. k0 + K_SPLIT`` of the contiguous
    ``[N, C]`` matrix ``w``: one ``prefetch.global.L2`` per ``LINE`` elements (a 128-byte line),
    nothing held in registers. Masked-off addresses are replaced by ``w`` itself (always valid)."""
    NL: tl.constexpr = (K_SPLIT + LINE - 1) // LINE
    o_l = k0 + tl.arange(0, triton.next_power_of_2(NL)) * LINE
    ok = m_n[:, None] & (o_l < k0 + K_SPLIT)[None, :] & (o_l < C)[None, :]
    ptrs = tl.where(ok, w + o_n[:, None] * C + o_l[None, :], w)
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
