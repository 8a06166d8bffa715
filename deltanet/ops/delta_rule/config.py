"""Launch settings of the Triton chunk op: one typed value, chosen once per shape.

:class:`ChunkKernelConfig` holds every setting the chunk launchers hand to the kernels (block
sizes, warps, pipeline stages, and the two code-path choices that depend on the shape).
:func:`select_config` picks it from the shape: a pure function (cached) whose defaults are the
settings measured fastest on the H100 / H200 (benchmarks/NOTES-kernels.md, one setting at a time
on an otherwise idle GPU). A call can override them::

    import dataclasses, torch
    from deltanet.ops import delta_rule, device_sms, select_config

    cfg = select_config(N=32, H=16, K=128, V=128, dtype=torch.bfloat16, num_sms=device_sms(q.device))
    o, _ = delta_rule(q, k, v, beta, kernel_config=dataclasses.replace(cfg, warps_wy=8))

A config is not tied to a shape, but the defaults are: ``select_config`` for the shape you run,
then ``dataclasses.replace``, is the way to change one setting. Settings that cannot work at a
shape (``grads_fused`` above K = 128) raise ``ValueError`` at the call; settings that exceed a
GPU's shared memory fail at launch with Triton's ``OutOfResources``
(benchmarks/kernel_resources.py checks them offline).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

__all__ = ["ChunkKernelConfig", "device_sms", "select_config"]

_BLOCKS = (16, 32, 64, 128, 256)  # tl.dot needs >= 16; the kernels hold at most all of K or V (<= 256)
_WARPS = (1, 2, 4, 8, 16, 32)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class ChunkKernelConfig:
    """Launch settings of the chunk kernels (``chunk.py`` runs them; ``kernels/`` holds them).

    Block sizes are powers of two from 16 to 256; warps powers of two up to 32; stages >= 1.
    Every field says what it trades. Build one with :func:`select_config` and change fields with
    ``dataclasses.replace``.
    """

    # --- per-chunk tile kernels: UT transform (wy_fwd), W again in the backward (w_fwd), output, wy_bwd
    bk: int
    """K-block of wy_fwd / w_fwd / o_fwd / wy_bwd: larger = fewer passes over K per chunk, more
    registers per program (spills at 4 warps above 64)."""
    bv: int
    """V-block of wy_fwd (U = T V), dqkw_bwd and wy_bwd: same trade as ``bk`` on the V side."""
    warps_wy: int
    """Warps of the UT transform (wy_fwd) and of w_fwd: 8 removes wy_fwd's register spills but halves
    the resident programs per SM; measured 1.29x slower fwd+bwd than 4 (H200, 2026-11-30)."""
    warps_wyb: int
    """Warps of wy_bwd (the two-kernel backward): 8 measured 1.11x slower than 4 (H200, 2026-11-30)."""

    # --- the state recurrence (h_fwd, dh_bwd): sequential over chunks, one program per (sequence, head, V-block)
    bv_state: int
    """V-block of the state kernels: narrower = more programs to fill the GPU, but K is read again for
    every V-block; the [K, bv_state] state tile stays in registers."""
    warps_state: int
    """Warps of the state kernels: 8 measured 1-8% slower fwd+bwd than 4 at K <= 128 (H200, 2026-11-29);
    8 at K = 256, whose [K, V-block] state tile would spill at 4."""
    stages_state: int
    """Software-pipeline stages of the state kernels' chunk loop: 3 loads two chunks ahead (9% faster
    than 2) at the cost of shared memory (K = 256 or fp32 inputs at K = 128 exceed sm_90's 227 KB at 3)."""
    state_addr64: bool
    """Token offsets of the state kernels: True = int64 per element (best at K <= 64), False = a scalar
    int64 base plus int32 tile offsets (2% faster above K = 64, more registers live across the loop at 64)."""

    # --- output (o_fwd)
    bv_o: int
    """V-block of o_fwd: all of V forms Q K^T once per chunk instead of once per V-block, but with fewer
    programs (with 8 warps: 1-2% faster at D = 128, 6% slower forward at D = 64, H200 2026-11-30)."""
    warps_o: int
    """Warps of o_fwd."""
    stages_o: int
    """Pipeline stages of o_fwd's K loop."""

    # --- per-chunk gradients: one fused kernel, or dqkw_bwd + wy_bwd
    grads_fused: bool
    """True: dq, dk, dv, dbeta by one kernel per chunk (chunk_grads; holds all of K, so K <= 128 only):
    17% faster at K = 64, 2-5% slower at K = 128 (one program per SM). False: dqkw_bwd then wy_bwd,
    with dW and a partial dK through memory."""
    bv_grads: int
    """V-block of the fused gradient kernel: 32 measured 4-6% faster fwd+bwd than 64 at K = 64 (H200,
    2026-11-30); wider blocks need more registers and shared memory (fp32 inputs most)."""
    warps_grads: int
    """Warps of the fused gradient kernel."""
    stages_grads: int
    """Pipeline stages of the fused gradient kernel's V loop."""
    bk_dqkw: int
    """K-block of dqkw_bwd (its grid runs over K-blocks): smaller = more programs, each recomputing the
    V-side products."""
    warps_dqkw: int
    """Warps of dqkw_bwd: 8 removes its spills but measured 3% slower than 4 (H200, 2026-11-30)."""
    stages_dqkw: int
    """Pipeline stages of dqkw_bwd's V loop."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in (bool, "bool"):
                if not isinstance(value, bool):
                    raise TypeError(f"ChunkKernelConfig.{f.name} must be a bool, got {value!r}")
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"ChunkKernelConfig.{f.name} must be an int, got {value!r}")
            if f.name.startswith(("bk", "bv")) and value not in _BLOCKS:
                raise ValueError(f"ChunkKernelConfig.{f.name} must be a power of two in {_BLOCKS}, got {value}")
            if f.name.startswith("warps") and value not in _WARPS:
                raise ValueError(f"ChunkKernelConfig.{f.name} must be a power of two in {_WARPS}, got {value}")
            if f.name.startswith("stages") and value < 1:
                raise ValueError(f"ChunkKernelConfig.{f.name} must be >= 1, got {value}")

    def check_shape(self, K: int) -> None:
        """Raise ``ValueError`` if these settings cannot run at head dim ``K``."""
        if self.grads_fused and K > 128:
            raise ValueError(f"kernel_config.grads_fused=True needs K <= 128 (the fused gradient kernel holds three "
                             f"[64, K] fp32 accumulators in registers), got K={K}; set grads_fused=False")

    # The custom op's schema takes ints, not Python objects: the config crosses it as a list.
    def to_list(self) -> list[int]:
        """The fields in declaration order, as ints (the ``torch.library`` op's argument)."""
        return [int(getattr(self, f.name)) for f in dataclasses.fields(self)]

    @classmethod
    def from_list(cls, values: list[int]) -> ChunkKernelConfig:
        """Inverse of :meth:`to_list`."""
        fields = dataclasses.fields(cls)
        if len(values) != len(fields):
            raise ValueError(f"expected {len(fields)} values, got {len(values)}")
        return cls(**{f.name: (bool(x) if f.type in (bool, "bool") else int(x)) for f, x in zip(fields, values)})


@functools.lru_cache(maxsize=64)
def device_sms(device: torch.device | str) -> int:
    """Streaming multiprocessors of a CUDA device (``select_config``'s ``num_sms``); 1 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


@functools.lru_cache(maxsize=512)
def select_config(N: int, H: int, K: int, V: int, dtype: torch.dtype, *, num_sms: int, gated: bool = False,
                  interpreter: bool = False) -> ChunkKernelConfig:
    """The default launch settings for ``N`` sequences x ``H`` heads with head dims ``K``, ``V`` and
    inputs in ``dtype`` on a GPU with ``num_sms`` SMs (H100 SXM / H200: 132).

    ``gated``: the gated rule (its state backward needs more shared memory in fp32 at K = 256).
    ``interpreter``: the Triton interpreter (``TRITON_INTERPRET=1``, CPU), which runs programs one
    after another: fewer, wider ones are faster there. DeltaProduct is the rule over its
    interleaved steps: pass the same N, H, K, V. Pure and cached: one selection per shape.
    """
    for name, x in (("N", N), ("H", H), ("K", K), ("V", V), ("num_sms", num_sms)):
        if not isinstance(x, int) or isinstance(x, bool) or x < 1:
            raise ValueError(f"select_config: {name} must be a positive int, got {x!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"select_config: dtype must be a floating torch.dtype, got {dtype!r}")
    narrow = dtype.itemsize <= 2  # bf16 / fp16 tiles need half the shared memory of fp32 ones
    bkf = max(16, _pow2_ceil(K))  # the state and fused-gradient kernels hold all of K
    bvf = max(16, _pow2_ceil(V))
    # The state recurrence is sequential over chunks: split V finely enough that the (sequence,
    # head, V-block) programs fill the GPU, but keep the state tile in registers. "Fill" = programs
    # >= 0.95 x SMs: at 128 programs on 132 SMs (D = 128, T = 8K) halving the V-block to reach 1.0
    # measured 7-12% slower fwd+bwd (results/2026-11-30-h200-kernels-tuned-vs-fla.md); two programs per
    # SM measured up to 16% slower at D = 128, T = 4K-8K. fp32 inputs at K = 256: dh_bwd's
    # [256, 32] tiles need 237,568 B of shared memory (sm_90 allows 232,448), 16-wide ones 217,088 B.
    bv_state = bvf if interpreter else min(bvf, 64 if bkf <= 128 else (32 if narrow else 16))
    while bv_state > 16 and N * H * -(-V // bv_state) < 0.95 * num_sms:
        bv_state //= 2
    # Defaults = the settings measured fastest on the H200 (one-setting-at-a-time sweeps on an
    # otherwise idle GPU, results/2026-11-30-h200-x2-kernels.md and 2026-11-30-h200-kernels-tuned-vs-fla.md):
    # 4 warps everywhere but the K = 256 state kernels and the fused gradients at K = 128; 3 pipeline
    # stages in the state kernels (9% faster than 2), except at K = 256 or with fp32 inputs, where 3
    # need 262-313 KB of shared memory.
    stages_state = 3 if bkf <= 128 and narrow else 2
    if gated and bkf > 128 and not narrow:
        # the gated dh_bwd with fp32 inputs at K = 256 needs 283,648 B of shared memory at 2 stages
        # (sm_90: 232,448), 135,168 B at 1 (benchmarks/kernel_resources.py --gated)
        stages_state = 1
    return ChunkKernelConfig(
        bk=min(bkf, 64), bv=min(bvf, 64), warps_wy=4, warps_wyb=4,
        bv_state=bv_state, warps_state=4 if bkf <= 128 else 8, stages_state=stages_state,
        state_addr64=bkf <= 64,
        bv_o=min(bvf, 64), warps_o=4, stages_o=2,
        # fused only at K <= 64 with 16-bit inputs: at K = 128 it is slower, and its fp32 tiles need
        # up to 311 KB of shared memory there
        grads_fused=bkf <= 64 and narrow, bv_grads=min(bvf, 32), warps_grads=8 if bkf >= 128 else 4, stages_grads=3,
        bk_dqkw=min(bkf, 64), warps_dqkw=4, stages_dqkw=2,
    )
