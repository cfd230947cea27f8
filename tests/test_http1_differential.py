"""h11 is the strictness bar for the llhttp request parser: the same bytes, split the same way,
must be accepted or refused by both, and parsed to the same fields when accepted.

Inputs: the hostile heads of the proxy fuzz test, valid requests with Content-Length and
chunked bodies, and those valid requests with one byte inserted, replaced or removed (where
parsers differ in practice: a stray CR, a control byte, a lost colon). Every input is cut at
random points into several ``feed()`` calls, then EOF.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.http1 import CLOSED, NEED_DATA, PAUSED, Body, End, ProtocolError, RequestHead, ServerSide
from tests.test_proxy_fuzz import head as hostile_head
from tests.test_proxy_fuzz import token

pytest.importorskip("httptools")

from proxy.http1_fast import FastRequestParser, FastServerSide

value_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20
).map(str.strip)
plain_headers = st.lists(
    st.tuples(
        token.filter(lambda t: t.lower() not in ("host", "content-length", "transfer-encoding")),
        value_text,
    ),
    max_size=5,
)
target = st.one_of(
    st.sampled_from(["/", "/a/b?c=d", "*", "http://app.test/x", "/%20"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/?&=%._~-", max_size=20).map(
        lambda s: "/" + s
    ),
)


@st.composite
def valid_request(draw: st.DrawFn) -> bytes:
    """A request both parsers must accept: optional body, CL or chunked, maybe pipelined."""
    method = draw(st.one_of(st.sampled_from(["GET", "POST", "PUT", "HEAD", "OPTIONS"]), token))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]))
    headers = [("Host", draw(st.sampled_from(["app.test", "a.b:8080"])))]
    headers += draw(plain_headers)
    body = draw(st.binary(max_size=64))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    if version == "HTTP/1.0" and framing == "chunked":
        framing = "length"
    payload = b""
    if framing == "length":
        headers.append(("Content-Length", str(len(body))))
        payload = body
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", draw(st.sampled_from(["chunked", "Chunked"]))))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        for piece in pieces:
            if piece:
                ext = draw(st.sampled_from(["", ";x=1", ";name"]))
                # RFC 9112 chunk-size is 1*HEXDIG: leading zeros past h11's 20 digits included
                zeros = b"0" * draw(st.sampled_from([0, 0, 0, 1, 25]))
                payload += b"%s%x%s\r\n%s\r\n" % (zeros, len(piece), ext.encode(), piece)
        payload += draw(st.sampled_from([b"0", b"0", b"00", b"0" * 30])) + b"\r\n"
        for name, value in draw(st.lists(st.tuples(token, value_text), max_size=2)):
            payload += f"{name}: {value}\r\n".encode()
        payload += b"\r\n"
    order = draw(st.permutations(headers))
    # RFC 9112 2.2: empty lines (CRLF) before a request line are skipped, here and before
    # the next request on the connection
    raw = b"\r\n" * draw(st.sampled_from([0, 0, 0, 1, 2]))
    raw += f"{method} {draw(target)} {version}\r\n".encode()
    raw += b"".join(f"{n}: {v}\r\n".encode() for n, v in order) + b"\r\n" + payload
    if draw(st.booleans()):
        raw += b"\r\n" * draw(st.sampled_from([0, 0, 1]))
        raw += b"GET /next HTTP/1.1\r\nHost: app.test\r\n\r\n"  # pipelined: must stay unparsed
    return raw


@st.composite
def mutated_request(draw: st.DrawFn) -> bytes:
    """A valid request with one byte inserted, replaced or deleted."""
    raw = draw(valid_request())
    at = draw(st.integers(0, len(raw) - 1))
    byte = draw(st.sampled_from(b'\r\n\x00\x0b\x7f\x80\xff :;\t,"') | st.integers(0, 255))
    how = draw(st.sampled_from(["insert", "replace", "delete"]))
    if how == "insert":
        return raw[:at] + bytes([byte]) + raw[at:]
    if how == "replace":
        return raw[:at] + bytes([byte]) + raw[at + 1 :]
    return raw[:at] + raw[at + 1 :]


@st.composite
def split(draw: st.DrawFn, raw: st.SearchStrategy[bytes]) -> list[bytes]:
    """The bytes, cut at random points into several feeds (1 to 5 pieces)."""
    data = draw(raw)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return [p for p in pieces if p]  # b"" is EOF to both parsers


def run(parser: Any, chunks: list[bytes]) -> tuple[Any, ...]:
    """Drive one request through a parser, then EOF.

    ("error", status) when refused before End; otherwise (fields, how the stream went on after
    End or stopped before it): "paused", "closed", "need-data" or "error".
    """
    fields: dict[str, Any] = {"body": b""}
    try:
        for chunk in [*chunks, b""]:
            parser.feed(chunk)
            while True:
                event = parser.next_event()
                if event is NEED_DATA:
                    break
                if event is CLOSED or event is PAUSED:
                    return (fields, repr(event))
                if isinstance(event, RequestHead):
                    fields["head"] = (
                        event.method,
                        event.target,
                        event.http_version,
                        event.headers,
                        event.expect_continue,
                        event.has_body,
                    )
                elif isinstance(event, Body):
                    fields["body"] += event.data
                elif isinstance(event, End):
                    fields["trailers"] = event.trailers
                else:
                    raise AssertionError(f"unexpected event {event!r}")
    except ProtocolError as e:
        if "trailers" in fields:
            assert 400 <= e.status < 600
            return (fields, "error")  # a request was parsed, the bytes after it were not HTTP
        return ("error", e.status)
    return (fields, "need-data")


def fast_is_stricter(raw: bytes, slow: tuple[Any, ...], fast: tuple[Any, ...]) -> bool:
    """The documented places where llhttp plus our rules refuse what h11 lets through.

    Each is a hole in h11 the proxy should close (ServerSide included), not a leniency to copy.
    """
    if fast[0] != "error" or slow[0] == "error":
        return False
    head = slow[0].get("head")
    if head is None:
        return False
    # h11 takes LF alone as the end of a trailer line (or of the trailer block), any byte but
    # LF in a chunk extension, and spaces after the chunk size; llhttp refuses all three
    if (b"transfer-encoding", b"chunked") in head[3]:
        last_chunk = raw[raw.rfind(b"\n0") + 1 :]
        if BARE_LF.search(last_chunk) or odd_chunk_ext(raw) or CHUNK_SIZE_WS.search(raw):
            return True
        # obs-fold in a trailer: ServerSide refuses it in the head only, llhttp everywhere
        if b"\n " in last_chunk or b"\n\t" in last_chunk:
            return True
    # h11 takes a Content-Length list of equal values ("5, 5") as one value; the fast parser
    # refuses it (a list is what one hop reads as 5 and another as invalid or as the first)
    if re.search(rb"\ncontent-length:[^\n]*,", raw, re.IGNORECASE):
        return True
    # h11 takes any visible bytes as a target; llhttp only the RFC 9112 forms (origin "/p",
    # absolute "scheme://host", asterisk "*", authority "host:port" for CONNECT)
    if not TARGET_FORM.match(head[1]):
        return True
    # h11 forwards control bytes other than NUL/CR/LF/VT/FF in a header value (RFC 9110 has
    # none but HTAB); the fast parser refuses them
    return any(CTL.search(v) for _, v in head[3] + slow[0].get("trailers", []))


def check(chunks: list[bytes]) -> None:
    slow = run(ServerSide(), chunks)
    fast = run(FastRequestParser(), chunks)
    raw = b"".join(chunks)
    if slow[0] == "error" and fast[0] == "error":
        assert 400 <= slow[1] < 600 and 400 <= fast[1] < 600, (raw, slow, fast)
        return
    if fast_is_stricter(raw, slow, fast):
        return
    assert slow == fast, (raw, slow, fast)


CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
TARGET_FORM = re.compile(
    rb"/|\*\Z|[^/?#]*:[0-9]+\Z"
    rb"|[A-Za-z]+://[-A-Za-z0-9._~%!$&'()*+,;=:@\[\]]*(?:[/?#]|\Z)"
)
BARE_LF = re.compile(rb"(?<!\r)\n")
_PARAM = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+(?:=(?:[-!#$%&'*+.^_`|~0-9a-zA-Z]+|\"[^\"\\\r\n]*\"))?"
CHUNK_EXT = re.compile(rb"\n[0-9A-Fa-f]+;([^\n]*)\n")
CHUNK_EXT_OK = re.compile(_PARAM + rb"(?:;" + _PARAM + rb")*\r")


def odd_chunk_ext(raw: bytes) -> bool:
    """A chunk extension outside name[=token|"quoted"] (spaces, NUL, bare CR, open quote)."""
    return any(not CHUNK_EXT_OK.fullmatch(m.group(1)) for m in CHUNK_EXT.finditer(raw))


CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
TARGET_FORM = re.compile(
    rb"/|\*\Z|[^/?#]*:[0-9]+\Z"
    rb"|[A-Za-z]+://[-A-Za-z0-9._~%!$&'()*+,;=:@\[\]]*(?:[/?#]|\Z)"
)
BARE_LF = re.compile(rb"(?<!\r)\n")
CHUNK_SIZE_WS = re.compile(rb"\n[0-9A-Fa-f]+[ \t]")
CHUNKED = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
# every test here runs on the compiled shortcuts (proxy._whole) and on the pure ones
pytestmark = pytest.mark.usefixtures("whole_impl")
SETTINGS = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(split(hostile_head))
def test_hostile_heads_agree(chunks: list[bytes]) -> None:
    check(chunks)


@SETTINGS
@given(split(valid_request()))
@example([b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"])
def test_valid_requests_agree(chunks: list[bytes]) -> None:
    slow = run(ServerSide(), chunks)
    assert "trailers" in slow[0], (chunks, slow)  # the generator must make requests h11 accepts
    check(chunks)


@SETTINGS
@given(split(mutated_request()))
@example([b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n"])
@example([b"GET /\x80 HTTP/1.1\r\nHost: a\r\n\r\n"])
@example([b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"])
@example([b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello"])
@example([b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello"])
@example(
    [b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n"]
)
@example([b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n"])
@example([b"GET / HTTP/2.0\r\n\r\n"])
@example([b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\n\r\n"])
@example([b"PURGEX / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n"])
@example([b"\r\r\rGET / HTTP/1.1\r\nHost: a\r\n\r\n"])
@example([b"\n\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"])
@example([b"\r\n\n", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"])
@example([b"\r\n\r", b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"])
@example([CHUNKED + b"0" * 29 + b"79\r\n" + b"x" * 0x79 + b"\r\n0\r\n\r\n"])
@example([CHUNKED + b"0" * 20 + b"f" * 16 + b"\r\nabc"])
@example([CHUNKED + b"1" + b"0" * 16 + b"\r\nabc"])
@example([CHUNKED + b"f" * 20 + b"\r\nabc"])
@example([CHUNKED, b"0" * 10000, b"0" * 10000 + b"1\r\nx\r\n0\r\n\r\n"])
def test_mutated_requests_agree(chunks: list[bytes]) -> None:
    check(chunks)


# -- the response side: FastServerSide frames responses as h11 does --------------------------


@st.composite
def exchange(draw: st.DrawFn) -> tuple[bytes, int, list[tuple[bytes, bytes]], list[bytes]]:
    """A request h11 accepts, and a response to it the proxy could hand over (headers already
    rewritten: no hop-by-hop ones, Content-Length only when it matches the body)."""
    method = draw(st.sampled_from(["GET", "HEAD", "POST", "OPTIONS"]))
    version = draw(st.sampled_from(["1.1", "1.1", "1.0"]))
    connection = draw(st.sampled_from(["", "close", "keep-alive", "Close, foo"]))
    raw = f"{method} /x HTTP/{version}\r\nHost: app.test\r\n"
    if connection:
        raw += f"Connection: {connection}\r\n"
    status = draw(st.sampled_from([200, 201, 204, 206, 304, 404, 500, 503]))
    bodiless = method == "HEAD" or status in (204, 304)
    pieces = [] if bodiless else draw(st.lists(st.binary(min_size=0, max_size=40), max_size=4))
    headers = [(n.lower().encode(), v.encode()) for n, v in draw(plain_headers)]
    if draw(st.booleans()) and status not in (204, 304):
        length = sum(map(len, pieces)) if method != "HEAD" else draw(st.integers(0, 99))
        headers.insert(draw(st.integers(0, len(headers))), (b"content-length", b"%d" % length))
    return (raw + "\r\n").encode(), status, headers, pieces


def respond(codec: Any, request: bytes, status: int, headers: Any, pieces: list[bytes]) -> Any:
    codec.feed(request)
    while not isinstance(codec.next_event(), End):
        pass
    out = codec.response_head(status, list(headers), b"Reason")
    out += b"".join(codec.body(p) for p in pieces) + codec.end()
    return out, codec.keep_alive, codec.response_started, codec.request_complete


@SETTINGS
@given(exchange())
@example((b"GET / HTTP/1.0\r\nHost: a\r\n\r\n", 200, [], [b"abc"]))
@example((b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", 200, [], []))
@example((b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 200, [(b"content-length", b"3")], [b"abc"]))
def test_response_framing_matches_h11(case: tuple[bytes, int, Any, list[bytes]]) -> None:
    """Byte for byte the same response as h11's, and the same keep-alive verdict."""
    slow = respond(ServerSide(), *case)
    fast = respond(FastServerSide(), *case)
    assert slow == fast, (case, slow, fast)


def normalised(response: bytes) -> tuple[bytes, list[bytes], bytes]:
    """Status line, header lines (names lowercased, sorted) and body: h11 moves the framing
    headers it sets to the end, title-cased; the order of fields carries no meaning."""
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    fields = sorted(n.lower() + b":" + v for n, _, v in (line.partition(b":") for line in lines))
    return status, fields, body


@pytest.mark.parametrize(
    "request_bytes",
    [b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"GET / HTTP/1.0\r\n\r\n", b"garbage\r\n\r\n"],
)
def test_error_response_matches_h11(request_bytes: bytes) -> None:
    """The error answer before, during and after a parse: same bytes, then nothing more."""
    for detail in ("", "no route for host 'x'"):
        answers = []
        for codec in (ServerSide(), FastServerSide()):
            with (
                pytest.raises(ProtocolError)
                if request_bytes.startswith(b"garbage")
                else contextlib.nullcontext()
            ):
                codec.feed(request_bytes)
                codec.next_event()
            first = codec.error_response(421, detail, [(b"retry-after", b"1")])
            answers.append((normalised(first), codec.error_response(500)))
        assert answers[0] == answers[1]
        assert answers[0][0][0] == b"HTTP/1.1 421 Misdirected Request"
        assert answers[0][1] == b""


def test_informational_matches_h11() -> None:
    for status, headers in ((100, []), (103, [(b"link", b"</a.css>; rel=preload")])):
        answers = []
        for codec in (ServerSide(), FastServerSide()):
            codec.feed(
                b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n"
            )
            assert isinstance(codec.next_event(), RequestHead)
            answers.append(codec.informational(status, headers))
        assert answers[0] == answers[1], answers


# -- the whole-head shortcut: never a different answer than the general path ------------------

any_target = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12)
any_value = st.binary(max_size=12).filter(lambda v: b"\r" not in v and b"\n" not in v)


@st.composite
def simple_request(draw: st.DrawFn) -> bytes:
    """Heads near the shortcut's edge: any visible target, any value bytes, Connection lists,
    zero or two Hosts, HTTP/1.0."""
    method = draw(st.sampled_from(["GET", "HEAD", "DELETE", "CONNECT", "PURGE"]) | token)
    version = draw(st.sampled_from(["1.1", "1.1", "1.0"]))
    lines = [f"{method} /{draw(any_target)} HTTP/{version}".encode()]
    headers = [(b"Host", draw(st.sampled_from([b"app.test", b"a.b:80", b"x y"])))]
    headers *= draw(st.sampled_from([1, 1, 1, 0, 2]))
    for name, value in draw(st.lists(st.tuples(token, any_value), max_size=4)):
        headers.append((name.encode(), value))
    if draw(st.booleans()):
        headers.append(
            (b"Connection", draw(st.sampled_from([b"close", b"keep-alive", b"x, Close"])))
        )
    order = draw(st.permutations(headers))
    return (
        b"\r\n".join(
            lines + [n + b":" + draw(st.sampled_from([b"", b" ", b"\t "])) + v for n, v in order]
        )
        + b"\r\n\r\n"
    )


def whole_then_general(raw: bytes) -> None:
    """When the shortcut takes ``raw``, h11 and the general path take it with the same fields,
    and the codec is left in the same state: same End, same response bytes and keep-alive
    verdict, same handling of the next request."""
    whole = FastServerSide()
    head = whole.feed_whole(raw)
    if head is None:
        return
    fields = (head.method, head.target, head.http_version, head.headers, False, False)
    slow = run(ServerSide(), [raw])
    assert slow[0] != "error" and slow[0]["head"] == fields, (raw, slow, fields)
    general = FastServerSide()
    general.feed(raw)
    assert general.next_event() == head
    for codec in (whole, general):
        assert codec.next_event() == End([])
        assert codec.next_event() is NEED_DATA
    outputs = []
    for codec in (whole, general):
        out = codec.response_head(200, [(b"content-length", b"3")]) + codec.body(b"abc")
        out += codec.end()
        outputs.append((out, codec.keep_alive))
        if codec.keep_alive:
            codec.start_next()
            codec.feed(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
            outputs.append(codec.next_event())
    assert outputs[: len(outputs) // 2] == outputs[len(outputs) // 2 :], (raw, outputs)


@SETTINGS
@given(st.one_of(simple_request(), valid_request(), mutated_request(), hostile_head))
@example(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
@example(b"GET /a#b HTTP/1.1\r\nHost: a\r\nX: \x80\t y \t\r\n\r\n")
def test_whole_head_shortcut_agrees(raw: bytes) -> None:
    whole_then_general(raw)


def test_whole_head_shortcut_takes_the_common_request() -> None:
    """The shortcut must actually fire on what clients send, or the test above proves nothing."""
    raw = (
        b"GET /api/items?page=2 HTTP/1.1\r\nHost: app.example\r\nUser-Agent: curl/8.5\r\n"
        b"Accept: */*\r\nConnection: keep-alive\r\n\r\n"
    )
    head = FastServerSide().feed_whole(raw)
    assert head is not None and head.target == b"/api/items?page=2"
    for refused in (
        raw.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n"),  # a body (even empty)
        raw + b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",  # pipelined: the general path holds it
        raw[:-2],  # incomplete
        raw.replace(b"Host: app.example\r\n", b""),  # no Host: the general path answers 400
        raw.replace(b"GET", b"CONNECT"),
    ):
        assert FastServerSide().feed_whole(refused) is None, refused
    parser = FastServerSide()
    parser.feed(b"GET / HTTP/1.1\r\n")
    assert parser.feed_whole(b"Host: a\r\n\r\n") is None  # part of a head already held


# -- request-line versions and bare LF: one answer from both paths, status included ----------
# Both were holes on the h11 path until ServerSide closed them (HTTP/2.0 was proxied, a bare
# LF ended a line); these list every form, so the two paths cannot drift apart on them again.

VERSION_FORMS = [f"HTTP/{major}.{minor}" for major in range(10) for minor in range(10)] + [
    *("HTTP/2", "HTTP/1", "HTTP/3", "HTTP/1.10", "HTTP/11.1", "HTTP/01.1", "HTTP/1.01"),
    *("http/1.1", "Http/1.1", "HTTPS/1.1", "HTTP1.1", "HTTP /1.1", "HTTP/ 1.1", "HTTP/1 .1"),
    *("HTTP/1.1 ", "HTTP/1.1\t", "HTTP/-1.1", "HTTP/1.1x", "HTTP/1.a", "HTTP/a.1", "HTTP/"),
    *("", "HTTP/2.0 HTTP/1.1", "HTTP/\u00b9.1"),
]


def version_answer(version: str, host: bool) -> int:
    """0 (accepted) or the status both paths must answer. RFC 9112 2.3 / RFC 9110 15.6.6: 505
    for a well-formed HTTP-version this server does not serve (0.9, 1.2, 2.0, ...: llhttp's
    1.x minor-version leniency is not copied, no HTTP/1.2 exists); a malformed one is 400."""
    if not re.fullmatch(r"HTTP/[0-9]\.[0-9]", version):
        return 400
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        return 505
    return 400 if version == "HTTP/1.1" and not host else 0


@pytest.mark.parametrize("host", [True, False], ids=["host", "no-host"])
@pytest.mark.parametrize("method", ["GET", "POST", "PURGEX"])  # PURGEX: the h11 fallback
@pytest.mark.parametrize("version", VERSION_FORMS)
def test_request_line_versions_agree(version: str, method: str, host: bool) -> None:
    raw = f"{method} /a {version}\r\n{'Host: a' if host else 'X: y'}\r\n\r\n".encode()
    want = version_answer(version, host)
    for cut in range(len(raw)):  # every split in two feeds: the line whole or in halves
        chunks = [c for c in (raw[:cut], raw[cut:]) if c]
        slow = run(ServerSide(), chunks)
        fast = run(FastServerSide(), chunks)
        assert slow == fast, (chunks, slow, fast)
        if want:
            assert slow == ("error", want), (chunks, slow)
        else:
            assert slow[0]["head"][2] == version[5:].encode(), (chunks, slow)
    if not want:
        whole_then_general(raw)


@SETTINGS
@given(
    st.text(alphabet="HTPShtp/0123456789. \t-x", max_size=10) | st.from_regex(r"HTTP/\d\.\d\Z"),
    st.sampled_from(["GET", "PURGEX"]),
    st.booleans(),
)
@example("HTTP/2.0", "GET", False)
def test_any_version_text_agrees(version: str, method: str, host: bool) -> None:
    """Version text beyond the list above: the same answer from both paths, the one expected."""
    raw = f"{method} /a {version}\r\n{'Host: a' if host else 'X: y'}\r\n\r\n".encode()
    slow = run(ServerSide(), [raw])
    assert slow == run(FastServerSide(), [raw]), (raw, slow)
    want = version_answer(version, host)
    assert slow == ("error", want) if want else "trailers" in slow[0], (raw, slow)


BARE_LF_HEADS = [
    b"GET /a HTTP/1.1\r\nHost: a\r\nX: 1\r\nY: 2\r\n\r\n",
    b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\na\nb",
    CHUNKED + b"3\r\na\nb\r\n0\r\n\r\n",
    b"PURGEX /a HTTP/1.0\r\nHost: a\r\nX: 1\r\n\r\n",
    b"GET /a HTTP/1.0\r\n\r\n",
]


def line_ends(raw: bytes) -> list[int]:
    """Where each CRLF of the head starts: after the request line, after each field, and the
    empty line that ends the head (an LF in a body is data, not a line end)."""
    head = raw[: raw.find(b"\r\n\r\n") + 4]
    return [m.start() for m in re.finditer(b"\r\n", head)]


@pytest.mark.parametrize("raw", BARE_LF_HEADS)
def test_bare_lf_in_the_head_agrees(raw: bytes) -> None:
    """RFC 9112 2.2 lets a recipient take a lone LF as a line end (MAY); both paths refuse it
    (400), as nginx's strict mode and llhttp do: a proxy that splits lines where the hop
    behind it does not is where request smuggling starts. Each CRLF of the head in turn, then
    all of them, becomes LF; every split of the bytes in two feeds is tried."""
    ok = run(ServerSide(), [raw])
    assert "trailers" in ok[0] and ok == run(FastServerSide(), [raw]), ok  # LF in a body is data
    ends = line_ends(raw)
    variants = [raw[:at] + raw[at + 1 :] for at in ends]
    variants.append(raw[: ends[-1] + 2].replace(b"\r\n", b"\n") + raw[ends[-1] + 2 :])
    for bad in variants:
        for cut in range(len(bad)):
            chunks = [c for c in (bad[:cut], bad[cut:]) if c]
            slow = run(ServerSide(), chunks)
            fast = run(FastServerSide(), chunks)
            assert slow == fast == ("error", 400), (chunks, slow, fast)
        assert FastServerSide().feed_whole(bad) is None, bad
