"""``deltanet data prepare``: build the tokenizer and token cache that ``deltanet train`` with the
same data flags will reuse (so torchrun jobs don't tokenise inside the job).

The flags and the config-file merge are ``deltanet train``'s (:mod:`deltanet.cli.train`), so the
two commands cannot disagree on what a data setting means.
"""

from __future__ import annotations

import argparse
import sys
import time

from deltanet.cli import CliParser, UsageError
from deltanet.cli.train import add_data_flags, add_defaults_to_help, merge_config_file, merge_flags

__all__ = ["build_data_config", "cli_main", "data_parser"]


def data_parser() -> CliParser:
    p = CliParser(prog="deltanet data prepare", argument_default=argparse.SUPPRESS,
                  description="Tokenise a corpus into the token cache ahead of training; takes deltanet train's data "
                              "flags, and deltanet train with the same flags reuses the cache.")
    p.add_argument("--config", metavar="FILE", help="config file (only its data settings are used)")
    add_data_flags(p.add_argument_group("data"))
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_defaults_to_help(p)
    return p


def build_data_config(argv: list[str]):
    """``(DataConfig, progress)`` for the arguments of ``deltanet data prepare`` (after ``prepare``)."""
    from deltanet.training.config import RunConfig

    args = vars(data_parser().parse_args(argv))
    progress = args.pop("progress", True)
    cfg = RunConfig()
    if "config" in args:
        merge_config_file(cfg, args.pop("config"), data_only=True)
    merge_flags(cfg, args)
    cfg.data.validate()
    return cfg.data, progress


def cli_main(argv: list[str]) -> int:
    """``deltanet data prepare [flags]``; ``deltanet data [-h]`` prints what ``data`` offers."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: deltanet data prepare [flags]\n\n"
              "  prepare   tokenise a corpus into the token cache ahead of training (deltanet train's data\n"
              "            flags; deltanet train with the same flags reuses the cache).\n"
              "            Flags: deltanet data prepare --help", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] != "prepare":
        raise UsageError("deltanet data: error: expected 'deltanet data prepare [flags]' (see deltanet data prepare --help)")
    dc, progress = build_data_config(argv[1:])
    from deltanet.training.data import build_token_cache, format_stats, open_corpus, prepare_tokenizer

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
