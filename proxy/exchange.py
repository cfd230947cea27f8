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
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ssl
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import structlog

from pool.egress import EgressExhausted
from pool.origin import Origin, PoolError, UpstreamConnection
from proxy import headers as hdrs
from proxy import health, http1, observe, request_id
from proxy import websocket as ws
from proxy.exchange_state import BODY, CONNECTING, OVER, RESENDING, SENT, STREAMING, WAITING
from proxy.limits import ClientLimits, forwarded_client, retry_after
from proxy.proxy_accept import preamble
from proxy.routing import Route, session_refusal
from proxy.target import resolve
from proxy.tunnel import Tunnel
from proxy.upstream_errors import (
    UPSTREAM_REASONS,
    classify,
    errno_name,
    error_fields,
    may_retry,
)

if TYPE_CHECKING:
    from proxy.stream import ClientStream, Headers

log = structlog.get_logger("originpool.proxy")


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
                pre = self._preamble()
                conn = await (
                    pool.lease(origin, pre) if self.websocket else pool.acquire(origin, pre)
                )
            except (OSError, ssl.SSLError) as e:
                last = e
                self.origin = origin  # the access line names the origin the log line names
                self._log_upstream_error(origin, e, None)
                if not isinstance(e, PoolError | EgressExhausted):  # the origin's failure
                    health.report(origin, False, f"connect {errno_name(e)}: {e}")
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
                self.client.deliver()
            return
        # nothing tried: every origin of the route is down or draining (503 at once)
        self._fail_upstream(classify(last) if last else 503)

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
        headers = self.head_to_origin(conn)
        if head.has_body and not any(n == b"content-length" for n, _ in head.headers):
            headers.append((b"transfer-encoding", b"chunked"))  # re-framed for this hop
        rules = self.route.headers if self.route is not None else None
        path = self.path if rules is None else rules.target(self.path)  # strip_prefix
        target = path.encode("latin-1")
        try:
            conn.write(self.upstream.request_head(head.method, target, headers))
        except Exception as e:  # h11 refusing what the downstream parser accepted
            log.info(
                "request_not_forwarded",
                error=str(e),
                request_id=self.request_id.decode(),
                **observe.trace_fields(self.trace),
            )
            self.respond_error(400, "the request cannot be forwarded")
            return
        if resend:
            conn.write(self.upstream.end())  # bodiless: the whole request again
            self.req = self.req.after("attach")
            self._arm(self.proxy.settings.upstream_response_timeout, self._response_timeout)
            return
        if head.expect_continue:
            self.client.send_informational(100)
        self.req = self.req.after("attach")
        if head.has_body:
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
        self.req = self.req.after("end")
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
        self._disarm()
        try:
            self.client.send_whole(
                event.status, self.head_to_client(event.headers), event.reason, body
            )
        except Exception as e:  # the client codec refusing the origin's head
            self._upstream_failed(http1.ProtocolError(502, f"bad response head: {e}"))
            return
        self.status = event.status
        if body:
            self.received += len(body)
            self.proxy.stats.bytes_out += len(body)
        self.resp = self.resp.after("whole")
        self._finish()

    def _final_head(self, event: http1.ResponseHead) -> None:
        """Send the client's head for the origin's final response; ProtocolError(502) when
        the client codec refuses it."""
        self._disarm()
        try:
            self.client.send_head(event.status, self.head_to_client(event.headers), event.reason)
        except Exception as e:
            raise http1.ProtocolError(502, f"bad response head: {e}") from e
        self.status = event.status
        self.resp = self.resp.after("head")

    def _body_out(self, data: bytes) -> None:
        """A piece of the response body, counted and sent to the client."""
        self.received += len(data)
        self.proxy.stats.bytes_out += len(data)
        self.client.send_body(data)

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
        if self.conn is not None:
            self.conn.pause_reading()

    def resume_origin(self) -> None:
        if self.conn is not None:
            self.conn.resume_reading()

    def _pump_response(self) -> None:
        # the client side holds its writes to the end of the loop turn (pool.turnwrite): head
        # and body of a small response still go in one send
        while not self.finished:
            try:
                event = self.upstream.next_event()
            except http1.ProtocolError as e:
                self._upstream_failed(e)
                return
            if event is http1.NEED_DATA:
                return
            if isinstance(event, http1.ResponseHead):
                if event.informational:
                    if event.status == 101 and self.websocket:
                        try:  # believed only as a valid answer: else no tunnel, a 502
                            ws.check_response(self.head.headers, event.headers)
                        except ws.HandshakeError as e:
                            self._upstream_failed(e)
                            return
                        self._switch(event)
                        return
                    if event.status == 100:
                        continue  # we sent our own 100 Continue, if it was asked for
                    self.client.send_informational(
                        event.status, self.head_to_client(event.headers), event.reason
                    )
                    continue
                try:
                    self._final_head(event)
                except http1.ProtocolError as e:
                    self._upstream_failed(e)
                    return
            elif isinstance(event, http1.Body):
                self._body_out(event.data)
            elif isinstance(event, http1.End):
                self.client.send_end()
                self.resp = self.resp.after("end")
                self._finish()
                return
            elif event is http1.CLOSED:
                self._upstream_failed(ConnectionResetError(errno.ECONNRESET, "origin closed"))
                return
            else:
                return  # PAUSED / SWITCHED: handled by the WebSocket path

    def _response_timeout(self) -> None:
        self._upstream_failed(TimeoutError(errno.ETIMEDOUT, "origin sent no response head in time"))

    def _upstream_failed(self, exc: BaseException) -> None:
        if self.finished:
            return
        lost = self.conn.lost if self.conn is not None else None
        if lost is not None:
            exc = lost  # the pool aborted it: its egress IP left the host, the origin did not
        if self._may_retry(exc):
            # see _may_retry: a fresh connection (from an egress IP still on the host) gets
            # the request again, once
            log.info(
                "upstream_retry",
                request_id=self.request_id.decode("ascii"),
                origin=str(self.origin) if self.origin else None,
                egress=self.conn.egress_ip if self.conn is not None else None,
                errno=errno_name(exc),
                error=str(exc),
                **observe.trace_fields(self.trace),
            )
            self._retried = True
            self._release(False)
            self.upstream = self.proxy.client_codec()
            self.req = self.req.after("retry")
            self._task = asyncio.get_running_loop().create_task(self._retry())
            return
        self._log_upstream_error(self.origin, exc, self.conn)
        self._release(False)
        if self.response_started:
            self.resp = self.resp.after("abort")
            self.client.abort()  # a truncated body must look truncated, not complete
            self._record(self.status or 502)
            self.client.exchange_done(False)
            return
        self._fail_upstream(exc.status if isinstance(exc, http1.ProtocolError) else classify(exc))

    def _may_retry(self, exc: BaseException) -> bool:
        """See :func:`proxy.upstream_errors.may_retry`."""
        started = self._retried or self.response_started or bool(self.received or self.sent)
        pending_body = self.head.has_body and not self.request_done
        return may_retry(
            exc,
            started=started,
            reused=self.reused,
            method=self.head.method,
            pending_body=pending_body,
        )

    async def _retry(self) -> None:
        assert self.origin is not None
        pool = self.proxy.pool
        try:
            pre = self._preamble()
            origin = self.origin
            conn = await (pool.lease(origin, pre) if self.websocket else pool.acquire(origin, pre))
        except (OSError, ssl.SSLError) as e:
            self._log_upstream_error(self.origin, e, None)
            self._fail_upstream(classify(e))
            return
        if self.client.closed or self.finished:
            conn.pool.release(conn, reusable=True)
            return
        if self.request_done:
            self._attach(conn, resend=True)  # the whole request again: head and end
            return
        self._attach(conn)  # the head; the body follows from the client's parser
        if self.ready:
            self.client.deliver()

    def _finish(self) -> None:
        """The response went out whole (the state is already COMPLETE)."""
        self._disarm()
        reusable = self.upstream.reusable
        self._release(reusable)
        if self.origin is not None:  # passive ejection counts 5xx (proxy.health)
            health.report(self.origin, self.status < 500, self.status)
        self._record(self.status)
        self.client.exchange_done(True)

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

    # -- endings -----------------------------------------------------------------------------

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

    def _preamble(self) -> bytes:
        """``send_proxy_protocol``: the PROXY header this route's origins get first, b"" for
        none (a connection that carries one is never reused: :meth:`OriginPool.acquire`)."""
        route = self.route
        if route is None or route.send_proxy is None:
            return b""
        c = self.client
        return preamble(route.send_proxy, c.peer, c.local_address(), None)

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

    def _fail_upstream(self, status: int) -> None:
        """The client's answer to an upstream failure: the status, a generic reason and the
        request id; the detail (errno, addresses) is in the upstream_error line only."""
        extra = [(b"retry-after", b"1")] if status == 503 else []
        self.respond_error(status, UPSTREAM_REASONS.get(status, "upstream failure"), extra)

    def _record(self, status: int) -> None:
        """The count and the access line, through the one function refusals use too."""
        observe.request_finished(self, status)

    def _log_upstream_error(
        self, origin: Origin | None, exc: BaseException, conn: UpstreamConnection | None
    ) -> None:
        fields: dict[str, Any] = {
            "request_id": self.request_id.decode("ascii"),
            "route": self.route.name if self.route else None,
            **error_fields(exc, origin, conn),
        }
        if "egress" in fields:
            self.egress_ip = fields["egress"]  # the access line names the same egress
        observe.upstream_error(self, fields)

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
