"""HTTP/2's abuse cases against the proxy, each with raw frames over a real socket.

A well-behaved client library refuses to send most of these, so the frames are built here
with hyperframe and hpack: too many concurrent streams, a header list past the limit, an
HPACK table larger than allowed, rapid reset (CVE-2023-44487), a CONTINUATION flood
(CVE-2024-27316), PING and SETTINGS floods, and streams or connections idle past
``[timeouts]``. Each ends in what the proxy promises (GOAWAY with the code named, a 408),
and none reaches the origin more than the rules allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

import pytest
from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from proxy import http2_guard
from proxy.choose import PREFACE
from proxy.server import Settings
from tests.test_http2 import Rig, close_rig, make_rig

ENHANCE_YOUR_CALM = 0xB
PROTOCOL_ERROR = 0x1


class Raw:
    """A client that writes whatever frames a test builds and parses what comes back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder = Encoder()
        self.frames: list[Frame] = []
        self.buf = b""
        self.eof = False
        self.sent = 0

    @classmethod
    async def open(cls, port: int) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        raw = cls(reader, writer)
        raw.send(PREFACE, SettingsFrame(0))
        return raw

    def send(self, *items: bytes | Frame) -> None:
        for item in items:
            data = item if isinstance(item, bytes) else item.serialize()
            self.sent += len(data)
            with contextlib.suppress(ConnectionError):
                self.writer.write(data)

    def headers(self, sid: int, path: str = "/hello", end: bool = True, **extra: str) -> Frame:
        frame = HeadersFrame(sid)
        fields = [(":method", "GET"), (":scheme", "http"), (":authority", "app.test")]
        frame.data = self.encoder.encode([*fields, (":path", path), *extra.items()])
        frame.flags.add("END_HEADERS")
        if end:
            frame.flags.add("END_STREAM")
        return frame

    async def until(self, check: object, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not check(self):  # type: ignore[operator]
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; last frames {self.frames[-3:]}"
            try:
                data = await asyncio.wait_for(self.reader.read(65536), left)
            except ConnectionError:
                data = b""
            if not data:
                self.eof = True
                return
            self.buf += data
            while len(self.buf) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
                if len(self.buf) < 9 + length:
                    break
                frame.parse_body(memoryview(self.buf[9 : 9 + length]))
                self.frames.append(frame)
                self.buf = self.buf[9 + length :]

    def goaway(self) -> GoAwayFrame | None:
        found = [f for f in self.frames if isinstance(f, GoAwayFrame)]
        return found[0] if found else None

    async def ended_with(self, code: int, timeout: float = 5.0) -> GoAwayFrame:
        await self.until(lambda r: r.goaway() is not None or r.eof, timeout)
        goaway = self.goaway()
        assert goaway is not None, "no GOAWAY"
        assert goaway.error_code == code, goaway
        await self.until(lambda r: r.eof, timeout)  # and the connection closes
        return goaway

    def close(self) -> None:
        self.writer.close()


def origin_requests(rig: Rig) -> int:
    return sum(len(c.requests) for c in rig.origin.connections)


@pytest.fixture
async def rig(ns):  # type: ignore[no-untyped-def]
    r = await make_rig()
    yield r
    await close_rig(r)


async def test_streams_past_max_concurrent_are_refused(rig: Rig) -> None:
    raw = await Raw.open(rig.port)
    for i in range(101):  # 100 allowed at once; /slow never answers, so all stay open
        raw.send(raw.headers(1 + 2 * i, "/slow"))
    await raw.ended_with(PROTOCOL_ERROR)  # h2: TooManyStreamsError, a connection error
    assert origin_requests(rig) <= 100
    raw.close()


async def test_a_header_list_past_the_limit_is_refused(ns) -> None:  # type: ignore[no-untyped-def]
    rig = await make_rig(Settings(max_header_bytes=8192))
    try:
        raw = await Raw.open(rig.port)
        raw.send(raw.headers(1, "/hello", **{"x-big": "a" * 9000}))
        goaway = await raw.ended_with(ENHANCE_YOUR_CALM)  # hpack's list size: a DoS error
        assert goaway.last_stream_id <= 1
        assert origin_requests(rig) == 0
        raw.close()
    finally:
        await close_rig(rig)


async def test_an_hpack_table_larger_than_allowed_is_refused(rig: Rig) -> None:
    raw = await Raw.open(rig.port)
    raw.encoder.header_table_size = 1 << 20  # announces a 1 MiB dynamic table
    raw.send(raw.headers(1, "/hello"))
    await raw.ended_with(PROTOCOL_ERROR)  # h2 names it so (RFC 7541 §4.2: a decoding error)
    assert origin_requests(rig) == 0
    raw.close()


async def test_rapid_reset_costs_little_and_ends_in_enhance_your_calm(rig: Rig) -> None:
    raw = await Raw.open(rig.port)
    started = time.monotonic()
    for i in range(2000):  # each stream opened and reset at once
        sid = 1 + 2 * i
        reset = RstStreamFrame(sid)
        reset.error_code = 8  # CANCEL
        raw.send(raw.headers(sid, "/hello"), reset)
        if raw.goaway() or raw.eof:
            break
        if i % 100 == 99:
            await raw.until(lambda r: True)  # let the proxy read; nothing to wait for
            await asyncio.sleep(0)
    await raw.ended_with(ENHANCE_YOUR_CALM, timeout=10)
    assert time.monotonic() - started < 10
    # a stream whose HEADERS and RST_STREAM came in one read never reached the pool
    assert origin_requests(rig) <= http2_guard.RESET_LIMIT
    raw.close()


async def test_a_continuation_flood_is_cut_off_bounded(rig: Rig) -> None:
    raw = await Raw.open(rig.port)
    first = HeadersFrame(1)
    first.data = raw.encoder.encode([(":method", "GET"), (":path", "/hello")])
    raw.send(first)  # no END_HEADERS: CONTINUATION frames must follow
    for _ in range(200):  # 200 x 16 KiB, far past 4 x max_header_bytes
        more = ContinuationFrame(1)
        more.data = b"\x00" * 16384
        raw.send(more)
        if raw.eof:
            break
        await asyncio.sleep(0)
    await raw.ended_with(ENHANCE_YOUR_CALM, timeout=10)
    assert origin_requests(rig) == 0
    raw.close()


@pytest.mark.parametrize("kind", ["ping", "settings"])
async def test_ping_and_settings_floods_end_in_enhance_your_calm(rig: Rig, kind: str) -> None:
    raw = await Raw.open(rig.port)
    limit = http2_guard.PING_LIMIT if kind == "ping" else http2_guard.SETTINGS_LIMIT
    for i in range(limit * 4):
        if kind == "ping":
            frame: Frame = PingFrame(0)
            frame.opaque_data = i.to_bytes(8, "big")
        else:
            frame = SettingsFrame(0, {SettingsFrame.INITIAL_WINDOW_SIZE: 65535 + i})
        raw.send(frame)
    await raw.ended_with(ENHANCE_YOUR_CALM)
    raw.close()


async def test_a_few_pings_are_answered(rig: Rig) -> None:
    """Below the limit a PING is an ordinary liveness check: answered, nothing ended."""
    raw = await Raw.open(rig.port)
    for i in range(5):
        ping = PingFrame(0)
        ping.opaque_data = i.to_bytes(8, "big")
        raw.send(ping)
    await raw.until(
        lambda r: sum(isinstance(f, PingFrame) and "ACK" in f.flags for f in r.frames) == 5
    )
    assert raw.goaway() is None
    raw.close()


async def test_a_stalled_request_body_and_an_idle_connection_time_out(ns) -> None:  # type: ignore[no-untyped-def]
    settings = dataclasses.replace(Settings(), body_idle_timeout=0.3, header_timeout=0.5)
    rig = await make_rig(settings)
    try:
        raw = await Raw.open(rig.port)
        raw.send(raw.headers(1, "/echo", end=False, **{"content-length": "10"}))
        body = DataFrame(1)
        body.data = b"12345"
        raw.send(body)  # half the body, then nothing
        await raw.until(
            lambda r: any(isinstance(f, HeadersFrame) and f.stream_id == 1 for f in r.frames)
        )
        [head] = [f for f in raw.frames if isinstance(f, HeadersFrame)]
        status = dict(Decoder().decode(head.data))[":status"]
        assert status == "408"
        # then nothing more on the connection: after header_timeout, GOAWAY NO_ERROR and close
        await raw.ended_with(0, timeout=5)
        raw.close()
    finally:
        await close_rig(rig)


async def test_a_client_that_opens_no_window_pauses_its_origin(rig: Rig) -> None:
    """Flow control toward the client: a stream whose client grants no window holds at most
    ~STREAM_HIGH bytes in the proxy; the origin connection stops being read, so a 64 MiB
    response is never buffered whole."""
    from proxy.http2 import H2Connection
    from proxy.http2_stream import STREAM_HIGH

    raw = await Raw.open(rig.port)
    raw.send(raw.headers(1, f"/big/{64 << 20}"))  # and never a WINDOW_UPDATE
    deadline = time.monotonic() + 10
    stream = None
    while True:
        assert time.monotonic() < deadline, "the origin was never paused"
        conns = [c for c in rig.proxy.clients if isinstance(c, H2Connection)]
        stream = conns[0].streams.get(1) if conns else None
        handler = stream.handler if stream is not None else None
        upstream = getattr(handler, "conn", None)
        if upstream is not None and not upstream.transport.is_reading():
            break
        await asyncio.sleep(0.01)
    held = len(stream.out)
    assert STREAM_HIGH < held < STREAM_HIGH + (1 << 20)
    await asyncio.sleep(0.3)  # paused stays paused: nothing more is read or held
    assert len(stream.out) == held and not upstream.transport.is_reading()
    raw.close()
