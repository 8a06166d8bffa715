"""State tracking with length generalisation: parity, addition mod 3 / mod 5, and S3.

After Grazzi et al. 2024, "Unlocking state-tracking in linear RNNs through negative
eigenvalues": a DeltaNet layer's transition ``I − β k kᵀ`` has eigenvalues in ``[0, 1]`` when
``β ∈ (0, 1)``, so a finite-precision model cannot flip a sign per input token and cannot
keep the running parity of arbitrarily long sequences; with ``β ∈ (0, 2)``
(``allow_neg_eigval=True``) the transition can be a reflection (eigenvalue −1) and one layer
can. Addition mod m needs rotations (products of reflections), so it is harder. ``s3``
composes permutations of three elements (the non-abelian group S3, 6 tokens): the DeltaProduct
paper (Siems et al. 2025) reports that with β ∈ (0, 2) two Householder steps per token
learn it where one step does not (their experiments, as far as we know, use DeltaProduct
without a forget gate: ``delta_product-nh2``; ``gated_delta_product-nh2`` adds the decay).

Inputs are uniform tokens in ``[0, m)``; the target at every position is the running sum of
the inputs so far, mod ``m`` (parity is ``m = 2``); for ``s3`` the tokens are the 6 permutations
and the target the running composition. Models train on length ``L`` (which
covers all prefixes up to ``L``) and are tested on fresh sequences of length ``2L`` and ``4L``.

Example::

    >>> x, y = make_modular_sum(2, seq_len=6, modulus=2, seed=0)
    >>> bool(torch.equal(y, x.cumsum(dim=1) % 2))
    True
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field

import torch

from .synthetic import (
    MODEL_PATTERNS,
    TrainConfig,
    build_model,
    format_table,
    masked_accuracy,
    resolve_device,
    train_and_evaluate,
)

__all__ = [
    "TASKS", "BETA_RANGES", "StateTrackingConfig", "make_modular_sum", "make_parity", "make_permutation_composition",
    "make_task",
    "run_state_tracking", "results_table",
]

TASKS = {"parity": 2, "mod3": 3, "mod5": 5, "s3": 6}  # task name -> vocabulary size (modulus, or |S3|)
S3 = tuple(itertools.permutations(range(3)))  # token i is the permutation S3[i]
BETA_RANGES = {"(0,1)": False, "(0,2)": True}  # label -> allow_neg_eigval


def make_modular_sum(
    num_examples: int, seq_len: int, modulus: int = 5, *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running sums mod ``modulus``: ``(inputs, targets)``, int64 ``[num_examples, seq_len]``.

    ``targets[b, t] = (inputs[b, 0] + … + inputs[b, t]) mod modulus``; every position has a
    target, to be predicted from the model's output at that same position.

    >>> x, y = make_modular_sum(1, seq_len=4, modulus=5, seed=3)
    >>> [int(v) for v in (x[0].cumsum(0) % 5)] == [int(v) for v in y[0]]
    True
    """
    for name, val in (("num_examples", num_examples), ("seq_len", seq_len)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if not isinstance(modulus, int) or isinstance(modulus, bool) or modulus < 2:
        raise ValueError(f"modulus must be an int >= 2, got {modulus!r}")
    gen = torch.Generator().manual_seed(int(seed))
    inputs = torch.randint(0, modulus, (num_examples, seq_len), generator=gen, dtype=torch.int64)
    return inputs, inputs.cumsum(dim=1) % modulus


def make_parity(num_examples: int, seq_len: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bits and their running parity (``make_modular_sum`` with modulus 2)."""
    return make_modular_sum(num_examples, seq_len, 2, seed=seed)


def make_permutation_composition(num_examples: int, seq_len: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Running composition in S3: ``(inputs, targets)``, int64 ``[num_examples, seq_len]`` in ``[0, 6)``.

    Token ``i`` is the permutation ``S3[i]`` (a tuple mapping position -> image);
    ``targets[b, t]`` is the token of ``x_t ∘ … ∘ x_1`` (apply ``x_1`` first).

    >>> x, y = make_permutation_composition(1, seq_len=3, seed=0)
    >>> p = lambda i: S3[i]
    >>> comp = lambda a, b: tuple(a[b[j]] for j in range(3))  # a after b
    >>> S3.index(comp(p(x[0, 2]), comp(p(x[0, 1]), p(x[0, 0])))) == int(y[0, 2])
    True
    """
    for name, val in (("num_examples", num_examples), ("seq_len", seq_len)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    # table[a, b] = token of S3[a] ∘ S3[b]
    table = torch.tensor([[S3.index(tuple(a[b[j]] for j in range(3))) for b in S3] for a in S3])
    gen = torch.Generator().manual_seed(int(seed))
    inputs = torch.randint(0, 6, (num_examples, seq_len), generator=gen, dtype=torch.int64)
    targets = torch.empty_like(inputs)
    acc = inputs[:, 0]
    targets[:, 0] = acc
    for t in range(1, seq_len):
        acc = table[inputs[:, t], acc]
        targets[:, t] = acc
    return inputs, targets


def make_task(task: str, num_examples: int, seq_len: int, *, seed: int = 0):
    """Generator by task name (``"parity"``, ``"mod3"``, ``"mod5"`` or ``"s3"``)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    if task == "s3":
        return make_permutation_composition(num_examples, seq_len, seed=seed)
    return make_modular_sum(num_examples, seq_len, TASKS[task], seed=seed)


@dataclass
class StateTrackingConfig:
    """The grid ``deltanet eval state-tracking`` runs: tasks × models × β ranges × lrs."""

    tasks: list[str] = field(default_factory=lambda: ["parity", "mod5"])
    models: list[str] = field(default_factory=lambda: ["delta_net"])
    betas: list[str] = field(default_factory=lambda: list(BETA_RANGES))
    lrs: list[float] = field(default_factory=lambda: [3e-3])
    train_len: int = 32
    test_multiples: list[int] = field(default_factory=lambda: [2, 4])
    width: int = 64
    num_layers: int = 2
    head_dim: int = 64
    train_size: int = 20_000
    test_size: int = 1_000
    seed: int = 0

    def __post_init__(self) -> None:
        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"tasks: unknown task {t!r}; choose from {sorted(TASKS)}")
        for m in self.models:
            if m not in MODEL_PATTERNS:
                raise ValueError(f"models: unknown model {m!r}; choose from {sorted(MODEL_PATTERNS)}")
        for b in self.betas:
            if b not in BETA_RANGES:
                raise ValueError(f"betas: unknown range {b!r}; choose from {list(BETA_RANGES)}")
        if any(k < 1 for k in self.test_multiples):
            raise ValueError(f"test_multiples must be >= 1, got {self.test_multiples}")


def run_state_tracking(
    cfg: StateTrackingConfig, train: TrainConfig, *, progress: bool = True, on_result=None
) -> list[dict]:
    """Train each (task, model, β range, lr) at ``train_len``; test at each multiple of it.

    Every result records, per test length, the token-level accuracy over all positions, the
    accuracy on the positions beyond ``train_len`` only (never seen in training) and the
    accuracy of the last position (the whole sequence's sum).
    """
    from tqdm.auto import tqdm

    device = resolve_device(train.device)
    jobs = [(t, m, b, lr) for t in cfg.tasks for m in cfg.models for b in cfg.betas for lr in cfg.lrs]
    results: list[dict] = []
    bar = tqdm(jobs, desc="state tracking", disable=not progress, dynamic_ncols=True)
    for task, model_name, beta, lr in bar:
        bar.set_postfix_str(f"{task} {model_name} beta{beta} lr={lr:g}")
        mod = TASKS[task]
        xtr, ytr = make_task(task, cfg.train_size, cfg.train_len, seed=cfg.seed)
        xva, yva = make_task(task, cfg.test_size, cfg.train_len, seed=cfg.seed + 1)
        torch.manual_seed(cfg.seed)
        model = build_model(
            model_name, width=cfg.width, num_layers=cfg.num_layers, vocab_size=mod,
            head_dim=cfg.head_dim, max_len=cfg.train_len * max(cfg.test_multiples),
            allow_neg_eigval=BETA_RANGES[beta],
        )
        run = train_and_evaluate(
            model, (xtr, ytr), (xva, yva), TrainConfig(**{**asdict(train), "lr": lr})
        )
        lengths = {}
        for k in [1, *cfg.test_multiples]:
            n_len = cfg.train_len * k
            xte, yte = make_task(task, cfg.test_size, n_len, seed=cfg.seed + 100 + k)
            acc, per_pos = masked_accuracy(
                model, xte, yte, batch_size=train.eval_batch_size, device=device,
                per_position=True,
            )
            lengths[str(n_len)] = {
                "all": acc,
                "beyond_train": float(per_pos[cfg.train_len:].mean()) if k > 1 else None,
                "last": float(per_pos[-1]),
                "per_position": [round(float(a), 4) for a in per_pos],
            }
        res = {
            "task": task, "modulus": mod, "model": model_name, "beta": beta,
            "allow_neg_eigval": BETA_RANGES[beta], "lr": lr, "width": cfg.width,
            "num_layers": cfg.num_layers, "train_len": cfg.train_len, "lengths": lengths,
            **{k: v for k, v in run.to_dict().items()},
        }
        results.append(res)
        bar.write(
            f"{task:>6} {model_name} beta{beta} lr={lr:g}: "
            + " ".join(f"L={n}:{v['all']:.3f}/last {v['last']:.3f}" for n, v in lengths.items())
        )
        if on_result is not None:
            on_result(results)
    return results


def best_runs(results: list[dict], test_multiples: list[int]) -> list[dict]:
    """Per (task, model, β): the lr whose accuracy at the largest test length is best."""
    best: dict[tuple, dict] = {}
    for r in results:
        key = (r["task"], r["model"], r["beta"])
        score = r["lengths"][str(r["train_len"] * max(test_multiples))]["all"]
        if key not in best or score > best[key][0]:
            best[key] = (score, r)
    return [v[1] for v in best.values()]


def results_table(results: list[dict], test_multiples: list[int]) -> str:
    """Markdown table: accuracy at train length and at each multiple (all / beyond / last)."""
    rows = []
    for r in best_runs(results, test_multiples):
        tl = r["train_len"]
        cells = [f"{r['lengths'][str(tl)]['all']:.3f}"]
        for k in test_multiples:
            v = r["lengths"][str(tl * k)]
            cells.append(f"{v['all']:.3f} / {v['beyond_train']:.3f} / {v['last']:.3f}")
        rows.append([r["task"], r["model"], r["beta"], f"{r['lr']:g}", *cells])
    header = ["task", "model", "beta", "lr", f"acc@{results[0]['train_len']}" if results else "acc@L",
              *[f"{k}x: all / beyond / last" for k in test_multiples]]
    return format_table(header, rows)
