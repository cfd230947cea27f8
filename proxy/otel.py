"""The optional OpenTelemetry exporter: one span per request and per WebSocket session.

Imported only when ``[tracing] exporter = "otlp"`` (:func:`proxy.observe.build_tracer`), so
the ``otel`` extra (``pip install 'originpool[otel]'``: opentelemetry-sdk and the OTLP/HTTP
exporter) is needed only then, and a proxy without it pays nothing for its existence.

The proxy already chose the ids: the span id it sent to the origin as the traceparent's
parent id must be the exported span's own, or the origin's span would hang off a span no
collector ever sees. The SDK draws ids from its ``IdGenerator``; :class:`_Chosen` hands it
the ones the request carries, set just before each span is made (one event loop, one
thread: nothing runs between the two). The caller's span, when the trace was kept, is the
parent (a remote span context). A span is made once the request is over, with its real
start time, in one call: nothing is held per request in flight.

Attributes: the OpenTelemetry HTTP semantic conventions where one fits
(``http.request.method``, ``http.route``, ``http.response.status_code``, ``url.path``,
``server.address``, ``client.address``), ``originpool.*`` for the rest (origin, egress IP,
bytes each way, request id, a session's ``closed_by`` and close code).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace as api
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from proxy.tracecontext import Trace


class _Chosen(IdGenerator):
    """The ids of the span about to be made (see the module docstring)."""

    def __init__(self) -> None:
        self.trace_id = 0
        self.span_id = 0

    def generate_trace_id(self) -> int:
        return self.trace_id

    def generate_span_id(self) -> int:
        return self.span_id


def _attributes(fields: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, name in names.items():
        value = fields.get(key)
        if value is None:
            continue
        out[name] = list(value) if isinstance(value, list | tuple) else value
    return out


_REQUEST = {
    "method": "http.request.method",
    "status": "http.response.status_code",
    "path": "url.path",
    "host": "server.address",
    "client": "client.address",
    "origin": "originpool.origin",
    "egress": "originpool.egress_ip",
    "bytes": "originpool.bytes_to_client",
    "bytes_in": "originpool.bytes_to_origin",
    "request_id": "originpool.request_id",
}
# proxy.observe's hooks' times, as span events: the origin connection attached (time to
# connect, or to check out a pooled one), the first response head (time to first byte)
_EVENTS = ("upstream_connected", "response_head")
_SESSION = {
    "host": "server.address",
    "path": "url.path",
    "origin": "originpool.origin",
    "egress": "originpool.egress_ip",
    "bytes_to_client": "originpool.bytes_to_client",
    "bytes_to_origin": "originpool.bytes_to_origin",
    "closed_by": "originpool.closed_by",
    "close_code": "originpool.close_code",
    "request_id": "originpool.request_id",
}


class OtelExporter:
    """A :class:`proxy.observe.SpanSink` on the OpenTelemetry SDK."""

    def __init__(self, processor: SpanProcessor, service_name: str, key: object = None) -> None:
        self.key = key  # the settings it was built for: a reload that keeps them keeps it
        self._ids = _Chosen()
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}),
            id_generator=self._ids,
            sampler=ALWAYS_ON,  # the proxy sampled already: only sampled traces come here
            shutdown_on_exit=False,  # the worker flushes in its drain (proxy.worker)
        )
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("originpool")

    @classmethod
    def otlp(cls, endpoint: str, service_name: str) -> OtelExporter:
        """OTLP over HTTP to ``endpoint``, batched on the SDK's own thread."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter: SpanExporter = OTLPSpanExporter(endpoint=endpoint)
        return cls(BatchSpanProcessor(exporter), service_name, ("otlp", endpoint, service_name))

    def request(self, trace: Trace, route: str, fields: dict[str, Any], seconds: float) -> None:
        method = str(fields.get("method") or "")
        attributes = _attributes(fields, _REQUEST)
        attributes["http.route"] = route
        status = int(fields.get("status") or 0)
        events = [(name, fields.get(f"{name}_s")) for name in _EVENTS]
        self._span(f"{method} {route}", trace, attributes, seconds, status >= 500, events)

    def session(self, trace: Trace, route: str, fields: dict[str, Any], seconds: float) -> None:
        attributes = _attributes(fields, _SESSION)
        attributes["http.route"] = route
        failed = fields.get("closed_by") == "origin" and fields.get("close_code") == 1011
        self._span(f"websocket {route}", trace, attributes, seconds, failed)

    def _span(
        self,
        name: str,
        trace: Trace,
        attributes: dict[str, Any],
        seconds: float,
        error: bool,
        events: Sequence[tuple[str, Any]] = (),
    ) -> None:
        end = time.time_ns()
        start = end - int(seconds * 1e9)
        context = None
        if trace.parent_id is not None:
            parent = api.SpanContext(
                int(trace.trace_id, 16),
                int(trace.parent_id, 16),
                is_remote=True,
                trace_flags=api.TraceFlags(trace.flags),
            )
            context = api.set_span_in_context(api.NonRecordingSpan(parent))
        self._ids.trace_id = int(trace.trace_id, 16)
        self._ids.span_id = int(trace.span_id, 16)
        span = self.tracer.start_span(
            name,
            context=context,
            kind=api.SpanKind.SERVER,
            attributes=attributes,
            start_time=start,
        )
        for event, offset in events:
            if offset is not None:  # seconds after the start: the hooks' times
                span.add_event(event, timestamp=start + int(offset * 1e9))
        if error:
            span.set_status(api.Status(api.StatusCode.ERROR))
        span.end(end_time=end)

    def shutdown(self) -> None:
        self.provider.shutdown()
