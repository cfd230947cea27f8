"""The parsed config's types: what :func:`proxy.config.parse` returns and the proxy runs on.

Apart from the parser so that the reader, which builds these, and :mod:`proxy.config`,
whose entry points return them, both import them from a module that imports neither: the
types and their defaults are one place to read, and no import goes round in a circle.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from pool.egress import Egress, EgressSet, Mode
from pool.health_state import HealthCheck
from pool.origin import Origin, PoolLimits, TLSConfig
from pool.sockopt import KeepAlive
from proxy.header_rules import HeaderRules
from proxy.limits import LimitSettings

Address = tuple[str, int]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Balance = Literal["round_robin", "least_conn"]
LogFormat = Literal["json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]

BALANCES: tuple[Balance, ...] = ("round_robin", "least_conn")
LOG_FORMATS: tuple[LogFormat, ...] = ("json", "console")
LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")
DEFAULT_ADMIN = "127.0.0.1:9090"
DEFAULT_TRUSTED_PROXIES = ("127.0.0.1/32", "::1/128")
MAX_WORKERS = 1024  # more than this is a typo (an extra digit), not a machine
# where nginx users look (/run/nginx.pid); `originpool reload` and `stop` read it
DEFAULT_PID_FILE = "/run/originpool.pid"

_POOL_DEFAULTS = PoolLimits()


@dataclass(frozen=True, slots=True)
class Certificate:
    """A certificate and its key (absolute paths; the same file for a combined PEM), served
    for ``names`` (exact or ``*.parent``), or, when empty, the names the certificate holds.
    ``where`` is its key in the config, for messages: ``listen[0].certificates[1]``."""

    cert: str
    key: str
    names: tuple[str, ...] = ()
    where: str = ""


TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")


@dataclass(frozen=True, slots=True)
class Listener:
    """One downstream socket; TLS when it has a certificate (see :mod:`proxy.tls`).

    ``tls_cert``/``tls_key`` is the default pair when set; ``certificates`` holds the
    ``certificates`` array's pairs, then those found in ``certificate_dir`` (read again on
    every load, so a reload sees files added or renewed there)."""

    address: Address
    tls_cert: str | None = None
    tls_key: str | None = None
    certificates: tuple[Certificate, ...] = ()
    certificate_dir: str | None = None
    min_version: str = "TLSv1.2"
    path: str = "listen"  # its key in the config, for messages: listen[0]
    # a PROXY protocol header (v1 or v2) first on every connection, from a trusted proxy
    proxy_protocol: bool = False
    # HTTP/2 next to HTTP/1.1: ALPN h2 on TLS, the h2c preface on cleartext (proxy.choose)
    http2: bool = True

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None or bool(self.certificates)

    @property
    def pairs(self) -> tuple[Certificate, ...]:
        """Every certificate served, the default (served for no or an unknown SNI) first."""
        if self.tls_cert is None or self.tls_key is None:
            return self.certificates
        default = Certificate(self.tls_cert, self.tls_key, (), f"{self.path}.tls_cert")
        return (default, *self.certificates)


@dataclass(frozen=True, slots=True)
class EgressConfig:
    """Source addresses for upstream connections; empty means the kernel's default source.

    ``allow_unassigned``: an address this host does not have at start is a warning, not an
    error, for IPs that are added after the proxy starts (the pool keeps it down until then).
    """

    mode: Mode = "connectx"
    addresses: tuple[Egress, ...] = ()
    allow_unassigned: bool = False


@dataclass(frozen=True, slots=True)
class RouteOrigin:
    """An origin of a route and its share of the route's traffic; ``health_check`` its
    active check (its own table read over its route's), None for none."""

    origin: Origin
    weight: int = 1
    health_check: HealthCheck | None = None
    # new WebSocket sessions a second (whole proxy; 0: no cap) and the seconds over which
    # that cap ramps up after the origin is back (0: none): pool.origin_state.Limits
    max_session_rate: float = 0.0
    slow_start: float = 0.0


@dataclass(frozen=True, slots=True)
class Route:
    """Requests whose Host is ``host`` (or under ``*.suffix``, or any for ``*``) and whose
    path starts with the prefix.

    ``host`` is lower-case without a trailing dot, because Host headers are matched
    case-insensitively and ``example.`` names the same host as ``example``.
    """

    host: str
    path_prefix: str
    origins: tuple[RouteOrigin, ...]
    balance: Balance = "round_robin"
    # "v2"/"v1": a PROXY header on each connection to the origin, which is then not reused
    send_proxy_protocol: Literal["v1", "v2"] | None = None
    # [routes.headers]: header rules and strip_prefix, compiled (proxy.header_rules)
    headers: HeaderRules | None = None

    @property
    def wildcard(self) -> bool:
        return self.host.startswith("*")


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """``[pool]``: limits applied to each origin (see :class:`~pool.origin.PoolLimits`)."""

    max_connections: int = _POOL_DEFAULTS.max_connections
    max_idle: int = _POOL_DEFAULTS.max_idle
    idle_timeout: float = _POOL_DEFAULTS.idle_timeout
    max_lifetime: float | None = _POOL_DEFAULTS.max_lifetime
    max_requests: int = _POOL_DEFAULTS.max_requests
    queue_size: int = _POOL_DEFAULTS.queue_size
    queue_timeout: float = _POOL_DEFAULTS.queue_timeout


@dataclass(frozen=True, slots=True)
class Timeouts:
    """``[timeouts]`` in seconds; ``websocket_idle`` None means no idle limit."""

    connect: float = 5.0  # upstream TCP (and TLS handshake) connect
    header: float = 10.0  # whole request head: slowloris gets 408
    body_idle: float = 60.0  # no request body bytes for this long: 408
    upstream_response: float = 60.0  # origin's response head: 504
    drain: float = 30.0  # on shutdown, in-flight exchanges get this long
    websocket_idle: float | None = None


@dataclass(frozen=True, slots=True)
class TCPKeepAliveSettings:
    """``[tcp_keepalive]`` on client and origin sockets: a peer gone without FIN or RST is
    found after idle + interval x probes seconds (2 min by default); ``idle`` None is off."""

    idle: int | None = 60
    interval: int = 10
    probes: int = 6

    def to_keepalive(self) -> KeepAlive | None:
        return None if self.idle is None else KeepAlive(self.idle, self.interval, self.probes)


@dataclass(frozen=True, slots=True)
class Limits:
    """``[limits]`` on downstream requests; ``max_body_bytes`` None means unlimited."""

    max_header_bytes: int = 16384  # 431
    max_request_line: int = 8192  # 414
    max_body_bytes: int | None = None  # 413
    # downstream connections per worker, all listeners; None ("auto"): as many as the
    # worker's RLIMIT_NOFILE allows at two sockets each (proxy.worker_build.FileBudget)
    max_connections: int | None = None
    # per client address, per worker (proxy.limits); None: off
    conn_per_ip: int | None = None  # nginx's limit_conn
    rate_per_ip: float | None = None  # limit_req's rate, requests a second
    rate_burst: int | None = None  # None: one second's worth
    websocket_rate_per_ip: float | None = None
    websocket_burst: int | None = None
    max_tracked_addresses: int = 100_000

    def client_limits(self) -> LimitSettings:
        return LimitSettings(
            self.conn_per_ip,
            self.rate_per_ip,
            self.rate_burst,
            self.websocket_rate_per_ip,
            self.websocket_burst,
            self.max_tracked_addresses,
        )


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """``[proxy]``: worker processes, whose X-Forwarded-For to believe, the HTTP/1.1 parser,
    the pid file. ``pid_file`` is None when the config leaves it out: the default path is
    then used, and a start that cannot write it only warns (a non-root container has no
    writable /run), while a path the operator set must be writable or nothing starts."""

    workers: int = 1
    pid_file: str | None = None
    http_parser: str = "httptools"  # "h11": the strictness bar itself, ~4x slower per request
    trusted_proxies: tuple[Network, ...] = tuple(
        ipaddress.ip_network(n, strict=False) for n in DEFAULT_TRUSTED_PROXIES
    )

    @property
    def pid_path(self) -> str:
        """The pid file ``serve`` writes and ``reload``/``stop`` read."""
        return self.pid_file or DEFAULT_PID_FILE

    def trusts(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self.trusted_proxies)


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    """``[upstream_tls]``: verification of origins' certificates, on unless configured off."""

    verify: bool = True
    ca_file: str | None = None


@dataclass(frozen=True, slots=True)
class LogSettings:
    """``[log]``: JSON for machines by default, console for people at a terminal.

    ``access_file`` and ``error_file`` (nginx's ``access_log`` and ``error_log``) each take
    their own lines off stdout, absolute once read; None keeps them on stdout, where
    journald and container runtimes collect them. Reopened on SIGUSR1, for logrotate."""

    format: LogFormat = "json"
    level: LogLevel = "info"
    access_file: str | None = None
    error_file: str | None = None


EXPORTERS = ("none", "otlp")


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """``[tracing]``: W3C traceparent to origins and the trace id in the log lines when
    ``enabled``; ``exporter = "otlp"`` also sends one span per request and per WebSocket
    session to ``endpoint`` (OTLP over HTTP; the ``otel`` extra), ``sample_ratio`` of new
    traces sampled (a kept trace keeps its caller's decision)."""

    enabled: bool = False
    exporter: Literal["none", "otlp"] = "none"
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    service_name: str = "originpool"
    sample_ratio: float = 1.0


@dataclass(frozen=True, slots=True)
class Config:
    """A complete, valid configuration; built only by ``proxy.config``'s ``load`` / ``parse``."""

    listen: tuple[Listener, ...]
    routes: tuple[Route, ...]
    admin: Address = ("127.0.0.1", 9090)
    egress: EgressConfig = field(default_factory=EgressConfig)
    pool: PoolSettings = field(default_factory=PoolSettings)
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    upstream_tls: UpstreamTLS = field(default_factory=UpstreamTLS)
    log: LogSettings = field(default_factory=LogSettings)
    tcp_keepalive: TCPKeepAliveSettings = field(default_factory=TCPKeepAliveSettings)
    source: str = "<string>"
    admin_token: str | None = None  # [admin] token: Bearer required on the admin listener
    drain_over: float = 30.0  # [websocket] drain_over: see proxy.config_drain
    tracing: TracingSettings = field(default_factory=TracingSettings)

    @property
    def admission(self) -> dict[Origin, tuple[float, float]]:
        """Each origin's (max_session_rate, slow_start), the first route's that sets one."""
        out: dict[Origin, tuple[float, float]] = {}
        for route in self.routes:
            for ro in route.origins:
                if out.get(ro.origin, (0.0, 0.0)) == (0.0, 0.0):  # unset so far
                    out[ro.origin] = (ro.max_session_rate, ro.slow_start)
        return out

    @property
    def origins(self) -> tuple[Origin, ...]:
        """Distinct origins over all routes, in order of first mention: one pool each."""
        seen: dict[Origin, None] = {}
        for route in self.routes:
            for ro in route.origins:
                seen.setdefault(ro.origin, None)
        return tuple(seen)

    @property
    def health_checks(self) -> dict[Origin, HealthCheck]:
        """Each checked origin's check (one per origin: the reader refuses two)."""
        out: dict[Origin, HealthCheck] = {}
        for route in self.routes:
            for ro in route.origins:
                if ro.health_check is not None:
                    out.setdefault(ro.origin, ro.health_check)
        return out

    def to_pool_limits(self) -> PoolLimits:
        p = self.pool
        return PoolLimits(
            max_connections=p.max_connections,
            max_idle=p.max_idle,
            idle_timeout=p.idle_timeout,
            max_lifetime=p.max_lifetime,
            max_requests=p.max_requests,
            queue_size=p.queue_size,
            queue_timeout=p.queue_timeout,
            connect_timeout=self.timeouts.connect,
        )

    def to_tls_config(self) -> TLSConfig:
        return TLSConfig(verify=self.upstream_tls.verify, ca_file=self.upstream_tls.ca_file)

    def to_egress_set(self, worker: int = 0) -> EgressSet:
        """Worker ``worker`` of ``proxy.workers``: each prefers its own slice of the ports."""
        share = (worker, max(1, self.proxy.workers))
        return EgressSet(self.egress.addresses, self.egress.mode, share=share)

    def summary(self) -> str:
        """One line for ``check-config`` and the startup log."""
        return ", ".join(
            [
                _count_of(len(self.listen), "listener"),
                _count_of(len(self.routes), "route"),
                _count_of(len(self.origins), "origin"),
                _count_of(len(self.egress.addresses), "egress IP"),
                f"mode {self.egress.mode}",
            ]
        )


def _count_of(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
