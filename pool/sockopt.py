"""Socket options and bind policy, in one place, each named after the kernel behaviour it buys.

Every upstream socket the pool makes passes through these; nothing else in the project calls
``setsockopt`` for source-port behaviour. See ../shared/docs/ephemeral-ports.md for the facts.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
from dataclasses import dataclass
from typing import Any

from pool import kernel


def share_source_port_across_destinations(sock: socket.socket) -> None:
    """``IP_BIND_ADDRESS_NO_PORT``: ``bind((ip, 0))`` defers the port to ``connect()``.

    The port is then chosen against the full 4-tuple, so one port serves every destination;
    a plain ``bind((ip, 0))`` takes the port for all destinations at once (capacity = range in
    total instead of range per destination).
    """
    sock.setsockopt(kernel.SOL_IP, kernel.IP_BIND_ADDRESS_NO_PORT, 1)


def allow_shared_source_port(sock: socket.socket, on: bool = True) -> None:
    """``SO_REUSEADDR``: several outgoing sockets may hold one source port.

    Safe for TCP because ``connect()`` still refuses a duplicate 4-tuple. For UDP it is also
    the lock: a socket bound *without* it keeps everyone else off its port, which is how
    connectx holds a UDP port while it checks the 4-tuple.
    """
    sock.setsockopt(socket.SOL_SOCKET, kernel.SO_REUSEADDR, 1 if on else 0)


def restrict_source_ports(sock: socket.socket, low: int, high: int) -> None:
    """``IP_LOCAL_PORT_RANGE``: this socket's automatic port comes from ``low..high`` only.

    Lets processes or hosts that share an egress IP split its range without coordinating,
    and lets the pool hand the kernel one port it knows is free (``low == high``). The kernel
    clamps the window to the namespace's ``ip_local_port_range`` and silently ignores a window
    wholly outside it; connectx checks that before relying on it.
    """
    sock.setsockopt(kernel.SOL_IP, kernel.IP_LOCAL_PORT_RANGE, kernel.pack_port_range(low, high))


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """TCP keepalive timing, seconds: first probe after ``idle`` quiet seconds, then one every
    ``interval``; ``probes`` unanswered ones and the connection is dead. Each socket draws its
    own idle and interval from ``[x, x + x * spread]`` (see :func:`spread_keepalive_probes`),
    so a dead peer is found after ``(idle + interval x probes) x (1 + spread)`` at most."""

    idle: int = 60
    interval: int = 10
    probes: int = 6
    spread: float = 0.5

    def drawn(self) -> tuple[int, int]:
        """This socket's (idle, interval): whole seconds, as the kernel takes them."""
        return (
            self.idle + random.randint(0, int(self.idle * self.spread)),
            self.interval + random.randint(0, int(self.interval * self.spread)),
        )


def detect_dead_peer(sock: socket.socket, keepalive: KeepAlive | None) -> None:
    """``SO_KEEPALIVE`` + ``TCP_KEEPIDLE``/``TCP_KEEPINTVL``/``TCP_KEEPCNT``: a peer that
    vanished without FIN or RST (host gone, a NAT or firewall that dropped the flow) is found
    after ``idle + interval x probes`` seconds (times up to ``1 + spread``), and the socket
    fails with ETIMEDOUT.

    Without it a quiet WebSocket tunnel to such a peer lives forever and keeps its source port,
    its two file descriptors and its memory: the proxy's capacity leaks one session at a time.
    ``None`` leaves the socket as it is (the kernel default is no keepalive). Idle and interval
    are this socket's own draw (:func:`spread_keepalive_probes`).
    """
    if keepalive is None:
        return
    idle, interval = keepalive.drawn()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepalive.probes)


def spread_keepalive_probes(sock: Any, keepalive: KeepAlive | None) -> None:
    """``TCP_KEEPIDLE``/``TCP_KEEPINTVL`` drawn per socket: keepalive probes of sockets that
    went quiet together are sent apart, not in one burst.

    The kernel's timer wheel fires every timer of one bucket in one softirq run (a 60 s timer
    is rounded to 2 s at HZ=250, an 8 s one to 256 ms), and on ``lo`` every probe of that run
    is queued on the CPU's backlog at once; past ``net.core.netdev_max_backlog`` (1,000 by
    default, host-wide) they are dropped, lo counts them as sent, the retries drop together
    again and the kernel kills live sessions as dead peers (tests/test_testbed_keepalive.py:
    ~1,000 of 3,000). Drawn from ``[x, x + x * spread]``, sockets armed in one burst spread
    over ``idle * spread`` seconds of buckets, and the retries of any that were dropped do
    not come back together. An accepted socket inherits the listener's keepalive; this gives
    it its own draw, two setsockopt calls. ``sock`` may be uvloop's pseudo-socket.
    """
    if keepalive is None or keepalive.spread <= 0:
        return
    idle, interval = keepalive.drawn()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)


def reset_on_close(sock: Any) -> None:
    """``SO_LINGER`` {on, 0}: the next close sends RST instead of FIN and leaves no
    TIME_WAIT. For a connection given up on (a peer that never finished its close): a FIN
    would make this side the one that closed first, and its 4-tuple, here an egress port,
    would sit in TIME_WAIT for 60 s. ``sock`` may be uvloop's transport pseudo-socket."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# Options a caller may have set before connectx, copied when connectx must replace the socket
# (a port lost to a race leaves the socket bound to it; a bound socket cannot be rebound).
_CARRIED: tuple[tuple[int, int], ...] = (
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    (socket.SOL_SOCKET, socket.SO_PRIORITY),
    (socket.SOL_SOCKET, socket.SO_MARK),
    (socket.IPPROTO_TCP, socket.TCP_NODELAY),
)


def reissue(sock: socket.socket) -> None:
    """Replace the kernel socket behind ``sock`` with a fresh, unbound one, keeping its fd.

    The caller's socket object (and anything that captured its fd) stays valid; blocking mode
    and the common options above are carried over.
    """
    fresh = socket.socket(sock.family, sock.type, sock.proto)
    try:
        for level, opt in _CARRIED:
            if level == socket.IPPROTO_TCP and sock.type != socket.SOCK_STREAM:
                continue
            with contextlib.suppress(OSError):
                fresh.setsockopt(level, opt, sock.getsockopt(level, opt))
        os.dup2(fresh.fileno(), sock.fileno(), inheritable=False)
    finally:
        fresh.close()
    # O_NONBLOCK belongs to the open file description, which is new: re-apply it.
    sock.settimeout(sock.gettimeout())
