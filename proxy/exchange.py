"""One HTTP request and its response, from the route to the last byte: connect (or reuse an
idle pooled connection), forward the head and body, relay the response, retry what may be
retried, and answer the proxy's own errors. A WebSocket upgrade ends here with the 101: the
session goes on as a :class:`proxy.tunnel.Tunnel`.

The exchange is the upstream connection's handler while it runs. Of the client it knows only
a :class:`proxy.stream.ClientStream` (an HTTP/1.1 connection's current exchange, or one HTTP/2
stream), so the same code serves both protocols. Its progress is
:mod:`proxy.exchange_state`'s two state machines, not a set of flags.

Two hook points, each one method called from every place it applies:
:meth:`Exchange.head_to_origin` (the request head's fields as the origin gets them) and
:meth:`Exchange.head_to_client` (the response head's fields as the client gets them).

Here: the request's own course (admission and route, the request body, the endings, the
WebSocket switch). Two jobs live in their own modules and are bound into the class as plain
methods: the way to the origin (connect, retry, attach, an upstream failure) in
:mod:`proxy.exchange_connect`, the response relay (origin -> client) in
:mod:`proxy.exchange_relay`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

from pool.origin import Origin, UpstreamConnection
from proxy import exchange_connect as connect
from proxy import exchange_relay as relay
from proxy import headers as hdrs
from proxy import http1, observe, request_id
from proxy import websocket as ws
from proxy.exchange_state import BODY, CONNECTING, OVER, RESENDING, SENT, STREAMING, WAITING
from proxy.limits import ClientLimits, forwarded_client, retry_after
from proxy.routing import Route, session_refusal
from proxy.target import resolve
from proxy.tunnel import Tunnel

if TYPE_CHECKING:
    from proxy.stream import ClientStream, Headers


class Exchange:
    """One request and its response; the upstream handler of the pooled connection."""

    # a client connection's exchange slot holds a Tunnel after a 101; Literal, so that
    # testing it narrows Downstream's Exchange | Tunnel without an isinstance per read
    tunnel: Literal[False] = False

    # slots: thousands of these live at once (two sockets' worth of state per session)
    __slots__ = (
        "_retried",
        "_task",
        "_timer",
        "authority",
        "client",
        "conn",
        "egress_ip",
        "head",
        "host",
        "origin",
        "path",
        "proxy",
        "received",
        "req",
        "request_id",
        "resp",
        "reused",
        "route",
        "sent",
        "started",
        "status",
        "trace",
        "upstream",
        "websocket",
    )

    def __init__(self, client: ClientStream, head: http1.RequestHead) -> None:
        self.client = client
        self.proxy = client.proxy
        self.head = head
        self.started = time.monotonic()
        self.route: Route | None = None
        self.origin: Origin | None = None
        self.conn: UpstreamConnection | None = None
        self.upstream = self.proxy.client_codec()
        self.req = CONNECTING
        self.resp = WAITING
        self.status = 0
        self.sent = 0
        self.received = 0
        self.reused = False
        self._retried = False
        self.egress_ip: str | list[str] | None = None
        self._timer = client.timer
        self._task: asyncio.Task[None] | None = None
        self.websocket = ws.is_upgrade(head.headers)
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
        tracer = self.proxy.tracer  # None unless [tracing] enabled: one check per request
        self.trace = (
            None if tracer is None else tracer.request_started(head.headers, client.trusted_peer)
        )

    # -- the state, as the client side asks it ------------------------------------------------

    @property
    def ready(self) -> bool:
        """The origin connection is attached: body may flow."""
        return self.req is BODY or self.req is SENT

    @property
    def in_body(self) -> bool:
        return self.req is BODY and self.head.has_body

    @property
    def request_done(self) -> bool:
        """The whole request was read from the client."""
        return self.req is SENT or self.req is RESENDING

    @property
    def finished(self) -> bool:
        return self.resp in OVER

    @property
    def response_started(self) -> bool:
        return self.resp is STREAMING

    # -- the two hook points ------------------------------------------------------------------

    def head_to_origin(self, conn: UpstreamConnection) -> hdrs.Headers:
        """The request head's fields as the origin gets them: the one place they are made."""
        head = self.head
        client = self.client
        out = hdrs.to_origin(
            head.headers,
            client_ip=client.client_ip,
            scheme=client.scheme,
            trusted_peer=client.trusted_peer,
            # HTTP/1.0 without Host (the catch-all route only): the origin's own name
            host=self.authority or str(conn.origin).split("://", 1)[1].encode(),
            request_id=self.request_id,
            websocket=self.websocket,
        )
        if self.trace is not None:  # the origin's traceparent, and the time it was connected
            observe.upstream_connected(self, out)
        rules = self.route.headers if self.route is not None else None
        if rules is not None:  # [routes.headers]: after the proxy's own, so they can see them
            rules.to_origin(out, client.client_ip, self)
        return out

    def head_to_client(self, headers: Headers, websocket: bool = False) -> Headers:
        """A response head's fields as the client gets them: the one place they are made."""
        out = hdrs.to_client(headers, websocket=websocket)
        if self.trace is not None:
            observe.response_head(self)
        rules = self.route.headers if self.route is not None else None
        if rules is not None:
            rules.to_client(out, self.client.client_ip, self)
        return out

    # -- start: route, connect ---------------------------------------------------------------

    def start(self) -> None:
        """Route, then attach an idle pooled connection at once when there is one (the hot
        path: no task, no loop turn); otherwise connect in a task."""
        route = self._route()
        if route is None:
            return
        limits = self.proxy.limits
        if limits is not None and self._limited(limits):
            return
        if self.websocket:
            # an invalid client handshake is answered here: no origin ever sees it as one
            try:
                ws.check_request(self.head.headers, self.head.method, self.head.http_version)
            except ws.HandshakeError as e:
                self.respond_error(e.status, e.reason, e.headers)
                return
        if self.head.has_body:
            # a body already known bad (it came in the same read as the head) is answered
            # here: the origin is never contacted, as with nginx and HAProxy
            try:
                self.client.check_request_body()
            except http1.ProtocolError as e:
                self.respond_error(e.status, e.reason)
                return
        origin = route.pick((), self.proxy.active)
        if self.websocket and origin is not None:
            refused = session_refusal(route, origin)  # max_session_rate: 503 + Retry-After
            if refused is not None:
                self.respond_error(*refused)
                return
        if origin is not None and not self.websocket and route.send_proxy is None:
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

    def _declared_length(self) -> int:
        for n, v in self.head.headers:
            if n == b"content-length":
                with contextlib.suppress(ValueError):
                    return int(v)
        return 0

    def _limited(self, limits: ClientLimits) -> bool:
        """``rate_per_ip`` (and ``websocket_rate_per_ip`` for a handshake) of the client's
        address: over it, 429 with the seconds until a token is back (nginx's limit_req
        answers 503 by default; 429 is what its users set ``limit_req_status`` to). Behind
        a trusted proxy, the address is the client it names in X-Forwarded-For."""
        client = self.client
        key = client.client_ip
        if client.trusted_peer:
            key = forwarded_client(self.head.headers, self.proxy.settings.trusted_proxies) or key
        wait = limits.request(key, self.websocket)
        if not wait:
            return False
        kind = "WebSocket handshakes" if limits.last_kind == "websocket" else "requests"
        after = ((b"retry-after", str(retry_after(wait)).encode()),)
        self.respond_error(429, f"too many {kind} from this address", after)
        return True

    # -- to the origin: connect or retry, attach, an upstream failure ---------------------------
    # (proxy.exchange_connect; functions bound here as methods: a call costs what it did)

    _connect = connect._connect
    _attach = connect._attach
    _preamble = connect._preamble
    _upstream_failed = connect._upstream_failed
    _may_retry = connect._may_retry
    _retry = connect._retry
    _fail_upstream = connect._fail_upstream
    _log_upstream_error = connect._log_upstream_error

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
        self.req = self.req.after("end")
        if self.conn is not None and self.conn.alive:
            self.conn.write(self.upstream.end())
            self._arm(self.proxy.settings.upstream_response_timeout, self._response_timeout)

    def abort_request(self, status: int, reason: str) -> None:
        if self.conn is not None:
            self._release(False)
        self.respond_error(status, reason)

    # -- upstream handler: origin -> client (proxy.exchange_relay, bound the same way) ------

    data_received = relay.data_received
    _respond_whole = relay._respond_whole
    _final_head = relay._final_head
    _body_out = relay._body_out
    eof_received = relay.eof_received
    connection_lost = relay.connection_lost
    _pump_response = relay._pump_response
    _response_timeout = relay._response_timeout
    _finish = relay._finish

    # -- flow control: each side's buffer pauses the other's reading --------------------------

    def pause_writing(self) -> None:
        self.client.pause_reading()

    def resume_writing(self) -> None:
        self.client.resume_reading()

    def pause_origin(self) -> None:
        if self.conn is not None:
            self.conn.pause_reading()

    def resume_origin(self) -> None:
        if self.conn is not None:
            self.conn.resume_reading()

    # -- endings -----------------------------------------------------------------------------

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
            self.resp = self.resp.after("gone")
            self._release(False)
            self._record(499)

    def respond_error(
        self, status: int, reason: str, extra: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        """End the exchange with the proxy's own answer; the access line records what the
        client got: this status and body, or, when a response had already started, that
        response's status, cut short by a reset (a truncated body must look truncated)."""
        if self.finished:
            return
        started = self.response_started
        self.resp = self.resp.after("abort" if started else "answer")
        task = self._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()  # still connecting: the origin must not get this request
        self._release(False)
        if started:
            self.client.abort()
            self._record(self.status)
            return
        self.status = status
        self.received = self.client.answer_error(status, reason, extra, self.request_id)
        self._record(status)

    def _record(self, status: int) -> None:
        """The count and the access line, through the one function refusals use too."""
        observe.request_finished(self, status)

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._timer.arm(seconds, callback)

    def _disarm(self) -> None:
        self._timer.disarm()

    # -- WebSocket: the origin's 101 hands both connections to a Tunnel -----------------------

    def _switch(self, event: http1.ResponseHead) -> None:
        """The origin accepted the upgrade: the client side answers (HTTP/1.1 relays the
        101; an RFC 8441 stream answers 200), then a :class:`proxy.tunnel.Tunnel`, which
        keeps only what relaying needs, takes over."""
        self._timer.stop()  # the tunnel arms its own idle timer, if any
        self.status = 101
        self.resp = self.resp.after("switch")
        assert self.conn is not None
        self.egress_ip = self.conn.egress_ip  # the access line names it, as for any response
        # the origin's own head, reason phrase included; only the hop-by-hop pair is this hop's
        pipe, from_client = self.client.upgrade(
            self.head_to_client(event.headers, websocket=True), event.reason
        )
        self._record(101)
        conn, self.conn = self.conn, None
        assert conn is not None and self.origin is not None
        from_origin = self.upstream.trailing_data()  # frames that came with the 101
        tunnel = Tunnel(pipe, conn, self.origin, (self.host, self.path, self.request_id))
        tunnel.trace = self.trace
        tunnel.route = self.route.name if self.route is not None else ""
        tunnel.start(from_origin, from_client)
