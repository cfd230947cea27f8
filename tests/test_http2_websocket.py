"""WebSocket over HTTP/2 (RFC 8441) through the proxy, to an HTTP/1.1 WebSocket origin.

An extended CONNECT (``:protocol websocket``) becomes an HTTP/1.1 Upgrade on a pool lease
with a fresh Sec-WebSocket-Key; the origin's 101, checked against that key, is a 200 on the
stream; DATA frames carry the session both ways; the proxy's own Close codes (1001 on
shutdown) reach the client in DATA as on HTTP/1.1. Real sockets, in a namespace; the client
is h2's client state machine with wsproto's frame codec.
"""

from __future__ import annotations

import asyncio

import h2.events
import h2.settings
import pytest
from websockets.asyncio.server import serve
from wsproto.connection import CloseReason
from wsproto.frame_protocol import FrameProtocol, Opcode

from pool.egress import EgressSet
from pool.origin import Origin, OriginPool, PoolLimits
from proxy.routing import Route, Router
from proxy.server import Listener, Proxy, Settings
from tests.test_http2 import H2Client

O1 = ("127.0.2.1", 9000)


async def echo(ws) -> None:  # type: ignore[no-untyped-def]
    async for message in ws:
        await ws.send(message)


@pytest.fixture
async def proxy_port(ns):  # type: ignore[no-untyped-def]
    async with serve(echo, *O1):
        route = Route("app.test", "/", [(Origin("http", *O1), 1)])
        proxy = Proxy(
            Router([route]), OriginPool(EgressSet(["127.0.1.1"]), PoolLimits()), Settings()
        )
        listener = Listener(proxy, ("127.0.0.1", 0))
        proxy.listeners.append(listener)
        listener.start()
        yield proxy, int(listener.address[1])
        listener.close()
        for client in list(proxy.clients):
            client.abort()
        await proxy.pool.close()


def frames_of(codec: FrameProtocol, data: bytes) -> list:
    codec.receive_bytes(data)
    return list(codec.received_frames())


async def open_session(port: int) -> tuple[H2Client, int]:
    client = await H2Client.open(port)
    await client.read(
        lambda c: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in c.events)
    )
    settings = client.conn.remote_settings
    assert settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL] == 1
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(
        sid,
        [
            (b":method", b"CONNECT"),
            (b":protocol", b"websocket"),
            (b":scheme", b"http"),
            (b":path", b"/chat"),
            (b":authority", b"app.test"),
            (b"sec-websocket-version", b"13"),
        ],
    )
    client.flush()
    await client.read(lambda c: c.of(sid, h2.events.ResponseReceived) or c.ended(sid))
    return client, sid


async def round_trip(client: H2Client, sid: int, codec: FrameProtocol, text: str) -> list:
    """Send one text message, return the frames that come back (the echo)."""
    client.events.clear()
    await client.send_all(sid, codec.send_data(text, fin=True))
    server = FrameProtocol(client=True, extensions=[])
    got: list = []

    def whole(c: H2Client) -> bool:
        got.extend(frames_of(server, received(c, sid)))
        c.events.clear()
        return bool(got) and got[-1].frame_finished and got[-1].message_finished

    await client.read(whole)
    return got


def received(client: H2Client, sid: int) -> bytes:
    return b"".join(e.data for e in client.of(sid, h2.events.DataReceived))


async def test_extended_connect_echoes_through_the_proxy(proxy_port) -> None:  # type: ignore[no-untyped-def]
    proxy, port = proxy_port
    client, sid = await open_session(port)
    head, _ = client.response(sid)
    assert head[b":status"] == b"200" and b"sec-websocket-accept" not in head
    codec = FrameProtocol(client=True, extensions=[])
    for text in ("hello", "x" * 70000):  # one small, one past a DATA frame and the window
        got = await round_trip(client, sid, codec, text)
        assert got[0].opcode is Opcode.TEXT and "".join(f.payload for f in got) == text
    assert len(proxy.tunnels()) == 1
    # the client closes: its Close goes through, the origin answers, the stream ends
    client.events.clear()
    client.conn.send_data(sid, codec.close(code=CloseReason.NORMAL_CLOSURE, reason=""))
    client.flush()
    await client.read(lambda c: c.of(sid, h2.events.StreamEnded) or c.closed, timeout=10)
    closes = [f for f in frames_of(FrameProtocol(True, []), received(client, sid))]
    assert closes and closes[0].opcode is Opcode.CLOSE
    assert not proxy.tunnels()[0].finished  # the client's side is still open, as a TCP's
    client.conn.end_stream(sid)  # what a client does after the Close handshake (its FIN)
    client.flush()
    await _until(lambda: not proxy.tunnels())
    client.close()


async def test_shutdown_sends_close_1001_on_the_stream(proxy_port) -> None:  # type: ignore[no-untyped-def]
    proxy, port = proxy_port
    client, sid = await open_session(port)
    client.events.clear()
    [tunnel] = proxy.tunnels()
    tunnel.shutdown()
    await client.read(lambda c: bool(received(c, sid)))
    [frame] = frames_of(FrameProtocol(True, []), received(client, sid))
    assert frame.opcode is Opcode.CLOSE and frame.payload[0] == 1001
    client.close()


async def test_a_plain_connect_is_refused_on_the_stream(proxy_port) -> None:  # type: ignore[no-untyped-def]
    _proxy, port = proxy_port
    client = await H2Client.open(port)
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"app.test:443")])
    client.flush()
    await client.read(lambda c: c.ended(sid))
    head, body = client.response(sid)
    assert head[b":status"] == b"501" and b"CONNECT" in body
    # the connection stays usable
    head, _ = await client.get("/")
    assert head[b":status"] in (b"200", b"426", b"400", b"404")
    client.close()


async def _until(check, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline
        await asyncio.sleep(0.01)


async def test_an_origin_that_fails_mid_session_is_close_1011_on_the_stream(ns) -> None:  # type: ignore[no-untyped-def]
    async def dies(ws) -> None:  # type: ignore[no-untyped-def]
        await ws.recv()
        ws.transport.abort()  # no Close frame: the origin failed

    async with serve(dies, *O1):
        route = Route("app.test", "/", [(Origin("http", *O1), 1)])
        pool = OriginPool(EgressSet(["127.0.1.1"]), PoolLimits())
        proxy = Proxy(Router([route]), pool, Settings())
        listener = Listener(proxy, ("127.0.0.1", 0))
        proxy.listeners.append(listener)
        listener.start()
        try:
            client, sid = await open_session(int(listener.address[1]))
            client.events.clear()
            await client.send_all(sid, FrameProtocol(True, []).send_data("bye", fin=True))
            await client.read(lambda c: c.ended(sid), timeout=10)
            [frame] = frames_of(FrameProtocol(True, []), received(client, sid))
            assert frame.opcode is Opcode.CLOSE and frame.payload[0] == 1011
            await _until(lambda: not proxy.tunnels())
            client.close()
        finally:
            listener.close()
            await pool.close()
