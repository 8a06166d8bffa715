"""One GPU session for the delta-rule kernels: cold start, the full-size kernel tests, and the
benchmark followed, in the same process (fla's autotuning is paid once), by the errors vs
float64 of ours, fla and the PyTorch low-precision floor. Each part runs in its own
subprocess with a time limit, so one failure does not stop the others; logs go to ``--out``;
a short summary is printed last.

    python benchmarks/gpu_check_kernels.py --out $OUT \
        --bench-args "--dims 64,128 --methods ours,fla,sdpa;--dims 256 --methods ours,sdpa"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COLD = r"""
import time, torch, sys
t0 = time.perf_counter()
import torch.nn.functional as F
from deltanet.ops import chunk_delta_rule
B, T, H, D = 16, 2048, 16, 128
q, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
k = F.normalize(torch.randn(B, T, H, D, device="cuda"), dim=-1).bfloat16().requires_grad_()
beta = torch.rand(B, T, H, device="cuda", dtype=torch.bfloat16).requires_grad_()
torch.cuda.synchronize()
t1 = time.perf_counter()
o, _ = chunk_delta_rule(q, k, v, beta)
o.sum().backward()
torch.cuda.synchronize()
t2 = time.perf_counter()
print(f"COLD first fwd+bwd {t2 - t1:.1f} s (imports + inputs {t1 - t0:.1f} s)")
"""

COMPARE = r"""
import json, torch, torch.nn.functional as F
from deltanet.ops import chunk_delta_rule, recurrent_delta_rule, delta_rule_reference
from tests.ops._triton_common import run_with_grads, recurrence_low_precision
from tests.utils import rel_err, make_inputs
try:
    from fla.ops.delta_rule import chunk_delta_rule as fla_chunk
except Exception as e:
    fla_chunk = None
    print("fla unavailable:", e)
rows = []
for (B, T, H, K, V) in SHAPES:
    inp64 = make_inputs(B, T, H, K, V, initial_state=True, seed=T, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    do = torch.randn(B, T, H, V, device="cuda", dtype=torch.float64, generator=g)
    dS = torch.randn(B, H, K, V, device="cuda", dtype=torch.float64, generator=g)
    ref = run_with_grads(delta_rule_reference, inp64, do, dS)
    lowp = {k: (x.bfloat16() if x is not None and k != "initial_state" else x) for k, x in inp64.items()}
    lowp["initial_state"] = inp64["initial_state"].float()
    fns = {"ours": chunk_delta_rule, "ours_recurrent": recurrent_delta_rule,
           "torch_bf16_floor": recurrence_low_precision}
    if fla_chunk is not None:
        fns["fla"] = fla_chunk
    for name, fn in fns.items():
        try:
            o, S, gr = run_with_grads(fn, lowp, do.bfloat16(), dS.float())
            errs = {"o": rel_err(o, ref[0]), "S": rel_err(S, ref[1])}
            errs.update({n: rel_err(gr[n], ref[2][n]) for n in gr})
            nan = not all(torch.isfinite(x).all() for x in [o, S, *gr.values()])
        except Exception as e:
            errs, nan = {"error": repr(e)[:200]}, None
        row = dict(shape=(B, T, H, K, V), method=name, nonfinite=nan, **errs)
        rows.append(row)
        print(json.dumps(row), flush=True)
print("| shape (B,T,H,K,V) | method | o | S | dq | dk | dv | dbeta | dh0 |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    cells = [f"{r[k]:.2e}" if isinstance(r.get(k), float) else str(r.get(k, r.get("error", "-")))[:30]
             for k in ("o", "S", "dq", "dk", "dv", "dbeta", "dh0")]
    print(f"| {r['shape']} | {r['method']} | " + " | ".join(cells) + " |")
"""


BENCH_COMPARE = r"""
import sys, shlex
from deltanet.bench.kernels import cli_main
for a in sys.argv[1].split(";"):
    cli_main(shlex.split(a))
SHAPES = [(2, 1000, 4, 64, 64), (1, 1024, 4, 128, 128)]
""" + COMPARE


def run_part(name: str, cmd: list[str], out: str, timeout: int, env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    log = os.path.join(out, f"{name}.log")
    try:
        with open(log, "w") as fh:
            p = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout,
                               env={**os.environ, **(env or {})})
        rc = p.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    dt = time.perf_counter() - t0
    print(f"== {name}: rc={rc} in {dt:.0f} s (log {log})", flush=True)
    return dict(part=name, rc=rc, seconds=round(dt, 1), log=log)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_out")
    p.add_argument("--parts", default="cold,pytest,bench")
    p.add_argument("--bench-args", default="--dims 64,128 --lengths 1024,2048,4096,8192,16384",
                   help="';'-separated argument sets for deltanet bench kernels (one process)")
    p.add_argument("--timeouts", default="cold=120,pytest=200,bench=300")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    limits = {k: int(v) for k, v in (x.split("=") for x in args.timeouts.split(","))}
    py = sys.executable
    results = []
    for part in args.parts.split(","):
        if part == "cold":
            cache = tempfile.mkdtemp(prefix="triton-cold-")
            results.append(run_part("cold", [py, "-c", COLD], args.out, limits["cold"], {"TRITON_CACHE_DIR": cache}))
        elif part == "pytest":
            results.append(run_part("pytest", [py, "-m", "pytest", "-q", "--durations=10", "-p", "no:cacheprovider",
                                               "tests/ops/test_triton_chunk.py", "tests/ops/test_recurrent.py"],
                                    args.out, limits["pytest"]))
        elif part == "compare":  # errors vs float64 of ours, fla and the PyTorch bf16 floor, no timing
            script = "SHAPES = [(2, 1000, 4, 64, 64), (1, 1024, 4, 128, 128), (2, 777, 3, 128, 64)]\n" + COMPARE
            results.append(run_part("compare", [py, "-c", script], args.out, limits.get("compare", 200)))
        elif part == "bench":
            jl = os.path.join(args.out, "bench.jsonl")
            runs = ";".join(f"{a} --json {jl}" for a in args.bench_args.split(";"))
            results.append(run_part("bench", [py, "-c", BENCH_COMPARE, runs], args.out, limits["bench"]))
    # Summary last (the device tool returns the tail of the output).
    for r in results:
        with open(r["log"]) as fh:
            lines = fh.read().splitlines()
        keep = [ln for ln in lines if ln.startswith(("|", "COLD", "=", "FAILED", "ERROR"))
                or " passed" in ln or " failed" in ln or "Error" in ln][-60:]
        print(f"\n### {r['part']} rc={r['rc']} {r['seconds']} s")
        print("\n".join(keep))
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump(results, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
