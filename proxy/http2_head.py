"""An HTTP/2 request's header block as the exchange's request head (RFC 9113 §8.3, RFC 8441).

Why a module of its own: the exchange takes one shape of request head whatever the client
spoke, and turning HTTP/2's pseudo-headers into it has rules of its own, each a way a
request could be seen two ways if done loosely:

- ``:authority`` is the one view of the host (§8.3.1): it becomes the Host the router and
  the origin see, and a Host field next to it is dropped, never a second opinion.
- Cookie crumbs (§8.2.3: one ``cookie`` field per cookie, for HPACK's sake) are joined with
  "; " into the one field an HTTP/1.1 origin expects.
- The block is checked here, not by h2 (whose validation runs it through seven generators
  and cost ~10 us a request): what h2 refused is refused here as a malformed request
  (:class:`Malformed`, a stream error, RFC 9113 §8.1.1): a field name empty, uppercase or with
  a byte outside §8.2.1's set, a value with a control byte (NUL, CR, LF, and any other but
  HTAB, as on HTTP/1.1) or with whitespace at either end, a connection-specific field or TE
  other than "trailers" (§8.2.2), a pseudo-header unknown, repeated, after a regular field, or
  the wrong set for the method (§8.3.1, RFC 8441 §4), ``:path`` empty, no ``:authority`` nor
  Host, two Hosts, or a Host other than ``:authority``.
- An extended CONNECT with ``:protocol websocket`` (RFC 8441 §4) becomes an HTTP/1.1
  Upgrade: GET, ``Upgrade: websocket``, and a fresh ``Sec-WebSocket-Key`` (the HTTP/2 client
  sends none; the origin's 101 is then checked against this key).
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Sequence

from proxy.http1 import ProtocolError, RequestHead

# §8.2.1: a name byte outside 0x21-0x7e, uppercase, or a colon (pseudo-headers are matched
# whole against _PSEUDO before this applies)
_BAD_NAME = re.compile(rb"[^\x21-\x39\x3b-\x40\x5b-\x7e]")
# §8.2.1 (NUL, CR, LF; the other controls but HTAB as the HTTP/1.1 parser refuses them, since
# the value goes on to an HTTP/1.1 origin) and whitespace at either end
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]|\A[ \t]|[ \t]\Z")
_CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade")
)
_PSEUDO = frozenset((b":method", b":scheme", b":authority", b":path", b":protocol"))


class Malformed(ValueError):
    """A header block RFC 9113 §8.1.1 calls malformed: answered with RST_STREAM
    PROTOCOL_ERROR on its stream, never a response. ``field`` is the offending name."""

    def __init__(self, reason: str, field: bytes = b"") -> None:
        super().__init__(f"{reason}: {field!r}" if field else reason)
        self.reason = reason
        self.field = field


def _check_field(name: bytes, value: bytes) -> None:
    if not name or _BAD_NAME.search(name) is not None:
        raise Malformed("field name empty, uppercase or with a byte outside RFC 9113 §8.2.1", name)
    if value and _BAD_VALUE.search(value) is not None:
        raise Malformed("field value with a control byte or whitespace at an end", name)
    if name in _CONNECTION_SPECIFIC or (name == b"te" and value.lower() != b"trailers"):
        raise Malformed("connection-specific field (RFC 9113 §8.2.2)", name)


def check_trailers(fields: Sequence[tuple[bytes, bytes]]) -> None:
    """A trailer block: regular fields only, each as in a request head (§8.1)."""
    for name, value in fields:
        if name[:1] == b":":
            raise Malformed("pseudo-header in trailers", name)
        _check_field(name, value)


def request_head(fields: Sequence[tuple[bytes, bytes]], end_stream: bool) -> RequestHead:
    """The request head for a HEADERS block: :class:`Malformed` for a block RFC 9113 refuses,
    :class:`ProtocolError` with the status to answer on the stream when the request is one
    the proxy does not serve."""
    method = scheme = path = authority = protocol = host = None
    headers: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    seen: set[bytes] = set()
    regular = False
    for name, value in fields:
        if name[:1] == b":":
            if regular:
                raise Malformed("pseudo-header after a regular field", name)
            if name not in _PSEUDO:
                raise Malformed("unknown pseudo-header", name)
            if name in seen:
                raise Malformed("repeated pseudo-header", name)
            seen.add(name)
            if value and _BAD_VALUE.search(value) is not None:
                raise Malformed("field value with a control byte or whitespace at an end", name)
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name == b":scheme":
                scheme = value
            else:
                protocol = value
            continue
        regular = True
        _check_field(name, value)
        if name == b"cookie":
            cookies.append(value)
        elif name == b"host":
            if host is not None:
                raise Malformed("two Host fields", name)
            host = value
        else:
            headers.append((name, value))
    if method is None:
        raise Malformed("no :method")
    if method == b"CONNECT" and protocol is None:
        if scheme is not None or path is not None:
            raise Malformed("CONNECT with :scheme or :path (RFC 9113 §8.5)")
    else:
        if scheme is None or path is None:
            raise Malformed("no :scheme or no :path")
        if protocol is not None and method != b"CONNECT":
            raise Malformed(":protocol on a method other than CONNECT (RFC 8441 §4)")
        if not path:
            raise Malformed("empty :path")
    if authority is None and host is None:
        raise Malformed("no :authority and no Host (RFC 9113 §8.3.1)")
    if authority is not None and host is not None and host != authority:
        raise Malformed("Host other than :authority (RFC 9113 §8.3.1)")
    authority = authority or host
    if not authority:
        raise ProtocolError(400, "missing :authority (and Host)")
    path = path or b""
    protocol = protocol or b""
    headers.insert(0, (b"host", authority))
    if cookies:
        headers.append((b"cookie", b"; ".join(cookies)))
    if method == b"CONNECT":
        if protocol.lower() != b"websocket":
            # a forward proxy's tunnel (or another protocol): not what a reverse proxy serves
            raise ProtocolError(501, "CONNECT is served only for :protocol websocket")
        method = b"GET"
        headers += [
            (b"upgrade", b"websocket"),
            (b"connection", b"upgrade"),
            (b"sec-websocket-key", base64.b64encode(os.urandom(16))),
        ]
        if not any(n == b"sec-websocket-version" for n, _ in headers):
            headers.append((b"sec-websocket-version", b"13"))
        end_stream = True  # the DATA that follows is the session's, not a request body
    del scheme  # the listener's scheme is what X-Forwarded-Proto says, as on HTTP/1.1
    expect = any(n == b"expect" and v.lower() == b"100-continue" for n, v in headers)
    return RequestHead(method, path or b"/", headers, b"1.1", expect, not end_stream)
