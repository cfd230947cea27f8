"""In-memory doubles of the proxy's I/O, shared by tests and ``bench/proxy_cycle.py``.

Why here and not under tests/: the bench drives the real data path with them too, and a
bench must not import the test tree. They let the exchange and the tunnel run without
sockets, root or an origin: what the proxy writes is kept in lists, what a peer sends is a
method call. Each double implements only what the data path calls.

- :class:`MemoryTransport`: an asyncio transport whose writes are kept.
- :class:`MemoryPool`: an :class:`pool.origin.OriginPool` whose new connections are
  in-memory ones (:func:`memory_connection`); pooling, reuse and leases are the real ones.
- :class:`RecordingStream` / :class:`RecordingPipe`: a :class:`proxy.stream.ClientStream`
  and :class:`proxy.stream.ClientPipe` that record each call, for testing the exchange and
  the tunnel apart from any client protocol.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, cast

from pool import turnwrite
from pool.egress import EgressSet, Slot
from pool.origin import Origin, OriginPool, PoolLimits, UpstreamConnection, _OriginState
from proxy.http1 import ProtocolError, RequestHead
from proxy.routing import Route, Router
from proxy.server import Proxy, Settings
from proxy.stream import Headers
from proxy.timer import Timer
from proxy.tunnel import Tunnel


class MemoryTransport:
    """The part of an asyncio transport the data path uses; writes are kept, not sent.

    ``protocol``, when set, hears ``connection_lost`` on the next loop turn after ``close``
    or ``abort``, as from a real transport."""

    def __init__(self, peer: tuple[str, int], fds: tuple[int, ...] = ()) -> None:
        self.peer = peer
        self.fds = fds  # closed with the transport
        self.written: list[bytes] = []
        self.eof = False
        self.closed = False
        self.aborted = False
        self.reading = True
        self.protocol: asyncio.BaseProtocol | None = None

    @property
    def data(self) -> bytes:
        return b"".join(self.written)

    def take(self) -> bytes:
        """What was written since the last take."""
        out = b"".join(self.written)
        self.written.clear()
        return out

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written.append(data)

    def writelines(self, data: list[bytes]) -> None:
        for piece in data:
            self.write(piece)

    def write_eof(self) -> None:
        self.eof = True

    def can_write_eof(self) -> bool:
        return True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer}.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self._lose()

    def abort(self) -> None:
        self.aborted = True
        self._lose()

    def _lose(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd in self.fds:
            os.close(fd)
        self.fds = ()
        if self.protocol is not None:
            protocol = self.protocol
            asyncio.get_running_loop().call_soon(protocol.connection_lost, None)


class MemorySlot:
    """An egress slot without a socket: what an in-memory connection counts against."""

    def __init__(self, local: tuple[str, int], destination: tuple[str, int]) -> None:
        self.local = local
        self.ip = local[0]  # what pool.egress.Slot has beside local
        self.destination = destination
        self.released = False

    def release(self) -> None:
        self.released = True


def memory_connection(pool: OriginPool, origin: Origin, port: int = 40000) -> UpstreamConnection:
    """A connected upstream connection over a :class:`MemoryTransport`. Its fd is a pipe's
    read end, silent while idle, so the pool's checkout poll is a real poll."""
    slot = MemorySlot(("127.0.1.1", port), (origin.host, origin.port))
    conn = UpstreamConnection(pool, origin, cast(Slot, slot), pool._clock())
    r, w = os.pipe()  # the write end stays open (and silent) while the transport lives
    transport = MemoryTransport((origin.host, origin.port), fds=(r, w))
    transport.protocol = conn
    conn.connection_made(cast(asyncio.Transport, transport))
    conn.fd = r
    return conn


def transport_of(conn: UpstreamConnection | Any) -> MemoryTransport:
    return cast(MemoryTransport, conn.transport)


class MemoryPool(OriginPool):
    """The real pool, whose new connections are in memory: ``opened`` lists them."""

    def __init__(self, limits: PoolLimits | None = None) -> None:
        super().__init__(EgressSet(["127.0.1.1"]), limits or PoolLimits())
        self.opened: list[UpstreamConnection] = []

    async def _open(self, origin: Origin, state: _OriginState, *_: Any) -> UpstreamConnection:
        # *_: what else the real _open takes (a preamble to send first, ...): unused here
        conn = memory_connection(self, origin, 40000 + len(self.opened))
        state.opened += 1
        self.opened.append(conn)
        return conn


def memory_proxy(
    host: str = "test.example", origin: Origin | None = None, **settings: Any
) -> tuple[Proxy, MemoryPool, Origin]:
    """A worker's state with one route, ``host`` -> ``origin``, over a :class:`MemoryPool`."""
    origin = origin or Origin("http", "127.0.2.1", 9000)
    pool = MemoryPool()
    proxy = Proxy(Router([Route(host, "/", [(origin, 1)])]), pool, Settings(**settings))
    return proxy, pool, origin


def end_of_turn() -> None:
    """Send what :mod:`pool.turnwrite` holds, as the loop turn's end does."""
    turnwrite.end_of_turn(asyncio.get_running_loop())


def request_head(
    target: bytes = b"/",
    headers: Headers = ((b"host", b"test.example"),),
    method: bytes = b"GET",
    has_body: bool = False,
) -> RequestHead:
    """A parsed request head, as any client codec hands it to an exchange."""
    return RequestHead(method, target, list(headers), b"1.1", False, has_body)


class RecordingStream:
    """A :class:`proxy.stream.ClientStream` that records every call in ``calls``: the
    exchange's view of a client, with no protocol under it."""

    def __init__(self, proxy: Proxy, peer: tuple[str, int] = ("127.0.0.1", 50000)) -> None:
        self.proxy = proxy
        self.peer = peer
        self.client_ip = peer[0].encode()
        self.scheme = b"http"
        self.trusted_peer = False
        self.http_version = "2"
        self.closed = False
        self.write_paused = False
        self.whole = False
        self.timer = Timer()
        self.calls: list[tuple[Any, ...]] = []
        self.body_error: ProtocolError | None = None
        self.delivered = 0
        self.pipe: RecordingPipe | None = None

    def local_address(self) -> tuple[str, int] | None:
        return None

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def check_request_body(self) -> None:
        if self.body_error is not None:
            raise self.body_error

    def deliver(self) -> None:
        self.delivered += 1

    def pause_reading(self) -> None:
        self.calls.append(("pause_reading",))

    def resume_reading(self) -> None:
        self.calls.append(("resume_reading",))

    def arm_body_timer(self) -> None:
        pass

    def send_informational(self, status: int, headers: Headers = (), reason: bytes = b"") -> None:
        self.calls.append(("informational", status, list(headers)))

    def send_head(self, status: int, headers: Headers, reason: bytes) -> None:
        self.calls.append(("head", status, list(headers)))

    def send_body(self, data: bytes) -> None:
        self.calls.append(("body", data))

    def send_end(self) -> None:
        self.calls.append(("end",))

    def send_whole(self, status: int, headers: Headers, reason: bytes, body: bytes) -> None:
        self.send_head(status, headers, reason)
        if body:
            self.send_body(body)
        self.send_end()

    def answer_error(self, status: int, reason: str, extra: Headers, rid: bytes) -> int:
        self.calls.append(("error", status, reason))
        return len(reason)

    def abort(self) -> None:
        self.closed = True
        self.calls.append(("abort",))

    def exchange_done(self, clean: bool) -> None:
        self.calls.append(("done", clean))

    def upgrade(self, headers: Headers, reason: bytes) -> tuple[RecordingPipe, bytes]:
        self.calls.append(("upgrade", list(headers)))
        self.pipe = RecordingPipe(self.proxy, self.timer)
        return self.pipe, b""


class RecordingPipe:
    """A :class:`proxy.stream.ClientPipe` that keeps what the tunnel sends the client."""

    def __init__(self, proxy: Proxy, timer: Timer | None = None) -> None:
        self.proxy = proxy
        self.timer = timer or Timer()
        self.closed = False
        self.tunnel: Tunnel | None = None
        self.written: list[bytes] = []
        self.eof = False
        self.aborted = False
        self.reading = True

    def take(self) -> bytes:
        out = b"".join(self.written)
        self.written.clear()
        return out

    def attach(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.written.append(data)

    def write_eof(self) -> bool:
        self.eof = True
        return True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True
