"""One upstream connection: the asyncio protocol of its transport, kept by the pool.

Each :class:`UpstreamConnection` forwards its transport's events to whichever handler the
proxy attached for the current exchange. While idle, no handler is attached and *any* event
(data, EOF, reset) means the origin is done with it: it is dropped at once, so a request is
never written into a socket the origin already closed. The pool that keeps these
(:mod:`pool.origin`) lives a layer up; this module knows it only for typing.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
from typing import TYPE_CHECKING, Protocol, cast

from pool import turnwrite
from pool.egress import EgressLost, Slot
from pool.origin_spec import Origin
from pool.sockopt import reset_on_close

if TYPE_CHECKING:
    from pool.origin import OriginPool


class UpstreamHandler(Protocol):
    """What the proxy attaches to a checked-out connection for one exchange."""

    def data_received(self, data: bytes) -> None: ...
    def eof_received(self) -> None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One upstream transport, kept by the pool between exchanges."""

    __slots__ = (
        "alive",
        "created",
        "fd",
        "handler",
        "held",
        "idle_since",
        "leased",
        "lost",
        "origin",
        "pool",
        "private",
        "requests",
        "slot",
        "transport",
    )

    def __init__(self, pool: OriginPool, origin: Origin, slot: Slot, now: float) -> None:
        self.pool = pool
        self.origin = origin
        self.slot = slot
        self.created = now
        self.requests = 0
        self.leased = False
        self.alive = True
        self.transport: asyncio.Transport | None = None
        self.handler: UpstreamHandler | None = None
        self.idle_since = now
        self.fd = -1
        self.held = b""  # see pool.turnwrite
        self.lost: EgressLost | None = None  # set when the pool aborts it: its egress IP left
        self.private = False  # began with a client's PROXY header: never reused, see acquire

    # -- asyncio.Protocol: forwarded to the handler, or fatal while idle -------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: same interface, no isinstance
        self.transport = cast(asyncio.Transport, transport)
        if self.fd < 0:  # the pool sets it from the socket it connected: get_extra_info's
            # socket would stay cached on uvloop's transport, 72 bytes per held connection
            sock = transport.get_extra_info("socket")
            self.fd = sock.fileno() if sock is not None else -1

    def data_received(self, data: bytes) -> None:
        if self.handler is not None:
            self.handler.data_received(data)
        else:
            self.close()  # bytes nobody asked for: the connection's framing is lost

    def eof_received(self) -> bool | None:
        if self.handler is not None:
            self.handler.eof_received()
            return True  # the handler decides when to close (half-close)
        self.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self.slot.release()
        self.pool._lost(self)
        if self.handler is not None:
            self.handler.connection_lost(exc or self.lost)

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()

    # -- for the proxy ---------------------------------------------------------------------

    def attach(self, handler: UpstreamHandler | None) -> None:
        self.handler = handler

    def pause_reading(self) -> None:
        """The client cannot take more: stop reading from the origin (flow control)."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self.alive:
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        turnwrite.write(self, data)

    def write_now(self, data: bytes) -> None:
        turnwrite.write_now(self, data)

    def write_eof(self) -> None:
        turnwrite.write_eof(self)

    def close(self) -> None:
        self.alive = False
        if self.transport is not None:
            turnwrite.flush(self)
            self.transport.close()
        else:
            self.slot.release()

    def abort(self) -> None:
        self.alive = False
        if self.transport is not None:
            self.transport.abort()

    def reset(self) -> None:
        """Abort with RST (see :func:`pool.sockopt.reset_on_close`): no TIME_WAIT left on
        the egress port."""
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    reset_on_close(sock)
        self.abort()

    @property
    def local(self) -> tuple[str, int]:
        return self.slot.local

    @property
    def egress_ip(self) -> str:
        """The source IP: once per request in the access line, so without the tuple."""
        return self.slot.ip

    def readable_while_idle(self) -> bool:
        """EOF or stray bytes already queued in the kernel but not yet delivered to us.

        One poll(2) on the fd kept from connection_made, through one poll object per
        process: this runs on every checkout, so no per-call socket or poll objects.
        """
        if self.fd < 0 or not self.alive or self.transport is None or self.transport.is_closing():
            return True
        _POLLER.register(self.fd, _READABLE)
        try:
            return bool(_POLLER.poll(0))
        finally:
            _POLLER.unregister(self.fd)


_POLLER = select.poll()
_READABLE = select.POLLIN | select.POLLRDHUP

__all__ = ["UpstreamConnection", "UpstreamHandler"]
