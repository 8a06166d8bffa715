"""Model benchmarks: training throughput / peak memory (``deltanet bench model``), ours next to
fla's DeltaNet; ``deltanet bench decode`` lives in :mod:`deltanet.bench.decode`.

Training: bf16 autocast over float32 parameters (``--regimes bf16``: bf16 parameters, no
autocast), fused AdamW, a fixed number of tokens per step (``B = tokens / T``), random token
ids; after ``--warmup`` steps (Triton compilation and autotuning happen there), ``--steps``
timed steps give tokens/s; peak memory is ``torch.cuda.max_memory_allocated``.

Models are preset names (``deltanet.models.presets``) or ``fla-deltanet`` (fla's
``DeltaNetForCausalLM`` with the shape of ``deltanet-340m``: 24 layers, hidden 1024, 8 heads,
vocab 32000). Each measurement is isolated: an out-of-memory or import error is reported in
the table and the sweep goes on.

Examples::

    deltanet bench model --models deltanet-340m,fla-deltanet --lengths 2048,4096,8192 --out results.md
    deltanet bench model --models deltanet-340m,fla-deltanet --interleave 5   # A/B/A/B..., one process
    deltanet bench model --models deltanet-340m --lengths 2048,8192 --activation-checkpointing none,mixer,block
    deltanet bench model --models deltanet-340m,fla-deltanet --lengths 2048,8192 --regimes bf16,autocast --untied
    deltanet bench model --smoke        # tiny models on CPU, a few seconds: checks the script
"""

from __future__ import annotations

import gc
import json
import platform
import time
from datetime import datetime, timezone

import torch

__all__ = ["bench_train", "build_model", "environment", "markdown", "train_sweep", "write_results"]

FLA = "fla-deltanet"
TRAIN_MODELS = ("deltanet-340m", "hybrid-swa-340m", "hybrid-global-340m", "transformer-340m", FLA)
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
    ("delta rule", ("wy_", "w_fwd_kernel", "h_fwd", "dh_bwd", "o_fwd", "dqkw", "chunk_grads", "dv_local",
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


def train_sweep(models: list[str], lengths: list[int], *, tokens: int, steps: int, warmup: int,
                device: torch.device, smoke: bool = False, compile_model: bool = False, interleave: int = 0,
                profile: int = 0, plain_loss: bool = False, activation_checkpointing: list[str] = ("none",),
                recompute: bool = False, regimes: list[str] = ("autocast",),
                untied: bool = False) -> tuple[str, list[str], list[dict]]:
    """Training throughput of ``models`` at each length: :func:`bench_train` per (model, length,
    activation-checkpointing mode), or :func:`bench_train_interleaved` rounds with ``interleave``.
    Prints each row as a JSON line; returns ``(title, columns, rows)`` for :func:`markdown`.

    ``recompute`` sets ``DeltaNetMixer.recompute_inputs`` (class-wide, for the rest of the process).
    ``regimes``: ``"autocast"`` (float32 parameters, bf16 autocast) and/or ``"bf16"`` (bf16
    parameters); ``untied``: untied input/output embeddings for every model.
    """
    if not regimes or any(r not in REGIMES for r in regimes):
        raise ValueError(f"regimes must be from {REGIMES}, got {list(regimes)}")
    if interleave and (list(regimes) != ["autocast"] or untied):
        raise ValueError("regimes other than autocast and untied are not supported with interleave")
    rows = []
    if recompute:
        from deltanet.layers.delta_net import DeltaNetMixer

        DeltaNetMixer.recompute_inputs = True
    if interleave:
        for T in lengths:
            for r in bench_train_interleaved(models, T, tokens=tokens, steps=steps, warmup=warmup, rounds=interleave,
                                             device=device, smoke=smoke, fused_loss=not plain_loss):
                print(json.dumps(r), flush=True)
                rows.append(r)
        cols = ["model", "T", "batch", "rounds", "steps_per_round", "tokens_per_s", "min_tokens_per_s",
                "max_tokens_per_s", "vs_first"]
        title = (f"Training throughput, interleaved ({tokens} tokens/step, bf16 autocast, fused AdamW, "
                 f"{interleave} rounds x {steps} steps per model)")
        return title, cols, rows
    runs = [(m, T, mode, regime) for m in models for T in lengths for regime in regimes
            for mode in (activation_checkpointing if m != FLA else ["none"])]
    extra = dict(tie_word_embeddings=False) if untied else {}
    for m, T, mode, regime in runs:
        r = bench_train(m, T, tokens=tokens, steps=steps, warmup=warmup, device=device, smoke=smoke,
                        fused_loss=not plain_loss, compile_model=compile_model, profile_steps=profile,
                        activation_checkpointing=mode, regime=regime, **extra)
        if "profile" in r:
            pr = r["profile"]
            print(f"PROFILE {m} T={T}: {pr['total_us']} us/step; "
                  + ", ".join(f"{g} {t}" for g, t in pr["groups"].items()), flush=True)
            print("  top: " + ", ".join(f"{n} {t}" for n, t in pr["top"]), flush=True)
        r["loss_impl"] = "fla default" if m == FLA else ("plain" if plain_loss else "fused linear CE")
        r["compiled"] = bool(compile_model and m != FLA)
        r["recompute"] = m != FLA and recompute
        print(json.dumps(r), flush=True)
        rows.append(r)
    cols = ["model", "T", "batch", "regime", "activation_checkpointing", "params_M", "tokens_per_s",
            "peak_mem_GiB", "warmup_s", "loss", "loss_impl", "compiled", "recompute"]
    title = (f"Training throughput ({tokens} tokens/step, fused AdamW, {steps} steps; regime autocast: "
             f"float32 parameters + bf16 autocast, bf16: bf16 parameters)")
    return title, cols, rows


def write_results(out: str, table: str, env: dict, rows: list[dict]) -> None:
    """The markdown ``table`` to ``out`` and ``{environment, rows}`` as JSON next to it (``.json``)."""
    with open(out, "w") as f:
        f.write(table)
    json_path = out.rsplit(".", 1)[0] + ".json" if out.endswith(".md") else out + ".json"
    with open(json_path, "w") as f:
        json.dump(dict(environment=env, rows=rows), f, indent=1)
