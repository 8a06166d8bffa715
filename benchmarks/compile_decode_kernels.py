"""Compile the decode-step kernels for sm_90 (H100 / H200) with the running Python's Triton, no GPU
needed: registers and spill stack per thread and shared memory of each launch shape of the 340M
models (the fused attention step and its combine; the GEMVs with and without split-K, and their
epilogue). For checking a Triton version's code generation before any GPU run:

    TRITON_INTERPRET= python benchmarks/compile_decode_kernels.py

Prints one line per kernel and shape and ALL_OK when nothing spills (the attention kernel's 32 B of
stack are libdevice's sin / cos argument reduction, not spills).
"""
import inspect
import os
import sys

import triton
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.kernel_resources import resource_usage
from deltanet.ops.decode_attention import decode_attention_kernel, decode_attention_combine_kernel
from deltanet.ops.decode_linear import _rows_per_program, decode_linear_kernel

def build(fn, vals):
    names = list(inspect.signature(fn.fn if hasattr(fn, "fn") else fn).parameters)
    sig, cons = {}, {}
    for n in names:
        v = vals[n]
        if isinstance(v, tuple) and v[0] == "c":
            sig[n] = "constexpr"; cons[n] = v[1]
        else:
            sig[n] = v
    # as a real launch specialises them: 16-byte aligned pointers, strides that are multiples of 16
    # (they decide the vectorised loads, and so the registers)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if isinstance(vals[n], str) and (vals[n].startswith("*") or n.startswith("stride"))}
    return ASTSource(fn=fn, signature=sig, constexprs=cons, attrs=attrs)

print("triton", triton.__version__)
ok = True
for cdt in ("bf16", "fp32"):
    for NS in (1, 4):
        for G in (1, 4):
            vals = dict(q="*bf16" if cdt == "bf16" else "*fp32", k="*bf16" if cdt == "bf16" else "*fp32",
                        v="*bf16" if cdt == "bf16" else "*fp32", k_cache=f"*{cdt}", v_cache=f"*{cdt}", valid="*i1",
                        pos="*i64", next_pos="*i64", mask="*i64", inv_freq="*fp32", o="*bf16" if cdt == "bf16" else "*fp32",
                        part_m="*fp32", part_l="*fp32", part_o="*fp32",
                        stride_qb="i32", stride_qh="i32", stride_kb="i32", stride_kh="i32", stride_vb="i32", stride_vh="i32",
                        stride_pos="i32", stride_mask="i32", scale="fp32", L="i32", CHUNK="i32",
                        H=("c", 8 * G), HKV=("c", 8), G=("c", G), GP=("c", 16), D=("c", 128), DV=("c", 128), BH=("c", 64),
                        BV=("c", 128), BL=("c", 64), NS=("c", NS), RING=("c", True), HAS_MASK=("c", False),
                        IEEE=("c", cdt == "fp32"))
            try:
                r = resource_usage(build(decode_attention_kernel, vals), dict(num_warps=8))
                print("attn", cdt, "NS", NS, "G", G, "regs/stack/smem", r)
                # 32 B of stack: libdevice's precise sin / cos (RoPE) keep their large-argument
                # reduction in a local array, whatever the register pressure; more would be spills
                ok &= r[1] <= 32
            except Exception as e:
                print("attn FAIL", cdt, NS, G, type(e).__name__, str(e)[:500]); ok = False
vals = dict(part_m="*fp32", part_l="*fp32", part_o="*fp32", o="*bf16", NS=("c", 4), NSP=("c", 4), DV=("c", 128), BV=("c", 128))
try:
    print("combine", resource_usage(build(decode_attention_combine_kernel, vals), dict(num_warps=4)))
except Exception as e:
    print("combine FAIL", type(e).__name__, str(e)[:500]); ok = False

# decode_linear: o_proj (N=1024, K=1024, residual), gate/up swiglu (N=2816, K=1024, norm), in-proj (4 mats, norm)
def lin(name, Ns, C, swiglu, norm, res, M, split, BK, BN=16, dt="bf16", dot=True):
    global ok
    Ns = Ns + [0] * (8 - len(Ns))
    starts = [0]
    for n in Ns[:-1]:
        starts.append(starts[-1] + triton.cdiv(n, BN))
    BM = _rows_per_program(M, dot)
    ksplit = triton.cdiv(triton.cdiv(C, split), BK) * BK
    vals = dict(x=f"*{dt}", stride_x="i32", wn=f"*{dt}", res=f"*{dt}", y=f"*{dt}", stride_y="i32", ws="*fp32", M="i32",
                eps="fp32", **{f"w{i}": f"*{dt}" for i in range(8)}, **{f"N{i}": ("c", Ns[i]) for i in range(8)},
                **{f"B{i}": ("c", starts[i]) for i in range(1, 8)}, C=("c", C),
                WS_N=("c", (2 * Ns[0]) if swiglu else sum(Ns)), BM=("c", BM), BN=("c", BN), BK=("c", BK),
                K_SPLIT=("c", ksplit), SPLIT=("c", split > 1), NORM=("c", norm), SWIGLU=("c", swiglu),
                HAS_RES=("c", res), IEEE=("c", dt == "fp32"), DOT=("c", dot))
    try:
        r = resource_usage(build(decode_linear_kernel, vals), dict(num_warps=4, num_stages=3))
        print("gemv", name, "M", M, "split", split, "regs/stack/smem", r); ok &= r[1] == 0
    except Exception as e:
        print("gemv FAIL", name, M, split, type(e).__name__, str(e)[:800]); ok = False

for M in (1, 32):
    BK = {1: 256, 32: 128}[M]
    for split in (1, 4):
        lin("o_proj", [1024], 1024, False, False, True, M, split, BK)
        lin("down", [1024], 2816, False, False, True, M, split, BK)
    for split in (1, 2):
        lin("gate_up", [2816, 2816], 1024, True, True, False, M, split, BK)
    lin("in_proj", [1024, 1024, 1024, 8], 1024, False, True, False, M, 1, BK)
lin("o_proj_nodot", [1024], 1024, False, False, True, 1, 4, 256, BN=8, dot=False)
from deltanet.ops.decode_linear import decode_linear_epilogue_kernel
for sw in (False, True):
    vals = dict(ws="*fp32", res="*bf16", y="*bf16", stride_y="i32", M="i32", N=("c", 1024), WS_N=("c", 2048 if sw else 1024),
                SPLIT_K=("c", 4), BM=("c", 1), BN=("c", 1024), SWIGLU=("c", sw), HAS_RES=("c", not sw))
    try:
        print("epilogue", sw, resource_usage(build(decode_linear_epilogue_kernel, vals), dict(num_warps=4)))
    except Exception as e:
        print("epilogue FAIL", type(e).__name__, str(e)[:500]); ok = False
print("ALL_OK" if ok else "SOME_FAILED")
