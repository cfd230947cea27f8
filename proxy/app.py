"""``originpool serve``: build a worker from the config and run it until told to stop.

Signals, as nginx users expect: SIGTERM/SIGINT stop accepting, let in-flight exchanges
finish within the drain timeout, then exit 0; SIGHUP re-reads the config and applies routes,
egress and limits to *new* connections while established ones keep flowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import sys
from collections.abc import Callable

import structlog

from pool.origin import OriginPool
from proxy import config as cfg
from proxy import logs
from proxy.admin import Admin
from proxy.routing import Route, Router
from proxy.server import Listener, Proxy, Settings

log = structlog.get_logger("originpool")


def build_router(config: cfg.Config) -> Router:
    return Router(
        Route(r.host, r.path_prefix, [(o.origin, o.weight) for o in r.origins], r.balance)
        for r in config.routes
    )


def build_settings(config: cfg.Config) -> Settings:
    lim, t = config.limits, config.timeouts
    return Settings(
        max_header_bytes=lim.max_header_bytes,
        max_request_line=lim.max_request_line,
        max_body_bytes=lim.max_body_bytes or 0,
        max_connections=lim.max_connections,
        header_timeout=t.header,
        body_idle_timeout=t.body_idle,
        upstream_response_timeout=t.upstream_response,
        trusted_proxies=config.proxy.trusted_proxies,
    )


def build_pool(config: cfg.Config) -> OriginPool:
    return OriginPool(config.to_egress_set(), config.to_pool_limits(), config.to_tls_config())


def _server_tls(listener: cfg.Listener) -> ssl.SSLContext | None:
    if not listener.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(listener.tls_cert, listener.tls_key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class Worker:
    """One process's proxy: listeners, admin, signal handling."""

    def __init__(self, config: cfg.Config, path: str | None, reuse_port: bool = False) -> None:
        self.config = config
        self.path = path
        self.reuse_port = reuse_port
        self.proxy = Proxy(build_router(config), build_pool(config), build_settings(config))
        self.admin = Admin(self.proxy)
        self.stopped = asyncio.Event()
        self._old_pools: list[OriginPool] = []

    async def start(self) -> None:
        for spec in self.config.listen:
            listener = Listener(
                self.proxy, spec.address, _server_tls(spec), reuse_port=self.reuse_port
            )
            self.proxy.listeners.append(listener)
            listener.start()
        await self.admin.start(*self.config.admin)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        log.info(
            "ready",
            listen=[f"{a.address[0]}:{a.address[1]}" for a in self.proxy.listeners],
            admin=f"{self.config.admin[0]}:{self.config.admin[1]}",
            egress=[str(e) for e in self.proxy.pool.egress.egresses],
            mode=self.proxy.pool.egress.mode,
        )

    def request_stop(self) -> None:
        if not self.proxy.draining:
            asyncio.get_running_loop().create_task(self.drain())

    async def drain(self) -> None:
        """Stop accepting, give in-flight exchanges the drain timeout, then stop."""
        self.proxy.draining = True
        for listener in self.proxy.listeners:
            listener.close()
        log.info("draining", clients=len(self.proxy.clients))
        for session in list(self.proxy.sessions):
            session.shutdown()  # Close 1001 both ways; the peers answer and close
        for client in list(self.proxy.clients):
            if client.exchange is None:
                client.close()  # idle keep-alive connections go at once
        if self.proxy.clients:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proxy.all_closed.wait(), self.config.timeouts.drain)
        for client in list(self.proxy.clients):
            client.abort()
        await self.proxy.pool.close()
        for pool in self._old_pools:
            await pool.close()
        await self.admin.close()
        log.info("stopped")
        self.stopped.set()

    def reload(self) -> None:
        if self.path is None:
            return
        try:
            new = cfg.load(self.path)
        except cfg.ConfigError as e:
            log.error("reload_rejected", problems=e.problems)
            return
        self.proxy.router = build_router(new)
        self.proxy.settings = build_settings(new)
        if new.egress != self.config.egress or new.pool != self.config.pool:
            self._old_pools.append(self.proxy.pool)
            self.proxy.pool = build_pool(new)  # old connections finish on their own pool
        self.config = new
        log.info("reloaded", routes=len(new.routes), egress=[str(e) for e in new.egress.addresses])


async def run_worker(
    config: cfg.Config, path: str | None, on_ready: Callable[[], None] | None = None
) -> int:
    worker = Worker(config, path, reuse_port=config.proxy.workers > 1)
    await worker.start()
    if on_ready:
        on_ready()
    await worker.stopped.wait()
    return 0


def serve(path: str, log_format: str | None = None) -> int:
    try:
        config = cfg.load(path)
    except cfg.ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    logs.configure(log_format or config.log.format, config.log.level)
    runner: Callable[..., int]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(run_worker(config, path))
