"""Toward the origin the proxy is the WebSocket client: when it ends a session (the client
vanished, idle timeout), it sends Close and lets the origin close the TCP connection first
(RFC 6455 §7.1.1). The origin then sees a clean close instead of a reset, and the TIME_WAIT
sits on the origin's side, not on one of the proxy's egress ports.

The origin here is wsproto over a raw socket, so the test sees exactly what the origin's
kernel reports: EOF or ECONNRESET, and which 4-tuple holds the TIME_WAIT.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request

from pool import sockdiag
from pool.egress import EgressSet
from pool.origin import Origin, OriginPool, PoolLimits
from proxy import tunnel
from proxy.routing import Route, Router
from proxy.server import Listener, Proxy, Settings

ORIGIN = ("127.0.2.1", 9000)
EGRESS = "127.0.1.1"

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: app.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class RawOrigin:
    """Accepts one WebSocket session; on the proxy's Close it answers Close, then either
    closes its side (``answer=True``) or stays silent; records how its connection ended."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.close_code: int | None = None
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, *ORIGIN)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    self.ended.set_result("eof")
                    return
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, Request):
                        writer.write(ws.send(AcceptConnection()))
                    elif isinstance(event, CloseConnection):
                        self.close_code = event.code
                        if self.answer:
                            writer.write(ws.send(event.response()))
                            await writer.drain()
                            writer.close()  # the server closes first (RFC 6455 §7.1.1)
                            self.ended.set_result("closed first")
                            return
        except ConnectionResetError:
            self.ended.set_result("reset")

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def proxy(ns):
    route = Route("app.test", "/", [(Origin("ws", *ORIGIN), 1)])
    pool = OriginPool(EgressSet([EGRESS]), PoolLimits())
    p = Proxy(Router([route]), pool, Settings())
    listener = Listener(p, ("127.0.0.1", 0))
    p.listeners.append(listener)
    listener.start()
    yield p, listener
    listener.close()
    await pool.close()


def time_wait() -> list[tuple[str, str]]:
    """(source, destination) of every TIME_WAIT socket toward or from the origin."""
    out = []
    for s in sockdiag.dump(socket.AF_INET, socket.IPPROTO_TCP, 1 << sockdiag.TCP_TIME_WAIT):
        out.append((f"{s.src}:{s.sport}", f"{s.dst}:{s.dport}"))
    return out


async def open_session(listener: Listener) -> socket.socket:
    sock = socket.create_connection(listener.address)
    sock.sendall(UPGRADE)
    sock.settimeout(5)
    head = b""
    while b"\r\n\r\n" not in head:
        head += await asyncio.get_running_loop().run_in_executor(None, sock.recv, 4096)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return sock


@pytest.mark.parametrize("gone", ["fin", "reset"])
async def test_a_vanished_clients_origin_closes_first_and_cleanly(proxy, gone):
    p, listener = proxy
    origin = RawOrigin(answer=True)
    await origin.start()
    try:
        client = await open_session(listener)
        if gone == "reset":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        client.close()
        assert await asyncio.wait_for(origin.ended, 5) == "closed first"
        assert origin.close_code == 1001
        async with asyncio.timeout(5):  # the proxy releases the lease on the origin's FIN
            while p.pool.stats()[0].leased:
                await asyncio.sleep(0.01)
        waiting = time_wait()
        assert not [tw for tw in waiting if tw[0].startswith(EGRESS)], waiting
        assert [tw for tw in waiting if tw[0] == f"{ORIGIN[0]}:{ORIGIN[1]}"], waiting
    finally:
        await origin.close()


async def test_an_origin_that_never_closes_is_reset_after_the_wait(proxy, monkeypatch):
    monkeypatch.setattr(tunnel, "ORIGIN_CLOSE_WAIT", 0.3)
    p, listener = proxy
    origin = RawOrigin(answer=False)
    await origin.start()
    try:
        client = await open_session(listener)
        client.close()
        assert await asyncio.wait_for(origin.ended, 5) == "reset"
        assert origin.close_code == 1001
        assert p.pool.stats()[0].leased == 0
        assert not [tw for tw in time_wait() if tw[0].startswith(EGRESS)]
    finally:
        await origin.close()


async def test_the_101s_access_line_names_its_egress_ip(proxy):
    from structlog.testing import capture_logs

    _p, listener = proxy
    origin = RawOrigin(answer=True)
    await origin.start()
    try:
        with capture_logs() as logs:
            client = await open_session(listener)
            client.close()
            await asyncio.wait_for(origin.ended, 5)
        [access] = [e for e in logs if e["event"] == "access"]
        [session] = [e for e in logs if e["event"] == "websocket_session"]
        assert access["status"] == 101 and access["egress"] == session["egress"] == EGRESS
        assert access["request_id"] == session["request_id"]
    finally:
        await origin.close()
