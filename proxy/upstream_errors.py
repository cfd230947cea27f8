"""What an upstream failure means: the client's status, whether the request may go again,
and the fields of its ``upstream_error`` line.

Why apart from :mod:`proxy.exchange`: these are rules (RFC 9110's idempotent methods,
nginx's proxy_next_upstream, what a client may be told), not the exchange's progress; kept
as plain functions they are read and tested on their own, and the exchange stays about one
request's way through.
"""

from __future__ import annotations

import errno
from typing import Any

from pool.errors import ConnectError, EgressExhausted, EgressLost, format_address
from pool.origin import Origin, PoolError, UpstreamConnection

# what a client is told of an upstream failure: no errno, no address (the detail goes to
# the upstream_error line, which carries the same request id)
UPSTREAM_REASONS = {
    502: "the origin could not be reached or sent an invalid response",
    503: "no capacity to reach the origin right now; retry shortly",
    504: "the origin did not answer in time",
}

# methods a retry cannot make worse (RFC 9110 9.2.2)
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))


def classify(exc: BaseException) -> int:
    """The status a client gets for an upstream failure before any response byte."""
    if isinstance(exc, EgressExhausted | PoolError):
        return 503  # no capacity: ports exhausted or the origin's connection limit
    if isinstance(exc, TimeoutError) or getattr(exc, "errno", None) == errno.ETIMEDOUT:
        return 504
    return 502


def errno_name(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return errno.errorcode.get(code, str(code))
    return type(exc).__name__


def may_retry(
    exc: BaseException,
    *,
    started: bool,
    reused: bool,
    method: bytes,
    pending_body: bool,
) -> bool:
    """Once, before any response byte, when the connection failed rather than the origin
    answering, and the request can go again without harm (nginx's proxy_next_upstream
    error and its non_idempotent rule; HAProxy's retry-on conn-failure/empty-response).

    ``started``: a retry was made already, or a response or body byte has moved (then never).
    The failure: the connection reset or closed on a ``reused`` keep-alive connection (the
    origin may have closed it as we wrote), or the pool aborted the connection because its
    egress IP left the host (fresh or reused: the reply could never arrive). A response
    timeout is not retried: the origin may still be working on it.

    Harmless: no body byte has gone to the origin yet (the body still waits in the client's
    parser, so it can be sent again), and either the method is idempotent (RFC 9110 9.2.2:
    GET, HEAD, OPTIONS, TRACE, PUT, DELETE) or the request is not yet complete at the origin
    (``pending_body``: a body it has not started on), so it cannot have acted. A POST
    without a body, or any request whose body has partly gone, is not retried.
    """
    if started or not isinstance(exc, ConnectionError):
        return False
    if not (reused or isinstance(exc, EgressLost)):
        return False
    return method in IDEMPOTENT or pending_body


def error_fields(
    exc: BaseException, origin: Origin | None, conn: UpstreamConnection | None
) -> dict[str, Any]:
    """The ``upstream_error`` line's facts of the failure: errno, and where it happened
    (the egress IPs tried, the 4-tuple, or the stage and 4-tuple a failed connect names)."""
    fields: dict[str, Any] = {
        "origin": str(origin) if origin else None,
        "errno": errno_name(exc),
        "error": str(exc),
    }
    if isinstance(exc, EgressExhausted):
        fields["destination"] = f"{exc.destination[0]}:{exc.destination[1]}"
        fields["egress"] = [ip or "default" for ip, _ in exc.attempts]
    elif conn is not None:
        dst = conn.slot.destination
        fields["egress"] = conn.egress_ip
        fields["four_tuple"] = f"{conn.local[0]}:{conn.local[1]}->{dst[0]}:{dst[1]}"
    elif isinstance(exc, ConnectError):
        fields["stage"] = exc.stage
        fields["destination"] = format_address(exc.remote)
        if exc.local is not None:
            fields["egress"] = str(exc.local[0]) or "default"
            fields["four_tuple"] = exc.four_tuple
    return fields
