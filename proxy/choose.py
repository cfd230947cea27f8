"""Which protocol a client connection speaks, decided per connection.

Why per connection: one listener serves HTTP/1.1 and HTTP/2 clients side by side. On TLS the
handshake has decided it already (ALPN: ``h2`` or ``http/1.1``); on cleartext the client's
first bytes do: the HTTP/2 connection preface (``PRI * HTTP/2.0``..., RFC 9113 §3.4, "prior
knowledge") or anything else, which is HTTP/1.1.

Every connection starts as HTTP/1.1's :class:`proxy.server.Downstream`, so a connection that
has sent nothing yet is counted, timed (``header_timeout``), limited (``max_connections``)
and drained exactly as before; the few checks here run on its first bytes only (never per
request), and an HTTP/2 connection is handed to :class:`proxy.http2.H2Connection` with the
bytes read so far.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from proxy.http2 import H2Connection

if TYPE_CHECKING:
    from proxy.server import Downstream

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
WAIT = b""  # sniff(): not decided yet (a prefix of the preface so far)


def alpn_h2(transport: asyncio.BaseTransport) -> bool:
    """The TLS handshake chose ``h2``."""
    ssl_object = transport.get_extra_info("ssl_object")
    return ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2"


def sniff(held: bytes, data: bytes) -> tuple[bool | None, bytes]:
    """(True, bytes): HTTP/2's preface; (False, bytes): HTTP/1.1; (None, held): undecided."""
    buf = held + data if held else data
    n = min(len(buf), len(PREFACE))
    if buf[:n] != PREFACE[:n]:
        return False, buf
    if n == len(PREFACE):
        return True, buf
    return None, buf


def to_http2(down: Downstream, transport: asyncio.Transport, data: bytes = b"") -> H2Connection:
    """Hand ``down``'s transport to a new HTTP/2 connection: ``down`` leaves the worker's
    client set as if never counted (its counts go to the new one) and feeds ``data``."""
    h2 = H2Connection(down.proxy, down.scheme, None, down.limit_key)
    h2.peer, h2.local = down.peer, down.local  # a PROXY header's source and destination
    down.limit_key = None  # now the HTTP/2 connection's to give back
    transport.set_protocol(h2)  # type: ignore[arg-type]
    h2.connection_made(transport)
    if data:
        h2.data_received(data)
    return h2
