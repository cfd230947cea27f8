"""The reverse proxy's data path: client connections, one exchange at a time, to origins.

Protocol-based I/O with flow control both ways: a full client write buffer pauses reading
from the origin, a full origin write buffer pauses reading from the client, so bodies stream
through bounded buffers and are never held whole. HTTP parsing is sans I/O: the codecs of
:mod:`proxy.http1_fast` and :mod:`proxy.http1_fast_client` (llhttp, the default) or those of
:mod:`proxy.http1` (h11), chosen by ``Settings.http_parser``. A request to an origin with an
idle pooled connection runs start to finish in the callbacks, without a task. Upstream
connections come from :mod:`pool.origin`, whose egress layer picks the source IP and port.

One module, one job: this one holds the per-worker state (:class:`Proxy`) and the client
connection (:class:`Downstream`); :mod:`proxy.exchange` one request, :mod:`proxy.tunnel` one
WebSocket session, :mod:`proxy.listener` accepting, :mod:`proxy.timer` the lazy timer.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import structlog

from pool import turnwrite
from pool.origin import Origin, OriginPool
from pool.sockopt import KeepAlive
from proxy import access, choose, http1, http1_fast, request_id
from proxy import headers as hdrs
from proxy.exchange import Exchange
from proxy.http1_fast_client import FastClientSide
from proxy.limits import ClientLimits
from proxy.listener import Listener
from proxy.observe import Tracer
from proxy.proxy_protocol import ProxyHeader
from proxy.routing import Router
from proxy.stream import Headers, sockname
from proxy.timer import Timer
from proxy.tunnel import Tunnel

__all__ = ["Downstream", "Listener", "Proxy", "Settings", "Stats", "Timer"]

log = structlog.get_logger("originpool.proxy")

LINGER = 2.0  # seconds an error response's connection keeps draining input
WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024


@dataclass(frozen=True)
class Settings:
    """What the data path needs from the config, nothing more (so tests can build one)."""

    max_header_bytes: int = 16384
    max_request_line: int = 8192
    max_body_bytes: int = 0  # 0: unlimited
    max_connections: int = 10000
    header_timeout: float = 10.0
    body_idle_timeout: float = 60.0
    upstream_response_timeout: float = 60.0
    websocket_idle_timeout: float = 0.0  # 0: off (sessions are meant to live for days)
    trusted_proxies: Sequence[hdrs.Network] = ()
    http_parser: str = "httptools"  # or "h11": the strictness bar, ~4x slower per request
    tcp_keepalive: KeepAlive | None = None  # on client sockets; the pool sets its own


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass
class Stats:
    """Counters the admin /metrics renders."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)  # (route, status)
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    bytes_in: int = 0  # client -> origin body bytes
    bytes_out: int = 0  # origin -> client body bytes
    connections: int = 0
    connections_total: int = 0
    http2_connections_total: int = 0  # of connections_total: those that spoke HTTP/2
    ws_active: int = 0
    ws_total: int = 0

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.latency_sum += seconds
        self.latency[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1


class Proxy:
    """One worker's shared state: routes, pool, settings, counters, drain flag."""

    def __init__(self, router: Router, pool: OriginPool, settings: Settings) -> None:
        self.router = router
        self.pool = pool
        self.settings = settings
        self.stats = Stats()
        self.draining = False
        self.clients: set[Downstream] = set()
        self.listeners: list[Listener] = []
        self.all_closed = asyncio.Event()  # set when draining and the last client is gone
        self.sessions: set[Tunnel] = set()  # WebSocket tunnels, for Close 1001 on shutdown
        # per client address (conn_per_ip, rate_per_ip, ...): None while every limit is off
        self.limits: ClientLimits | None = None
        # [tracing] enabled: traceparent to origins, trace ids in the lines (proxy.observe)
        self.tracer: Tracer | None = None
        self._active_by_origin: dict[Origin, int] = {}
        fast = settings.http_parser == "httptools" and http1_fast.HAVE_HTTPTOOLS
        # which HTTP/1.1 codec runs where: README "HTTP parsing"
        self.server_codec: Callable[[int, int], http1.ServerSide | http1_fast.FastServerSide] = (
            http1_fast.FastServerSide if fast else http1.ServerSide
        )
        self.client_codec: Callable[[], http1.ClientSide | FastClientSide] = (
            FastClientSide if fast else http1.ClientSide
        )
        self.whole_heads = fast

    def active(self, origin: Origin) -> int:
        return self._active_by_origin.get(origin, 0)

    def tunnels(self, origin: Origin | None = None) -> list[Tunnel]:
        """The worker's live WebSocket sessions (of one origin, when given): what ends them
        with :meth:`proxy.tunnel.Tunnel.end` finds them here."""
        return [t for t in self.sessions if origin is None or t.origin == origin]

    def protocol(
        self,
        scheme: bytes = b"http",
        header: ProxyHeader | None = None,
        limit_key: bytes | None = None,
        http2: bool = False,
    ) -> asyncio.Protocol:
        """A client connection's protocol: HTTP/1.1, or with ``http2`` whichever of HTTP/1.1
        and HTTP/2 the connection turns out to speak (:mod:`proxy.choose`)."""
        return Downstream(self, scheme, header, limit_key, http2)


class Downstream(asyncio.Protocol):
    """One HTTP/1.1 client connection: reads requests, runs one :class:`Exchange` at a time.

    It is the :class:`proxy.stream.ClientStream` of each of its exchanges in turn (no object
    per request: the hot path's cost), and after a 101 the :class:`proxy.stream.ClientPipe`
    of the WebSocket session it carries."""

    # slots: thousands of these live at once (two sockets' worth of state per session)
    __slots__ = (
        "_ex_timer",
        "_got_bytes",
        "_timer",
        "began",
        "client_ip",
        "closed",
        "deferred",
        "exchange",
        "held",
        "http",
        "http_version",
        "limit_key",
        "lingering",
        "local",
        "peer",
        "proxy",
        "reading_paused",
        "scheme",
        "sniffing",
        "transport",
        "trusted_peer",
        "whole",
        "write_paused",
    )

    def __init__(
        self,
        proxy: Proxy,
        scheme: bytes = b"http",
        header: ProxyHeader | None = None,
        limit_key: bytes | None = None,
        http2: bool = False,
    ) -> None:
        """``http2``: the connection may turn out to be HTTP/2 (:mod:`proxy.choose`).
        ``header``: the PROXY header the connection began with, whose source is then the
        client (X-Forwarded-For, the logs, the limits); ``limit_key``: the address it counts
        against ``conn_per_ip`` until it closes (see :mod:`proxy.proxy_accept`)."""
        self.proxy = proxy
        self.scheme = scheme
        s = proxy.settings
        self.http = proxy.server_codec(s.max_header_bytes, s.max_request_line)
        self.whole = proxy.whole_heads  # the codec has feed_whole(): the shortcut applies
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | Tunnel | None = None  # a Tunnel after a 101
        self.peer = ("", 0)
        self.local: tuple[str, int] | None = None  # where the client connected, if a header said
        if header is not None and header.source is not None:
            self.peer, self.local = header.source, header.destination
        self.limit_key = limit_key
        # HTTP/2 may be chosen: the bytes of the preface read so far, else None
        self.sniffing: bytes | None = choose.WAIT if http2 else None
        self.closed = False
        self.reading_paused = False
        self.write_paused = False
        self._timer = Timer()
        self._ex_timer = Timer()  # the current exchange's (``timer``): one loop timer pending
        self.http_version = "1.1"  # the current request's
        self._got_bytes = False
        self.began = 0.0  # monotonic time of the first read of a head not whole in one
        self.lingering = False
        self.deferred: tuple[int, str] | None = None  # a later message's error, see fail()
        self.held = b""  # see pool.turnwrite
        self.client_ip = b""
        self.trusted_peer = False

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: same interface, no isinstance
        self.transport = cast(asyncio.Transport, transport)
        if self.sniffing is not None and transport.get_extra_info("ssl_object") is not None:
            self.sniffing = None  # TLS: the handshake's ALPN has chosen
            if choose.alpn_h2(transport):
                choose.to_http2(self, self.transport)
                return
        self.transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        peer = self.peer if self.peer[0] else transport.get_extra_info("peername")
        if peer:
            self.peer = (str(peer[0]), int(peer[1]))
            self.client_ip = self.peer[0].encode()
            # once per connection, not per request: X-Forwarded-* of trusted proxies are kept
            self.trusted_peer = hdrs.is_trusted(self.peer[0], self.proxy.settings.trusted_proxies)
        self.proxy.clients.add(self)
        self.proxy.stats.connections += 1
        self.proxy.stats.connections_total += 1
        self._arm(self.proxy.settings.header_timeout, self._header_timeout)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # after an error response: read and drop until EOF or LINGER
        if self.sniffing is not None:  # the connection's first bytes: HTTP/2's preface?
            h2, data = choose.sniff(self.sniffing, data)
            if h2 is None:
                self.sniffing = data
                return
            self.sniffing = None
            if h2:
                self._to_http2(data)
                return
        self._got_bytes = True
        ex = self.exchange
        if ex is not None and ex.tunnel:
            ex.tunnel_to_origin(data)
            return
        if ex is None and self.whole:
            head = self.http.feed_whole(data)  # type: ignore[union-attr]
            if head is not None:  # the common request, whole in one read: no parser events
                self._begin(head)
                self.process()
                return
        if ex is None and not self.began:
            # a head not whole in one read: a refusal's duration_ms counts from here (a
            # whole one starts its exchange at once, which keeps its own clock)
            self.began = time.monotonic()
        try:
            self.http.feed(data)
        except http1.ProtocolError as e:
            self.fail(e.status, e.reason)
            return
        if ex is not None and ex.in_body:
            self.arm_body_timer()
        self.process()

    def eof_received(self) -> bool | None:
        if self.lingering:
            self.close()
            return None
        if self.sniffing:  # part of a preface, then EOF: HTTP/1.1's to answer
            held, self.sniffing = self.sniffing, None
            self.data_received(held)
        ex = self.exchange
        if ex is not None and ex.tunnel:
            ex.tunnel_eof_from_client()
            return True
        try:
            self.http.feed(b"")
        except http1.ProtocolError as e:
            self.fail(e.status, e.reason)
            return None
        self.process()
        return True  # half-close: the response may still be on its way

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        self.http.release()
        self.proxy.clients.discard(self)
        self.proxy.stats.connections -= 1
        if self.limit_key is not None and self.proxy.limits is not None:
            self.proxy.limits.close(self.limit_key)
        if self.exchange is not None:
            self.exchange.client_gone()
        for listener in self.proxy.listeners:
            listener.connection_closed()
        if self.proxy.draining and not self.proxy.clients:
            self.proxy.all_closed.set()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.exchange is not None:
            self.exchange.pause_origin()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.exchange is not None:
            self.exchange.resume_origin()

    # -- flow --------------------------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def process(self) -> None:
        """Pull events from the parser as far as the current exchange can take them."""
        while not self.closed and not self.lingering:
            ex = self.exchange
            if ex is not None and (not ex.ready or ex.tunnel):
                return  # waiting for the origin; the parser holds the rest
            try:
                event = self.http.next_event()
            except http1.ProtocolError as e:
                self.fail(e.status, e.reason)
                return
            if event is http1.NEED_DATA or event is http1.PAUSED:
                return
            if event is http1.CLOSED:
                if ex is None:
                    self.close()
                return
            if isinstance(event, http1.RequestHead):
                self._begin(event)
                continue
            if ex is None:
                return  # body of a request already answered (error): nothing to feed
            if isinstance(event, http1.Body):
                ex.request_body(event.data)
            elif isinstance(event, http1.End):
                self._disarm()
                ex.request_end()

    def _begin(self, head: http1.RequestHead) -> None:
        self._disarm()
        if head.http_version != b"1.1":
            self.http_version = head.http_version.decode("latin-1")
        ex = self.exchange = Exchange(self, head)
        ex.start()
        if not ex.ready and self.exchange is ex:
            self.pause_reading()  # connecting upstream: the parser holds the rest

    def exchange_done(self, clean: bool) -> None:
        self.exchange = None
        if self.closed:
            return
        deferred, self.deferred = self.deferred, None
        if not clean or not self.http.keep_alive or self.proxy.draining:
            self.close()  # what followed a closing response is never read as a request
            return
        try:
            self.http.start_next()
        except http1.ProtocolError as e:
            self.fail(e.status, e.reason)
            return
        if deferred is not None:
            self.fail(*deferred)
            return
        self._got_bytes = False
        self.began = 0.0
        self.http_version = "1.1"
        self._arm(self.proxy.settings.header_timeout, self._header_timeout)
        self.resume_reading()
        self.process()

    def _send(self, data: bytes) -> None:
        """Held to the end of the loop turn (see pool.turnwrite): one send per turn."""
        if data and self.transport is not None and not self.closed:
            turnwrite.write(self, data)

    # -- proxy.stream.ClientStream: the current exchange's client side ------------------------

    def check_request_body(self) -> None:
        self.http.check_buffered()

    def local_address(self) -> tuple[str, int] | None:
        return self.local or sockname(self.transport)

    def deliver(self) -> None:
        self.resume_reading()
        self.process()

    def send_informational(self, status: int, headers: Headers = (), reason: bytes = b"") -> None:
        self._send(self.http.informational(status, headers, reason))

    def send_head(self, status: int, headers: Headers, reason: bytes) -> None:
        self._send(self.http.response_head(status, headers, reason))

    def send_body(self, data: bytes) -> None:
        self._send(self.http.body(data))

    def send_end(self) -> None:
        self._send(self.http.end())

    def send_whole(self, status: int, headers: Headers, reason: bytes, body: bytes) -> None:
        http = self.http
        out = http.response_head(status, headers, reason)
        if body:
            out += http.body(body)
        self._send(out + http.end())

    def answer_error(
        self, status: int, reason: str, extra: Sequence[tuple[bytes, bytes]], rid: bytes
    ) -> int:
        self.exchange = None
        return self._answer(status, reason, extra, rid)

    def upgrade(self, headers: Headers, reason: bytes) -> tuple[Downstream, bytes]:
        # the head, body and linger deadlines are HTTP's: a session keeps only the tunnel's
        # timer (``timer``), and what HTTP alone reads goes too (~100 bytes per session)
        self._timer.stop()
        self._timer = self._ex_timer = _SPENT_TIMER  # the exchange stopped its own
        self.client_ip = b""  # X-Forwarded-For of requests to come: none will
        self.began = 0.0  # a shared float, not one per session
        self._send(self.http.informational(101, headers, reason))
        from_client = self.http.trailing_data()  # frames sent before the 101
        # the HTTP codec is done for this connection's life: a shared spent one keeps the
        # type and frees the memory of every session
        self.http.release()
        self.http = _SPENT_SERVER
        return self, from_client

    # -- proxy.stream.ClientPipe: after a 101 -------------------------------------------------

    @property
    def timer(self) -> Timer:
        """The current exchange's timer, then the session's: made again only when a tunnel
        first needs one (an idle timeout, a close), so an idle session pins none."""
        timer = self._ex_timer
        if timer is _SPENT_TIMER:
            timer = self._ex_timer = Timer()
        return timer

    def attach(self, tunnel: Tunnel) -> None:
        self.exchange = tunnel
        # the 101's access line named the client, and nothing after it reads the address
        # (the session's line names the request id): ~126 bytes less per idle session
        self.peer = _NO_PEER

    def write(self, data: bytes) -> None:
        """Unheld (see pool.turnwrite): the tunnel's relayed bytes."""
        if data and self.transport is not None and not self.closed:
            turnwrite.write_now(self, data)

    def write_eof(self) -> bool:
        return not self.closed and turnwrite.write_eof(self)

    def fail(self, status: int, reason: str, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """The client broke HTTP: answer with an error and close cleanly. An exchange in
        flight (its body was malformed) ends with that answer, so its access line records
        the status the client got, and its origin connection is dropped."""
        ex = self.exchange
        if isinstance(ex, Exchange) and not ex.finished:
            if ex.request_done:
                # the request in flight is whole; a later message is bad (pipelined bytes
                # after it, or after a request that closes the connection): its response
                # goes first, then this answer or the close (exchange_done)
                self.deferred = (status, reason)
                self.pause_reading()
                return
            ex.respond_error(status, reason, extra)
            return
        self.refuse(status, reason, extra)

    def refuse(self, status: int, reason: str, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """Answer a request no exchange holds (its head was too large, malformed, or too
        slow to come) and count it and log its access line like any response, as nginx
        does: method, host and path are "-", for nothing of them was parsed."""
        if self.closed or self.lingering:
            return  # no answer goes out: nothing to count
        rid = request_id.new()
        body_bytes = self._answer(status, reason, extra, rid)
        now = time.monotonic()
        access.refusal(
            self.proxy.stats,
            now - (self.began or now),
            status=status,
            body_bytes=body_bytes,
            client=self.peer[0],
            request_id=rid.decode("ascii"),
            http_version=self.http_version,
        )

    def _answer(
        self, status: int, reason: str, extra: Sequence[tuple[bytes, bytes]], rid: bytes
    ) -> int:
        """Send an error answer (if no response started) and close cleanly; returns the body
        bytes sent, for the access line.

        ``reason`` is for the client: it names what was wrong with the request, never the
        proxy's internals (an upstream failure's detail goes to the log line carrying the
        same request id). Cleanly means a lingering close, as nginx does: closing a socket
        with unread input sends RST, which can destroy the error response before the client
        reads it (a 413 while the client is still uploading). So: send, half-close, discard
        what still arrives, close at the client's EOF or after LINGER seconds.
        """
        if self.closed or self.lingering:
            return 0
        response = self.http.error_response(
            status,
            f"{reason}\nrequest id: {rid.decode('ascii')}",
            [*extra, (b"x-request-id", rid)],
        )
        self._send(response)
        if status < 500:  # the proxy's own failures are logged as upstream_error
            log.info(
                "client_error",
                status=status,
                reason=reason,
                client=f"{self.peer[0]}:{self.peer[1]}",
                request_id=rid.decode("ascii"),
            )
        if not turnwrite.write_eof(self):
            self.close()
        else:
            self.lingering = True
            self.resume_reading()
            self._arm(LINGER, self.close)
        return len(response) - response.find(b"\r\n\r\n") - 4 if response else 0

    def _to_http2(self, data: bytes) -> None:
        """The preface: the connection is HTTP/2's from here, counted once, as its."""
        assert self.transport is not None
        self._disarm()
        self.closed = True  # nothing of HTTP/1.1 runs for it any more
        self.http.release()
        self.proxy.clients.discard(self)
        self.proxy.stats.connections -= 1
        self.proxy.stats.connections_total -= 1
        choose.to_http2(self, self.transport, data)

    def drain(self) -> None:
        """The worker is draining: an idle connection closes now; a busy one after its
        exchange (exchange_done reads the drain flag)."""
        if self.exchange is None:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self._disarm()
            turnwrite.flush(self)
            self.transport.close()  # flushes what is buffered, then FIN

    def abort(self) -> None:
        """Reset: a truncated response must look truncated. What was already relayed still
        goes first (it was written before the failure), as it did when nothing was held."""
        if self.transport is not None:
            self.closed = True
            turnwrite.flush(self)
            self.transport.abort()

    # -- timers ------------------------------------------------------------------------------

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        if self._timer is _SPENT_TIMER:  # after a 101 nothing arms it; should anything,
            self._timer = Timer()  # it gets a timer of its own, never the shared one
        self._timer.arm(seconds, callback)

    def _disarm(self) -> None:
        self._timer.disarm()

    def _header_timeout(self) -> None:
        if self._got_bytes:
            self.fail(408, "request head not received in time")
        else:
            self.close()  # an idle keep-alive connection: close quietly, like nginx

    def arm_body_timer(self) -> None:
        self._arm(self.proxy.settings.body_idle_timeout, self._body_timeout)

    def _body_timeout(self) -> None:
        if self.reading_paused:
            self.arm_body_timer()  # the stall is ours (origin back-pressure), not the client's
            return
        if isinstance(self.exchange, Exchange):
            self.exchange.abort_request(408, "request body stalled")


_SPENT_SERVER = http1.ServerSide()  # never used: stands in for the parser a tunnel dropped
_NO_PEER = ("", 0)  # a tunnel's: see attach
_SPENT_TIMER = Timer.spent()  # never armed (see _arm): the deadlines a tunnel dropped
