"""Compile the decode-step kernels for sm_90 (H100 / H200) with the running Python's Triton, no GPU
needed: registers and spill stack per thread and shared memory of each launch of the 340M models'
shapes (the fused attention step and its combine; the GEMVs with and without split-K, and their
epilogue). For checking a Triton version's code generation before any GPU run:

    TRITON_INTERPRET= python benchmarks/compile_decode_kernels.py [--pdl]

``--pdl``: with programmatic dependent launch on (``deltanet.ops.pdl``; the GEMVs then read their
first weight tiles before waiting for the previous kernel).

The launches are the modules' own: their launchers (``_launch`` of ``deltanet.ops.decode_linear`` and
``deltanet.ops.decode_attention``) run on meta tensors with the kernels recorded instead of run
(``kernel_resources.recording``), so the signatures, constexprs, launch options and pointer
alignment are what a real call passes. Prints one line per launch and ALL_OK when nothing spills
(the attention kernel's 32 B of stack are libdevice's sin / cos argument reduction, not spills).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.kernel_resources import recording, resource_usage, source  # noqa: E402
from deltanet.ops import decode_attention as da  # noqa: E402
from deltanet.ops import decode_linear as dl  # noqa: E402

SMS = dl.H100_SMS  # an H100 / H200
META = dict(device="meta")
# how each kernel is named on its line (the first word): the test counts these
LABELS = {"decode_attention": "attn", "decode_attention_combine": "combine", "decode_linear": "gemv",
          "decode_linear_epilogue": "epilogue"}


def compile_all(module, call) -> bool:
    """Record the launches of ``call()`` (a launcher of ``module``), compile each, print a line each."""
    log = []
    with recording(module, log) as fns:
        label = call()
    ok = True
    for launch in log:
        name = launch.name
        regs, stack, smem = resource_usage(*source(launch.key(), fns[name]))
        print(LABELS[name], label, "regs/stack/smem", (regs, stack, smem))
        # 32 B of stack in the attention step: libdevice's precise sin / cos (RoPE) keep their
        # large-argument reduction in a local array, whatever the register pressure; more would be spills
        ok &= stack <= (32 if name == "decode_attention" else 0)
    return ok


def attention(dtype: torch.dtype, splits: int, G: int) -> str:
    B, Hkv, D, L = 1, 8, 128, 2048
    H = G * Hkv
    q, k, v = (torch.empty(B, 1, h, D, dtype=dtype, **META) for h in (H, Hkv, Hkv))
    kc, vc = (torch.empty(B, Hkv, L, D, dtype=dtype, **META) for _ in range(2))
    valid = torch.empty(B, L, dtype=torch.bool, **META)
    pos, nxt = torch.empty(B, dtype=torch.long, **META), torch.empty((), dtype=torch.long, **META)
    inv_freq = torch.empty(D // 2, dtype=torch.float32, **META)
    cfg = dataclasses.replace(da.select_config(B, Hkv, L, SMS, D), splits=splits)
    da._launch(q, k, v, kc, vc, valid, pos, nxt, None, inv_freq, D ** -0.5, True, cfg.block_l, cfg.splits,
               cfg.num_warps)
    return f"{str(dtype).replace('torch.', '')} NS {splits} G {G}"


def gemv(name: str, Ns: list[int], C: int, swiglu: bool, norm: bool, res: bool, M: int, split: int,
         config: dl.GemvConfig | None = None) -> str:
    x = torch.empty(M, C, dtype=torch.bfloat16, **META)
    ws = [torch.empty(n, C, dtype=torch.bfloat16, **META) for n in Ns]
    nw = torch.empty(C, dtype=torch.bfloat16, **META) if norm else None
    r = torch.empty(M, Ns[0], dtype=torch.bfloat16, **META) if res else None
    if config is None:
        config = dataclasses.replace(dl.select_config(M, Ns[0] if swiglu else sum(Ns), x.dtype, K=C, num_sms=SMS),
                                     SPLIT_K=split)
    dl._launch(x, ws, nw, r, 1e-6, swiglu, config.BN, config.BK, config.num_warps, config.num_stages,
               config.SPLIT_K, config.dot)
    return f"{name} M {M} split {config.SPLIT_K}"


def main() -> int:
    print("triton", triton.__version__)
    if "--pdl" in sys.argv[1:]:
        for module in (dl, da):
            if hasattr(module, "pdl_for"):
                module.pdl_for = lambda x: True
        print("programmatic dependent launch: on")
    ok = True
    for dtype in (torch.bfloat16, torch.float32):
        for splits in (1, 4):
            for G in (1, 4):
                ok &= compile_all(da, lambda: attention(dtype, splits, G))
    for M in (1, 32):
        for split in (1, 4):
            ok &= compile_all(dl, lambda: gemv("o_proj", [1024], 1024, False, False, True, M, split))
            ok &= compile_all(dl, lambda: gemv("down", [1024], 2816, False, False, True, M, split))
        for split in (1, 2):
            ok &= compile_all(dl, lambda: gemv("gate_up", [2816, 2816], 1024, True, True, False, M, split))
        ok &= compile_all(dl, lambda: gemv("in_proj", [1024, 1024, 1024, 8], 1024, False, True, False, M, 1))
    ok &= compile_all(dl, lambda: gemv("o_proj_nodot", [1024], 1024, False, False, True, 1, 4,
                                       dl.GemvConfig(BN=8, BK=256, SPLIT_K=4, dot=False)))
    print("ALL_OK" if ok else "SOME_FAILED")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
