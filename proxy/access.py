"""Every response the proxy sends is counted and logged here, once, in one shape.

nginx's access log has a line for every response, its own 400s, 408s and 414s included, and
an operator counts refusals from it; so does ``originpool_requests_total``. Requests refused
before an :class:`~proxy.exchange.Exchange` existed (a head too large, a malformed one, a
header timeout) used to leave only a ``client_error`` line. Both paths now end in
:func:`response`, so the count and the line cannot drift apart: the exchange's own end
(:meth:`Exchange._record`) and the connection's refusal (:meth:`Downstream.fail`).
"""

from __future__ import annotations

from typing import Any, Protocol

from proxy import logs

NONE = "-"  # what a refusal's line holds where nothing was parsed (nginx's "-")


class Counts(Protocol):
    """What counts a response: :class:`proxy.server.Stats` (not imported: server imports
    the exchange, which imports this)."""

    def observe(self, route: str, status: int, seconds: float) -> None: ...


def response(
    stats: Counts,
    route: str,
    seconds: float,
    *,
    method: str,
    host: str,
    path: str,
    status: int,
    body_bytes: int,
    bytes_in: int,
    origin: str | None,
    egress: str | list[str] | None,
    client: str,
    request_id: str,
    http_version: str = "1.1",
    trace_id: str | None = None,
) -> None:
    """Count one response (``originpool_requests_total{route,status}`` and the latency
    histogram) and write its ``access`` line. ``body_bytes``: body bytes the client got,
    an error answer's included; ``bytes_in``: request body bytes relayed to the origin."""
    stats.observe(route, status, seconds)
    fields: dict[str, Any] = {
        "method": method,
        "host": host,
        "path": path,
        "status": status,
        "bytes": body_bytes,
        "bytes_in": bytes_in,
        "duration_ms": round(seconds * 1000, 3),
        "origin": origin,
        "egress": egress,
        "client": client,
        "request_id": request_id,
        "http_version": http_version,  # "1.0", "1.1" or "2": the client's protocol
    }
    if trace_id is not None:  # [tracing] enabled: the W3C trace id (proxy.observe)
        fields["trace_id"] = trace_id
    logs.access(fields)


def refusal(
    stats: Counts,
    seconds: float,
    *,
    status: int,
    body_bytes: int,
    client: str,
    request_id: str,
    http_version: str,
) -> None:
    """:func:`response` for a request no exchange held (HTTP/1.1's connection and an HTTP/2
    stream both refuse heads they do not serve): nothing was parsed of it, so method, host,
    path and route are "-", as in nginx's line for its own 400."""
    response(
        stats,
        NONE,
        seconds,
        method=NONE,
        host=NONE,
        path=NONE,
        status=status,
        body_bytes=body_bytes,
        bytes_in=0,
        origin=None,
        egress=None,
        client=client,
        request_id=request_id,
        http_version=http_version,
    )


def record(stats: Counts, route: str, seconds: float, fields: dict[str, Any]) -> None:
    """:func:`response` with the line's fields already made, in its keys and order: the
    exchange's, by :func:`proxy.observe.request_finished`, once per proxied request (a
    call with a dozen keyword arguments costs more than the dict it fills)."""
    stats.observe(route, fields["status"], seconds)
    logs.access(fields)
