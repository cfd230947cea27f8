"""Header rewriting between client and origin: hop-by-hop out, forwarding headers in.

RFC 9110 section 7.6.1: Connection, the headers it names, and the classic hop-by-hop set
describe one connection and must not be forwarded. X-Forwarded-For from a client is kept
only when that client is a trusted proxy; otherwise anyone could forge their address.

The origin's Host is always the name the request was routed by (:mod:`proxy.target`), never
the client's header as such: for an absolute-form target the received Host is replaced
(RFC 9112 §3.2.2), and X-Forwarded-Host names the same host unless a trusted proxy in front
already told us the original one. X-Request-ID is the exchange's id
(:mod:`proxy.request_id`): a client's own is kept only from a trusted proxy.

Both rewrites run once per proxied request, so each is one pass over the headers with one
set lookup per header; whether the peer is trusted is decided once per connection
(:func:`is_trusted`), not per request.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Sequence

from proxy import accel

Headers = list[tuple[bytes, bytes]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
VIA = b"1.1 originpool"
_FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
# every name either rewrite looks at; any other header is copied with one set lookup
_REQUEST_SPECIAL = HOP_BY_HOP | _FORWARDED | {b"expect", b"host", b"via", b"x-request-id"}
_RESPONSE_SPECIAL = HOP_BY_HOP | {b"via"}
_WEBSOCKET = [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]


def _tokens(value: bytes) -> set[bytes]:
    if b"," not in value:  # the usual "keep-alive" or "close": no list to split
        token = value.strip().lower()
        return {token} if token else set()
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


def is_trusted(ip: str, trusted: Sequence[Network]) -> bool:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    return any(addr in net for net in trusted)


def to_origin(
    headers: Sequence[tuple[bytes, bytes]],
    *,
    client_ip: bytes,
    scheme: bytes,
    trusted_peer: bool,
    host: bytes,
    request_id: bytes,
    websocket: bool = False,
) -> Headers:
    """The request headers as the origin should see them.

    ``host``: the authority the request was routed by, sent as Host whatever the client's
    Host said. ``trusted_peer``: the client is a trusted proxy, so its X-Forwarded-* are
    extended rather than replaced.
    """
    out: Headers = []
    listed: set[bytes] = set()
    forwarded_for: list[bytes] = []
    proto = fwd_host = b""
    via: list[bytes] = []
    for item in headers:
        name = item[0]
        if name not in _REQUEST_SPECIAL:
            out.append(item)
        elif name == b"via":
            via.append(item[1])
        elif name == b"connection":
            listed |= _tokens(item[1])
        elif name == b"x-forwarded-for":
            forwarded_for.append(item[1])
        elif name == b"x-forwarded-proto":
            proto = proto or item[1]
        elif name == b"x-forwarded-host":
            fwd_host = fwd_host or item[1]
        # the rest (hop-by-hop, Expect: the proxy answers 100-continue itself) is dropped
    if listed:
        out = [item for item in out if item[0] not in listed]
    out.insert(0, (b"host", host))  # after the Connection filter: "Connection: host" drops none
    if not trusted_peer:
        forwarded_for, proto, fwd_host = [], b"", b""
    forwarded_for.append(client_ip)
    out.append((b"x-forwarded-for", b", ".join(forwarded_for)))
    out.append((b"x-forwarded-proto", proto or scheme))
    out.append((b"x-forwarded-host", fwd_host or host))
    via.append(VIA)
    out.append((b"via", b", ".join(via)))
    out.append((b"x-request-id", request_id))
    if websocket:
        out += _WEBSOCKET
    return out


def to_client(headers: Sequence[tuple[bytes, bytes]], websocket: bool = False) -> Headers:
    """The response headers as the client should see them."""
    out: Headers = []
    listed: set[bytes] = set()
    via: list[bytes] = []
    for item in headers:
        name = item[0]
        if name not in _RESPONSE_SPECIAL:
            out.append(item)
        elif name == b"via":
            via.append(item[1])
        elif name == b"connection":
            listed |= _tokens(item[1])
    if listed:
        out = [item for item in out if item[0] not in listed]
    via.append(VIA)
    out.append((b"via", b", ".join(via)))
    if websocket:
        out += _WEBSOCKET
    return out


PURE = {"to_client": to_client, "to_origin": to_origin}
if not accel.NO_EXTENSIONS:
    # the compiled twins (proxy/_headers.c), built by pip install where a compiler is found;
    # proxy.accel's switch keeps the functions above, as for proxy.whole
    with contextlib.suppress(ImportError):
        from proxy._headers import to_client, to_origin  # type: ignore[no-redef,import-not-found]

COMPILED = to_client is not PURE["to_client"]
