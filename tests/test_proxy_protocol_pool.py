"""send-proxy on the pool's side, against a real origin socket in a namespace: the header is
the first thing the origin reads (before a TLS ClientHello too), and a connection that
carried one client's header is never handed to another request."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from pool.egress import EgressSet
from pool.origin import Origin, OriginPool, PoolLimits, Resolver, TLSConfig
from proxy.proxy_protocol import NEED_DATA, ProxyHeader, build_v1, build_v2, parse

HOST, PORT = "127.0.2.1", 9000


class HeaderOrigin:
    """Accepts, reads a PROXY header (and whatever follows it first) per connection."""

    def __init__(self) -> None:
        self.seen: list[tuple[ProxyHeader | None, bytes]] = []
        self.changed = asyncio.Event()
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, HOST, PORT)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        header: ProxyHeader | None = None
        while True:
            chunk = await reader.read(4096)
            data += chunk
            result = parse(data) if data[:1] in (b"P", b"\r") else None
            if isinstance(result, ProxyHeader):
                header, data = result, data[result.length :]
                if not data:
                    data = await reader.read(4096)
                break
            if not chunk or result is not NEED_DATA:
                break
        self.seen.append((header, data))
        self.changed.set()
        writer.close()

    async def wait(self, n: int) -> None:
        async with asyncio.timeout(5):
            while len(self.seen) < n:
                self.changed.clear()
                await self.changed.wait()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_header_first_and_never_reused(ns: object) -> None:
    origin = HeaderOrigin()
    await origin.start()
    pool = OriginPool(EgressSet(["127.0.1.1"]), PoolLimits())
    target = Origin("http", HOST, PORT)
    try:
        header = build_v2(("203.0.113.7", 51000), ("198.51.100.1", 443))
        conn = await pool.acquire(target, preamble=header)
        assert conn.private
        conn.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        await origin.wait(1)
        seen, rest = origin.seen[0]
        assert seen is not None and seen.source == ("203.0.113.7", 51000)
        assert rest.startswith(b"GET / HTTP/1.1")
        pool.release(conn, reusable=True)  # the exchange thought it reusable: it is not
        assert not conn.alive
        [stats] = pool.stats()
        assert (stats.idle, stats.active) == (0, 0)
        other = await pool.acquire(target, preamble=build_v1(("192.0.2.9", 1), (HOST, PORT)))
        assert other is not conn
        other.write(b"x")
        await origin.wait(2)
        assert origin.seen[1][0] is not None and origin.seen[1][0].source == ("192.0.2.9", 1)
        pool.release(other, reusable=False)
        lease = await pool.lease(target, preamble=build_v2(("192.0.2.10", 2), (HOST, PORT)))
        lease.write(b"y")
        await origin.wait(3)
        assert origin.seen[2][0] is not None and origin.seen[2][0].source == ("192.0.2.10", 2)
        pool.release(lease, reusable=True)
    finally:
        await pool.close()
        await origin.close()


async def test_header_precedes_the_tls_client_hello(ns: object) -> None:
    """The origin's TLS is wrapped after the header: what follows it is a ClientHello."""
    origin = HeaderOrigin()
    await origin.start()
    tls = TLSConfig(verify=False)

    async def lookup(host: str, port: int) -> list[str]:
        return [HOST]

    pool = OriginPool(
        EgressSet(["127.0.1.1"]),
        PoolLimits(connect_timeout=1),
        tls=tls,
        resolver=Resolver(lookup=lookup),
    )
    target = Origin("https", "app.example", PORT)
    try:
        # the origin closes after the ClientHello: no handshake to finish
        with contextlib.suppress(OSError, ssl.SSLError):
            await pool.acquire(target, preamble=build_v2(("203.0.113.7", 1), (HOST, PORT)))
        await origin.wait(1)
        seen, rest = origin.seen[0]
        assert seen is not None and seen.source == ("203.0.113.7", 1)
        assert rest[:1] == b"\x16"  # a TLS handshake record
    finally:
        await pool.close()
        await origin.close()
