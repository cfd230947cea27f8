"""The exchange and the tunnel through the seam (proxy.stream), with in-memory doubles.

Why: the exchange must serve any client protocol, so it is tested here against a recording
ClientStream with no protocol under it, and the HTTP/1.1 connection against the same
exchange over memory transports: no sockets, no root, no origin process. The tunnel's
``end`` (the proxy ending one session with Close codes of its choosing) is tested the same
way, as are the exchange's state machine's tables.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import time
from collections.abc import Callable

import pytest

from proxy import tunnel as tunnel_mod
from proxy.exchange import Exchange
from proxy.exchange_state import (
    ABORTED,
    BODY,
    COMPLETE,
    CONNECTING,
    SENT,
    STREAMING,
    SWITCHED,
    TRANSITIONS,
    WAITING,
    State,
    StateError,
)
from proxy.testing import (
    MemoryTransport,
    RecordingStream,
    end_of_turn,
    memory_proxy,
    request_head,
    transport_of,
)


async def until(check: Callable[[], object], timeout: float = 2.0) -> None:
    """Poll ``check`` once per loop turn until true or the deadline (no sleeps as sync)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0)


RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


async def test_http1_connection_runs_an_exchange_over_memory_transports() -> None:
    proxy, pool, _ = memory_proxy()
    client = proxy.protocol()
    down = MemoryTransport(("127.0.0.9", 50000))
    client.connection_made(down)  # type: ignore[arg-type]
    client.data_received(b"GET /a HTTP/1.1\r\nHost: test.example\r\n\r\n")
    await until(lambda: pool.opened)
    conn = pool.opened[0]
    end_of_turn()
    sent = transport_of(conn).take()
    assert sent.startswith(b"GET /a HTTP/1.1\r\n")
    assert b"x-forwarded-for: 127.0.0.9" in sent.lower()
    conn.data_received(RESPONSE)
    end_of_turn()
    got = down.take()
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"hello")
    assert client.exchange is None and not client.closed  # kept alive for the next
    # the next request reuses the pooled connection, synchronously
    client.data_received(b"GET /b HTTP/1.1\r\nHost: test.example\r\n\r\n")
    end_of_turn()
    assert transport_of(conn).take().startswith(b"GET /b HTTP/1.1\r\n")
    assert len(pool.opened) == 1 and pool.stats()[0].reused == 1
    client.connection_lost(None)


async def start(stream: RecordingStream, head: object) -> Exchange:
    ex = Exchange(stream, head)  # type: ignore[arg-type]
    ex.start()
    pool = stream.proxy.pool
    await until(lambda: pool.opened)  # type: ignore[attr-defined]
    await until(lambda: ex.ready)
    return ex


async def test_exchange_speaks_only_to_its_client_stream() -> None:
    proxy, pool, _ = memory_proxy()
    stream = RecordingStream(proxy)
    ex = await start(stream, request_head(b"/x?y=1"))
    assert (ex.req, ex.resp) == (BODY, WAITING) and stream.delivered == 1
    ex.request_end()
    assert ex.req is SENT
    end_of_turn()
    assert transport_of(pool.opened[0]).take().startswith(b"GET /x?y=1 HTTP/1.1\r\n")
    ex.data_received(RESPONSE[:20])
    ex.data_received(RESPONSE[20:-2])
    assert ex.resp is STREAMING
    ex.data_received(RESPONSE[-2:])
    assert stream.names() == ["head", "body", "body", "end", "done"]
    assert stream.calls[0][1] == 200 and stream.calls[-1] == ("done", True)
    assert b"".join(c[1] for c in stream.calls if c[0] == "body") == b"hello"
    assert ex.resp is COMPLETE and ex.finished
    assert pool.stats()[0].idle == 1  # the connection went back to the pool


async def test_request_body_streams_to_the_origin_in_pieces() -> None:
    proxy, pool, _ = memory_proxy()
    stream = RecordingStream(proxy)
    head = request_head(b"/up", [(b"host", b"test.example")], b"POST", has_body=True)
    ex = await start(stream, head)
    assert ex.in_body
    for piece in (b"abc", b"defg"):
        ex.request_body(piece)
    ex.request_end()
    end_of_turn()
    sent = transport_of(pool.opened[0]).take()
    assert b"transfer-encoding: chunked" in sent.lower()
    assert sent.endswith(b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
    assert ex.sent == 7 and ex.req is SENT


async def test_origin_lost_mid_response_aborts_the_client_side() -> None:
    proxy, _, _ = memory_proxy()
    stream = RecordingStream(proxy)
    ex = await start(stream, request_head())
    ex.request_end()
    ex.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    ex.connection_lost(ConnectionResetError(104, "reset"))
    assert stream.names() == ["head", "body", "abort", "done"]
    assert stream.calls[-1] == ("done", False) and ex.resp is ABORTED


async def test_no_route_is_answered_by_the_stream() -> None:
    proxy, pool, _ = memory_proxy()
    stream = RecordingStream(proxy)
    ex = Exchange(stream, request_head(headers=[(b"host", b"elsewhere.example")]))
    ex.start()
    assert stream.calls == [("error", 421, "no route for this host")]
    assert ex.finished and not pool.opened


def test_state_tables_refuse_what_they_do_not_list() -> None:
    with pytest.raises(StateError) as err:
        COMPLETE.after("head")
    assert "response: no transition from complete on 'head'" in str(err.value)
    with pytest.raises(StateError):
        CONNECTING.after("end")  # no body flows before the origin is attached
    with pytest.raises(StateError):
        SWITCHED.after("gone")  # the tunnel owns the connections now
    # every table row is reachable through ``after`` and nothing else is
    for state, event, nxt in TRANSITIONS:
        assert state.after(event) is nxt
    states = {s for s, _, _ in TRANSITIONS} | {n for _, _, n in TRANSITIONS}
    assert sum(len(s.on) for s in states) == len(TRANSITIONS)
    assert all(isinstance(s, State) for s in states)


# -- the tunnel through a ClientPipe ------------------------------------------------------------

KEY = base64.b64encode(b"0123456789abcdef")
ACCEPT = base64.b64encode(hashlib.sha1(KEY + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
UPGRADE = [
    (b"host", b"test.example"),
    (b"upgrade", b"websocket"),
    (b"connection", b"Upgrade"),
    (b"sec-websocket-key", KEY),
    (b"sec-websocket-version", b"13"),
]


def close_code(frame: bytes) -> int:
    """The status code of one Close frame, masked or not."""
    assert frame[0] == 0x88, frame
    length = frame[1] & 0x7F
    if frame[1] & 0x80:
        mask, payload = frame[2:6], frame[6 : 6 + length]
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    else:
        payload = frame[2 : 2 + length]
    return int(struct.unpack("!H", payload[:2])[0])


async def open_session() -> tuple[RecordingStream, object, MemoryTransport]:
    proxy, pool, origin = memory_proxy()
    stream = RecordingStream(proxy)
    ex = await start(stream, request_head(b"/ws", UPGRADE))
    ex.request_end()
    end_of_turn()
    up = transport_of(pool.opened[0])
    assert up.take().lower().count(b"sec-websocket-key") == 1
    ex.data_received(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\n\r\n"
    )
    assert ex.resp is SWITCHED and stream.names()[-1] == "upgrade"
    assert stream.pipe is not None and stream.pipe.tunnel is not None
    return stream, origin, up


async def test_tunnel_relays_over_a_client_pipe() -> None:
    stream, origin, up = await open_session()
    pipe = stream.pipe
    assert pipe is not None and pipe.tunnel is not None
    text = b"\x81\x02hi"  # origin -> client, unmasked
    pipe.tunnel.data_received(text)
    assert pipe.take() == text
    masked = b"\x81\x82abcd" + bytes(c ^ m for c, m in zip(b"yo", b"ab", strict=True))
    pipe.tunnel.tunnel_to_origin(masked)
    assert up.take() == masked
    assert stream.proxy.tunnels(origin) == [pipe.tunnel]


async def test_tunnel_end_sends_the_chosen_close_codes_and_ends() -> None:
    stream, origin, up = await open_session()
    pipe = stream.pipe
    assert pipe is not None and pipe.tunnel is not None
    tunnel = pipe.tunnel
    tunnel.end(client_code=1012, origin_code=1001, reason="origin draining")
    end_of_turn()
    assert close_code(pipe.take()) == 1012
    assert close_code(up.take()) == 1001
    assert tunnel.stopping and not tunnel.finished  # the peers answer, then it ends
    tunnel.client_gone()  # the client answered and closed
    assert tunnel.finished and pipe.closed
    assert stream.proxy.tunnels(origin) == []


async def test_tunnel_end_is_bounded_when_no_peer_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tunnel_mod, "ORIGIN_CLOSE_WAIT", 0.05)
    stream, origin, up = await open_session()
    pipe = stream.pipe
    assert pipe is not None and pipe.tunnel is not None
    tunnel = pipe.tunnel
    tunnel.end(1012, 1001, "origin draining")
    await until(lambda: tunnel.finished, timeout=5)
    assert pipe.closed
    await until(lambda: up.closed, timeout=5)  # the origin had its wait too, then was cut off
    assert stream.proxy.tunnels(origin) == [] and stream.proxy.stats.ws_active == 0
