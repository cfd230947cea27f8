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
    ports = sub.add_parser(
        "ports",
        help="census of this namespace's outgoing sockets per (source IP, destination): "
        "how full each pair's port range is (no root needed)",
    )
    ports.add_argument("--json", action="store_true", help="machine-readable output")
    ports.add_argument("--proto", choices=("tcp", "udp", "all"), default="all")
    ports.add_argument(
        "--min-util", type=float, default=0.0, help="only pairs at least this full (0.0-1.0)"
    )
    ports.set_defaults(func=_run_ports)
    check = sub.add_parser(
        "check-config",
        help="validate a config file: exit 0 if valid, else print every problem and exit 2",
    )
    check.add_argument("file", metavar="FILE", help="the TOML config file")
    check.set_defaults(func=_run_check_config)
    serve = sub.add_parser("serve", help="run the proxy (SIGTERM drains, SIGHUP reloads)")
    serve.add_argument("--config", required=True, metavar="FILE", help="the TOML config file")
    serve.add_argument("--log-format", choices=("json", "console"), help="override [log] format")
    serve.set_defaults(func=_run_serve)
    testbed = sub.add_parser(
        "testbed",
        help="the WebSocket origin scenario end to end: how many sessions each egress mode "
        "holds against the physical limit, in a namespace of its own (root)",
    )
    from proxy.testbed.run import add_arguments

    add_arguments(testbed)
    testbed.set_defaults(func=_run_testbed)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run

    return run(ports=args.ports)


def _run_ports(args: argparse.Namespace) -> int:
    from pool.census import run

    return run(as_json=args.json, proto=args.proto, min_util=args.min_util)


def _run_check_config(args: argparse.Namespace) -> int:
    from proxy.config import ConfigError, load

    try:
        config = load(args.file)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 2
    print(f"{args.file}: ok ({config.summary()})")
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from proxy.app import serve

    return serve(args.config, args.log_format)


def _run_testbed(args: argparse.Namespace) -> int:
    from proxy.testbed.run import run_args

    return run_args(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
