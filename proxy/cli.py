"""``originpool`` command line: one entry point so operators find every tool in one place."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pool import __version__


def build_parser() -> argparse.ArgumentParser:
    """Subcommands are added here as the issues that need them land."""
    parser = argparse.ArgumentParser(
        prog="originpool",
        description="Reverse proxy for HTTP/1.1 and WebSocket whose origin-connection pool "
        "spreads upstream connections across egress IPs and shared source ports.",
    )
    parser.add_argument("--version", action="version", version=f"originpool {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="show connectx against plain and bind-before-connect in a throwaway namespace (root)",
    )
    demo.add_argument("--ports", type=int, default=200, help="size of the namespace's port range")
    demo.set_defaults(func=_run_demo)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run

    return run(ports=args.ports)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
