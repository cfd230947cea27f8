"""The upstream HTTP/1.1 codec on httptools (llhttp), held to h11's behaviour: the hot path.

``proxy.http1.ClientSide`` (h11) costs tens of µs per proxied exchange; ``FastClientSide`` does
the same job in a few. h11 stays the bar: for the same calls and bytes it yields the same
events (same ``ResponseHead`` fields, same body bytes, same trailers, same errors as
``ProtocolError(502)``) and the same ``reusable``/``trailing_data()``, which
``tests/test_http1_client_differential.py`` checks on random valid, mutated and hostile
responses. Every place where it knowingly differs is listed below and in that test.

Writing (requests out) needs no parser: the head is serialized here exactly as h11 writes it
(Host first, names as given, Content-Length lists folded to one value, Transfer-Encoding
lowercased) after h11's checks (token names, field values, method, target, exactly one Host,
one Transfer-Encoding and only ``chunked``, equal Content-Lengths), and the body is framed from
those headers: ``%x`` chunks and ``0\\r\\n\\r\\n``, or Content-Length counted, or no body at all.
What h11 refuses to send raises ``SendError`` (the caller catches ``Exception``).

Reading (responses in). Heads are buffered to CRLFCRLF; the status line is matched here with
h11's grammar (``HTTP/d.d SP 3DIGIT [SP reason]``: any d.d version, as h11, keep-alive only from
1.1; no reason at all accepted, as h11; status 000-099 refused); the header block goes to
llhttp behind a fixed ``HTTP/1.1 200`` status line, so llhttp only splits and checks header
lines and never decides framing from an odd status or version. llhttp in its strict default
refuses bare CR, bare LF, obs-fold, control bytes and non-token names there, so the happy path
runs no scan of its own over the head: each scan would cost about as much as llhttp's whole
parse. When llhttp refuses a block, a small parser with h11's exact header grammar
(``_fields_h11``) decides instead, so what llhttp refuses but h11 accepts still goes through
with h11's fields: control bytes other than NUL/VT/FF in a value (real cookies carry \x01), a
Content-Length past 2**64, obs-fold (joined with one SP as h11 does; RFC 9112 5.2 lets a proxy
do this or answer 502). Without httptools installed, that parser does all the work (slower).

Then, as h11: header names lowercased, values stripped of SP/HTAB; 1xx heads are events and the
next head follows; 101 needs an Upgrade in the request (else 502), a 2xx to CONNECT switches
too; after a switch ``trailing_data()`` is what followed the head. No body for HEAD, 204 and
304 (whatever the headers say); chunked if Transfer-Encoding, else Content-Length, else the
body runs to EOF. Transfer-Encoding must be one header of exactly ``chunked`` (any case, handed
on lowercased); Content-Length at most 20 digits. HTTP/1.0 (any version below 1.1) or
``Connection: close`` on the final response, or ``Connection: close`` in the request, mean the
connection is not reusable, and bytes after such a response are a 502 once the message ended.
A head, chunk line or trailer block still incomplete past 16 KiB is a 502 at the same byte as
h11 (its ``max_incomplete_event_size``; like h11, a complete head that came in one read is not
limited). EOF before the end of a response is a 502, and so is EOF before any byte of it (h11:
ConnectionClosed in SEND_RESPONSE), not CLOSED.

Chunked bodies are decoded here, not by llhttp: the framer that must find the end of the message
(so bytes after it are never parsed) reads every chunk header anyway, and doing it with h11's
chunk grammar (``chunk-size [";" anything] OWS CRLF``) keeps what llhttp would refuse and h11
takes (spaces after the size, loose chunk extensions). The chunk-size is RFC 9112's
``1*HEXDIG`` up to 2**64 - 1, with the line at most 16 KiB, in ``ClientSide`` too
(``proxy.http1.CHUNK_SIZE``); a size line that can no longer become valid fails at once.
Content-Length bodies are sliced without a parser. Trailers go through the same header-block
path as heads (h11 checks them with the same rules, Content-Length and Transfer-Encoding
included).

Deliberately STRICTER than h11 (502 here, accepted by h11), each a framing ambiguity a proxy
should not resolve by guessing:

- bare LF as a line end in a head or a trailer block (h11 takes LF alone; RFC 9112 2.2 only
  allows it); a bare LF or CR in an incomplete head fails at once rather than at a timeout;
- more than one Content-Length, or a list (``5, 5``), which h11 folds when the values agree;
- Content-Length and Transfer-Encoding together (h11 lets Transfer-Encoding win; RFC 9112 6.3
  lets a recipient treat it as an error, and it is the classic desync).

Deliberately LESS REUSABLE than h11 (``reusable`` False where h11 says True; never the reverse):
bytes already received after the response (h11 keeps them as trailing data of a reusable
connection, but they would be lost with this one-exchange codec and misalign the next
response), and a response delimited by EOF (h11 reports DONE until it processes the EOF).

One instance serves one request/response exchange; ``request_head`` comes before any ``feed``.
Events are parsed when bytes are fed and queued; properties reflect events already taken.
"""

from __future__ import annotations

import re
import sys
import time
from collections import deque
from itertools import chain
from typing import Final

from proxy import whole
from proxy.http1 import (
    CLIENT_MAX_INCOMPLETE,
    CLOSED,
    NEED_DATA,
    PAUSED,
    SWITCHED,
    Body,
    ClientSide,
    End,
    Event,
    Headers,
    ProtocolError,
    ResponseHead,
    check_chunk_line_prefix,
    chunk_line_size,
    comma_items,
)

# imported here, not by proxy.http1: the h11 path must keep working without it. A flag, not
# httptools = None: the name stays the typed module wherever the flag says it was imported
try:
    import httptools

    HAVE_HTTPTOOLS = True
except ImportError:  # pragma: no cover - exercised only on installs without httptools
    HAVE_HTTPTOOLS = False

MAX_INCOMPLETE: Final = CLIENT_MAX_INCOMPLETE  # what ClientSide's h11 buffers of one event

# the grammar both paths share (token, target, field values, status line, framing names):
# defined once, in proxy.whole, whose shortcuts must read bytes exactly as this module does
# h11's field-value: visible bytes, obs-text and controls but NUL/VT/FF/CR/LF, with inner SP/HTAB
_FIELD_CONTENT: Final = rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?"
_FIELD: Final = re.compile(b"(" + whole.TOKEN_CHARS + b"):[ \t]*(" + _FIELD_CONTENT + b")[ \t]*")
_BAD_EOL: Final = re.compile(rb"(?<!\r)\n|\r(?=[^\n])")  # bare LF, or CR before a byte but LF
_SYNTH: Final = b"HTTP/1.1 200 \r\n"  # what llhttp sees in place of the real status line
_ORIGIN: Final = "bad response from origin: "

# reading states
_HEAD, _LENGTH, _CHUNKED, _UNTIL_EOF, _DONE, _SWITCHED = range(6)
# inside a chunked body
_SIZE, _DATA, _CRLF, _TRAILER = range(4)


class SendError(ValueError):
    """What h11 raises as LocalProtocolError when sending: the request cannot go as given."""


def _fail(reason: str) -> ProtocolError:
    return ProtocolError(502, _ORIGIN + reason)


def _fields_h11(block: bytes) -> Headers:
    """A header block (lines and the final CRLF) by h11's grammar, where llhttp refused it.

    Lines end at CRLF only (a bare CR or LF fails the field pattern); an obs-fold line joins
    the previous one with one SP, as h11 does.
    """
    lines: list[bytes] = []
    for line in block[:-4].split(b"\r\n") if len(block) > 2 else ():
        if line[:1] in (b" ", b"\t"):
            if not lines:
                raise _fail("continuation line at start of headers")
            lines[-1] += b" " + line.lstrip(b" \t")
        else:
            lines.append(line)
    headers = []
    for line in lines:
        m = _FIELD.fullmatch(line)
        if m is None:
            raise _fail(f"illegal header line: {line[:80]!r}")
        headers.append((m[1].lower(), m[2]))
    return headers


def _framing(headers: Headers) -> tuple[int, bool, bool]:
    """h11's Content-Length/Transfer-Encoding rules, ours on top (module docstring), and
    ``Connection: close``: returns (Content-Length or -1, chunked, close)."""
    length = -1
    chunked = False
    close = False
    for i, (name, value) in enumerate(headers):
        if name not in whole.FRAMING:
            continue
        if name == b"content-length":
            if length >= 0:
                raise _fail("more than one Content-Length")
            if not whole.CONTENT_LENGTH.fullmatch(value):
                raise _fail(f"bad Content-Length: {value[:40]!r}")
            length = int(value)
        elif name == b"transfer-encoding":
            if chunked:
                raise _fail("more than one Transfer-Encoding")
            if value != b"chunked":
                if value.lower() != b"chunked":
                    raise _fail("only Transfer-Encoding: chunked is supported")
                headers[i] = (name, b"chunked")  # h11 hands it on lowercased
            chunked = True
        elif b"close" in value.lower() and b"close" in comma_items(value):
            close = True
    if chunked and length >= 0:
        raise _fail("both Content-Length and Transfer-Encoding")
    return length, chunked, close


def _send_framing(
    headers: Headers, lowered: list[bytes]
) -> tuple[Headers, bytes, bool, bool, bool]:
    """h11's rules for the headers it frames a request by: Content-Length values folded to
    one (repeats dropped), one Transfer-Encoding of ``chunked`` (lowercased), and whether the
    request asks to close or to upgrade. Returns (headers, Content-Length, chunked, close,
    upgrade)."""
    out: Headers = []
    length = b""
    chunked = close = upgrade = False
    for (name, value), low in zip(headers, lowered, strict=True):
        if low == b"content-length":
            items = {item.strip() for item in value.split(b",")}
            if len(items) != 1:
                raise SendError("conflicting Content-Length headers")
            value = items.pop()
            if not whole.CONTENT_LENGTH.fullmatch(value):
                raise SendError("bad Content-Length")
            if length:
                if value != length:
                    raise SendError("conflicting Content-Length headers")
                continue  # h11 drops a repeated, equal Content-Length
            length = value
        elif low == b"transfer-encoding":
            if chunked:
                raise SendError("multiple Transfer-Encoding headers")
            value = value.lower()
            if value != b"chunked":
                raise SendError("only Transfer-Encoding: chunked is supported")
            chunked = True
        elif low == b"connection":
            close = close or b"close" in comma_items(value)
        elif low == b"upgrade":
            upgrade = upgrade or bool(comma_items(value))
        out.append((name, value))
    return out, length, chunked, close, upgrade


class FastClientSide:
    """``proxy.http1.ClientSide`` for one exchange, on llhttp: requests out, responses in."""

    __slots__ = (
        "_answered",
        "_buf",
        "_chunk",
        "_clear_on",
        "_complete",
        "_connect",
        "_eof",
        "_error",
        "_events",
        "_fields",
        "_head_request",
        "_keep_alive",
        "_left",
        "_scanned",
        "_send_chunked",
        "_send_left",
        "_sent",
        "_state",
        "_upgrade",
    )

    def __init__(self) -> None:
        # -- request (ours)
        self._sent = 0  # 0 nothing, 1 head sent (body may follow), 2 ended, -1 a send failed
        self._send_chunked = False
        self._send_left = 0  # Content-Length bytes still owed
        self._head_request = False  # HEAD: whatever the response says, it has no body
        self._connect = False  # h11's switch proposals: CONNECT, and an Upgrade header
        self._upgrade = False
        self._answered = False  # a final response without a switch was taken: proposals over
        self._keep_alive = True
        # -- response (theirs)
        self._state = _HEAD
        self._buf = b""  # unparsed bytes: part of a head or chunk line, or trailing data
        self._scanned = 0  # bytes of an incomplete head/trailer block already searched
        self._left = 0  # Content-Length or chunk bytes to come (or CRLF bytes after a chunk)
        self._chunk = _SIZE
        self._events: deque[Event] = deque()
        self._error: ProtocolError | None = None
        self._eof = False
        self._clear_on: ResponseHead | None = None  # the head whose taking answers proposals
        self._fields: Headers = []  # llhttp's on_header collects here
        self._complete = False

    # -- request ---------------------------------------------------------------------------------

    def request_head(self, method: bytes, target: bytes, headers: Headers) -> bytes:
        """The request line and headers, as h11 writes them; framing for ``body``/``end``."""
        if self._sent:
            self._sent = -1  # as h11: a send in the wrong state is an error state
            raise SendError("a request was already started on this exchange")
        fast = whole.request_head(method, target, headers)
        if fast is not None:  # the common head: bodiless, nothing to reframe, framing as new
            self._sent = 1
            self._head_request = method == b"HEAD"
            self._connect = method == b"CONNECT"
            return fast
        # h11 checks while building its Request event, before its state changes: a refused
        # head leaves this codec as it was
        if not whole.TOKEN.fullmatch(method):
            raise SendError("illegal method characters")
        if not whole.TARGET.fullmatch(target):
            raise SendError("illegal target characters")
        # every name and value in one match: LF joins them (neither may hold one, as counted)
        flat = b"\n".join(chain.from_iterable(headers))
        if flat.count(b"\n") != 2 * len(headers) - 1 or not whole.HEADERS.fullmatch(flat):
            raise SendError("illegal header name or value")
        lowered = [name.lower() for name, _ in headers]
        if lowered.count(b"host") != 1:
            raise SendError("HTTP/1.1 needs exactly one Host header")
        chunked = close = upgrade = False
        length = b""
        if not whole.SEND_FRAMING.isdisjoint(lowered):
            headers, length, chunked, close, upgrade = _send_framing(headers, lowered)
            lowered = [name.lower() for name, _ in headers]
        host = lowered.index(b"host")
        if host:  # h11 writes Host first
            headers = [headers[host], *headers[:host], *headers[host + 1 :]]
        self._sent = 1
        self._send_chunked = chunked
        self._send_left = 0 if chunked or not length else int(length)
        self._head_request = method == b"HEAD"
        self._connect = method == b"CONNECT"
        self._upgrade = upgrade
        if close:
            self._keep_alive = False
        lines = b"\r\n".join(map(b": ".join, headers))
        return b"%s %s HTTP/1.1\r\n%s\r\n\r\n" % (method, target, lines)

    def body(self, data: bytes) -> bytes:
        """A piece of the request body, framed as the head said."""
        if self._sent != 1:
            self._sent = -1
            raise SendError("no request body can be sent now")
        if self._send_chunked:
            return b"%x\r\n%s\r\n" % (len(data), data) if data else b""
        left = self._send_left - len(data)
        if left < 0:
            self._sent = -1
            raise SendError("too much data for declared Content-Length")
        self._send_left = left
        return data

    def end(self) -> bytes:
        """The end of the request: the last chunk, or nothing."""
        if self._sent != 1:
            self._sent = -1
            raise SendError("no request can be ended now")
        if self._send_chunked:
            self._sent = 2
            return b"0\r\n\r\n"
        if self._send_left:
            self._sent = -1
            raise SendError("too little data for declared Content-Length")
        self._sent = 2
        return b""

    # -- llhttp callbacks ------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        self._complete = True

    # -- response --------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Give bytes from the origin (``b""`` for EOF); events are parsed now and queued."""
        if self._error is not None or self._eof:
            return
        state = self._state
        if state == _LENGTH and data:
            self._length(data)
        elif not data:
            self._eof = True
            if state == _UNTIL_EOF:
                self._end([], b"")
            elif state == _HEAD:
                self._error = _fail(
                    "origin closed in the middle of the response head"
                    if self._buf
                    else "origin closed the connection without a response"
                )
            elif state != _DONE and state != _SWITCHED:
                self._error = _fail("origin closed in the middle of the response body")
        elif state == _HEAD:
            self._heads(self._buf + data if self._buf else data)
        elif state == _CHUNKED:
            self._chunked(self._buf + data if self._buf else data)
        elif state == _UNTIL_EOF:
            self._events.append(Body(data))
        else:  # after the message or the switch: kept for trailing_data()
            self._buf += data

    def feed_whole(self, data: bytes) -> tuple[ResponseHead, bytes] | None:
        """The common response, parsed in one step: final, framed by Content-Length (or
        bodiless), and exactly ``data``, nothing before or after it.

        The hot path's shortcut past the event queue and llhttp's callbacks: the header block
        must match h11's field grammar in its narrowest form, so llhttp and h11 would both
        read it, to the same fields. Returns the head and the body, and leaves the state
        ``feed`` then ``next_event`` (head, body, End) would leave: checked on random
        responses in ``tests/test_http1_client_differential.py``. Anything else returns None
        and changes nothing, so the general path decides, errors included.
        """
        if (
            self._state != _HEAD
            or self._buf
            or self._sent != 2
            or self._connect
            or self._upgrade
            or self._eof
            or self._error is not None
        ):
            return None
        got = whole.parse_response(data, self._head_request)
        if got is None:
            return None
        version, status, reason, headers, not_reusable, body_at = got
        if not_reusable:
            self._keep_alive = False
        self._state = _DONE
        return ResponseHead(status, reason, headers, version), data[body_at:]

    def _length(self, data: bytes) -> None:
        """Content-Length body bytes: sliced, no parser."""
        left = self._left
        if len(data) < left:
            self._left = left - len(data)
            self._events.append(Body(data))
            return
        self._left = 0
        self._events.append(Body(data[:left] if len(data) > left else data))
        self._end([], data[left:])

    def _end(self, trailers: Headers, rest: bytes) -> None:
        self._events.append(End(trailers))
        self._state = _DONE
        self._buf = rest

    def _heads(self, buf: bytes) -> None:
        """Parse complete heads at the start of ``buf``: 1xx ones, then the final one."""
        while True:
            end = buf.find(b"\r\n\r\n", self._scanned - 3 if self._scanned > 3 else 0)
            if end < 0:
                self._buf = buf
                self._incomplete(buf, "response head")
                if self._error is None and buf[:5] != b"HTTP/"[: len(buf)]:
                    self._error = _fail(f"illegal status line: {buf[:40]!r}")
                return
            self._scanned = 0
            try:
                head = self._response_head(buf[: end + 4])
            except ProtocolError as e:
                self._buf = buf
                self._error = e
                return
            self._events.append(head)
            rest = buf[end + 4 :]
            state = self._state
            if state == _HEAD:  # informational: the next head follows
                if not rest:
                    self._buf = b""
                    return
                buf = rest
                continue
            self._buf = b""
            if state == _LENGTH:
                if rest:
                    self._length(rest)
            elif state == _CHUNKED:
                self._chunked(rest)
            elif state == _UNTIL_EOF:
                if rest:
                    self._events.append(Body(rest))
            else:
                if state == _DONE:  # a response without a body
                    self._events.append(End([]))
                self._buf = rest
            return

    def _incomplete(self, buf: bytes, what: str) -> None:
        """h11's limit on what it buffers while waiting, and an early end to bare line ends."""
        if len(buf) > MAX_INCOMPLETE:
            self._error = _fail(f"{what} larger than {MAX_INCOMPLETE} bytes")
        elif _BAD_EOL.search(buf, self._scanned - 1 if self._scanned else 0):
            self._error = _fail(f"bare CR or LF in the {what}")
        self._scanned = len(buf)

    def _response_head(self, head: bytes) -> ResponseHead:
        """One complete head (CRLFCRLF included): the event, and the state it leads to."""
        m = whole.STATUS_LINE.match(head)
        if m is None:
            line = head[: head.find(b"\r\n")]
            raise _fail(f"illegal status line: {line[:80]!r}")
        version, code, reason = m.groups()
        status = int(code)
        if status < 100:
            raise _fail(f"status code {status} out of range")
        headers = self._parse_fields(head[m.end() :])
        length, chunked, close = _framing(headers)
        event = ResponseHead(status, reason or b"", headers, version)
        if status < 200:
            if status == 101:
                if not self._upgrade:
                    raise _fail("101 Switching Protocols to a request without Upgrade")
                self._state = _SWITCHED
            return event  # other 1xx: _HEAD again, for the final response
        if self._connect and status < 300:
            self._state = _SWITCHED
            return event
        if self._connect or self._upgrade:
            self._clear_on = event  # the proposals are answered (no switch) once it is taken
        if close or version < b"1.1":
            self._keep_alive = False
        if status == 204 or status == 304 or self._head_request:
            self._state = _DONE  # _heads adds the End
        elif chunked:
            self._state = _CHUNKED
            self._chunk = _SIZE
        elif length > 0:
            self._state = _LENGTH
            self._left = length
        elif length == 0:
            self._state = _DONE
        else:
            self._state = _UNTIL_EOF
        return event

    def _parse_fields(self, block: bytes) -> Headers:
        """A header block by llhttp, or by h11's grammar where llhttp refuses it."""
        if not HAVE_HTTPTOOLS:
            return _fields_h11(block)
        fields: Headers
        self._fields = fields = []
        self._complete = False
        try:
            httptools.HttpResponseParser(self).feed_data(_SYNTH + block)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return _fields_h11(block)
        if not self._complete:  # not expected with a block ending in CRLFCRLF
            return _fields_h11(block)
        return fields

    def _chunked(self, buf: bytes) -> None:
        """Decode a chunked body with h11's chunk grammar, up to the end of the message."""
        events = self._events
        pos = 0
        n = len(buf)
        while pos < n:
            sub = self._chunk
            if sub == _DATA:
                left = self._left
                if left >= n - pos:
                    events.append(Body(buf[pos:] if pos else buf))
                    self._left = left - (n - pos)
                    pos = n
                    if self._left:
                        break
                else:
                    events.append(Body(buf[pos : pos + left]))
                    pos += left
                self._chunk, self._left = _CRLF, 2
            elif sub == _CRLF:
                want = b"\r\n"[2 - self._left :]
                got = buf[pos : pos + len(want)]
                if not want.startswith(got):
                    self._error = _fail(f"malformed chunk footer: {got!r}")
                    self._buf = buf[pos:]
                    return
                pos += len(got)
                self._left -= len(got)
                if not self._left:
                    self._chunk = _SIZE
            elif sub == _SIZE:
                eol = buf.find(b"\r\n", pos)
                try:
                    if eol < 0:
                        check_chunk_line_prefix(buf[pos:], MAX_INCOMPLETE)
                        break
                    size = chunk_line_size(buf[pos : eol + 2], MAX_INCOMPLETE)
                except ValueError as e:
                    self._error = _fail(str(e))
                    self._buf = buf[pos:]
                    return
                pos = eol + 2
                if size:
                    self._chunk, self._left = _DATA, size
                else:
                    self._chunk = _TRAILER
                    self._scanned = 0
            else:  # trailers: an empty line, or header lines and an empty line
                if buf.startswith(b"\r\n", pos):
                    self._end([], buf[pos + 2 :])
                    return
                end = buf.find(b"\r\n\r\n", pos + (self._scanned - 3 if self._scanned > 3 else 0))
                if end < 0:
                    break
                try:
                    trailers = self._parse_fields(buf[pos : end + 4])
                    _framing(trailers)  # h11 checks trailers with the same rules
                except ProtocolError as e:
                    self._error = e
                    self._buf = buf[pos:]
                    return
                self._end(trailers, buf[end + 4 :])
                return
        rest = buf[pos:] if pos else buf
        self._buf = rest
        if self._chunk == _TRAILER:
            self._incomplete(rest, "trailer block")

    def next_event(self) -> Event:
        """The next event; ``ProtocolError(502)`` once the response is broken."""
        events = self._events
        if events:
            event = events.popleft()
            if event is self._clear_on:
                self._answered = True
            return event
        if self._error is not None:
            raise self._error
        state = self._state
        if state == _DONE:
            if self._buf:
                if not self._keep_alive or self._sent < 0:
                    # h11's MUST_CLOSE: nothing may follow such a response
                    self._error = _fail("data after a response that closes the connection")
                    raise self._error
                return PAUSED
            return CLOSED if self._eof else NEED_DATA
        if state == _SWITCHED:
            return SWITCHED
        return NEED_DATA

    # -- state -----------------------------------------------------------------------------------

    @property
    def reusable(self) -> bool:
        """Request and response both complete, nothing after them, the connection kept open."""
        return (
            self._sent == 2
            and self._state == _DONE
            and not self._events
            and self._keep_alive
            and not self._buf
            and not self._eof
            and self._error is None
        )

    @property
    def request_complete(self) -> bool:
        """h11's ``our_state in (DONE, MUST_CLOSE, CLOSED)``: ended, and no switch pending."""
        return self._sent == 2 and (self._answered or not (self._connect or self._upgrade))

    def trailing_data(self) -> bytes:
        """Bytes received and not parsed: after the 101 head (WebSocket frames) or the message."""
        return self._buf


def _bench(rounds: int = 20000) -> None:
    """Print µs per typical exchange for h11 (ClientSide) and llhttp (this module)."""
    request = [
        (b"host", b"app.example"),
        (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0"),
        (b"accept", b"text/html,application/xhtml+xml"),
        (b"accept-encoding", b"gzip, deflate, br"),
        (b"x-forwarded-for", b"192.0.2.10"),
        (b"x-forwarded-proto", b"https"),
    ]
    response = (
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.25.3\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 13\r\n"
        b"Connection: keep-alive\r\nCache-Control: no-cache\r\n\r\nHello, world!"
    )
    batch = 1000
    for name, factory in (("h11 ClientSide", ClientSide), ("httptools FastClientSide", None)):
        make = factory or FastClientSide
        best_in = best_all = float("inf")
        for _ in range(max(rounds // batch, 5)):
            codecs = [make() for _ in range(batch)]
            t0 = time.perf_counter()
            for c in codecs:
                c.request_head(b"GET", b"/api/v1/items?page=2", request)
                c.end()
            t1 = time.perf_counter()
            for c in codecs:
                c.feed(response)
                while not isinstance(c.next_event(), End):
                    pass
                assert c.reusable
            t2 = time.perf_counter()
            best_in = min(best_in, (t2 - t1) / batch)
            best_all = min(best_all, (t2 - t0) / batch)
        print(
            f"{name:26s} {best_in * 1e6:6.2f} µs per response in (6 headers, 13-byte body), "
            f"{best_all * 1e6:6.2f} µs with the request head out"
        )


if __name__ == "__main__":
    if not HAVE_HTTPTOOLS:
        sys.exit("httptools is not installed")
    _bench()
