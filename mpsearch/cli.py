"""The ``mpsearch`` command.

Each subcommand lives in ``mpsearch/_cli/<name>.py`` with ``register(subparsers)``; this
module only dispatches. User errors (:class:`mpsearch.errors.MpsError`) print one line,
``error: <message>``, on stderr and exit with code 2; ``--debug`` shows the traceback.

Example:
    $ mpsearch layers tiny:llava
    $ mpsearch run            # the demo pipeline
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from typing import Sequence

from mpsearch.errors import MpsError

#: Subcommand modules in the order ``--help`` lists them.
COMMANDS = ("layers", "apply", "profile", "latency", "search", "refine", "evaluate", "export", "plot", "run")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    from mpsearch import __version__

    parser = argparse.ArgumentParser(
        prog="mpsearch",
        description="Mixed-precision quantization policy search for vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"mpsearch {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if importlib.util.find_spec(f"mpsearch._cli.{name}") is None:  # pragma: no cover - partial checkouts
            continue
        module = importlib.import_module(f"mpsearch._cli.{name}")
        module.register(sub)
    return parser


def _one_line_warnings() -> None:
    """Our own warnings (a budget that constrains nothing, trust_remote_code) as ``warning: ...``.

    Installed once per process (main() may be called many times, e.g. from tests)."""
    import warnings

    default = warnings.formatwarning
    if getattr(default, "_mpsearch", False):
        return

    def fmt(message, category, filename, lineno, line=None):  # type: ignore[no-untyped-def]
        if category is UserWarning:
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    fmt._mpsearch = True  # type: ignore[attr-defined]
    warnings.formatwarning = fmt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _one_line_warnings()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MpsError as exc:
        if args.debug or os.environ.get("MPSEARCH_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
