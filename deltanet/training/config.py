"""Typed run configuration: one dataclass per component, merged from defaults < file < flags.

Each component owns its section (``DataConfig`` for data + tokenizer, ``OptimConfig`` for the
optimizer and schedule, ``TrainConfig`` for the loop, checkpoints and hardware) and
``RunConfig`` bundles them. Field names are unique across sections, so a config file may use
either sections or flat keys::

    # run.toml
    preset = "tiny"
    [data]
    seq_len = 256
    [optim]
    lr = 1e-3
    [model]            # free-form overrides passed to the model preset
    num_hidden_layers = 2

Unknown keys are errors (:class:`ConfigError`), never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "auto_lr",
    "DataConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "load_config_file",
]


class ConfigError(ValueError):
    """A bad configuration value or key; the CLI prints it as one line and exits with 2."""


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes token sequences."""

    data: str = "stdlib"  # "stdlib", "python-site", a file, a directory, a glob, a .jsonl, or "hf:NAME[:CONFIG]"
    tokenizer: str = "bpe"  # "bpe" (trained on the train split), "bytes", a tokenizer.json, or an HF name
    vocab_size: int = 4096  # for "bpe" only
    seq_len: int = 256
    val_fraction: float = 0.05  # share of files (or lines of a single file) held out
    tokenizer_train_bytes: int = 16_000_000  # BPE is trained on at most this much training text
    cache_dir: str = ""  # token caches; "" -> $DELTANET_CACHE_DIR or ~/.cache/deltanet/tokens
    data_workers: int = 0  # tokenising processes; 0 = all cores (the token ids don't depend on it)
    doc_mask: bool = True  # packed documents don't see each other (cu_seqlens)

    def validate(self) -> None:
        _positive(self, "seq_len", "vocab_size", "tokenizer_train_bytes")
        _non_negative(self, "data_workers")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.tokenizer == "bpe" and self.vocab_size < 300:
            raise ConfigError(f"vocab_size must be >= 300 for a BPE tokenizer, got {self.vocab_size}")

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        env = os.environ.get("DELTANET_CACHE_DIR")
        return Path(env) if env else Path.home() / ".cache" / "deltanet" / "tokens"


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 0.0  # 0 = auto: 6e-3 * 128 / hidden_size (6e-3 for tiny, 1e-3 for 125m), see auto_lr
    min_lr_ratio: float = 0.1
    warmup: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def validate(self) -> None:
        _non_negative(self, "lr", "warmup", "weight_decay", "grad_clip", "min_lr_ratio")
        if self.min_lr_ratio > 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")


def auto_lr(hidden_size: int) -> float:
    """Peak learning rate when ``lr = 0``: inversely proportional to the width (muP-style).

    Tuned on the tiny preset (hidden 128) on a 2-core CPU: 6e-3 at batch 4 beat 3e-3 and
    batch 8 within the same wall time. Wider models get proportionally less.

    >>> auto_lr(128), auto_lr(768)
    (0.006, 0.001)
    """
    return round(6e-3 * 128 / hidden_size, 8)


@dataclass
class TrainConfig:
    """The loop: model, batch, schedule length, evaluation, checkpoints, hardware."""

    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # overrides for the preset's config
    batch_size: int = 4  # sequences per device per micro-step
    grad_accum: int = 1
    max_steps: int = 300
    max_time_s: float = 0.0  # wall-clock budget for the loop; 0 = none (the CLI's no-arg run sets one)
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    save_every: int = 0  # 0 = only at the end (and on SIGINT/SIGTERM)
    keep_checkpoints: int = 2
    out: str = ""  # "" -> runs/<preset>-<timestamp>
    resume: bool = False
    seed: int = 0
    compile: bool = False
    dtype: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 elsewhere), "float32", "bfloat16"
    device: str = "auto"  # "auto", "cpu", "cuda"
    threads: int = 0  # CPU threads per process; 0 = auto (fewer when the machine is already busy)
    fsdp: bool = False
    context_parallel: int = 1  # ranks per context-parallel group: each holds a segment of the same rows
    sample_prompt: str = "def "
    sample_tokens: int = 80
    progress: bool = True

    def validate(self) -> None:
        _positive(self, "batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches",
                  "log_every", "keep_checkpoints", "context_parallel")
        if self.context_parallel > 1 and self.fsdp:
            raise ConfigError("context_parallel > 1 runs under DDP; it cannot be combined with fsdp")
        _non_negative(self, "max_time_s", "save_every", "sample_tokens", "threads")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"dtype must be one of auto, float32, bfloat16; got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda; got {self.device!r}")
        if not isinstance(self.model, dict):
            raise ConfigError(f"model must be a table of preset overrides, got {self.model!r}")


@dataclass
class RunConfig:
    """Everything a training run needs; ``to_dict`` is what the run directory stores."""

    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    SECTIONS = ("data", "optim", "train")

    def validate(self) -> "RunConfig":
        self.data.validate()
        self.optim.validate()
        self.train.validate()
        cp = self.train.context_parallel
        if self.data.seq_len % cp:
            raise ConfigError(f"seq_len ({self.data.seq_len}) must be divisible by context_parallel ({cp})")
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in self.SECTIONS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """Build from nested (``{"data": {...}}``) and/or flat keys; unknown keys raise.

        >>> RunConfig.from_dict({"seq_len": 64, "optim": {"lr": 1e-3}}).data.seq_len
        64
        """
        cfg = cls()
        cfg.update(d)
        return cfg

    def update(self, d: dict[str, Any], source: str = "config") -> None:
        owners = _field_owners()
        for key, value in d.items():
            if key in self.SECTIONS and isinstance(value, dict):
                for sub_key, sub_value in value.items():
                    if owners.get(sub_key) != key:
                        raise ConfigError(f"unknown key '{key}.{sub_key}' in {source}")
                    self.set(sub_key, sub_value, source)
            elif key in owners:
                self.set(key, value, source)
            elif isinstance(value, dict):  # a [section] of a TOML / YAML file
                raise ConfigError(f"unknown section [{key}] in {source} (valid sections: "
                                  f"{', '.join([*self.SECTIONS, 'model'])})")
            else:
                raise ConfigError(f"unknown key '{key}' in {source} (valid: {', '.join(sorted(owners))})")

    def set(self, key: str, value: Any, source: str = "config") -> None:
        section = getattr(self, _field_owners()[key])
        current = getattr(section, key)
        setattr(section, key, _coerce(key, value, type(current), source))


def _field_owners() -> dict[str, str]:
    owners: dict[str, str] = {}
    for name, klass in (("data", DataConfig), ("optim", OptimConfig), ("train", TrainConfig)):
        for f in dataclasses.fields(klass):
            owners[f.name] = name
    return owners


def _coerce(key: str, value: Any, want: type, source: str) -> Any:
    # Strict on purpose: "1e-3" in a TOML string or a bool for an int is a mistake worth naming.
    if want is bool:
        if isinstance(value, bool):
            return value
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif want is str:
        if isinstance(value, str):
            return value
    elif want is dict:
        if isinstance(value, dict):
            return dict(value)
    raise ConfigError(f"{key} in {source} must be {want.__name__}, got {value!r}")


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(obj, name)}")


def _non_negative(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(obj, name)}")


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML (``tomllib``), YAML (needs ``pyyaml``) or JSON config file into a dict.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "run.toml"
    >>> _ = p.write_text('seq_len = 64\\n[optim]\\nlr = 0.001\\n')
    >>> load_config_file(p)
    {'seq_len': 64, 'optim': {'lr': 0.001}}
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            with p.open("rb") as f:
                data = tomllib.load(f)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ModuleNotFoundError:
                raise ConfigError(f"reading {p} needs PyYAML: pip install pyyaml (or use a .toml file)") from None
            data = yaml.safe_load(p.read_text()) or {}
        elif suffix == ".json":
            data = json.loads(p.read_text())
        else:
            raise ConfigError(f"config file {p} must end in .toml, .yaml, .yml or .json")
    except ConfigError:
        raise
    except Exception as e:  # parse errors from tomllib / yaml / json: one line naming the file
        raise ConfigError(f"cannot parse {p}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a table of keys, got {type(data).__name__}")
    return data
