"""The training core shared by ``deltanet train`` and the synthetic-task sweeps (MQAR, state
tracking): AdamW with weight decay on matrices only, the warm-up + cosine schedule, autocast by
device, gradient clipping, one training step with gradient accumulation, and the CUDA-graph
replay of a whole step.

Each caller keeps its own numbers as explicit values (``deltanet train``: betas (0.9, 0.95),
cosine to 10% of the peak, bf16 autocast with the cast cache; the synthetic tasks: betas
(0.9, 0.98), cosine to 0, no cast cache so that a step can be captured).

    >>> import torch
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = build_adamw(model.parameters(), AdamWConfig(lr=1e-2, weight_decay=0.1), device=torch.device("cpu"))
    >>> sched = LRSchedule(peak=1e-2, total_steps=10, warmup=2)
    >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
    >>> for step in range(10):
    ...     set_lr(opt, sched.lr(step))
    ...     out = train_step(opt, model.parameters(), lambda m: torch.nn.functional.mse_loss(model(x), y), grad_clip=1.0)
    >>> out.loss.shape, out.grad_norm.shape
    (torch.Size([]), torch.Size([]))
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ContextManager

import torch

__all__ = [
    "AdamWConfig", "LRSchedule", "StepOutput", "CapturedStep", "lr_at", "decay_groups", "build_adamw", "set_lr",
    "amp_dtype", "autocast", "clip_grads", "train_step", "cuda_graph_unsupported",
]


# --------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up over ``warmup`` steps to ``peak``, then ``shape``: ``"cosine"`` decays to
    ``min_ratio * peak`` at ``total_steps``, ``"constant"`` stays at ``peak``.

    >>> s = LRSchedule(peak=1.0, total_steps=10, warmup=2, min_ratio=0.1)
    >>> [round(s.lr(t), 3) for t in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.55, 0.1]
    """

    peak: float
    total_steps: int
    warmup: int = 0
    min_ratio: float = 0.0
    shape: str = "cosine"

    def __post_init__(self) -> None:
        if not self.peak > 0:
            raise ValueError(f"peak must be > 0, got {self.peak}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in [0, 1], got {self.min_ratio}")
        if self.shape not in ("cosine", "constant"):
            raise ValueError(f"shape must be 'cosine' or 'constant', got {self.shape!r}")

    def factor(self, step: int, progress: float | None = None) -> float:
        """The multiplier of ``peak`` at ``step``. ``progress`` (0..1) replaces the step-based
        position after warm-up (``deltanet train`` with a wall-clock budget)."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.shape == "constant":
            return 1.0
        frac = (step - self.warmup) / max(1, self.total_steps - self.warmup) if progress is None else progress
        frac = min(max(frac, 0.0), 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    def lr(self, step: int, progress: float | None = None) -> float:
        # peak * factor, not peak * (step + 1) / warmup: the last warm-up step is then exactly peak
        return self.peak * self.factor(step, progress)


def lr_at(step: int, max_steps: int, lr: float, warmup: int, min_ratio: float, progress: float | None = None) -> float:
    """``LRSchedule(lr, max_steps, warmup, min_ratio).lr(step, progress)``: warm-up, then cosine.

    >>> [round(lr_at(s, 10, 1.0, 2, 0.1), 3) for s in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.55, 0.1]
    """
    return LRSchedule(lr, max_steps, warmup, min_ratio).lr(step, progress)


# --------------------------------------------------------------------------------------------
# Optimiser
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdamWConfig:
    """AdamW's numbers. ``lr`` is the starting value; a schedule overwrites it through :func:`set_lr`."""

    lr: float
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if not self.lr >= 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two values in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")


def decay_groups(params: Iterable[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Two parameter groups: matrices (and higher) decay, vectors and scalars (norm gains,
    biases) do not. Parameters that need no gradient are left out; order is kept."""
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build_adamw(params: Iterable[torch.nn.Parameter], cfg: AdamWConfig, *, device: torch.device,
                capturable: bool = False) -> torch.optim.AdamW:
    """AdamW over :func:`decay_groups`; fused on CUDA. ``capturable=True`` (a CUDA-graph step)
    keeps the learning rate in a device tensor per group, which :func:`set_lr` fills in place,
    so a replayed ``step()`` reads the current value."""
    groups = decay_groups(params, cfg.weight_decay)
    if capturable:
        for g in groups:
            g["lr"] = torch.tensor(cfg.lr, device=device)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             fused=device.type == "cuda" or capturable,
                             **({"capturable": True} if capturable else {}))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate (in place where it is a tensor)."""
    for g in opt.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


# --------------------------------------------------------------------------------------------
# Mixed precision
# --------------------------------------------------------------------------------------------


def amp_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype | None:
    """The autocast dtype: ``"auto"`` is bf16 on CUDA and none (float32) elsewhere, where bf16
    matmuls are slow and float32 keeps runs bit-reproducible; ``"bfloat16"`` / ``"float32"`` force it.

    >>> amp_dtype(torch.device("cpu")), amp_dtype(torch.device("cpu"), "bfloat16")
    (None, torch.bfloat16)
    """
    if dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}")
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return torch.bfloat16 if dtype == "bfloat16" else None


def autocast(device: torch.device, dtype: torch.dtype | None, *, cache: bool = True) -> ContextManager:
    """Autocast to ``dtype`` on ``device``; ``None`` runs in the tensors' own dtype, even inside
    an enclosing autocast. ``cache=False`` turns off the cast cache: a CUDA-graph capture needs
    that, and a model that uses each weight once per forward loses nothing."""
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def clip_grads(params: Iterable[torch.Tensor], max_norm: float, *, measure: bool = True) -> torch.Tensor | None:
    """Clip the global gradient norm to ``max_norm`` (``0``: no clipping) and return the norm
    before clipping (``None`` when not clipping and ``measure=False``). Parameters without a
    gradient are skipped."""
    params = [p for p in params if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    elif measure:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    else:
        return None
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor sharded over the ranks
        norm = norm.full_tensor()
    return norm


@dataclass
class StepOutput:
    """What one step returns, as device tensors (reading them synchronises CUDA)."""

    loss: torch.Tensor  # mean of the micro-batch losses, float32
    grad_norm: torch.Tensor | None  # global norm before clipping; None if neither clipped nor measured


def train_step(
    opt: torch.optim.Optimizer,
    params: Iterable[torch.Tensor],
    loss_fn: Callable[[int], torch.Tensor],
    *,
    accum: int = 1,
    grad_clip: float = 0.0,
    sync: Callable[[bool], ContextManager] | None = None,
    measure_norm: bool = True,
    zero_grad: bool = True,
) -> StepOutput:
    """One optimiser step over ``accum`` micro-batches: forward (``loss_fn(m)`` returns the mean
    loss of micro-batch ``m``, its autocast included), backward of ``loss / accum``, clipping,
    ``opt.step()``, then ``opt.zero_grad(set_to_none=True)`` unless ``zero_grad=False`` (a
    captured step, whose gradients are the graph's static buffers). Gradients must be zero or
    ``None`` on entry.

    ``sync(last)`` wraps each micro-batch's forward (distributed training: no gradient
    all-reduce before the last one). ``params`` is read after the backward passes: FSDP2 swaps
    a module's sharded parameters for unsharded ones around forward and backward (and leaves the
    root unsharded after a no-grad forward), so ``model.parameters()`` read before the forward
    can name tensors that end the step without gradients.
    """
    if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
        raise ValueError(f"accum must be a positive int, got {accum!r}")
    total = None
    for m in range(accum):
        with sync(m == accum - 1) if sync is not None else contextlib.nullcontext():
            loss = loss_fn(m)
        if accum > 1:
            loss = loss / accum
        loss.backward()
        if total is None:
            total = torch.zeros((), dtype=torch.float32, device=loss.device)
        total += loss.detach()
    grad_norm = clip_grads(params, grad_clip, measure=measure_norm)
    opt.step()
    if zero_grad:
        opt.zero_grad(set_to_none=True)
    return StepOutput(total, grad_norm)


# --------------------------------------------------------------------------------------------
# The step as a CUDA graph
# --------------------------------------------------------------------------------------------

# Devices where a step is captured (tests widen it to run the machinery on CPU with a stand-in
# for the capture).
_GRAPH_DEVICES: tuple[str, ...] = ("cuda",)


def cuda_graph_unsupported(device: torch.device) -> str | None:
    """Why a step on ``device`` cannot be captured, or ``None`` when it can be tried."""
    if device.type not in _GRAPH_DEVICES:
        return f"cuda_graph needs CUDA, device is {device.type}"
    return None


def _capture(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[Callable[[], None], torch.Tensor]:
    """Capture ``fn()`` (one whole training step) as a CUDA graph -> (replay, static output).

    The caller has already run ``fn`` eagerly a few times (compilation, autotuning and lazy
    optimizer state happen outside the capture)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


class CapturedStep:
    """A training step that is replayed as one CUDA graph after ``warmup`` eager steps.

    Small models are launch-bound: a replay costs one launch instead of hundreds. ``body()``
    is the whole step without zeroing the gradients (``train_step(..., zero_grad=False)``),
    reading its batch from fixed buffers that the caller refills before each call, and returns
    the loss. With ``graph=False`` every call is an eager step (``zero_grad`` then ``body``).

    With ``graph=True`` the optimizer must be capturable (:func:`build_adamw`), the warm-up
    steps run on a side stream (PyTorch's recipe), and the capture is checked: one replay
    against one eager step from the same state. A failed capture, or a replay that disagrees,
    leaves training eager from the eager step's state; :attr:`mode` says which ran, and why.
    """

    def __init__(self, body: Callable[[], torch.Tensor], *, opt: torch.optim.Optimizer,
                 params: list[torch.Tensor], device: torch.device, graph: bool, warmup: int = 3):
        self.body, self.opt, self.params, self.device = body, opt, params, device
        self.graph, self.warmup = graph, warmup
        self.mode = "cuda_graph" if graph else "eager"
        self._calls = 0
        self._graph_ready = False  # from the capture on, the gradients are the graph's static buffers
        self._replay: Callable[[], None] | None = None
        self._static_loss: torch.Tensor | None = None

    def eager(self) -> torch.Tensor:
        # set_to_none=False once a graph exists: its gradients are static buffers
        self.opt.zero_grad(set_to_none=not self._graph_ready)
        return self.body()

    def __call__(self) -> torch.Tensor:
        """Run one step; returns its loss (under a graph: the static output, overwritten by the
        next replay)."""
        calls, self._calls = self._calls, self._calls + 1
        if self._replay is not None:
            self._replay()
            return self._static_loss
        if self.graph and calls == self.warmup:
            return self._capture_step()
        if self.graph and self.device.type == "cuda":
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                loss = self.eager()
            torch.cuda.current_stream(self.device).wait_stream(side)
            return loss
        return self.eager()

    def _capture_step(self) -> torch.Tensor:
        self._graph_ready = True
        try:
            replay, static_loss, loss, why = _capture_checked(self.body, eager_step_fn=self.eager, params=self.params,
                                                              opt=self.opt, device=self.device)
        except Exception as e:  # noqa: BLE001 - any capture failure: train eagerly, say why
            replay, loss, why = None, None, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        if replay is not None:
            self._replay, self._static_loss = replay, static_loss
            return loss
        self.graph = self._graph_ready = False
        self.mode = f"eager (cuda graph failed: {why})"
        self.opt.zero_grad(set_to_none=True)
        if loss is None:  # the capture itself failed: this step is an eager one
            loss = self.eager()
        return loss


def _capture_checked(
    body: Callable[[], torch.Tensor],
    *,
    eager_step_fn: Callable[[], torch.Tensor],
    params: list[torch.Tensor],
    opt: torch.optim.Optimizer,
    device: torch.device,
    loss_rtol: float = 1e-2,
    update_rtol: float = 0.1,
) -> tuple[Callable[[], None] | None, torch.Tensor | None, torch.Tensor, str]:
    """Capture ``body`` (the step without ``zero_grad``) and check one replay against one eager
    step from the same state on the current batch.

    -> ``(replay, static loss, this step's loss, "")`` when they agree: same loss (``loss_rtol``)
    and the same parameter update (relative norm of the difference <= ``update_rtol``; bf16 and
    atomics make it inexact); the replay's update is kept as this step. When they disagree:
    ``(None, None, eager loss, why)`` with the parameters and optimizer state of the eager step.
    A failing capture raises (nothing has been updated then).
    """
    opt.zero_grad(set_to_none=True)  # gradients are allocated inside the capture: static
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    replay, static_loss = _capture(body, device)

    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    with torch.no_grad():
        p0, s0 = [p.detach().clone() for p in params], [t.clone() for t in state]
    loss_e = eager_step_fn().detach().float().clone()
    with torch.no_grad():
        p1, s1 = [p.detach().clone() for p in params], [t.clone() for t in state]
        for p, q in zip(params, p0):
            p.copy_(q)
        for t, u in zip(state, s0):
            t.copy_(u)
    replay()
    with torch.no_grad():
        loss_g = static_loss.detach().float().clone()
        num = sum(float((p.detach().float() - e.float()).pow(2).sum()) for p, e in zip(params, p1))
        den = sum(float((e.float() - q.float()).pow(2).sum()) for e, q in zip(p1, p0))
    le, lg = float(loss_e), float(loss_g)
    why = ""
    if not (math.isfinite(lg) and abs(lg - le) <= loss_rtol * abs(le) + 1e-4):
        why = f"replayed loss {lg:.6g} != eager loss {le:.6g}"
    elif not (den > 0 and math.sqrt(num) <= update_rtol * math.sqrt(den)):
        rel = math.sqrt(num / den) if den > 0 else float("inf")
        why = f"replayed update differs from the eager one by {rel:.3g} (relative norm)"
    if why:
        with torch.no_grad():
            for p, e in zip(params, p1):
                p.copy_(e)
            for t, u in zip(state, s1):
                t.copy_(u)
        return None, None, loss_e, why
    return replay, static_loss, loss_g, ""
