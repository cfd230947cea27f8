"""The seam between a client protocol and the proxy's per-request logic.

Why it exists: :class:`proxy.exchange.Exchange` (one request) and :class:`proxy.tunnel.Tunnel`
(one WebSocket session) must not care whether the client speaks HTTP/1.1 on a connection of
its own or HTTP/2 on one stream among many. Each client protocol implements the two small
interfaces below, and the exchange and the tunnel speak to nothing else of the client: not
its codec, not its transport, not its timers' owner.

- :class:`ClientStream`: the client side of one request. HTTP/1.1's connection
  (:class:`proxy.server.Downstream`) is one for each of its exchanges in turn; HTTP/2's
  (:mod:`proxy.http2`) has one per stream. It frames what the exchange sends (a head, body
  pieces, the end) in its protocol's way, and tells the exchange the facts of the client
  (peer, forwarding headers' inputs, protocol version).
- :class:`ClientPipe`: what a WebSocket session needs once the handshake is over: a byte
  pipe to the client (RFC 6455 frames over HTTP/1.1's bytes, or RFC 8441's DATA frames).

Both are ``typing.Protocol`` classes: structural, so the HTTP/1.1 connection needs no extra
object per request (its per-request cost is the proxy's figure of merit), and the test
doubles of :mod:`proxy.testing` implement them without inheriting anything.

Events flow the other way through plain method calls on the exchange or tunnel the client
side holds: ``request_body(data)``, ``request_end()``, ``client_gone()``,
``pause_origin()``/``resume_origin()`` for an exchange; ``tunnel_to_origin(data)``,
``tunnel_eof_from_client()``, ``client_gone()`` and the same pair for a tunnel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from proxy.server import Proxy
    from proxy.timer import Timer
    from proxy.tunnel import Tunnel

Headers = Sequence[tuple[bytes, bytes]]


def sockname(transport: object) -> tuple[str, int] | None:
    """A transport's own socket address, read only when asked (a route with
    ``send_proxy_protocol``): never on the per-request path."""
    get = getattr(transport, "get_extra_info", None)
    name = get("sockname") if get is not None else None
    return (str(name[0]), int(name[1])) if isinstance(name, tuple) else None


class ClientStream(Protocol):
    """The client side of one request, as :class:`proxy.exchange.Exchange` sees it.

    Sending is in order: informational heads, then one final head, body pieces, the end; or
    ``send_whole`` for all of it at once (HTTP/1.1's hot path), or ``answer_error`` instead
    of all of it. A send may raise (the client codec refusing a head the origin sent): the
    exchange answers 502 for it.
    """

    # -- facts of the client (read-only: attributes or properties) ---------------------------
    @property
    def proxy(self) -> Proxy:
        """The worker's shared state (routes, pool, settings, counters)."""

    @property
    def peer(self) -> tuple[str, int]: ...

    @property
    def client_ip(self) -> bytes:
        """For X-Forwarded-For."""

    @property
    def scheme(self) -> bytes:
        """b"http" or b"https": X-Forwarded-Proto."""

    @property
    def trusted_peer(self) -> bool:
        """Its X-Forwarded-* and X-Request-ID are kept."""

    @property
    def http_version(self) -> str:
        """ "1.1" (or "1.0") or "2": the access line's."""

    @property
    def closed(self) -> bool:
        """The client is gone: nothing more can be sent."""

    @property
    def write_paused(self) -> bool:
        """The client's send buffer (or stream window) is full."""

    @property
    def whole(self) -> bool:
        """The upstream codec has ``feed_whole`` (the fast codecs' shortcut)."""

    @property
    def timer(self) -> Timer:
        """The exchange's one deadline (response, body); per stream, not shared."""

    def local_address(self) -> tuple[str, int] | None:
        """Where the client connected: a PROXY header's destination, else the socket's own
        address (for a route's ``send_proxy_protocol``); None when neither is known."""
        ...

    # -- request side -------------------------------------------------------------------------
    def check_request_body(self) -> None:
        """Raise :class:`proxy.http1.ProtocolError` when the body already received is bad."""

    def deliver(self) -> None:
        """The exchange can take the request body now: resume reading and hand over what
        was held while it connected."""

    def pause_reading(self) -> None:
        """Stop reading the request (the origin's buffer is full)."""

    def resume_reading(self) -> None:
        """Read the request again."""

    def arm_body_timer(self) -> None:
        """The request body is expected: arm the client's idle deadline for it."""

    # -- response side ------------------------------------------------------------------------
    def send_informational(
        self, status: int, headers: Headers = (), reason: bytes = b""
    ) -> None: ...

    def send_head(self, status: int, headers: Headers, reason: bytes) -> None: ...

    def send_body(self, data: bytes) -> None: ...

    def send_end(self) -> None: ...

    def send_whole(self, status: int, headers: Headers, reason: bytes, body: bytes) -> None:
        """Head, body and end in one: the common small response, one write."""

    def answer_error(self, status: int, reason: str, extra: Headers, rid: bytes) -> int:
        """End the exchange with the proxy's own answer (no response started); returns the
        body bytes sent, for the access line. The exchange is detached."""
        ...

    def abort(self) -> None:
        """Cut the response short so that it looks truncated (TCP reset, RST_STREAM)."""

    def exchange_done(self, clean: bool) -> None:
        """The exchange is over; ``clean``: its response went out whole, so the connection
        may carry another request (HTTP/1.1) or nothing needs resetting (HTTP/2)."""

    def upgrade(self, headers: Headers, reason: bytes) -> tuple[ClientPipe, bytes]:
        """The origin accepted a WebSocket: answer the client (a 101 on HTTP/1.1, a 200 on
        an RFC 8441 stream) and become a byte pipe; returns it and the bytes the client sent
        before the answer (frames to relay first)."""
        ...


class ClientPipe(Protocol):
    """A byte pipe to the client, as :class:`proxy.tunnel.Tunnel` sees it."""

    @property
    def proxy(self) -> Proxy: ...

    @property
    def closed(self) -> bool: ...

    @property
    def timer(self) -> Timer:
        """The session's idle and close-wait deadline."""

    def attach(self, tunnel: Tunnel) -> None:
        """Route the client's bytes, EOF, loss and back-pressure to ``tunnel`` from now on."""

    def write(self, data: bytes) -> None:
        """Send now (relayed bytes gain nothing from waiting)."""

    def write_eof(self) -> bool:
        """Half-close toward the client; False when the protocol cannot (TLS)."""
        ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None:
        """End cleanly after what was written (FIN, or END_STREAM)."""

    def abort(self) -> None:
        """End at once (RST, RST_STREAM)."""
