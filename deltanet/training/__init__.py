"""Training: typed config, data + tokenizer pipeline, the loop, checkpoints, distributed setup.

Kept import-light: ``from deltanet.training import RunConfig, train`` pulls in the trainer
(and torch) only when ``train`` is first used.

    >>> from deltanet.training import RunConfig
    >>> RunConfig().train.preset
    'tiny'
"""

from .config import ConfigError, DataConfig, OptimConfig, RunConfig, TrainConfig

__all__ = ["ConfigError", "DataConfig", "OptimConfig", "RunConfig", "TrainConfig", "train"]


def train(cfg: RunConfig):
    """Run training as configured; see :func:`deltanet.training.trainer.train`."""
    from .trainer import train as _train

    return _train(cfg)
