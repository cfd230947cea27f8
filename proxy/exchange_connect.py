"""The way of an :class:`proxy.exchange.Exchange` to the origin: connect (or wait for the
pool), retry on the route's other origins, attach the connection and write the request head,
and what an upstream failure becomes: the request once more on a fresh connection (see
:func:`proxy.upstream_errors.may_retry`), a cut response, or the proxy's own answer.

Written apart so that ``proxy/exchange.py`` holds one job, the request's own course; each
function here is bound in :class:`~proxy.exchange.Exchange`'s body as a plain method
(``_attach = connect._attach``), so a call costs what it did as a method defined there: no
wrapper, no added frame on the per-request path (``_attach`` runs for every request).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Any

import structlog

from pool.egress import EgressExhausted
from pool.origin import Origin, PoolError, UpstreamConnection
from proxy import health, http1, observe
from proxy.proxy_accept import preamble
from proxy.upstream_errors import UPSTREAM_REASONS, classify, errno_name, error_fields, may_retry

if TYPE_CHECKING:
    from proxy.exchange import Exchange

log = structlog.get_logger("originpool.proxy")


async def _connect(self: Exchange, origin: Origin | None) -> None:
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
            conn = await (pool.lease(origin, pre) if self.websocket else pool.acquire(origin, pre))
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


def _attach(self: Exchange, conn: UpstreamConnection, resend: bool = False) -> None:
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


def _upstream_failed(self: Exchange, exc: BaseException) -> None:
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


def _may_retry(self: Exchange, exc: BaseException) -> bool:
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


async def _retry(self: Exchange) -> None:
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


def _preamble(self: Exchange) -> bytes:
    """``send_proxy_protocol``: the PROXY header this route's origins get first, b"" for
    none (a connection that carries one is never reused: :meth:`OriginPool.acquire`)."""
    route = self.route
    if route is None or route.send_proxy is None:
        return b""
    c = self.client
    return preamble(route.send_proxy, c.peer, c.local_address(), None)


def _fail_upstream(self: Exchange, status: int) -> None:
    """The client's answer to an upstream failure: the status, a generic reason and the
    request id; the detail (errno, addresses) is in the upstream_error line only."""
    extra = [(b"retry-after", b"1")] if status == 503 else []
    self.respond_error(status, UPSTREAM_REASONS.get(status, "upstream failure"), extra)


def _log_upstream_error(
    self: Exchange, origin: Origin | None, exc: BaseException, conn: UpstreamConnection | None
) -> None:
    fields: dict[str, Any] = {
        "request_id": self.request_id.decode("ascii"),
        "route": self.route.name if self.route else None,
        **error_fields(exc, origin, conn),
    }
    if "egress" in fields:
        self.egress_ip = fields["egress"]  # the access line names the same egress
    observe.upstream_error(self, fields)
