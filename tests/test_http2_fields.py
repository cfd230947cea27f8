"""RFC 9113 §8.1-8.3 checks of a request's header block, done by the proxy, not by h2.

Why: h2's inbound validation (seven generators over every field) was turned off for its cost
(README, "HTTP/2"), so everything it refused must be refused by
:func:`proxy.http2_head.request_head` and :func:`proxy.http2_head.check_trailers`: first on
the function, case by case, then on the wire, where a malformed block costs its stream
(RST_STREAM PROTOCOL_ERROR), never the origin a request, and the connection's other streams
go on.
"""

from __future__ import annotations

import pytest
from hyperframe.frame import DataFrame, HeadersFrame, RstStreamFrame

from proxy import http2_guard
from proxy.http1 import ProtocolError
from proxy.http2_head import Malformed, check_trailers, request_head
from tests.test_http2 import Rig, close_rig, make_rig
from tests.test_http2_hardening import ENHANCE_YOUR_CALM, Raw, origin_requests

PROTOCOL_ERROR = 0x1
BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"app.test")]
GOOD = [*BASE, (b":path", b"/hello"), (b"accept", b"*/*")]

# each: a header block h2's validation refused (a connection error there, a stream error here)
MALFORMED: dict[str, list[tuple[bytes, bytes]]] = {
    "uppercase name": [*GOOD, (b"Accept", b"x")],
    "space in name": [*GOOD, (b"x y", b"1")],
    "colon in a regular name": [*GOOD, (b"x:y", b"1")],
    "byte past 0x7e in name": [*GOOD, (b"x\xe9", b"1")],
    "empty name": [*GOOD, (b"", b"1")],
    "NUL in value": [*GOOD, (b"x-a", b"a\x00b")],
    "CR LF in value": [*GOOD, (b"x-a", b"a\r\nx-injected: 1")],
    "LF in a pseudo-header": [*BASE, (b":path", b"/a\nb")],
    "leading space in value": [*GOOD, (b"x-a", b" a")],
    "trailing tab in value": [*GOOD, (b"x-a", b"a\t")],
    "connection": [*GOOD, (b"connection", b"keep-alive")],
    "keep-alive": [*GOOD, (b"keep-alive", b"5")],
    "proxy-connection": [*GOOD, (b"proxy-connection", b"close")],
    "transfer-encoding": [*GOOD, (b"transfer-encoding", b"chunked")],
    "upgrade": [*GOOD, (b"upgrade", b"websocket")],
    "te other than trailers": [*GOOD, (b"te", b"gzip")],
    "pseudo-header after a regular one": [*BASE, (b"accept", b"*/*"), (b":path", b"/")],
    "repeated pseudo-header": [*GOOD[:3], (b":path", b"/a"), (b":path", b"/b")],
    "unknown pseudo-header": [*BASE, (b":path", b"/"), (b":x", b"1")],
    ":status in a request": [*BASE, (b":path", b"/"), (b":status", b"200")],
    "no :method": [*GOOD[1:]],
    "no :path": [*BASE],
    "no :scheme": [GOOD[0], *GOOD[2:]],
    "empty :path": [*BASE, (b":path", b"")],
    ":protocol without CONNECT": [*GOOD[:4], (b":protocol", b"websocket")],
    "CONNECT with :path but no :protocol": [
        (b":method", b"CONNECT"),
        (b":authority", b"app.test:443"),
        (b":path", b"/"),
    ],
    "no :authority and no Host": [GOOD[0], GOOD[1], GOOD[3]],
    "two Hosts": [GOOD[0], GOOD[1], GOOD[3], (b"host", b"a.test"), (b"host", b"b.test")],
    "Host other than :authority": [*GOOD, (b"host", b"other.test")],
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_what_h2_refused_is_malformed_here(case: str) -> None:
    with pytest.raises(Malformed):
        request_head(MALFORMED[case], True)


def test_well_formed_blocks_pass() -> None:
    head = request_head(
        [*GOOD, (b"te", b"Trailers"), (b"cookie", b"a=1"), (b"cookie", b"b=2")], True
    )
    assert head.method == b"GET" and head.target == b"/hello"
    assert head.headers[0] == (b"host", b"app.test")
    assert (b"cookie", b"a=1; b=2") in head.headers and (b"te", b"Trailers") in head.headers
    # a Host equal to :authority, an empty value and HTAB inside one are allowed (§8.2.1)
    request_head([*GOOD, (b"host", b"app.test"), (b"x-e", b""), (b"x-t", b"a\tb")], True)
    # Host alone stands for :authority (§8.3.1)
    assert request_head([GOOD[0], GOOD[1], GOOD[3], (b"host", b"h.test")], True).headers[0] == (
        b"host",
        b"h.test",
    )
    # an ordinary CONNECT is well formed: answered 501, not reset
    with pytest.raises(ProtocolError) as e:
        request_head([(b":method", b"CONNECT"), (b":authority", b"app.test:443")], True)
    assert e.value.status == 501
    ws = [(b":method", b"CONNECT"), (b":protocol", b"websocket"), *GOOD[1:4]]
    assert request_head(ws, True).method == b"GET"


def test_trailers_take_regular_fields_only() -> None:
    check_trailers([(b"x-checksum", b"abc")])
    for bad in ([(b":path", b"/")], [(b"X-Sum", b"1")], [(b"x-sum", b"1\r\n")]):
        with pytest.raises(Malformed):
            check_trailers(bad)


def block(raw: Raw, sid: int, fields: list[tuple[bytes, bytes]], end: bool = True) -> HeadersFrame:
    frame = HeadersFrame(sid)
    frame.data = raw.encoder.encode(fields)
    frame.flags.add("END_HEADERS")
    if end:
        frame.flags.add("END_STREAM")
    return frame


def reset_code(raw: Raw, sid: int) -> int | None:
    found = [
        f.error_code for f in raw.frames if isinstance(f, RstStreamFrame) and f.stream_id == sid
    ]
    return found[0] if found else None


def answered(raw: Raw, sid: int) -> bool:
    return any(
        isinstance(f, (DataFrame, HeadersFrame)) and f.stream_id == sid and "END_STREAM" in f.flags
        for f in raw.frames
    )


@pytest.fixture
async def rig(ns):  # type: ignore[no-untyped-def]
    r = await make_rig()
    yield r
    await close_rig(r)


@pytest.mark.parametrize(
    "case",
    [
        "uppercase name",
        "CR LF in value",
        "connection",
        "pseudo-header after a regular one",
        "two Hosts",
    ],
)
async def test_a_malformed_block_costs_its_stream_only(rig: Rig, case: str) -> None:
    raw = await Raw.open(rig.port)
    raw.send(block(raw, 1, MALFORMED[case]), block(raw, 3, GOOD))
    await raw.until(lambda r: reset_code(r, 1) is not None and answered(r, 3))
    assert reset_code(raw, 1) == PROTOCOL_ERROR
    assert raw.goaway() is None and not raw.eof  # the connection goes on
    assert not answered(raw, 1)
    assert origin_requests(rig) == 1  # stream 3's; the malformed one never reached the origin
    raw.close()


async def test_malformed_trailers_reset_the_stream(rig: Rig) -> None:
    raw = await Raw.open(rig.port)
    body = DataFrame(1)
    body.data = b"x"
    raw.send(block(raw, 1, [*BASE, (b":path", b"/hello")], end=False), body)
    raw.send(block(raw, 1, [(b":path", b"/again")]))  # trailers with a pseudo-header
    await raw.until(lambda r: reset_code(r, 1) is not None)
    assert reset_code(raw, 1) == PROTOCOL_ERROR
    assert raw.goaway() is None
    raw.close()


async def test_a_stream_of_malformed_blocks_ends_in_enhance_your_calm(rig: Rig) -> None:
    """h2 ended the connection at the first malformed block; a stream error instead must not
    let a client send them without end: they count as the client's resets do."""
    raw = await Raw.open(rig.port)
    bad = MALFORMED["uppercase name"]
    for i in range(http2_guard.RESET_LIMIT + 50):
        sid = 1 + 2 * i
        raw.send(block(raw, sid, bad))
        if i % 50 == 49:  # each batch reset before the next: under the 100 concurrent streams
            await raw.until(lambda r, s=sid: reset_code(r, s) is not None or r.goaway() or r.eof)
        if raw.goaway() or raw.eof:
            break
    await raw.ended_with(ENHANCE_YOUR_CALM, timeout=10)
    assert origin_requests(rig) == 0
    raw.close()
