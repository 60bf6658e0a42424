"""``kvbound`` command line, one module per command: ``generate`` (one prompt), ``chat`` (multi-turn on
stdin), ``perplexity`` (of a text file), ``bench``, ``serve`` and ``policies``; :mod:`.common` holds what
they share.

Bad input (``KVBoundError``) exits with status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import sys
from typing import Sequence

from ..errors import KVBoundError
from . import bench, chat, common, generate, perplexity, policies, serve

DESCRIPTION = """\
kvbound keeps a transformer's KV cache inside a memory budget. Pick a cache policy (--policy)
and a budget in tokens per layer (--budget); the exact policies give the same tokens as the
full cache, the lossy ones trade accuracy for memory. Generation is greedy.
"""

COMMANDS = (generate, chat, perplexity, bench, serve, policies)  # each module's add(sub) registers its command


def build_parser() -> common.Parser:
    from .. import __version__

    parser = common.Parser(prog="kvbound", description=DESCRIPTION, formatter_class=common.FORMATTER,
                           epilog=common.policies_epilog() + "\n\n" + generate.EXAMPLES_GENERATE
                           + "\nRun 'kvbound COMMAND --help' for details.")
    parser.add_argument("--version", action="version", version=f"kvbound {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=common.Parser)
    for command in COMMANDS:
        command.add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``kvbound``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own bar covers the slow first load
        return int(args.func(args) or 0)
    except KVBoundError as exc:
        print(f"kvbound: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
