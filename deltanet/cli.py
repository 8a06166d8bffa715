"""The ``deltanet`` command line: ``train | data | generate | eval | bench``.

Heavy modules (models, trainer, evaluation tasks, benchmarks) are imported only by the command
that needs them, so ``deltanet --help`` stays fast. Mistakes in what the user typed (unknown
flag, bad config key, missing data, corrupt checkpoint) are reported as one line on stderr,
never as a traceback; set ``DELTANET_DEBUG=1`` to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["CliParser", "main"]

# Commands implemented elsewhere: (module, pass the subcommand name as argv[0]).
EVAL_TASKS = {
    "mqar": ("deltanet.evaluation.tasks.mqar", False),
    "state-tracking": ("deltanet.evaluation.tasks.state_tracking", False),
    "harness": ("deltanet.evaluation.harness", False),
    "ppl": ("deltanet.evaluation.perplexity", False),
}
BENCHES = {
    "kernels": ("deltanet.bench.kernels", False),
    "model": ("deltanet.bench.model", True),
    "decode": ("deltanet.bench.model", True),
    "lm": ("deltanet.bench.lm", False),
}


DEFAULT_TIME_BUDGET_S = 150.0  # see build_train_config


class UsageError(Exception):
    """Bad command-line usage: one line, exit code 2."""


class CliParser(argparse.ArgumentParser):
    """argparse that reports errors as one line (``prog: error: ...``) and exits with 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def build_parser() -> CliParser:
    p = CliParser(prog="deltanet", description="DeltaNet: linear transformers with the delta rule.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=CliParser)
    sub.add_parser("train", help="train a model (no arguments: the tiny preset on the Python stdlib)", add_help=False)
    sub.add_parser("generate", help="generate text from a checkpoint", add_help=False)
    sub.add_parser("data", help="data prepare: tokenise a corpus into the cache ahead of training", add_help=False)
    ev = sub.add_parser("eval", help="evaluate: ppl | mqar | state-tracking | harness")
    ev.add_argument("task", choices=sorted(EVAL_TASKS))
    be = sub.add_parser("bench", help="benchmark: kernels | model | decode | lm")
    be.add_argument("what", choices=sorted(BENCHES))
    return p


# -- train -----------------------------------------------------------------------------------
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
    _add_data_flags(p.add_argument_group("data"))
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
    g.add_argument("--activation-checkpointing", choices=("none", "mixer", "block"),
                   help="recompute in backward instead of keeping activations: each token mixer or each whole "
                        "block (less memory, slower steps); sets the model field activation_checkpointing "
                        "(default: the preset's, none)")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 fully_shard instead of DDP")
    g.add_argument("--context-parallel", type=int, metavar="N",
                   help="under torchrun: split each sequence over N consecutive ranks (delta-rule layers only; "
                        "needs --no-doc-mask and seq-len divisible by N); the world is N x data-parallel")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    _add_defaults_to_help(p)
    return p


def _add_data_flags(g) -> None:
    # shared by `deltanet train` and `deltanet data prepare`: the same flags build the same cache
    g.add_argument("--data", help="'stdlib' (default), 'stdlib-all' (with its tests), 'python-site' (stdlib + "
                   "site-packages), a file, directory, glob, .jsonl (a 'text' field per line), hf:NAME[:CONFIG] or hf:DIR")
    g.add_argument("--tokenizer", help="'bpe' (default, trained on the data), 'bytes', a tokenizer.json, or an HF name")
    g.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default 4096)")
    g.add_argument("--seq-len", type=int)
    g.add_argument("--val-fraction", type=float)
    g.add_argument("--cache-dir", help="token cache directory (default $DELTANET_CACHE_DIR or ~/.cache/deltanet/tokens)")
    g.add_argument("--data-workers", type=int, help="tokenising processes (default 0 = all cores)")
    g.add_argument("--no-doc-mask", dest="doc_mask", action="store_false", help="let packed documents see each other")


def _add_defaults_to_help(p: argparse.ArgumentParser) -> None:
    # Flags default to SUPPRESS (to tell typed from default); show the config's real defaults.
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
    from deltanet.training.config import RunConfig, load_config_file

    args = vars(train_parser().parse_args(argv))
    cfg = RunConfig()
    if args.get("resume") and args.get("out"):
        saved = Path(args["out"]) / "config.json"
        if saved.is_file():  # resume what was run, not today's defaults
            cfg.update({k: v for k, v in json.loads(saved.read_text()).items() if k in RunConfig.SECTIONS},
                       source=str(saved))
    explicit = set(args)
    if "config" in args:
        file_cfg = load_config_file(args.pop("config"))
        cfg.update(file_cfg, source="the config file")
        explicit |= set(file_cfg) | {k for v in file_cfg.values() if isinstance(v, dict) for k in v}
    typed_model = _model_overrides(args.pop("model")) if "model" in args else {}
    if "activation_checkpointing" in args:  # a model field with a flag of its own
        mode = args.pop("activation_checkpointing")
        if typed_model.get("activation_checkpointing", mode) != mode:
            raise UsageError(f"deltanet train: error: --activation-checkpointing {mode} contradicts --model "
                             f"activation_checkpointing={typed_model['activation_checkpointing']}; give one")
        typed_model["activation_checkpointing"] = mode
    cfg.train.model = {**cfg.train.model, **typed_model}
    for key, value in args.items():
        cfg.set(key, value, source="the command line")
    if not explicit & {"max_steps", "max_time_s", "resume"}:
        # The no-argument run must finish in minutes on a slow or busy CPU too: cap the loop's
        # wall time (the cosine schedule then follows the clock) unless a length was asked for.
        cfg.train.max_time_s = DEFAULT_TIME_BUDGET_S
    return cfg.validate()


def cmd_train(argv: list[str]) -> int:
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


# -- data ------------------------------------------------------------------------------------
def cmd_data(argv: list[str]) -> int:
    """``deltanet data prepare``: build the tokenizer and token cache that ``deltanet train`` with
    the same data flags will reuse (so torchrun jobs don't tokenise inside the job)."""
    p = CliParser(prog="deltanet data prepare", argument_default=_S,
                  description="Tokenise a corpus into the token cache ahead of training; takes deltanet train's data "
                              "flags, and deltanet train with the same flags reuses the cache.")
    p.add_argument("--config", metavar="FILE", help="config file (only its data settings are used)")
    _add_data_flags(p.add_argument_group("data"))
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _add_defaults_to_help(p)
    if not argv or argv[0] != "prepare":
        raise UsageError("deltanet data: error: expected 'deltanet data prepare [flags]' (see deltanet data prepare --help)")
    args = vars(p.parse_args(argv[1:]))
    progress = args.pop("progress", True)
    import dataclasses

    from deltanet.training.config import DataConfig, RunConfig, load_config_file

    cfg = RunConfig()
    if "config" in args:
        file_cfg = load_config_file(args.pop("config"))
        data_keys = {"data"} | {f.name for f in dataclasses.fields(DataConfig)}
        cfg.update({k: v for k, v in file_cfg.items() if k in data_keys}, source="the config file")
    for key, value in args.items():
        cfg.set(key, value, source="the command line")
    cfg.data.validate()
    from deltanet.training.data import build_token_cache, format_stats, open_corpus, prepare_tokenizer

    dc = cfg.data
    t0 = time.time()
    corpus = open_corpus(dc.data, dc.val_fraction)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(corpus.describe())
    tokenizer = prepare_tokenizer(dc, corpus, log=log)
    cache = build_token_cache(corpus, tokenizer, dc.resolved_cache_dir(), progress=progress, workers=dc.data_workers,
                              log=log)
    print(f"token cache {'reused' if cache.reused else 'built'}: {cache.path}")
    print(f"{dc.data}: {format_stats(cache.meta)} [{time.time() - t0:.1f}s]")
    return 0


# -- generate --------------------------------------------------------------------------------
def cmd_generate(argv: list[str]) -> int:
    p = CliParser(prog="deltanet generate", description="Stream text from a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="run directory (uses its latest) or checkpoint directory")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling, in (0, 1] (default 0.95)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    # checked before the model loads and the prompt is printed
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature:g}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p:g}")

    import torch

    from deltanet.training.checkpoint import find_checkpoint, load_model
    from deltanet.training.generation import generate_text
    from deltanet.training.tokenizer import load_tokenizer

    ckpt = find_checkpoint(args.checkpoint)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    tokenizer = load_tokenizer(ckpt)
    if device == "cpu":
        from deltanet.training.distributed import configure_cpu_threads

        configure_cpu_threads()
    model = load_model(ckpt, device)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_p=args.top_p, seed=args.seed, stream=True)
    sys.stdout.write("\n")
    return 0


# -- delegation ------------------------------------------------------------------------------
def _delegate(command: str, table: dict, name: str, argv: list[str]) -> int:
    module_name, pass_name = table[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name) or e.name == module_name:
            raise UsageError(f"deltanet {command} {name}: error: not available in this installation "
                             f"(module {module_name} is missing)") from None
        raise
    return int(module.cli_main([name, *argv] if pass_name else list(argv)) or 0)


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "train":
        return cmd_train(argv[1:])
    if argv and argv[0] == "generate":
        return cmd_generate(argv[1:])
    if argv and argv[0] == "data":
        return cmd_data(argv[1:])
    if len(argv) >= 2 and argv[0] == "eval" and argv[1] in EVAL_TASKS:
        return _delegate("eval", EVAL_TASKS, argv[1], argv[2:])
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHES:
        return _delegate("bench", BENCHES, argv[1], argv[2:])
    parser = build_parser()
    args = parser.parse_args(argv)  # prints help, or a one-line error for unknown commands
    parser.print_help()
    return 0 if args.command is None else 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("DELTANET_DEBUG", "") not in ("", "0")
    try:
        return _dispatch(argv)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deltanet: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug or not _is_user_error(e):
            raise
        kind = "error" if type(e).__name__.endswith("Error") else type(e).__name__
        print(f"deltanet: {kind}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
              file=sys.stderr)
        return 2 if type(e).__name__ == "ConfigError" else 1


def _is_user_error(e: Exception) -> bool:
    # Errors our code raises about the user's input; anything else is a bug and keeps its traceback.
    names = {"ConfigError", "DataError", "CheckpointError", "TokenizerError"}
    return type(e).__name__ in names or isinstance(e, (ValueError, FileNotFoundError, PermissionError))


if __name__ == "__main__":
    sys.exit(main())
