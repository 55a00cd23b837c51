"""The `splitserve` command line: one module per subcommand, each a thin shell that builds a config.

Every command module exposes `register(subparsers)`, which adds its parser and sets `handler` to a
function `(args) -> int`. Nothing outside this package reads flags.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Command modules, in help order. Imported lazily so `splitserve --help` stays fast and torch-free.
COMMAND_MODULES = (
    "splitserve.cli.make_tiny_model",
    "splitserve.cli.up",
    "splitserve.cli.status",
    "splitserve.cli.down",
    "splitserve.cli.generate",
    "splitserve.cli.bench",
    "splitserve.cli.simulate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, TimeoutError, ConnectionError) as exc:
        # Typed, user-facing errors: one clear line, no traceback.
        print(f"splitserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
