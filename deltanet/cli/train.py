"""``deltanet train``: flags and config file -> :class:`~deltanet.training.config.RunConfig` -> the trainer.

The data flags and the config-file merge are shared with ``deltanet data prepare``
(:mod:`deltanet.cli.data`), so the same flags build the same token cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from deltanet.cli import CliParser, UsageError

__all__ = ["DEFAULT_TIME_BUDGET_S", "add_data_flags", "build_train_config", "cli_main", "merge_config_file",
           "merge_flags", "train_parser"]

DEFAULT_TIME_BUDGET_S = 150.0  # see build_train_config
_S = argparse.SUPPRESS  # only flags the user typed end up in the namespace


def train_parser() -> CliParser:
    p = CliParser(prog="deltanet train", argument_default=_S,
                  description="Train a DeltaNet language model. With no arguments: the 'tiny' preset on this "
                              "interpreter's standard-library sources, a few minutes on a laptop CPU. "
                              "Precedence: defaults < saved run config (with --resume) < --config file < flags.")
    a = p.add_argument
    a("--config", metavar="FILE", help="TOML / YAML / JSON file of settings (sections data, optim, train, model)")
    a("--preset", help="model preset (deltanet.models.presets), default tiny")
    a("--model", action="append", metavar="KEY=VALUE", help="override a model config field, e.g. --model num_hidden_layers=2")
    add_data_flags(p.add_argument_group("data"))
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, help="peak learning rate (default 0 = auto: 6e-3 * 128 / hidden_size)")
    g.add_argument("--warmup", type=int, help="warmup steps")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--grad-clip", type=float)
    g = p.add_argument_group("loop")
    g.add_argument("--batch-size", type=int, help="sequences per process per micro-step")
    g.add_argument("--grad-accum", type=int)
    g.add_argument("--max-steps", type=int)
    g.add_argument("--max-time-s", type=float, help="stop after this many seconds of training (0 = no limit; "
                   f"default {DEFAULT_TIME_BUDGET_S:.0f} unless --max-steps is given)")
    g.add_argument("--eval-every", type=int)
    g.add_argument("--eval-batches", type=int)
    g.add_argument("--log-every", type=int)
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--out", metavar="DIR", help="run directory (default runs/<preset>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g.add_argument("--seed", type=int)
    g.add_argument("--sample-tokens", type=int, help="tokens of the sample generated at the end (0: none)")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", help="auto | cpu | cuda")
    g.add_argument("--threads", type=int, help="CPU threads per process (0 = auto: the cores idle at start; "
                   "--resume reuses the run's count)")
    g.add_argument("--dtype", help="auto (bf16 autocast on GPU) | float32 | bfloat16")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--activation-checkpointing", choices=("none", "mixer", "mlp", "block"),
                   help="recompute in backward instead of keeping activations: each token mixer, each MLP's "
                        "gate/up projections or each whole block (less memory, slower steps); sets the model "
                        "field activation_checkpointing "
                        "(default: the preset's, none)")
    g.add_argument("--plain-loss", action="store_true",
                   help="compute the training loss from the full [tokens, vocab] logits instead of the fused "
                        "linear cross-entropy in token chunks (the default; same loss, far less memory); sets "
                        "the model field fuse_linear_cross_entropy=false")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 fully_shard instead of DDP")
    g.add_argument("--context-parallel", type=int, metavar="N",
                   help="under torchrun: split each sequence over N consecutive ranks (every layer type, packed "
                        "documents and activation checkpointing included; seq-len divisible by N); the world is "
                        "N x data-parallel")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_defaults_to_help(p)
    return p


def add_data_flags(g) -> None:
    """The data flags of ``deltanet train`` and ``deltanet data prepare``: the same flags build the same cache."""
    g.add_argument("--data", help="'stdlib' (default), 'stdlib-all' (with its tests), 'python-site' (stdlib + "
                   "site-packages), a file, directory, glob, .jsonl (a 'text' field per line), hf:NAME[:CONFIG] or hf:DIR")
    g.add_argument("--tokenizer", help="'bpe' (default, trained on the data), 'bytes', a tokenizer.json, or an HF name")
    g.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default 4096)")
    g.add_argument("--seq-len", type=int)
    g.add_argument("--val-fraction", type=float)
    g.add_argument("--cache-dir", help="token cache directory (default $DELTANET_CACHE_DIR or ~/.cache/deltanet/tokens)")
    g.add_argument("--data-workers", type=int, help="tokenising processes (default 0 = all cores)")
    g.add_argument("--no-doc-mask", dest="doc_mask", action="store_false", help="let packed documents see each other")


def add_defaults_to_help(p: argparse.ArgumentParser) -> None:
    """Flags default to SUPPRESS (to tell typed from default); show the config's real defaults."""
    from deltanet.training.config import RunConfig

    cfg = RunConfig()
    for action in p._actions:
        section = next((getattr(cfg, s) for s in RunConfig.SECTIONS if hasattr(getattr(cfg, s), action.dest)), None)
        if section is None or action.dest in ("resume", "model") or isinstance(action, argparse._StoreConstAction):
            continue
        if action.help and "default" in action.help:
            continue
        value = getattr(section, action.dest)
        action.help = f"{action.help + ' ' if action.help else ''}(default {value!r})"


def merge_config_file(cfg, path: str, *, data_only: bool = False) -> set[str]:
    """Merge the ``--config`` file at ``path`` into the RunConfig ``cfg``; returns the keys it names
    (of sections and fields). ``data_only`` keeps only its data settings (``deltanet data prepare``)."""
    from deltanet.training.config import DataConfig, load_config_file

    file_cfg = load_config_file(path)
    if data_only:
        data_keys = {"data"} | {f.name for f in dataclasses.fields(DataConfig)}
        file_cfg = {k: v for k, v in file_cfg.items() if k in data_keys}
    cfg.update(file_cfg, source="the config file")
    return set(file_cfg) | {k for v in file_cfg.values() if isinstance(v, dict) for k in v}


def merge_flags(cfg, args: dict) -> None:
    """Set the flags the user typed (``args``: dest -> value) on the RunConfig ``cfg``."""
    for key, value in args.items():
        cfg.set(key, value, source="the command line")


def _model_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"deltanet train: error: --model expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw  # a bare string
    return out


def build_train_config(argv: list[str]):
    """The :class:`RunConfig` for ``deltanet train`` arguments (see ``deltanet train --help``)."""
    from deltanet.training.config import RunConfig

    args = vars(train_parser().parse_args(argv))
    cfg = RunConfig()
    if args.get("resume") and args.get("out"):
        saved = Path(args["out"]) / "config.json"
        if saved.is_file():  # resume what was run, not today's defaults
            cfg.update({k: v for k, v in json.loads(saved.read_text()).items() if k in RunConfig.SECTIONS},
                       source=str(saved))
    explicit = set(args)
    if "config" in args:
        explicit |= merge_config_file(cfg, args.pop("config"))
    typed_model = _model_overrides(args.pop("model")) if "model" in args else {}
    if "activation_checkpointing" in args:  # a model field with a flag of its own
        mode = args.pop("activation_checkpointing")
        if typed_model.get("activation_checkpointing", mode) != mode:
            raise UsageError(f"deltanet train: error: --activation-checkpointing {mode} contradicts --model "
                             f"activation_checkpointing={typed_model['activation_checkpointing']}; give one")
        typed_model["activation_checkpointing"] = mode
    if args.pop("plain_loss", False):  # the opt-out of a model field, also a flag of its own
        if typed_model.get("fuse_linear_cross_entropy", False) is not False:
            raise UsageError("deltanet train: error: --plain-loss contradicts --model fuse_linear_cross_entropy="
                             f"{json.dumps(typed_model['fuse_linear_cross_entropy'])}; give one")
        typed_model["fuse_linear_cross_entropy"] = False
    cfg.train.model = {**cfg.train.model, **typed_model}
    merge_flags(cfg, args)
    if not explicit & {"max_steps", "max_time_s", "resume"}:
        # The no-argument run must finish in minutes on a slow or busy CPU too: cap the loop's
        # wall time (the cosine schedule then follows the clock) unless a length was asked for.
        cfg.train.max_time_s = DEFAULT_TIME_BUDGET_S
    return cfg.validate()


def cli_main(argv: list[str]) -> int:
    """``deltanet train [flags]``."""
    cfg = build_train_config(argv)
    from deltanet.training.trainer import train

    t0 = time.time()
    res = train(cfg)
    if res.interrupted:  # 128 + signal, as a shell reports it: `deltanet train && next` stops here
        return 128 + res.signum
    if res.val is None or os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun only rank 0 reports
    v = res.val
    print(f"run directory: {res.run_dir}")
    if res.already_complete:
        print(f"already complete at step {res.step}: nothing trained; last validation loss {v['loss']:.4f} | "
              f"bits/byte {v['bpb']:.4f} | perplexity {v['ppl']:.2f}")
        return 0
    print(f"step {res.step}: validation loss {v['loss']:.4f} | bits/byte {v['bpb']:.4f} | perplexity {v['ppl']:.2f} "
          f"| {res.tokens_per_s:,.0f} tok/s | {time.time() - t0:.0f}s")
    if res.sample:
        print(f"sample ({cfg.train.sample_prompt!r} ...):\n{cfg.train.sample_prompt}{res.sample}")
    return 0
