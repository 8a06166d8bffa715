"""Per-kernel profile and launch-setting sweep for the chunk kernels (GPU). Prints, for a few
(D, T) at 32K tokens x 16 heads in bf16: each kernel's time in one fwd+bwd, then fwd and
fwd+bwd medians for each variant: ``ChunkKernelConfig`` fields changed from
``select_config``'s choice for the shape, passed as ``kernel_config=`` (the public argument).
Used to pick the defaults in ``deltanet/ops/delta_rule/config.py``; results in
benchmarks/NOTES-kernels.md.

    python benchmarks/tune_kernels.py --dims 64,128 --lengths 1024,16384
    python benchmarks/tune_kernels.py --gated --variants old,o_g8,o_s8,o_wyb8 --check --combine

``--gated`` tunes the gated rule (a log decay ``g`` per token and head, ``select_config(...,
gated=True)``): it runs the plain rule's kernels with their ``USE_G`` paths, which keep more
values live; compiled for sm_90 (``benchmarks/kernel_resources.py --defaults --gated``, 2026-12-07)
the default 4 warps spill 568 B/thread in chunk_grads at D = 64 and 376 / 384 B in dh_bwd / wy_bwd
at D = 128, none / 32 / 96 B at 8 warps (variants ``o_g8``, ``o_s8``, ``o_wyb8``).
``--compile-only`` runs one fwd+bwd per shape and variant (fills the Triton cache; several such
processes can compile in parallel), ``--choose FILE`` writes the variant with the lowest mean
fwd+bwd time relative to the first variant as JSON (the changed fields: put them into
``select_config`` if they should become the defaults), and
``--check`` drops a variant whose outputs/gradients differ from the first variant's, or (at
B = 2, T = 1000) from the PyTorch chunkwise version in fp32, by more than a relative 5e-2 (a
wrong launch setting must not win; bf16 vs float64 is ~6e-3, results/2026-11-29-h200-kernels.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from triton.testing import do_bench

from deltanet.bench.kernels import _inputs
from deltanet.ops import ChunkKernelConfig, chunk_delta_rule, device_sms, select_config

# "old" = the defaults (select_config); each "o_*" variant changes one setting on top of them, so
# a sweep shows which changes help one at a time (``--combine`` then times the union of the
# helpful ones). A value "all" means all of the head dim (e.g. o_fwd with one V-block).
OLD: dict = {}
VARIANTS = {
    "old": OLD,
    "o_nofuse": {"grads_fused": False},              # dqkw_bwd + wy_bwd instead of chunk_grads (K <= 64)
    "o_fuse": {"grads_fused": True},                 # chunk_grads at K = 128 too (slower there, 2026-11-30)
    "o_g4": {"warps_grads": 4},
    "o_g8": {"warps_grads": 8},
    "o_gbv64": {"bv_grads": 64},
    "o_ofull": {"bv_o": "all", "warps_o": 8},        # o_fwd: all of V per program, 8 warps
    "o_wy8": {"warps_wy": 8},                        # UT-transform forward at 8 warps
    "o_wyb8": {"warps_wyb": 8},
    "o_dqkw8": {"warps_dqkw": 8, "grads_fused": False},
    "o_s8": {"warps_state": 8},                      # the state kernels (h_fwd, dh_bwd) at 8 warps
    "o_addr64": {"state_addr64": True},              # int64 token offsets in the state kernels at K > 64
    "o_ss2": {"stages_state": 2},
    # the state kernels' V-block (sequential over chunks; fewer, wider programs vs more, narrower)
    "bvs16": {"bv_state": 16},
    "bvs32": {"bv_state": 32},
    "bvs64": {"bv_state": 64},
}


GATED = False  # --gated: the gated rule (inputs with g; select_config(..., gated=True))


def config_for(settings: dict, B: int, H: int, D: int, dtype=torch.bfloat16) -> ChunkKernelConfig:
    """``select_config``'s choice for ``B`` sequences x ``H`` heads at K = V = ``D`` on this GPU,
    with ``settings`` (ChunkKernelConfig fields; "all" = all of D) changed."""
    sms = device_sms("cuda")
    full = max(16, 1 << (D - 1).bit_length())
    changes = {k: (full if v == "all" else v) for k, v in settings.items()}
    return dataclasses.replace(select_config(B, H, D, D, dtype, num_sms=sms, gated=GATED), **changes)


def inputs(B, T, H, D, dtype=torch.bfloat16, device="cuda", seed=0) -> list[torch.Tensor]:
    """q, k, v, beta (and with ``--gated`` a log decay g in [-0.1, 0), float32), leaves with grads."""
    xs = _inputs(B, T, H, D, dtype, device, seed=seed)
    if GATED:
        gen = torch.Generator(device).manual_seed(seed + 7)
        xs.append((-0.1 * torch.rand(B, T, H, device=device, generator=gen)).requires_grad_())
    return xs


def call(xs, cfg) -> torch.Tensor:
    q, k, v, beta, *g = xs
    return chunk_delta_rule(q, k, v, beta, g=g[0] if g else None, kernel_config=cfg)[0]


def oracle_err(D, settings, B=2, T=1000, H=16, device="cuda"):
    """Largest relative error of o, dq, dk, dv, dbeta (bf16, the variant's ``settings``) against
    the PyTorch chunkwise version in fp32 on the same bf16 inputs (H = 16 and N * H < 2 x SMs:
    the launch settings, hence the compiled kernels, are those of the T = 16K benchmark shape)."""
    from deltanet.ops import delta_rule_chunkwise_torch

    xs = inputs(B, T, H, D, device=device, seed=5)
    do = torch.randn(B, T, H, D, device=device, generator=torch.Generator(device).manual_seed(2))
    ref32 = [x.detach().float().requires_grad_() for x in xs]
    q, k, v, beta, *g = ref32
    o_ref = delta_rule_chunkwise_torch(q, k, v, beta, g=g[0] if g else None)[0]
    o_ref.backward(do)
    o = call(xs, config_for(settings, B, H, D))
    o.backward(do.to(o.dtype))
    pairs = [(o.detach().float(), o_ref.detach())] + [(x.grad.float(), r.grad) for x, r in zip(xs, ref32)]
    return max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in pairs)


def profile(D, T, H=16, tokens=32768, method="ours"):
    """Each CUDA kernel's time (µs) in one fwd+bwd of ``method`` (a deltanet.bench.kernels method;
    with ``--gated`` our gated op only)."""
    from deltanet.bench.kernels import method_fn

    xs = inputs(tokens // T, T, H, D)
    do = torch.randn_like(xs[2])
    if GATED:
        if method != "ours":
            raise ValueError("--gated profiles only 'ours'")
        step = lambda: call(xs, None).backward(do)
    else:
        fn = method_fn(method)
        step = lambda: fn(*xs).backward(do)
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    out = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            out.append((e.key[:48], round(t / 5, 1)))
    out.sort(key=lambda x: -x[1])
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dims", default="64,128")
    p.add_argument("--lengths", default="1024,16384")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--no-profile", action="store_true", help="skip the per-kernel profile")
    p.add_argument("--profile-methods", default="ours",
                   help="comma-separated deltanet.bench.kernels methods to profile per kernel (e.g. ours,fla)")
    p.add_argument("--profile-only", action="store_true", help="only the per-kernel profiles")
    p.add_argument("--compile-only", action="store_true", help="one fwd+bwd per variant and shape, no timing")
    p.add_argument("--check", action="store_true", help="compare every variant with the first one")
    p.add_argument("--choose", default=None, help="write the fastest variant's settings (JSON) here")
    p.add_argument("--json", default=None, help="append one JSON line per measurement here")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rep", type=int, default=40)
    p.add_argument("--combine", action="store_true",
                   help="after the sweep, also time the union of the one-setting variants that helped")
    p.add_argument("--gated", action="store_true", help="the gated rule (inputs with a log decay g)")
    args = p.parse_args()
    global GATED
    GATED = args.gated
    shapes = [(int(d), int(t)) for d in args.dims.split(",") for t in args.lengths.split(",")]
    names = args.variants.split(",")
    for n in names:
        if n not in VARIANTS:
            p.error(f"unknown variant {n!r}; choose from {list(VARIANTS)}")
    if args.compile_only:
        for name in names:
            for D, T in shapes:
                xs = inputs(32768 // T, T, 16, D)
                cfg = config_for(VARIANTS[name], 32768 // T, 16, D)
                call(xs, cfg).backward(torch.randn_like(xs[2]))
                torch.cuda.synchronize()
                print(f"compiled {name} D={D} T={T}", flush=True)
            if args.check:
                for D in sorted({D for D, _ in shapes}):
                    print(f"{name} D={D} error vs fp32 PyTorch: {oracle_err(D, VARIANTS[name]):.2e}", flush=True)
        return
    for D, T in ([] if args.no_profile else shapes):
        for method in args.profile_methods.split(","):
            prof = profile(D, T, method=method)
            total = sum(t for _, t in prof)
            print(f"PROFILE {method} D={D} T={T} total {total:.0f} us: "
                  + ", ".join(f"{n}={t:.0f}" for n, t in prof[:12]), flush=True)
    if args.profile_only:
        return
    rows, refs = [], {}
    for name in names:
        rows += time_variant(name, VARIANTS[name], shapes, args, refs)
    if args.combine:
        combo = combined(rows, names, shapes)
        if combo is not None:
            VARIANTS["combo"] = combo
            names.append("combo")
            print(f"COMBO: {json.dumps(combo)}", flush=True)
            rows += time_variant("combo", combo, shapes, args, refs)
    if args.choose:
        choose(rows, names, shapes, args.choose)
    print("| variant | " + " | ".join(f"D{D} T{T} fwd/fb ms" for D, T in shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    for name in names:
        cells = []
        for D, T in shapes:
            r = next((r for r in rows if r["variant"] == name and r["D"] == D and r["T"] == T), {})
            cells.append(f"{r['fwd']:.3f}/{r['fwdbwd']:.3f}" if "fwd" in r else "err")
        print(f"| {name} | " + " | ".join(cells) + " |")


def time_variant(name, settings, shapes, args, refs):
    """fwd and fwd+bwd medians of one launch variant at each shape (and, with ``--check``, its
    largest relative difference from the first variant timed, and from the fp32 oracle)."""
    rows = []
    for D, T in shapes:
        try:
            xs = inputs(32768 // T, T, 16, D)
            v = xs[2]
            do = torch.randn(v.shape, device=v.device, dtype=v.dtype, generator=torch.Generator("cuda").manual_seed(1))
            cfg = config_for(settings, 32768 // T, 16, D)
            f = lambda: call(xs, cfg)
            fb = lambda: f().backward(do)
            row = dict(variant=name, D=D, T=T)
            if args.check and T == shapes[0][1]:
                row["oracle_err"] = oracle_err(D, settings)
            if args.check:
                o = f()
                o.backward(do)
                # copies: an fp32 leaf's .float() is its grad itself, which the timed backward
                # passes below would then keep adding to (the gated rule's g)
                got = [o.detach().float().clone()] + [x.grad.float().clone() for x in xs]
                if (D, T) not in refs:
                    refs[(D, T)] = got
                else:
                    row["rel_err"] = max(float((a - b).norm() / b.norm().clamp_min(1e-30))
                                         for a, b in zip(got, refs[(D, T)]))
                del got, o
            else:
                fb()
            with torch.no_grad():
                tf = do_bench(f, warmup=args.warmup, rep=args.rep, return_mode="median")
            tfb = do_bench(fb, warmup=args.warmup, rep=args.rep, grad_to_none=xs,
                           return_mode="median")
            row.update(fwd=round(tf, 3), fwdbwd=round(tfb, 3))
        except Exception as e:
            row = dict(variant=name, D=D, T=T, error=repr(e)[:200])
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    return rows


def scores_of(rows, names, shapes, verbose=False):
    """Mean fwd+bwd time relative to the first variant, for each variant that ran every shape
    and matches the first one (and the oracle) within 5e-2."""
    by = {(r["variant"], r["D"], r["T"]): r for r in rows}
    base = names[0]
    scores = {}
    for name in names:
        rs = [by.get((name, D, T), {}) for D, T in shapes]
        bs = [by.get((base, D, T), {}) for D, T in shapes]
        if any("fwdbwd" not in r for r in rs + bs) or any(
                max(r.get("rel_err", 0.0), r.get("oracle_err", 0.0)) > 5e-2 for r in rs):
            if verbose:
                print(f"CHOICE: {name} excluded (error, missing shape or mismatch)", flush=True)
            continue
        scores[name] = sum(r["fwdbwd"] / b["fwdbwd"] for r, b in zip(rs, bs)) / len(shapes)
        if verbose:
            print(f"CHOICE: {name} mean fwd+bwd time / {base} = {scores[name]:.3f}", flush=True)
    return scores


def combined(rows, names, shapes, gain=0.98):
    """The union of the one-setting ("o_*") variants that beat the first one by 2% or more;
    where two set the same key, the better one's value wins. None if fewer than two helped."""
    scores = scores_of(rows, names, shapes)
    good = sorted((n for n in scores if n.startswith("o_") and scores[n] < gain), key=lambda n: -scores[n])
    if len(good) < 2:
        return None
    combo = {}
    for n in good:  # worst first: the best variant's values are applied last
        combo.update(VARIANTS[n])
    return combo


def choose(rows, names, shapes, path):
    """Write the settings of the variant with the lowest mean fwd+bwd time relative to the
    first variant (every shape must have run, and match the first variant within 5e-2)."""
    scores = scores_of(rows, names, shapes, verbose=True)
    best = min(scores, key=scores.get) if scores else names[0]
    settings = dict(VARIANTS[best])
    with open(path, "w") as fh:
        json.dump(settings, fh)
    print(f"CHOICE: {best} -> ChunkKernelConfig fields {json.dumps(settings)} (on top of select_config)", flush=True)


if __name__ == "__main__":
    main()
