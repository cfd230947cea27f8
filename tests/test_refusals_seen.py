"""Every response the proxy sends gets its access line and its count (issue 18, item 4),
the proxy's own refusals included, as nginx's access log has a line for its 400s and 414s.

Each refusal is sent as raw bytes to the running in-process proxy, on both codecs, and
checked three ways: the status the client got, exactly one ``access`` line with that status,
the body bytes the client got and the request id its answer carried, and
``originpool_requests_total`` rendered by the admin code one higher for that status."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from pool.egress import EgressSet
from pool.origin import Origin, OriginPool, PoolLimits
from proxy.admin import render_metrics
from proxy.routing import Route, Router
from proxy.server import Listener, Proxy, Settings
from tests.http_origin import TestOrigin

ORIGIN = ("127.0.2.1", 9000)
HEADER_TIMEOUT = 0.5

LONG = b"x" * 20_000
MANY = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"y" * 100) for i in range(200))

# (id, request bytes, status); every one is refused by the proxy itself, no origin contacted
REFUSALS = [
    (
        "431-one-long-header",
        b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Long: " + LONG + b"\r\n\r\n",
        431,
    ),
    ("431-many-headers", b"GET / HTTP/1.1\r\nHost: app.test\r\n" + MANY + b"\r\n", 431),
    ("414-long-target", b"GET /" + LONG[:10_000] + b" HTTP/1.1\r\nHost: app.test\r\n\r\n", 414),
    ("408-head-too-slow", b"GET / HTTP/1.1\r\nHost: app.test\r\n", 408),
    (
        "400-duplicate-content-length",
        b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        400,
    ),
    (
        "400-content-length-and-chunked",
        b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("400-no-host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("400-ftp-target", b"GET ftp://app.test/x HTTP/1.1\r\nHost: app.test\r\n\r\n", 400),
    ("400-connect", b"CONNECT app.test:443 HTTP/1.1\r\nHost: app.test:443\r\n\r\n", 400),
    ("400-garbage", b"GARBAGE\r\n\r\n", 400),
    ("400-nul-in-target", b"GET /\x00 HTTP/1.1\r\nHost: app.test\r\n\r\n", 400),
    (
        "413-body-over-the-limit",
        b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 2048\r\n\r\n",
        413,
    ),
    ("421-no-route", b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n", 421),
    (
        "501-gzip-transfer-coding",
        b"POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: gzip\r\n\r\n",
        501,
    ),
]


@pytest.fixture(params=["httptools", "h11"])
def parser(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.param


@pytest.fixture
async def rig(ns, parser):
    origin = TestOrigin()
    await origin.start(*ORIGIN)
    route = Route("app.test", "/", [(Origin("http", *ORIGIN), 1)])
    pool = OriginPool(EgressSet(["127.0.1.1"]), PoolLimits())
    settings = Settings(http_parser=parser, header_timeout=HEADER_TIMEOUT, max_body_bytes=1024)
    proxy = Proxy(Router([route]), pool, settings)
    listener = Listener(proxy, ("127.0.0.1", 0))
    proxy.listeners.append(listener)
    listener.start()
    yield proxy, listener, origin
    listener.close()
    await pool.close()
    await origin.close()


def requests_total(proxy: Proxy) -> dict[tuple[str, str], int]:
    """``originpool_requests_total`` as /metrics renders it: {(route, status): count}."""
    pattern = r'^originpool_requests_total\{route="([^"]*)",status="(\d+)"\} (\d+)'
    return {
        (route, status): int(n)
        for route, status, n in re.findall(pattern, render_metrics(proxy), re.MULTILINE)
    }


async def send(address: tuple[str, int], data: bytes) -> bytes:
    """Send and read until the proxy closes (an error answer always closes; the 408 comes
    when the header timeout fires, bounded here by 10 s)."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
async def test_every_refusal_gets_one_access_line_and_its_count(rig, request_bytes, status):
    proxy, listener, origin = rig
    before = requests_total(proxy)
    with capture_logs() as logs:
        out = await send(listener.address, request_bytes)  # logged before the answer's EOF
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), out[:200]
    rid = re.search(rb"\r\nx-request-id: ([0-9a-f]{32})\r\n", head + b"\r\n", re.I)
    assert rid is not None, head
    lines = [line for line in logs if line["event"] == "access"]
    assert len(lines) == 1, logs
    line = lines[0]
    assert line["status"] == status
    assert line["bytes"] == len(body)
    assert line["request_id"] == rid.group(1).decode()
    assert line["client"] == "127.0.0.1"
    assert line["duration_ms"] >= 0
    decided = {413: "app.test", 421: "other.test"}  # refused after the host was known
    assert line["host"] == decided.get(status, "-")
    # the route is "-" unless the request was routed first (413: the route's body limit)
    route = "app.test/" if status == 413 else "-"
    after = requests_total(proxy)
    grown = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
    assert grown == {(route, str(status)): 1}, grown
    assert sum(len(c.requests) for c in origin.connections) == 0  # refused by the proxy itself
    if status == 408:
        assert line["duration_ms"] >= HEADER_TIMEOUT * 1000 * 0.9


async def test_a_refusals_line_has_every_field_a_proxied_requests_line_has(rig):
    _proxy, listener, _origin = rig
    with capture_logs() as logs:
        await send(
            listener.address, b"GET /hello HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
        )
        await send(listener.address, b"GET / HTTP/1.1\r\n\r\n")
    proxied, refused = [line for line in logs if line["event"] == "access"]
    assert proxied["status"] == 200 and refused["status"] == 400
    assert list(proxied) == list(refused)
    assert (refused["method"], refused["host"], refused["path"]) == ("-", "-", "-")
