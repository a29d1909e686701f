"""The `rtdiffusion` command.

Subcommands are plugins found through the ``rtdiffusion.commands`` entry-point group (see pyproject.toml):
each entry is a ``register(subparsers)`` function that adds one subparser and sets ``func`` on it.
This keeps the import direction one way: ``td_bridge`` and ``demo`` register themselves here, and
``rtdiffusion`` never imports them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

from ..errors import RtDiffusionError

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtdiffusion",
        description="Real-time diffusion img2img engine (StreamDiffusion-style).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group="rtdiffusion.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as exc:  # an optional part whose extra is not installed
            p = sub.add_parser(ep.name, help=f"(unavailable: {exc})")
            p.set_defaults(func=_unavailable(ep.name, exc))
            continue
        register(sub)
    return parser


def _unavailable(name: str, exc: Exception):
    def run(args: argparse.Namespace) -> int:
        log.error("rtdiffusion %s is unavailable: %s", name, exc)
        return 2

    return run


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:  # Ctrl-C, or a signal a command turned into one (run: SIGTERM too)
        return 128 + getattr(exc, "signum", 2)
    except (ValueError, OSError, RtDiffusionError) as exc:  # boundary errors: say what was expected, no traceback
        log.error("%s", exc)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
