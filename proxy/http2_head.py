"""An HTTP/2 request's header block as the exchange's request head (RFC 9113 §8.3, RFC 8441).

Why a module of its own: the exchange takes one shape of request head whatever the client
spoke, and turning HTTP/2's pseudo-headers into it has rules of its own, each a way a
request could be seen two ways if done loosely:

- ``:authority`` is the one view of the host (§8.3.1): it becomes the Host the router and
  the origin see, and a Host field next to it is dropped, never a second opinion.
- Cookie crumbs (§8.2.3: one ``cookie`` field per cookie, for HPACK's sake) are joined with
  "; " into the one field an HTTP/1.1 origin expects.
- Connection-specific fields are refused by h2's own validation before this runs (§8.2.2).
- An extended CONNECT with ``:protocol websocket`` (RFC 8441 §4) becomes an HTTP/1.1
  Upgrade: GET, ``Upgrade: websocket``, and a fresh ``Sec-WebSocket-Key`` (the HTTP/2 client
  sends none; the origin's 101 is then checked against this key).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence

from proxy.http1 import ProtocolError, RequestHead


def request_head(fields: Sequence[tuple[bytes, bytes]], end_stream: bool) -> RequestHead:
    """The request head for a HEADERS block; :class:`ProtocolError` with the status to
    answer on the stream when the request is one the proxy does not serve."""
    method = scheme = path = authority = protocol = b""
    headers: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    host = b""
    for name, value in fields:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name == b":scheme":
                scheme = value
            elif name == b":protocol":
                protocol = value
        elif name == b"cookie":
            cookies.append(value)
        elif name == b"host":
            host = host or value
        else:
            headers.append((name, value))
    authority = authority or host
    if not authority:
        raise ProtocolError(400, "missing :authority (and Host)")
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
    elif not path:
        raise ProtocolError(400, "missing :path")
    del scheme  # the listener's scheme is what X-Forwarded-Proto says, as on HTTP/1.1
    expect = any(n == b"expect" and v.lower() == b"100-continue" for n, v in headers)
    return RequestHead(method, path or b"/", headers, b"1.1", expect, not end_stream)
