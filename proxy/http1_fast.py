"""The downstream codec on httptools (llhttp), held to h11's strictness: the proxy's hot path.

``FastRequestParser`` parses requests; ``FastServerSide`` adds response framing (see its
docstring) and is the drop-in for ``proxy.http1.ServerSide``.

h11 costs most of a proxy cycle (issue 4 measured ~195 µs against ~5.5 µs for llhttp), so the
request side moves to llhttp. h11 stays the bar: ``FastRequestParser`` accepts what
``proxy.http1.ServerSide`` accepts and parses it to the same fields, which
``tests/test_http1_differential.py`` checks on random hostile and valid requests.

Rules added because llhttp (httptools 0.9, default settings) is MORE lenient than h11 here:

- The request line must be h11's ``token SP target SP HTTP/d.d`` exactly: llhttp takes several
  spaces between the parts; where one hop splits a line another does not, smuggling starts.
- Only HTTP/1.0 and 1.1 (505 for any other HTTP/d.d, ``proxy.http1.HTTP_VERSIONS``): llhttp
  takes 0.9 and 2.0 heads and frames them as 1.x, and calls 1.2 or 3.0 malformed (400). Judged
  on the raw request line before llhttp runs; ``ServerSide`` answers the same 505.
- HTTP/1.1 needs exactly one Host header (400): llhttp takes none or several, h11 does not.
- Transfer-Encoding must be exactly ``chunked`` (501, h11's status): llhttp takes a list ending
  in chunked (``gzip, chunked``), which an origin may frame differently. Handed on lowercased.
- Header values lose trailing spaces/tabs and names are lowercased, as h11 gives them: a value
  compared later (``chunked``, ``100-continue``) must not depend on the parser.

Rules where llhttp already agrees, kept as our own checks so they do not hang on llhttp's
leniency flags and also cover the h11 fallback below: the same head buffering, 414, 431 and
``_check_raw_head`` as ``ServerSide`` (CL+TE, repeated Content-Length, obs-fold, bare CR are
refused before llhttp sees the head); a visible-ASCII target; Content-Length of at most 20 digits.

Kept where llhttp (and our checks) are STRICTER than h11: known disagreements the differential
test names, each a hole in h11 rather than a leniency worth copying. A bare LF as a line end in
the trailers (in the head ``ServerSide`` refuses it too: ``_check_raw_head``); a control byte
but HTAB in a header value (h11 refuses only NUL, CR, LF, VT, FF); a chunk extension outside
``name[=token|"quoted"]`` (h11 takes any byte but LF); spaces after a chunk size; a
Content-Length list such as ``5, 5`` (h11 folds equal values); a request target in none of the
RFC 9112 forms; obs-fold in a trailer.

llhttp knows a fixed list of methods; any other token is a valid method to h11 and to origins,
so a request with an extension method goes, for that one message, to ``ServerSide`` (h11) inside
this parser, with the rules above applied to its head: slower, never different.

Bodies go to llhttp exactly up to the end of the message (Content-Length counted, chunked
tracked by a small framer), so pipelined bytes after it are held back and checked as a new head
by ``start_next()``, as ``ServerSide`` does, instead of being parsed unchecked.
"""

from __future__ import annotations

import re
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Final

from proxy import whole
from proxy.http1 import (
    CHUNK_SIZE,
    CLOSED,
    HTTP_VERSIONS,
    NEED_DATA,
    PAUSED,
    STATUS_REASONS,
    Body,
    End,
    Event,
    Headers,
    ProtocolError,
    RequestHead,
    ServerSide,
    _check_raw_head,
    comma_items,
    error_message,
    head_size,
    skip_empty_lines,
)

# imported here, not by proxy.http1: the h11 path must keep working without it. A flag, not
# httptools = None: the name stays the typed module wherever the flag says it was imported
try:
    import httptools

    HAVE_HTTPTOOLS = True
except ImportError:  # pragma: no cover - exercised only on installs without httptools
    HAVE_HTTPTOOLS = False

# RFC 9110 field-value: no control byte but HTAB (h11 refuses only NUL, CR, LF, VT, FF)
_CTL: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# the same on a whole raw head, whose CR and LF are checked apart (request line and names
# cannot hold any control byte either: llhttp refuses them there)
_CTL_HEAD: Final = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# h11's request line: exactly one SP between method, target and version
_REQUEST_LINE: Final = re.compile(
    rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+ [\x21-\x7e]+ HTTP/[0-9]\.[0-9]\r\n"
)
_DIGITS: Final = re.compile(rb"[0-9]+")
_CHUNK_SIZE: Final = re.compile(CHUNK_SIZE)


_NOTED: Final = frozenset(
    (b"connection", b"upgrade", b"expect", b"content-length", b"transfer-encoding")
)


# the headers _check_head looks at; any other costs one set lookup
_FRAMING: Final = frozenset((b"host", b"content-length", b"transfer-encoding"))


def _check_head(
    target: bytes, version: bytes, headers: Headers, values_checked: bool = False
) -> tuple[bool, int]:
    """The rules of the module docstring on a parsed head; returns (chunked, Content-Length).
    The version was judged on the raw request line already (``_flush_pending``).

    ``values_checked``: the raw head already passed ``_CTL_HEAD`` (the llhttp path), so
    values need no scan of their own; the h11 fallback's parsed heads get one.
    """
    if not whole.TARGET.fullmatch(target):
        raise ProtocolError(400, "illegal request target")
    hosts = 0
    chunked = False
    length = -1
    for i, (name, value) in enumerate(headers):
        if not values_checked and _CTL.search(value):
            raise ProtocolError(400, "illegal header value")
        if name not in _FRAMING:
            continue
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            if not _DIGITS.fullmatch(value) or len(value) > 20:
                raise ProtocolError(400, "bad Content-Length")
            length = int(value)
        elif name == b"transfer-encoding":
            if chunked or value.lower() != b"chunked":
                raise ProtocolError(501, "only Transfer-Encoding: chunked is supported")
            chunked = True
            headers[i] = (name, b"chunked")  # h11 hands it on lowercased
    if hosts > 1 or (not hosts and version == b"1.1"):
        raise ProtocolError(400, "HTTP/1.1 needs exactly one Host header")
    return chunked, length


class _Chunked:
    """Finds where a chunked body ends, so llhttp never parses past the message.

    llhttp validates the framing; this only counts it. Lines end at LF: if the client used a
    bare LF where CRLF belongs, llhttp raises on the same bytes, so the cut point is moot.
    Chunk sizes are read as llhttp reads them (any leading zeros, at most 2**64 - 1: see
    ``proxy.http1.CHUNK_SIZE``); the one rule added is the limit on a chunk size line, which
    llhttp lacks (it takes a million leading zeros), the same limit ``ServerSide`` applies.
    """

    __slots__ = ("_line", "_max_line", "_remaining", "_state")

    def __init__(self, max_line: int) -> None:
        self._state = 0  # 0 size line, 1 data, 2 CRLF after data, 3 trailer lines
        self._remaining = 0
        self._line = b""
        self._max_line = max_line

    def advance(self, data: bytes) -> int:
        """Return how many bytes of ``data`` belong to the body (all of them: not ended yet)."""
        pos = 0
        n = len(data)
        while pos < n:
            if self._state == 1:
                take = min(self._remaining, n - pos)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state, self._remaining = 2, 2
                continue
            if self._state == 2:
                take = min(self._remaining, n - pos)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = 0
                continue
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._line += data[pos:]
                # a size line with its LF would pass the limit (proxy.http1 check_chunk_line_prefix)
                if len(self._line) >= self._max_line + (self._state == 3):
                    raise ProtocolError(400, "chunk header or trailer line too long")
                return n
            line = self._line + data[pos:nl]
            self._line = b""
            pos = nl + 1
            if self._state == 3:
                if line in (b"", b"\r"):
                    return pos  # the empty line after the trailers ends the message
                continue
            if len(line) >= self._max_line:
                raise ProtocolError(400, f"chunk header line longer than {self._max_line} bytes")
            m = _CHUNK_SIZE.fullmatch(line.split(b";", 1)[0].strip(b" \t\r"))
            if m is None:
                return pos  # malformed or past 2**64: llhttp raises on these bytes
            self._remaining = int(m[1] or b"0", 16)
            self._state = 1 if self._remaining else 3
        return n


class FastRequestParser:
    """The request (input) half of ``proxy.http1.ServerSide``, on llhttp."""

    def __init__(self, max_head: int = 16384, max_line: int = 8192) -> None:
        if not HAVE_HTTPTOOLS:
            raise RuntimeError("httptools is not installed (pip install httptools)")
        self._max_head = max_head
        self._max_line = max_line
        self._pending = b""  # head bytes held until the head is complete and checked
        self._trailing = b""  # bytes after the current message: the next head, unchecked
        self._in_head = True
        self._idle = True  # no byte of the current message seen yet (leading CRLFs skipped)
        self._eof = False
        self._done = False  # End emitted: what follows is h11's DONE/MUST_CLOSE behaviour
        self._must_close = False  # h11's MUST_CLOSE: HTTP/1.0 or Connection: close
        self._switch = False  # h11's MIGHT_SWITCH_PROTOCOL: CONNECT or Upgrade proposed
        self._events: deque[Event] = deque()
        self._error: ProtocolError | None = None
        self._fallback: ServerSide | None = None  # h11 for methods llhttp does not know
        self._new_parser()

    def _new_parser(self) -> None:
        # made on first use (_parse): requests that take feed_whole() never need one
        self._p: httptools.HttpRequestParser | None = None
        self._url = b""
        self._headers: Headers = []
        self._in_trailers = False
        self._body_left = 0  # Content-Length bytes still owed to llhttp
        self._chunked: _Chunked | None = None
        self._complete = False

    # -- llhttp callbacks ------------------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        self._events.append(self._request_head())
        self._headers = []
        self._in_trailers = True

    def on_body(self, body: bytes) -> None:
        self._events.append(Body(body))

    def on_message_complete(self) -> None:
        self._complete = True
        self._events.append(End(self._headers if self._in_trailers else []))

    def _request_head(self) -> RequestHead:
        """h11's rules llhttp does not apply (see the module docstring), then the event."""
        p = self._p
        assert p is not None  # a callback: _parse() is running it
        version = p.get_http_version().encode()
        headers = self._headers
        chunked, length = _check_head(self._url, version, headers, values_checked=True)
        if chunked:
            self._chunked = _Chunked(self._max_head)
        elif length > 0:
            self._body_left = length
        method = p.get_method()
        # one pass for h11's connection rules and ServerSide's flags (verbatim, so the proxy
        # core sees the same RequestHead from either parser)
        must_close = version != b"1.1"
        switch = method == b"CONNECT"
        expect = has_body = zero_length = False
        for name, value in headers:
            if name not in _NOTED:
                continue
            if name == b"connection":
                must_close = must_close or b"close" in comma_items(value)
            elif name == b"upgrade":
                switch = switch or bool(value.strip(b", \t"))  # a non-empty list
            elif name == b"expect":
                expect = expect or value.lower() == b"100-continue"
            else:  # Content-Length or Transfer-Encoding
                has_body = True
                zero_length = zero_length or (name == b"content-length" and value == b"0")
        self._must_close = must_close
        self._switch = switch
        return RequestHead(
            method, self._url, headers, version, expect, has_body and not zero_length
        )

    # -- input -----------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Give bytes from the socket (``b""`` for EOF)."""
        if self._error is not None:
            return
        if self._fallback is not None:
            self._eof = self._eof or not data
            self._fallback.feed(data)
            return
        if not data:
            self._eof = True
            return
        if self._done:
            self._trailing += data
            return
        if self._in_head:
            self._pending += data
            self._flush_pending()
        else:
            self._feed_body(data)

    def feed_whole(self, data: bytes) -> RequestHead | None:
        """The common request, parsed in one step: a bodiless head that arrived whole.

        The hot path's shortcut past llhttp, the event queue and the checks above, for bytes
        that are exactly one head (nothing before or after it) whose every line matches h11's
        grammar in its narrowest form (origin-form target, HTTP/1.0 or 1.1, no control byte
        but HTAB, exactly one Host, none of Content-Length, Transfer-Encoding, Upgrade or
        Expect). What it returns, and the state it leaves, are what ``feed`` then
        ``next_event`` (head, then End) would give: ``tests/test_http1_differential.py``
        checks that on random heads. Anything else returns None and changes nothing: the
        general path decides, errors included, so a shortcut can never answer differently.
        The End stays queued, for the caller's usual event loop.
        """
        if (
            not self._in_head
            or self._pending
            or self._trailing
            or self._eof
            or self._error is not None
            or self._fallback is not None
            or len(data) > self._max_head
        ):
            return None
        got = whole.parse_request(data, self._max_line)
        if got is None:
            return None
        method, target, http11, headers, must_close = got
        version = b"1.1" if http11 else b"1.0"
        self._in_head = self._idle = False
        self._complete = True
        self._must_close = must_close
        self._switch = False
        self._events.append(End([]))
        self._whole(method, version)
        return RequestHead(method, target, headers, version, False, False)

    def _whole(self, method: bytes, version: bytes) -> None:
        """What a subclass records of a head (see FastServerSide)."""

    def _flush_pending(self) -> None:
        """Same buffering and limits as ``ServerSide._flush_pending``; llhttp gets whole heads."""
        buf = skip_empty_lines(self._pending) if self._idle else self._pending
        size = head_size(buf, self._max_line, self._max_head)
        if not size:
            self._pending = buf
            if buf and buf != b"\r":  # a CR alone may still be half of an empty line
                self._idle = False
            return
        end = size - 4
        head = buf[:size]
        _check_raw_head(head, self._max_line)  # bare LF and CR included
        if _CTL_HEAD.search(head):
            raise ProtocolError(400, "illegal header value")
        line = _REQUEST_LINE.match(buf)
        if line is None:
            raise ProtocolError(400, "malformed request line")
        version = buf[line.end() - 5 : line.end() - 2]  # before llhttp, which 400s some
        if version not in HTTP_VERSIONS:
            raise ProtocolError(505, f"HTTP/{version.decode()} is not supported")
        self._pending = b""
        self._in_head = False
        self._idle = False
        self._parse(buf[: end + 4])
        if self._fallback is not None:
            self._fallback.feed(buf)
            return
        if self._error is None and not self._complete and len(buf) > end + 4:
            self._feed_body(buf[end + 4 :])
        elif len(buf) > end + 4:
            self._trailing += buf[end + 4 :]

    def _feed_body(self, data: bytes) -> None:
        if self._complete:
            self._trailing += data
            return
        if self._chunked is not None:
            cut = self._chunked.advance(data)
        else:
            cut = min(self._body_left, len(data))
            self._body_left -= cut
        self._parse(data[:cut])
        if cut < len(data):
            if self._error is None and not self._complete:
                self._error = ProtocolError(400, "malformed chunked body")
            self._trailing += data[cut:]

    def _parse(self, data: bytes) -> None:
        """Run llhttp; its errors (and ours from the callbacks) surface in ``next_event``."""
        p = self._p
        if p is None:
            p = self._p = httptools.HttpRequestParser(self)
        try:
            p.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            self._error = cause if isinstance(cause, ProtocolError) else ProtocolError(400, str(e))
        except httptools.HttpParserInvalidMethodError:
            if self._fallback is None and not self._events:
                # an extension method (any token is a method): h11 takes this one message
                self._fallback = ServerSide(self._max_head, self._max_line)
            else:
                self._error = ProtocolError(400, "malformed request: invalid method")
        except httptools.HttpParserUpgrade:
            pass  # Upgrade is the relay's business; the head has been delivered already
        except httptools.HttpParserError as e:
            self._error = ProtocolError(400, f"malformed request: {e}")

    def next_event(self) -> Event:
        if self._fallback is not None:
            event = self._fallback.next_event()
            if isinstance(event, RequestHead):
                _check_head(event.target, event.http_version, event.headers)
            return event
        if self._events:
            event = self._events.popleft()
            if isinstance(event, End):
                self._done = True
            return event
        if self._error is not None:
            raise self._error
        if self._done:
            # after End, h11's connection states: the proxy decides keep-alive on the same events
            if self._switch:
                return PAUSED
            if self._trailing:
                if self._must_close:
                    raise ProtocolError(400, "data after a request that closes the connection")
                return PAUSED
            return CLOSED if self._eof else NEED_DATA
        if self._eof:
            if self._in_head:
                return CLOSED  # as ServerSide: h11 never saw the partial head
            raise ProtocolError(400, "peer closed in the middle of the request body")
        return NEED_DATA

    # -- state -----------------------------------------------------------------------------------

    def start_next(self) -> None:
        """Begin the next request on a kept-alive connection; held-back bytes are checked."""
        if self._fallback is not None:
            leftover = self._fallback.trailing_data()
            self._fallback = None
        else:
            leftover = self._trailing
        self._trailing = b""
        self._in_head = True
        self._idle = True
        self._done = False
        self._must_close = self._switch = False
        self._new_parser()
        if leftover:
            self.feed(leftover)

    def trailing_data(self) -> bytes:
        if self._fallback is not None:
            return self._fallback.trailing_data()
        return self._trailing

    def check_buffered(self) -> None:
        """``ServerSide.check_buffered``: the ProtocolError the current request's events would
        end in, given the bytes and EOF received so far, raised now; no event is taken.

        llhttp has already run over every body byte received (``feed`` parses as bytes
        arrive and queues the events), so its verdict is known: an error waiting behind
        queued events, or EOF in the middle of the body. Nothing is parsed here.
        """
        if self._fallback is not None:
            self._fallback.check_buffered()
        elif self._error is not None:
            raise self._error
        elif self._eof and not (self._in_head or self._complete):
            raise ProtocolError(400, "peer closed in the middle of the request body")

    def release(self) -> None:
        """No more input will come (connection closed, or a tunnel now). llhttp's parser
        holds this object as its protocol and this object holds the parser: a cycle only the
        cyclic GC would free, late and in bulk, ~1 KB per WebSocket session until then."""
        self._p = None


class FastServerSide(FastRequestParser):
    """``proxy.http1.ServerSide`` on llhttp: requests parsed as above, responses framed here.

    Response framing follows h11's rules for a server (RFC 9112 section 6), which the
    differential test checks by parsing both outputs with an h11 client: no body for HEAD,
    204 and 304; Content-Length kept when the origin gave one; otherwise chunked to an
    HTTP/1.1 client and close-delimited to an HTTP/1.0 one; ``Connection: close`` added when
    the connection will not be kept (the client asked, HTTP/1.0, or a close-delimited body).
    The proxy hands over headers it already rewrote (hop-by-hop ones gone), so framing
    headers are only ever added here, never merged.
    """

    def __init__(self, max_head: int = 16384, max_line: int = 8192) -> None:
        super().__init__(max_head, max_line)
        self._method = b""
        self._version = b""
        self._reset_response()

    def _reset_response(self) -> None:
        self._sent_head = False
        self._sent_end = False
        self._chunked_out = False
        self._close_out = False  # the response itself ends the connection

    def _request_head(self) -> RequestHead:
        head = super()._request_head()
        self._method = head.method
        self._version = head.http_version
        return head

    def _whole(self, method: bytes, version: bytes) -> None:
        self._method = method
        self._version = version

    # -- output ----------------------------------------------------------------------------------

    def informational(
        self, status: int, headers: Sequence[tuple[bytes, bytes]] = (), reason: bytes = b""
    ) -> bytes:
        if self._fallback is not None:
            return self._fallback.informational(status, headers, reason)
        reason = reason or STATUS_REASONS.get(status, "").encode()
        return whole.response_head(status, reason, headers)

    def response_head(
        self, status: int, headers: Sequence[tuple[bytes, bytes]], reason: bytes = b""
    ) -> bytes:
        if self._fallback is not None:
            return self._fallback.response_head(status, headers, reason)
        reason = reason or STATUS_REASONS.get(status, "").encode()
        added: Headers = []  # headers is the caller's: appended to a copy only when needed
        if not (status == 204 or status == 304 or 100 <= status < 200):
            for name, _ in headers:
                if name == b"content-length":
                    break
            else:
                if self._version == b"1.1":
                    added.append((b"Transfer-Encoding", b"chunked"))
                    self._chunked_out = self._method != b"HEAD"
                elif self._method != b"HEAD":
                    self._close_out = True  # HTTP/1.0: the body ends where the connection does
        if self._must_close or self._close_out or not self._version:
            added.append((b"Connection", b"close"))
        self._sent_head = True
        return whole.response_head(status, reason, [*headers, *added] if added else headers)

    def body(self, data: bytes) -> bytes:
        if self._fallback is not None:
            return self._fallback.body(data)
        if not data:
            return b""
        if self._chunked_out:
            return b"%x\r\n%b\r\n" % (len(data), data)
        return data

    def end(self) -> bytes:
        if self._fallback is not None:
            return self._fallback.end()
        self._sent_end = True
        return b"0\r\n\r\n" if self._chunked_out else b""

    def error_response(
        self, status: int, detail: str = "", extra: Sequence[tuple[bytes, bytes]] = ()
    ) -> bytes:
        """A complete short response that also closes the connection (see ServerSide's)."""
        if self._fallback is not None:
            return self._fallback.error_response(status, detail, extra)
        if self._sent_head:
            return b""  # a response already started: the caller can only close
        text, headers = error_message(status, detail, extra)
        self._sent_head = self._sent_end = True
        self._close_out = True
        reason = STATUS_REASONS.get(status, "").encode()
        return whole.response_head(status, reason, headers) + text

    # -- state -----------------------------------------------------------------------------------

    @property
    def response_started(self) -> bool:
        if self._fallback is not None:
            return self._fallback.response_started
        return self._sent_head

    @property
    def request_complete(self) -> bool:
        if self._fallback is not None:
            return self._fallback.request_complete
        return self._done

    @property
    def keep_alive(self) -> bool:
        if self._fallback is not None:
            return self._fallback.keep_alive
        # an Upgrade answered with a plain response stays HTTP and kept alive, as in h11
        return self._done and self._sent_end and not (self._must_close or self._close_out)

    def start_next(self) -> None:
        # the response state first: checking held-back bytes as the next head may raise, and
        # the caller then needs error_response() to answer that request, not the one before
        self._reset_response()
        super().start_next()


def _bench(rounds: int = 20000) -> None:
    """Print µs per typical request head for h11 (ServerSide) and llhttp (this module)."""
    raw = (
        b"GET /api/v1/items?page=2 HTTP/1.1\r\nHost: app.example\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0\r\n"
        b"Accept: text/html,application/xhtml+xml\r\nAccept-Encoding: gzip, deflate, br\r\n"
        b"Accept-Language: en-GB,en;q=0.5\r\nConnection: keep-alive\r\n"
        b"Cookie: session=0123456789abcdef0123456789abcdef\r\n\r\n"
    )
    for name, make in (("h11 ServerSide", ServerSide), ("httptools FastRequestParser", None)):
        factory = make or FastRequestParser
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(rounds // 5):
                p = factory()
                p.feed(raw)
                while not isinstance(p.next_event(), End):
                    pass
            best = min(best, (time.perf_counter() - t0) / (rounds // 5))
        print(f"{name:30s} {best * 1e6:7.2f} µs per request head (new parser, head + End)")


if __name__ == "__main__":
    if not HAVE_HTTPTOOLS:
        sys.exit("httptools is not installed")
    _bench()
