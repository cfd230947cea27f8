"""The signals an operator may send beyond TERM, INT and HUP: none of them stops the proxy
by accident.

nginx's meanings wherever originpool has the feature, so a logrotate rule or a habit brought
from nginx does what it did there: USR1 reopens the log files (logrotate's ``postrotate``;
its default action would kill the proxy, exit 138, every night), QUIT is the graceful stop
(TERM here already drains, so both do the same). USR2 and WINCH are nginx's binary upgrade,
which originpool does not have: each is ignored with one log line. PIPE is ignored (Python's
start-up already does so; set here again so nothing depends on how the interpreter began).

Until a process has its handlers these signals are blocked, not left at their default
actions (USR1's and USR2's kill, QUIT's dumps core): one that comes while the proxy starts,
or while the master forks a worker, waits and is then handled.
"""

from __future__ import annotations

import asyncio
import errno
import signal
from collections.abc import Callable

import structlog

from proxy import logs

log = structlog.get_logger("originpool")

HELD = frozenset({signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGQUIT})
IGNORED = {
    signal.SIGUSR2: "nginx's binary upgrade; originpool has none (restart it instead)",
    signal.SIGWINCH: "nginx's graceful worker stop before a binary upgrade; originpool has none",
}


def hold() -> None:
    """Block :data:`HELD` in this thread (and what it forks) until :func:`release`."""
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD)


def release() -> None:
    """Unblock :data:`HELD`: one that came meanwhile is handled now, by the handlers set."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)


def ignored(signum: int) -> None:
    sig = signal.Signals(signum)
    log.warning("signal_ignored", signal=sig.name, why=IGNORED[sig])


def reopen_logs() -> None:
    """USR1: every log file opened anew at its path; one that cannot be is named and kept."""
    failed = logs.reopen()
    for e in failed:
        code = errno.errorcode.get(e.errno or 0, str(e.errno))
        log.error("log_reopen_failed", key=f"log.{e.key}", path=e.path, errno=code, error=e.reason)
    log.info("logs_reopened", files=logs.open_files(), failed=len(failed))


def in_worker(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
    """A worker's handlers, run by its event loop; then the held signals are let through."""
    loop.add_signal_handler(signal.SIGUSR1, reopen_logs)
    loop.add_signal_handler(signal.SIGQUIT, stop)
    for signum in IGNORED:
        loop.add_signal_handler(signum, ignored, signum)
    release()


def in_master(forward: Callable[[int], None], stop: Callable[[int, object], None]) -> None:
    """The master's handlers: USR1 reopens its own files and goes on to every worker (each
    holds its own descriptors), QUIT stops as TERM does. Released by the master after its
    forks (see :func:`hold`)."""

    def on_usr1(_signum: int, _frame: object) -> None:
        reopen_logs()
        forward(signal.SIGUSR1)

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGQUIT, stop)
    for signum in IGNORED:
        signal.signal(signum, lambda signum, _frame: ignored(signum))
