"""HTTP/1.1 for the proxy, sans I/O: bytes in, events out; events in, bytes out.

The proxy core talks to these interfaces only, never to a parser's API: the event types here
are shared by the h11 codecs below (the strictness bar, ``proxy.http_parser = "h11"``) and
the llhttp ones in ``proxy.http1_fast`` and ``proxy.http1_fast_client`` (the default, held to
these by differential tests). Here h11 does the framing; this module adds what a reverse
proxy in front of real origins must refuse on top of what h11 accepts (request smuggling
vectors h11 tolerates: both Content-Length and Transfer-Encoding, repeated Content-Length,
obs-fold), and separates the limits operators configure: request line (414) and header
block (431).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import h11

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

STATUS_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    417: "Expectation Failed",
    421: "Misdirected Request",
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
        first = buf.find(b"\r\n")
        if (first < 0 and len(buf) > max_line) or first > max_line:
            raise ProtocolError(414, f"request line longer than {max_line} bytes")
        if len(buf) > max_head:
            raise ProtocolError(431, f"request head larger than {max_head} bytes")
        return 0
    if end + 4 > max_head:
        raise ProtocolError(431, f"request head larger than {max_head} bytes")
    return end + 4


def _check_raw_head(head: bytes, max_line: int) -> None:
    """Checks h11 does not make, on the raw request head (up to and including CRLFCRLF)."""
    line_end = head.find(b"\r\n")
    if line_end > max_line:
        raise ProtocolError(414, f"request line longer than {max_line} bytes")
    if b"\n " in head or b"\n\t" in head:
        raise ProtocolError(400, "obsolete line folding in a header")
    if b"\r" in head.replace(b"\r\n", b""):
        raise ProtocolError(400, "bare CR in the request head")
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
        buf = self._pending.lstrip(b"\r\n") if self._h.their_state is h11.IDLE else self._pending
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

    def informational(self, status: int, headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
        reason = STATUS_REASONS.get(status, "").encode()
        return self._h.send(
            h11.InformationalResponse(status_code=status, headers=list(headers), reason=reason)
        )

    def response_head(self, status: int, headers: Headers, reason: bytes = b"") -> bytes:
        reason = reason or STATUS_REASONS.get(status, "").encode()
        return self._h.send(h11.Response(status_code=status, headers=headers, reason=reason))

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

    def release(self) -> None:
        """The connection is done with HTTP (closed, or a tunnel now): nothing to free here;
        the llhttp codec breaks its parser's reference cycle."""


class ClientSide:
    """The upstream connection: requests out, responses in."""

    def __init__(self) -> None:
        self._h = h11.Connection(h11.CLIENT)

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
