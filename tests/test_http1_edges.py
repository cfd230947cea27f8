"""Issue 12's edges of RFC 9112, decided once and held in all four codecs (h11 and llhttp,
server and client side): chunk sizes with leading zeros (7.1), empty lines before a request
line (2.2), the 400 for a malformed request after a good one on a kept-alive connection, and
``check_buffered``, which refuses a body already broken in the bytes that came with its head.

The differential tests check that both codec families agree on random inputs around these
cases; this file pins the decisions themselves, and the library behaviour they rest on (h11's
chunk-size cap, llhttp's chunk-size bounds), so an upgrade that changes either fails here.
"""

from __future__ import annotations

from typing import Any

import h11
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.http1 import (
    CLOSED,
    NEED_DATA,
    PAUSED,
    Body,
    ClientSide,
    End,
    ProtocolError,
    RequestHead,
    ResponseHead,
    ServerSide,
)

httptools = pytest.importorskip("httptools")

from proxy.http1_fast import FastServerSide  # noqa: E402
from proxy.http1_fast_client import FastClientSide  # noqa: E402

SERVERS = [ServerSide, FastServerSide]
CLIENTS = [ClientSide, FastClientSide]
# every test here runs on the compiled shortcuts (proxy._whole) and on the pure ones
pytestmark = pytest.mark.usefixtures("whole_impl")
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CHUNKED_REQUEST = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
CHUNKED_RESPONSE = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
LIMIT = 16384  # both sides' limit on one chunk size line, CRLF included (max_head, h11's default)


def request_events(codec: Any, chunks: list[bytes]) -> tuple[Any, bytes]:
    """Feed ``chunks`` then EOF; return (status of the ProtocolError or "end" or the stop
    event, body bytes taken)."""
    body = b""
    try:
        for chunk in [*chunks, b""]:
            codec.feed(chunk)
            while (event := codec.next_event()) is not NEED_DATA:
                if isinstance(event, Body):
                    body += event.data
                elif isinstance(event, End):
                    return "end", body
                elif event is CLOSED or event is PAUSED:
                    return event, body
    except ProtocolError as e:
        return e.status, body
    return NEED_DATA, body


def response_events(codec: Any, chunks: list[bytes]) -> tuple[Any, bytes]:
    codec.request_head(b"GET", b"/", [(b"host", b"a")])
    codec.end()
    body = b""
    try:
        for chunk in [*chunks, b""]:
            codec.feed(chunk)
            while (event := codec.next_event()) is not NEED_DATA:
                if isinstance(event, Body):
                    body += event.data
                elif isinstance(event, End):
                    return "end", body
                elif not isinstance(event, ResponseHead):
                    return event, body
    except ProtocolError as e:
        return e.status, body
    return NEED_DATA, body


# -- what the libraries do: if one of these fails, an upgrade changed a decision's ground ---------


def test_h11_still_caps_chunk_size_at_20_digits() -> None:
    """Why proxy.http1._Chunks exists: h11 0.16 refuses 21 hex digits, leading zeros or not.
    When this fails, h11 reads 1*HEXDIG itself and _Chunks can go."""
    for role, first in ((h11.SERVER, CHUNKED_REQUEST), (h11.CLIENT, None)):
        conn = h11.Connection(role)
        if first is None:
            conn.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
            conn.send(h11.EndOfMessage())
            first = CHUNKED_RESPONSE
        conn.receive_data(first + b"0" * 19 + b"79\r\n")
        conn.next_event()
        with pytest.raises(h11.RemoteProtocolError, match="illegal chunk header"):
            conn.next_event()


def test_h11_takes_no_empty_line_before_a_request() -> None:
    """Why the codecs skip empty lines themselves (proxy.http1.skip_empty_lines)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
    with pytest.raises(h11.RemoteProtocolError):
        conn.next_event()


class _Sink:
    def __init__(self) -> None:
        self.body = b""

    def on_body(self, body: bytes) -> None:
        self.body += body


def test_llhttp_chunk_size_bounds() -> None:
    """llhttp takes any number of leading zeros and overflows at 2**64: the bound chosen for
    both codec families (proxy.http1.CHUNK_SIZE) is llhttp's own, and the line limit is ours."""
    for size, ok in (
        (b"0" * 100000 + b"3", True),
        (b"0" * 30 + b"f" * 16, True),
        (b"0" * 30 + b"1" + b"0" * 16, False),
    ):
        sink = _Sink()
        parser = httptools.HttpRequestParser(sink)
        data = CHUNKED_REQUEST + size + b"\r\nabc"
        if ok:
            parser.feed_data(data)
            assert sink.body == b"abc"
        else:
            with pytest.raises(httptools.HttpParserError, match="overflow"):
                parser.feed_data(data)


# -- 1. chunk-size = 1*HEXDIG ----------------------------------------------------------------


@pytest.mark.parametrize("codec", SERVERS)
@pytest.mark.parametrize("split", [False, True])
def test_leading_zeros_in_a_request_chunk_size(codec: Any, split: bool) -> None:
    raw = CHUNKED_REQUEST + b"0000000000000000000000000000079\r\n" + b"x" * 121
    raw += b"\r\n" + b"0" * 40 + b"\r\n\r\n"
    chunks = [raw[:70], raw[70:75], raw[75:]] if split else [raw]
    assert request_events(codec(), chunks) == ("end", b"x" * 121)


@pytest.mark.parametrize("codec", CLIENTS)
@pytest.mark.parametrize("split", [False, True])
def test_leading_zeros_in_a_response_chunk_size(codec: Any, split: bool) -> None:
    raw = CHUNKED_RESPONSE + b"0000000000000000000000000000079\r\n" + b"x" * 121
    raw += b"\r\n" + b"0" * 40 + b"\r\n\r\n"
    chunks = [raw[:60], raw[60:70], raw[70:]] if split else [raw]
    assert response_events(codec(), chunks) == ("end", b"x" * 121)


@pytest.mark.parametrize("size", [b"1" + b"0" * 16, b"0" * 30 + b"1" + b"0" * 16, b"f" * 20])
def test_a_chunk_size_of_2_64_or_more_is_refused(size: bytes) -> None:
    for codec in SERVERS:
        assert request_events(codec(), [CHUNKED_REQUEST + size + b"\r\nabc"])[0] == 400
    for codec in CLIENTS:
        assert response_events(codec(), [CHUNKED_RESPONSE + size + b"\r\nabc"])[0] == 502


def test_the_largest_chunk_size_is_taken() -> None:
    size = b"0" * 30 + b"f" * 16  # 2**64 - 1: the body then just keeps coming
    for codec in SERVERS:
        parser = codec()
        parser.feed(CHUNKED_REQUEST + size + b"\r\nabc")
        assert isinstance(parser.next_event(), RequestHead)
        assert parser.next_event() == Body(b"abc")
        assert parser.next_event() is NEED_DATA
    for codec in CLIENTS:
        assert response_events(codec(), [CHUNKED_RESPONSE + size + b"\r\nabc"])[0] == 502  # EOF


@pytest.mark.parametrize("split", [False, True])
def test_a_million_zeros_is_refused(split: bool) -> None:
    """Leading zeros are valid, but a chunk size line is still at most LIMIT bytes."""
    line = b"0" * 1_000_000 + b"1\r\n"
    pieces = [line[i : i + 4096] for i in range(0, len(line), 4096)] if split else [line]
    for codec in SERVERS:
        assert request_events(codec(), [CHUNKED_REQUEST, *pieces, b"x\r\n0\r\n\r\n"])[0] == 400
    for codec in CLIENTS:
        assert response_events(codec(), [CHUNKED_RESPONSE, *pieces, b"x\r\n0\r\n\r\n"])[0] == 502


@pytest.mark.parametrize("extra", [0, 1])
def test_the_chunk_line_limit_is_exact(extra: int) -> None:
    """LIMIT bytes with the CRLF pass, one more fails, whole or cut before its end."""
    line = b"0" * (LIMIT - 3 + extra) + b"1\r\n"
    rest = b"x\r\n0\r\n\r\n"
    cuts = ([line + rest], [line[:-2], line[-2:] + rest], [line[:-1], line[-1:] + rest])
    for chunks in cuts:
        for codec in SERVERS:
            got = request_events(codec(), [CHUNKED_REQUEST, *chunks])
            assert got == ((400, b"") if extra else ("end", b"x")), (codec, chunks)
        for codec in CLIENTS:
            got = response_events(codec(), [CHUNKED_RESPONSE, *chunks])
            assert got == ((502, b"") if extra else ("end", b"x")), (codec, chunks)


# -- 2. empty lines before a request line ----------------------------------------------------

GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize("codec", SERVERS)
@pytest.mark.parametrize(
    ("chunks", "verdict"),
    [
        ([b"\r\n\r\n" + GET], "end"),  # RFC 9112 2.2: empty lines are skipped
        ([b"\r\n", b"\r\n", GET], "end"),
        ([b"\r\n\r", b"\n" + GET], "end"),  # a CR may be half of a CRLF still in flight
        ([b"\r", b"\n", b"\r", b"\n" + GET], "end"),
        ([b"\r\r\r" + GET], 400),  # a bare CR is no line end
        ([b"\r", b"\r" + GET], 400),
        ([b"\n\n" + GET], 400),  # nor, in a head, is a bare LF
        ([b"\r\n\n" + GET], 400),
        ([b"\n\r\n" + GET], 400),
        ([b"\r\n\r\n"], CLOSED),  # empty lines, then EOF: a clean close
        ([b"\r\n\r"], CLOSED),
    ],
)
def test_empty_lines_before_a_request(codec: Any, chunks: list[bytes], verdict: Any) -> None:
    assert request_events(codec(), chunks)[0] == verdict


def answer(codec: Any) -> None:
    """Take the first request's events and answer it, keeping the connection."""
    while not isinstance(codec.next_event(), End):
        pass
    codec.response_head(200, [(b"content-length", b"0")])
    codec.end()
    assert codec.keep_alive


@pytest.mark.parametrize("codec", SERVERS)
@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize(("lead", "verdict"), [(b"\r\n\r\n", "end"), (b"\r\r", 400), (b"\n", 400)])
def test_empty_lines_before_the_next_request(
    codec: Any, pipelined: bool, lead: bytes, verdict: Any
) -> None:
    """The same rule at the start of the next request on a kept-alive connection, whether it
    came with the first one (held back, checked by start_next) or later."""
    parser = codec()
    parser.feed(GET + (lead + GET if pipelined else b""))
    answer(parser)
    try:
        parser.start_next()
        assert request_events(parser, [] if pipelined else [lead + GET])[0] == verdict
    except ProtocolError as e:
        assert e.status == verdict


# -- 3. the 400 for a malformed request after a good one ---------------------------------------

BAD = b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize("codec", SERVERS)
@pytest.mark.parametrize("how", ["later", "pipelined", "whole-then-later"])
def test_a_bad_request_after_a_good_one_gets_its_400(codec: Any, how: str) -> None:
    """The codec half of the proxy's path: start_next() (held-back bytes) or next_event()
    raises, and error_response() then frames the 400, with Connection: close. FastServerSide
    used to raise from start_next() before resetting its response state, so error_response()
    thought the first response still open and returned b"": the connection just closed."""
    parser = codec()
    if how == "whole-then-later" and codec is FastServerSide:
        assert parser.feed_whole(GET) is not None
    else:
        parser.feed(GET + (BAD if how == "pipelined" else b""))
    answer(parser)
    with pytest.raises(ProtocolError) as caught:
        parser.start_next()
        if how != "pipelined":
            parser.feed(BAD)
        parser.next_event()
    assert caught.value.status == 400
    out = parser.error_response(caught.value.status, caught.value.reason)
    head = out.split(b"\r\n\r\n")[0].lower()
    assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n"), out
    assert b"\r\nconnection: close" in head
    assert parser.error_response(400) == b""  # and only once


# -- 4. check_buffered -------------------------------------------------------------------------


def event_verdict(codec: Any, data: bytes) -> int | None:
    """The status the event path raises on ``data`` (no EOF) before End, or None."""
    codec.feed(data)
    try:
        while (event := codec.next_event()) is not NEED_DATA:
            if isinstance(event, End) or event is PAUSED:
                return None
    except ProtocolError as e:
        return e.status
    return None


def buffered_verdict(codec: Any, data: bytes) -> int | None:
    """check_buffered's status right after the head (with the head's own read), or None; the
    events it must not have taken are then checked to be all there."""
    try:
        codec.feed(data)
    except ProtocolError as e:
        return e.status  # refused by feed itself: check_buffered is never reached
    try:
        head = codec.next_event()
    except ProtocolError as e:
        return e.status
    assert isinstance(head, RequestHead), head
    try:
        codec.check_buffered()
    except ProtocolError as e:
        return e.status
    return None


@st.composite
def chunked_body(draw: st.DrawFn) -> bytes:
    """A valid chunked body: sizes with and without leading zeros, extensions, trailers."""
    out = b""
    for piece in draw(st.lists(st.binary(min_size=1, max_size=30), max_size=4)):
        zeros = b"0" * draw(st.sampled_from([0, 0, 1, 3, 30]))
        ext = draw(st.sampled_from([b"", b"", b";a=1", b";b"]))
        out += zeros + b"%x" % len(piece) + ext + b"\r\n" + piece + b"\r\n"
    out += draw(st.sampled_from([b"0", b"000"])) + b"\r\n"
    out += draw(st.sampled_from([b"", b"T: 1\r\n"])) + b"\r\n"
    return out + draw(st.sampled_from([b"", GET]))


@SETTINGS
@given(chunked_body(), st.data())
def test_check_buffered_never_refuses_a_valid_prefix(body: bytes, data: st.DataObject) -> None:
    """The body may continue in the next read: no cut of a valid body is refused."""
    cut = data.draw(st.integers(0, len(body)))
    for codec in SERVERS:
        assert buffered_verdict(codec(), CHUNKED_REQUEST + body[:cut]) is None, (codec, cut)


BREAKS = [b"zz", b"1" + b"0" * 16, b"-1", b" 5", b"5\n", b"5\r\nhelloXX", b"5\r\nhello\r", b"\r\n"]


@SETTINGS
@given(chunked_body(), st.data())
@example(b"0" * 20 + b"f" * 16 + b"\r\nabc", None)  # the largest size: valid, incomplete
@example(b"1" + b"0" * 16 + b"\r\n", None)  # 2**64
@example(b"3\r\nabcX", None)
def test_check_buffered_says_what_the_events_would(body: bytes, data: Any) -> None:
    """On any bytes after a chunked head (valid, cut, broken), check_buffered raises exactly
    when taking the events would, with the same status, in both codec families."""
    if data is not None:
        at = data.draw(st.integers(0, len(body)))
        how = data.draw(st.sampled_from(["insert", "replace", "cut"]))
        bad = data.draw(st.sampled_from(BREAKS) | st.binary(min_size=1, max_size=3))
        if how == "insert":
            body = body[:at] + bad + body[at:]
        elif how == "replace":
            body = body[:at] + bad + body[at + len(bad) :]
        else:
            body = body[:at]
    raw = CHUNKED_REQUEST + body
    for codec in SERVERS:
        assert buffered_verdict(codec(), raw) == event_verdict(codec(), raw), (codec, raw)


@pytest.mark.parametrize("codec", SERVERS)
@pytest.mark.parametrize(
    "body",
    [
        b"1" + b"0" * 16 + b"\r\n",  # 2**64: overflows
        b"1" + b"0" * 16,  # overflowing before its CRLF has come
        b"xyz\r\n",  # not hex
        b"5\r\nhelloXX",  # bad chunk terminator
        b"5\r\nhello\r\n0\r\nno colon\r\n\r\n",  # a bad trailer line
    ],
)
def test_check_buffered_refuses_what_nginx_never_forwards(codec: Any, body: bytes) -> None:
    parser = codec()
    parser.feed(CHUNKED_REQUEST + body)
    assert isinstance(parser.next_event(), RequestHead)
    with pytest.raises(ProtocolError) as caught:
        parser.check_buffered()
    assert caught.value.status == 400
    with pytest.raises(ProtocolError) as again:  # the events still end in the same error
        while parser.next_event() is not NEED_DATA:
            pass
    assert again.value.status == 400


@pytest.mark.parametrize("codec", SERVERS)
def test_check_buffered_takes_no_event(codec: Any) -> None:
    """A valid body stays whole for the event loop, and a request without one passes."""
    for raw, body in (
        (CHUNKED_REQUEST + b"3\r\nabc\r\n0\r\n\r\n" + GET, b"abc"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nab", b"ab"),
        (GET, b""),
    ):
        parser = codec()
        parser.feed(raw)
        assert isinstance(parser.next_event(), RequestHead)
        parser.check_buffered()
        parser.check_buffered()
        assert request_events(parser, [])[1] == body


@pytest.mark.parametrize("codec", SERVERS)
def test_check_buffered_counts_an_eof_in_the_body(codec: Any) -> None:
    """EOF already received in the middle of the body: the events would end in a 400, and so
    does check_buffered (the body cannot continue)."""
    parser = codec()
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nab")
    parser.feed(b"")
    assert isinstance(parser.next_event(), RequestHead)
    with pytest.raises(ProtocolError) as caught:
        parser.check_buffered()
    assert caught.value.status == 400


def test_check_buffered_of_an_extension_method_is_h11s() -> None:
    """FastServerSide hands a method llhttp does not know to ServerSide, check_buffered too."""
    parser = FastServerSide()
    parser.feed(CHUNKED_REQUEST.replace(b"POST", b"PURGEX") + b"1" + b"0" * 16 + b"\r\n")
    assert isinstance(parser.next_event(), RequestHead)
    with pytest.raises(ProtocolError):
        parser.check_buffered()
