"""Language-model comparison (``deltanet bench lm``): every model under one training protocol.

For each model (and learning rate) the same ``deltanet train`` loop runs with the same data
spec, tokenizer (one byte-level BPE trained once, reused by every run), data order (seed),
token budget, batch, optimiser and schedule; then the same evaluation: held-out loss,
perplexity and bits per byte at the training length and at 2x and 4x of it (the same tokens,
cut into longer rows: length extrapolation), each with the recall split of ``deltanet eval ppl
--recall-split`` (loss on tokens that complete a bigram seen earlier in the document vs all
other tokens).

Jobs are resumable and results append: ``OUT/results.jsonl`` holds one protocol header line
and one line per finished (model, learning rate); a later call skips finished jobs, resumes a
paused one from its checkpoint, and stops cleanly at ``--budget-s`` (the training loop pauses
with a checkpoint, the schedule untouched). ``OUT/results.md`` and ``OUT/loss_vs_tokens.png``
are rendered from whatever results exist, at the end of every call.

fla's GLA and Mamba2 (``fla-gla``, ``fla-mamba2``) are optional yardsticks, trained through the
same loop; fla is imported only when one of them is asked for.

Examples::

    deltanet bench lm --out lmcmp --data python-site --models deltanet,transformer --budget-s 500
    deltanet bench lm --out lmcmp --models deltanet --lr-grid 5e-4,1e-3,2e-3     # one job per lr
    deltanet bench lm --out lmcmp --render-only
    deltanet bench lm --out /tmp/smoke --scale smoke --data DIR                   # CPU, seconds
"""

from __future__ import annotations

import functools
import json
import math
import platform
import sys
import time
import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["MODELS", "SCALES", "ComparisonConfig", "run_comparison"]


@dataclass(frozen=True)
class ModelSpec:
    key: str
    label: str
    preset: str | None = None  # ours: a 125M preset (the smoke scale shrinks it)
    fla: str | None = None  # a yardstick from fla: "gla" or "mamba2"
    paper_ppl: float | None = None  # the paper's Table 1 (340M params, 15B tokens, WikiText)
    note: str = ""
    doc_mask: bool = True  # packed documents kept apart (cu_seqlens); else rows of [B, T]


MODELS: dict[str, ModelSpec] = {m.key: m for m in (
    ModelSpec("transformer", "Transformer++ (RoPE, SwiGLU)", "transformer-125m", paper_ppl=28.39),
    ModelSpec("deltanet", "DeltaNet", "deltanet-125m", paper_ppl=28.24),
    ModelSpec("linear-attn-plain", "linear attention, paper style (no conv, elu+1, sum norm)",
              "linear-attn-plain-125m"),
    ModelSpec("linear-attn", "linear attention, our mixer (conv, SiLU, L2 norm)", "linear-attn-125m"),
    ModelSpec("hybrid-swa", "DeltaNet + sliding-window attention", "hybrid-swa-125m", paper_ppl=27.06),
    ModelSpec("hybrid-global", "DeltaNet + 2 global attention layers", "hybrid-global-125m", paper_ppl=27.51),
    ModelSpec("gated-deltanet", "Gated DeltaNet (gated delta rule)", "gated-deltanet-125m"),
    ModelSpec("fla-gla", "GLA (fla 0.6)", fla="gla", paper_ppl=28.65),
    # fla's Mamba2 ignores cu_seqlens: fed [B, T] rows, so documents packed in a row see each other
    # (one flattened row would carry its state across unrelated rows); its SSD runs mamba_ssm's
    # Triton kernels (deltanet.bench.mamba_kernels: an installed mamba_ssm or its unbuilt source)
    ModelSpec("fla-mamba2", "Mamba2 (fla 0.6)", fla="mamba2", doc_mask=False,
              note="documents in a packed row are not separated (fla's Mamba2 ignores cu_seqlens); "
                   "not in the paper's table (its Mamba, 28.39, is Mamba 1)"),
)}
OURS = tuple(k for k, m in MODELS.items() if m.fla is None)

# One peak learning rate for every model family: 1e-3 is the common choice for ~125M models on
# short AdamW + cosine runs (GPT-3 Small used 6e-4 at 0.5M-token batches and 300B tokens; a
# 100M-token run of ~760 steps wants the upper end) and what ``deltanet train`` picks for width
# 768. A grid (``--lr-grid``) makes one job per value.
DEFAULT_LR = 1e-3


@dataclass(frozen=True)
class Scale:
    """Shapes and the protocol's defaults for one scale."""

    overrides: dict  # applied to our presets
    fla: dict  # shape of the fla yardsticks: hidden, layers (GLA), mamba2_layers, heads, mlp
    tokens: int
    seq_len: int
    batch_size: int
    grad_accum: int
    vocab_size: int
    eval_tokens: int
    eval_reserve_s: float


SCALES = {
    # ~134M parameters each (deltanet-125m's shape); Mamba2 has no MLP: 23 of its layers match
    # 12 of the others (+1.2%). 16 x 4 x 2048 = 131,072 tokens per step, 763 steps = 100.0M tokens.
    "125m": Scale(overrides={}, fla=dict(hidden=768, layers=12, mamba2_layers=23, heads=4, mlp=2048),
                  tokens=100_000_000, seq_len=2048, batch_size=16, grad_accum=4, vocab_size=32000,
                  eval_tokens=2 * 2**20, eval_reserve_s=75.0),
    # a few seconds on a CPU: checks the tool, not the models
    "smoke": Scale(overrides=dict(hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=64,
                                  sliding_window=16),
                   fla=dict(hidden=64, layers=2, mamba2_layers=2, heads=2, mlp=128),  # fla kernels' minimum dims
                   tokens=6 * 4 * 64, seq_len=64, batch_size=4, grad_accum=1, vocab_size=300,
                   eval_tokens=2 * 4 * 64, eval_reserve_s=0.0),
}
EVAL_MULTIPLES = (1, 2, 4)

# ComparisonConfig fields that default to the scale's value
_SCALE_FIELDS = ("tokens", "seq_len", "batch_size", "grad_accum", "vocab_size", "eval_tokens", "eval_reserve_s")


@dataclass
class ComparisonConfig:
    """One call of the comparison (``deltanet bench lm``'s flags); ``None`` sizes take the scale's
    value (:data:`SCALES`), see :meth:`resolve`."""

    out: Path  # work directory: tokenizer, runs, results, figure
    data: str = "stdlib"
    models: list[str] = field(default_factory=lambda: list(OURS))
    scale: str = "125m"
    tokens: int | None = None  # training tokens per model (rounded up to whole steps)
    seq_len: int | None = None
    batch_size: int | None = None  # sequences per micro-step
    grad_accum: int | None = None
    lr_grid: list[float] | None = None  # peak learning rates, one job each (None: DEFAULT_LR)
    warmup: int | None = None  # warmup steps (None: 5% of the steps)
    vocab_size: int | None = None  # of the shared BPE tokenizer
    tokenizer: str | None = None  # a tokenizer.json or directory instead of training one
    val_fraction: float = 0.05
    eval_tokens: int | None = None  # held-out tokens per evaluation length
    eval_batch_tokens: int = 32768  # tokens per evaluation forward
    budget_s: float = 0.0  # wall-clock budget of this call (0 = none)
    eval_reserve_s: float | None = None  # kept for evaluation when pausing for the budget
    min_train_s: float = 30.0  # don't start a job with less training time left
    seed: int = 0
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # CPU threads (0 = auto)
    cache_dir: Path | None = None  # token cache (None: OUT/tokens)
    render_only: bool = False  # only render results.md and the figure
    # derived by run_comparison
    steps: int = 0
    device_type: str = ""

    def filled(self) -> "ComparisonConfig":
        """A copy with the scale's sizes where ``None``, ``cache_dir`` set and ``tokens`` an int."""
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {sorted(SCALES)}, got {self.scale!r}")
        scale = SCALES[self.scale]
        cfg = dataclasses.replace(self, **{k: getattr(scale, k) for k in _SCALE_FIELDS if getattr(self, k) is None})
        cfg.out, cfg.tokens = Path(cfg.out), int(cfg.tokens)
        cfg.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else cfg.out / "tokens"
        cfg.models = list(cfg.models)
        cfg.lr_grid = sorted(set(cfg.lr_grid)) if cfg.lr_grid else None
        return cfg

    def resolve(self) -> "ComparisonConfig":
        """:meth:`filled`, checked: ValueError naming the field."""
        cfg = self.filled()
        for name in ("tokens", "seq_len", "batch_size", "grad_accum", "vocab_size", "eval_tokens", "eval_batch_tokens"):
            if getattr(cfg, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)}")
        unknown = [m for m in cfg.models if m not in MODELS]
        if unknown or not cfg.models:
            raise ValueError(f"models: unknown {unknown or 'empty list'}; valid: {', '.join(MODELS)}")
        if cfg.lr_grid and min(cfg.lr_grid) <= 0:
            raise ValueError(f"lr_grid values must be > 0, got {cfg.lr_grid}")
        if cfg.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {cfg.device!r}")
        return cfg


def _import_fla(kind: str):
    try:
        import fla.models as fm
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"fla is not installed (needed for fla-{kind}): pip install "
                                  "flash-linear-attention, or on the GPU machine install its wheels "
                                  f"[{e}]") from None
    return fm


def _mamba2_kernels(device_type: str) -> str:
    """Give fla's Mamba2 mamba_ssm's Triton SSD kernels (:mod:`deltanet.bench.mamba_kernels`); on
    CUDA, refuse fla's PyTorch SSD fallback, which cannot train at the comparison's shapes."""
    from deltanet.bench import mamba_kernels

    what = mamba_kernels.enable()
    if device_type == "cuda" and what == mamba_kernels.PYTORCH_FALLBACK:
        raise RuntimeError(
            "fla-mamba2 on a GPU needs mamba_ssm's Triton SSD kernels: install mamba_ssm, or unpack its "
            f"sdist (mamba_ssm-*.tar.gz from PyPI) and set {mamba_kernels.ENV} to the folder; "
            "without them fla falls back to a PyTorch SSD that materialises (batch, chunks, chunk, "
            "chunk, heads, state) products (~100 GB per 16 x 2048 micro-batch at the 125m scale)")
    _log(f"fla-mamba2 SSD: {what}")
    return what


def fla_model(kind: str, shape: dict, vocab_size: int):
    """fla's GLA or Mamba2 causal LM of the scale's shape (fla imported here, on demand)."""
    fm = _import_fla(kind)
    if kind == "gla":  # fla's GLA recipe: expand_k 0.5, expand_v 1, output gate, SwiGLU MLP
        cfg = fm.GLAConfig(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                           num_heads=shape["heads"], intermediate_size=shape["mlp"], vocab_size=vocab_size,
                           tie_word_embeddings=False)
        return fm.GLAForCausalLM(cfg)
    if kind == "mamba2":  # expand 2, head dim 64, state 128, one group: the Mamba-2 paper's small models
        cfg = fm.Mamba2Config(hidden_size=shape["hidden"], num_hidden_layers=shape["mamba2_layers"],
                              head_dim=min(64, shape["hidden"]), state_size=128, expand=2, n_groups=1,
                              vocab_size=vocab_size, tie_word_embeddings=False)
        return fm.Mamba2ForCausalLM(cfg)
    raise ValueError(f"unknown fla model {kind!r}; valid: gla, mamba2")


# -- results file ----------------------------------------------------------------------------
def read_results(path: Path) -> tuple[dict | None, list[dict]]:
    """The protocol header and the other records of a results file (empty if absent)."""
    if not path.is_file():
        return None, []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    header = next((r for r in recs if r.get("type") == "protocol"), None)
    return header, [r for r in recs if r.get("type") != "protocol"]


def _append(path: Path, rec: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()


def _job_id(key: str, lr: float) -> str:
    return f"{key}-lr{lr:g}"


# the header fields that must match for results to sit in one table
_PROTOCOL_KEYS = ("scale", "data", "tokenizer", "seq_len", "tokens_per_step", "steps", "optimizer", "schedule",
                  "seed", "precision", "eval")


def _protocol(cfg: ComparisonConfig, tokenizer, steps: int, tokens_per_step: int) -> dict:
    return {
        "type": "protocol",
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "scale": cfg.scale,
        "data": {"spec": cfg.data, "val_fraction": cfg.val_fraction,
                 "doc_mask": "packed documents kept apart, except models whose result says doc_mask false"},
        "tokenizer": {"kind": ("given by --tokenizer" if cfg.tokenizer else "byte-level BPE trained once on "
                               "the training split") + ", shared by every model",
                      "vocab_size": tokenizer.vocab_size, "fingerprint": tokenizer.fingerprint()},
        "seq_len": cfg.seq_len,
        "tokens_per_step": tokens_per_step,
        "batch": f"{cfg.batch_size} x {cfg.grad_accum} accumulation x {cfg.seq_len} tokens",
        "steps": steps,
        "tokens_per_model": steps * tokens_per_step,
        "optimizer": "AdamW betas (0.9, 0.95), eps 1e-8, weight decay 0.1 (matrices), grad clip 1.0",
        "schedule": f"linear warmup {cfg.warmup} steps, cosine to 0.1 x peak at step {steps}",
        "lr": {"default": DEFAULT_LR, "grid": cfg.lr_grid},
        "seed": cfg.seed,
        "precision": "bf16 autocast on CUDA, fp32 weights" if cfg.device_type == "cuda" else "fp32",
        "eval": {"tokens": cfg.eval_tokens, "lengths": [m * cfg.seq_len for m in EVAL_MULTIPLES],
                 "same_tokens_at_every_length": True,
                 "recall_hit": "target x_i whose bigram (x_{i-1}, x_i) occurred earlier in the same document"},
        "paper": "Yang et al. 2024, Table 1: 340M params / 15B tokens, WikiText perplexity",
    }


def _check_protocol(old: dict, new: dict, path: Path) -> None:
    for k in _PROTOCOL_KEYS:
        if old.get(k) != new.get(k):
            raise ValueError(f"{path} was made under another protocol: {k} is {old.get(k)!r} there, "
                             f"{new.get(k)!r} now; use another --out (or the same settings and tokenizer)")


# -- the jobs --------------------------------------------------------------------------------
def _tokenizer(cfg: ComparisonConfig, out: Path, corpus):
    from deltanet.training.tokenizer import load_tokenizer, make_tokenizer, train_bpe

    tok_dir = out / "tokenizer"
    if cfg.tokenizer:
        tok = make_tokenizer(cfg.tokenizer)
        tok.save(tok_dir)
    elif not (tok_dir / "tokenizer_meta.json").is_file():
        t0 = time.time()
        texts, total = [], 0
        for t in corpus.iter_texts("train"):  # the trainer's cap: 16 MB of training text
            texts.append(t)
            total += len(t)
            if total >= 16_000_000:
                break
        train_bpe(iter(texts), cfg.vocab_size).save(tok_dir)
        _log(f"trained the shared BPE tokenizer ({cfg.vocab_size} tokens) in {time.time() - t0:.1f}s -> {tok_dir}")
    return load_tokenizer(tok_dir), tok_dir


def _eval_tokens(val, cfg: ComparisonConfig):
    """``eval_tokens`` of held-out text as whole blocks of 4 x seq_len tokens spread over the split,
    so every evaluation length sees exactly the same tokens (only the context length differs)."""
    import numpy as np

    from deltanet.training.data import eval_positions

    block = max(EVAL_MULTIPLES) * cfg.seq_len
    n_blocks = len(val) // block
    if n_blocks == 0:
        raise ValueError(f"the held-out split has {len(val)} tokens, fewer than {block} (4 x seq_len)")
    picks = eval_positions(n_blocks, max(1, cfg.eval_tokens // block))
    return np.concatenate([np.asarray(val[i * block:(i + 1) * block]) for i in picks])


def _n_params(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return total, total - model.get_input_embeddings().weight.numel()


def _curve(run_dir: Path) -> tuple[list, list]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [(r["tokens"], round(r["loss"], 4)) for r in recs if "tokens" in r and math.isfinite(r.get("loss", math.nan))]
    stride = max(1, len(train) // 300)
    train = train[::stride] + ([train[-1]] if train and (len(train) - 1) % stride else [])
    per_step = recs[0]["tokens"] // recs[0]["step"] if recs and "tokens" in recs[0] else 0
    val = [(r["step"] * per_step, round(r["val_loss"], 4)) for r in recs if "val_loss" in r]
    return train, val


def _run_job(spec: ModelSpec, lr: float, cfg: ComparisonConfig, scale: Scale, tok_dir: Path, tokenizer, eval_tokens,
             stop_at: float | None) -> dict | None:
    """Train (or resume) one job, evaluate it, return its result record; None if paused."""
    import torch

    from deltanet.evaluation.perplexity import evaluate
    from deltanet.training.checkpoint import find_checkpoint, list_checkpoints, load_model
    from deltanet.training.config import RunConfig
    from deltanet.training.trainer import train

    run_dir = cfg.out / "runs" / _job_id(spec.key, lr)
    factory = None
    kernels = None
    if spec.fla:
        _import_fla(spec.fla)  # fail now (fla missing) rather than after start-up
        if spec.fla == "mamba2":
            kernels = _mamba2_kernels(cfg.device_type)
        factory = functools.partial(fla_model, spec.fla, scale.fla)  # called with the vocabulary size
    run_cfg = RunConfig.from_dict({
        "data": {"data": cfg.data, "tokenizer": str(tok_dir), "seq_len": cfg.seq_len, "val_fraction": cfg.val_fraction,
                 "cache_dir": str(cfg.cache_dir), "doc_mask": spec.doc_mask},
        "optim": {"lr": lr, "warmup": cfg.warmup, "min_lr_ratio": 0.1, "weight_decay": 0.1, "beta1": 0.9,
                  "beta2": 0.95, "grad_clip": 1.0},
        "train": {"preset": spec.preset or f"fla-{spec.fla}", "model": dict(scale.overrides) if spec.preset else {},
                  "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "max_steps": cfg.steps,
                  "eval_every": max(1, cfg.steps // 10), "eval_batches": 4, "log_every": max(1, cfg.steps // 400),
                  "out": str(run_dir), "resume": bool(list_checkpoints(run_dir)), "seed": cfg.seed,
                  "compile": cfg.compile, "device": cfg.device, "sample_tokens": 0, "progress": False,
                  "threads": cfg.threads},
    })
    done = 0
    if list_checkpoints(run_dir):
        done = json.loads((find_checkpoint(run_dir) / "trainer_state.json").read_text())["step"]
    t0 = time.time()
    if done < cfg.steps:
        _log(f"[{_job_id(spec.key, lr)}] {'resuming at step ' + str(done) if done else 'training'} "
             f"({cfg.steps} steps)")
        res = train(run_cfg, model_factory=factory, stop_at=stop_at)
        if res.interrupted:
            _log(f"[{_job_id(spec.key, lr)}] paused at step {res.step}/{cfg.steps} (budget); run again to resume")
            return None
    train_s = time.time() - t0
    device = torch.device("cuda" if cfg.device_type == "cuda" else "cpu")
    ckpt = find_checkpoint(run_dir)
    if factory is None:
        model = load_model(ckpt, device)
    else:
        from safetensors.torch import load_model as load_weights

        model = factory(tokenizer_vocab(ckpt))
        load_weights(model, str(ckpt / "model.safetensors"))
        model = model.to(device)
    n_params, n_body = _n_params(model)
    amp = torch.bfloat16 if device.type == "cuda" else None
    evals = {}
    for m in EVAL_MULTIPLES:
        L = m * cfg.seq_len
        evals[str(L)] = evaluate(model, tokenizer, eval_tokens, seq_len=L,
                                 batch_size=max(1, cfg.eval_batch_tokens // L), device=device,
                                 doc_mask=spec.doc_mask, recall_split=True, autocast_dtype=amp)
    del model
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps_logged = [r for r in recs if "tok_per_s" in r]
    tps = sorted(r["tok_per_s"] for r in steps_logged[len(steps_logged) // 10:])  # after warm-up
    train_curve, val_curve = _curve(run_dir)
    return {
        "type": "result", "model": spec.key, "label": spec.label, "lr": lr, "preset": spec.preset,
        "fla": spec.fla, "doc_mask": spec.doc_mask, "params": n_params, "params_without_input_embedding": n_body,
        "steps": cfg.steps, "tokens": cfg.steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len,
        "train_elapsed_s": round(max((r.get("elapsed_s", 0) for r in recs), default=0.0), 1),
        "tok_per_s_median": tps[len(tps) // 2] if tps else None, "eval_s": round(time.time() - t0 - train_s, 1),
        "eval": evals, "train_curve": train_curve, "val_curve": val_curve,
        "note": spec.note + (f"; SSD: {kernels}" if kernels else ""),
        "device": _device_name(device), "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }


def tokenizer_vocab(ckpt: Path) -> int:
    """The (padded) vocabulary a checkpoint was trained with, from its saved config."""
    return int(json.loads((ckpt / "config.json").read_text())["vocab_size"])


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()})"


def _log(msg: str) -> None:
    print(f"[bench lm] {msg}", file=sys.stderr, flush=True)


def run_comparison(cfg: ComparisonConfig) -> int:
    """Run the jobs that fit the budget, append their results, render the table and figure.

    Returns 0, or 1 when a job failed (recorded in the results file; the others went on)."""
    from deltanet.bench.lm_report import render

    t_start = time.time()
    cfg = cfg.resolve()  # a copy: the steps and device derived below don't touch the caller's
    out: Path = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    if cfg.render_only:
        render(out)
        return 0
    import torch

    from deltanet.training.data import build_token_cache, open_corpus
    from deltanet.training.distributed import configure_cpu_threads

    cfg.device_type = "cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    if cfg.device_type == "cpu":
        configure_cpu_threads(cfg.threads)
    corpus = open_corpus(cfg.data, cfg.val_fraction)
    tokenizer, tok_dir = _tokenizer(cfg, out, corpus)
    t0 = time.time()
    cache = build_token_cache(corpus, tokenizer, cfg.cache_dir)
    m = cache.meta
    _log(f"data {cfg.data}: {m['train_tokens']:,} train / {m['val_tokens']:,} held-out tokens "
         f"[{time.time() - t0:.1f}s]")
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    cfg.steps = math.ceil(cfg.tokens / tokens_per_step)
    if cfg.warmup is None:
        cfg.warmup = max(1, round(0.05 * cfg.steps))
    if m["train_tokens"] < cfg.steps * tokens_per_step:
        _log(f"note: {cfg.steps * tokens_per_step:,} tokens per model is "
             f"{cfg.steps * tokens_per_step / max(1, m['train_tokens']):.1f} epochs of the training split")
    eval_tokens = _eval_tokens(cache.tokens("val"), cfg)
    header = _protocol(cfg, tokenizer, cfg.steps, tokens_per_step)
    old, records = read_results(results_path)
    if old is None:
        _append(results_path, header)
    else:
        _check_protocol(old, header, results_path)
    finished = {(r["model"], r["lr"]) for r in records if r.get("type") == "result"}
    deadline = t_start + cfg.budget_s if cfg.budget_s else None
    failures = 0
    for key in cfg.models:
        spec = MODELS[key]
        for lr in cfg.lr_grid or [DEFAULT_LR]:
            job = _job_id(key, lr)
            if (key, lr) in finished:
                _log(f"[{job}] done already: skipped")
                continue
            left = deadline - time.time() if deadline else math.inf
            if left < cfg.eval_reserve_s + cfg.min_train_s:
                _log(f"[{job}] not started: {left:.0f}s of the budget left")
                render(out)
                return 0
            stop_at = deadline - cfg.eval_reserve_s if deadline else None
            try:
                rec = _run_job(spec, lr, cfg, SCALES[cfg.scale], tok_dir, tokenizer, eval_tokens, stop_at)
            except ModuleNotFoundError as e:
                _log(f"[{job}] skipped: {e}")
                failures += 1
                continue
            except Exception as e:  # record and go on with the next model (OOM, a foreign model's bug)
                failures += 1
                msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
                _log(f"[{job}] failed: {msg}")
                _append(results_path, {"type": "error", "model": key, "lr": lr, "error": msg,
                                       "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")})
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            if rec is None:  # paused by the budget
                render(out)
                return 0
            _append(results_path, rec)
            e = rec["eval"][str(cfg.seq_len)]
            _log(f"[{job}] {rec['params']:,} params: held-out loss {e['loss']:.4f}, ppl {e['ppl']:.2f}, "
                 f"{e['bpb']:.4f} bits/byte")
    render(out)
    return 1 if failures else 0
