"""Every launch of the chunk kernels at the committed defaults fits an H200 (sm_90).

A launch that needs more shared memory than the GPU has per block (232,448 B on sm_90) fails
with ``triton.runtime.errors.OutOfResources``; the CPU tests run the kernels in the Triton
interpreter and cannot see it. benchmarks/kernel_resources.py records the launches chunk.py
makes (32K tokens x 16 heads, K = V = 64 / 128 / 256, sequences of 1K and 16K tokens, bf16 and
fp32 inputs, the plain and the gated rule), compiles each distinct one for sm_90 with Triton's own compiler (no GPU), and
exits 1 listing those over the limit.

``--smem-only`` stops each compile at LLVM IR, where Triton fixes the shared memory (the rest,
PTX and ptxas, only adds register numbers): ~55 s cold on 2 cores instead of ~5 min (ptxas
alone takes ~3 min on wy_bwd in fp32 at K = 256), a few seconds once in Triton's cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
MISSING = [tool for tool in ("ptxas", "cuobjdump") if not os.access(BIN / tool, os.X_OK)]

CMD = ["benchmarks/kernel_resources.py", "--defaults", "--check-limits", "--smem-only", "--dims", "64,128,256",
       "--lengths", "1024,16384", "--dtypes", "bf16,fp32", "--gated"]


@pytest.mark.skipif(bool(MISSING), reason=f"Triton's bundled {' / '.join(MISSING)} not found in {BIN}: "
                                          "no offline sm_90 compile")
def test_default_launches_fit_sm90_shared_memory():
    # TRITON_INTERPRET=1 (set for this process by conftest / _triton_common) would make triton.jit
    # return interpreted functions, which cannot be compiled.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, *CMD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (f"python {' '.join(CMD)} exited with {r.returncode}\n--- stdout\n{r.stdout}"
                               f"\n--- stderr\n{r.stderr}")
    assert "every launch fits" in r.stdout, r.stdout
