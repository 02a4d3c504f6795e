"""The `spongebob` command. Each feature module adds its own subcommands here.

Modules register through `add_commands(subparsers)` and import heavy dependencies (torch)
inside their command functions, so `spongebob --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from spongebob import __version__
from spongebob.errors import UserError

# Modules that contribute subcommands, in the order `--help` lists them.
COMMAND_MODULES = [
    "spongebob.tokenizer",
    "spongebob.data_cmd",
    "spongebob.train",
    "spongebob.chat",
    "spongebob.serve",
    "spongebob.evaluate",
    "spongebob.export",
    "spongebob.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spongebob",
        description="Train a small chat LLM from scratch: tokenizer, pretrain, SFT, "
        "long SFT, reasoning distillation, chat.",
    )
    parser.add_argument("--version", action="version", version=f"spongebob {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("spongebob: interrupted", file=sys.stderr)
        return 130
    except (UserError, OSError) as e:
        print(f"spongebob: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        # Bad data surfaces from Rust as DataFormatError (a ValueError): one line, no traceback.
        from spongebob.data import DataFormatError

        if isinstance(e, DataFormatError):
            print(f"spongebob: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
