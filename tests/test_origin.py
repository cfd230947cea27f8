"""pool.origin against a real h11 origin in a namespace: reuse, limits, queue, TLS, leases."""

from __future__ import annotations

import asyncio
import errno
import ssl

import pytest
import trustme
from structlog.testing import capture_logs

from pool.egress import EgressSet
from pool.origin import (
    Origin,
    OriginPool,
    PoolLimits,
    PoolQueueFull,
    PoolTimeout,
    Resolver,
    TLSConfig,
)
from tests.http_origin import TestOrigin, get

HOST, PORT = "127.0.2.1", 9000
ORIGIN = Origin("http", HOST, PORT)


@pytest.fixture
async def origin(ns):
    server = TestOrigin()
    await server.start(HOST, PORT)
    yield server
    await server.close()


def make_pool(**limits) -> OriginPool:
    return OriginPool(EgressSet(["127.0.1.1", "127.0.1.2"]), PoolLimits(**limits))


def test_origin_parse():
    assert Origin.parse("http://127.0.2.1:9000") == Origin("http", "127.0.2.1", 9000)
    assert Origin.parse("wss://app.example") == Origin("wss", "app.example", 443)
    assert Origin.parse("http://[::1]:81") == Origin("http", "::1", 81)
    assert str(Origin.parse("http://[::1]:81")) == "http://[::1]:81"
    for bad, why in [("ftp://x", "scheme"), ("http://x/path", "no path"), ("http://", "no host")]:
        with pytest.raises(ValueError, match=why):
            Origin.parse(bad)


async def test_keepalive_reuse(origin):
    pool = make_pool()
    for i in range(20):
        assert await get(pool, ORIGIN) == (200, f"hello {i + 1}".encode())
    assert len(origin.connections) == 1 and len(origin.connections[0].requests) == 20
    [stats] = pool.stats()
    assert (stats.opened, stats.reused, stats.idle, stats.active) == (1, 19, 1, 0)
    await pool.close()


async def test_upstream_sockets_have_nodelay(origin):
    """Set by the pool: asyncio's transport leaves TCP_NODELAY unset on a socket made with
    proto 0 (uvloop sets it again), and without it small requests wait for Nagle."""
    import socket

    pool = make_pool()
    conn = await pool.acquire(ORIGIN)
    sock = conn.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    pool.release(conn, reusable=False)
    await pool.close()


async def test_connection_close_is_not_reused(origin):
    pool = make_pool()
    await get(pool, ORIGIN, "/close")
    await get(pool, ORIGIN)
    assert len(origin.connections) == 2
    await pool.close()


async def test_connection_closed_while_idle_is_never_written_to(origin):
    pool = make_pool()
    await get(pool, ORIGIN)
    origin.close_idle_connections()
    await asyncio.wait_for(origin.disconnects.get(), 5)  # the origin's FIN is on its way
    assert await get(pool, ORIGIN) == (200, b"hello 1")
    assert [len(c.requests) for c in origin.connections] == [1, 1]
    await pool.close()


async def test_max_connections_queue_and_timeouts(origin):
    pool = make_pool(max_connections=2, queue_size=1, queue_timeout=0.2)
    a = await pool.acquire(ORIGIN)
    b = await pool.acquire(ORIGIN)
    waiter = asyncio.ensure_future(pool.acquire(ORIGIN))
    await asyncio.sleep(0)  # let it queue (ordering only, not synchronisation with I/O)
    with pytest.raises(PoolQueueFull, match="2 connections busy and 1 requests"):
        await pool.acquire(ORIGIN)
    pool.release(a, reusable=True)
    assert await waiter is a  # handed over directly
    with pytest.raises(PoolTimeout, match=r"no connection free within 0\.2s"):
        await pool.acquire(ORIGIN)
    pool.release(b, reusable=False)  # a closed one frees a slot: the next caller opens anew
    c = await pool.acquire(ORIGIN)
    assert c is not b
    pool.release(a, reusable=True)
    pool.release(c, reusable=True)
    [stats] = pool.stats()
    assert (stats.active, stats.waiting, stats.idle) == (0, 0, 2)
    await pool.close()


async def test_cancelled_waiter_loses_nothing(origin):
    pool = make_pool(max_connections=1)
    a = await pool.acquire(ORIGIN)
    waiter = asyncio.ensure_future(pool.acquire(ORIGIN))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    pool.release(a, reusable=True)
    assert await pool.acquire(ORIGIN) is a
    pool.release(a, reusable=True)
    [stats] = pool.stats()
    assert (stats.active, stats.waiting) == (0, 0)
    await pool.close()


async def test_max_idle(origin):
    pool = make_pool(max_idle=1)
    conns = [await pool.acquire(ORIGIN) for _ in range(3)]
    for c in conns:
        pool.release(c, reusable=True)
    [stats] = pool.stats()
    assert stats.idle == 1 and stats.opened == 3
    for _ in range(2):
        await asyncio.wait_for(origin.disconnects.get(), 5)
    await pool.close()


async def test_idle_timeout_closes(origin):
    pool = make_pool(idle_timeout=0.05)
    await get(pool, ORIGIN)
    await asyncio.wait_for(origin.disconnects.get(), 5)
    assert pool.stats()[0].idle == 0
    assert sum(pool.egress.live_by_egress().values()) == 0


async def test_max_requests_per_connection(origin):
    pool = make_pool(max_requests=3)
    for _ in range(7):
        await get(pool, ORIGIN)
    assert [len(c.requests) for c in origin.connections] == [3, 3, 1]
    await pool.close()


async def test_max_lifetime(origin):
    now = [100.0]
    pool = OriginPool(EgressSet(["127.0.1.1"]), PoolLimits(max_lifetime=10), clock=lambda: now[0])
    await get(pool, ORIGIN)
    now[0] += 5
    await get(pool, ORIGIN)
    now[0] += 6
    await get(pool, ORIGIN)
    assert [len(c.requests) for c in origin.connections] == [2, 1]
    await pool.close()


async def test_lease_is_counted_apart_and_never_idle(origin):
    pool = make_pool()
    conn = await pool.lease(ORIGIN)
    [stats] = pool.stats()
    assert (stats.leased, stats.active, stats.idle) == (1, 0, 0)
    pool.release(conn, reusable=True)
    [stats] = pool.stats()
    assert (stats.leased, stats.idle) == (0, 0)
    await asyncio.wait_for(origin.disconnects.get(), 5)
    http = await pool.acquire(ORIGIN)
    pool.to_lease(http)  # e.g. after a 101
    [stats] = pool.stats()
    assert (stats.leased, stats.active) == (1, 0)
    pool.release(http, reusable=True)
    assert pool.stats()[0].idle == 0
    await pool.close()


async def test_every_resolved_address_is_a_destination(ns):
    server = TestOrigin()
    await server.start("127.0.2.2", PORT)  # 127.0.2.1 refuses
    calls = []

    async def lookup(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["127.0.2.1", "127.0.2.2"]

    pool = OriginPool(EgressSet(["127.0.1.1"]), resolver=Resolver(lookup=lookup))
    origin = Origin("http", "app.test", PORT)
    conns = [await pool.acquire(origin) for _ in range(4)]
    assert calls == ["app.test"]  # cached
    assert {c.slot.destination for c in conns} == {("127.0.2.2", PORT)}
    for c in conns:
        pool.release(c, reusable=False)
    await server.close()


async def test_resolver_ttl():
    now = [0.0]
    calls = []

    async def lookup(host: str, port: int) -> list[str]:
        calls.append(now[0])
        return ["127.0.2.1"]

    resolver = Resolver(ttl=30, lookup=lookup, clock=lambda: now[0])
    for t in (0, 10, 29.9, 30, 45):
        now[0] = t
        assert await resolver.resolve("app.test", 80) == ["127.0.2.1"]
    assert calls == [0, 30]
    assert await resolver.resolve("127.0.0.5", 80) == ["127.0.0.5"]


async def test_system_resolver_does_not_block(ns):
    resolver = Resolver()
    assert "127.0.0.1" in await resolver.resolve("localhost", 80)


async def test_connect_timeout_releases_everything(ns):
    import socket

    dead = socket.socket()
    dead.bind((HOST, PORT))
    dead.listen(0)
    filler = socket.socket()
    filler.connect((HOST, PORT))  # the queue of one is full: SYNs go unanswered
    pool = make_pool(connect_timeout=0.2)
    try:
        with pytest.raises(OSError) as slow:
            await pool.acquire(ORIGIN)
        assert slow.value.errno == errno.ETIMEDOUT and "127.0.2.1:9000" in str(slow.value)
        [stats] = pool.stats()
        assert stats.active == 0
        assert sum(pool.egress.live_by_egress().values()) == 0
    finally:
        filler.close()
        dead.close()


# -- TLS -------------------------------------------------------------------------------------


@pytest.fixture
async def tls_origin(ns, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("origin.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    server = TestOrigin()
    await server.start(HOST, 9443, server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    yield server, str(ca_file)
    await server.close()


def tls_pool(tls: TLSConfig) -> OriginPool:
    async def lookup(host: str, port: int) -> list[str]:
        return [HOST]

    return OriginPool(EgressSet(["127.0.1.1"]), tls=tls, resolver=Resolver(lookup=lookup))


async def test_tls_verifies_and_sends_sni(tls_origin):
    server, ca_file = tls_origin
    origin = Origin("https", "origin.test", 9443)
    pool = tls_pool(TLSConfig(ca_file=ca_file))
    assert await get(pool, origin) == (200, b"hello 1")
    assert server.sni == ["origin.test"]
    await pool.close()


async def test_tls_rejects_unknown_ca_by_default(tls_origin):
    pool = tls_pool(TLSConfig())
    with pytest.raises(ssl.SSLCertVerificationError):
        await pool.acquire(Origin("https", "origin.test", 9443))
    assert sum(pool.egress.live_by_egress().values()) == 0


async def test_tls_verify_false_is_logged(tls_origin):
    pool = tls_pool(TLSConfig(verify=False))
    with capture_logs() as logs:
        assert (await get(pool, Origin("https", "origin.test", 9443)))[0] == 200
    assert any(e["event"] == "tls_verify_disabled" for e in logs)
    await pool.close()
