"""What a worker is built from, made from the config: its routes, pool, settings,
per-address limits and per-origin admission, and the open-file budget that sizes its
connection limit. Built at start and again on SIGHUP (:meth:`proxy.worker.Worker.reload`);
the checks of the budget also run in ``serve`` before any worker exists.
"""

from __future__ import annotations

import resource
import ssl
from dataclasses import dataclass

from pool.origin import Origin, OriginPool
from pool.origin_state import Limits, OriginStates
from proxy import config as cfg
from proxy import tls
from proxy.limits import ClientLimits
from proxy.routing import Route, Router
from proxy.server import Settings


def build_router(config: cfg.Config, states: OriginStates | None = None) -> Router:
    """The routes; ``states`` (the worker's, kept across reloads) makes them skip origins
    that are draining or down (:mod:`pool.origin_state`)."""
    return Router(
        (
            Route(
                r.host,
                r.path_prefix,
                [(o.origin, o.weight) for o in r.origins],
                r.balance,
                send_proxy=r.send_proxy_protocol,
                headers=r.headers,
            )
            for r in config.routes
        ),
        states,
    )


@dataclass(frozen=True, slots=True)
class FileBudget:
    """How many downstream connections one worker's open-file limit can carry.

    A proxied session holds two sockets (client and origin) and a worker needs a few more
    files of its own (listeners, admin, the event loop, log files, netlink): ``RESERVE``.
    ``RLIMIT_NOFILE`` is per process, so each worker has the whole budget. A connection
    limit the budget cannot carry fails late and confusingly (EMFILE on accept or on an
    upstream connect under load), so the default ("auto") is derived from the limit the
    process really got, and an explicit limit above it is warned about at start with the
    arithmetic, so the fix is obvious.
    """

    nofile: int
    SOCKETS_PER_SESSION = 2
    RESERVE = 64

    @classmethod
    def of_this_process(cls) -> FileBudget:
        return cls(resource.getrlimit(resource.RLIMIT_NOFILE)[0])

    @property
    def max_connections(self) -> int:
        """The most connections the limit carries: what ``max_connections = "auto"`` means."""
        return max(1, (self.nofile - self.RESERVE) // self.SOCKETS_PER_SESSION)

    def files_for(self, max_connections: int) -> int:
        return max_connections * self.SOCKETS_PER_SESSION + self.RESERVE

    def shortfall(self, max_connections: int) -> str | None:
        """None if ``max_connections`` fits, else the one-line arithmetic and the fix."""
        need = self.files_for(max_connections)
        if need <= self.nofile:
            return None
        return (
            f"max_connections {max_connections:,} x {self.SOCKETS_PER_SESSION} sockets + "
            f"{self.RESERVE} reserve = {need:,} > RLIMIT_NOFILE {self.nofile:,} per worker: "
            f'lower [limits] max_connections to {self.max_connections:,} (or to "auto") '
            "or raise LimitNOFILE"
        )


def max_connections(config: cfg.Config) -> int:
    """The configured limit, or for "auto" what this process's file limit carries."""
    return config.limits.max_connections or FileBudget.of_this_process().max_connections


def client_limits(config: cfg.Config) -> ClientLimits | None:
    """The per-address limits (:mod:`proxy.limits`), None when all are off: then the data
    path pays one ``is None`` per connection and per request for them."""
    settings = config.limits.client_limits()
    return ClientLimits(settings) if settings.any else None


def build_settings(config: cfg.Config) -> Settings:
    lim, t = config.limits, config.timeouts
    return Settings(
        max_header_bytes=lim.max_header_bytes,
        max_request_line=lim.max_request_line,
        max_body_bytes=lim.max_body_bytes or 0,
        max_connections=max_connections(config),
        header_timeout=t.header,
        body_idle_timeout=t.body_idle,
        upstream_response_timeout=t.upstream_response,
        websocket_idle_timeout=t.websocket_idle or 0.0,
        trusted_proxies=config.proxy.trusted_proxies,
        http_parser=config.proxy.http_parser,
        tcp_keepalive=config.tcp_keepalive.to_keepalive(),
    )


def build_pool(config: cfg.Config, worker: int = 0) -> OriginPool:
    """The worker's pool, following the host's addresses (called on its running loop)."""
    pool = OriginPool(
        config.to_egress_set(worker),
        config.to_pool_limits(),
        config.to_tls_config(),
        keepalive=config.tcp_keepalive.to_keepalive(),
    )
    pool.watch_egress()
    return pool


def server_tls(listener: cfg.Listener) -> ssl.SSLContext | None:
    """The listener's context: every certificate it has, picked by SNI (:mod:`proxy.tls`)."""
    return tls.server_context(listener)


def origin_limits(config: cfg.Config) -> dict[Origin, Limits]:
    return {o: Limits(rate, slow) for o, (rate, slow) in config.admission.items()}


def startup_warnings(config: cfg.Config, nofile: int) -> list[tuple[str, dict[str, object]]]:
    """(event, fields) of each start-up warning that depends on what this process got."""
    wanted = config.limits.max_connections
    why = FileBudget(nofile).shortfall(wanted) if wanted is not None else None
    if why is None:
        return []  # "auto" fits by construction
    return [("open_file_limit_low", {"nofile": nofile, "max_connections": wanted, "why": why})]
