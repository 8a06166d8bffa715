"""The ``deltanet`` command line: ``train | data | generate | eval | bench``.

One module per command (``train``, ``data``, ``generate``, ``eval_ppl``, ``eval_mqar``,
``eval_state_tracking``, ``eval_harness``, ``bench_kernels``, ``bench_model``, ``bench_lm``), each
with a ``cli_main(argv) -> exit code`` that parses the arguments, turns them into the library's
typed configs or keyword arguments and prints the results; the library modules never parse
arguments. A command module is imported only when its command runs, and heavy modules (torch,
models, trainer) only inside it, so ``deltanet --help`` stays fast. Mistakes in what the user
typed (unknown flag, bad config key, missing data, corrupt checkpoint) are reported as one line
on stderr, never as a traceback; set ``DELTANET_DEBUG=1`` to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

__all__ = ["CliParser", "UsageError", "main", "show_defaults"]

# command -> module whose cli_main(argv) runs it
COMMANDS = {
    "train": "deltanet.cli.train",
    "generate": "deltanet.cli.generate",
    "data": "deltanet.cli.data",
}
# subcommands: name -> (module, pass the subcommand name as argv[0])
EVAL_TASKS = {
    "mqar": ("deltanet.cli.eval_mqar", False),
    "state-tracking": ("deltanet.cli.eval_state_tracking", False),
    "harness": ("deltanet.cli.eval_harness", False),
    "ppl": ("deltanet.cli.eval_ppl", False),
}
BENCHES = {
    "kernels": ("deltanet.cli.bench_kernels", False),
    "model": ("deltanet.cli.bench_model", True),
    "decode": ("deltanet.cli.bench_decode", False),
    "lm": ("deltanet.cli.bench_lm", False),
}


class UsageError(Exception):
    """Bad command-line usage: one line, exit code 2."""


class CliParser(argparse.ArgumentParser):
    """argparse that reports errors as one line (``prog: error: ...``) and exits with 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Append ``(default: X)`` to the help of every option that has a default.

    Unlike ``ArgumentDefaultsHelpFormatter`` this also covers options without a help text and
    leaves out ``None`` / ``False`` defaults (unset, off) and help that already names its default.
    """
    for action in parser._actions:
        d = action.default
        if not action.option_strings or d is None or d is False or d == argparse.SUPPRESS \
                or "default" in (action.help or ""):
            continue
        shown = " ".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)
        action.help = f"{action.help or ''} (default: {shown.replace('%', '%%')})".strip()
    return parser


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
    if argv and argv[0] in COMMANDS:
        return int(importlib.import_module(COMMANDS[argv[0]]).cli_main(argv[1:]) or 0)
    if len(argv) >= 2 and argv[0] == "eval" and argv[1] in EVAL_TASKS:
        return _delegate("eval", EVAL_TASKS, argv[1], argv[2:])
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHES:
        return _delegate("bench", BENCHES, argv[1], argv[2:])
    parser = build_parser()
    args = parser.parse_args(argv)  # prints help, or a one-line error for unknown commands
    parser.print_help()
    return 0 if args.command is None else 2


def main(argv: list[str] | None = None) -> int:
    """The ``deltanet`` console script: run the command in ``argv`` (default ``sys.argv[1:]``)."""
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
