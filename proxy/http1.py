"""HTTP/1.1 for the proxy, sans I/O: bytes in, events out; events in, bytes out.

The proxy core talks to these interfaces only, never to a parser's API: the event types here
are shared by the h11 codecs below (the strictness bar, ``proxy.http_parser = "h11"``) and
the llhttp ones in ``proxy.http1_fast`` and ``proxy.http1_fast_client`` (the default, held to
these by differential tests). Here h11 does the framing; this module adds what a reverse
proxy in front of real origins must refuse on top of what h11 accepts (request smuggling
vectors h11 tolerates: both Content-Length and Transfer-Encoding, repeated Content-Length,
obs-fold, a bare LF as a line end; versions but 1.0 and 1.1 get a 505), and separates the
limits operators configure: request line (414) and header block (431).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import h11
from h11._readers import ChunkedReader
from h11._receivebuffer import ReceiveBuffer as _ReceiveBuffer

Headers = list[tuple[bytes, bytes]]


class ProtocolError(Exception):
    """The peer broke HTTP/1.1; ``status`` is what the proxy answers (downstream side)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    headers: Headers
    http_version: bytes
    expect_continue: bool
    has_body: bool


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    headers: Headers
    http_version: bytes

    @property
    def informational(self) -> bool:
        return 100 <= self.status < 200


@dataclass(slots=True)
class Body:
    data: bytes


@dataclass(slots=True)
class End:
    trailers: Headers


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA: Final = _Sentinel("NEED_DATA")
CLOSED: Final = _Sentinel("CLOSED")  # the peer closed cleanly between messages
PAUSED: Final = _Sentinel("PAUSED")  # a message ended; call start_next() for the next one
SWITCHED: Final = _Sentinel("SWITCHED")  # 101 accepted: the rest is not HTTP

Event = RequestHead | ResponseHead | Body | End | _Sentinel

# what ClientSide's h11 buffers of an incomplete event (h11's default), FastClientSide too
CLIENT_MAX_INCOMPLETE: Final = 16384
# the request versions served: any other well-formed HTTP/d.d is a 505 on both paths (RFC 9112
# 2.3, RFC 9110 15.6.6), where h11 alone would frame 0.9 or 2.0 as 1.x and llhttp alone calls
# some malformed (400). HTTP/1.2-1.9 too, though RFC 9110 6.2 says a recipient SHOULD take them
# as 1.1: no such version is defined, and llhttp refuses them on the hot path
HTTP_VERSIONS: Final = frozenset((b"1.0", b"1.1"))

STATUS_REASONS = {
    100: "Continue",
    101: "Switching Protocols",
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    417: "Expectation Failed",
    421: "Misdirected Request",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


# h11's header line in its narrowest form (token ":" OWS, visible bytes, obs-text, SP and HTAB,
# CRLF), for the whole-message shortcuts of both fast codecs: a block that matches is read to
# the same fields by h11 and by llhttp. Possessive quantifiers: linear time on any input.
WHOLE_TOKEN: Final = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]++"
WHOLE_LINES: Final = rb"(?:" + WHOLE_TOKEN + rb":[\t\x20-\x7e\x80-\xff]*+\r\n)*+"
WHOLE_FIELD: Final = re.compile(b"(" + WHOLE_TOKEN + rb"):[ \t]*+([\t\x20-\x7e\x80-\xff]*+)\r\n")


def comma_items(value: bytes) -> list[bytes]:
    """h11's ``get_comma_header`` for one value: its lowercased, stripped, non-empty items
    (Connection, Upgrade), for the llhttp codecs that must read these lists as h11 does."""
    return [item.strip() for item in value.lower().split(b",") if item.strip()]


def error_message(
    status: int, detail: str, extra: Sequence[tuple[bytes, bytes]]
) -> tuple[bytes, Headers]:
    """Body and headers of the proxy's own error answers, whichever codec frames them: a
    short text naming the status and why, and a close (the answer ends the connection)."""
    text = f"{status} {STATUS_REASONS.get(status, '')}\n".encode()
    if detail:
        text += detail.encode("utf-8", "replace")[:512] + b"\n"
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(text)).encode()),
        (b"connection", b"close"),
        *extra,
    ]
    return text, headers


def head_size(buf: bytes, max_line: int, max_head: int) -> int:
    """Bytes of the complete request head at the start of ``buf`` (CRLFCRLF included), or 0
    while it is incomplete; 414 or 431 as soon as a limit is passed, not when it completes."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if buf.count(b"\n") != buf.count(b"\r\n"):
            # a bare LF is no line end here (see skip_empty_lines): "X: y\n\r\n" would
            # otherwise wait for a CRLFCRLF that never comes, and get a 408, not a 400
            raise ProtocolError(400, "bare LF in the request head")
        first = buf.find(b"\r\n")
        if (first < 0 and len(buf) > max_line) or first > max_line:
            raise ProtocolError(414, f"request line longer than {max_line} bytes")
        if len(buf) > max_head:
            raise ProtocolError(431, f"request head larger than {max_head} bytes")
        return 0
    if end + 4 > max_head:
        raise ProtocolError(431, f"request head larger than {max_head} bytes")
    return end + 4


def skip_empty_lines(buf: bytes) -> bytes:
    """``buf`` without the empty lines a client may send before a request line.

    RFC 9112 2.2: a server SHOULD ignore at least one empty line (CRLF) before the request
    line, for clients that send an extra CRLF after a POST body. Only CRLF pairs are empty
    lines here: a bare CR is no line end anywhere in HTTP/1.1, and a bare LF is one only by
    the leniency (RFC 9112 2.2, MAY) these codecs refuse in a head, so ``\r\r\rGET`` and
    ``\n\nGET`` are 400 in both codec families, as the same bytes inside a head are. A last
    CR alone may be half of a CRLF still in flight: it is kept, to be judged with what follows.
    (h11 itself takes no empty line at all before a request; the codecs skip them before h11
    sees the head.)
    """
    first = buf[:1]
    if first != b"\r" and first != b"\n":
        return buf
    rest = buf.lstrip(b"\r\n")
    lead = len(buf) - len(rest)
    pairs = lead // 2
    if buf[: 2 * pairs] != b"\r\n" * pairs or (lead % 2 and (rest or buf[lead - 1] != 13)):
        raise ProtocolError(400, "bare CR or LF before the request line")
    return b"\r" if lead % 2 else rest


# RFC 9112 7.1: chunk-size = 1*HEXDIG, so any number of leading zeros (nginx and HAProxy take
# them; h11 0.16 caps the size at 20 digits, see _Chunks). At most 16 significant digits:
# the size must fit in 64 bits, which is llhttp's own bound (it answers "Chunk size overflow"
# from 2**64 on), so both codec families refuse exactly the same sizes; 2**64 - 1 is already
# far past any body a proxy relays. Possessive: linear time, and no backtracking into the
# zeros lets a 17th significant digit pass. Group 1 holds the significant digits (b"" for 0).
CHUNK_SIZE: Final = rb"(?=[0-9A-Fa-f])0*+([0-9A-Fa-f]{0,16}+)"
# h11's chunk header with that size: size, any extension but LF, OWS, CRLF
CHUNK_LINE: Final = re.compile(CHUNK_SIZE + rb"(?:;.*)?[ \t]*\r\n")
# what can still grow into a CHUNK_LINE: a malformed size line fails before its CRLF arrives,
# as it does in llhttp, so the proxy can refuse it before it contacts an origin
_CHUNK_LINE_PREFIX: Final = re.compile(rb"(?:" + CHUNK_SIZE + rb"(?:;[^\n]*+|[ \t]*+\r?))?")


def chunk_line_size(line: bytes, limit: int) -> int:
    """The size of a complete chunk header line (CRLF included); ValueError if it is
    malformed, overflows 64 bits, or is longer than ``limit`` bytes (the codec's limit on
    an incomplete event: without it, leading zeros would be a way to make a proxy buffer
    any amount of one line)."""
    if len(line) > limit:
        raise ValueError(f"chunk header line longer than {limit} bytes")
    m = CHUNK_LINE.fullmatch(line)
    if m is None:
        raise ValueError(f"illegal chunk header: {line[:80]!r}")
    return int(m[1] or b"0", 16)


def check_chunk_line_prefix(partial: bytes, limit: int) -> None:
    """ValueError if ``partial`` (a chunk header line without its CRLF yet) cannot become a
    valid one of at most ``limit`` bytes; never for a prefix that still can."""
    if len(partial) >= limit:  # the line with its LF at least would pass the limit
        raise ValueError(f"chunk header line longer than {limit} bytes")
    if not _CHUNK_LINE_PREFIX.fullmatch(partial):
        raise ValueError(f"illegal chunk header: {partial[:80]!r}")


class _Chunks(ChunkedReader):
    """h11's chunked body reader, with RFC 9112's chunk-size in place of h11's.

    h11 0.16 reads ``chunk-size`` as ``1*20HEXDIG`` (h11._abnf.chunk_size: "an upper-limit to
    avoid ridiculosity"), so 21 digits with leading zeros are a 400 where the RFC, nginx,
    HAProxy and llhttp take them, and 17 to 20 significant digits pass where llhttp
    overflows. The chunk header grammar is the only thing replaced: data, footers and
    trailers are h11's own code (``super().__call__``). Installed per connection, as the
    reader h11 chose for the message once it is chunked (``_use_rfc_chunks``), rather than
    by patching h11's module-level regex for the whole process.
    ``tests/test_http1_edges.py`` pins h11's own reader still refusing 21 digits: when it
    stops, this class can go.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self._limit = limit

    def __call__(self, buf: _ReceiveBuffer) -> h11.Data | h11.EndOfMessage | None:
        if self._reading_trailer or self._bytes_in_chunk:
            return super().__call__(buf)
        if self._bytes_to_discard:  # h11's footer check, without its fall-through to a header
            data = buf.maybe_extract_at_most(len(self._bytes_to_discard))
            if data is None:
                return None
            if data != self._bytes_to_discard[: len(data)]:
                raise h11.LocalProtocolError(f"malformed chunk footer: {bytes(data)!r}")
            self._bytes_to_discard = self._bytes_to_discard[len(data) :]
            if self._bytes_to_discard:
                return None
        line = buf.maybe_extract_next_line()
        try:
            if line is None:
                check_chunk_line_prefix(bytes(buf), self._limit)
                return None
            size = chunk_line_size(bytes(line), self._limit)
        except ValueError as e:
            raise h11.LocalProtocolError(str(e)) from None
        if size:
            self._bytes_in_chunk = size
        else:
            self._reading_trailer = True
        return super().__call__(buf)


def _use_rfc_chunks(conn: h11.Connection, limit: int) -> None:
    """Give a message h11 just framed as chunked the ``_Chunks`` reader (see there)."""
    if type(conn._reader) is ChunkedReader:
        conn._reader = _Chunks(limit)


def _check_raw_head(head: bytes, max_line: int) -> None:
    """Checks h11 does not make, on the raw request head (up to and including CRLFCRLF)."""
    line_end = head.find(b"\r\n")
    if line_end > max_line:
        raise ProtocolError(414, f"request line longer than {max_line} bytes")
    if b"\n " in head or b"\n\t" in head:
        raise ProtocolError(400, "obsolete line folding in a header")
    rest = head.replace(b"\r\n", b"")
    if b"\r" in rest:
        raise ProtocolError(400, "bare CR in the request head")
    if b"\n" in rest:
        # RFC 9112 2.2: a recipient MAY take a lone LF as a line end. Not here, on either path
        # (llhttp refuses it too): a hop that splits lines where the next one does not is
        # where request smuggling starts (a hand-typed printf "GET / HTTP/1.0\n\n" gets a 400)
        raise ProtocolError(400, "bare LF in the request head")
    lower = head.lower()
    lengths = lower.count(b"\ncontent-length:")
    if lengths > 1:
        raise ProtocolError(400, "more than one Content-Length header")
    if lengths and b"\ntransfer-encoding:" in lower:
        raise ProtocolError(400, "both Content-Length and Transfer-Encoding")


def _message_event(event: object, status: int, where: str) -> Event:
    """Body, end and close: the same on both sides of the proxy."""
    if isinstance(event, h11.Data):
        return Body(bytes(event.data))
    if isinstance(event, h11.EndOfMessage):
        return End(list(event.headers))
    if isinstance(event, h11.ConnectionClosed):
        return CLOSED
    raise ProtocolError(status, f"unexpected {type(event).__name__}{where}")


class ServerSide:
    """The downstream connection: requests in, responses out."""

    def __init__(self, max_head: int = 16384, max_line: int = 8192) -> None:
        self._h = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
        self._max_head = max_head
        self._max_line = max_line
        self._pending = b""  # head bytes held back until the head is complete and checked
        self._in_head = True

    # -- input ---------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Give bytes from the socket (``b""`` for EOF)."""
        if not self._in_head or not data:
            if self._pending and not data:
                self._flush_pending()
            self._h.receive_data(data)
            return
        self._pending += data
        self._flush_pending()

    def _flush_pending(self) -> None:
        buf = skip_empty_lines(self._pending) if self._h.their_state is h11.IDLE else self._pending
        size = head_size(buf, self._max_line, self._max_head)
        if not size:
            self._pending = buf
            return
        _check_raw_head(buf[:size], self._max_line)
        self._pending = b""
        self._in_head = False
        self._h.receive_data(buf)

    def next_event(self) -> Event:
        try:
            event = self._h.next_event()
        except h11.RemoteProtocolError as e:
            raise ProtocolError(e.error_status_hint, str(e)) from None
        if event is h11.NEED_DATA:
            return NEED_DATA
        if event is h11.PAUSED:
            return PAUSED
        if isinstance(event, h11.Request):
            if event.http_version not in HTTP_VERSIONS:  # see there; h11 takes any d.d
                raise ProtocolError(505, f"HTTP/{event.http_version.decode()} is not supported")
            _use_rfc_chunks(self._h, self._max_head)
            headers = list(event.headers)
            expect = any(n == b"expect" and v.lower() == b"100-continue" for n, v in headers)
            has_body = any(n in (b"content-length", b"transfer-encoding") for n, _ in headers)
            if has_body and any(n == b"content-length" and v == b"0" for n, v in headers):
                has_body = False
            return RequestHead(
                event.method, event.target, headers, event.http_version, expect, has_body
            )
        return _message_event(event, 400, "")

    # -- output --------------------------------------------------------------------------------

    def informational(
        self, status: int, headers: Sequence[tuple[bytes, bytes]] = (), reason: bytes = b""
    ) -> bytes:
        """A 1xx head; ``reason``: the origin's own phrase, relayed as it came."""
        reason = reason or STATUS_REASONS.get(status, "").encode()
        return self._h.send(
            h11.InformationalResponse(status_code=status, headers=list(headers), reason=reason)
        )

    def response_head(
        self, status: int, headers: Sequence[tuple[bytes, bytes]], reason: bytes = b""
    ) -> bytes:
        reason = reason or STATUS_REASONS.get(status, "").encode()
        # h11 takes a list (its annotation; it iterates any sequence): the pure path's copy
        response = h11.Response(status_code=status, headers=list(headers), reason=reason)
        return self._h.send(response)

    def body(self, data: bytes) -> bytes:
        return self._h.send(h11.Data(data=data)) or b""

    def end(self) -> bytes:
        return self._h.send(h11.EndOfMessage()) or b""

    def error_response(
        self, status: int, detail: str = "", extra: Sequence[tuple[bytes, bytes]] = ()
    ) -> bytes:
        """A complete short response that also closes the connection."""
        text, headers = error_message(status, detail, extra)
        if self._h.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return b""  # a response already started: the caller can only close
        try:
            return self.response_head(status, headers) + self.body(text) + self.end()
        except h11.LocalProtocolError:
            # h11 refuses to answer a request it never parsed: frame it ourselves
            reason = STATUS_REASONS.get(status, "").encode()
            head = b"HTTP/1.1 %d %s\r\n" % (status, reason)
            head += b"".join(n + b": " + v + b"\r\n" for n, v in headers)
            return head + b"\r\n" + text

    # -- state -----------------------------------------------------------------------------

    @property
    def response_started(self) -> bool:
        return self._h.our_state not in (h11.IDLE, h11.SEND_RESPONSE)

    @property
    def request_complete(self) -> bool:
        return self._h.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    @property
    def keep_alive(self) -> bool:
        return self._h.our_state is h11.DONE and self._h.their_state is h11.DONE

    def start_next(self) -> None:
        """Begin the next request on a kept-alive connection."""
        self._h.start_next_cycle()
        self._in_head = True
        leftover, closed = self._h.trailing_data
        if leftover:
            # pipelined bytes went into h11 unchecked: take them out and check them like any
            # other head (a fresh server-side h11 is equivalent: it keeps no per-cycle state)
            self._h = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head)
            self.feed(bytes(leftover))
            if closed:
                self.feed(b"")  # the client's EOF came with those bytes: keep it

    def trailing_data(self) -> bytes:
        return bytes(self._h.trailing_data[0])

    def check_buffered(self) -> None:
        """Raise now the ProtocolError that taking the current request's events would raise
        on the bytes (and EOF) already received; take no event.

        For the proxy, after the request head and before it contacts an origin: a chunked
        body that is already broken in the bytes that came with the head (a chunk size past
        2**64, a non-hex size, a bad chunk footer) gets its 400 with no origin connection, as
        nginx and HAProxy answer it. Never raises on a valid prefix of a body still arriving.
        The verdict is h11's own, from a copy of the connection run ahead; the copy is made
        only for a body that can be malformed (chunked) with bytes to look at, so a bodiless
        or Content-Length request costs a few attribute reads.
        """
        h = self._h
        if h.their_state is not h11.SEND_BODY:
            return
        data, closed = h.trailing_data
        if not closed and not (data and type(h._reader) is _Chunks):
            return
        ahead = copy.deepcopy(h)
        try:
            while True:
                event = ahead.next_event()
                if event is h11.NEED_DATA or type(event) is not h11.Data:
                    return
        except h11.RemoteProtocolError as e:
            raise ProtocolError(e.error_status_hint, str(e)) from None

    def release(self) -> None:
        """The connection is done with HTTP (closed, or a tunnel now): nothing to free here;
        the llhttp codec breaks its parser's reference cycle."""


class ClientSide:
    """The upstream connection: requests out, responses in."""

    def __init__(self) -> None:
        self._h = h11.Connection(h11.CLIENT, max_incomplete_event_size=CLIENT_MAX_INCOMPLETE)

    def request_head(self, method: bytes, target: bytes, headers: Headers) -> bytes:
        return self._h.send(h11.Request(method=method, target=target, headers=headers))

    def body(self, data: bytes) -> bytes:
        return self._h.send(h11.Data(data=data)) or b""

    def end(self) -> bytes:
        return self._h.send(h11.EndOfMessage()) or b""

    def feed(self, data: bytes) -> None:
        self._h.receive_data(data)

    def next_event(self) -> Event:
        try:
            event = self._h.next_event()
        except h11.RemoteProtocolError as e:
            raise ProtocolError(502, f"bad response from origin: {e}") from None
        if event is h11.NEED_DATA:
            return NEED_DATA
        if event is h11.PAUSED:
            return SWITCHED if self._h.their_state is h11.SWITCHED_PROTOCOL else PAUSED
        if isinstance(event, h11.InformationalResponse | h11.Response):
            _use_rfc_chunks(self._h, CLIENT_MAX_INCOMPLETE)
            return ResponseHead(
                event.status_code, event.reason, list(event.headers), event.http_version
            )
        return _message_event(event, 502, " from origin")

    @property
    def reusable(self) -> bool:
        return self._h.our_state is h11.DONE and self._h.their_state is h11.DONE

    @property
    def request_complete(self) -> bool:
        return self._h.our_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    def trailing_data(self) -> bytes:
        return bytes(self._h.trailing_data[0])
