"""Shared machinery of the synthetic tasks (MQAR, state tracking): models, training, reporting.

A synthetic task is a pair of int64 tensors ``(inputs, targets)`` of shape ``[N, T]``;
``targets[b, t]`` is the token the model must predict from its output at position ``t`` (no
shift: unlike LM labels the targets are already aligned) or ``IGNORE_INDEX``. The loss and
the accuracy only look at the non-ignored positions.

Example::

    >>> import torch
    >>> from deltanet.evaluation.tasks.synthetic import TrainConfig, build_model, train_and_evaluate
    >>> x = torch.randint(0, 8, (64, 16)); y = x.clone()           # copy task
    >>> model = build_model("delta_net", width=32, num_layers=1, vocab_size=8)
    >>> run = train_and_evaluate(model, (x, y), (x, y), TrainConfig(lr=3e-3, epochs=2, batch_size=16))
    >>> 0.0 <= run.final_accuracy <= 1.0
    True
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from deltanet.training.core import (AdamWConfig, CapturedStep, LRSchedule, amp_dtype, autocast, build_adamw,
                                    cuda_graph_unsupported, set_lr, train_step)

__all__ = [
    "IGNORE_INDEX", "MODEL_PATTERNS", "TrainConfig", "RunResult", "layer_types_for",
    "build_model", "masked_accuracy", "train_and_evaluate", "fixed_target_positions", "format_table",
    "plot_accuracy_vs_width", "plot_learning_curves", "resolve_device",
]

IGNORE_INDEX = -100


# Our pattern names -> deltanet.models.presets patterns (one source of truth for the hybrids:
# sliding-window attention every other layer; full attention at the second and middle layer).
_PRESET_PATTERN = {
    "delta_net": "delta",
    "linear_attention": "linear",
    "full_attention": "attention",
    "hybrid-swa": "swa_alternate",
    "hybrid-global": "global_two",
    "gated_delta_net": "gated_delta",
    "gated_delta_product": "gated_product",
    "delta_product": "product",
}
# Ablations of the mixer, named "<pattern>-<variant>": the same layer pattern with config
# overrides. "noconv" drops the short causal convolution on q, k, v (the paper's DeltaNet keeps
# it; Zoology/Based show it is what lets linear attention recall), "plain" is the Katharopoulos
# form of linear attention: no short conv, elu + 1 feature map, sum-normalised q and k.
_VARIANTS: dict[str, dict] = {
    "noconv": {"use_short_conv": False},
    "plain": {"use_short_conv": False, "qk_activation": "elu", "qk_norm": "sum"},
    # DeltaProduct with n_h Householder steps per token ("gated_delta_product-nh2", ...; without
    # the forget gate: "delta_product-nh2", ...)
    **{f"nh{n}": {"num_householder": n} for n in (1, 2, 3, 4)},
    # Gated DeltaNet's two initial-state choices that stalled small MQAR models
    # (benchmarks/results/2026-12-06-cpu-mqar-gated.md): "sigmoid" gates the output with
    # sigmoid(W_g x) (starts near 0.5) instead of silu(W_g x) (starts near W_g x / 2, random
    # sign); "slowdecay" draws the decay rate A ~ U(0, 0.16) instead of U(0, 16) (100x weaker:
    # initial half-lives of 40+ tokens instead of a median of ~11).
    "sigmoid": {"output_gate_activation": "sigmoid"},
    "slowdecay": {"A_init_range": (0.0, 0.16)},
    "sigmoid+slowdecay": {"output_gate_activation": "sigmoid", "A_init_range": (0.0, 0.16)},
}
_VARIANT_PATTERNS = ("delta_net-noconv", "linear_attention-noconv", "linear_attention-plain",
                     *(f"{base}-nh{n}" for base in ("gated_delta_product", "delta_product") for n in (1, 2, 3, 4)),
                     *(f"gated_delta_net-{v}" for v in ("sigmoid", "slowdecay", "sigmoid+slowdecay")))
MODEL_PATTERNS: tuple[str, ...] = (*_PRESET_PATTERN, "sliding_attention", *_VARIANT_PATTERNS)


def _split_variant(pattern: str) -> tuple[str, dict]:
    """``"linear_attention-plain"`` -> ``("linear_attention", {config overrides})``."""
    if pattern in _VARIANT_PATTERNS:
        base, _, variant = pattern.rpartition("-")
        return base, dict(_VARIANTS[variant])
    return pattern, {}


def layer_types_for(pattern: str, num_layers: int) -> list[str]:
    """The ``layer_types`` list of a named model pattern.

    >>> layer_types_for("hybrid-swa", 4)
    ['delta_net', 'sliding_attention', 'delta_net', 'sliding_attention']
    >>> layer_types_for("hybrid-global", 6)
    ['delta_net', 'full_attention', 'delta_net', 'full_attention', 'delta_net', 'delta_net']
    >>> layer_types_for("linear_attention-plain", 2)
    ['linear_attention', 'linear_attention']
    """
    from deltanet.models.presets import layer_types_for as preset_layer_types

    if pattern not in MODEL_PATTERNS:
        raise ValueError(f"pattern must be one of {list(MODEL_PATTERNS)}, got {pattern!r}")
    pattern = _split_variant(pattern)[0]
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if pattern == "sliding_attention":
        return ["sliding_attention"] * num_layers
    return preset_layer_types(_PRESET_PATTERN[pattern], num_layers)


def build_model(
    pattern: str,
    *,
    width: int,
    num_layers: int,
    vocab_size: int,
    head_dim: int = 64,
    sliding_window: int = 64,
    max_len: int | None = None,
    **config_overrides,
) -> torch.nn.Module:
    """A freshly initialised ``DeltaNetForCausalLM`` of the given pattern and size.

    ``num_heads = max(1, width // head_dim)``. Extra keyword arguments go to
    ``DeltaNetConfig`` (e.g. ``allow_neg_eigval=True``) and win over a variant's overrides
    (``"linear_attention-plain"``: no short conv, elu + 1, sum norm). Seed torch before calling
    for a reproducible initialisation.
    """
    from deltanet.models import DeltaNetConfig, DeltaNetForCausalLM

    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    num_heads = max(1, width // head_dim)
    if width % num_heads:
        raise ValueError(f"width ({width}) must be divisible by the number of heads ({num_heads})")
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=width, num_hidden_layers=num_layers,
        num_heads=num_heads, layer_types=layer_types_for(pattern, num_layers),
        sliding_window=sliding_window,
        # Synthetic vocabularies have no special tokens (the defaults 1 / 2 would fall outside
        # a parity vocabulary of 2 and make transformers warn).
        bos_token_id=None, eos_token_id=None,
    )
    if max_len is not None:
        kwargs["max_position_embeddings"] = max(max_len, 2048)
    kwargs.update(_split_variant(pattern)[1])
    kwargs.update(config_overrides)
    return DeltaNetForCausalLM(DeltaNetConfig(**kwargs))


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available")
    return dev


@dataclass
class TrainConfig:
    """How one synthetic-task run trains. ``epochs`` may be fractional."""

    lr: float = 1e-3
    epochs: float = 1.0
    max_steps: int | None = None  # cap on optimizer steps (wins over epochs when smaller)
    time_budget: float | None = None  # seconds of training (evaluation excluded)
    batch_size: int = 64
    eval_every: int = 100
    eval_batch_size: int = 256
    stop_accuracy: float | None = None  # stop once held-out accuracy >= this
    schedule: str = "cosine"  # "cosine" decays to 0 over the planned steps; "constant"
    warmup_steps: int | None = None  # default: 10% of planned steps, at most 500
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    # Replay the whole training step (forward, backward, clipping, AdamW) as one CUDA graph:
    # small models are launch-bound, and a replay costs one launch instead of hundreds. Needs
    # CUDA, the training data on the device and the same number of targets in every row (MQAR);
    # anything else, a failed capture or a replay that disagrees with an eager step falls back
    # to eager training (``RunResult.step_mode`` says which ran, and why).
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        for name in ("batch_size", "eval_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time_budget must be > 0 seconds, got {self.time_budget}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.stop_accuracy is not None and not 0 < self.stop_accuracy <= 1:
            raise ValueError(f"stop_accuracy must be in (0, 1], got {self.stop_accuracy}")


@dataclass
class RunResult:
    """Outcome of one run. ``curve`` rows: step, seconds (training only), loss, accuracy."""

    best_accuracy: float
    final_accuracy: float
    steps: int
    seconds: float
    steps_to_99: int | None
    seconds_to_99: float | None
    stopped_by: str  # "steps" | "time_budget" | "stop_accuracy" | "diverged"
    curve: list[dict] = field(default_factory=list)
    step_mode: str = "eager"  # "cuda_graph", "eager", or "eager (why the graph was not used)"

    def to_dict(self) -> dict:
        return asdict(self)


def target_logits(model: torch.nn.Module, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits ``[n_targets, vocab]`` at the positions where ``mask`` is true.

    Runs the decoder and applies the LM head only to the selected hidden states: MQAR has
    P targets among T positions, so this saves most of the ``T × vocab`` head (at T=512,
    vocab 8192 the full logits of a batch of 64 are 1 GiB in float32). The boolean
    selection synchronises CUDA once per step; for these launch-bound small models that
    costs little next to the head it saves.
    """
    hidden = model.get_decoder()(input_ids=inputs, use_cache=False).last_hidden_state  # [B, T, D]
    return model.get_output_embeddings()(hidden[mask])


@torch.no_grad()
def masked_accuracy(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    per_position: bool = False,
) -> float | tuple[float, torch.Tensor]:
    """Fraction of non-ignored targets predicted exactly (argmax over the vocabulary).

    With ``per_position=True`` also returns the accuracy at each position ``[T]`` (NaN where
    a position never has a target), used by the length-generalisation tables.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = torch.zeros(targets.shape[1], dtype=torch.float64)
    count = torch.zeros(targets.shape[1], dtype=torch.float64)
    for i in range(0, inputs.shape[0], batch_size):
        x = inputs[i : i + batch_size].to(device).long()
        y = targets[i : i + batch_size].to(device).long()
        mask = y != IGNORE_INDEX
        with _autocast(device):
            pred = target_logits(model, x, mask).argmax(-1)
        hit = torch.zeros_like(y, dtype=torch.float64)
        hit[mask] = (pred == y[mask]).double()
        correct += hit.sum(0).cpu()
        count += mask.sum(0).double().cpu()
    model.train(was_training)
    acc = float(correct.sum() / count.sum().clamp_min(1))
    if per_position:
        return acc, correct / count
    return acc


def _autocast(device: torch.device):
    # bf16 autocast on CUDA (what the GPU runs use); plain fp32 on CPU, where bf16 matmuls are
    # slow and the tests want exact reproducibility. No cast cache: CUDA graph capture needs
    # that, and these small models use each weight once per forward anyway.
    return autocast(device, amp_dtype(device), cache=False)


# AdamW betas of the synthetic-task runs (``deltanet train`` uses (0.9, 0.95)); kept as they were
# when the sweeps' published numbers were made.
_BETAS = (0.9, 0.98)
# A graph is captured after this many eager steps (compilation, autotuning, optimizer state).
_GRAPH_WARMUP = 3


def fixed_target_positions(targets: torch.Tensor) -> torch.Tensor | None:
    """``[N, P]`` positions of the targets when every row has the same number ``P`` of them
    (MQAR: one per key), else ``None``.

    With them a batch's target states are a fixed-shape gather instead of a boolean selection:
    no CUDA synchronisation per step, and the step can be captured as a CUDA graph. The order
    (row by row, left to right) is the boolean selection's, so the loss is the same.

    >>> fixed_target_positions(torch.tensor([[-100, 3, -100, 4], [5, -100, 6, -100]]))
    tensor([[1, 3],
            [0, 2]])
    >>> fixed_target_positions(torch.tensor([[-100, 3], [5, 6]])) is None
    True
    """
    mask = targets != IGNORE_INDEX
    counts = mask.sum(1)
    if counts.numel() == 0:
        return None
    p = int(counts[0])
    if p == 0 or not bool((counts == p).all()):
        return None
    return mask.nonzero()[:, 1].view(targets.shape[0], p)


def train_and_evaluate(
    model: torch.nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    cfg: TrainConfig,
    *,
    on_eval: Callable[[dict], None] | None = None,
) -> RunResult:
    """Train ``model`` with AdamW on the masked cross-entropy and evaluate on ``test``.

    Evaluates every ``cfg.eval_every`` steps and at the end; stops at the planned number of
    steps, at ``cfg.time_budget`` seconds of training, at ``cfg.stop_accuracy`` or on a
    non-finite loss. Deterministic on CPU for a given ``cfg.seed`` and model initialisation.
    With ``cfg.cuda_graph`` the step is replayed as a CUDA graph where possible (see
    ``TrainConfig``).
    """
    xtr, ytr = train
    xte, yte = test
    if xtr.shape != ytr.shape or xte.shape != yte.shape:
        raise ValueError(
            f"inputs and targets must have the same shape, got train {tuple(xtr.shape)} vs "
            f"{tuple(ytr.shape)}, test {tuple(xte.shape)} vs {tuple(yte.shape)}"
        )
    if xtr.device != ytr.device:
        raise ValueError(f"train inputs and targets must be on one device, got {xtr.device} and {ytr.device}")
    device = resolve_device(cfg.device)
    model.to(device).train()

    n = xtr.shape[0]
    bs = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // bs)  # drop the last partial batch: constant batch shape
    total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(500, max(1, total // 10))
    schedule = LRSchedule(cfg.lr, total, warmup, min_ratio=0.0, shape=cfg.schedule)

    # Why a CUDA graph cannot be used here (None: it can be tried).
    tpos = fixed_target_positions(ytr)  # lives with the data, like the permutation below
    why_not = None
    if cfg.cuda_graph:
        why_not = cuda_graph_unsupported(device)
        if why_not is None and xtr.device != device:
            why_not = "cuda_graph needs the training data on the device"
        elif why_not is None and tpos is None:
            why_not = "cuda_graph needs the same number of targets in every row"
    graph = cfg.cuda_graph and why_not is None

    # Under a graph the learning rate is a device tensor that set_lr fills in place.
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_adamw(params, AdamWConfig(lr=schedule.lr(0), weight_decay=cfg.weight_decay, betas=_BETAS),
                      device=device, capturable=graph)

    gen = torch.Generator().manual_seed(cfg.seed)
    # The permutation lives with the data: indexing device-resident data with a CPU index
    # would copy it host-to-device, and synchronise, every step.
    perm = torch.randperm(n, generator=gen).to(xtr.device)
    pos = 0
    # The batch's row indices: the graph reads them from this buffer, eager steps too.
    idx_buf = torch.zeros(bs, dtype=torch.long, device=xtr.device)

    def next_batch() -> None:
        nonlocal perm, pos
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=gen).to(xtr.device), 0
        idx_buf.copy_(perm[pos : pos + bs])
        pos += bs

    def batch_loss(_: int) -> torch.Tensor:
        # .long(): callers may keep the data compact (int16 on the GPU for 100k x 512 MQAR).
        x = xtr[idx_buf].to(device, non_blocking=True).long()
        y = ytr[idx_buf].to(device, non_blocking=True).long()
        if tpos is None:
            mask = y != IGNORE_INDEX
            with _autocast(device):
                logits = target_logits(model, x, mask)
            return F.cross_entropy(logits.float(), y[mask])
        at = tpos[idx_buf].to(device, non_blocking=True)  # [B, P]: fixed shape, no sync
        with _autocast(device):
            hidden = model.get_decoder()(input_ids=x, use_cache=False).last_hidden_state
            hidden = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))
            logits = model.get_output_embeddings()(hidden)
        return F.cross_entropy(logits.float().flatten(0, 1), y.gather(1, at).flatten())

    def body() -> torch.Tensor:  # the step; CapturedStep zeroes the gradients before eager ones
        return train_step(opt, params, batch_loss, grad_clip=cfg.grad_clip, measure_norm=False, zero_grad=False).loss

    run_step = CapturedStep(body, opt=opt, params=params, device=device, graph=graph, warmup=_GRAPH_WARMUP)
    curve: list[dict] = []
    best, steps_to_99, seconds_to_99 = 0.0, None, None
    train_seconds, step, stopped_by = 0.0, 0, "steps"
    loss_acc, loss_n = 0.0, 0

    def evaluate() -> float:
        nonlocal best, steps_to_99, seconds_to_99
        acc = masked_accuracy(model, xte, yte, batch_size=cfg.eval_batch_size, device=device)
        row = {"step": step, "seconds": round(train_seconds, 3),
               "loss": float(loss_acc) / loss_n if loss_n else None, "accuracy": acc}
        curve.append(row)
        if on_eval is not None:
            on_eval(row)
        best = max(best, acc)
        if steps_to_99 is None and acc >= 0.99:
            steps_to_99, seconds_to_99 = step, round(train_seconds, 3)
        return acc

    t0 = time.perf_counter()
    while step < total:
        set_lr(opt, schedule.lr(step))
        next_batch()
        loss = run_step()
        step += 1
        # Accumulate on the device: a float() per step would synchronise CUDA every step.
        # (The sum is a new tensor: the graph's static loss is overwritten by the next replay.)
        loss_acc = loss_acc + loss.detach()
        loss_n += 1
        now = time.perf_counter()
        train_seconds += now - t0
        t0 = now
        if step % cfg.eval_every == 0 or step == total:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                train_seconds += time.perf_counter() - t0
            acc = evaluate()
            t0 = time.perf_counter()  # evaluation time is not training time
            if curve[-1]["loss"] is not None and not math.isfinite(curve[-1]["loss"]):
                stopped_by = "diverged"
                break
            loss_acc, loss_n = 0.0, 0
            if cfg.stop_accuracy is not None and acc >= cfg.stop_accuracy:
                stopped_by = "stop_accuracy"
                break
        if cfg.time_budget is not None and train_seconds >= cfg.time_budget:
            stopped_by = "time_budget"
            break
    if not curve or curve[-1]["step"] != step:
        evaluate()
    return RunResult(
        best_accuracy=best, final_accuracy=curve[-1]["accuracy"], steps=step,
        seconds=round(train_seconds, 3), steps_to_99=steps_to_99, seconds_to_99=seconds_to_99,
        stopped_by=stopped_by, curve=curve,
        step_mode=f"eager ({why_not})" if why_not else run_step.mode,
    )


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with columns padded for reading in a terminal.

    >>> print(format_table(["a", "bb"], [["1", "2"]]))
    | a | bb |
    |---|----|
    | 1 | 2  |
    """
    cols = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, cols)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in cols) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: runs write PNGs, never open windows
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_width(
    results: Iterable[dict],
    path: Path,
    *,
    panel_key: Callable[[dict], str],
    title: str = "",
) -> None:
    """One panel per setting, x = model width (log2), y = accuracy, one line per model.

    The layout of the Zoology / DeltaNet MQAR figures. ``results`` are dicts with ``model``,
    ``width`` and ``best_accuracy`` (one per model and width: already the best over lrs).
    """
    plt = _pyplot()
    results = list(results)
    panels = list(dict.fromkeys(panel_key(r) for r in results))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.6),
                             squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels):
        rows = [r for r in results if panel_key(r) == panel]
        for model in dict.fromkeys(r["model"] for r in rows):
            pts = sorted((r["width"], r["best_accuracy"]) for r in rows if r["model"] == model)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=model)
        ax.set_xscale("log", base=2)
        widths = sorted({r["width"] for r in rows})
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("model width")
        ax.set_title(panel, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_learning_curves(results: Iterable[dict], path: Path, *, label: Callable[[dict], str]) -> None:
    """Held-out accuracy vs training seconds, one line per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in results:
        c = r["curve"]
        ax.plot([p["seconds"] for p in c], [p["accuracy"] for p in c], label=label(r))
    ax.set_xlabel("training seconds")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
