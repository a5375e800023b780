"""``avatarforcing`` command line: generate | stream | serve | livekit-worker | train | eval | bench | data | convert |
encode-prompt.

Each command is one module here: ``add(sub)`` (its parser) beside ``run(args)`` (its handler); the flags
several commands share are in ``common.py``.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import AvatarForcingError
from . import bench, convert, data, evaluate, generate, livekit_worker, prompt, serve, stream, train

COMMANDS = (generate, stream, serve, livekit_worker, train, evaluate, bench, data, convert, prompt)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="avatarforcing", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AvatarForcingError as e:
        print(f"avatarforcing {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
