"""Synthetic evaluation tasks: MQAR (associative recall) and state tracking (parity, mod-5 sums).

Each task module exposes a generator (``make_mqar``, ``make_parity``, ``make_modular_sum``) and a
sweep that trains and evaluates models from :mod:`deltanet.models`; ``deltanet eval mqar`` /
``deltanet eval state-tracking`` run them (:mod:`deltanet.cli.eval_mqar`,
:mod:`deltanet.cli.eval_state_tracking`). The shared training loop, model patterns and plots live
in :mod:`deltanet.evaluation.tasks.synthetic`.
"""

from .mqar import make_mqar
from .synthetic import IGNORE_INDEX, MODEL_PATTERNS, TrainConfig, layer_types_for, train_and_evaluate

__all__ = [
    "IGNORE_INDEX", "MODEL_PATTERNS", "TrainConfig", "layer_types_for", "make_mqar",
    "train_and_evaluate",
]
