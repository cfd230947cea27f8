"""``originpool serve``: the process it starts. It reads the config, opens the logs, raises
the open-file limit, binds every listening socket and writes the pid file, then either runs
the one worker itself (:mod:`proxy.worker`) or, with ``workers = N``, becomes the
:class:`Master` that forks N workers, forwards signals to them and restarts one that died.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import signal
import sys
import threading
import time

import structlog

from proxy import binding, logs, pidfile, sdnotify
from proxy import config as cfg
from proxy import signals as opsig
from proxy.worker import _run_logged, keep_bound
from proxy.worker_build import FileBudget, build_router, build_settings, startup_warnings

# what other code and the tests import from here, from before the worker and its parts had
# their own modules
__all__ = [
    "FileBudget",
    "Master",
    "_run_logged",
    "build_router",
    "build_settings",
    "claim_pid_file",
    "raise_open_files",
    "serve",
    "startup_warnings",
]

log = structlog.get_logger("originpool")


def raise_open_files() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit: containers often start at 1024 (~500 sessions)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


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
