"""The optional OpenTelemetry exporter (proxy.otel): one span per request and per WebSocket
session, caught by the SDK's in-memory exporter, the proxy's own span id the one the origin
got as its parent; and ``build_tracer``'s choices (off: no tracer at all)."""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from proxy import tracecontext as tc
from proxy.config_model import TracingSettings
from proxy.observe import Tracer, build_tracer
from proxy.otel import OtelExporter
from proxy.testing import (
    RecordingStream,
    end_of_turn,
    memory_proxy,
    request_head,
    transport_of,
)
from tests.test_seam import ACCEPT, UPGRADE, start

VALID = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
RESPONSE = b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy"


def traced_proxy() -> tuple[object, object, InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    proxy, pool, _origin = memory_proxy()
    proxy.tracer = Tracer(1.0, OtelExporter(SimpleSpanProcessor(memory), "edge-test"))
    return proxy, pool, memory


def origin_traceparent(sent: bytes) -> tc.Parent:
    for line in sent.split(b"\r\n"):
        if line.lower().startswith(b"traceparent:"):
            parsed = tc.parse(line.split(b":", 1)[1].strip())
            assert parsed is not None
            return parsed
    raise AssertionError(f"no traceparent in {sent!r}")


async def test_a_request_is_one_server_span_whose_id_the_origin_got_as_parent():
    proxy, pool, memory = traced_proxy()
    stream = RecordingStream(proxy, ("127.0.0.1", 50000))
    stream.trusted_peer = True  # the caller's trace is kept: its span is the parent
    head = request_head(b"/items", [(b"host", b"test.example"), (b"traceparent", VALID)])
    ex = await start(stream, head)
    ex.request_end()
    end_of_turn()
    sent = transport_of(pool.opened[0]).take()
    ex.data_received(RESPONSE)
    (span,) = memory.get_finished_spans()
    got = origin_traceparent(sent)
    ctx = span.context
    assert f"{ctx.trace_id:032x}".encode() == got.trace_id == VALID[3:35]
    assert f"{ctx.span_id:016x}".encode() == got.parent_id  # the origin's parent is this span
    assert span.parent is not None and f"{span.parent.span_id:016x}".encode() == VALID[36:52]
    assert span.name == "GET test.example/"
    attrs = dict(span.attributes or {})
    assert attrs["http.response.status_code"] == 503 and attrs["url.path"] == "/items"
    assert attrs["originpool.origin"] == "http://127.0.2.1:9000"
    assert attrs["originpool.egress_ip"] == "127.0.1.1"
    assert attrs["originpool.bytes_to_client"] == 4
    assert span.status.status_code.name == "ERROR"  # a 5xx
    assert span.resource.attributes["service.name"] == "edge-test"
    # the hooks' times as events, in order, inside the span
    assert [e.name for e in span.events] == ["upstream_connected", "response_head"]
    stamps = [span.start_time, *(e.timestamp for e in span.events), span.end_time]
    assert stamps == sorted(stamps)


async def test_an_unsampled_new_trace_exports_nothing():
    proxy, pool, memory = traced_proxy()
    proxy.tracer.sample_ratio = 0.0
    ex = await start(RecordingStream(proxy), request_head(b"/x"))
    ex.request_end()
    end_of_turn()
    assert origin_traceparent(transport_of(pool.opened[0]).take()).flags == 0
    ex.data_received(RESPONSE)
    assert memory.get_finished_spans() == ()


async def test_a_websocket_session_is_one_span_with_its_bytes(monkeypatch):
    from proxy import logs

    lines: list[tuple[str, dict]] = []
    monkeypatch.setattr(logs, "access", lambda f, event="access": lines.append((event, dict(f))))
    proxy, pool, memory = traced_proxy()
    stream = RecordingStream(proxy)
    ex = await start(stream, request_head(b"/ws", UPGRADE))
    ex.request_end()
    end_of_turn()
    transport_of(pool.opened[0]).take()
    ex.data_received(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\n\r\n"
    )
    tunnel = stream.pipe.tunnel
    tunnel.data_received(b"\x81\x02hi")
    request_span = memory.get_finished_spans()[0]
    assert request_span.attributes["http.response.status_code"] == 101
    tunnel.client_gone()
    spans = memory.get_finished_spans()
    assert len(spans) == 2
    session = spans[1]
    assert session.name == "websocket test.example/"
    assert session.context.trace_id == request_span.context.trace_id
    assert session.attributes["originpool.bytes_to_client"] == 4
    assert session.attributes["originpool.closed_by"] == "client"
    trace_id = f"{session.context.trace_id:032x}"
    assert [(event, f["trace_id"]) for event, f in lines] == [
        ("access", trace_id),
        ("websocket_session", trace_id),
    ]


def test_build_tracer_is_none_when_off_and_keeps_an_unchanged_exporter(monkeypatch):
    assert build_tracer(TracingSettings()) is None
    plain = build_tracer(TracingSettings(enabled=True, sample_ratio=0.25))
    assert plain is not None and plain.sink is None and plain.sample_ratio == 0.25
    made: list[tuple[str, str]] = []

    class Fake:
        def __init__(self, endpoint: str, name: str) -> None:
            made.append((endpoint, name))
            self.key = ("otlp", endpoint, name)
            self.down = False

        def shutdown(self) -> None:
            self.down = True

    monkeypatch.setattr(OtelExporter, "otlp", classmethod(lambda cls, e, n: Fake(e, n)))
    on = TracingSettings(enabled=True, exporter="otlp")
    first = build_tracer(on)
    again = build_tracer(on, first)  # a reload with the same [tracing]: the same exporter
    assert again is not None and first is not None and again.sink is first.sink
    assert len(made) == 1 and not first.sink.down
    other = TracingSettings(enabled=True, exporter="otlp", endpoint="http://x/")
    moved = build_tracer(other, first)  # a new endpoint: a new exporter, the old shut down
    assert moved is not None and made[-1] == ("http://x/", "originpool") and first.sink.down
    off = build_tracer(TracingSettings(), moved)
    assert off is None and moved.sink.down  # turned off: the exporter flushed and shut down


async def test_serve_exports_spans_over_otlp_http_to_a_collector(origins, tmp_path):
    """exporter = "otlp" against a real HTTP receiver standing in for the Collector: the
    worker's batch, flushed at its drain, holds the request's trace id and the service."""
    import asyncio

    from tests.test_serve import Proc
    from tests.test_trace import CONFIG, request

    bodies: list[bytes] = []

    async def collector(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        bodies.append(head.split(b" ", 2)[1] + b" " + await reader.readexactly(length))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(collector, "127.0.0.1", 4318)
    path = tmp_path / "originpool.toml"
    tracing = '[tracing]\nenabled = true\nexporter = "otlp"\nservice_name = "edge-7"\n'
    path.write_text(CONFIG.replace("{dir}", str(tmp_path)) + tracing)
    proc = Proc(path)
    try:
        await asyncio.to_thread(proc.wait_for, "ready")
        assert await request("app.example") == 200
        line = await asyncio.to_thread(proc.wait_for, "access")
    finally:
        code = await asyncio.to_thread(proc.stop)  # the drain flushes the batch
        server.close()
        await server.wait_closed()
    assert code == 0
    sent = b"".join(bodies)
    assert sent.startswith(b"/v1/traces ")
    assert bytes.fromhex(line["trace_id"]) in sent and b"edge-7" in sent
