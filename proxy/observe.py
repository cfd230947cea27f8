"""Observation of requests and WebSocket sessions, behind lifecycle hooks in one place.

The exchange and the tunnel say what happened (a request started, it finished with this
status, the upstream failed with this errno, a session started and ended); what is made of
it is decided here: the counters (``originpool_requests_total``, the latency histogram, the
WebSocket gauges), the ``access``, ``upstream_error`` and ``websocket_session`` lines, and,
with ``[tracing] enabled``, the trace id in each of those lines and one span per request and
per session for the optional OpenTelemetry exporter (:mod:`proxy.otel`).

The hooks with a cost only for tracing (:meth:`Tracer.request_started`) are reached through
``Proxy.tracer``, None when tracing is off: the data path then pays one ``is None`` per
request, and its lines and counters are what they were before this module existed
(``bench/proxy_cycle.py`` measures it; README "Traces").
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from proxy import access, logs
from proxy.tracecontext import Trace, begin, inject

if TYPE_CHECKING:
    from proxy.config_model import TracingSettings
    from proxy.exchange import Exchange
    from proxy.headers import Headers
    from proxy.tunnel import Tunnel

log = structlog.get_logger("originpool.proxy")


class SpanSink(Protocol):
    """Where finished spans go: :class:`proxy.otel.OtelExporter`, or a test's recorder.
    ``fields`` are the access line's (or the session line's); ``seconds`` its duration."""

    def request(self, trace: Trace, route: str, fields: dict[str, Any], seconds: float) -> None: ...

    def session(self, trace: Trace, route: str, fields: dict[str, Any], seconds: float) -> None: ...

    def shutdown(self) -> None: ...


class Tracer:
    """``[tracing]`` in a worker: starts each request's trace, exports sampled spans."""

    __slots__ = ("sample_ratio", "sink")

    def __init__(self, sample_ratio: float = 1.0, sink: SpanSink | None = None) -> None:
        self.sample_ratio = sample_ratio
        self.sink = sink

    def request_started(self, headers: Sequence[tuple[bytes, bytes]], trusted: bool) -> Trace:
        """The request's trace (:func:`proxy.tracecontext.begin`): the hook that starts it."""
        return begin(headers, trusted, self.sample_ratio)


def build_tracer(settings: TracingSettings, old: Tracer | None = None) -> Tracer | None:
    """The worker's tracer for ``[tracing]``, None when off. A reload that keeps the
    exporter's settings keeps its exporter (and the spans it holds); one that changes them
    shuts the old one down. Called in the worker, after the fork: the exporter's thread is
    the worker's own."""
    key = (settings.exporter, settings.endpoint, settings.service_name)
    sink = old.sink if old is not None else None
    if sink is not None and (not settings.enabled or getattr(sink, "key", None) != key):
        sink.shutdown()
        sink = None
    if not settings.enabled:
        return None
    if sink is None and settings.exporter == "otlp":
        from proxy.otel import OtelExporter  # the [otel] extra: imported only when asked for

        sink = OtelExporter.otlp(settings.endpoint, settings.service_name)
    return Tracer(settings.sample_ratio, sink)


# -- requests -------------------------------------------------------------------------------
# upstream_connected and response_head are called only for a traced request (the exchange
# checks ``trace is not None`` inline): they cost nothing with tracing off.


def upstream_connected(ex: Exchange, headers: Headers) -> None:
    """The request's head is going to an origin connection: its traceparent (the proxy's
    span as the origin's parent) in ``headers``, and the time, for the span's event."""
    trace = ex.trace
    assert trace is not None
    inject(headers, trace)
    if not trace.connected:  # a retry's second connection: the first attach counts
        trace.connected = time.monotonic()


def response_head(ex: Exchange) -> None:
    """A response head from the origin (the first one, 1xx included: time to first byte)."""
    trace = ex.trace
    if trace is not None and not trace.head:
        trace.head = time.monotonic()


def request_finished(ex: Exchange, status: int) -> None:
    """The exchange is over with ``status`` as the client got it: counted, its access line
    written (through :func:`proxy.access.response`, as the connection's own refusals are),
    and, when traced and sampled, its span exported."""
    route = ex.route.name if ex.route else access.NONE
    seconds = time.monotonic() - ex.started
    # access.response's keys, in its order (tests/test_trace.py holds the two together)
    fields: dict[str, Any] = {
        "method": ex.head.method.decode("latin-1"),
        "host": ex.host or access.NONE,  # no host decided (a target refused): "-"
        "path": ex.path,
        "status": status,
        "bytes": ex.received,
        "bytes_in": ex.sent,
        "duration_ms": round(seconds * 1000, 3),
        "origin": str(ex.origin) if ex.origin else None,
        "egress": ex.egress_ip,
        "client": ex.client.peer[0],
        "request_id": ex.request_id.decode("ascii"),
        "http_version": ex.client.http_version,
    }
    trace = ex.trace
    if trace is None:
        access.record(ex.proxy.stats, route, seconds, fields)
        return
    fields["trace_id"] = trace.trace_id.decode("ascii")
    access.record(ex.proxy.stats, route, seconds, fields)
    if trace.sampled:
        tracer = ex.proxy.tracer
        if tracer is not None and tracer.sink is not None:
            # after the line is written: seconds from the request's start, for span events
            if trace.connected:
                fields["upstream_connected_s"] = trace.connected - ex.started
            if trace.head:
                fields["response_head_s"] = trace.head - ex.started
            tracer.sink.request(trace, route, fields, seconds)


def upstream_error(ex: Exchange, fields: dict[str, Any]) -> None:
    """An origin could not be reached or failed mid-response: the ``upstream_error`` line,
    with the errno and 4-tuple the client is never shown."""
    if ex.trace is not None:
        fields["trace_id"] = ex.trace.trace_id.decode("ascii")
    log.warning("upstream_error", **fields)


def trace_fields(trace: Trace | None) -> dict[str, str]:
    """``{"trace_id": ...}`` for a log line of a traced request, else nothing."""
    return {} if trace is None else {"trace_id": trace.trace_id.decode("ascii")}


# -- WebSocket sessions ---------------------------------------------------------------------


def session_started(tunnel: Tunnel) -> None:
    proxy = tunnel.client.proxy
    proxy.stats.ws_active += 1
    proxy.stats.ws_total += 1
    proxy.sessions.add(tunnel)


def session_ended(tunnel: Tunnel, fields: dict[str, Any], seconds: float) -> None:
    """The session's ``websocket_session`` line and gauges; its span when traced."""
    proxy = tunnel.client.proxy
    proxy.stats.ws_active -= 1
    proxy.sessions.discard(tunnel)
    trace = tunnel.trace
    if trace is not None:
        fields["trace_id"] = trace.trace_id.decode("ascii")
    logs.access(fields, "websocket_session")
    if trace is not None and trace.sampled:
        tracer = proxy.tracer
        if tracer is not None and tracer.sink is not None:
            tracer.sink.session(trace, tunnel.route, fields, seconds)
