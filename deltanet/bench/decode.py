"""Decoding benchmark (``deltanet bench decode``): tokens/s, memory and the bandwidth floor.

Two paths per model and batch size, after a random ``--prompt``-token prompt (bf16 weights on
CUDA, exactly ``--new-tokens`` greedy tokens, EOS disabled):

- ``generate``: Hugging Face's ``generate``. Our models with ``--cuda-graph on``: its greedy search
  runs the captured loop (``decoding.generate_fast``; ``model.fast_generate = False`` would give
  Hugging Face's loop over the captured step); ``off``: Hugging Face's loop with eager steps.
  fla's DeltaNet runs its own way;
- ``loop``: :func:`deltanet.models.decoding.decode`, one captured step per token with the LM
  head and the token choice inside (our models only).

``--decode-kernel fused,eager`` adds a row per route of the delta-rule layers' one-token steps
(``DeltaNetConfig.decode_kernel``: one fused Triton kernel per layer, or op by op; default
``auto``: fused on CUDA), and on CUDA each row counts the kernels one decode step launches
(``kernels_per_step``, torch profiler; ``fused_kernels``: those of the fused step, one per delta layer;
``gemv_kernels``: the fused route's projection kernels, four per block and one for the final
norm + LM head; ``attention_kernels``: the
fused attention steps, one per attention layer), in the step the captured loop replays.

Per row: tokens/s over prefill + decode (``tokens_per_s``, the figure comparable with
``generate``), decode-only tokens/s and ms per step (all steps after the prefill: the eager
first step and the graph capture included), on the loop path ``steady_tokens_per_s`` (the
replayed steps after the first replay, a long generation's rate) and the once-per-generation part
before them (``setup_ms``: the eager first step, ``first_step_ms``, the capture, ``capture_ms``,
and the first replay); these rows are a model's first generation of their shape (kept decode
steps cleared first), and ``warm_tokens_per_s`` / ``warm_decode_tokens_per_s`` the same figures for
one more generation that replays the step the previous one kept (what a server's later requests
get: no eager first step, no capture). Then peak memory, the cache's size after the
last step (``cache_MiB``: constant in the prompt length for recurrent models), and the fraction of
the bandwidth floor: per step the weights are read once (all parameters but the input embedding
table, of which only B rows are gathered) and the cache traffic is counted (recurrent and conv
states read and written, K/V read; of a static cache only its valid slots at the end, which is
what the fused attention step reads: the eager step reads the whole preallocated capacity, beyond
the floor); floor = bytes / HBM bandwidth, measured by a device copy
(``--hbm-gbps`` overrides), and ``bw_floor_frac`` = floor / measured step time.

Each point is isolated (an error or out-of-memory is recorded and the sweep goes on), results
are written after every row, and ``--budget-s`` skips the points that no longer fit.

Examples::

    deltanet bench decode --out decode.md                                  # defaults below
    deltanet bench decode --models deltanet-340m,hybrid-swa-340m,hybrid-global-340m,transformer-340m,fla-deltanet \\
        --paths generate,loop --cuda-graph both --batch 1,32 --prompt 2048 --new-tokens 256
    deltanet bench decode --models deltanet-340m --paths loop --batch 1 --prompt 2048,32768   # memory vs context
    deltanet bench decode --smoke          # tiny models on CPU: checks the script
"""

from __future__ import annotations

import json
import time

import torch

from .model import FLA, _error, _free, _sync, build_model, markdown, write_results

__all__ = ["COLUMNS", "DECODE_KERNELS", "DECODE_MODELS", "PATHS", "bench_decode", "copy_bandwidth",
           "count_step_kernels", "decode_sweep"]

DECODE_MODELS = ("deltanet-340m", "hybrid-swa-340m", "hybrid-global-340m", "transformer-340m", FLA)
PATHS = ("generate", "loop")
DECODE_KERNELS = ("auto", "fused", "eager")


def count_step_kernels(model, *, batch: int, decode_kernel: str | None = None, prompt: int = 16) -> dict:
    """GPU work of the decode step the captured loop replays (``DecodeGraph``'s step on the static
    cache, run eagerly so each launch is visible to the torch profiler), for ``model`` (one of ours,
    on CUDA): ``kernels`` (kernels, memcpy and memset: what a captured step holds as graph nodes),
    ``fused_kernels`` (the fused delta-rule decode step's), ``gemv_kernels`` (the fused route's
    projection kernels, ``deltanet.ops.decode_linear``) and ``attention_kernels`` (the fused
    attention step's main kernel, ``deltanet.ops.decode_attention``; its combine kernel is counted
    in ``kernels`` only). The static cache matters for attention layers: a growing cache takes the
    eager attention core. ``decode_kernel``: the route to count (the model's is restored)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from deltanet.models import set_decode_kernel
    from deltanet.models.cuda_graph import DecodeGraph

    device = next(model.parameters()).device
    saved = model.config.decode_kernel
    if decode_kernel is not None:
        set_decode_kernel(model, decode_kernel)
    try:
        g = torch.Generator(device=device).manual_seed(1)
        ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device=device, generator=g)
        with torch.no_grad():
            cache = model(ids, use_cache=True).cache
            step = DecodeGraph(model, cache)
            step.ids.copy_(ids[:, -1:])
            step._step()  # warm-up: compiles the step's kernels (never captured here)
            _sync(device)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step._step()
                _sync(device)
        names = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    finally:
        set_decode_kernel(model, saved)
    return dict(kernels=len(names), fused_kernels=sum("decode_step_kernel" in n for n in names),
                gemv_kernels=sum("decode_linear_kernel" in n for n in names),
                attention_kernels=sum("decode_attention_kernel" in n for n in names))


def copy_bandwidth(device: torch.device, mib: int = 512, iters: int = 10) -> float:
    """Device memory bandwidth in bytes/s from a tensor copy (bytes read + written per second)."""
    x = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        y.copy_(x)
    _sync(device)
    return 2 * x.numel() * iters / (time.perf_counter() - t0)


def weight_bytes_per_step(model) -> int:
    """Parameter bytes a decode step reads: all but the input embedding table (B rows of it are
    gathered), unless it is tied to the LM head (then read in full by the head)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total if emb.data_ptr() == head.data_ptr() else total - emb.numel() * emb.element_size()


def cache_traffic(cache) -> tuple[int, int]:
    """``(bytes held, bytes moved per step)`` of one of our caches (None for others)."""
    from deltanet.models.cache import DeltaNetCache, RecurrentState

    if not isinstance(cache, DeltaNetCache):
        return None, None
    held = moved = 0
    for entry in cache.layers:
        b = sum(t.numel() * t.element_size() for t in entry.tensors())
        held += b
        if isinstance(entry, RecurrentState):
            moved += 2 * b
        elif hasattr(entry, "valid"):  # a static K/V cache: a step needs the keys/values of its valid slots
            kv = sum(t.numel() * t.element_size() for t in (entry.k, entry.v))
            moved += round(kv * entry.valid.float().mean().item()) + entry.valid.numel() * entry.valid.element_size()
        else:
            moved += b
    return held, moved


def bench_decode(name: str, batch: int, *, prompt: int, new_tokens: int, device: torch.device, path: str = "generate",
                 cuda_graph: bool = True, smoke: bool = False, repeats: int = 1, bandwidth: float | None = None,
                 decode_kernel: str | None = None) -> dict:
    """One row: greedy decoding speed of one model at one batch size along one path (``decode_kernel``:
    the delta-rule layers' decode route, our models only; None: the config's default)."""
    row = dict(model=name, path=path, batch=batch, prompt=prompt, new_tokens=new_tokens)
    if decode_kernel is not None:
        row["decode_kernel"] = decode_kernel
    model = None
    try:
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if decode_kernel is not None and decode_kernel not in DECODE_KERNELS:
            raise ValueError(f"decode_kernel must be one of {DECODE_KERNELS}, got {decode_kernel!r}")
        model = build_model(name, smoke=smoke).to(device=device, dtype=dtype).eval()
        ours = hasattr(model, "cuda_graph_decoding")
        if ours and decode_kernel is not None:
            from deltanet.models import set_decode_kernel

            set_decode_kernel(model, decode_kernel)
        if path == "loop" and not ours:
            raise ValueError(f"{name}: the captured loop runs our models only (use path generate)")
        if ours:
            from deltanet.models import cuda_graph as cg

            model.cuda_graph_decoding = cuda_graph
            row["cuda_graph"] = cuda_graph and device.type in cg.GRAPH_DEVICES
        vocab = model.config.vocab_size
        g = torch.Generator(device=device).manual_seed(0)
        ids = torch.randint(3, vocab, (batch, prompt), device=device, generator=g)
        model.generation_config.eos_token_id = None  # always exactly new_tokens tokens
        gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                   eos_token_id=None, attention_mask=torch.ones_like(ids), return_dict_in_generate=True)

        def run(n: int, model=model, warm: bool = False):
            if path == "loop":
                from deltanet.models.decoding import clear_decode_graphs, decode

                if not warm:  # a first generation of its shape: eager first step and capture timed
                    clear_decode_graphs(model)
                res = decode(model, ids, max_new_tokens=n, cuda_graph=cuda_graph)
                return res.tokens.shape[1], res.prefill_s, res.decode_s, res.cache, res
            _sync(device)
            t0 = time.perf_counter()
            out = model.generate(ids, **{**gen, "max_new_tokens": n, "min_new_tokens": n})
            _sync(device)
            cache = out.get("cache", out.get("past_key_values"))  # transformers renamed the field
            return out.sequences.shape[1] - prompt, None, time.perf_counter() - t0, cache, None

        with torch.no_grad():
            # warm-up at the timed shapes: kernels that compile or autotune per sequence length
            # (fla's prefill) would otherwise be timed
            run(4)
            _sync(device)
            t0 = time.perf_counter()
            model.model(input_ids=ids, use_cache=True)  # the backbone: no [B, T, vocab] logits
            _sync(device)
            prefill_alone = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            best = None
            for _ in range(repeats):
                produced, prefill_s, decode_s, cache, result = run(new_tokens)
                total = decode_s + (prefill_s or 0.0)
                if best is None or total < best[0]:
                    best = (total, prefill_s, decode_s, cache, result)
            warm = None
            if path == "loop" and row.get("cuda_graph"):
                # one more generation of the same shape: it replays the step the last one kept
                _, warm_prefill, warm_decode, _, warm = run(new_tokens, warm=True)
        if produced != new_tokens:
            raise RuntimeError(f"produced {produced} tokens, expected {new_tokens}")
        total, prefill_s, decode_s, cache, result = best  # result: the loop's DecodeResult (None: generate)
        row["prefill_s"] = round(prefill_s if prefill_s is not None else prefill_alone, 4)
        row["total_s"] = round(total, 3)
        row["tokens_per_s"] = round(batch * new_tokens / total, 1)
        # decode alone: the loop times it; for generate, its time less one prefill
        step_s = (decode_s / (new_tokens - 1) if prefill_s is not None
                  else (total - prefill_alone) / max(new_tokens - 1, 1))
        if new_tokens > 1 and step_s > 0:
            row["step_ms"] = round(step_s * 1e3, 3)
            row["decode_tokens_per_s"] = round(batch / step_s, 1)
        if result is not None:
            if result.steady_tokens_per_s is not None:  # the replays alone (no eager first step, no capture)
                row["steady_tokens_per_s"] = round(result.steady_tokens_per_s, 1)
            for key in ("setup_s", "first_step_s", "capture_s"):  # the once-per-generation parts, ms
                if key in result.stats:
                    row[key[:-2] + "_ms"] = round(result.stats[key] * 1e3, 2)
        if warm is not None and warm.stats.get("graph_reused") and new_tokens > 1:
            row["warm_tokens_per_s"] = round(batch * new_tokens / (warm_prefill + warm_decode), 1)
            row["warm_decode_tokens_per_s"] = round(batch * (new_tokens - 1) / warm_decode, 1)
        held, moved = cache_traffic(cache)
        if held is not None:
            row["cache_MiB"] = round(held / 2**20, 2)
            floor_bytes = weight_bytes_per_step(model) + moved
            row["step_floor_ms"] = round(floor_bytes / bandwidth * 1e3, 3) if bandwidth else None
            if bandwidth and "step_ms" in row:
                row["bw_floor_frac"] = round(floor_bytes / bandwidth / step_s, 3)
        if device.type == "cuda":
            row["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if ours:
                counts = count_step_kernels(model, batch=batch)
                row["kernels_per_step"], row["fused_kernels"] = counts["kernels"], counts["fused_kernels"]
                row["gemv_kernels"], row["attention_kernels"] = counts["gemv_kernels"], counts["attention_kernels"]
    except Exception as e:  # OOM, a missing optional package, a kernel error: report, go on
        row["error"] = _error(e)
    finally:
        del model
        _free()
    return row


COLUMNS = ["model", "path", "cuda_graph", "decode_kernel", "batch", "prompt", "new_tokens", "prefill_s", "total_s", "tokens_per_s",
           "decode_tokens_per_s", "steady_tokens_per_s", "warm_tokens_per_s", "warm_decode_tokens_per_s", "setup_ms", "first_step_ms", "capture_ms", "step_ms", "step_floor_ms", "bw_floor_frac", "cache_MiB", "peak_mem_GiB", "kernels_per_step", "fused_kernels",
           "gemv_kernels", "attention_kernels"]


def decode_sweep(models: list[str], paths: list[str], batches: list[int], prompts: list[int], *, new_tokens: int,
                 device: torch.device, cuda_graph: str = "on", smoke: bool = False, repeats: int = 1,
                 hbm_gbps: float | None = None, budget_s: float | None = None, out: str | None = None,
                 env: dict | None = None, decode_kernels: list[str] | None = None) -> tuple[str, list[dict]]:
    """:func:`bench_decode` for every (model, path, graph mode, decode kernel, prompt length, batch);
    ``cuda_graph`` is ``"on"``, ``"off"`` or ``"both"`` (our models on the generate path);
    ``decode_kernels``: routes of the delta-rule decode step (our models; None: the default). Prints each row as a JSON
    line and, with ``out``, rewrites the markdown table (and its JSON) after every row; points that
    start after ``budget_s`` seconds are recorded as skipped. Returns ``(table, rows)``."""
    if cuda_graph not in ("on", "off", "both"):
        raise ValueError(f"cuda_graph must be 'on', 'off' or 'both', got {cuda_graph!r}")
    bad = [x for x in paths if x not in PATHS]
    if bad or not paths:
        raise ValueError(f"paths must be from {PATHS}, got {bad or 'nothing'}")
    start = time.perf_counter()
    env = dict(env or {})
    bandwidth = hbm_gbps * 1e9 if hbm_gbps else None
    if bandwidth is None and device.type == "cuda":
        bandwidth = copy_bandwidth(device)
    env["hbm_GBps"] = round(bandwidth / 1e9, 1) if bandwidth else None

    bad = [x for x in (decode_kernels or []) if x not in DECODE_KERNELS]
    if bad:
        raise ValueError(f"decode_kernels must be from {DECODE_KERNELS}, got {bad}")
    graphs = {"on": [True], "off": [False], "both": [True, False]}[cuda_graph]
    kernels = list(decode_kernels) if decode_kernels else [None]
    points = [(m, path, graph, kern, S, B) for m in models for path in paths
              for graph in (graphs if path == "generate" and m != FLA else [True])
              for kern in (kernels if m != FLA else [None])
              for S in prompts for B in batches if not (m == FLA and path == "loop")]
    title = f"Decoding ({new_tokens} new tokens, greedy, random prompts)"
    rows: list[dict] = []
    for m, path, graph, kern, S, B in points:
        if budget_s is not None and time.perf_counter() - start > budget_s:
            r = dict(model=m, path=path, batch=B, prompt=S, error="skipped: --budget-s spent")
        else:
            r = bench_decode(m, B, prompt=S, new_tokens=new_tokens, device=device, path=path,
                             cuda_graph=graph, smoke=smoke, repeats=repeats, bandwidth=bandwidth, decode_kernel=kern)
        print(json.dumps(r), flush=True)
        rows.append(r)
        if out:
            write_results(out, markdown(title, rows, COLUMNS, env), env, rows)
    return markdown(title, rows, COLUMNS, env), rows
