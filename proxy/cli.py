"""``originpool`` command line: one entry point so operators find every tool in one place."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

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
    # required: a bare `originpool` is a usage error (exit 2), as argparse makes any other
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = sub.add_parser(
        "demo",
        help="show connectx against plain and bind-before-connect in a throwaway namespace (root)",
    )
    demo.add_argument(
        "--ports",
        type=int,
        default=200,
        help="size of the namespace's port range (checked against what the demo can hold)",
    )
    demo.set_defaults(func=_run_demo)
    ports = sub.add_parser(
        "ports",
        help="how full each (egress IP, origin) pair of the proxy's is, from its config; "
        "--all for every (source IP, destination) pair in this namespace (no root needed)",
    )
    which = ports.add_mutually_exclusive_group()
    _config_arguments(
        which,
        "the proxy's TOML config, whose egress IPs and origins make the pairs shown "
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
    _config_arguments(check, f"the TOML config file (default {DEFAULT_CONFIG})")
    check.set_defaults(func=_run_check_config)
    serve = sub.add_parser("serve", help="run the proxy (SIGTERM drains, SIGHUP reloads)")
    _config_arguments(serve, "the TOML config file (required)")
    serve.add_argument("--log-format", choices=("json", "console"), help="override [log] format")
    serve.set_defaults(func=_run_serve)
    for name, what in (
        ("reload", "check the config, then SIGHUP the running proxy (its [proxy] pid_file)"),
        ("stop", "SIGTERM the running proxy (its [proxy] pid_file): it drains, then exits"),
    ):
        control = sub.add_parser(name, help=what)
        _config_arguments(
            control,
            f"the proxy's TOML config, which names its pid_file (default {DEFAULT_CONFIG})",
        )
        control.add_argument(
            "--pid-file", metavar="PATH", help="this pid file instead of the config's"
        )
        control.set_defaults(func=_run_reload if name == "reload" else _run_stop)
    for name, what in (
        ("drain", "stop sending new work to ORIGIN and end its sessions over --over"),
        ("undrain", "let ORIGIN take new requests and sessions again"),
    ):
        control = sub.add_parser(name, help=what + " (through the admin listener)")
        # ORIGIN [FILE] --over S, or ORIGIN --over S --config FILE: argparse takes both
        # positionals together, so a FILE after --over is refused (as after serve's options)
        control.add_argument("origin", metavar="ORIGIN", help="as the route names it")
        _config_arguments(
            control,
            f"the proxy's TOML config: its [admin] address and token (default {DEFAULT_CONFIG})",
        )
        if name == "drain":
            control.add_argument(
                "--over", metavar="SECONDS", help="the window, e.g. 30s (default drain_over)"
            )
        control.set_defaults(func=_run_drain)
    testbed = sub.add_parser(
        "testbed",
        help="the WebSocket origin scenario end to end: how many sessions each egress mode "
        "holds against the physical limit, in a namespace of its own (root)",
    )
    try:
        from testbed.cli import add_arguments
    except ImportError as e:
        # the proxy serves without its testbed (an install that left testbed/ out): only
        # `originpool testbed` says so, with what would bring it
        testbed.set_defaults(func=_no_testbed, why=str(e))
        return parser
    add_arguments(testbed)
    testbed.set_defaults(func=_run_testbed)
    return parser


def _no_testbed(args: argparse.Namespace) -> int:
    print(
        f"originpool testbed: the testbed package cannot be imported ({args.why}); install "
        "originpool with its extra: pip install 'originpool[testbed]' (pip install -e "
        "'.[testbed]' in a checkout)",
        file=sys.stderr,
    )
    return 2


class _VersionAction(argparse.Action):
    """``--version``: the installed distribution's version, as pip and bug reports see it.

    Looked up only when asked: importing importlib.metadata and reading the distribution
    cost 40-55 ms after the CLI's own imports, which every other command (``serve``
    included) would otherwise pay at start. A checkout run without an install
    (``python -m proxy.cli``) has no metadata, and says the source's version.
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


class _Arguments(Protocol):
    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action: ...


def _config_arguments(parser: _Arguments, help_text: str) -> None:
    """``FILE`` and ``--config FILE``, both, wherever a config is read: operators type the
    form one subcommand taught them into the next (issue 18); :func:`_one_config` joins them."""
    parser.add_argument("file", nargs="?", metavar="FILE", help=help_text)
    parser.add_argument("--config", metavar="FILE", help="the same as FILE")


def _one_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``args.config`` becomes the one file given (or None); two different ones are refused."""
    if not hasattr(args, "file"):
        return
    given = {name for name in (args.file, args.config) if name is not None}
    if len(given) > 1:
        parser.error(f"FILE {args.file!r} and --config {args.config!r} differ: give one")
    args.config = given.pop() if given else None
    if args.command == "serve" and args.config is None:
        parser.error("serve needs the config: originpool serve --config FILE (or FILE)")


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


_FILE_KEYS = {
    "listen": ("tls_cert", "tls_key", "certificates", "certificate_dir", "min_version"),
    "upstream_tls": ("ca_file",),
}


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
        config, warnings = load_on_host(args.config or DEFAULT_CONFIG)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 2
    for warning in warnings:
        print(warning, file=sys.stderr)
    print(f"{args.config or DEFAULT_CONFIG}: ok ({config.summary()})")
    return 0


def _run_reload(args: argparse.Namespace) -> int:
    """check-config's answer first: a config the proxy would refuse is not sent to it (its
    workers would log reload_rejected and keep the old one, and the operator would not see
    why); then SIGHUP to the PID in the pid file."""
    from proxy.config import ConfigError, load_on_host

    path = args.config or DEFAULT_CONFIG
    try:
        config, warnings = load_on_host(path)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        print("originpool reload: not sent: the proxy keeps its config", file=sys.stderr)
        return 2
    for warning in warnings:
        print(warning, file=sys.stderr)
    return _signal("reload", args.pid_file or config.proxy.pid_path, signal.SIGHUP)


def _run_stop(args: argparse.Namespace) -> int:
    """Stopping must not need a valid config: only its ``[proxy] pid_file`` is read."""
    path = args.pid_file
    if path is None:
        from proxy.config import ConfigError, pid_file_of

        try:
            path = pid_file_of(args.config or DEFAULT_CONFIG)
        except ConfigError as e:
            for problem in e.problems:
                print(problem, file=sys.stderr)
            print("originpool stop: --pid-file PATH names the file without it", file=sys.stderr)
            return 2
    return _signal("stop", path, signal.SIGTERM)


def _signal(command: str, path: str, sig: signal.Signals) -> int:
    from proxy import pidfile

    try:
        pid = pidfile.send(path, sig)
    except pidfile.PidFileError as e:
        print(f"originpool {command}: {e}", file=sys.stderr)
        return 1
    print(f"originpool {command}: sent {sig.name} to PID {pid} ({path})")
    return 0


def _run_drain(args: argparse.Namespace) -> int:
    """``drain`` / ``undrain``: the admin call of :mod:`proxy.admin_origins`."""
    from proxy.admin_origins import command, parse_over
    from proxy.config import ConfigError, load

    path = args.config or DEFAULT_CONFIG
    over = None
    if getattr(args, "over", None) is not None:
        try:
            over = parse_over(args.over)
        except ValueError as e:
            print(f"originpool drain: {e}", file=sys.stderr)
            return 2
    try:
        config = load(path)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 2
    code, line = command(config.admin, config.admin_token, args.command, args.origin, over)
    print(line, file=sys.stderr if code else sys.stdout)
    return code


def _run_serve(args: argparse.Namespace) -> int:
    from proxy.app import serve

    return serve(args.config, args.log_format)


def _run_testbed(args: argparse.Namespace) -> int:
    from testbed.cli import run_args

    return run_args(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _one_config(parser, args)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
