"""Registers, spill stack and shared memory of the chunk kernels, compiled for sm_90 (H100/H200)
on any machine (no GPU needed: Triton's bundled ptxas and cuobjdump). A spill stack of
kilobytes per thread is the first thing to look at when a kernel is slower than its FLOPs.

    python benchmarks/kernel_resources.py --dim 128
    python benchmarks/kernel_resources.py --defaults --dims 64,128,256   # as chunk._configs launches them
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

W = importlib.import_module("deltanet.ops.delta_rule.kernels.wy")
S = importlib.import_module("deltanet.ops.delta_rule.kernels.state")
O = importlib.import_module("deltanet.ops.delta_rule.kernels.output")
WB = importlib.import_module("deltanet.ops.delta_rule.kernels.wy_bwd")
G = importlib.import_module("deltanet.ops.delta_rule.kernels.grads")
BF, F32, I32 = "*bf16", "*fp32", "*i32"
C = "constexpr"


def resources(fn, sig, consts, warps=4, stages=2) -> str:
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"regs {m.group(1)}, spill/stack {m.group(2)} B/thread, smem {k.metadata.shared} B"


def _sigs():
    wy = dict(k=BF, v=BF, beta=BF, w=BF, u=BF, ai=F32, cu_seqlens=I32, chunk_table=I32, H=C, K=C, V=C, BT=C,
              BK=C, BV=C, PREC=C)
    return dict(
        wy_fwd=(W.wy_fwd_kernel, dict(wy, BATCHED_INV=C)),
        wy_fwd_dense=(W.wy_fwd_dense_kernel, wy),
        wu_fwd=(W.wu_fwd_kernel, wy),
        h_fwd=(S.h_fwd_kernel, dict(k=BF, w=BF, u=BF, v_new=BF, h=BF, h0=F32, ht=F32, cu_seqlens=I32,
                                    chunk_offsets=I32, H=C, K=C, V=C, BT=C, BK=C, BV=C, USE_H0=C, STORE_HT=C,
                                    PREC=C, ADDR64=C, KNOWN_VNEW=C)),
        o_fwd=(O.o_fwd_kernel, dict(q=BF, k=BF, v_new=BF, h=BF, o=BF, cu_seqlens=I32, chunk_table=I32,
                                    scale="fp32", H=C, K=C, V=C, BT=C, BK=C, BV=C, PREC=C)),
        dh_bwd=(S.dh_bwd_kernel, dict(q=BF, k=BF, w=BF, do=BF, dv_local=BF, dv=BF, dh=BF, dht=F32, dh0=F32,
                                      cu_seqlens=I32, chunk_offsets=I32, scale="fp32", H=C, K=C, V=C, BT=C,
                                      BK=C, BV=C, USE_DHT=C, STORE_DH0=C, USE_DV_LOCAL=C, PREC=C, ADDR64=C)),
        dqkw_bwd=(O.dqkw_bwd_kernel, dict(q=BF, k=BF, v_new=BF, h=BF, dh=BF, do=BF, dv=BF, dq=BF, dk=F32, dw=BF,
                                          cu_seqlens=I32, chunk_table=I32, scale="fp32", H=C, K=C, V=C, BT=C,
                                          BK=C, BV=C, PREC=C)),
        wy_bwd=(W.wy_bwd_kernel, dict(k=BF, v=BF, beta=BF, ai=F32, dw=BF, du=BF, dk_in=F32, dk=BF, dv=BF,
                                      dbeta=BF, cu_seqlens=I32, chunk_table=I32, H=C, K=C, V=C, BT=C, BK=C,
                                      BV=C, PREC=C)),
        wy_bwd_da=(WB.wy_bwd_da_kernel, dict(k=BF, v=BF, beta=BF, ai=F32, dw=BF, du=BF, dv=BF, da=F32, db=F32,
                                             cu_seqlens=I32, chunk_table=I32, H=C, K=C, V=C, BT=C, BK=C, BV=C,
                                             PREC=C)),
        chunk_grads=(G.chunk_grads_kernel, dict(q=BF, k=BF, v=BF, beta=BF, ai=F32, v_new=BF, h=BF, dh=BF, do=BF,
                                                du=BF, dq=BF, dk=BF, dv=BF, dbeta=BF, cu_seqlens=I32,
                                                chunk_table=I32, scale="fp32", H=C, K=C, V=C, BT=C, BK=C, BV=C,
                                                PREC=C, TWO_PASS=C)),
        wy_bwd_dk=(WB.wy_bwd_dk_kernel, dict(k=BF, beta=BF, ai=F32, dw=BF, da=F32, db=F32, dk_in=F32, dk=BF,
                                             dbeta=F32, db_stride="i64", cu_seqlens=I32, chunk_table=I32, H=C,
                                             K=C, BT=C, BK=C, PREC=C)),
    )


def report_defaults(dims, lengths, tuning, sms=132) -> None:
    """Each kernel as ``chunk._configs`` launches it at 32K tokens x 16 heads (H200: 132 SMs)."""
    import torch

    chunk = importlib.import_module("deltanet.ops.delta_rule.chunk")
    chunk._num_sms = lambda device: sms
    sig = _sigs()
    seen = {}
    for D in dims:
        for T in lengths:
            chunk.TUNING.clear()
            chunk.TUNING.update(tuning)
            cfg = chunk._configs(32768 // T, 16, D, D, torch.device("cpu"))
            chunk.TUNING.clear()
            base = dict(H=16, K=D, V=D, BT=64, PREC="tf32")
            wy = dict(base, BK=cfg["BK"], BV=cfg["BV"])
            st = dict(base, BK=cfg["BKF"], BV=cfg["BV_STATE"], ADDR64=bool(cfg["STATE_ADDR64"]))
            launches = [
                ("wy_fwd_dense", wy, cfg["WARPS_WY"], 2) if cfg["WY_DENSE"] else
                ("wy_fwd", dict(wy, BATCHED_INV=bool(cfg["WY_BATCHED"])), cfg["WARPS_WY"], 2),
                ("h_fwd", dict(st, USE_H0=False, STORE_HT=False, KNOWN_VNEW=False), cfg["WARPS_STATE"], cfg["STAGES_STATE"]),
                ("o_fwd", dict(base, BK=cfg["BK"], BV=cfg["BV_O"]), cfg["WARPS_O"], cfg["STAGES_O"]),
                ("dh_bwd", dict(st, USE_DHT=False, STORE_DH0=False, USE_DV_LOCAL=bool(cfg["DV_LOCAL"])),
                 cfg["WARPS_STATE"], cfg["STAGES_STATE"]),
            ]
            if cfg.get("SAVE_AI"):
                launches.append(("wu_fwd", wy, cfg["WARPS_WY"], 2))
            if cfg.get("SAVE_VNEW"):
                launches.append(("h_fwd", dict(st, USE_H0=False, STORE_HT=False, KNOWN_VNEW=True), cfg["WARPS_STATE"],
                                 cfg["STAGES_STATE"]))
            if cfg.get("GRADS_FUSED"):
                launches.append(("chunk_grads", dict(base, BK=cfg["BKF"], BV=cfg["BV_GRADS"],
                                                 TWO_PASS=bool(cfg["GRADS_TWO_PASS"])), cfg["WARPS_GRADS"], 2))
            else:
                launches.append(("dqkw_bwd", dict(base, BK=cfg["BK_DQKW"], BV=cfg["BV"]), cfg["WARPS_DQKW"],
                                 cfg["STAGES_DQKW"]))
                if cfg.get("WY_BWD_SPLIT"):
                    launches.append(("wy_bwd_da", wy, cfg["WARPS_WYB"], 2))
                    launches.append(("wy_bwd_dk", dict(H=16, K=D, BT=64, BK=cfg["BK_WYB"], PREC="tf32"),
                                     cfg["WARPS_WYB"], 2))
                else:
                    launches.append(("wy_bwd", wy, cfg["WARPS_WYB"], 2))
            for name, consts, warps, stages in launches:
                key = (name, tuple(sorted(consts.items())), warps, stages)
                if key not in seen:
                    fn, sg = sig[name]
                    seen[key] = resources(fn, sg, consts, warps, stages)
                extra = f" BV {consts['BV']} addr64 {consts['ADDR64']:d}" if name in ("h_fwd", "dh_bwd") else ""
                extra += " (from v_new)" if consts.get("KNOWN_VNEW") else ""
                print(f"D={D} T={T} {name}{extra} warps {warps}: {seen[key]}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--warps", default="4,8", help="comma-separated num_warps to compile for")
    p.add_argument("--defaults", action="store_true", help="every kernel at chunk._configs' launch settings")
    p.add_argument("--dims", default="64,128,256", help="with --defaults")
    p.add_argument("--lengths", default="1024,16384", help="with --defaults (the state V-block depends on T)")
    p.add_argument("--tuning", default="{}", help="with --defaults: JSON overrides, as DELTANET_CHUNK_TUNING")
    args = p.parse_args()
    if args.defaults:
        import json
        report_defaults([int(x) for x in args.dims.split(",")], [int(x) for x in args.lengths.split(",")],
                        json.loads(args.tuning))
        return
    D = args.dim
    dims = dict(H=16, K=D, V=D, BT=64)
    wy_sig = dict(k=BF, v=BF, beta=BF, w=BF, u=BF, ai=F32, cu_seqlens=I32, chunk_table=I32, H=C, K=C, V=C, BT=C,
                  BK=C, BV=C, PREC=C, BATCHED_INV=C)
    wyb_sig = dict(k=BF, v=BF, beta=BF, ai=F32, dw=BF, du=BF, dk_in=F32, dk=BF, dv=BF, dbeta=BF, cu_seqlens=I32,
                   chunk_table=I32, H=C, K=C, V=C, BT=C, BK=C, BV=C, PREC=C)
    dq_sig = dict(q=BF, k=BF, v_new=BF, h=BF, dh=BF, do=BF, dv=BF, dq=BF, dk=F32, dw=BF, cu_seqlens=I32,
                  chunk_table=I32, scale="fp32", H=C, K=C, V=C, BT=C, BK=C, BV=C, PREC=C)
    h_sig = dict(k=BF, w=BF, u=BF, v_new=BF, h=BF, h0=F32, ht=F32, cu_seqlens=I32, chunk_offsets=I32, H=C, K=C,
                 V=C, BT=C, BK=C, BV=C, USE_H0=C, STORE_HT=C, PREC=C, ADDR64=C)
    dh_sig = dict(q=BF, k=BF, w=BF, do=BF, dv_local=BF, dv=BF, dh=BF, dht=F32, dh0=F32, cu_seqlens=I32,
                  chunk_offsets=I32, scale="fp32", H=C, K=C, V=C, BT=C, BK=C, BV=C, USE_DHT=C, STORE_DH0=C,
                  USE_DV_LOCAL=C, PREC=C, ADDR64=C)
    o_sig = dict(q=BF, k=BF, v_new=BF, h=BF, o=BF, cu_seqlens=I32, chunk_table=I32, scale="fp32", H=C, K=C, V=C,
                 BT=C, BK=C, BV=C, PREC=C)
    BKF = max(16, triton.next_power_of_2(D))
    bk = min(BKF, 64)
    for warps in [int(x) for x in args.warps.split(",")]:
        print(f"wy_fwd   warps {warps}:", resources(W.wy_fwd_kernel, wy_sig, dict(dims, BK=bk, BV=bk, PREC="tf32",
                                                                                   BATCHED_INV=True), warps))
        print(f"wy_fwd_dense warps {warps}:", resources(W.wy_fwd_dense_kernel, {
            n: t for n, t in wy_sig.items() if n != "BATCHED_INV"}, dict(dims, BK=bk, BV=bk, PREC="tf32"), warps))
        print(f"wy_bwd   warps {warps}:", resources(W.wy_bwd_kernel, wyb_sig, dict(dims, BK=bk, BV=bk, PREC="tf32"), warps))
        print(f"wy_bwd_da warps {warps}:", resources(WB.wy_bwd_da_kernel, dict(
            k=BF, v=BF, beta=BF, ai=F32, dw=BF, du=BF, dv=BF, da=F32, db=F32, cu_seqlens=I32, chunk_table=I32,
            H=C, K=C, V=C, BT=C, BK=C, BV=C, PREC=C), dict(dims, BK=bk, BV=bk, PREC="tf32"), warps))
        for bkd in sorted({bk, BKF}):
            print(f"wy_bwd_dk BK {bkd} warps {warps}:", resources(WB.wy_bwd_dk_kernel, dict(
                k=BF, beta=BF, ai=F32, dw=BF, da=F32, db=F32, dk_in=F32, dk=BF, dbeta=F32, db_stride="i64",
                cu_seqlens=I32, chunk_table=I32, H=C, K=C, BT=C, BK=C, PREC=C),
                dict(H=16, K=D, BT=64, BK=bkd, PREC="tf32"), warps))
        print(f"dqkw_bwd warps {warps}:", resources(O.dqkw_bwd_kernel, dq_sig, dict(dims, BK=bk, BV=bk, PREC="tf32"), warps))
        for bv in (16, 64):
            print(f"h_fwd BV {bv} warps {warps}:", resources(S.h_fwd_kernel, h_sig, dict(
                dims, BK=BKF, BV=bv, USE_H0=False, STORE_HT=False, PREC="tf32", ADDR64=D <= 64), warps))
            print(f"dh_bwd BV {bv} warps {warps}:", resources(S.dh_bwd_kernel, dh_sig, dict(
                dims, BK=BKF, BV=bv, USE_DHT=False, STORE_DH0=False, USE_DV_LOCAL=False, PREC="tf32", ADDR64=D <= 64), warps))
        print(f"o_fwd    warps {warps}:", resources(O.o_fwd_kernel, o_sig, dict(dims, BK=bk, BV=bk, PREC="tf32"), warps))


if __name__ == "__main__":
    main()
