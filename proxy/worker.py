"""One worker process: its listeners, admin port, health checks and drain, built from the
config (:mod:`proxy.worker_build`) and run on its own event loop until told to stop.

Signals, as nginx users expect: SIGTERM/SIGINT stop accepting, let in-flight exchanges
finish within the drain timeout, then exit 0; SIGHUP re-reads the config and applies routes,
egress and limits to *new* connections while established ones keep flowing. Alone, the
process ``serve`` started is the worker; with ``workers = N``, :class:`proxy.app.Master`
forks N of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from dataclasses import replace

import structlog

from pool.origin import Origin, OriginPool
from pool.origin_state import OriginStates
from proxy import accel, binding, sdnotify, tls, whole
from proxy import config as cfg
from proxy import headers as hdrs
from proxy import signals as opsig
from proxy.admin import Admin
from proxy.admin_origins import OriginsAdmin
from proxy.drain import Drainer
from proxy.health import HealthChecker, install
from proxy.metrics_sum import siblings
from proxy.observe import build_tracer
from proxy.server import Listener, Proxy
from proxy.worker_build import (
    build_pool,
    build_router,
    build_settings,
    client_limits,
    origin_limits,
    server_tls,
)

log = structlog.get_logger("originpool")


class Worker:
    """One process's proxy: listeners, admin, signal handling."""

    def __init__(
        self,
        config: cfg.Config,
        path: str | None,
        sockets: binding.WorkerSockets,
        index: int = 0,
        on_ready: Callable[[], object] | None = None,
    ) -> None:
        self.index = index
        self.on_ready = on_ready  # systemd READY=1 when alone, a byte to the master otherwise
        self.config = config
        self.path = path
        self.sockets = sockets  # bound before the fork: see proxy.binding
        self.states = OriginStates(workers=max(1, config.proxy.workers))
        self.proxy = Proxy(
            build_router(config, self.states), build_pool(config, index), build_settings(config)
        )
        self.proxy.limits = client_limits(config)
        self.proxy.tracer = build_tracer(config.tracing)  # None unless [tracing] enabled
        self.admin = Admin(self.proxy)
        # active checks and passive ejection per origin: proxy.health (each worker its own)
        workers = config.proxy.workers
        self.health = HealthChecker(lambda: self.proxy.pool, self.states, index, workers)
        self.admin.health = self.health
        # drain/undrain and admission per origin (issue 20): proxy.drain, proxy.admin_origins
        self.drainer = Drainer(self.states, lambda: self.proxy.sessions, self._close_idle)
        self.states.counter = self._origin_counts
        self.states.configure(origin_limits(config))
        self.origins_admin = OriginsAdmin(
            self.states, self.drainer, config.admin_token, config.drain_over
        )
        self.admin.origins = self.origins_admin
        self.stopped = asyncio.Event()
        self._old_pools: list[OriginPool] = []

    async def start(self) -> None:
        for spec, sock in zip(self.config.listen, self.sockets.listen, strict=True):
            listener = Listener(
                self.proxy,
                sock,
                server_tls(spec),
                proxy_protocol=spec.proxy_protocol,
                http2=spec.http2,
            )
            self.proxy.listeners.append(listener)
            listener.start()
        # worker 0 answers on the admin address, worker i on its port + i; worker 0's
        # /metrics is the sum over all of them, each port's ?scope=worker its own
        self.admin_address = self.sockets.admin.getsockname()[:2]
        await self.admin.start(self.sockets.admin)
        self.health.configure(self.config.health_checks)
        install(self.health)
        if self.index == 0:  # the admin port's /metrics is the whole proxy's: proxy.metrics_sum
            self.admin.peers = siblings(self.config.admin, self.config.proxy.workers)
            self.origins_admin.peers = self.admin.peers  # drain/undrain reach every worker
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        opsig.in_worker(loop, self.request_stop)  # USR1 reopens the logs; QUIT, USR2, WINCH
        log.info(
            "ready",
            listen=[f"{a.address[0]}:{a.address[1]}" for a in self.proxy.listeners],
            admin=f"{self.admin_address[0]}:{self.admin_address[1]}",
            egress=[str(e) for e in self.proxy.pool.egress.egresses],
            mode=self.proxy.pool.egress.mode,
            accelerator=accel.describe(whole.COMPILED and hdrs.COMPILED),
        )
        if self.on_ready is not None:
            self.on_ready()

    def _close_idle(self, origin: Origin, retire: bool) -> None:
        for pool in (self.proxy.pool, *self._old_pools):
            pool.close_idle(origin, retire)

    def _origin_counts(self, origin: Origin) -> tuple[int, int]:
        """(sessions, requests in flight): the proxy counts both as active per origin."""
        sessions = sum(1 for t in self.proxy.sessions if t.origin == origin)
        return sessions, max(0, self.proxy.active(origin) - sessions)

    def request_stop(self) -> None:
        if not self.proxy.draining:
            self.proxy.draining = True  # now: a second signal must not start a second drain
            if self.config.proxy.workers <= 1:
                sdnotify.notify("STOPPING=1")  # alone: this process is systemd's main one
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
            # idle keep-alive connections go at once; HTTP/2's get GOAWAY (last stream id)
            client.drain()
        if self.proxy.clients:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proxy.all_closed.wait(), self.config.timeouts.drain)
        for client in list(self.proxy.clients):
            client.abort()
        await self.health.close()
        await self.proxy.pool.close()
        tracer = self.proxy.tracer
        if tracer is not None and tracer.sink is not None:
            await asyncio.to_thread(tracer.sink.shutdown)  # the spans still held, exported
        for pool in self._old_pools:
            await pool.close()
        await self.admin.close()
        log.info("stopped")
        self.stopped.set()

    def reload(self) -> None:
        if self.path is None:
            return
        try:
            new, warnings = cfg.load_on_host(self.path)
        except cfg.ConfigError as e:
            log.error("reload_rejected", problems=e.problems)
            return
        for warning in warnings:
            log.warning("config_warning", problem=warning)
        if new.log != self.config.log and self.index == 0:  # the files stay open as they are
            log.warning("reload_kept_log", why="[log] is read at start: restart to change it")
        new = keep_bound(self.config, new, warn=self.config.proxy.workers <= 1)
        for listener, spec in zip(self.proxy.listeners, new.listen, strict=True):
            tls.renew(listener.ssl, spec)  # renewed certificates; a failure keeps the old
            listener.proxy_protocol = spec.proxy_protocol  # for connections accepted from now
        self.proxy.router = build_router(new, self.states)
        self.proxy.tracer = build_tracer(new.tracing, self.proxy.tracer)
        self.states.configure(origin_limits(new))
        # an origin no route names any more is drained over drain_over, not kept until its
        # sessions end; one a route names again is admitted again
        self.drainer.routes_changed(self.config.origins, new.origins, new.drain_over)
        self.origins_admin.token = new.admin_token
        self.origins_admin.drain_over = new.drain_over
        self.health.configure(new.health_checks)  # origins that stay keep their verdict
        self.proxy.settings = build_settings(new)
        limits = self.proxy.limits  # open connections stay counted, unchanged buckets kept
        wanted = new.limits.client_limits()
        self.proxy.limits = limits.replaced_by(wanted) if limits else client_limits(new)
        for listener in self.proxy.listeners:
            listener.set_keepalive(self.proxy.settings.tcp_keepalive)
        if (new.egress, new.pool, new.tcp_keepalive) != (
            self.config.egress,
            self.config.pool,
            self.config.tcp_keepalive,
        ):
            self._old_pools.append(self.proxy.pool)
            self.proxy.pool = build_pool(new, self.index)  # old ones finish on their own pool
        self.config = new
        for client in list(self.proxy.clients):
            if getattr(client, "http2", False):
                # GOAWAY (last stream id): its streams finish, the client reconnects and
                # gets the new settings (an HTTP/2 connection's are fixed at its start)
                client.drain()
        log.info("reloaded", routes=len(new.routes), egress=[str(e) for e in new.egress.addresses])


async def run_worker(
    config: cfg.Config,
    path: str | None,
    sockets: binding.WorkerSockets,
    index: int = 0,
    on_ready: Callable[[], object] | None = None,
) -> int:
    worker = Worker(config, path, sockets, index=index, on_ready=on_ready)
    await worker.start()
    await worker.stopped.wait()
    return 0


def _run_one(
    config: cfg.Config,
    path: str | None,
    sockets: binding.WorkerSockets,
    index: int,
    on_ready: Callable[[], object] | None = None,
) -> int:
    structlog.contextvars.bind_contextvars(worker=index, pid=os.getpid())
    runner: Callable[..., int]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        return runner(run_worker(config, path, sockets, index, on_ready))
    finally:  # the closed loop set them back to their defaults: a late USR1 must not kill
        opsig.hold()


def keep_bound(old: cfg.Config, new: cfg.Config, warn: bool) -> cfg.Config:
    """A reloaded config with the listening addresses the sockets were bound to. They are
    bound once, before the fork, and a worker restarted after a reload must serve on the
    sockets the master holds; a changed ``[listen]`` or ``[admin]`` needs a restart, and
    ``warn`` says so once (the master's line, or the lone worker's)."""

    def addresses(c: cfg.Config) -> tuple[object, ...]:
        return (*(spec.address for spec in c.listen), c.admin)

    if addresses(new) == addresses(old):
        return new
    if warn:
        log.warning(
            "reload_kept_listeners",
            why="[listen] and [admin] are bound at start: restart to change them",
            listen=[binding.host_port(spec.address) for spec in old.listen],
            admin=binding.host_port(old.admin),
        )
    return replace(new, listen=old.listen, admin=old.admin)


def failure_reason(exc: BaseException) -> str:
    """One line for an exception that ended a worker: what a worker_failed line and the
    master's worker_died / workers_keep_dying lines name."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _run_logged(
    config: cfg.Config,
    path: str | None,
    sockets: binding.WorkerSockets,
    index: int,
    on_ready: Callable[[], object] | None = None,
) -> tuple[int, str | None]:
    """A worker's run, its exit code and, if it failed, the reason, logged first as a
    ``worker_failed`` line (with the traceback) so a worker never dies unexplained."""
    try:
        return _run_one(config, path, sockets, index, on_ready), None
    except Exception as e:
        reason = failure_reason(e)
        log.error("worker_failed", error=reason, exc_info=e)
        return 1, reason
