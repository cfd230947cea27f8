"""Connections kept per origin: keep-alive checkout/checkin for HTTP, leases for WebSocket.

An origin is ``(scheme, host, port)``. Its hostname resolves (without blocking the loop,
cached for a TTL) to one or more addresses, each a destination for :mod:`pool.egress`, which
picks the source IP and port. What this layer adds is what nginx's ``upstream keepalive`` and
HAProxy's ``http-reuse`` give operators: reuse of idle connections, limits (connections per
origin, idle connections, idle timeout, lifetime, requests per connection), a bounded wait
queue with a timeout, TLS with SNI and verification, and dead-idle detection.

I/O is Protocol-based: each connection is a :class:`pool.upstream.UpstreamConnection`, the
asyncio protocol of its transport (that module says how an idle one is dropped at its first
event). This module keeps them: the idle set, leases, limits, the wait queue, TLS wrap.

With :meth:`OriginPool.watch_egress` the pool also follows the host's addresses
(:mod:`pool.addrwatch`): when an egress IP is removed, every connection from it (idle,
mid-exchange or a WebSocket lease) is aborted at once, since no reply to that source can
arrive any more, and its handler learns why (:class:`pool.egress.EgressLost`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from pool.addrwatch import AddressEvent, AddressWatch, reconcile
from pool.egress import Egress, EgressExhausted, EgressLost, EgressSet, Slot
from pool.origin_spec import Origin, PoolLimits, Resolver, TLSConfig
from pool.sockopt import KeepAlive, detect_dead_peer
from pool.upstream import UpstreamConnection, UpstreamHandler

log = structlog.get_logger("originpool.origin")


class PoolError(OSError):
    """The pool could not give a connection; the proxy turns it into 502/503/504."""


class PoolTimeout(PoolError):
    """Waited ``queue_timeout`` for a connection to the origin to become free."""


class PoolQueueFull(PoolError):
    """Every connection busy and the wait queue full: refuse at once rather than pile up."""


@dataclass
class _OriginState:
    idle: collections.deque[UpstreamConnection] = field(default_factory=collections.deque)
    active: int = 0  # checked out or connecting (HTTP use)
    leased: int = 0
    waiters: collections.deque[asyncio.Future[UpstreamConnection | None]] = field(
        default_factory=collections.deque
    )
    next_address: int = 0
    opened: int = 0
    reused: int = 0


@dataclass(frozen=True)
class OriginStats:
    origin: str
    active: int
    idle: int
    leased: int
    waiting: int
    opened: int
    reused: int


class OriginPool:
    """Upstream connections per origin, on top of an :class:`EgressSet`."""

    def __init__(
        self,
        egress: EgressSet,
        limits: PoolLimits | None = None,
        tls: TLSConfig | None = None,
        resolver: Resolver | None = None,
        clock: Callable[[], float] = time.monotonic,
        keepalive: KeepAlive | None = None,
    ) -> None:
        self.egress = egress
        self.keepalive = keepalive  # TCP keepalive on every upstream socket (None: off)
        self.limits = limits or PoolLimits()
        self.tls = tls or TLSConfig()
        self.resolver = resolver or Resolver()
        self._clock = clock
        self._ssl: ssl.SSLContext | None = None
        self._origins: dict[Origin, _OriginState] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        # every open connection, idle, checked out or leased: what an egress IP's removal
        # must reach (a set entry per connection; scanned only when an address goes)
        self._conns: set[UpstreamConnection] = set()
        self._watch: AddressWatch | None = None
        # origins being drained: their connections close when released, never go idle
        self._retiring: set[Origin] = set()
        # one (ip, port) tuple per destination, shared by its connections' slots (56 bytes
        # each otherwise, for as long as a session lives); cleared when DNS churn grows it
        self._destinations: dict[tuple[str, int], tuple[str, int]] = {}

    def close_idle(self, origin: Origin, retire: bool = True) -> int:
        """Close ``origin``'s idle connections (a drain: no new request goes to it, so they
        would only age out) and, with ``retire``, close the ones still in use when their
        exchange releases them; ``retire=False`` (an undrain) lets them go idle again.
        Returns how many were closed."""
        if not retire:
            self._retiring.discard(origin)
            return 0
        self._retiring.add(origin)
        state = self._origins.get(origin)
        if state is None:
            return 0
        closed = len(state.idle)
        while state.idle:
            state.idle.pop().close()
        return closed

    def _state(self, origin: Origin) -> _OriginState:
        state = self._origins.get(origin)
        if state is None:
            state = self._origins[origin] = _OriginState()
        return state

    # -- HTTP use ----------------------------------------------------------------------------

    def acquire_idle(self, origin: Origin) -> UpstreamConnection | None:
        """A usable idle keep-alive connection, or None: no await, so the proxy's hot path
        (a request to an origin with idle connections) runs without a task or a loop turn."""
        state = self._state(origin)
        while state.idle:
            conn = state.idle.pop()  # most recent first: the rest age out
            if self._usable(conn):
                state.active += 1
                state.reused += 1
                return conn
            conn.close()
        return None

    async def acquire(self, origin: Origin, preamble: bytes = b"") -> UpstreamConnection:
        """An idle keep-alive connection if a usable one exists, else a new one, else wait.

        ``preamble`` (a PROXY protocol header, :mod:`proxy.proxy_protocol`): always a new
        connection, which starts with it. It speaks for one client, so it is never reused
        (its release closes it), as HAProxy and nginx never share such a connection."""
        if not preamble:
            conn = self.acquire_idle(origin)
            if conn is not None:
                return conn
        state = self._state(origin)
        if state.active >= self.limits.max_connections:
            conn = await self._wait(origin, state)
            if conn is not None:
                if not preamble:
                    return conn
                conn.close()  # another client's connection: its slot is ours, open anew
        else:
            state.active += 1
        try:
            return await self._open(origin, state, preamble)
        except BaseException:
            state.active -= 1
            self._wake(state)
            raise

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Check a connection back in after its exchange; closes it unless it may be reused.

        ``reusable`` is the HTTP layer's verdict (complete response, keep-alive); the limits
        (requests per connection, lifetime, idle count) are applied here.
        """
        conn.attach(None)
        state = self._state(conn.origin)
        if conn.leased:
            conn.leased = False
            state.leased -= 1
            conn.close()
            return
        conn.requests += 1
        reusable = reusable and not conn.private
        if reusable and conn.transport is not None:
            # back-pressure may have paused it on the exchange's last write, and the resume
            # went to no one: idle connections must read (an EOF drops them) and the next
            # exchange expects a response to arrive
            conn.transport.resume_reading()
        if reusable and conn.origin not in self._retiring and self._usable(conn, poll=False):
            self._recycle(state, conn)
        else:
            state.active -= 1
            conn.close()
            self._wake(state)

    def _recycle(self, state: _OriginState, conn: UpstreamConnection) -> None:
        """A usable connection: to the first waiter directly, else to the idle set."""
        while state.waiters:
            waiter = state.waiters.popleft()
            if not waiter.done():
                state.reused += 1
                waiter.set_result(conn)
                return
        state.active -= 1
        if len(state.idle) >= self.limits.max_idle:
            conn.close()
            return
        conn.idle_since = self._clock()
        state.idle.append(conn)
        if self._sweeper is None:
            self._sweep_at(conn.idle_since + self.limits.idle_timeout)

    # -- long-lived use (WebSocket) ----------------------------------------------------------

    async def lease(self, origin: Origin, preamble: bytes = b"") -> UpstreamConnection:
        """A fresh connection that never returns to the idle set; ``release`` closes it.
        ``preamble``: written first, as :meth:`acquire`'s."""
        state = self._state(origin)
        state.leased += 1
        try:
            conn = await self._open(origin, state, preamble)
        except BaseException:
            state.leased -= 1
            raise
        conn.leased = True
        conn.fd = -1  # for the idle check only, which a lease never meets: no int kept
        return conn

    def to_lease(self, conn: UpstreamConnection) -> None:
        """An HTTP checkout became long-lived (101 Switching Protocols): count it as such."""
        if conn.leased:
            return
        state = self._state(conn.origin)
        state.active -= 1
        state.leased += 1
        conn.leased = True
        conn.fd = -1  # as lease's
        self._wake(state)

    # -- bookkeeping -------------------------------------------------------------------------

    def stats(self) -> list[OriginStats]:
        return [
            OriginStats(str(o), s.active, len(s.idle), s.leased, len(s.waiters), s.opened, s.reused)
            for o, s in self._origins.items()
        ]

    async def close(self) -> None:
        """Close idle connections and fail waiters; checked-out ones close with their owners."""
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for state in self._origins.values():
            while state.idle:
                state.idle.pop().close()
            while state.waiters:
                waiter = state.waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(PoolError(errno.ESHUTDOWN, "pool closed"))

    def _usable(self, conn: UpstreamConnection, poll: bool = True) -> bool:
        lim = self.limits
        if not conn.alive or conn.requests >= lim.max_requests:
            return False
        if lim.max_lifetime is not None and self._clock() - conn.created >= lim.max_lifetime:
            return False
        if not poll:
            return True  # checked in: its protocol sees any EOF; acquire() polls once more
        return not (conn.handler is None and conn.requests and conn.readable_while_idle())

    async def _wait(self, origin: Origin, state: _OriginState) -> UpstreamConnection | None:
        """Queue for a connection; None means "a slot is free: open one" (already counted)."""
        if len(state.waiters) >= self.limits.queue_size:
            raise PoolQueueFull(
                errno.EAGAIN,
                f"{origin}: {state.active} connections busy and {len(state.waiters)} "
                "requests already waiting",
            )
        fut: asyncio.Future[UpstreamConnection | None] = asyncio.get_running_loop().create_future()
        state.waiters.append(fut)
        try:
            async with asyncio.timeout(self.limits.queue_timeout):
                return await fut
        except BaseException as e:
            if fut.done() and not fut.cancelled():
                # handed to us in the very tick we gave up: pass it on, never lose it
                conn = fut.result()
                if conn is None:
                    state.active -= 1
                    self._wake(state)
                else:
                    self._recycle(state, conn)
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    state.waiters.remove(fut)
            if isinstance(e, TimeoutError):
                raise PoolTimeout(
                    errno.ETIMEDOUT,
                    f"{origin}: no connection free within {self.limits.queue_timeout}s "
                    f"({state.active} busy, max_connections {self.limits.max_connections})",
                ) from None
            raise

    def _wake(self, state: _OriginState) -> None:
        """A connection slot freed up: let the first live waiter open one."""
        while state.waiters and state.active < self.limits.max_connections:
            waiter = state.waiters.popleft()
            if not waiter.done():
                state.active += 1
                waiter.set_result(None)
                return

    def _sweep_at(self, when: float) -> None:
        delay = max(0.0, when - self._clock())
        self._sweeper = asyncio.get_running_loop().call_later(delay, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for ``idle_timeout``: one timer for the whole pool, due when
        the oldest idle connection expires, instead of a timer armed and cancelled on every
        checkin and checkout (the idle deques are oldest first)."""
        self._sweeper = None
        now = self._clock()
        timeout = self.limits.idle_timeout
        due: float | None = None
        for state in self._origins.values():
            idle = state.idle
            while idle and now - idle[0].idle_since >= timeout:
                idle.popleft().close()
            if idle and (due is None or idle[0].idle_since + timeout < due):
                due = idle[0].idle_since + timeout
        if due is not None:
            self._sweep_at(due)

    def _lost(self, conn: UpstreamConnection) -> None:
        """The transport is gone: an idle one leaves the idle set now, not at checkout."""
        self._conns.discard(conn)
        state = self._origins.get(conn.origin)
        if state is not None and conn in state.idle:
            state.idle.remove(conn)

    async def _open(
        self, origin: Origin, state: _OriginState, preamble: bytes = b""
    ) -> UpstreamConnection:
        addresses = await self.resolver.resolve(origin.host, origin.port)
        start = state.next_address
        state.next_address += 1
        error: OSError | None = None
        for i in range(len(addresses)):
            destination = self._destination(addresses[(start + i) % len(addresses)], origin.port)
            ip = destination[0]
            try:
                sock, slot = await self.egress.connect(
                    destination, timeout=self.limits.connect_timeout
                )
            except EgressExhausted as e:
                error = e  # per destination: another address of the origin may have room
                continue
            except OSError as e:
                error = e
                log.info("origin_address_failed", origin=str(origin), address=ip, error=str(e))
                continue
            return await self._wrap(origin, state, sock, slot, preamble)
        assert error is not None
        raise error

    def _destination(self, ip: str, port: int) -> tuple[str, int]:
        key = (ip, port)
        shared = self._destinations.get(key)
        if shared is None:
            if len(self._destinations) >= 4096:
                self._destinations.clear()
            shared = self._destinations[key] = key
        return shared

    async def _wrap(
        self,
        origin: Origin,
        state: _OriginState,
        sock: socket.socket,
        slot: Slot,
        preamble: bytes = b"",
    ) -> UpstreamConnection:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        detect_dead_peer(sock, self.keepalive)
        conn = UpstreamConnection(self, origin, slot, self._clock())
        conn.fd = sock.fileno()
        loop = asyncio.get_running_loop()
        try:
            if preamble:  # on the bare socket: before a TLS ClientHello, as the spec wants
                conn.private = True
                await loop.sock_sendall(sock, preamble)
            if origin.tls:
                if self._ssl is None:
                    self._ssl = self.tls.context()
                await loop.create_connection(
                    lambda: conn,
                    sock=sock,
                    ssl=self._ssl,
                    server_hostname=origin.host,
                    ssl_handshake_timeout=self.limits.connect_timeout,
                )
            else:
                await loop.create_connection(lambda: conn, sock=sock)
        except BaseException:
            sock.close()
            slot.release()
            raise
        state.opened += 1
        self._conns.add(conn)
        return conn

    # -- the host's addresses ----------------------------------------------------------------

    def watch_egress(self) -> None:
        """Follow the kernel's address announcements from now on (needs a running loop).

        An egress IP the host lacks is down from this call on (not after a failed connect),
        comes back when it is added, and its removal aborts its connections at once. Where
        netlink is refused, the pool keeps the connect-time detection alone, and says so.
        """
        if self._watch is not None:
            return
        watch = AddressWatch(self._addresses_changed, self._watch_failed)
        try:
            watch.start()  # subscribed before the first check: no change falls in between
        except OSError as e:
            log.warning("address_watch_unavailable", error=str(e), fallback="connect-time only")
            return
        self._watch = watch
        self._addresses_changed(None)

    def _watch_failed(self) -> None:
        """No more announcements: an IP marked absent would never come back, so the pool
        returns to the connect-time detection (the backoff re-probes a missing IP)."""
        self._watch = None
        self.egress.forget_presence()

    def _addresses_changed(self, events: list[AddressEvent] | None) -> None:
        """Announcements arrived (None: the first check, []: some were lost)."""
        why = "address removed from the host" if events is not None else "not on the host"
        gone, back = reconcile(self.egress)
        for egress in gone:
            self._egress_gone(egress, why)
        for egress in back:
            log.info("egress_up", egress=str(egress), reason="address added to the host")

    def _egress_gone(self, egress: Egress, why: str) -> None:
        """Abort every connection from ``egress``: one egress_down line says what it cost."""
        aborted = {"idle": 0, "in_flight": 0, "sessions": 0}
        for conn in [c for c in self._conns if c.slot.egress == egress]:
            if conn.handler is None:
                aborted["idle"] += 1
            elif getattr(conn.handler, "tunnel", False):
                aborted["sessions"] += 1
            else:
                aborted["in_flight"] += 1
            conn.lost = EgressLost(str(egress), conn.local, conn.slot.destination, why)
            conn.reset()  # RST, not FIN: no orphan retransmitting from a source that is gone
        log.warning("egress_down", egress=str(egress), errno="EADDRNOTAVAIL", reason=why, **aborted)


# Origin, PoolLimits, Resolver and TLSConfig live in pool.origin_spec, UpstreamConnection and
# UpstreamHandler in pool.upstream; all are found here too
__all__ = [
    "Origin",
    "OriginPool",
    "OriginStats",
    "PoolError",
    "PoolLimits",
    "PoolQueueFull",
    "PoolTimeout",
    "Resolver",
    "TLSConfig",
    "UpstreamConnection",
    "UpstreamHandler",
]
