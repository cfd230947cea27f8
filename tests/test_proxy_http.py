"""The HTTP data path end to end in one namespace: real client sockets, a real h11 origin,
the proxy's own listener and pool (in-process, so failures show their traceback)."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import socket
from collections.abc import Iterator

import httpx
import pytest
from structlog.testing import capture_logs

from pool.egress import EgressSet
from pool.origin import Origin, OriginPool, PoolLimits
from proxy.routing import Route, Router
from proxy.server import Listener, Proxy, Settings
from tests.http_origin import TestOrigin, pattern

O1 = ("127.0.2.1", 9000)
O2 = ("127.0.2.2", 9000)

# on the compiled shortcuts and header rewrite, and again on the pure ones
pytestmark = pytest.mark.usefixtures("whole_impl")


class Rig:
    def __init__(self, proxy: Proxy, listener: Listener, origins: list[TestOrigin]) -> None:
        self.proxy = proxy
        self.listener = listener
        self.origins = origins
        self.url = f"http://{listener.address[0]}:{listener.address[1]}"

    def client(self, **kw) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={"host": "app.test"}, **kw)

    async def raw(self, data: bytes, *, close_write: bool = False) -> bytes:
        """Send bytes as they are and read until the proxy closes."""
        reader, writer = await asyncio.open_connection(*self.listener.address)
        writer.write(data)
        if close_write:
            writer.write_eof()
        out = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
        return out


PARSER = ["httptools"]  # set per test by the fixture below


@pytest.fixture(autouse=True, params=["httptools", "h11"])
def parser(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here runs on both codecs: the fast one the proxy uses by default and h11,
    the reference (``proxy.http_parser``), so the two stay interchangeable end to end."""
    PARSER[0] = request.param
    yield request.param
    PARSER[0] = "httptools"


async def make_rig(
    origins=(O1,),
    egress=("127.0.1.1", "127.0.1.2"),
    settings: Settings | None = None,
    limits: PoolLimits | None = None,
    serve=(O1,),
) -> Rig:
    servers = []
    for addr in serve:
        server = TestOrigin()
        await server.start(*addr)
        servers.append(server)
    route = Route("app.test", "/", [(Origin("http", h, p), 1) for h, p in origins], "round_robin")
    pool = OriginPool(EgressSet(list(egress)), limits or PoolLimits())
    settings = settings or Settings(trusted_proxies=[ipaddress.ip_network("127.0.0.9/32")])
    proxy = Proxy(Router([route]), pool, dataclasses.replace(settings, http_parser=PARSER[0]))
    listener = Listener(proxy, ("127.0.0.1", 0))
    proxy.listeners.append(listener)
    listener.start()
    return Rig(proxy, listener, servers)


@pytest.fixture
async def rig(ns):
    r = await make_rig()
    yield r
    r.listener.close()
    await r.proxy.pool.close()
    for s in r.origins:
        await s.close()


async def test_get_and_upstream_keepalive_reuse(rig):
    async with rig.client() as client:
        for i in range(30):
            r = await client.get("/hello")
            assert r.status_code == 200 and r.text == f"hello {i + 1}"
            assert r.headers["via"] == "1.1 originpool"
    [origin] = rig.origins
    assert len(origin.connections) == 1 and len(origin.connections[0].requests) == 30


async def test_forwarding_headers_and_hop_by_hop(rig):
    async with rig.client() as client:
        r = await client.get(
            "/hello",
            headers={
                "x-forwarded-for": "6.6.6.6",
                "connection": "keep-alive, x-secret",
                "x-secret": "1",
                "te": "trailers",
            },
        )
    assert r.status_code == 200
    sent = dict((n.decode(), v.decode()) for n, v in rig.origins[0].last_headers)
    assert sent["x-forwarded-for"] == "127.0.0.1"  # the client is not a trusted proxy
    assert sent["x-forwarded-proto"] == "http" and sent["x-forwarded-host"] == "app.test"
    assert "x-secret" not in sent and "te" not in sent
    assert sent["via"] == "1.1 originpool" and sent["host"] == "app.test"


async def test_unknown_host_gets_421_without_upstream_contact(rig):
    async with httpx.AsyncClient(base_url=rig.url) as client:
        r = await client.get("/hello", headers={"host": "other.test"})
        assert r.status_code == 421
    # absolute-form for a foreign host, with our Host header: the target's authority wins
    out = await rig.raw(b"GET http://other.test/hello HTTP/1.1\r\nHost: app.test\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 421 ")
    assert rig.origins[0].connections == []


async def test_large_bodies_both_ways_byte_exact(rig):
    size = 8 * 1024 * 1024 + 17
    body = pattern(0, size)
    async with rig.client(timeout=60) as client:
        r = await client.post("/echo", content=body)
        assert r.status_code == 200 and r.content == body

        async def chunks():
            for off in range(0, size, 100_000):
                yield body[off : off + 100_000]

        r = await client.post("/echo", content=chunks())  # chunked upload
        assert r.content == body
        r = await client.get(f"/big/{size}")  # chunked download
        assert r.content == pattern(0, size)


async def test_head_and_expect_continue(rig):
    out = await rig.raw(
        b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\n\r\nhello"
    )
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 ")
    assert out.endswith(b"hello")
    async with rig.client() as client:
        r = await client.head("/hello")
        assert r.status_code == 200 and r.content == b""
        assert r.headers["content-length"] == "7"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\n\r\n", b"400"),  # no Host
        (
            b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"400",
        ),
        (
            b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\n"
            b"Content-Length: 3\r\n\r\nabc",
            b"400",
        ),
        (b"GET / HTTP/1.1\r\nHost: app.test\r\nX-A: b\r\n c\r\n\r\n", b"400"),  # obs-fold
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: app.test\r\n\r\n", b"414"),
        (b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n", b"431"),
        (b"GET / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: gzip\r\n\r\n", b"501"),
    ],
    ids=["garbage", "no-host", "cl+te", "dup-cl", "obs-fold", "414", "431", "te-gzip"],
)
async def test_malformed_requests_get_4xx_and_a_clean_close(rig, raw, status):
    out = await rig.raw(raw)
    assert out.startswith(b"HTTP/1.1 " + status), out[:100]
    assert rig.origins[0].connections == [] or all(
        not c.requests for c in rig.origins[0].connections
    )
    async with rig.client() as client:  # and the proxy keeps serving others
        assert (await client.get("/hello")).status_code == 200


async def test_slowloris_gets_408(ns):
    rig = await make_rig(settings=Settings(header_timeout=0.2))
    reader, writer = await asyncio.open_connection(*rig.listener.address)
    writer.write(b"GET / HTTP/1.1\r\nHost: app")
    out = await asyncio.wait_for(reader.read(-1), 5)
    assert out.startswith(b"HTTP/1.1 408 ")
    writer.close()
    rig.listener.close()


async def test_origin_refused_is_502_after_trying_every_origin(ns):
    rig = await make_rig(origins=(O1, O2), serve=())
    with capture_logs() as logs:
        async with rig.client() as client:
            r = await client.get("/hello")
    assert r.status_code == 502
    errors = [e for e in logs if e["event"] == "upstream_error"]
    assert {e["origin"] for e in errors} == {"http://127.0.2.1:9000", "http://127.0.2.2:9000"}
    assert all(e["errno"] == "ECONNREFUSED" and e["egress"].startswith("127.0.1.") for e in errors)
    rig.listener.close()


async def test_refused_origin_falls_over_to_the_next(ns):
    rig = await make_rig(origins=(O2, O1), serve=(O1,))
    async with rig.client() as client:
        for _ in range(4):
            assert (await client.get("/hello")).status_code == 200
    rig.listener.close()


async def test_exhausted_ports_give_503_with_retry_after_and_a_log_line(ns):
    rig = await make_rig(egress=("127.0.1.1:40000-40001",), limits=PoolLimits(max_idle=0))
    held = [socket.create_connection(O1, source_address=("127.0.1.1", p)) for p in (40000, 40001)]
    try:
        with capture_logs() as logs:
            async with rig.client() as client:
                r = await client.get("/hello")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        [line] = [e for e in logs if e["event"] == "upstream_error"]
        assert line["egress"] == ["127.0.1.1"] and line["errno"] == "EADDRNOTAVAIL"
        assert line["destination"] == "127.0.2.1:9000"
    finally:
        for s in held:
            s.close()
        rig.listener.close()


async def test_origin_silent_is_504(ns):
    rig = await make_rig(settings=Settings(upstream_response_timeout=0.2))
    async with rig.client() as client:
        r = await client.get("/slow")
    assert r.status_code == 504
    rig.listener.close()


async def test_pool_limit_is_503(ns):
    rig = await make_rig(limits=PoolLimits(max_connections=1, queue_size=0))
    async with rig.client() as c1, rig.client() as c2:
        slow = asyncio.ensure_future(c1.get("/slow", timeout=5))
        while not rig.origins[0].connections or not rig.origins[0].connections[0].requests:
            await asyncio.sleep(0.01)
        r = await c2.get("/hello")
        assert r.status_code == 503
        slow.cancel()
    rig.listener.close()


async def test_reused_connection_closed_by_origin_is_retried(rig):
    async with rig.client() as client:
        assert (await client.get("/hello")).status_code == 200
        rig.origins[0].close_idle_connections()
        await asyncio.wait_for(rig.origins[0].disconnects.get(), 5)
        assert (await client.get("/hello")).status_code == 200


async def test_pipelined_requests_and_a_partial_one_before_eof(rig):
    """Found by the fuzzer: bytes after a request plus the client's EOF must not hang."""
    out = await rig.raw(
        b"GET /hello HTTP/1.1\r\nHost: app.test\r\n\r\n"
        b"GET /hello HTTP/1.1\r\nHost: app.test\r\n\r\n"
        b"GET /hel",
        close_write=True,
    )
    assert out.count(b"HTTP/1.1 200 ") == 2


async def test_body_limit_413_before_any_upstream_contact(ns):
    rig = await make_rig(settings=Settings(max_body_bytes=1000))
    out = await rig.raw(
        b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000
    )
    assert out.startswith(b"HTTP/1.1 413 ")
    assert rig.origins[0].connections == []
    async with rig.client() as client:  # a chunked body over the limit is cut off too

        async def chunks():
            for _ in range(10):
                yield b"y" * 500

        r = await client.post("/echo", content=chunks())
        assert r.status_code == 413
        assert (await client.post("/echo", content=b"z" * 999)).content == b"z" * 999
    rig.listener.close()


async def test_stalled_body_gets_408(ns):
    rig = await make_rig(settings=Settings(body_idle_timeout=0.2))
    reader, writer = await asyncio.open_connection(*rig.listener.address)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 10\r\n\r\nabc")
    out = await asyncio.wait_for(reader.read(-1), 5)
    assert out.startswith(b"HTTP/1.1 408 ")
    writer.close()
    rig.listener.close()


async def test_max_connections_pauses_accept_and_resumes(ns):
    rig = await make_rig(settings=Settings(max_connections=2))
    first = [await asyncio.open_connection(*rig.listener.address) for _ in range(2)]
    keep = b"GET /hello HTTP/1.1\r\nHost: app.test\r\n\r\n"  # both stay connected
    request = b"GET /hello HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
    for _r, w in first:
        w.write(keep)
    for r, _w in first:
        assert (await asyncio.wait_for(r.readuntil(b"hello"), 5)).startswith(b"HTTP/1.1 200")
    reader, writer = await asyncio.open_connection(*rig.listener.address)  # kernel backlog
    writer.write(request)
    with pytest.raises(TimeoutError):  # not accepted while two clients are connected
        await asyncio.wait_for(reader.read(1), 0.3)
    assert len(rig.proxy.clients) == 2
    for _r, w in first:
        w.close()
    out = await asyncio.wait_for(reader.read(-1), 5)
    assert out.startswith(b"HTTP/1.1 200 ")
    writer.close()
    rig.listener.close()


async def test_downstream_tls_termination(ns, tmp_path):
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("app.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    server = TestOrigin()
    await server.start(*O1)
    route = Route("app.test", "/", [(Origin("http", *O1), 1)])
    proxy = Proxy(Router([route]), OriginPool(EgressSet(["127.0.1.1"])), Settings())
    listener = Listener(proxy, ("127.0.0.1", 0), server_ctx)
    proxy.listeners.append(listener)
    listener.start()
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    port = listener.address[1]
    async with httpx.AsyncClient(verify=client_ctx) as client:
        r = await client.get(
            f"https://127.0.0.1:{port}/hello",
            headers={"host": "app.test"},
            extensions={"sni_hostname": "app.test"},  # the certificate's name
        )
    assert r.status_code == 200
    sent = dict((n.decode(), v.decode()) for n, v in server.last_headers)
    assert sent["x-forwarded-proto"] == "https"
    listener.close()
    await server.close()
