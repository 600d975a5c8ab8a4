"""The `nodeagent` command line: one argparse tree, one module per command group.

Each module in COMMAND_MODULES exposes ``register(subparsers)``, which adds its
subcommands and sets ``func`` (taking the parsed args, returning an exit code).
Errors a user can act on are raised as ``UserError`` and printed without a
traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

COMMAND_MODULES = [
    "nodeagent.commands.ca",
    "nodeagent.commands.config",
    "nodeagent.commands.explain",
    "nodeagent.commands.run",
    "nodeagent.commands.proxy",
]


class UserError(Exception):
    """An error whose message is the whole story for the user (no traceback)."""


def build_parser() -> argparse.ArgumentParser:
    return _build(COMMAND_MODULES)[0]


def _build(modules: list[str]) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The parser with the commands of ``modules``, and its subparsers action."""
    parser = argparse.ArgumentParser(
        prog="nodeagent",
        description="Sidecarless service mesh node agent (Istio configuration, one proxy per node).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser, sub


def _parser_for(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for ``argv``: when its command is named like the module that defines it
    (``nodeagent run`` -> nodeagent.commands.run), a parser with that module's commands only,
    else all of them. The command's own parser is the same either way; the agent daemon then
    neither imports the other command modules nor keeps their parsers (docs/operations.md,
    "Memory")."""
    i = 0
    while i < len(argv) and argv[i] in ("-v", "--verbose"):
        i += 1
    if i < len(argv) and not argv[i].startswith("-"):
        module = f"nodeagent.commands.{argv[i]}"
        if module in COMMAND_MODULES:
            parser, sub = _build([module])
            if argv[i] in sub.choices:
                return parser
    return build_parser()


def main(argv: list[str] | None = None) -> int:
    args = _parser_for(sys.argv[1:] if argv is None else list(argv)).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"nodeagent: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `nodeagent get ... | head`: the reader went away; that is not an error.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except Exception as exc:   # last resort: a bug is one line (the traceback only with -v), exit 70
        what = f"{type(exc).__name__}: {exc}"
        if args.verbose:
            import traceback
            traceback.print_exc()
            print(f"nodeagent: internal error: {what}", file=sys.stderr)
        else:
            print(f"nodeagent: internal error: {what} (rerun with -v for the traceback)", file=sys.stderr)
        return 70   # EX_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())
