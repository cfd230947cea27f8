"""The reverse proxy's data path: client connections, one exchange at a time, to origins.

Protocol-based I/O with flow control both ways: a full client write buffer pauses reading
from the origin, a full origin write buffer pauses reading from the client, so bodies stream
through bounded buffers and are never held whole. HTTP parsing is sans I/O: the codecs of
:mod:`proxy.http1_fast` and :mod:`proxy.http1_fast_client` (llhttp, the default) or those of
:mod:`proxy.http1` (h11), chosen by ``Settings.http_parser``. A request to an origin with an
idle pooled connection runs start to finish in the callbacks, without a task. Upstream
connections come from :mod:`pool.origin`, whose egress layer picks the source IP and port.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import structlog

from pool import turnwrite
from pool.egress import EgressExhausted
from pool.origin import Origin, OriginPool, PoolError, UpstreamConnection
from pool.sockopt import KeepAlive, detect_dead_peer
from proxy import headers as hdrs
from proxy import http1, http1_fast, logs, request_id
from proxy import websocket as ws
from proxy.http1_fast_client import FastClientSide
from proxy.routing import Route, Router
from proxy.target import resolve
from proxy.tunnel import Tunnel

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
    ws_active: int = 0
    ws_total: int = 0

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.latency_sum += seconds
        self.latency[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1


_NEVER = 0.0


class Timer:
    """At most one pending callback: a connection waits for one thing at a time (head, body,
    response, idle), so arming replaces whatever was armed.

    Lazy, as nginx's timers are in effect: arming and disarming only set a deadline and a
    callback, and a loop timer is scheduled only when none is pending at or before the new
    deadline. A keep-alive connection arms and disarms several times per request; with
    ``call_later``/``cancel`` each time that was a heap push and a cancelled handle per arm.
    The pending loop timer, when it fires early, sleeps again until the current deadline.
    """

    __slots__ = ("_at", "_callback", "_deadline", "_handle", "_loop")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self._at = _NEVER  # when the pending loop timer fires
        self._deadline = _NEVER
        self._callback: Callable[[], None] | None = None

    def arm(self, seconds: float, callback: Callable[[], None]) -> None:
        if seconds <= 0:
            self._callback = None
            return
        deadline = self._loop.time() + seconds
        self._deadline = deadline
        self._callback = callback
        if self._handle is not None:
            if self._at <= deadline:
                return  # it fires first and sleeps again until the deadline
            self._handle.cancel()
        self._at = deadline
        self._handle = self._loop.call_at(deadline, self._fire)

    def disarm(self) -> None:
        self._callback = None  # the pending loop timer, if any, fires into nothing

    def stop(self) -> None:
        """Disarm and drop the pending loop timer now: for a connection that will wait for
        nothing for a long time (a WebSocket tunnel), where a loop timer left to run out
        would hold memory per session for up to a minute."""
        self._callback = None
        self._at = self._deadline = _NEVER  # one shared float, not two per session
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        callback = self._callback
        if callback is None:
            return
        if self._loop.time() < self._deadline:
            self._at = self._deadline
            self._handle = self._loop.call_at(self._deadline, self._fire)
            return
        self._callback = None
        callback()


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
        self._active_by_origin: dict[Origin, int] = {}
        fast = settings.http_parser == "httptools" and http1_fast.httptools is not None
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

    def protocol(self, scheme: bytes = b"http") -> Downstream:
        return Downstream(self, scheme)


def classify(exc: BaseException) -> int:
    """The status a client gets for an upstream failure before any response byte."""
    if isinstance(exc, EgressExhausted | PoolError):
        return 503  # no capacity: ports exhausted or the origin's connection limit
    if isinstance(exc, TimeoutError) or getattr(exc, "errno", None) == errno.ETIMEDOUT:
        return 504
    return 502


# what a client is told of an upstream failure: no errno, no address (see Exchange._fail_upstream)
_UPSTREAM_REASONS = {
    502: "the origin could not be reached or sent an invalid response",
    503: "no capacity to reach the origin right now; retry shortly",
    504: "the origin did not answer in time",
}


def _errno_name(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return errno.errorcode.get(code, str(code))
    return type(exc).__name__


class Downstream(asyncio.Protocol):
    """One client connection: reads requests, runs one :class:`Exchange` at a time."""

    # slots: thousands of these live at once (two sockets' worth of state per session)
    __slots__ = (
        "_got_bytes",
        "_timer",
        "client_ip",
        "closed",
        "ex_timer",
        "exchange",
        "held",
        "http",
        "lingering",
        "peer",
        "proxy",
        "reading_paused",
        "scheme",
        "transport",
        "trusted_peer",
        "whole",
        "write_paused",
    )

    def __init__(self, proxy: Proxy, scheme: bytes = b"http") -> None:
        self.proxy = proxy
        self.scheme = scheme
        s = proxy.settings
        self.http = proxy.server_codec(s.max_header_bytes, s.max_request_line)
        self.whole = proxy.whole_heads  # the codec has feed_whole(): the shortcut applies
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | Tunnel | None = None  # a Tunnel after a 101
        self.peer = ("", 0)
        self.closed = False
        self.reading_paused = False
        self.write_paused = False
        self._timer = Timer()
        self.ex_timer = Timer()  # the current exchange's: one pending loop timer per connection
        self._got_bytes = False
        self.lingering = False
        self.held = b""  # see pool.turnwrite
        self.client_ip = b""
        self.trusted_peer = False

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: same interface, no isinstance
        self.transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        peer = transport.get_extra_info("peername")
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
        ex = self.exchange = Exchange(self, head)
        ex.start()
        if not ex.ready and self.exchange is ex:
            self.pause_reading()  # connecting upstream: the parser holds the rest

    def exchange_done(self, keep_alive: bool) -> None:
        self.exchange = None
        if self.closed:
            return
        if not keep_alive or self.proxy.draining:
            self.close()
            return
        try:
            self.http.start_next()
        except http1.ProtocolError as e:
            self.fail(e.status, e.reason)
            return
        self._got_bytes = False
        self._arm(self.proxy.settings.header_timeout, self._header_timeout)
        self.resume_reading()
        self.process()

    def write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.closed:
            turnwrite.write(self, data)

    def write_now(self, data: bytes) -> None:
        """Unheld (see pool.turnwrite): the tunnel's relayed bytes."""
        if data and self.transport is not None and not self.closed:
            turnwrite.write_now(self, data)

    def fail(self, status: int, reason: str, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """The client broke HTTP: answer with an error and close cleanly. An exchange in
        flight (its body was malformed) ends with that answer, so its access line records
        the status the client got, and its origin connection is dropped."""
        ex = self.exchange
        if isinstance(ex, Exchange) and not ex.finished:
            ex.respond_error(status, reason, extra)
            return
        self.answer_error(status, reason, extra, request_id.new())

    def answer_error(
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
        self.write(response)
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


class Exchange:
    """One request and its response; the upstream handler of the pooled connection."""

    tunnel = False  # Downstream's exchange slot holds a Tunnel after a 101

    # slots: thousands of these live at once (two sockets' worth of state per session)
    __slots__ = (
        "_retried",
        "_task",
        "_timer",
        "authority",
        "client",
        "conn",
        "egress_ip",
        "finished",
        "head",
        "host",
        "in_body",
        "origin",
        "path",
        "proxy",
        "ready",
        "received",
        "request_done",
        "request_id",
        "response_started",
        "reused",
        "route",
        "sent",
        "started",
        "status",
        "upstream",
        "websocket",
    )

    def __init__(self, client: Downstream, head: http1.RequestHead) -> None:
        self.client = client
        self.proxy = client.proxy
        self.head = head
        self.started = time.monotonic()
        self.route: Route | None = None
        self.origin: Origin | None = None
        self.conn: UpstreamConnection | None = None
        self.upstream = self.proxy.client_codec()
        self.ready = False  # the origin connection is attached: body may flow
        self.in_body = False
        self.status = 0
        self.sent = 0
        self.received = 0
        self.finished = False
        self.request_done = False
        self.response_started = False
        self.reused = False
        self._retried = False
        self.egress_ip: str | list[str] | None = None
        self._timer = client.ex_timer
        self._task: asyncio.Task[None] | None = None
        self.websocket = ws.is_upgrade(head.headers, head.method)
        self.host = ""  # the routing name and the authority forwarded: set by _route()
        self.authority = b""
        self.path = head.target.decode("latin-1")
        rid = b""
        if client.trusted_peer:  # anyone else's X-Request-ID could forge a trail in the logs
            for name, value in head.headers:
                if name == b"x-request-id":
                    rid = request_id.accept(value)
                    break
        self.request_id = rid or request_id.new()

    # -- start: route, connect ---------------------------------------------------------------

    def start(self) -> None:
        """Route, then attach an idle pooled connection at once when there is one (the hot
        path: no task, no loop turn); otherwise connect in a task."""
        route = self._route()
        if route is None:
            return
        origin = route.pick((), self.proxy.active)
        if origin is not None and not self.websocket:
            conn = self.proxy.pool.acquire_idle(origin)
            if conn is not None:
                self.origin = origin
                self._attach(conn)
                return
        self._task = asyncio.get_running_loop().create_task(self._connect(origin))

    def _route(self) -> Route | None:
        """The route for this request, or None once an error answer has been sent.

        One name for everything (:mod:`proxy.target`): the route is matched by the same
        host the origin receives as Host and X-Forwarded-Host.
        """
        head = self.head
        try:
            target = resolve(head.target, head.headers, head.http_version)
        except http1.ProtocolError as e:
            self.respond_error(e.status, e.reason)
            return None
        self.host = target.host
        self.authority = target.authority
        self.path = target.path.decode("latin-1")
        route = self.proxy.router.match(self.host, self.path)
        if route is None:
            # not an open proxy: no upstream contact for hosts we do not serve
            self.respond_error(421, "no route for this host")
            return None
        self.route = route
        limit = self.proxy.settings.max_body_bytes
        if limit and self._declared_length() > limit:
            self.respond_error(413, f"request body larger than {limit} bytes")
            return None
        return route

    async def _connect(self, origin: Origin | None) -> None:
        """Connect (or wait for the pool), retrying on the route's other origins."""
        route = self.route
        assert route is not None
        tried: list[Origin] = []
        last: BaseException | None = None
        while origin is not None:
            tried.append(origin)
            pool = self.proxy.pool
            try:
                # a WebSocket gets a lease: never back to the idle set, counted apart
                conn = await (pool.lease(origin) if self.websocket else pool.acquire(origin))
            except (OSError, ssl.SSLError) as e:
                last = e
                self.origin = origin  # the access line names the origin the log line names
                self._log_upstream_error(origin, e, None)
                if isinstance(e, PoolError):
                    break  # the origin's own limit: another origin would overload too
                origin = route.pick(tried, self.proxy.active)
                continue
            if self.client.closed or self.finished:
                conn.pool.release(conn, reusable=True)
                return
            self.origin = origin
            self._attach(conn)
            if self.ready:
                self.client.resume_reading()
                self.client.process()
            return
        self._fail_upstream(classify(last) if last else 502)

    def _declared_length(self) -> int:
        for n, v in self.head.headers:
            if n == b"content-length":
                with contextlib.suppress(ValueError):
                    return int(v)
        return 0

    def _attach(self, conn: UpstreamConnection, resend: bool = False) -> None:
        self.conn = conn
        self.reused = conn.requests > 0
        active = self.proxy._active_by_origin
        active[conn.origin] = active.get(conn.origin, 0) + 1
        conn.attach(self)
        if self.client.write_paused:
            # the client's buffer filled during an earlier exchange and has not drained: its
            # pause_writing() will not come again, so this origin must start paused
            self.pause_origin()
        head = self.head
        headers = hdrs.to_origin(
            head.headers,
            client_ip=self.client.client_ip,
            scheme=self.client.scheme,
            trusted_peer=self.client.trusted_peer,
            # HTTP/1.0 without Host (the catch-all route only): the origin's own name
            host=self.authority or str(conn.origin).split("://", 1)[1].encode(),
            request_id=self.request_id,
            websocket=self.websocket,
        )
        if head.has_body and not any(n == b"content-length" for n, _ in head.headers):
            headers.append((b"transfer-encoding", b"chunked"))  # re-framed for this hop
        target = self.path.encode("latin-1")
        try:
            conn.write(self.upstream.request_head(head.method, target, headers))
        except Exception as e:  # h11 refusing what the downstream parser accepted
            log.info("request_not_forwarded", error=str(e), request_id=self.request_id.decode())
            self.respond_error(400, "the request cannot be forwarded")
            return
        if resend:
            conn.write(self.upstream.end())  # bodiless: the whole request again
            self.ready = True
            self._arm(self.proxy.settings.upstream_response_timeout, self._response_timeout)
            return
        if head.expect_continue:
            self.client.write(self.client.http.informational(100))
        self.ready = True
        self.in_body = head.has_body
        if self.in_body:
            self.client.arm_body_timer()

    # -- request body: client -> origin ------------------------------------------------------

    def request_body(self, data: bytes) -> None:
        self.sent += len(data)
        limit = self.proxy.settings.max_body_bytes
        if limit and self.sent > limit:
            self.abort_request(413, f"request body larger than {limit} bytes")
            return
        if self.conn is not None and self.conn.alive:
            self.conn.write(self.upstream.body(data))
            self.proxy.stats.bytes_in += len(data)

    def request_end(self) -> None:
        self.in_body = False
        self.request_done = True
        if self.conn is not None and self.conn.alive:
            self.conn.write(self.upstream.end())
            self._arm(self.proxy.settings.upstream_response_timeout, self._response_timeout)

    def abort_request(self, status: int, reason: str) -> None:
        if self.conn is not None:
            self._release(False)
        self.respond_error(status, reason)

    # -- upstream handler: origin -> client --------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.client.whole:
            got = self.upstream.feed_whole(data)  # type: ignore[union-attr]
            if got is not None:  # the common response, whole in one read: no events
                self._respond_whole(*got)
                return
        self.upstream.feed(data)
        self._pump_response()

    def _respond_whole(self, event: http1.ResponseHead, body: bytes) -> None:
        """What ``_pump_response`` does with a final head, one body piece and End."""
        try:
            out = self._final_head(event)
        except http1.ProtocolError as e:
            self._upstream_failed(e)
            return
        if body:
            out += self._body_out(body)
        self.client.write(out + self.client.http.end())
        self._finish()

    def _final_head(self, event: http1.ResponseHead) -> bytes:
        """The client's head for the origin's final response; ProtocolError(502) when the
        client codec refuses it."""
        self._disarm()
        self.status = event.status
        self.response_started = True
        try:
            return self.client.http.response_head(
                event.status, hdrs.to_client(event.headers), event.reason
            )
        except Exception as e:
            raise http1.ProtocolError(502, f"bad response head: {e}") from e

    def _body_out(self, data: bytes) -> bytes:
        """A piece of the response body, counted and framed for the client."""
        self.received += len(data)
        self.proxy.stats.bytes_out += len(data)
        return self.client.http.body(data)

    def eof_received(self) -> None:
        self.upstream.feed(b"")
        self._pump_response()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.finished:
            return
        reason = f"origin closed the connection: {exc}" if exc else "origin closed the connection"
        self._upstream_failed(ConnectionResetError(errno.ECONNRESET, reason))

    def pause_writing(self) -> None:
        self.client.pause_reading()

    def resume_writing(self) -> None:
        self.client.resume_reading()

    def pause_origin(self) -> None:
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.pause_reading()

    def resume_origin(self) -> None:
        if self.conn is not None and self.conn.transport is not None and self.conn.alive:
            self.conn.transport.resume_reading()

    def _pump_response(self) -> None:
        out: list[bytes] = []  # one write per pump: head and body of a small response together

        def flush() -> None:
            if out:
                self.client.write(b"".join(out))
                out.clear()

        while not self.finished:
            try:
                event = self.upstream.next_event()
            except http1.ProtocolError as e:
                flush()
                self._upstream_failed(e)
                return
            if event is http1.NEED_DATA:
                flush()
                return
            if isinstance(event, http1.ResponseHead):
                if event.informational:
                    if event.status == 101 and self.websocket:
                        flush()
                        self._switch(event)
                        return
                    if event.status == 100:
                        continue  # we sent our own 100 Continue, if it was asked for
                    out.append(self.client.http.informational(event.status, event.headers))
                    continue
                try:
                    out.append(self._final_head(event))
                except http1.ProtocolError as e:
                    flush()
                    self._upstream_failed(e)
                    return
            elif isinstance(event, http1.Body):
                out.append(self._body_out(event.data))
            elif isinstance(event, http1.End):
                out.append(self.client.http.end())
                flush()
                self._finish()
                return
            elif event is http1.CLOSED:
                flush()
                self._upstream_failed(ConnectionResetError(errno.ECONNRESET, "origin closed"))
                return
            else:
                flush()
                return  # PAUSED / SWITCHED: handled by the WebSocket path
        flush()

    def _response_timeout(self) -> None:
        self._upstream_failed(TimeoutError(errno.ETIMEDOUT, "origin sent no response head in time"))

    def _upstream_failed(self, exc: BaseException) -> None:
        if self.finished:
            return
        if self._may_retry(exc):
            # a kept-alive connection the origin closed as we reused it: nothing was
            # processed, and a bodiless request can go again on a fresh connection
            self._retried = True
            self._release(False)
            self.upstream = self.proxy.client_codec()
            self.ready = False
            self._task = asyncio.get_running_loop().create_task(self._retry())
            return
        self._log_upstream_error(self.origin, exc, self.conn)
        self._release(False)
        if self.response_started:
            self.finished = True
            self.client.abort()  # a truncated body must look truncated, not complete
            self._record(self.status or 502)
            self.client.exchange_done(False)
            return
        self._fail_upstream(exc.status if isinstance(exc, http1.ProtocolError) else classify(exc))

    def _may_retry(self, exc: BaseException) -> bool:
        return (
            self.reused
            and not self._retried
            and not self.response_started
            and not self.head.has_body
            and self.request_done
            and self.received == 0
            and isinstance(exc, ConnectionError)
        )

    async def _retry(self) -> None:
        assert self.origin is not None
        try:
            conn = await self.proxy.pool.acquire(self.origin)
        except (OSError, ssl.SSLError) as e:
            self._log_upstream_error(self.origin, e, None)
            self._fail_upstream(classify(e))
            return
        if self.client.closed or self.finished:
            conn.pool.release(conn, reusable=True)
            return
        self._attach(conn, resend=True)

    def _finish(self) -> None:
        self._disarm()
        self.finished = True
        reusable = self.upstream.reusable
        self._release(reusable)
        self._record(self.status)
        self.client.exchange_done(self.client.http.keep_alive)

    def _release(self, reusable: bool) -> None:
        self._disarm()
        conn, self.conn = self.conn, None
        if conn is None:
            return
        active = self.proxy._active_by_origin
        active[conn.origin] = active.get(conn.origin, 0) - 1
        self.egress_ip = conn.egress_ip
        conn.pool.release(conn, reusable and conn.alive)  # its own pool, even after a reload

    def client_gone(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if not self.finished:
            self.finished = True
            self._release(False)
            self._record(499)

    # -- endings -----------------------------------------------------------------------------

    def respond_error(
        self, status: int, reason: str, extra: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        """End the exchange with the proxy's own answer; the access line records what the
        client got: this status and body, or, when a response had already started, that
        response's status (the client sees it cut short)."""
        if self.finished:
            return
        self.finished = True
        task = self._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()  # still connecting: the origin must not get this request
        if not self.response_started:
            self.status = status
        self._release(False)
        self.client.exchange = None
        sent = self.client.answer_error(status, reason, extra, self.request_id)
        if not self.response_started:
            self.received = sent
        self._record(self.status)

    def _fail_upstream(self, status: int) -> None:
        """The client's answer to an upstream failure: the status, a generic reason and the
        request id; the detail (errno, addresses) is in the upstream_error line only."""
        extra = [(b"retry-after", b"1")] if status == 503 else []
        self.respond_error(status, _UPSTREAM_REASONS.get(status, "upstream failure"), extra)

    def _record(self, status: int) -> None:
        seconds = time.monotonic() - self.started
        route = self.route.name if self.route else "-"
        self.proxy.stats.observe(route, status, seconds)
        logs.access(
            {
                "method": self.head.method.decode("latin-1"),
                "host": self.host,
                "path": self.path,
                "status": status,
                "bytes": self.received,
                "bytes_in": self.sent,
                "duration_ms": round(seconds * 1000, 3),
                "origin": str(self.origin) if self.origin else None,
                "egress": self.egress_ip,
                "client": self.client.peer[0],
                "request_id": self.request_id.decode("ascii"),
            }
        )

    def _log_upstream_error(
        self, origin: Origin | None, exc: BaseException, conn: UpstreamConnection | None
    ) -> None:
        fields: dict[str, Any] = {
            "request_id": self.request_id.decode("ascii"),
            "route": self.route.name if self.route else None,
            "origin": str(origin) if origin else None,
            "errno": _errno_name(exc),
            "error": str(exc),
        }
        if isinstance(exc, EgressExhausted):
            fields["destination"] = f"{exc.destination[0]}:{exc.destination[1]}"
            fields["egress"] = [ip or "default" for ip, _ in exc.attempts]
        elif conn is not None:
            dst = conn.slot.destination
            fields["egress"] = conn.egress_ip
            fields["four_tuple"] = f"{conn.local[0]}:{conn.local[1]}->{dst[0]}:{dst[1]}"
        else:
            local = getattr(exc, "local_addr", None)
            remote = getattr(exc, "remote_addr", None)
            if local is not None:
                fields["egress"] = str(local[0])
            if remote is not None:
                fields["destination"] = f"{remote[0]}:{remote[1]}"
        if "egress" in fields:
            self.egress_ip = fields["egress"]  # the access line names the same egress
        log.warning("upstream_error", **fields)

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._timer.arm(seconds, callback)

    def _disarm(self) -> None:
        self._timer.disarm()

    # -- WebSocket: the origin's 101 hands both connections to a Tunnel -----------------------

    def _switch(self, event: http1.ResponseHead) -> None:
        """The origin accepted the upgrade: relay its 101, then hand over to a
        :class:`proxy.tunnel.Tunnel`, which keeps only what relaying needs."""
        self._timer.stop()  # the tunnel arms its own idle timer, if any
        self.client._timer.stop()
        self.status = 101
        self.response_started = True
        self.finished = True
        self.client.write(
            self.client.http.informational(101, hdrs.to_client(event.headers, websocket=True))
        )
        self._record(101)
        conn, self.conn = self.conn, None
        assert conn is not None and self.origin is not None
        from_origin = self.upstream.trailing_data()  # frames that came with the 101
        from_client = self.client.http.trailing_data()  # frames sent before the 101
        # the HTTP codecs are done for this connection's life: a shared spent one keeps the
        # type and frees the memory of every session
        self.client.http.release()
        self.client.http = _SPENT_SERVER
        tunnel = Tunnel(self.client, conn, self.origin, (self.host, self.path, self.request_id))
        tunnel.start(from_origin, from_client)


_SPENT_SERVER = http1.ServerSide()  # never used: stands in for the parser a tunnel dropped


class Listener:
    """A listening socket with its own accept loop, so accepting can pause at the limit.

    asyncio's Server cannot stop accepting without closing the socket; with our own reader
    on the listening fd, reaching ``max_connections`` just removes the reader (new clients
    wait in the kernel's backlog) and the first close adds it back.
    """

    def __init__(
        self,
        proxy: Proxy,
        address: tuple[str, int],
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
        backlog: int = 4096,
    ) -> None:
        self.proxy = proxy
        self.ssl = ssl_context
        self.scheme = b"https" if ssl_context is not None else b"http"
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sock.bind(address)
        self.sock.listen(backlog)
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()
        self._accepting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._resume()

    def _resume(self) -> None:
        if not self._accepting and self._loop is not None and self.sock.fileno() >= 0:
            self._loop.add_reader(self.sock.fileno(), self._accept_ready)
            self._accepting = True

    def _pause(self) -> None:
        if self._accepting and self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._accepting = False

    def _accept_ready(self) -> None:
        assert self._loop is not None
        for _ in range(64):
            if len(self.proxy.clients) + len(self._tasks) >= self.proxy.settings.max_connections:
                self._pause()
                return
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    log.error("accept_failed", errno=_errno_name(e), error=str(e))
                    self._pause()
                    self._loop.call_later(0.1, self._resume)
                    return
                raise
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            detect_dead_peer(conn, self.proxy.settings.tcp_keepalive)
            task = self._loop.create_task(
                self._loop.connect_accepted_socket(self._protocol, conn, ssl=self.ssl)
            )
            self._tasks.add(task)
            task.add_done_callback(self._accepted)

    def _protocol(self) -> Downstream:
        return self.proxy.protocol(self.scheme)

    def _accepted(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("accept_handshake_failed", error=str(task.exception()))

    def connection_closed(self) -> None:
        room = len(self.proxy.clients) < self.proxy.settings.max_connections
        if room and not self._accepting and not self.proxy.draining:
            self._resume()

    def close(self) -> None:
        self._pause()
        self.sock.close()
