"""WebSocket passthrough with an independent client and origin (the `websockets` library)
and, where a test must speak frames itself, wsproto over raw sockets."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Response
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Request,
)

from pool.egress import EgressSet
from pool.origin import Origin, OriginPool, PoolLimits
from proxy.routing import Route, Router
from proxy.server import Listener, Proxy, Settings

ORIGIN = ("127.0.2.1", 9000)


async def echo(conn) -> None:
    try:
        async for message in conn:
            await conn.send(message)
    except ConnectionClosed:
        pass


class WsRig:
    def __init__(self, proxy: Proxy, listener: Listener) -> None:
        self.proxy = proxy
        self.listener = listener
        self.port = listener.address[1]

    def connect(self, path: str = "/", **kw):
        return connect(
            f"ws://app.test:{self.port}{path}",
            host="127.0.0.1",
            port=self.port,
            max_size=None,
            open_timeout=10,
            **kw,
        )


def make_proxy() -> WsRig:
    route = Route("app.test", "/", [(Origin("ws", *ORIGIN), 1)])
    pool = OriginPool(EgressSet(["127.0.1.1", "127.0.1.2"]), PoolLimits())
    proxy = Proxy(Router([route]), pool, Settings())
    listener = Listener(proxy, ("127.0.0.1", 0))
    proxy.listeners.append(listener)
    listener.start()
    return WsRig(proxy, listener)


@pytest.fixture
async def rig(ns):
    r = make_proxy()
    yield r
    r.listener.close()


async def test_echo_10000_messages_byte_exact(rig):
    rng = random.Random(5)
    async with (
        serve(echo, *ORIGIN, max_size=None, compression=None),
        rig.connect(compression=None) as ws,
    ):
        for i in range(10_000):
            size = int(2 ** rng.uniform(0, 20))  # 1 B .. 1 MiB, log-uniform
            if i % 2:
                msg: str | bytes = "é" * (size // 2) or "x"
            else:
                msg = rng.randbytes(size)
            await ws.send(msg)
            assert await ws.recv() == msg
    assert rig.proxy.stats.ws_total == 1


async def test_subprotocol_and_permessage_deflate_pass_untouched(rig):
    seen = {}

    async def handler(conn) -> None:
        seen["extensions"] = conn.request.headers.get("Sec-WebSocket-Extensions")
        seen["protocols"] = conn.request.headers.get("Sec-WebSocket-Protocol")
        await echo(conn)

    async with (
        serve(handler, *ORIGIN, subprotocols=["chat.v1"]),
        rig.connect(subprotocols=["chat.v2", "chat.v1"]) as ws,
    ):
        await ws.send("a" * 10_000)
        assert await ws.recv() == "a" * 10_000
        assert ws.subprotocol == "chat.v1"
        assert "permessage-deflate" in ws.response.headers["Sec-WebSocket-Extensions"]
    assert "permessage-deflate" in seen["extensions"]
    assert seen["protocols"] == "chat.v2, chat.v1"


async def test_non_101_answer_is_relayed(rig):
    def refuse(conn, request):
        return Response(403, "Forbidden", Headers([("Content-Length", "4")]), b"nope")

    async with serve(echo, *ORIGIN, process_request=refuse):
        with pytest.raises(InvalidStatus) as refused:
            async with rig.connect():
                pass
    assert refused.value.response.status_code == 403
    assert refused.value.response.body == b"nope"
    [stats] = rig.proxy.pool.stats()
    assert stats.leased == 0


async def test_slow_reader_keeps_proxy_buffers_bounded(rig):
    sent = asyncio.Event()
    chunk = b"x" * 65536

    async def flood(conn) -> None:
        for _ in range(800):  # 50 MiB toward a client that does not read
            await conn.send(chunk)
        sent.set()
        await conn.wait_closed()

    async with (
        serve(flood, *ORIGIN, max_size=None, compression=None, write_limit=65536),
        rig.connect(compression=None, max_queue=1) as ws,
    ):
        await asyncio.wait_for(ws.recv(), 10)
        # the client stops reading; let the pipes fill
        for _ in range(200):
            await asyncio.sleep(0.005)
        buffered = [c.transport.get_write_buffer_size() for c in rig.proxy.clients]
        assert max(buffered) < 2 * 1024 * 1024, buffered
        assert not sent.is_set()  # the origin is held back, not the proxy's memory
        received = 1
        while not sent.is_set() or received < 800:
            assert len(await asyncio.wait_for(ws.recv(), 10)) == 65536
            received += 1
            if received == 800:
                break
        assert received == 800


def ws_raw_client(port: int):
    """A wsproto client on a raw socket: the test decides every frame and TCP event."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    client = WSConnection(ConnectionType.CLIENT)
    sock.sendall(client.send(Request(host="app.test", target="/")))
    events = []
    while not any(isinstance(e, AcceptConnection) for e in events):
        data = sock.recv(65536)
        assert data, "closed during the handshake"
        client.receive_data(data)
        events += list(client.events())
    return sock, client


async def test_half_close_after_close_frames(rig):
    async with serve(echo, *ORIGIN):

        def run() -> list:
            sock, client = ws_raw_client(rig.port)
            sock.sendall(client.send(BytesMessage(data=b"ping")))
            events: list = []
            while not any(isinstance(e, BytesMessage) for e in events):
                client.receive_data(sock.recv(65536))
                events += list(client.events())
            sock.sendall(client.send(CloseConnection(code=1000, reason="done")))
            sock.shutdown(socket.SHUT_WR)  # half-close: we still read
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                client.receive_data(data)
                events += list(client.events())
            sock.close()
            return events

        events = await asyncio.to_thread(run)
    assert any(isinstance(e, BytesMessage) and e.data == b"ping" for e in events)
    close = [e for e in events if isinstance(e, CloseConnection)]
    assert close and close[0].code == 1000


ORIGIN_SCRIPT = """
import asyncio, sys
from websockets.asyncio.server import serve
async def echo(conn):
    async for m in conn:
        await conn.send(m)
async def main():
    async with serve(echo, "127.0.2.1", 9000):
        print("ready", flush=True)
        await asyncio.Event().wait()
asyncio.run(main())
"""


async def test_origin_killed_mid_session_gives_close_1011(rig):
    origin = subprocess.Popen(
        [sys.executable, "-c", ORIGIN_SCRIPT], stdout=subprocess.PIPE, text=True
    )
    try:
        assert (await asyncio.to_thread(origin.stdout.readline)).strip() == "ready"
        async with rig.connect() as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
            os.kill(origin.pid, signal.SIGKILL)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await asyncio.wait_for(ws.wait_closed(), 1.0)
            assert loop.time() - t0 < 1.0
            assert ws.close_code == 1011
    finally:
        if origin.poll() is None:
            origin.kill()
        origin.wait()
    assert rig.proxy.stats.ws_active == 0


async def test_client_vanishing_closes_upstream_and_releases_the_lease(rig):
    closed = asyncio.get_running_loop().create_future()

    async def handler(conn) -> None:
        try:
            async for _ in conn:
                pass
        except ConnectionClosed:
            pass
        closed.set_result(conn.close_code)

    async with serve(handler, *ORIGIN):
        sock, _client = await asyncio.to_thread(ws_raw_client, rig.port)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        sock.close()  # RST: the client is gone without a Close frame
        assert await asyncio.wait_for(closed, 5) == 1001
    for _ in range(100):  # the proxy's own close of the lease is immediate; loop is bounded
        if sum(rig.proxy.pool.egress.live_by_egress().values()) == 0:
            break
        await asyncio.sleep(0.01)
    assert sum(rig.proxy.pool.egress.live_by_egress().values()) == 0
    assert rig.proxy.pool.stats()[0].leased == 0
    assert rig.proxy.stats.ws_active == 0


async def test_optional_idle_timeout_closes_quiet_sessions_with_1001(ns):
    route = Route("app.test", "/", [(Origin("ws", *ORIGIN), 1)])
    proxy = Proxy(
        Router([route]),
        OriginPool(EgressSet(["127.0.1.1"])),
        Settings(websocket_idle_timeout=0.3),
    )
    listener = Listener(proxy, ("127.0.0.1", 0))
    listener.start()
    rig = WsRig(proxy, listener)
    async with serve(echo, *ORIGIN), rig.connect() as ws:
        for _ in range(3):  # activity keeps it open past the limit
            await ws.send("x")
            assert await ws.recv() == "x"
        await asyncio.wait_for(ws.wait_closed(), 5)
        assert ws.close_code == 1001
    listener.close()
