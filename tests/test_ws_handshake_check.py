"""The WebSocket opening handshake as the proxy checks it, end to end on raw sockets, on both
codecs and both header-rewrite implementations.

A 101 is the one answer after which the proxy stops reading HTTP on a connection: whatever
the client sends next goes to that origin unrouted. So the proxy believes a 101 only when it
is a valid answer to the upgrade it forwarded (RFC 6455 §4.1, where the proxy is the
origin's client): otherwise the client gets a 502, the upstream connection is closed, and
the client's next request can never reach that origin as tunnel bytes (the WebSocket
smuggling of 0ang3el/websocket-smuggle). And the proxy refuses, before any origin is
contacted, an upgrade request that is no valid client handshake (RFC 6455 §4.2.1, §4.4).

The origins here are raw: they answer a scripted head and record every byte they receive,
so a test asserts what actually arrived, not what the proxy meant to send.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from wsproto.frame_protocol import FrameProtocol

from pool.egress import EgressSet
from pool.origin import Origin, OriginPool, PoolLimits
from proxy.routing import Route, Router
from proxy.server import Listener, Proxy, Settings
from proxy.websocket import ClientFrames, FrameTracker, OriginFrames

A = ("127.0.2.1", 9000)  # routes "/"
B = ("127.0.2.2", 9000)  # routes "/internal/"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3's sample nonce
WAIT = 10.0  # seconds any single step may take before the test fails

# on the compiled header rewrite (proxy._headers) and again on the pure one
pytestmark = pytest.mark.usefixtures("whole_impl")


def accept_for(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


# -- a raw origin ------------------------------------------------------------------------------


@dataclass
class Seen:
    """One connection as the origin saw it: every byte, and whether the peer closed it."""

    data: bytearray = field(default_factory=bytearray)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class RawOrigin:
    """Answers each request head with ``answer(head)``; after a 101 it only records."""

    def __init__(self, answer: Callable[[bytes], bytes]) -> None:
        self.answer = answer
        self.seen: list[Seen] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port)

    def close_connections(self) -> None:
        for w in self._writers:
            w.close()

    async def close(self) -> None:
        for w in self._writers:
            w.close()
        for s in self.seen:  # each handler ends at its connection's loss
            await asyncio.wait_for(s.closed.wait(), WAIT)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = Seen()
        self.seen.append(seen)
        self._writers.append(writer)
        buf = b""
        switched = False
        try:
            while chunk := await reader.read(65536):
                seen.data += chunk
                if switched:
                    continue
                buf += chunk
                while not switched and (end := buf.find(b"\r\n\r\n")) >= 0:
                    head, buf = buf[: end + 4], buf[end + 4 :]
                    out = self.answer(head)
                    writer.write(out)
                    switched = out.startswith(b"HTTP/1.1 101")
        except ConnectionError:
            pass
        finally:
            seen.closed.set()

    def received(self) -> bytes:
        return b"".join(bytes(s.data) for s in self.seen)


def key_of(head: bytes) -> bytes:
    m = re.search(rb"(?im)^sec-websocket-key:[ \t]*(\S*)", head)
    return m[1] if m else b""


def ok_200(head: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# -- the rig -----------------------------------------------------------------------------------


@pytest.fixture(params=["httptools", "h11"])
def parser(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.param


class Rig:
    def __init__(self, listener: Listener, a: RawOrigin, b: RawOrigin) -> None:
        self.listener = listener
        self.a = a
        self.b = b

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(*self.listener.address)


@pytest.fixture
def answer() -> list[Callable[[bytes], bytes]]:
    """Origin A's answer, set by each test before it sends (a list: the rig reads it late)."""
    return [ok_200]


@pytest.fixture
async def rig(ns, parser, answer) -> AsyncIterator[Rig]:
    a = RawOrigin(lambda head: answer[0](head))
    b = RawOrigin(ok_200)
    await a.start(*A)
    await b.start(*B)
    routes = [
        Route("app.test", "/", [(Origin("http", *A), 1)]),
        Route("app.test", "/internal/", [(Origin("http", *B), 1)]),
    ]
    pool = OriginPool(EgressSet(["127.0.1.1"]), PoolLimits())
    proxy = Proxy(Router(routes), pool, Settings(http_parser=parser))
    listener = Listener(proxy, ("127.0.0.1", 0))
    proxy.listeners.append(listener)
    listener.start()
    yield Rig(listener, a, b)
    listener.close()
    await pool.close()
    await a.close()
    await b.close()


def upgrade(extra: bytes = b"", *, key: bytes = KEY, version: bytes = b"13") -> bytes:
    return (
        b"GET /chat HTTP/1.1\r\nHost: app.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: "
        + key
        + b"\r\nSec-WebSocket-Version: "
        + version
        + b"\r\n"
        + extra
        + b"\r\n"
    )


SMUGGLED = b"GET /internal/flag HTTP/1.1\r\nHost: app.test\r\n\r\n"


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    with contextlib.suppress(ConnectionError):
        return await asyncio.wait_for(reader.read(-1), WAIT)
    return b""


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def header(head: bytes, name: bytes) -> list[bytes]:
    return re.findall(rb"(?im)^" + name + rb":[ \t]*(.*?)[ \t]*\r$", head)


# -- the origin's 101: every missing or wrong piece is a 502 --------------------------------

OFFER = b"Sec-WebSocket-Protocol: chat.v1, chat.v2\r\nSec-WebSocket-Extensions: x-offered\r\n"


def forged(lines: bytes, *, key_from: bytes | None = None) -> Callable[[bytes], bytes]:
    """A 101 with ``lines``; ``{accept}`` in them becomes the Accept for the request's key
    (or for ``key_from``'s, to forge a wrong one)."""

    def answer(head: bytes) -> bytes:
        accept = accept_for(key_from if key_from is not None else key_of(head))
        return (
            b"HTTP/1.1 101 Switching Protocols\r\n" + lines.replace(b"{accept}", accept) + b"\r\n"
        )

    return answer


UP = b"Upgrade: websocket\r\n"
CONN = b"Connection: Upgrade\r\n"
ACC = b"Sec-WebSocket-Accept: {accept}\r\n"

BAD_101 = {
    # name: (what the client offers, the origin's 101 header lines, the check named in the log)
    "bare": (b"", b"", "upgrade"),
    "no-upgrade": (b"", CONN + ACC, "upgrade"),
    "upgrade-other": (b"", b"Upgrade: h2c\r\n" + CONN + ACC, "upgrade"),
    "upgrade-list": (b"", b"Upgrade: websocket, h2c\r\n" + CONN + ACC, "upgrade"),
    "upgrade-twice": (b"", UP + UP + CONN + ACC, "upgrade"),
    "no-connection": (b"", UP + ACC, "connection"),
    "connection-no-upgrade-token": (b"", UP + b"Connection: keep-alive\r\n" + ACC, "connection"),
    "connection-upgrade-substring": (b"", UP + b"Connection: upgraded\r\n" + ACC, "connection"),
    "no-accept": (b"", UP + CONN, "accept"),
    "empty-accept": (b"", UP + CONN + b"Sec-WebSocket-Accept:\r\n", "accept"),
    "accept-twice": (b"", UP + CONN + ACC + ACC, "accept"),
    # Connection names it: hop-by-hop, so the client would never get it (RFC 9110 §7.6.1)
    "accept-hop-by-hop": (
        b"",
        UP + b"Connection: Upgrade, Sec-WebSocket-Accept\r\n" + ACC,
        "accept",
    ),
    "wrong-accept": (
        b"",
        UP + CONN + b"Sec-WebSocket-Accept: " + accept_for(b"x" * 24) + b"\r\n",
        "accept",
    ),
    "extension-not-offered": (
        OFFER,
        UP + CONN + ACC + b"Sec-WebSocket-Extensions: permessage-deflate\r\n",
        "extensions",
    ),
    "extension-none-offered": (
        b"",
        UP + CONN + ACC + b"Sec-WebSocket-Extensions: x-offered\r\n",
        "extensions",
    ),
    "subprotocol-not-offered": (
        OFFER,
        UP + CONN + ACC + b"Sec-WebSocket-Protocol: chat.v3\r\n",
        "protocol",
    ),
    "subprotocol-two": (
        OFFER,
        UP + CONN + ACC + b"Sec-WebSocket-Protocol: chat.v1, chat.v2\r\n",
        "protocol",
    ),
    "subprotocol-none-offered": (
        b"",
        UP + CONN + ACC + b"Sec-WebSocket-Protocol: chat.v1\r\n",
        "protocol",
    ),
}


@pytest.mark.parametrize("case", list(BAD_101))
async def test_an_invalid_101_is_a_502_and_closes_the_upstream(rig, answer, case):
    offer, lines, check = BAD_101[case]
    answer[0] = forged(lines)
    with capture_logs() as logs:
        reader, writer = await rig.open()
        writer.write(upgrade(offer))
        head = await read_head(reader)
        assert head.startswith(b"HTTP/1.1 502 "), head
        rest = await read_to_eof(reader)  # the proxy's error answer closes the connection
        writer.close()
        await until(lambda: bool(rig.a.seen) and rig.a.seen[0].closed.is_set(), "A's close")
    assert b"101" not in head + rest
    assert len(rig.a.seen) == 1  # one connection, closed by the proxy: never reused
    errors = [e for e in logs if e["event"] == "upstream_error"]
    assert len(errors) == 1, errors
    assert f"({check})" in errors[0]["error"], errors[0]
    access = [e for e in logs if e["event"] == "access"]
    assert [e["status"] for e in access] == [502]
    assert not [e for e in logs if e["event"] == "websocket_session"]


@pytest.mark.parametrize("pipelined", [False, True], ids=["after-answer", "pipelined"])
async def test_a_forged_101_smuggles_no_request_to_its_origin(rig, answer, pipelined):
    """The issue's attack: routes / -> A and /internal/ -> B, A answers a bare 101, and the
    client's next request must reach neither A (as tunnel bytes) nor anyone else."""
    answer[0] = forged(b"")  # "HTTP/1.1 101 Switching Protocols\r\n\r\n", nothing more
    reader, writer = await rig.open()
    writer.write(upgrade() + (SMUGGLED if pipelined else b""))
    head = await read_head(reader)
    assert head.startswith(b"HTTP/1.1 502 "), head
    if not pipelined:
        with contextlib.suppress(ConnectionError):
            writer.write(SMUGGLED)
            await writer.drain()
    rest = await read_to_eof(reader)
    writer.close()
    await until(lambda: bool(rig.a.seen) and rig.a.seen[0].closed.is_set(), "A's close")
    assert b"HTTP/1.1 101" not in head + rest
    assert rig.a.received() == upgrade_as_forwarded(rig.a.received())
    assert b"/internal/flag" not in rig.a.received()
    assert rig.b.received() == b""


def upgrade_as_forwarded(got: bytes) -> bytes:
    """What A may have received: one request head for /chat and nothing after it."""
    assert got.startswith(b"GET /chat HTTP/1.1\r\n"), got
    assert got.count(b"\r\n\r\n") == 1 and got.endswith(b"\r\n\r\n"), got
    return got


# -- the valid 101s still open a tunnel, with the origin's own head -------------------------

GOOD_101 = {
    # name: (what the client offers, the origin's status line, its 101 header lines)
    "minimal": (b"", b"HTTP/1.1 101 Switching Protocols", UP + CONN + ACC),
    "own-reason": (b"", b"HTTP/1.1 101 Web Socket Protocol Handshake", UP + CONN + ACC),
    "cases-and-lists": (
        b"",
        b"HTTP/1.1 101 Switching Protocols",
        b"upgrade: WebSocket\r\nconnection: keep-alive, UPGRADE\r\n" + ACC,
    ),
    "offered-extension-and-subprotocol": (
        OFFER,
        b"HTTP/1.1 101 Switching Protocols",
        UP + CONN + ACC + b"Sec-WebSocket-Extensions: x-offered; level=2\r\n"
        b"Sec-WebSocket-Protocol: chat.v2\r\n",
    ),
}


@pytest.mark.parametrize("case", list(GOOD_101))
async def test_a_valid_101_opens_a_tunnel_with_the_origins_head(rig, answer, case):
    offer, status_line, lines = GOOD_101[case]

    def answer_101(head: bytes) -> bytes:
        return (
            status_line + b"\r\n" + lines.replace(b"{accept}", accept_for(key_of(head))) + b"\r\n"
        )

    answer[0] = answer_101
    reader, writer = await rig.open()
    writer.write(upgrade(offer))
    head = await read_head(reader)
    assert head.startswith(status_line + b"\r\n"), head  # the origin's reason phrase
    assert header(head, b"sec-websocket-accept") == [accept_for(KEY)]
    for name in (b"sec-websocket-protocol", b"sec-websocket-extensions"):
        sent = re.search(rb"(?im)^" + name + rb":[ \t]*(.*?)\r$", lines)
        assert header(head, name) == ([sent[1]] if sent else [])
    # nothing the origin did not send, but this hop's Connection/Upgrade pair and Via
    names = sorted(n.lower() for n in re.findall(rb"(?m)^([^:\r\n]+):", head))
    theirs = [n.lower() for n in re.findall(rb"(?m)^([^:\r\n]+):", lines)]
    hop = (b"connection", b"upgrade")
    assert names == sorted([*(n for n in theirs if n not in hop), *hop, b"via"]), head
    assert header(head, b"connection") == [b"upgrade"]
    assert header(head, b"upgrade") == [b"websocket"]
    frame = FrameProtocol(client=True, extensions=[]).send_data(b"hello", fin=True)
    writer.write(frame)
    await until(lambda: rig.a.received().endswith(frame), "the frame at A")
    writer.close()


# -- the client's handshake: refused before any origin is contacted -------------------------

BAD_REQUEST = {
    # name: (request bytes, status, header expected in the answer)
    "no-key": (upgrade().replace(b"Sec-WebSocket-Key: " + KEY + b"\r\n", b""), 400, None),
    "key-not-base64": (upgrade(key=b"not base64 at all!!!!!=="), 400, None),
    "key-15-bytes": (upgrade(key=base64.b64encode(b"x" * 15)), 400, None),
    "key-17-bytes": (upgrade(key=base64.b64encode(b"x" * 17)), 400, None),
    "key-twice": (upgrade(b"Sec-WebSocket-Key: " + KEY + b"\r\n"), 400, None),
    "key-hop-by-hop": (  # Connection names it: the origin would never get it
        upgrade().replace(b"Connection: Upgrade", b"Connection: Upgrade, Sec-WebSocket-Key"),
        400,
        None,
    ),
    "no-version": (upgrade().replace(b"Sec-WebSocket-Version: 13\r\n", b""), 400, None),
    "version-8": (upgrade(version=b"8"), 426, (b"sec-websocket-version", b"13")),
    "version-list": (upgrade(version=b"13, 8"), 426, (b"sec-websocket-version", b"13")),
    "post": (upgrade().replace(b"GET ", b"POST ", 1), 400, None),
    "http-1.0": (upgrade().replace(b"HTTP/1.1\r\n", b"HTTP/1.0\r\n", 1), 400, None),
}


@pytest.mark.parametrize("case", list(BAD_REQUEST))
async def test_an_invalid_client_handshake_never_reaches_the_origin(rig, answer, case):
    request, status, expected = BAD_REQUEST[case]
    answer[0] = forged(UP + b"Connection: Upgrade\r\n")  # the origin: no Accept
    reader, writer = await rig.open()
    writer.write(request)
    head = await read_head(reader)
    assert head.startswith(b"HTTP/1.1 %d " % status), head
    await read_to_eof(reader)
    writer.close()
    if expected is not None:
        assert header(head, expected[0]) == [expected[1]]
    assert rig.a.seen == []  # no origin connection at all


# -- the tunnel's frame tracker reports only codes that came in a Close frame ---------------

HTTP_AS_FRAMES = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"  # "HT": a Close, "TP" 21584


def close_bytes(code: int, *, client: bool) -> bytes:
    return FrameProtocol(client=client, extensions=[]).close(code=code, reason="bye")


@pytest.mark.parametrize(
    ("tracker", "stream"),
    [
        (FrameTracker, HTTP_AS_FRAMES),
        (OriginFrames, HTTP_AS_FRAMES),
        (ClientFrames, SMUGGLED),
        (FrameTracker, b"\x08\x02\x03\xe8"),  # a Close without FIN: control frames are whole
        (FrameTracker, b"\x88\x7e\x00\x7e" + b"\x03\xe8" + b"x" * 124),  # 126 bytes: too long
        (FrameTracker, b"\x88\x01\x03"),  # one byte: no room for a code
        (OriginFrames, close_bytes(1000, client=True)),  # masked, from the origin
        (ClientFrames, close_bytes(1000, client=False)),  # unmasked, from the client
    ],
    ids=[
        "http-response",
        "http-response-origin",
        "http-request-client",
        "fragmented-close",
        "long-close",
        "one-byte-close",
        "masked-from-origin",
        "unmasked-from-client",
    ],
)
def test_the_tracker_reports_no_close_it_did_not_see(tracker, stream):
    t = tracker()
    for i in range(len(stream)):  # byte by byte: no split may make it see a Close
        t.feed(stream[i : i + 1])
    t.feed(close_bytes(1000, client=tracker is ClientFrames))  # a real Close after: too late
    assert t.lost and not t.at_boundary
    assert not t.closed and t.close_code is None


@settings(max_examples=300, deadline=None)
@given(
    tracker=st.sampled_from([FrameTracker, ClientFrames, OriginFrames]),
    text=st.binary(max_size=2000).map(lambda b: bytes(c & 0x7F for c in b)),
    cuts=st.lists(st.integers(min_value=1, max_value=64), max_size=20),
)
def test_ascii_never_holds_a_close_the_tracker_reports(tracker, text, cuts):
    """HTTP heads are ASCII, and no ASCII byte has the FIN bit a Close frame needs: however
    an HTTP message falls into a tunnel, and however it is split, no Close code comes of it."""
    t = tracker()
    pos = 0
    for cut in cuts:
        t.feed(text[pos : pos + cut])
        pos += cut
    t.feed(text[pos:])
    assert not t.closed and t.close_code is None


@pytest.mark.parametrize("tracker", [ClientFrames, OriginFrames])
def test_each_direction_still_reports_its_close(tracker):
    t = tracker()
    t.feed(close_bytes(4001, client=tracker is ClientFrames))
    assert t.closed and t.close_code == 4001 and t.at_boundary and not t.lost


async def test_an_http_answer_in_a_tunnel_is_logged_with_no_close_code(rig, answer):
    """After a valid 101 the origin sends an HTTP response and closes: the session line
    must not turn "TP" into close code 21584, nor claim a Close 1011 the proxy could not
    send in the middle of what it took for a frame."""
    answer[0] = lambda head: forged(UP + CONN + ACC)(head) + HTTP_AS_FRAMES
    with capture_logs() as logs:
        reader, writer = await rig.open()
        writer.write(upgrade())
        head = await read_head(reader)
        assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), head
        await until(lambda: bool(rig.a.seen), "A's connection")
        rig.a.close_connections()
        rest = await read_to_eof(reader)
        writer.close()
        await until(lambda: any(e["event"] == "websocket_session" for e in logs), "the log")
    assert rest == HTTP_AS_FRAMES  # relayed as it came, and no Close frame of the proxy's
    [session] = [e for e in logs if e["event"] == "websocket_session"]
    assert session["closed_by"] == "origin"
    assert session["close_code"] is None, session
