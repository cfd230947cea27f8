"""TCP keepalive: a WebSocket peer that vanishes without FIN or RST is found and its session
ends, on either side, instead of holding a source port forever.

The peer "vanishes" by a blackhole policy route in the test namespace: packets toward it are
dropped silently, exactly what a lost host or a NAT that forgot the flow looks like. With
``idle = 1, interval = 1, probes = 2`` the proxy must notice within about 3 s; the
websocket_idle timeout is off, so nothing else could end these quiet sessions.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from pool import connectx_async
from tests.test_serve import Proc

CONFIG = """
[listen]
address = "127.0.0.1:8080"
[admin]
address = "127.0.0.1:9090"
[egress]
addresses = ["127.0.1.1"]
[[routes]]
host = "app.example"
origins = ["ws://127.0.2.1:9000"]
[timeouts]
drain = 5
[tcp_keepalive]
idle = 1
interval = 1
probes = 2
"""
CLIENT_IP = "127.0.0.5"


def blackhole(ns, to: str) -> None:
    """Drop every packet toward ``to`` without a word: the policy rule goes before the local
    table (moved behind it, in this namespace only)."""
    ns.ip("rule", "add", "to", to, "blackhole", "pref", "10")
    ns.ip("rule", "del", "pref", "0")
    ns.ip("rule", "add", "table", "local", "pref", "100")


@pytest.mark.parametrize("gone", ["client", "origin"])
async def test_a_peer_gone_silently_ends_the_session(ns, tmp_path: Path, gone: str) -> None:
    closes: asyncio.Queue[int | None] = asyncio.Queue()

    async def origin(ws) -> None:
        try:
            async for message in ws:
                await ws.send(message)
        finally:
            await closes.put(ws.close_code)

    config = tmp_path / "originpool.toml"
    config.write_text(CONFIG)
    async with serve(origin, "127.0.2.1", 9000):
        proc = Proc(config)
        try:
            await asyncio.to_thread(proc.wait_for, "ready")
            sock = socket.socket()
            sock.setblocking(False)
            await connectx_async(sock, (CLIENT_IP, 0), ("127.0.0.1", 8080))
            ws = await connect("ws://app.example/", sock=sock, open_timeout=10, ping_interval=None)
            await ws.send("hello")
            assert await ws.recv() == "hello"
            blackhole(ns, CLIENT_IP if gone == "client" else "127.0.2.1")
            end = await asyncio.to_thread(proc.wait_for, "websocket_session", 20)
            if gone == "client":
                # the proxy's client socket timed out: the origin hears Close 1001 from it
                assert end["closed_by"] == "client", end
                assert await asyncio.wait_for(closes.get(), 10) == 1001
            else:
                # the proxy's origin socket timed out: the client hears Close 1011
                assert end["closed_by"] == "origin" and end["close_code"] == 1011, end
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 10)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
            assert end["duration_s"] < 15, end  # keepalive's ~3 s, not any other timeout
            ws.transport.abort()  # toward a blackholed client a close handshake only waits
            ns.ip("rule", "del", "pref", "10")  # the origin's own goodbye may now get its RST
        finally:
            assert await asyncio.to_thread(proc.stop) == 0
