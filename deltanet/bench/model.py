"""Model benchmarks: training throughput / peak memory (``deltanet bench model``) and decoding
speed through ``generate`` (``deltanet bench decode``), ours next to fla's DeltaNet.

Training: bf16 autocast over float32 parameters (``--regimes bf16``: bf16 parameters, no
autocast), fused AdamW, a fixed number of tokens per step (``B = tokens / T``), random token
ids; after ``--warmup`` steps (Triton compilation and autotuning happen there), ``--steps``
timed steps give tokens/s; peak memory is ``torch.cuda.max_memory_allocated``.
Decoding: bf16 weights, a random ``--prompt``-token prompt, exactly ``--new-tokens`` greedy
tokens (EOS disabled); tokens/s counts generated tokens over the whole ``generate`` call, and
the prefill alone is timed separately.

Models are preset names (``deltanet.models.presets``) or ``fla-deltanet`` (fla's
``DeltaNetForCausalLM`` with the shape of ``deltanet-340m``: 24 layers, hidden 1024, 8 heads,
vocab 32000). Each measurement is isolated: an out-of-memory or import error is reported in
the table and the sweep goes on.

Examples::

    deltanet bench model --models deltanet-340m,fla-deltanet --lengths 2048,4096,8192 --out results.md
    deltanet bench model --models deltanet-340m,fla-deltanet --interleave 5   # A/B/A/B..., one process
    deltanet bench model --models deltanet-340m --lengths 2048,8192 --activation-checkpointing none,mixer,block
    deltanet bench model --models deltanet-340m,fla-deltanet --lengths 2048,8192 --regimes bf16,autocast --untied
    deltanet bench decode --batch 1,32 --prompt 2048 --new-tokens 256
    deltanet bench decode --models deltanet-340m --cuda-graph both   # graph-replayed vs eager steps
    deltanet bench model --smoke        # tiny models on CPU, a few seconds: checks the script
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from datetime import datetime, timezone

import torch

__all__ = ["bench_decode", "bench_train", "build_model", "cli_main"]

FLA = "fla-deltanet"
TRAIN_MODELS = ("deltanet-340m", "hybrid-swa-340m", "hybrid-global-340m", "transformer-340m", FLA)
DECODE_MODELS = ("deltanet-340m", FLA)
# --smoke: the same presets shrunk to a few hundred thousand parameters
SMOKE = dict(hidden_size=64, num_hidden_layers=2, num_heads=2, intermediate_size=128, vocab_size=256,
             sliding_window=32)


def _fla_model(shape: dict):
    from fla.models import DeltaNetConfig as FlaConfig  # optional: pip install flash-linear-attention
    from fla.models import DeltaNetForCausalLM as FlaModel

    cfg = FlaConfig(hidden_size=shape["hidden_size"], num_hidden_layers=shape["num_hidden_layers"],
                    num_heads=shape["num_heads"], vocab_size=shape["vocab_size"],
                    intermediate_size=shape["intermediate_size"],
                    tie_word_embeddings=shape["tie_word_embeddings"], use_short_conv=True, conv_size=4,
                    use_beta=True, qk_norm="l2", qk_activation="silu")
    return FlaModel(cfg)


def build_model(name: str, *, smoke: bool = False, fused_loss: bool = True, activation_checkpointing: str = "none",
                **config_overrides):
    """A freshly initialised model by name (a preset or ``fla-deltanet``), on the CPU.
    ``activation_checkpointing``: our models' config field (fla's models ignore it);
    ``config_overrides``: preset fields (e.g. ``tie_word_embeddings``), applied to fla's shape too."""
    from deltanet.models import DeltaNetForCausalLM, get_config

    overrides = {**(dict(SMOKE) if smoke else {}), **config_overrides}
    if name == FLA:
        cfg = get_config("deltanet-340m", **overrides)
        return _fla_model(dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                               num_heads=cfg.num_heads, vocab_size=cfg.vocab_size,
                               intermediate_size=cfg.intermediate_size,
                               tie_word_embeddings=cfg.tie_word_embeddings))
    return DeltaNetForCausalLM(get_config(name, fuse_linear_cross_entropy=fused_loss,
                                          activation_checkpointing=activation_checkpointing, **overrides))


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200]


REGIMES = ("autocast", "bf16")  # float32 parameters + bf16 autocast; bf16 parameters, no autocast


def _train_step(model, opt, ids, device: torch.device, regime: str = "autocast"):
    """One optimiser step of ``model`` on ``ids`` (labels = inputs): bf16 autocast on CUDA over
    float32 parameters (``regime="autocast"``), or plain bf16 parameters (``"bf16"``)."""
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and regime == "autocast")

    def step():
        with amp:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _setup(name: str, T: int, batch: int, device: torch.device, *, smoke: bool, fused_loss: bool,
           compile_model: bool = False, activation_checkpointing: str = "none", regime: str = "autocast",
           **overrides):
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    torch.manual_seed(0)  # the same initial weights for every run of a model (e.g. each checkpointing mode)
    model = build_model(name, smoke=smoke, fused_loss=fused_loss,
                        activation_checkpointing=activation_checkpointing, **overrides)
    model = model.to(device=device, dtype=torch.bfloat16 if regime == "bf16" else None).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    fwd = torch.compile(model) if compile_model and name != FLA else model
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, T), device=device, generator=g)
    return model, opt, _train_step(fwd, opt, ids, device, regime)


# Kernel-name patterns of the step profile's categories (first match wins; case-insensitive).
PROFILE_GROUPS = (
    ("cross entropy", ("cross_entropy", "crossentropy", "logsumexp", "nll")),  # before "linear" (fused linear CE)
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "addmm", "aten::mm", "aten::bmm", "linear")),
    ("delta rule", ("wy_", "wu_fwd", "h_fwd", "dh_bwd", "o_fwd", "dqkw", "chunk_grads", "dv_local",
                    "chunk_gated_delta", "chunk_fwd_kernel_o", "chunk_bwd_kernel", "prepare_wy", "merge_16x16",
                    "recompute_w_u", "chunk_scaled_dot_kkt", "solve_tril", "delta_rule")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("inductor fused", ("triton_",)),
    ("elementwise", ("elementwise", "reduce_kernel", "copy", "cat", "fill")),
)


def profile_step(step, device: torch.device, steps: int = 3, top: int = 15) -> dict:
    """Per-step time of each kernel (CUDA) or op (CPU) over ``steps`` training steps, the ``top``
    largest and the total per category of ``PROFILE_GROUPS`` (µs per step)."""
    from torch.profiler import ProfilerActivity, profile

    act = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    _sync(device)
    with profile(activities=[act]) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    times = {}
    for e in prof.key_averages():
        t = (getattr(e, "self_device_time_total", 0) if act == ProfilerActivity.CUDA
             else getattr(e, "self_cpu_time_total", 0))
        if t > 0:
            times[e.key] = times.get(e.key, 0.0) + t / steps
    groups: dict[str, float] = {}
    for name, t in times.items():
        low = name.lower()
        g = next((g for g, pats in PROFILE_GROUPS if any(p in low for p in pats)), "other")
        groups[g] = groups.get(g, 0.0) + t
    ranked = sorted(times.items(), key=lambda kv: -kv[1])[:top]
    return dict(total_us=round(sum(times.values())), groups={g: round(t) for g, t in
                                                              sorted(groups.items(), key=lambda kv: -kv[1])},
                top=[(n[:80], round(t)) for n, t in ranked])


def bench_train(name: str, T: int, *, tokens: int, steps: int, warmup: int, device: torch.device,
                smoke: bool = False, fused_loss: bool = True, compile_model: bool = False,
                profile_steps: int = 0, activation_checkpointing: str = "none", regime: str = "autocast",
                **overrides) -> dict:
    """Training tokens/s and peak memory of one model at one sequence length (and, with
    ``profile_steps``, where a step's time goes: :func:`profile_step`). ``regime``: "autocast"
    (float32 parameters, bf16 autocast) or "bf16" (bf16 parameters); ``overrides``: preset fields."""
    row = dict(model=name, T=T, batch=max(1, tokens // T), regime=regime,
               activation_checkpointing=activation_checkpointing if name != FLA else "-")
    model = opt = None
    try:
        model, opt, step = _setup(name, T, row["batch"], device, smoke=smoke, fused_loss=fused_loss,
                                  compile_model=compile_model, activation_checkpointing=activation_checkpointing,
                                  regime=regime, **overrides)
        row["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(warmup):
            loss = step()
        _sync(device)
        row["warmup_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
        _sync(device)
        elapsed = time.perf_counter() - t0
        row["tokens_per_s"] = round(steps * row["batch"] * T / elapsed)
        row["loss"] = round(loss.detach().item(), 3)
        if device.type == "cuda":
            row["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if profile_steps:
            row["profile"] = profile_step(step, device, profile_steps)
    except Exception as e:  # OOM, a missing optional package, a kernel error: report, go on
        row["error"] = _error(e)
    finally:
        del model, opt
        _free()
    return row


def bench_train_interleaved(names: list[str], T: int, *, tokens: int, steps: int, warmup: int, rounds: int,
                            device: torch.device, smoke: bool = False, fused_loss: bool = True) -> list[dict]:
    """Training tokens/s of several models timed in alternation (A, B, A, B, ...) in one process.

    All models stay resident; after ``warmup`` steps each, every round times ``steps`` steps of
    each model in turn. Slow drifts of the machine (clocks, a busy neighbour) then hit every model
    alike, which separate runs do not guarantee. Rows: per-round tokens/s, their median, and the
    median relative to the first model. (Peak memory: use :func:`bench_train`, one model at a time.)
    """
    import statistics

    B = max(1, tokens // T)
    steps_fns, per = {}, {n: [] for n in names}
    rows = []
    try:
        for n in names:
            model, opt, step = _setup(n, T, B, device, smoke=smoke, fused_loss=fused_loss)
            for _ in range(warmup):
                step()
            steps_fns[n] = (model, opt, step)
        _sync(device)
        for _ in range(rounds):
            for n in names:
                step = steps_fns[n][2]
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    step()
                _sync(device)
                per[n].append(steps * B * T / (time.perf_counter() - t0))
        first = statistics.median(per[names[0]])
        for n in names:
            med = statistics.median(per[n])
            rows.append(dict(model=n, T=T, batch=B, rounds=rounds, steps_per_round=steps,
                             tokens_per_s=round(med), min_tokens_per_s=round(min(per[n])),
                             max_tokens_per_s=round(max(per[n])), vs_first=round(med / first, 3)))
    except Exception as e:
        rows = [dict(model=",".join(names), T=T, batch=B, error=_error(e))]
    finally:
        steps_fns.clear()
        _free()
    return rows


def bench_decode(name: str, batch: int, *, prompt: int, new_tokens: int, device: torch.device,
                 smoke: bool = False, repeats: int = 1, cuda_graph: bool = True) -> dict:
    """Greedy ``generate`` speed of one model at one batch size (after one warmup call).
    ``cuda_graph``: our models' ``cuda_graph_decoding`` (used where every layer is recurrent)."""
    row = dict(model=name, batch=batch, prompt=prompt, new_tokens=new_tokens)
    model = None
    try:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = build_model(name, smoke=smoke).to(device=device, dtype=dtype).eval()
        if hasattr(model, "cuda_graph_decoding"):
            from deltanet.models.cuda_graph import recurrent_only

            model.cuda_graph_decoding = cuda_graph
            row["cuda_graph"] = cuda_graph and device.type == "cuda" and recurrent_only(model.config.layer_types)
        vocab = model.config.vocab_size
        g = torch.Generator(device=device).manual_seed(0)
        ids = torch.randint(3, vocab, (batch, prompt), device=device, generator=g)
        mask = torch.ones_like(ids)
        gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                   eos_token_id=None, attention_mask=mask)
        model.generation_config.eos_token_id = None  # always exactly new_tokens tokens
        with torch.no_grad():
            # warmup at the timed shapes: kernels that compile or autotune per sequence length
            # (fla's prefill) would otherwise be timed (session 4: fla's first 2K prefill 18.6 s)
            model.generate(ids, **{**gen, "max_new_tokens": 4, "min_new_tokens": 4})
            _sync(device)
            t0 = time.perf_counter()
            model.model(input_ids=ids, use_cache=True)  # the backbone: no [B, T, vocab] logits
            _sync(device)
            row["prefill_s"] = round(time.perf_counter() - t0, 3)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                out = model.generate(ids, **gen)
                _sync(device)
                best = min(best, time.perf_counter() - t0)
        produced = out.shape[1] - prompt
        if produced != new_tokens:
            raise RuntimeError(f"generate produced {produced} tokens, expected {new_tokens}")
        row["generate_s"] = round(best, 3)
        row["tokens_per_s"] = round(batch * new_tokens / best, 1)
        # generate's time less one prefill; undefined when the two timings disagree that much
        decode_s = best - row["prefill_s"]
        row["decode_tokens_per_s"] = round(batch * new_tokens / decode_s, 1) if decode_s > 0.05 * best else None
        if device.type == "cuda":
            row["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    except Exception as e:
        row["error"] = _error(e)
    finally:
        del model
        _free()
    return row


def environment(device: torch.device, command: str) -> dict:
    """Versions and hardware for the results file."""
    import transformers

    env = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), command=command,
               python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
               device=str(device))
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    for pkg in ("triton", "fla"):
        try:
            env[pkg] = __import__(pkg).__version__
        except Exception as e:  # optional packages: record their absence
            env[pkg] = f"not available ({type(e).__name__})"
    return env


def markdown(title: str, rows: list[dict], columns: list[str], env: dict) -> str:
    """A markdown table of ``rows`` (missing cells '-', errors in their own column)."""
    lines = [f"## {title}", "", "  ".join(f"{k}: {v}" for k, v in env.items()), ""]
    cols = columns + ["error"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _csv(kind, text):
    try:
        return [kind(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None


def cli_main(argv: list[str]) -> int:
    """``deltanet bench model|decode [options]``; ``argv[0]`` names the benchmark."""
    if not argv or argv[0] not in ("model", "decode"):
        print("usage: deltanet bench model|decode [options]", file=sys.stderr)
        return 2
    what, argv = argv[0], argv[1:]
    p = argparse.ArgumentParser(prog=f"deltanet bench {what}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    default_models = TRAIN_MODELS if what == "model" else DECODE_MODELS
    p.add_argument("--models", type=lambda s: _csv(str, s), default=list(default_models),
                   help=f"comma-separated presets and/or {FLA} (default: {','.join(default_models)})")
    p.add_argument("--smoke", action="store_true", help="tiny models, short runs, CPU if no GPU: checks the script")
    p.add_argument("--out", help="write the markdown table to this file (and JSON next to it, .json)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    if what == "model":
        p.add_argument("--lengths", type=lambda s: _csv(int, s), default=[2048, 4096, 8192])
        p.add_argument("--tokens", type=int, default=32768, help="tokens per step (batch = tokens / T)")
        p.add_argument("--steps", type=int, default=10, help="timed steps")
        p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
        p.add_argument("--compile", action="store_true", help="our models: torch.compile the whole model")
        p.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                       help="time the models in alternation, ROUNDS rounds of --steps steps each, all "
                            "resident in one process (throughput only; compares e.g. ours and fla fairly)")
        p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                       help="after timing, profile STEPS more steps per model and length: kernel time per "
                            "step by category (matmul, delta rule, attention, Inductor-fused, ...) and the "
                            "top kernels, printed and in the JSON (not with --interleave)")
        p.add_argument("--plain-loss", action="store_true",
                       help="our models: materialise the logits (default: fused linear cross-entropy)")
        p.add_argument("--activation-checkpointing", type=lambda s: _csv(str, s), default=["none"],
                       metavar="MODES", help="our models: comma-separated modes from none,mixer,block, one row "
                                             "each (recompute each token mixer / each whole block in backward)")
        p.add_argument("--regimes", type=lambda s: _csv(str, s), default=["autocast"], metavar="REGIMES",
                       help="comma-separated from autocast (float32 parameters, bf16 autocast) and bf16 "
                            "(bf16 parameters, no autocast); one row each (not with --interleave)")
        p.add_argument("--untied", action="store_true",
                       help="untied input/output embeddings for every model (fla's 374M DeltaNet shape)")
        p.add_argument("--recompute", action="store_true",
                       help="our models: rerun the DeltaNet mixer's norm, projections and conv in backward "
                            "instead of keeping the conv inputs (DeltaNetMixer.recompute_inputs = True)")
    else:
        p.add_argument("--batch", type=lambda s: _csv(int, s), default=[1, 32])
        p.add_argument("--prompt", type=int, default=2048)
        p.add_argument("--new-tokens", type=int, default=256)
        p.add_argument("--repeats", type=int, default=1, help="timed generate calls per point (best is kept)")
        p.add_argument("--cuda-graph", choices=("on", "off", "both"), default="on",
                       help="our models: decode steps replayed from a CUDA graph (where every layer is "
                            "recurrent), launched eagerly, or both rows (default: on)")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.smoke:
        print(f"deltanet bench {what}: no CUDA device; use --smoke for a CPU check of the script", file=sys.stderr)
        return 2
    from deltanet.models import PRESETS  # noqa: F401  (validates names below)

    for m in args.models:
        if m != FLA and m not in PRESETS:
            p.error(f"unknown model {m!r}; choose presets from {sorted(PRESETS)} or {FLA}")
    if what == "model":
        bad = [m for m in args.activation_checkpointing if m not in ("none", "mixer", "block")]
        if bad or not args.activation_checkpointing:
            p.error(f"--activation-checkpointing takes modes from none,mixer,block; got {bad or 'none'}")
        if args.interleave and args.activation_checkpointing != ["none"]:
            p.error("--activation-checkpointing is not supported with --interleave")
        if not args.regimes or any(r not in REGIMES for r in args.regimes):
            p.error(f"--regimes takes values from {','.join(REGIMES)}; got {args.regimes}")
        if args.interleave and (args.regimes != ["autocast"] or args.untied):
            p.error("--regimes and --untied are not supported with --interleave")
    if args.smoke:
        if what == "model":
            args.lengths, args.tokens, args.steps, args.warmup = [32, 64], 128, 2, 1
        else:
            args.batch, args.prompt, args.new_tokens = [1, 2], 16, 8

    env = environment(device, " ".join(["deltanet", "bench", what, *argv]))
    if args.smoke:
        env["note"] = "SMOKE RUN: presets shrunk to tiny sizes, numbers meaningless"
    rows = []
    if what == "model" and args.recompute:
        from deltanet.layers.delta_net import DeltaNetMixer

        DeltaNetMixer.recompute_inputs = True
    if what == "model" and args.interleave:
        for T in args.lengths:
            for r in bench_train_interleaved(args.models, T, tokens=args.tokens, steps=args.steps,
                                             warmup=args.warmup, rounds=args.interleave, device=device,
                                             smoke=args.smoke, fused_loss=not args.plain_loss):
                print(json.dumps(r), flush=True)
                rows.append(r)
        cols = ["model", "T", "batch", "rounds", "steps_per_round", "tokens_per_s", "min_tokens_per_s",
                "max_tokens_per_s", "vs_first"]
        title = (f"Training throughput, interleaved ({args.tokens} tokens/step, bf16 autocast, fused AdamW, "
                 f"{args.interleave} rounds x {args.steps} steps per model)")
    elif what == "model":
        runs = [(m, T, mode, regime) for m in args.models for T in args.lengths for regime in args.regimes
                for mode in (args.activation_checkpointing if m != FLA else ["none"])]
        extra = dict(tie_word_embeddings=False) if args.untied else {}
        for m, T, mode, regime in runs:
            r = bench_train(m, T, tokens=args.tokens, steps=args.steps, warmup=args.warmup, device=device,
                            smoke=args.smoke, fused_loss=not args.plain_loss, compile_model=args.compile,
                            profile_steps=args.profile, activation_checkpointing=mode, regime=regime, **extra)
            if "profile" in r:
                pr = r["profile"]
                print(f"PROFILE {m} T={T}: {pr['total_us']} us/step; "
                      + ", ".join(f"{g} {t}" for g, t in pr["groups"].items()), flush=True)
                print("  top: " + ", ".join(f"{n} {t}" for n, t in pr["top"]), flush=True)
            r["loss_impl"] = "fla default" if m == FLA else ("plain" if args.plain_loss else "fused linear CE")
            r["compiled"] = bool(args.compile and m != FLA)
            r["recompute"] = m != FLA and args.recompute
            print(json.dumps(r), flush=True)
            rows.append(r)
        cols = ["model", "T", "batch", "regime", "activation_checkpointing", "params_M", "tokens_per_s",
                "peak_mem_GiB", "warmup_s", "loss", "loss_impl", "compiled", "recompute"]
        title = (f"Training throughput ({args.tokens} tokens/step, fused AdamW, {args.steps} steps; regime autocast: "
                 f"float32 parameters + bf16 autocast, bf16: bf16 parameters)")
    else:
        graphs = {"on": [True], "off": [False], "both": [True, False]}[args.cuda_graph]
        for m in args.models:
            for graph in graphs if m != FLA else [True]:
                for B in args.batch:
                    r = bench_decode(m, B, prompt=args.prompt, new_tokens=args.new_tokens, device=device,
                                     smoke=args.smoke, repeats=args.repeats, cuda_graph=graph)
                    print(json.dumps(r), flush=True)
                    rows.append(r)
        cols = ["model", "cuda_graph", "batch", "prompt", "new_tokens", "prefill_s", "generate_s", "tokens_per_s",
                "decode_tokens_per_s", "peak_mem_GiB"]
        title = f"Decoding through generate ({args.prompt}-token prompt, {args.new_tokens} new tokens, greedy)"
    table = markdown(title, rows, cols, env)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
        json_path = args.out.rsplit(".", 1)[0] + ".json" if args.out.endswith(".md") else args.out + ".json"
        with open(json_path, "w") as f:
            json.dump(dict(environment=env, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
