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


async def test_accepted_sockets_inherit_the_listeners_options(ns) -> None:
    """The listener sets TCP_NODELAY and keepalive once; every accepted socket must carry
    them (the kernel clones the listener's options), or client sockets would lose both."""
    from pool.egress import EgressSet
    from pool.origin import OriginPool
    from pool.sockopt import KeepAlive
    from proxy.routing import Router
    from proxy.server import Listener, Proxy, Settings

    settings = Settings(tcp_keepalive=KeepAlive(idle=7, interval=3, probes=4, spread=0))
    proxy = Proxy(Router([]), OriginPool(EgressSet([])), settings)
    listener = Listener(proxy, ("127.0.0.1", 0))
    proxy.listeners.append(listener)
    listener.start()
    _reader, writer = await asyncio.open_connection(*listener.address)
    try:
        async with asyncio.timeout(5):
            while not proxy.clients:
                await asyncio.sleep(0.01)
        [client] = proxy.clients
        sock = client.transport.get_extra_info("socket")
        opts = {
            "nodelay": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
            "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            "probes": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        }
        assert opts == {"nodelay": 1, "keepalive": 1, "idle": 7, "interval": 3, "probes": 4}
        # a reload's new [tcp_keepalive] (here: off) reaches the clients accepted after it
        listener.set_keepalive(None)
        _r2, w2 = await asyncio.open_connection(*listener.address)
        async with asyncio.timeout(5):
            while len(proxy.clients) < 2:
                await asyncio.sleep(0.01)
        [second] = [c for c in proxy.clients if c is not client]
        sock = second.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        w2.close()
    finally:
        writer.close()
        listener.close()
