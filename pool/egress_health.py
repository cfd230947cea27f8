"""Whether each egress IP is on this host: down with backoff, or absent by the kernel's word.

Why apart from :mod:`pool.egress`: choosing a source and knowing which sources exist are two
jobs with two inputs. The choice reads counts of ports; presence reads failed connects and,
when they are watched (:mod:`pool.addrwatch`), the kernel's address announcements.

"Not on this host" and "no port left" share an errno (EADDRNOTAVAIL) and must never be
confused: an operator told "add egress IPs" when one was deleted goes the wrong way. The
kernel separates them by stage (measured in a namespace, tests/test_egress_presence.py):
with ``IP_BIND_ADDRESS_NO_PORT`` a non-local source fails ``bind()``, exhaustion fails
``connect()``; an IP deleted between the two fails ``connect()`` with ENETUNREACH. So a
bind-stage EADDRNOTAVAIL means "not on this host", and a connect-stage failure is checked
against :func:`~pool.connectx.is_local_address` before it is called exhaustion
(:func:`not_on_host`).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from pool.connectx import is_local_address
from pool.errors import NOT_ON_HOST_TEXT, ConnectError, Destination, errno_name, format_address

if TYPE_CHECKING:
    from pool.egress import Egress

log = structlog.get_logger("originpool.egress")

# connect-stage errnos a source address that left the host can cause (ENETUNREACH: deleted
# between bind and connect): a presence check decides whether the IP or the pair is at fault
_MAYBE_GONE = frozenset({errno.EADDRNOTAVAIL, errno.ENETUNREACH, errno.EINVAL})


def not_on_host(egress: Egress, error: OSError, code: int) -> bool:
    """The failure is the egress IP's absence, not the pair's ports (see the module doc)."""
    if not egress.ip:
        return False  # the kernel's default source is whatever the host has
    stage = error.stage if isinstance(error, ConnectError) else None
    if stage == "bind":
        return code == errno.EADDRNOTAVAIL  # EADDRINUSE at bind: a full range (bind mode)
    if code not in _MAYBE_GONE:
        return False
    try:
        return not is_local_address(egress.ip)
    except OSError:
        return False  # cannot tell: keep the kernel's word


class EgressHealth:
    """The down and absent egress IPs of one process, and when to try a down one again.

    Two sources, kept apart on purpose. ``down`` is what connects found: an IP whose connect
    failed for its absence is skipped for a backoff that doubles up to ``backoff[1]``, and
    the first connect after it is the probe (a bind: microseconds), so a re-added IP comes
    back without a restart. ``absent`` is the kernel's word (pool.addrwatch alone writes it):
    down until the kernel announces the IP back. A connect that finds an IP gone only starts
    a backoff: were it to mark the IP absent, the announcement that follows would find
    nothing new and the IP's pooled connections would never be reset.
    """

    __slots__ = ("absent", "backoff", "clock", "down")

    def __init__(
        self,
        backoff: tuple[float, float] = (1.0, 30.0),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backoff = backoff
        self.clock = clock
        self.down: dict[Egress, tuple[float, float]] = {}  # egress -> (until, current backoff)
        self.absent: set[Egress] = set()

    def is_down(self, egress: Egress) -> bool:
        if egress in self.absent:
            return True
        state = self.down.get(egress)
        return state is not None and self.clock() < state[0]

    def forget_presence(self) -> None:
        """The announcements stopped: back to the connect-time detection alone."""
        self.absent.clear()

    def set_present(self, egress: Egress, present: bool) -> bool:
        """The kernel's word on ``egress`` (see :mod:`pool.addrwatch`); True if it changed
        what the pool does with it (the caller logs: it knows what else the change cost)."""
        if present:
            was_down = egress in self.absent or egress in self.down
            self.absent.discard(egress)
            self.down.pop(egress, None)
            return was_down
        if egress in self.absent:
            return False
        self.absent.add(egress)
        return True

    def mark_down(self, egress: Egress, destination: Destination, code: int) -> None:
        """Skip ``egress`` until its backoff is over; the first connect after it is the probe
        (a bind: microseconds), so a re-added IP is back within ``backoff[1]`` seconds."""
        _until, current = self.down.get(egress, (0.0, self.backoff[0] / 2))
        delay = min(current * 2, self.backoff[1])
        self.down[egress] = (self.clock() + delay, delay)
        log.warning(
            "egress_down",
            egress=str(egress),
            destination=format_address(destination),
            errno=errno_name(code),
            reason=NOT_ON_HOST_TEXT,
            retry_in_s=delay,
        )

    def connected(self, egress: Egress, destination: Destination) -> None:
        """A connect through ``egress`` succeeded: a backoff it was under is over."""
        if self.down and self.down.pop(egress, None) is not None:
            log.info("egress_up", egress=str(egress), destination=format_address(destination))


__all__ = ["EgressHealth", "not_on_host"]
