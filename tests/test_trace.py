"""W3C Trace Context: traceparent parsed as the spec says, kept from a trusted peer only,
a new trace otherwise; against a real ``originpool serve`` and a real origin, the origin's
traceparent and the trace id of the access and upstream_error lines."""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path

import pytest

from proxy import tracecontext as tc
from proxy.config_trace import TRACING_KEYS
from tests.test_serve import Proc

VALID = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


# -- parsing, no I/O --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (VALID, True),
        (VALID[:-2] + b"00", True),
        (b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future", True),
        (b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", True),
        (VALID + b"-x", False),  # version 00 is exactly 55 characters
        (b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x", False),
        (b"ff" + VALID[2:], False),  # version ff is invalid
        (VALID.upper(), False),  # lower-case hex only
        (b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01", False),  # all-zero trace id
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-" + b"0" * 16 + b"-01", False),
        (VALID[:54], False),
        (VALID.replace(b"-", b"_", 1), False),
        (b"00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01", False),
        (b"", False),
    ],
)
def test_traceparent_is_parsed_as_the_spec_says(value, ok):
    assert (tc.parse(value) is not None) is ok


def test_a_trusted_peers_trace_is_kept_with_a_span_of_our_own():
    headers = [(b"traceparent", VALID), (b"tracestate", b"a=1"), (b"tracestate", b"b=2")]
    trace = tc.begin(headers, True, 0.0)
    assert trace.trace_id == VALID[3:35] and trace.parent_id == VALID[36:52]
    assert trace.span_id != trace.parent_id and trace.sampled  # the caller's decision
    assert trace.state == b"a=1,b=2"
    out = [(b"host", b"h"), *headers]
    tc.inject(out, trace)
    assert out == [
        (b"host", b"h"),
        (b"traceparent", b"00-" + trace.trace_id + b"-" + trace.span_id + b"-01"),
        (b"tracestate", b"a=1,b=2"),
    ]


def test_an_untrusted_or_doubled_or_absent_traceparent_starts_a_new_trace():
    for headers, trusted in (
        ([(b"traceparent", VALID), (b"tracestate", b"a=1")], False),
        ([(b"traceparent", VALID), (b"traceparent", VALID)], True),
        ([], True),
    ):
        trace = tc.begin(headers, trusted, 1.0)
        assert trace.trace_id != VALID[3:35] and trace.parent_id is None
        assert re.fullmatch(rb"[0-9a-f]{32}", trace.trace_id) and trace.state is None
        assert tc.parse(trace.traceparent()) is not None


def test_sample_ratio_decides_new_traces():
    assert not any(tc.begin([], False, 0.0).sampled for _ in range(200))
    assert all(tc.begin([], False, 1.0).sampled for _ in range(200))
    half = sum(tc.begin([], False, 0.5).sampled for _ in range(2000))
    assert 800 < half < 1200


# -- a real serve -----------------------------------------------------------------------------

CONFIG = """
[listen]
address = "127.0.0.1:8080"
[admin]
address = "127.0.0.1:9090"
[egress]
addresses = ["127.0.1.1"]
[[routes]]
host = "app.example"
origins = ["http://127.0.2.1:9000"]
[[routes]]
host = "down.example"
origins = ["http://127.0.2.3:9000"]
[proxy]
trusted_proxies = ["127.0.0.9/32"]
pid_file = "{dir}/p.pid"
"""


async def request(host: str, extra: bytes = b"", source: str = "127.0.0.1") -> int:
    """One request from ``source`` (127.0.0.9 is the trusted proxy)."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", 8080))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(
        b"GET /t HTTP/1.1\r\nHost: "
        + host.encode()
        + b"\r\n"
        + extra
        + b"Connection: close\r\n\r\n"
    )
    raw = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    return int(raw.split(b" ", 2)[1])


def traceparent(origin) -> tuple[bytes, bytes, bytes, bytes | None]:
    """(trace id, parent id, flags, tracestate) of the origin's last request."""
    fields = [(n.lower(), v) for n, v in origin.last_headers]
    parents = [v for n, v in fields if n == b"traceparent"]
    states = [v for n, v in fields if n == b"tracestate"]
    assert len(parents) == 1 and len(states) <= 1, fields
    parsed = tc.parse(parents[0])
    assert parsed is not None, parents
    return parsed.trace_id, parsed.parent_id, b"%02x" % parsed.flags, states[0] if states else None


def start(tmp_path: Path, tracing: str) -> Proc:
    path = tmp_path / "originpool.toml"
    path.write_text(CONFIG.replace("{dir}", str(tmp_path)) + tracing)
    return Proc(path)


async def test_serve_keeps_trusted_traces_replaces_others_and_logs_the_trace_id(origins, tmp_path):
    proc = start(tmp_path, "[tracing]\nenabled = true\n")
    given = b"traceparent: " + VALID + b"\r\ntracestate: vendor=abc\r\n"
    try:
        await asyncio.to_thread(proc.wait_for, "ready")
        # absent: a new trace, its id in the access line
        assert await request("app.example") == 200
        trace_id, parent_id, flags, state = traceparent(origins[0])
        line = await asyncio.to_thread(proc.wait_for, "access", 20, 1)
        assert line["trace_id"] == trace_id.decode() and state is None and flags == b"01"

        # from the trusted proxy: kept, with the proxy's own span as the origin's parent
        assert await request("app.example", given, source="127.0.0.9") == 200
        trace_id, parent_id, flags, state = traceparent(origins[0])
        assert trace_id == VALID[3:35] and parent_id != VALID[36:52] and flags == b"01"
        assert state == b"vendor=abc"
        line = await asyncio.to_thread(proc.wait_for, "access", 20, 2)
        assert line["trace_id"] == VALID[3:35].decode()

        # from anyone else: a new trace, the vendor state not passed on
        assert await request("app.example", given) == 200
        trace_id, parent_id, flags, state = traceparent(origins[0])
        assert trace_id != VALID[3:35] and state is None
        line = await asyncio.to_thread(proc.wait_for, "access", 20, 3)
        assert line["trace_id"] == trace_id.decode()

        # an origin that refuses: upstream_error and the access line name the same trace
        assert await request("down.example", given, source="127.0.0.9") == 502
        error = await asyncio.to_thread(proc.wait_for, "upstream_error")
        line = await asyncio.to_thread(proc.wait_for, "access", 20, 4)
        assert error["trace_id"] == line["trace_id"] == VALID[3:35].decode()
        assert error["request_id"] == line["request_id"]
    finally:
        code = await asyncio.to_thread(proc.stop)
    assert code == 0


async def test_serve_with_tracing_off_leaves_traceparent_alone(origins, tmp_path):
    """Off (the default): the proxy is no hop of the trace; the lines have no trace_id."""
    proc = start(tmp_path, "")
    try:
        await asyncio.to_thread(proc.wait_for, "ready")
        assert await request("app.example", b"traceparent: " + VALID + b"\r\n") == 200
        fields = [(n.lower(), v) for n, v in origins[0].last_headers]
        assert [v for n, v in fields if n == b"traceparent"] == [VALID]
        line = await asyncio.to_thread(proc.wait_for, "access")
        assert "trace_id" not in line
    finally:
        code = await asyncio.to_thread(proc.stop)
    assert code == 0


def test_check_config_names_a_bad_tracing_key(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "t.toml"
    path.write_text(
        CONFIG.replace("{dir}", str(tmp_path)) + '[tracing]\nexporter = "otlp"\nsample_ratio = 2\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert f"{path}: tracing.sample_ratio: must be from 0" in proc.stderr
    assert f"{path}: tracing.exporter: " in proc.stderr and "enabled is false" in proc.stderr


def test_the_deploy_example_block_parses_uncommented():
    from proxy.config import parse
    from tests.test_header_rules import commented_block

    block = commented_block("[tracing]")
    config = parse(CONFIG.replace("{dir}", "/tmp") + block)
    assert config.tracing.enabled and config.tracing.exporter == "otlp"
    keys = {line.split("=")[0].strip() for line in block.splitlines()[1:]}
    assert keys == set(TRACING_KEYS)


async def test_the_exchanges_access_line_has_the_refusals_keys_in_their_order(monkeypatch):
    """proxy.observe builds the exchange's access line itself (no keyword call per request):
    its keys must stay access.response's, which the connection's refusals use."""
    from proxy import access, logs
    from proxy.observe import Tracer
    from proxy.testing import RecordingStream, memory_proxy, request_head
    from tests.test_seam import start

    lines: list[dict] = []
    monkeypatch.setattr(logs, "access", lambda fields, event="access": lines.append(fields))

    class Stats:
        def observe(self, route: str, status: int, seconds: float) -> None:
            pass

    access.response(
        Stats(), "r", 0.1, method="GET", host="h", path="/", status=400, body_bytes=0,
        bytes_in=0, origin=None, egress=None, client="c", request_id="i", trace_id="t",
    )  # fmt: skip
    for tracer in (None, Tracer(1.0, None)):
        proxy, _pool, _origin = memory_proxy()
        proxy.tracer = tracer
        ex = await start(RecordingStream(proxy), request_head(b"/x"))
        ex.request_end()
        ex.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    refusal, untraced, traced = lines
    assert list(untraced) == [k for k in refusal if k != "trace_id"]
    assert list(traced) == list(refusal)
