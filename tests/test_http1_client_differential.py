"""h11 is the bar for the llhttp upstream codec: the same request calls and the same response
bytes, split the same way, must give the same events, verdict and connection state from
``proxy.http1.ClientSide`` (h11) and ``proxy.http1_fast_client.FastClientSide``.

Inputs: exchanges both must accept (1xx before the final response, 101 to an Upgrade, 2xx to
CONNECT, 204/304/HEAD, Content-Length, chunked with extensions and trailers, EOF-delimited,
HTTP/1.0, Connection: close, bytes after the response), the same with one byte inserted,
replaced or removed, and hostile heads. Every input is cut at random points into several
``feed()`` calls, then EOF. The known, deliberate differences of the module docstring are
recognised by named predicates on what h11 itself parsed, so anything else still fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.http1 import (
    CLOSED,
    NEED_DATA,
    PAUSED,
    SWITCHED,
    Body,
    ClientSide,
    End,
    ProtocolError,
    ResponseHead,
)

pytest.importorskip("httptools")

from proxy import http1_fast_client as fast_client
from proxy.http1_fast_client import FastClientSide

# every test here runs on the compiled shortcuts (proxy._whole) and on the pure ones
pytestmark = pytest.mark.usefixtures("whole_impl")
SETTINGS = settings(max_examples=350, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TCHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-!#$%&'*+.^_`|~"
FRAMING_NAMES = ("host", "content-length", "transfer-encoding", "connection", "upgrade")

token = st.text(alphabet=TCHARS, min_size=1, max_size=10).map(str.encode)
plain_name = token.filter(lambda t: t.lower().decode() not in FRAMING_NAMES)
# what h11 takes in a field value: visible bytes, obs-text, SP/HTAB, controls but NUL/VT/FF/CR/LF
_VALUE_BYTES = bytes(range(0x20, 0x7F)) + b"\t\x80\xe9\xff\x01\x1f\x7f"
_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=16)
value_bytes = st.one_of(
    *[_TEXT.map(str.encode)] * 6,  # mostly what llhttp takes; control bytes send it to h11's rules
    st.lists(st.sampled_from(_VALUE_BYTES), max_size=12).map(bytes),
)
ows = st.sampled_from([b" ", b" ", b"", b"\t", b"  "])


@dataclass
class Exchange:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: list[bytes]
    end_first: bool  # end() before the response, or after it (the origin answered early)
    response: bytes


def pieces(draw: st.DrawFn, data: bytes, most: int = 3) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=most)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


@st.composite
def request(draw: st.DrawFn) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], list[bytes], bool]:
    """A request h11 sends: method (HEAD and CONNECT included), maybe Upgrade or close."""
    method = draw(
        st.one_of(
            st.sampled_from([b"GET", b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS"]),
            token,
        )
    )
    target = b"app.test:443" if method == b"CONNECT" else draw(st.sampled_from([b"/", b"/a?b=c"]))
    headers = [(draw(st.sampled_from([b"host", b"Host"])), b"app.test")]
    extra = draw(st.sampled_from(["none", "none", "none", "upgrade", "close"]))
    if extra == "upgrade":
        upgrade = draw(st.sampled_from([b"websocket", b"websocket", b",,"]))  # ",,": no proposal
        headers += [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
    elif extra == "close":
        headers.append((b"connection", b"close"))
    headers += draw(st.lists(st.tuples(plain_name, value_bytes.map(bytes.strip)), max_size=3))
    body = draw(st.binary(max_size=24))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    if framing == "length":
        headers.append((b"content-length", b"%d" % len(body)))
        sent = pieces(draw, body)
    elif framing == "chunked":
        headers.append((b"transfer-encoding", b"chunked"))
        sent = pieces(draw, body)
    else:
        sent = draw(st.sampled_from([[], [b""]]))
    end_first = draw(st.sampled_from([True, True, True, False]))
    return method, target, draw(st.permutations(headers)), sent, end_first


def header_block(draw: st.DrawFn, framing: list[bytes]) -> bytes:
    """Header lines of a response or trailer block (not the empty line): random plain headers,
    maybe Connection, and the framing lines given, in random order and name case."""
    lines = [
        name + b":" + draw(ows) + value + draw(ows)
        for name, value in draw(st.lists(st.tuples(plain_name, value_bytes), max_size=4))
    ]
    lines += draw(
        st.sampled_from([[], [], [b"Connection: close"], [b"Connection: keep-alive"]])
        | st.just([b"connection: Keep-Alive, CLOSE"])
    )
    lines += framing
    return b"".join(line + b"\r\n" for line in draw(st.permutations(lines)))


def status_line(draw: st.DrawFn, status: int) -> bytes:
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    version = draw(st.sampled_from([version] * 8 + [b"HTTP/2.0", b"HTTP/0.9"]))
    reason = draw(
        st.sampled_from(
            [b" OK", b" OK", b"", b" ", b"  spaced  ", b" caf\xe9", b" a\tb", b" x\x01"]
        )
    )
    return b"%s %d%s\r\n" % (version, status, reason)


@st.composite
def exchange(draw: st.DrawFn) -> Exchange:
    """An exchange both codecs accept (the test checks h11 does)."""
    method, target, headers, sent, end_first = draw(request())
    upgrade = (b"upgrade", b"websocket") in headers
    raw = b""
    for _ in range(draw(st.integers(0, 2))):
        status = draw(st.sampled_from([100, 102, 103, 199]))
        raw += status_line(draw, status) + header_block(draw, []) + b"\r\n"
    if upgrade:
        status = draw(st.sampled_from([101, 101, 200, 426]))
    elif method == b"CONNECT":
        status = draw(st.sampled_from([200, 200, 204, 407]))
    else:
        status = draw(st.sampled_from([200, 200, 201, 204, 304, 404, 500]))
    switch = status == 101 or (method == b"CONNECT" and 200 <= status < 300)
    body = draw(st.binary(max_size=48))
    bodiless = switch or status in (204, 304) or method == b"HEAD"
    framing = draw(st.sampled_from(["length", "length", "chunked", "eof"]))
    if framing == "length":
        length = b"%d" % (draw(st.integers(0, 999)) if bodiless else len(body))
        name = draw(st.sampled_from([b"Content-Length", b"content-length", b"CONTENT-LENGTH"]))
        lines = [name + b":" + draw(ows) + b"0" * draw(st.integers(0, 2)) + length]
        payload = body
    elif framing == "chunked":
        lines = [b"Transfer-Encoding: " + draw(st.sampled_from([b"chunked", b"Chunked"]))]
        payload = b""
        for piece in pieces(draw, body):
            if piece:
                # RFC 9112 chunk-size is 1*HEXDIG: leading zeros past h11's 20 digits included
                size = draw(st.sampled_from([b"%x", b"%X", b"00%x", b"0" * 40 + b"%x"]))
                size %= len(piece)
                ext = draw(
                    st.sampled_from(
                        [b"", b"", b";x=1", b";name", b'; q="a b"', b";", b" ", b";\x01"]
                    )
                )
                payload += size + ext + b"\r\n" + piece + b"\r\n"
        last = draw(st.sampled_from([b"0", b"0", b"000", b"0" * 30]))
        payload += last + b"\r\n" + header_block(draw, []) + b"\r\n"
    else:
        lines = []
        payload = body
    raw += status_line(draw, status) + header_block(draw, lines) + b"\r\n"
    if switch:
        raw += draw(st.binary(max_size=16))  # WebSocket frames, tunnel bytes
    elif not bodiless:
        raw += payload
    if framing != "eof" or bodiless:
        raw += draw(
            st.sampled_from([b"", b"", b"", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"x"])
        )
    return Exchange(method, target, headers, sent, end_first, raw)


@st.composite
def mutated(draw: st.DrawFn) -> Exchange:
    """A valid exchange with one response byte inserted, replaced or deleted."""
    ex = draw(exchange())
    raw = ex.response
    at = draw(st.integers(0, len(raw) - 1))
    byte = draw(st.sampled_from(b'\r\n\x00\x0b\x7f\x80\xff :;\t,"0') | st.integers(0, 255))
    how = draw(st.sampled_from(["insert", "replace", "delete"]))
    if how == "insert":
        ex.response = raw[:at] + bytes([byte]) + raw[at:]
    elif how == "replace":
        ex.response = raw[:at] + bytes([byte]) + raw[at + 1 :]
    else:
        ex.response = raw[:at] + raw[at + 1 :]
    return ex


HOSTILE_STATUS = [
    b"HTTP/1.1 200 OK",
    b"HTTP/1.1 200",
    b"HTTP/1.1 200 ",
    b"HTTP/1.1  200 OK",
    b"HTTP/1.2 200 OK",
    b"HTTP/2 200 OK",
    b"http/1.1 200 OK",
    b"HTTP/1.1 2000 OK",
    b"HTTP/1.1 099 Low",
    b"HTTP/1.1 20 OK",
    b" HTTP/1.1 200 OK",
    b"HTTP/1.1 200 O\x00K",
    b"HTTP/1.1 200 O\x01K",
    b"HTTP/1.1 101 Switching",
    b"HTTP/1.1 100 Continue",
    b"HTTP/1.0 304 Not Modified",
    b"ICE/1.0 200 OK",
    b"HTTP/1.1 204 No Content",
    b"HTTP/1.1 200 OK\x0b",
    b"HTTP/1.1 200 OK\r",
]
HOSTILE_LINES = [
    b"Content-Length: 5",
    b"Content-Length: +5",
    b"Content-Length: 5, 5",
    b"Content-Length: 5,6",
    b"Content-Length: 05",
    b"Content-Length:5",
    b"Content-Length : 5",
    b"Content-Length: 1e1",
    b"Content-Length: 99999999999999999999",
    b"Content-Length: 000000000000000000005",
    b"Content-Length: 18446744073709551616",
    b"Content-Length: -1",
    b"Content-Length:",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: Chunked",
    b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding: chunked, gzip",
    b"Transfer-Encoding:\tchunked\t",
    b"Transfer-Encoding: gzip",
    b"Transfer-Encoding: chunked ,",
    b" Transfer-Encoding: chunked",
    b"\tX: folded",
    b"X: a\x01b",
    b"X: a\x7f",
    b"X: \x80",
    b"X:",
    b"X :a",
    b": a",
    b"X",
    b"X: a\rb",
    b"X: a\x0bb",
    b"X: a\x00b",
    b"Connection: close",
    b"Connection: keep-alive, close",
    b"Upgrade: websocket",
    b"X-\xff: 1",
    b"Set-Cookie: a=\x01b",
    b"X: a\r\n b",
    b"X: a\n\tb",
]
HOSTILE_BODIES = [
    b"hello",
    b"5\r\nhello\r\n0\r\n\r\n",
    b"5 \r\nhello\r\n0\r\n\r\n",
    b"5;\x00\r\nhello\r\n0\r\n\r\n",
    b"5\r\nhello\r\n0\r\nT: 1\n\r\n",
    b"5\r\nhello\r\n0\r\n\n",
    b"5\r\nhelloXX0\r\n\r\n",
    b"5\r\nhello\r\n0\r\nT: 1\r\n x\r\n\r\n",
    b"5\r\nhello\r\n0\r\nContent-Length: 1, 1\r\n\r\n",
    b"5\r\nhello\r\n0\r\nT: \x01\r\n\r\n",
    b"000000000000000000005\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\n",
]


@st.composite
def hostile(draw: st.DrawFn) -> Exchange:
    """Odd status lines, header lines, line ends and bodies, after a random request."""
    method, target, headers, sent, end_first = draw(request())
    glue = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"]))
    lines = draw(
        st.lists(
            st.sampled_from(HOSTILE_LINES)
            | st.tuples(token, value_bytes).map(lambda t: t[0] + b": " + t[1]),
            max_size=5,
        )
    )
    raw = draw(st.sampled_from(HOSTILE_STATUS)) + glue + b"".join(line + glue for line in lines)
    raw += glue + draw(st.sampled_from(HOSTILE_BODIES) | st.binary(max_size=20))
    return Exchange(method, target, headers, sent, end_first, raw)


CHUNK_SIZES = [
    b"5",
    b"5",
    b"05",
    b"5 ",
    b"5\t",
    b"5;a=b",
    b"5;",
    b'5; q="x y"',
    b"5;\x00",
    b"5;a\rb",
    b"0" * 20 + b"5",
    b"0" * 21 + b"5",
    b"0" * 100 + b"5",
    b"0" * 20 + b"f" * 16,  # 2**64 - 1: the largest size
    b"1" + b"0" * 16,  # 2**64: overflows, in llhttp too
    b"0" * 3 + b"1" + b"0" * 16,
    b"f" * 17,
    b"f" * 21,
    b"-5",
    b"0x5",
    b" 5",
    b"",
    b"6",
    b"4",
]
LAST_CHUNKS = [b"0", b"0", b"000", b"0;x", b"0 ", b"0" * 21, b"0" * 99, b"00 ;\x01"]
CHUNK_FOOTERS = [b"\r\n", b"\r\n", b"\r\n", b"\n", b"XX", b"", b"\r", b"\rX"]
TRAILER_LINES = [
    b"T: 1",
    b"T: 1",
    b"t:",
    b"T: \x01",
    b" folded",
    b"Content-Length: 5",
    b"Content-Length: x",
    b"Transfer-Encoding: gzip",
    b"Transfer-Encoding: Chunked",
    b"Content-Length: 1, 1",
    b"X :a",
    b"T: a\rb",
]


@st.composite
def hostile_chunked(draw: st.DrawFn) -> Exchange:
    """A plain chunked response head, then odd chunk lines, footers, last chunks, trailers."""
    method, target, headers, sent, end_first = draw(request())
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    eol = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"])
    for _ in range(draw(st.integers(0, 2))):
        raw += draw(st.sampled_from(CHUNK_SIZES)) + draw(eol) + b"hello"
        raw += draw(st.sampled_from(CHUNK_FOOTERS))
    raw += draw(st.sampled_from(LAST_CHUNKS)) + draw(eol)
    for line in draw(st.lists(st.sampled_from(TRAILER_LINES), max_size=3)):
        raw += line + draw(eol)
    raw += draw(eol) + draw(st.sampled_from([b"", b"", b"x", b"HTTP/1.1 200 OK\r\n\r\n"]))
    return Exchange(method, target, headers, sent, end_first, raw)


@st.composite
def split(draw: st.DrawFn, exchanges: st.SearchStrategy[Exchange]) -> tuple[Exchange, list[bytes]]:
    """The response cut at random points into several feeds (b"" is EOF, so none is empty)."""
    ex = draw(exchanges)
    return ex, [p for p in pieces(draw, ex.response, 4) if p]


# -- running both codecs -----------------------------------------------------------------------


def recording_h11() -> tuple[ClientSide, list[bytes]]:
    """ClientSide, plus the raw head and trailer blocks its h11 took out of the buffer: what
    the gap predicates look at, so they judge what h11 itself parsed."""
    codec = ClientSide()
    blocks: list[bytes] = []
    buf = codec._h._receive_buffer
    extract = buf.maybe_extract_lines

    def recording() -> Any:
        before = bytes(buf._data)
        lines = extract()
        if lines is not None:
            blocks.append(before[: len(before) - len(buf._data)])
        return lines

    buf.maybe_extract_lines = recording
    return codec, blocks


def run(codec: Any, ex: Exchange, chunks: list[bytes]) -> dict[str, Any]:
    """Send the request, feed the response (pumping events after each feed), then EOF."""
    out: dict[str, Any] = {"heads": [], "body": b"", "trailers": None, "at_end": None}
    out["stop"] = out["error"] = None
    codec.request_head(ex.method, ex.target, ex.headers)
    for piece in ex.body:
        codec.body(piece)
    if ex.end_first:
        codec.end()
    try:
        for chunk in [*chunks, b""]:
            codec.feed(chunk)
            if pump(codec, out):
                break
    except ProtocolError as e:
        out["error"] = e.status
    if not ex.end_first:
        codec.end()
    out["final"] = (codec.reusable, codec.request_complete)
    return out


def pump(codec: Any, out: dict[str, Any]) -> bool:
    """Take events until NEED_DATA (False) or until the stream stops (True)."""
    while True:
        event = codec.next_event()
        if event is NEED_DATA:
            return False
        if event is PAUSED or event is CLOSED or event is SWITCHED:
            out["stop"] = (repr(event), codec.trailing_data())
            return True
        if isinstance(event, ResponseHead):
            headers = [(bytes(n), bytes(v)) for n, v in event.headers]
            out["heads"].append((event.status, bytes(event.reason), headers, event.http_version))
        elif isinstance(event, Body):
            out["body"] += event.data
        elif isinstance(event, End):
            out["trailers"] = [(bytes(n), bytes(v)) for n, v in event.trailers]
            out["at_end"] = (codec.reusable, codec.request_complete, codec.trailing_data())
        else:
            raise AssertionError(f"unexpected event {event!r}")


# -- the known differences (module docstring of proxy.http1_fast_client) ----------------------

BARE_LF = re.compile(rb"(?<!\r)\n")


def block_fields(block: bytes) -> list[tuple[bytes, bytes]]:
    """(lowercased name, raw value) of a block h11 accepted, folded lines joined as h11 does."""
    lines = [line.removesuffix(b"\r") for line in block.split(b"\n")][:-2]
    if lines and lines[0].startswith(b"HTTP/"):
        lines = lines[1:]
    joined: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            joined[-1] += b" " + line.lstrip(b" \t")
        else:
            joined.append(line)
    return [(n.strip().lower(), v) for n, _, v in (line.partition(b":") for line in joined)]


def bare_lf(blocks: list[bytes]) -> bool:
    """h11 took LF alone as a line end in a head or trailer block; we refuse it."""
    return any(BARE_LF.search(block) for block in blocks)


def content_length_list(blocks: list[bytes]) -> bool:
    """h11 folds repeated or listed equal Content-Lengths (``5, 5``); we refuse them."""
    for block in blocks:
        lengths = [v for n, v in block_fields(block) if n == b"content-length"]
        if len(lengths) > 1 or any(b"," in v for v in lengths):
            return True
    return False


def length_and_chunked(blocks: list[bytes]) -> bool:
    """h11 lets Transfer-Encoding win over Content-Length; we refuse the pair."""
    for block in blocks:
        names = {n for n, _ in block_fields(block)}
        if {b"content-length", b"transfer-encoding"} <= names:
            return True
    return False


def less_reusable(ex: Exchange, slow: dict[str, Any], fast: dict[str, Any]) -> bool:
    """Only ``reusable`` differs, h11 True and ours False, for a documented reason: bytes came
    after the response, or the response ran to EOF (h11 is DONE until it takes the EOF)."""
    if {k: v for k, v in slow.items() if k not in ("at_end", "final")} != {
        k: v for k, v in fast.items() if k not in ("at_end", "final")
    }:
        return False
    if slow["at_end"] is None or slow["at_end"][1:] != fast["at_end"][1:]:
        return False
    if slow["final"][1] != fast["final"][1]:
        return False
    if fast["at_end"][0] > slow["at_end"][0] or fast["final"][0] > slow["final"][0]:
        return False  # never more reusable than h11
    status, _, headers, _ = slow["heads"][-1]
    names = {n for n, _ in headers}
    to_eof = (
        not names & {b"content-length", b"transfer-encoding"}
        and status not in (204, 304)
        and ex.method != b"HEAD"
    )
    return bool(slow["at_end"][2] or (slow["stop"] and slow["stop"][1]) or to_eof)


def check(ex: Exchange, chunks: list[bytes]) -> dict[str, Any]:
    h11_codec, blocks = recording_h11()
    slow = run(h11_codec, ex, chunks)
    fast = run(FastClientSide(), ex, chunks)
    raw = b"".join(chunks)
    if slow == fast:
        return slow
    if fast["error"] is not None and slow["heads"][: len(fast["heads"])] == fast["heads"]:
        # refused here, accepted (or refused later, after more events) by h11
        assert bare_lf(blocks) or content_length_list(blocks) or length_and_chunked(blocks), (
            raw,
            slow,
            fast,
        )
        return slow
    assert less_reusable(ex, slow, fast), (raw, ex, slow, fast)
    return slow


# -- the tests -----------------------------------------------------------------------------------


@SETTINGS
@given(split(exchange()))
@example(
    (
        Exchange(
            b"GET",
            b"/",
            [(b"host", b"a"), (b"connection", b"upgrade"), (b"upgrade", b"websocket")],
            [],
            True,
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x00",
        ),
        [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switch", b"ing Protocols\r\n\r\n\x81\x00"],
    )
)
def test_valid_exchanges_agree(case: tuple[Exchange, list[bytes]]) -> None:
    slow = check(*case)
    # the generator must make what h11 accepts: up to End, or to the switch (bytes after a
    # response that closes the connection are still an error, to both)
    assert slow["at_end"] is not None or slow["stop"][0] == "SWITCHED", (case, slow)


@SETTINGS
@given(split(mutated()))
def test_mutated_exchanges_agree(case: tuple[Exchange, list[bytes]]) -> None:
    check(*case)


def _ex(response: bytes, method: bytes = b"GET", *extra: tuple[bytes, bytes]) -> Exchange:
    return Exchange(method, b"/", [(b"host", b"a"), *extra], [], True, response)


@SETTINGS
@given(split(hostile()))
@example((_ex(b"HTTP/1.1 200 OK\r\nX: a\x01b\r\nContent-Length: 0\r\n\r\n"), []))
@example((_ex(b"HTTP/1.1 200 OK\r\nX: a\r\n  b \r\nContent-Length: 0\r\n\r\n"), []))
@example((_ex(b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551616\r\n\r\nab"), []))
@example((_ex(b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\n\r\n"), []))
@example((_ex(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nab"), []))
@example(
    (_ex(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5 ;a\r\r\nhello\r\n0\r\n\r\n"), [])
)
@example((_ex(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello"), []))
@example((_ex(b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"), []))
@example((_ex(b""), []))
@example((_ex(b"HTTP/1.1 099 Low\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"), []))
@example((_ex(b"HTTP/1.1 200 OK\r\nContent-Length: " + b"0" * 20 + b"1\r\n\r\na"), []))
@example(
    (_ex(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"0" * 21 + b"\r\n\r\n"), [])
)
@example(
    (
        _ex(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"0" * 29
            + b"79\r\n"
            + b"x" * 0x79
            + b"\r\n0\r\n\r\n"
        ),
        [],
    )
)
@example((_ex(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n"), []))
@example((_ex(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"0" * 20000), []))
def test_hostile_responses_agree(case: tuple[Exchange, list[bytes]]) -> None:
    ex, chunks = case
    check(ex, chunks or ([ex.response] if ex.response else []))


@SETTINGS
@given(split(hostile_chunked()))
@example((_ex(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n"), []))
@example((_ex(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT: \x00\r\n\r\n"), []))
@example(
    (
        _ex(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: x\r\n\r\n"),
        [],
    )
)
@example(
    (
        _ex(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\nTransfer-Encoding: Chunked\r\n\r\n"
        ),
        [],
    )
)
def test_hostile_chunked_bodies_agree(case: tuple[Exchange, list[bytes]]) -> None:
    ex, chunks = case
    check(ex, chunks or [ex.response])


def test_incomplete_limit_as_h11() -> None:
    """h11 refuses a head or trailer block still incomplete past 16 KiB, whatever its final
    size; so do we, at the same byte, and neither limits a complete one. A chunk size line
    is limited to 16 KiB with its CRLF however it arrives, in both codecs (RFC 9112 chunk
    sizes take any number of leading zeros: without the limit, one line could be any size)."""
    for size in (16383, 16384, 16385, 16386, 16390, 20000):
        head = b"HTTP/1.1 200 OK\r\nX: "
        head += b"a" * (size - len(head) - 4) + b"\r\n\r\n"
        chunk = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        line = b"1;" + b"x" * (size - 4) + b"\r\n"
        trailer = b"0\r\nT: " + b"t" * (size - 7) + b"\r\n\r\n"
        for raw, start, whole_limited in (
            (head, 0, False),
            (chunk + line + b"a\r\n0\r\n\r\n", len(chunk), True),
            (chunk + trailer, len(chunk) + 3, False),
        ):
            for cut in (size - 1, size, size + 1, size + 2):
                slow = check(_ex(raw), [raw[: start + cut], raw[start + cut :]])
                if whole_limited:
                    assert slow["error"] == (502 if size > 16384 else None), (size, cut)
                else:
                    refused = cut > 16384 and cut < size
                    assert slow["error"] == (502 if refused else None), (size, cut)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(split(exchange() | mutated()))
def test_without_httptools_the_same(case: tuple[Exchange, list[bytes]]) -> None:
    """Without httptools every header block takes the h11-grammar path: same answers."""
    with mock.patch.object(fast_client, "HAVE_HTTPTOOLS", False):
        check(*case)


def test_bare_line_ends_fail_before_eof() -> None:
    """A bare LF or CR in an incomplete head is a 502 at once, not after a response timeout."""
    for raw in (b"HTTP/1.1 200 OK\nServer: x\n", b"HTTP/1.1 200 OK\r\nX: a\rb"):
        codec = FastClientSide()
        codec.request_head(b"GET", b"/", [(b"host", b"a")])
        codec.feed(raw)
        with pytest.raises(ProtocolError):
            codec.next_event()


def test_gaps_are_narrow() -> None:
    """Each known difference shows up only on its own construct: the predicates hold there,
    and the codec agrees with h11 on the same exchange without it."""
    cases = [
        (b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", bare_lf),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello", content_length_list),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            content_length_list,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n",
            length_and_chunked,
        ),
    ]
    for raw, predicate in cases:
        h11_codec, blocks = recording_h11()
        slow = run(h11_codec, _ex(raw), [raw])
        fast = run(FastClientSide(), _ex(raw), [raw])
        assert slow["error"] is None and fast["error"] == 502, (raw, slow, fast)
        assert predicate(blocks), raw
    plain = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    h11_codec, blocks = recording_h11()
    assert run(h11_codec, _ex(plain), [plain]) == run(FastClientSide(), _ex(plain), [plain])
    assert not (bare_lf(blocks) or content_length_list(blocks) or length_and_chunked(blocks))
    # less reusable: bytes after the response, and a response that runs to EOF
    for raw in (plain + b"HTTP/1.1 200 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\nto the end"):
        slow = run(ClientSide(), _ex(raw), [raw])
        fast = run(FastClientSide(), _ex(raw), [raw])
        assert slow["at_end"][0] and not fast["at_end"][0], raw
        assert less_reusable(_ex(raw), slow, fast), raw


# -- writing -----------------------------------------------------------------------------------

bad_name = st.sampled_from([b"a b", b"", b"x:", b"\xff", b"a\x00", b"a\r\nb"])
bad_value = st.sampled_from([b" a", b"a ", b"a\r\nb: c", b"\x00", b"a\x0bb", b"a\nb", b"\t"])
write_value = st.one_of(value_bytes.map(bytes.strip), bad_value)
special = st.sampled_from(
    [
        (b"Content-Length", b"5"),
        (b"content-length", b"5, 5"),
        (b"content-length", b"5,6"),
        (b"content-length", b"05"),
        (b"content-length", b"+5"),
        (b"content-length", b"0"),
        (b"Transfer-Encoding", b"chunked"),
        (b"transfer-encoding", b"Chunked"),
        (b"transfer-encoding", b"gzip"),
        (b"Host", b"other.test"),
        (b"Connection", b"close"),
        (b"Upgrade", b"h2c"),
        (b"upgrade", b""),
        (b"upgrade", b", ,"),
        (b"connection", b"keep-alive, Close"),
    ]
)


@st.composite
def write_steps(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """request_head (mostly valid, sometimes not), then body/end calls, sometimes out of turn."""
    method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"CONNECT", b"BAD METHOD"]) | token)
    target = draw(st.sampled_from([b"/", b"/a?b", b"*", b"", b"/a b", b"/\x80"]))
    headers = [(b"host", b"app.test")] if draw(st.integers(0, 9)) else []
    headers += draw(
        st.lists(
            st.one_of(
                st.tuples(plain_name, write_value),
                special,
                st.tuples(bad_name, value_bytes.map(bytes.strip)),
            ),
            max_size=5,
        )
    )
    headers = draw(st.permutations(headers))
    steps: list[tuple[Any, ...]] = [("head", method, target, headers)]
    for _ in range(draw(st.integers(0, 4))):
        steps.append(
            draw(
                st.sampled_from([("end",), ("head", b"GET", b"/", headers)])
                | st.binary(max_size=8).map(lambda b: ("body", b))
            )
        )
    return steps


def written(codec: Any, steps: list[tuple[Any, ...]]) -> list[Any]:
    out: list[Any] = []
    for step in steps:
        try:
            if step[0] == "head":
                out.append(codec.request_head(*step[1:]))
            elif step[0] == "body":
                out.append(codec.body(step[1]))
            else:
                out.append(codec.end())
        except Exception:
            out.append("refused")
        out.append(codec.request_complete)
    return out


@settings(max_examples=500, deadline=None)
@given(write_steps())
@example([("head", b"GET", b"/", [(b"X", b"1"), (b"Host", b"a")]), ("body", b""), ("end",)])
@example([("head", b"POST", b"/", [(b"host", b"a"), (b"content-length", b"5, 5")]), ("end",)])
@example([("head", b"GET", b"/", [(b"host", b"a"), (b"upgrade", b",,")]), ("end",)])
def test_requests_are_written_as_h11_writes_them(steps: list[tuple[Any, ...]]) -> None:
    assert written(ClientSide(), steps) == written(FastClientSide(), steps)


@st.composite
def valid_writes(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    method, target, headers, sent, _ = draw(request())
    return [("head", method, target, headers), *(("body", p) for p in sent), ("end",)]


@SETTINGS
@given(valid_writes())
def test_valid_requests_are_written_as_h11_writes_them(steps: list[tuple[Any, ...]]) -> None:
    slow = written(ClientSide(), steps)
    assert "refused" not in slow, (steps, slow)
    assert slow == written(FastClientSide(), steps)


# -- the whole-response shortcut: never a different answer than the general path --------------


def fed_once(codec: Any, ex: Exchange) -> dict[str, Any]:
    """The request sent and ended, the response fed in one piece (no EOF), events taken."""
    out: dict[str, Any] = {"heads": [], "body": b"", "trailers": None, "at_end": None}
    out["stop"] = out["error"] = None
    codec.request_head(ex.method, ex.target, ex.headers)
    for piece in ex.body:
        codec.body(piece)
    codec.end()
    try:
        codec.feed(ex.response)
        pump(codec, out)
    except ProtocolError as e:
        out["error"] = e.status
    out["final"] = (codec.reusable, codec.request_complete, codec.trailing_data())
    return out


@SETTINGS
@given(exchange() | mutated() | hostile())
@example(_ex(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX:  a \t\r\n\r\nabc"))
@example(_ex(b"HTTP/1.0 204 \r\nConnection: close\r\n\r\n"))
@example(_ex(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcd"))
@example(_ex(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc"))
@example(_ex(b"HTTP/1.1 103 Early Hints\r\nContent-Length: 0\r\n\r\n"))
@example(_ex(b"HTTP/1.1 200 OK\r\nConnection: 5\r\n\r\nhello"))
@example(_ex(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: a, CLOSE\r\n\r\nhi"))
def test_whole_response_shortcut_agrees(ex: Exchange) -> None:
    """When the shortcut takes a response, the general path and h11 read the same head and
    body from the same bytes, and the codec is left reusable (or not) the same way."""
    whole = FastClientSide()
    whole.request_head(ex.method, ex.target, ex.headers)
    for piece in ex.body:
        whole.body(piece)
    whole.end()
    got = whole.feed_whole(ex.response)
    if got is None:
        return
    head, body = got
    taken = {
        "heads": [(head.status, head.reason, head.headers, head.http_version)],
        "body": body,
        "trailers": [],
        "at_end": (whole.reusable, whole.request_complete, whole.trailing_data()),
        "stop": None,
        "error": None,
        "final": (whole.reusable, whole.request_complete, whole.trailing_data()),
    }
    assert fed_once(FastClientSide(), ex) == taken, ex
    slow = fed_once(ClientSide(), ex)
    assert slow["heads"] == taken["heads"] and slow["body"] == body, (ex, slow, taken)
    assert slow["final"] == taken["final"], (ex, slow, taken)


def test_whole_response_shortcut_takes_the_common_response() -> None:
    """It must fire on what origins send, or the test above proves nothing."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
    for response, method in ((ok, b"GET"), (ok[: ok.find(b"\r\n\r\n") + 4], b"HEAD")):
        codec = FastClientSide()
        codec.request_head(method, b"/", [(b"host", b"a")])
        codec.end()
        assert codec.feed_whole(response) is not None and codec.reusable
    for refused in (
        ok[:-1],  # body incomplete
        ok + b"HTTP/1.1 200 OK\r\n",  # bytes after it
        ok.replace(b"Content-Length: 5", b"Transfer-Encoding: chunked"),
        b"HTTP/1.1 100 Continue\r\n\r\n" + ok,
    ):
        codec = FastClientSide()
        codec.request_head(b"GET", b"/", [(b"host", b"a")])
        codec.end()
        assert codec.feed_whole(refused) is None, refused
    codec = FastClientSide()
    codec.request_head(b"POST", b"/", [(b"host", b"a"), (b"content-length", b"1")])
    assert codec.feed_whole(ok) is None  # the request is not ended: the general path decides
