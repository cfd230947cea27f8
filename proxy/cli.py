"""``originpool`` command line: one entry point so operators find every tool in one place."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pool import __version__

if TYPE_CHECKING:
    from proxy.config import Config

# where deploy/ (systemd unit, Dockerfile, Kubernetes) puts the config; `ports` reads it
DEFAULT_CONFIG = "/etc/originpool/originpool.toml"


def build_parser() -> argparse.ArgumentParser:
    """Subcommands are added here as the issues that need them land."""
    parser = argparse.ArgumentParser(
        prog="originpool",
        description="Reverse proxy for HTTP/1.1 and WebSocket whose origin-connection pool "
        "spreads upstream connections across egress IPs and shared source ports.",
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="show connectx against plain and bind-before-connect in a throwaway namespace (root)",
    )
    demo.add_argument("--ports", type=int, default=200, help="size of the namespace's port range")
    demo.set_defaults(func=_run_demo)
    ports = sub.add_parser(
        "ports",
        help="how full each (egress IP, origin) pair of the proxy's is, from its config; "
        "--all for every (source IP, destination) pair in this namespace (no root needed)",
    )
    which = ports.add_mutually_exclusive_group()
    which.add_argument(
        "--config",
        metavar="FILE",
        help="the proxy's TOML config, whose egress IPs and origins make the pairs shown "
        f"(default {DEFAULT_CONFIG}, where the deploy files put it)",
    )
    which.add_argument(
        "--all",
        action="store_true",
        help="every outgoing pair in this namespace, not only the proxy's (no config read)",
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
    from proxy.testbed.cli import add_arguments

    add_arguments(testbed)
    testbed.set_defaults(func=_run_testbed)
    return parser


class _VersionAction(argparse.Action):
    """``--version``: the installed distribution's version, as pip and bug reports see it.

    Looked up only when asked: importing importlib.metadata costs ~75 ms, which every other
    command (``serve`` included) would otherwise pay at start. A checkout run without an
    install (``python -m proxy.cli``) has no metadata, and says the source's version.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", "print the installed version and exit")
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kwargs: Any) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("originpool")
        except PackageNotFoundError:
            found = f"{__version__} (not installed)"
        print(f"originpool {found}")  # stdout, as argparse's own version action prints
        parser.exit()


def _run_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run

    return run(ports=args.ports)


def _run_ports(args: argparse.Namespace) -> int:
    """The proxy's own pairs unless ``--all``: a namespace-wide census shows curl's and every
    client's connections too, and an operator asking "how much room has the proxy left"
    must not read those as the proxy's.

    A config given with ``--config``, or present at the default path, must load (exit 2
    with its problems otherwise: a broken config at the proxy's path is news). With neither,
    there is no proxy here to show: the namespace-wide census, headed as such, as before
    issue 12 (scripts such as ``deploy/egress-ips.sh check`` run before any config exists).
    """
    from pool import census

    scope, note = None, None
    if args.all:
        pass
    elif args.config is None and not Path(DEFAULT_CONFIG).exists():
        note = (
            f"no proxy config at {DEFAULT_CONFIG} (--config FILE for the proxy's pairs): "
            "every pair in this namespace"
        )
    else:  # --all needs none of the proxy's dependencies: a bare python runs it
        from proxy.config import ConfigError

        path = args.config or DEFAULT_CONFIG
        try:
            config = _config_for_ports(path)
        except ConfigError as e:
            for problem in e.problems:
                print(problem, file=sys.stderr)
            print(
                "originpool ports: the proxy's pairs come from its config: fix it, "
                "or pass --all for every pair in this namespace",
                file=sys.stderr,
            )
            return 2
        scope = census.proxy_scope(config.egress.addresses, config.origins, config.egress.mode)
    return census.run(
        as_json=args.json, proto=args.proto, min_util=args.min_util, scope=scope, note=note
    )


_FILE_KEYS = {"listen": ("tls_cert", "tls_key"), "upstream_tls": ("ca_file",)}


def _config_for_ports(path: str) -> Config:
    """The config, checked as ``check-config`` checks it except for the certificate and key
    files: ``ports`` needs only the egress IPs and origins, and the operator running it
    (``ports`` needs no root) may rightly be unable to read the proxy's private key."""
    import tomllib

    from proxy.config import ConfigError, from_dict

    try:
        with open(path, "rb") as f:
            data = tomllib.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError([f"{path}: not a valid TOML file: {e}"]) from None
    for section, keys in _FILE_KEYS.items():
        tables = data.get(section)
        for table in tables if isinstance(tables, list) else [tables]:
            if isinstance(table, dict):
                for key in keys:
                    table.pop(key, None)
    return from_dict(data, path, base_dir=Path(path).resolve().parent)


def _run_check_config(args: argparse.Namespace) -> int:
    from proxy.config import ConfigError, load_on_host

    try:
        config, warnings = load_on_host(args.file)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 2
    for warning in warnings:
        print(warning, file=sys.stderr)
    print(f"{args.file}: ok ({config.summary()})")
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from proxy.app import serve

    return serve(args.config, args.log_format)


def _run_testbed(args: argparse.Namespace) -> int:
    from proxy.testbed.cli import run_args

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
