"""``originpool serve``: build a worker from the config and run it until told to stop.

Signals, as nginx users expect: SIGTERM/SIGINT stop accepting, let in-flight exchanges
finish within the drain timeout, then exit 0; SIGHUP re-reads the config and applies routes,
egress and limits to *new* connections while established ones keep flowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import select
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import structlog

from pool.origin import Origin, OriginPool
from pool.origin_state import Limits, OriginStates
from proxy import accel, binding, logs, pidfile, sdnotify, tls, whole
from proxy import config as cfg
from proxy import headers as hdrs
from proxy import signals as opsig
from proxy.admin import Admin
from proxy.admin_origins import OriginsAdmin
from proxy.drain import Drainer
from proxy.health import HealthChecker, install
from proxy.limits import ClientLimits
from proxy.metrics_sum import siblings
from proxy.observe import build_tracer
from proxy.routing import Route, Router
from proxy.server import Listener, Proxy, Settings

log = structlog.get_logger("originpool")


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


def _server_tls(listener: cfg.Listener) -> ssl.SSLContext | None:
    """The listener's context: every certificate it has, picked by SNI (:mod:`proxy.tls`)."""
    return tls.server_context(listener)


def origin_limits(config: cfg.Config) -> dict[Origin, Limits]:
    return {o: Limits(rate, slow) for o, (rate, slow) in config.admission.items()}


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
                _server_tls(spec),
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


def raise_open_files() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit: containers often start at 1024 (~500 sessions)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def startup_warnings(config: cfg.Config, nofile: int) -> list[tuple[str, dict[str, object]]]:
    """(event, fields) of each start-up warning that depends on what this process got."""
    wanted = config.limits.max_connections
    why = FileBudget(nofile).shortfall(wanted) if wanted is not None else None
    if why is None:
        return []  # "auto" fits by construction
    return [("open_file_limit_low", {"nofile": nofile, "max_connections": wanted, "why": why})]


def serve(path: str, log_format: str | None = None) -> int:
    opsig.hold()  # USR1 & co. wait for their handlers instead of killing (proxy.signals)
    try:
        config, warnings = cfg.load_on_host(path)
    except cfg.ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    try:
        logs.configure(
            log_format or config.log.format,
            config.log.level,
            config.log.access_file,
            config.log.error_file,
        )
    except logs.LogFileError as e:
        print(f"{config.source}: {e}", file=sys.stderr)  # check-config passed: the host changed
        return 1
    for warning in warnings:
        log.warning("config_warning", problem=warning)
    soft, _hard = raise_open_files()
    for event, fields in startup_warnings(config, soft):
        log.warning(event, **fields)
    try:
        bound = binding.bind_all(
            [spec.address for spec in config.listen], config.admin, max(1, config.proxy.workers)
        )
    except binding.BindError as e:
        print(str(e), file=sys.stderr)  # one line, before any worker exists: exit 1
        return 1
    try:
        pid_path = claim_pid_file(config)
    except pidfile.PidFileError as e:
        print(f"originpool serve: {e}", file=sys.stderr)  # a pid_file the config names
        return 2
    try:
        if config.proxy.workers <= 1:
            code, _reason = _run_logged(
                config, path, bound.for_worker(0), 0, on_ready=lambda: sdnotify.notify("READY=1")
            )
            return code
        return Master(config, path, bound).run()
    finally:  # workers leave through os._exit: only the process that wrote it gets here
        if pid_path is not None:
            pidfile.remove(pid_path)


def claim_pid_file(config: cfg.Config) -> str | None:
    """Write this process's PID where ``originpool reload``/``stop`` look; the path, or None
    when the default path cannot be written (logged: a non-root container has no writable
    /run, and the proxy still serves). A path the config names must be writable:
    :class:`~proxy.pidfile.PidFileError` then, and nothing starts."""
    path = config.proxy.pid_path
    try:
        pidfile.write(path)
    except pidfile.PidFileError as e:
        if config.proxy.pid_file is not None:
            raise
        log.warning("pid_file_unwritable", path=path, errno=e.errno, error=e.reason)
        return None
    return path


class Master:
    """``workers = N``: N processes sharing each listener with SO_REUSEPORT, like nginx.

    Needed where one process may hold at most 20,000 open files (two per proxied session).
    Workers share the egress IPs without coordination: connectx leaves the port choice to
    the kernel (which refuses duplicate 4-tuples across processes) and each worker's
    free-port record learns the ports other workers hold from EADDRNOTAVAIL, so the
    capacity to one destination stays E x R. The master only forks, forwards signals,
    restarts a worker that died and tells systemd when every worker is ready. It binds every
    listening socket before the first fork (:mod:`proxy.binding`) and keeps them for the
    workers it restarts, but never accepts and runs no event loop.
    """

    RESTART_WINDOW = 10.0  # seconds; more than 5 deaths in it and the master gives up

    def __init__(self, config: cfg.Config, path: str, bound: binding.Bound) -> None:
        self.config = config
        self.path = path
        self.bound = bound  # every worker's sockets, bound before the first fork
        self.children: dict[int, int] = {}  # pid -> worker index
        self.stopping = False
        self.deaths: list[float] = []
        # each worker writes one byte here once its listeners accept; systemd hears READY=1
        # from the master (its main process) when every first-generation worker has
        self._ready_r, self._ready_w = os.pipe()
        # a worker that fails writes "index reason\n" here before it exits (one write of at
        # most PIPE_BUF bytes: atomic), so worker_died can say why
        self._why_r, self._why_w = os.pipe()
        os.set_blocking(self._why_r, False)
        self.reasons: dict[int, str] = {}

    def _spawn(self, index: int) -> None:
        opsig.hold()  # the worker keeps them held until its event loop handles them
        pid = os.fork()
        if pid == 0:  # the worker
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            os.close(self._ready_r)
            os.close(self._why_r)
            ready_w = self._ready_w
            try:
                self.bound.keep_only(index)
                code, reason = _run_logged(
                    self.config,
                    self.path,
                    self.bound.for_worker(index),
                    index,
                    on_ready=lambda: os.write(ready_w, b"."),
                )
                if reason is not None:
                    line = f"{index} {reason}".encode("utf-8", "replace")
                    os.write(self._why_w, line[: select.PIPE_BUF - 1] + b"\n")
            finally:
                logs.flush()  # os._exit skips atexit: the last lines must not be lost
                os._exit(code)
        self.children[pid] = index
        opsig.release()

    def _forward(self, sig: int) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _on_stop(self, signum: int, _frame: object) -> None:
        self.stopping = True
        # the master's copies go first: a draining worker's closed socket then leaves the
        # kernel's SO_REUSEPORT group for good instead of queueing connections nobody takes
        self.bound.close()
        sdnotify.notify("STOPPING=1")
        self._forward(signal.SIGTERM)

    def _await_ready(self, workers: int) -> None:
        """A thread: READY=1 once ``workers`` readiness bytes came. Only os.read and a
        sendto here, no logging: the master forks while this runs, and a child must not
        inherit a lock this thread holds."""
        seen = 0
        while seen < workers:
            chunk = os.read(self._ready_r, workers)
            if not chunk:
                return  # no writer left (the master keeps one: not in normal operation)
            seen += len(chunk)
        sdnotify.notify(f"READY=1\nSTATUS={workers} workers serving")

    def _on_reload(self, signum: int, _frame: object) -> None:
        try:
            # workers forked later get the new one too
            new, _warnings = cfg.load_on_host(self.path)
        except cfg.ConfigError as e:
            log.error("reload_rejected", problems=e.problems)
            return
        self.config = keep_bound(self.config, new, warn=True)
        self._forward(signal.SIGHUP)

    def _reason(self, index: int, status: int) -> str:
        """Why worker ``index`` ended: the reason it wrote (see _spawn), else the signal
        that killed it, else its exit code."""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._why_r, select.PIPE_BUF):
                for line in chunk.decode("utf-8", "replace").splitlines():
                    who, _, why = line.partition(" ")
                    if who.isdigit():
                        self.reasons[int(who)] = why
        if index in self.reasons:
            return self.reasons.pop(index)
        if os.WIFSIGNALED(status):
            return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        return f"exited with status {os.waitstatus_to_exitcode(status)} without a reason"

    def run(self) -> int:
        structlog.contextvars.bind_contextvars(worker="master", pid=os.getpid())
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        opsig.in_master(self._forward, self._on_stop)  # USR1 to every worker, QUIT stops
        for i in range(self.config.proxy.workers):
            self._spawn(i)
        threading.Thread(
            target=self._await_ready, args=(self.config.proxy.workers,), daemon=True
        ).start()
        log.info("master_ready", workers=len(self.children))
        worst = 0
        while self.children:
            pid, status = os.waitpid(-1, 0)
            index = self.children.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                worst = max(worst, code if code > 0 else 0)
                continue
            reason = self._reason(index, status)
            log.error("worker_died", worker=index, pid=pid, exit=code, reason=reason)
            now = time.monotonic()
            self.deaths = [t for t in self.deaths if now - t < self.RESTART_WINDOW] + [now]
            if len(self.deaths) > 5:
                log.error("workers_keep_dying", action="stopping", last_reason=reason)
                self.stopping = True
                self.bound.close()
                self._forward(signal.SIGTERM)
                worst = 1
                continue
            self._spawn(index)
        self.bound.close()
        log.info("master_stopped")
        return worst
