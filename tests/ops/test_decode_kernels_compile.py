"""The decode-step kernels (fused attention step, GEMVs with and without split-K) compile for sm_90
(H100 / H200) with the installed Triton, no GPU needed, and keep within their register budget:
no spills in any GEMV, epilogue or combine kernel, and at most the 32 B of stack that libdevice's
precise sin / cos take in the attention step (``benchmarks/compile_decode_kernels.py``). What the
interpreter cannot show: a kernel that only fails, or spills, in real code generation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[2]
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@pytest.mark.skipif(not all(os.access(os.path.join(BIN, t), os.X_OK) for t in ("ptxas", "cuobjdump")),
                    reason="Triton's bundled ptxas / cuobjdump not found: no offline sm_90 compile")
def test_decode_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_decode_kernels.py")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert not any("FAIL" in line for line in lines), r.stdout
    assert sum(line.startswith("gemv ") for line in lines) == 15 and sum(line.startswith("attn ") for line in lines) == 8
    # the second launches: one combine per split attention shape, one epilogue per split GEMV
    assert sum(line.startswith("combine ") for line in lines) == 4
    assert sum(line.startswith("epilogue ") for line in lines) == 7
    assert lines[-1] == "ALL_OK", r.stdout
