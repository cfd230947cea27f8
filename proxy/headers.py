"""Header rewriting between client and origin: hop-by-hop out, forwarding headers in.

RFC 9110 section 7.6.1: Connection, the headers it names, and the classic hop-by-hop set
describe one connection and must not be forwarded. X-Forwarded-For from a client is kept
only when that client is a trusted proxy; otherwise anyone could forge their address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

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


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def strip_hop_by_hop(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    drop = HOP_BY_HOP | _connection_tokens(headers)
    return [(n, v) for n, v in headers if n not in drop]


def is_trusted(ip: str, trusted: Sequence[Network]) -> bool:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    return any(addr in net for net in trusted)


def to_origin(
    headers: Sequence[tuple[bytes, bytes]],
    *,
    client_ip: str,
    scheme: bytes,
    trusted: Sequence[Network],
    websocket: bool = False,
) -> Headers:
    """The request headers as the origin should see them."""
    out = [(n, v) for n, v in strip_hop_by_hop(headers) if n != b"expect"]
    trusted_peer = is_trusted(client_ip, trusted)
    forwarded_for = [v for n, v in out if n == b"x-forwarded-for"] if trusted_peer else []
    host = next((v for n, v in headers if n == b"host"), b"")
    keep = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"}
    if trusted_peer:
        proto = next((v for n, v in out if n == b"x-forwarded-proto"), scheme)
        fwd_host = next((v for n, v in out if n == b"x-forwarded-host"), host)
    else:
        proto, fwd_host = scheme, host
    out = [(n, v) for n, v in out if n not in keep]
    chain = b", ".join([*forwarded_for, client_ip.encode()])
    out += [
        (b"x-forwarded-for", chain),
        (b"x-forwarded-proto", proto),
        (b"x-forwarded-host", fwd_host),
        (b"via", _via(headers)),
    ]
    if websocket:
        out += [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
    return out


def to_client(headers: Sequence[tuple[bytes, bytes]], websocket: bool = False) -> Headers:
    """The response headers as the client should see them."""
    out = strip_hop_by_hop(headers)
    out = [(n, v) for n, v in out if n != b"via"] + [(b"via", _via(headers))]
    if websocket:
        out += [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
    return out


def _via(headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    earlier = [v for n, v in headers if n == b"via"]
    return b", ".join([*earlier, VIA])
