"""The reader: one walk over a decoded TOML document that collects every problem.

Apart from :mod:`proxy.config` because the walk is the bulk of the work (which keys each
table knows, their defaults, what is required, what collides) while the entry points
only decode text and raise :class:`~proxy.config.ConfigError`; each value is checked by
:mod:`proxy.config_values`, and the reader puts the key path in front of its reason.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import ssl
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pool.egress import MODES, Egress, Mode
from pool.health_state import HealthCheck
from pool.origin import Origin
from proxy.config_client import CLIENT_LIMIT_FIELDS, limit_problems, send_proxy
from proxy.config_drain import ADMISSION_KEYS, DrainKeys
from proxy.config_health import HealthKeys
from proxy.config_model import (
    _POOL_DEFAULTS,
    BALANCES,
    DEFAULT_ADMIN,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_WORKERS,
    Address,
    Config,
    EgressConfig,
    Limits,
    Listener,
    LogSettings,
    PoolSettings,
    ProxySettings,
    Route,
    RouteOrigin,
    TCPKeepAliveSettings,
    Timeouts,
    UpstreamTLS,
)
from proxy.config_tls import TLSKeys
from proxy.config_trace import TraceKeys
from proxy.config_values import (
    _auto,
    _boolean,
    _choice,
    _integer,
    _Invalid,
    _origin_url,
    _path_prefix,
    _route_host,
    _seconds,
    _show,
    _string,
    _zero_is_none,
    parse_address,
)

T = TypeVar("T")

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key(path: str, key: object) -> str:
    text = str(key)
    if not _BARE_KEY.fullmatch(text):
        text = '"' + text.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
    return f"{path}.{text}" if path else text


Check = Callable[[Any], Any]

TOP_KEYS = (
    "listen",
    "admin",
    "egress",
    "routes",
    "pool",
    "timeouts",
    "limits",
    "proxy",
    "upstream_tls",
    "log",
    "tcp_keepalive",
    "websocket",
    "tracing",
)
# tuples grown below by the keys each feature adds
LISTEN_KEYS: tuple[str, ...]
ROUTE_KEYS: tuple[str, ...]
LISTEN_KEYS = ("address", "tls_cert", "tls_key", "certificates", "certificate_dir", "min_version")
LISTEN_KEYS += ("proxy_protocol",)
LISTEN_KEYS += ("http2",)  # false: HTTP/1.1 only (no ALPN h2, no h2c preface)
ADMIN_KEYS = ("address", "token")
EGRESS_KEYS = ("mode", "addresses", "allow_unassigned")
ROUTE_KEYS = ("host", "path_prefix", "origins", "balance", "health_check")
ORIGIN_KEYS = ("url", "weight", "health_check", *ADMISSION_KEYS)
ROUTE_KEYS += ("send_proxy_protocol",)
ROUTE_KEYS += ("headers",)  # [routes.headers]: proxy.config_trace

_d = _POOL_DEFAULTS
POOL_FIELDS: dict[str, tuple[Check, Any]] = {
    "max_connections": (_integer(1), _d.max_connections),
    "max_idle": (_integer(0, zero="0 = keep none idle"), _d.max_idle),
    "idle_timeout": (_seconds(), _d.idle_timeout),
    "max_lifetime": (_seconds("off"), _d.max_lifetime),
    "max_requests": (_integer(1), _d.max_requests),
    "queue_size": (_integer(0, zero="0 = refuse at once when all are busy"), _d.queue_size),
    "queue_timeout": (_seconds(), _d.queue_timeout),
}
TIMEOUT_FIELDS: dict[str, tuple[Check, Any]] = {
    "connect": (_seconds(), 5.0),
    "header": (_seconds(), 10.0),
    "body_idle": (_seconds(), 60.0),
    "upstream_response": (_seconds(), 60.0),
    "drain": (_seconds("now"), 30.0),
    "websocket_idle": (_seconds("off"), None),
}
LIMIT_FIELDS: dict[str, tuple[Check, Any]] = {
    "max_header_bytes": (_integer(1, unit="a number of bytes"), 16384),
    "max_request_line": (_integer(1, unit="a number of bytes"), 8192),
    "max_body_bytes": (
        _zero_is_none(_integer(0, unit="a number of bytes", zero="0 = unlimited")),
        None,
    ),
    "max_connections": (_auto(_integer(1)), None),
    **CLIENT_LIMIT_FIELDS,
}
# the kernel's limits: TCP_KEEPIDLE and TCP_KEEPINTVL up to 32767 s, TCP_KEEPCNT up to 127
KEEPALIVE_FIELDS: dict[str, tuple[Check, Any]] = {
    "idle": (
        _zero_is_none(_integer(0, 32767, unit="a number of seconds", zero="0 = off")),
        60,
    ),
    "interval": (_integer(1, 32767, unit="a number of seconds"), 10),
    "probes": (_integer(1, 127), 6),
}
LOG_FIELDS: dict[str, tuple[Check, Any]] = {
    "format": (_choice(LOG_FORMATS), "json"),
    "level": (_choice(LOG_LEVELS), "info"),
}
# nginx's access_log and error_log; paths, so their checks are the reader's (see read)
LOG_FILE_KEYS = ("access_file", "error_file")
PROXY_KEYS = ("workers", "trusted_proxies", "http_parser", "pid_file")
HTTP_PARSERS = ("httptools", "h11")
UPSTREAM_TLS_KEYS = ("verify", "ca_file")


def _password_refused() -> bytes:
    """An encrypted key cannot be unlocked at startup without a prompt: refuse, don't block."""
    return b""


class _Reader(HealthKeys, TLSKeys, DrainKeys, TraceKeys):
    """One pass over a decoded document; ``problems`` in the order found."""

    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir
        self.problems: list[str] = []
        # the [egress] section as read, even when the document has problems elsewhere: the
        # host's checks of it are then still asked (see proxy.config.load_on_host)
        self.egress_read: EgressConfig | None = None
        self.route_health: HealthCheck | None = None  # the route's, while its origins are read

    def problem(self, path: str, reason: str) -> None:
        self.problems.append(f"{self.source}: {path}: {reason}")

    # -- structure ------------------------------------------------------------------------

    def table(self, value: Any, path: str, known: Sequence[str]) -> Mapping[str, Any] | None:
        """``value`` if it is a table, with every key not in ``known`` reported."""
        if not isinstance(value, Mapping):
            self.problem(path, f"must be a table, got {_show(value)}")
            return None
        for key in value:
            if str(key) in known:
                continue
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"known keys: {', '.join(known)}"
            self.problem(_key(path, key), f"unknown key; {hint}")
        return value

    def section(
        self, data: Mapping[str, Any], name: str, known: Sequence[str]
    ) -> Mapping[str, Any]:
        """An optional top-level table: ``{}`` when absent (or wrong, once reported)."""
        if name not in data:
            return {}
        return self.table(data[name], name, known) or {}

    def field(self, table: Mapping[str, Any], path: str, key: str, check: Check, default: T) -> T:
        if key not in table:
            return default
        try:
            return check(table[key])
        except _Invalid as e:
            self.problem(_key(path, key), e.reason)
            return default

    def fields(
        self, data: Mapping[str, Any], name: str, spec: Mapping[str, tuple[Check, Any]]
    ) -> dict[str, Any]:
        table = self.section(data, name, tuple(spec))
        return {k: self.field(table, name, k, check, d) for k, (check, d) in spec.items()}

    def array(self, table: Mapping[str, Any], path: str, key: str) -> list[Any] | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, list):
            self.problem(_key(path, key), f"must be an array, got {_show(value)}")
            return None
        return value

    def file(self, what: str) -> Check:
        """A path (relative to the config's directory) to a readable regular file."""

        def check(value: Any) -> str:
            text = _string(value, f"the path of {what}")
            if not text or "\x00" in text:
                raise _Invalid(f"must be the path of {what}, got {_show(value)}")
            path = self.base_dir / text
            try:
                if not path.exists():
                    raise _Invalid(f"{text!r}: no such file")
                if not path.is_file():
                    raise _Invalid(f"{text!r}: not a regular file")
                if not os.access(path, os.R_OK):
                    raise _Invalid(f"{text!r}: not readable by this user")
            except (OSError, ValueError) as e:  # name too long, undecodable, ...
                raise _Invalid(f"{text!r}: {getattr(e, 'strerror', None) or e}") from None
            return os.fspath(path.resolve())

        return check

    def new_file(self, what: str) -> Check:
        """A path the proxy writes (relative to the config's directory), made absolute: the
        file need not exist yet, and whether it can be written is the host's answer at start."""

        def check(value: Any) -> str:
            text = _string(value, f"the path of {what}")
            if not text.strip() or "\x00" in text or text.endswith("/"):
                raise _Invalid(f"must be the path of {what}, got {_show(value)}")
            return os.path.normpath(self.base_dir / text)

        return check

    # -- the document ---------------------------------------------------------------------

    def read(self, data: Mapping[str, Any]) -> Config | None:
        if self.table(data, "", TOP_KEYS) is None:
            return None
        listen = self.listeners(data)
        admin = self.admin(data, listen)
        egress = self.egress_read = self.egress(data)
        routes = self.routes(data, egress)
        pool = PoolSettings(**self.fields(data, "pool", POOL_FIELDS))
        timeouts = Timeouts(**self.fields(data, "timeouts", TIMEOUT_FIELDS))
        limits = Limits(**self.fields(data, "limits", LIMIT_FIELDS))
        for key, reason in limit_problems(data.get("limits")):
            self.problem(_key("limits", key), reason)
        proxy = self.proxy(data)
        upstream_tls = self.upstream_tls(data)
        log_files = {key: (self.new_file(f"the {key[:-5]} log"), None) for key in LOG_FILE_KEYS}
        log = LogSettings(**self.fields(data, "log", {**LOG_FIELDS, **log_files}))
        keepalive = TCPKeepAliveSettings(**self.fields(data, "tcp_keepalive", KEEPALIVE_FIELDS))
        admin_table = data.get("admin")
        token = self.admin_token(admin_table if isinstance(admin_table, Mapping) else {})
        drain_over = self.drain_over(data)
        tracing = self.tracing(data)
        self.admission_conflicts(
            [
                (f"routes[{i}].origins[{j}]", ro.origin, (ro.max_session_rate, ro.slow_start))
                for i, route in enumerate(routes)
                for j, ro in enumerate(route.origins)
            ]
        )
        if self.problems:
            return None
        return Config(
            listen=tuple(listener for _path, listener in listen),
            routes=tuple(routes),
            admin=admin,
            egress=egress,
            pool=pool,
            timeouts=timeouts,
            limits=limits,
            proxy=proxy,
            upstream_tls=upstream_tls,
            log=log,
            tcp_keepalive=keepalive,
            source=self.source,
            admin_token=token,
            drain_over=drain_over,
            tracing=tracing,
        )

    def listeners(self, data: Mapping[str, Any]) -> list[tuple[str, Listener]]:
        value = data.get("listen")
        if value is None:
            self.problem("listen", "required: a [listen] table with address = 'IP:PORT'")
            return []
        if isinstance(value, Mapping):
            items = [("listen", value)]
        elif isinstance(value, list):
            items = [(f"listen[{i}]", item) for i, item in enumerate(value)]
            if not items:
                self.problem("listen", "at least one listener is required")
        else:
            self.problem(
                "listen",
                f"must be a table [listen] or an array of tables [[listen]], got {_show(value)}",
            )
            return []
        out: list[tuple[str, Listener]] = []
        for path, item in items:
            table = self.table(item, path, LISTEN_KEYS)
            if table is None:
                continue
            if "address" not in table:
                self.problem(_key(path, "address"), "required, e.g. '127.0.0.1:8080'")
            address = self.field(table, path, "address", parse_address, None)
            cert = self.field(table, path, "tls_cert", self.file("a PEM certificate chain"), None)
            key = self.field(table, path, "tls_key", self.file("a PEM private key"), None)
            for present, missing in (("tls_cert", "tls_key"), ("tls_key", "tls_cert")):
                if present in table and missing not in table:
                    self.problem(
                        _key(path, missing), f"required when {present} is set (TLS needs both)"
                    )
            if cert and key:
                try:
                    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                    ctx.load_cert_chain(cert, key, password=_password_refused)
                except (ssl.SSLError, OSError) as e:
                    self.problem(
                        _key(path, "tls_cert"),
                        f"cannot load this certificate with tls_key (not PEM, not a matching "
                        f"pair, or an encrypted key): {e}",
                    )
            pairs, directory, min_version = self.listener_tls(table, path, cert is not None)
            pp = self.field(table, path, "proxy_protocol", _boolean, False)
            h2 = self.field(table, path, "http2", _boolean, True)
            if address is not None:
                spec = Listener(address, cert, key, pairs, directory, min_version, path, pp, h2)
                out.append((path, spec))
        self._collisions(out)
        return out

    def _collisions(self, listeners: Sequence[tuple[str, Listener]]) -> None:
        for i, (path, listener) in enumerate(listeners):
            for other_path, other in listeners[:i]:
                if _collide(listener.address, other.address):
                    self.problem(
                        _key(path, "address"),
                        f"{_fmt(listener.address)} collides with {other_path}.address "
                        f"({_fmt(other.address)}): both cannot bind",
                    )
                    break

    def admin(self, data: Mapping[str, Any], listen: Sequence[tuple[str, Listener]]) -> Address:
        table = self.section(data, "admin", ADMIN_KEYS)
        default = parse_address(DEFAULT_ADMIN)
        address: Address = self.field(table, "admin", "address", parse_address, default)
        for path, listener in listen:
            if _collide(address, listener.address):
                self.problem(
                    "admin.address",
                    f"{_fmt(address)} collides with {path}.address ({_fmt(listener.address)}): "
                    "the admin endpoint needs a port of its own",
                )
                break
        return address

    def egress(self, data: Mapping[str, Any]) -> EgressConfig:
        table = self.section(data, "egress", EGRESS_KEYS)
        mode: Mode = self.field(table, "egress", "mode", _choice(MODES), "connectx")
        items = self.array(table, "egress", "addresses") or []
        parsed: list[Egress] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            path = f"egress.addresses[{i}]"
            if not isinstance(item, str):
                self.problem(
                    path,
                    f"must be a string like '127.0.1.1' or '127.0.1.1:40000-40499', "
                    f"got {_show(item)}",
                )
                continue
            try:
                egress = Egress.parse(item)
            except (ValueError, OSError) as e:
                self.problem(path, str(e))
                continue
            try:
                ip = str(ipaddress.ip_address(egress.ip))
            except ValueError:
                ip = egress.ip
            if ip in seen:
                self.problem(
                    path,
                    f"duplicate IP {ip} (also egress.addresses[{seen[ip]}]): one entry per IP; "
                    "a port window slices one IP's range between hosts, not within one",
                )
                continue
            seen[ip] = i
            parsed.append(egress)
        allow = self.field(table, "egress", "allow_unassigned", _boolean, False)
        if mode == "plain" and items:
            # the addresses would be silently ignored: the operator meant one or the other
            self.problem(
                "egress.addresses",
                'set while egress.mode = "plain", which uses only the kernel\'s default '
                "source and would ignore them: remove egress.addresses, or set egress.mode "
                'to "connectx" (or "bind") to use them',
            )
        # 'bind' ignores the windows: accepted, so a side-by-side run changes one line
        return EgressConfig(mode, tuple(parsed), allow)

    def routes(self, data: Mapping[str, Any], egress: EgressConfig) -> list[Route]:
        value = data.get("routes")
        if value is None:
            self.problem("routes", "required: at least one [[routes]] table with host and origins")
            return []
        if isinstance(value, Mapping):
            self.problem("routes", "must be an array of tables: write [[routes]], not [routes]")
            return []
        if not isinstance(value, list):
            self.problem("routes", f"must be an array of tables [[routes]], got {_show(value)}")
            return []
        if not value:
            self.problem("routes", "at least one route is required")
        families = {4 if ":" not in e.ip else 6 for e in egress.addresses}
        out: list[Route] = []
        seen: dict[tuple[str, str], str] = {}
        for i, item in enumerate(value):
            path = f"routes[{i}]"
            table = self.table(item, path, ROUTE_KEYS)
            if table is None:
                continue
            if "host" not in table:
                self.problem(_key(path, "host"), "required: 'app.example', '*.example' or '*'")
            host = self.field(table, path, "host", _route_host, None)
            prefix = self.field(table, path, "path_prefix", _path_prefix, "/")
            balance = self.field(table, path, "balance", _choice(BALANCES), "round_robin")
            proxy_to = self.field(table, path, "send_proxy_protocol", send_proxy, None)
            rules = self.route_headers(table, path)
            self.route_health = self.health_check(table, path)
            origins = self.route_origins(table, path, families)
            if host is None or origins is None:
                continue
            if (host, prefix) in seen:
                self.problem(
                    path,
                    f"same host and path_prefix as {seen[host, prefix]} ({host!r}, {prefix!r}): "
                    "the second could never match",
                )
                continue
            seen[host, prefix] = path
            out.append(Route(host, prefix, origins, balance, proxy_to, rules))
        self.health_conflicts(
            [
                (f"routes[{i}].origins[{j}]", ro.origin, ro.health_check)
                for i, route in enumerate(out)
                for j, ro in enumerate(route.origins)
            ]
        )
        return out

    def route_origins(
        self, table: Mapping[str, Any], path: str, families: set[int]
    ) -> tuple[RouteOrigin, ...] | None:
        key = _key(path, "origins")
        if "origins" not in table:
            self.problem(key, "required: a non-empty array of origin URLs")
            return None
        items = self.array(table, path, "origins")
        if items is None:
            return None
        if not items:
            self.problem(key, "must not be empty: requests would have nowhere to go")
            return None
        out: list[RouteOrigin] = []
        seen: dict[Origin, str] = {}
        ok = True
        for j, item in enumerate(items):
            item_path = f"{key}[{j}]"
            entry = self.route_origin(item, item_path)
            if entry is None:
                ok = False
                continue
            origin = entry.origin
            if origin in seen:
                self.problem(
                    item_path,
                    f"same origin as {seen[origin]} ({origin}): raise its weight instead",
                )
                ok = False
                continue
            seen[origin] = item_path
            family = _family(origin.host)
            if families and family is not None and family not in families:
                self.problem(
                    item_path,
                    f"{origin} is IPv{family} but no egress address is: "
                    "no source address can reach it",
                )
                ok = False
                continue
            out.append(entry)
        return tuple(out) if ok else None

    def route_origin(self, item: Any, path: str) -> RouteOrigin | None:
        if isinstance(item, Mapping):
            before = len(self.problems)
            self.table(item, path, ORIGIN_KEYS)
            if "url" not in item:
                self.problem(_key(path, "url"), "required, e.g. 'http://127.0.2.1:9000'")
            origin = self.field(item, path, "url", _origin_url, None)
            weight = self.field(item, path, "weight", _integer(1, unit="an integer weight"), 1)
            if origin is None or len(self.problems) > before:
                return None
            rate, slow = self.admission(item, path)
            if len(self.problems) > before:
                return None
            return RouteOrigin(
                origin,
                weight,
                health_check=self.health_check(item, path, self.route_health),
                max_session_rate=rate,
                slow_start=slow,
            )
        if not isinstance(item, str):
            self.problem(
                path,
                f"must be a URL string or a table {{url = '...', weight = N}}, got {_show(item)}",
            )
            return None
        try:
            return RouteOrigin(_origin_url(item), health_check=self.route_health)
        except _Invalid as e:
            self.problem(path, e.reason)
            return None

    def proxy(self, data: Mapping[str, Any]) -> ProxySettings:
        table = self.section(data, "proxy", PROXY_KEYS)
        workers = self.field(table, "proxy", "workers", _integer(1, MAX_WORKERS), 1)
        parser = self.field(table, "proxy", "http_parser", _choice(HTTP_PARSERS), "httptools")
        networks = list(ProxySettings().trusted_proxies)
        items = self.array(table, "proxy", "trusted_proxies")
        if items is not None:
            networks = []
            for i, item in enumerate(items):
                path = f"proxy.trusted_proxies[{i}]"
                if not isinstance(item, str):
                    self.problem(
                        path, f"must be a CIDR string like '10.0.0.0/8', got {_show(item)}"
                    )
                    continue
                try:
                    networks.append(ipaddress.ip_network(item.strip(), strict=False))
                except ValueError as e:
                    self.problem(path, str(e))
        pid_file = self.field(table, "proxy", "pid_file", self.new_file("the pid file"), None)
        return ProxySettings(
            workers=workers,
            trusted_proxies=tuple(networks),
            http_parser=parser,
            pid_file=pid_file,
        )

    def upstream_tls(self, data: Mapping[str, Any]) -> UpstreamTLS:
        table = self.section(data, "upstream_tls", UPSTREAM_TLS_KEYS)
        verify = self.field(table, "upstream_tls", "verify", _boolean, True)
        ca_file = self.field(table, "upstream_tls", "ca_file", self.file("a PEM CA bundle"), None)
        if ca_file is not None:
            try:
                ssl.create_default_context(cafile=ca_file)
            except (ssl.SSLError, OSError, ValueError) as e:
                self.problem("upstream_tls.ca_file", f"cannot load as a PEM CA bundle: {e}")
        return UpstreamTLS(verify=verify, ca_file=ca_file)


def _family(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None  # a name: its addresses are only known when it resolves


def _collide(a: Address, b: Address) -> bool:
    """Same port and the same IP, or one is the wildcard of the other's family."""
    if a[1] != b[1]:
        return False
    ia, ib = ipaddress.ip_address(a[0].split("%")[0]), ipaddress.ip_address(b[0].split("%")[0])
    if ia.version != ib.version:
        return False
    return a[0] == b[0] or ia.is_unspecified or ib.is_unspecified


def _fmt(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
