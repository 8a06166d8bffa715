"""Cold start on a GPU: the first fwd+bwd of the chunk op, or the first training step of a
2-layer DeltaNet LM (deltanet-340m's width), in a new process with empty Triton and Inductor
caches -- what a user waits for before the first step of a fresh install.

    python benchmarks/cold_start.py op            # the op at B=16, T=2048, H=16, D=128, bf16
    python benchmarks/cold_start.py model         # ours: 2 layers, hidden 1024, T=2048, 32K tokens/step
    python benchmarks/cold_start.py model --fla   # the same shape through fla's DeltaNetForCausalLM

The caches are pointed at fresh temporary folders before torch/triton are imported, unless
``--keep-cache`` is given. Prints one JSON line: seconds to the end of the first and second steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["op", "model"])
    p.add_argument("--fla", action="store_true", help="model: fla's DeltaNet instead of ours")
    p.add_argument("--keep-cache", action="store_true", help="use the existing Triton/Inductor caches")
    a = p.parse_args()
    if not a.keep_cache:
        tmp = tempfile.mkdtemp(prefix="cold-start-")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
    t0 = time.perf_counter()
    import torch
    import torch.nn.functional as F

    row = dict(what=a.what, impl="fla" if a.fla else "ours", fresh_cache=not a.keep_cache)
    if a.what == "op":
        from deltanet.ops import chunk_delta_rule

        B, T, H, D = 16, 2048, 16, 128
        q, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        k = F.normalize(torch.randn(B, T, H, D, device="cuda"), dim=-1).bfloat16().requires_grad_()
        beta = torch.rand(B, T, H, device="cuda", dtype=torch.bfloat16).requires_grad_()

        def step():
            chunk_delta_rule(q, k, v, beta)[0].sum().backward()
    else:
        from deltanet.bench.model import build_model
        from deltanet.models import DeltaNetForCausalLM, get_config

        # 2 layers of deltanet-340m's width: the kernels (and their compilation) of the full model
        if a.fla:
            model = build_model("fla-deltanet")
            model.model.layers = model.model.layers[:2]
        else:
            model = DeltaNetForCausalLM(get_config("deltanet-340m", num_hidden_layers=2))
        model = model.cuda().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        ids = torch.randint(0, model.config.vocab_size, (16, 2048), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    row["setup_s"] = round(time.perf_counter() - t0, 1)
    t1 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    row["first_step_s"] = round(time.perf_counter() - t1, 1)
    t1 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    row["second_step_s"] = round(time.perf_counter() - t1, 3)
    print("COLD " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
