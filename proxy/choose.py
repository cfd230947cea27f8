"""Which protocol a client connection speaks, decided per connection.

Why per connection: one listener serves HTTP/1.1 and HTTP/2 clients side by side. On TLS the
handshake has decided it already (ALPN: ``h2`` or ``http/1.1``); on cleartext the client's
first bytes do: the HTTP/2 connection preface (``PRI * HTTP/2.0``..., RFC 9113 §3.4, "prior
knowledge") or anything else, which is HTTP/1.1. The chooser holds the bytes until it can
tell (at most the preface's 24), then hands the transport and those bytes to the protocol
chosen, and is gone: a connection pays for it once, never per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Chooser(asyncio.Protocol):
    """A connection's first protocol, until it knows which one is its own."""

    def __init__(
        self,
        http1: Callable[[], asyncio.Protocol],
        http2: Callable[[], asyncio.Protocol],
        timeout: float,
    ) -> None:
        """``timeout``: seconds a cleartext client gets to send its first bytes (the
        header timeout: a silent connection is closed quietly, as an idle one is)."""
        self.http1 = http1
        self.http2 = http2
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.chosen: asyncio.Protocol | None = None
        self._silence: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:  # TLS: ALPN decided in the handshake
            alpn = ssl_object.selected_alpn_protocol()
            self._choose(self.http2 if alpn == "h2" else self.http1)
        elif self.timeout > 0:
            self._silence = asyncio.get_running_loop().call_later(self.timeout, self._silent)

    def _silent(self) -> None:
        if self.chosen is None and self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.chosen is not None:  # data that raced the switch
            self.chosen.data_received(data)
            return
        self.buffer += data
        n = min(len(self.buffer), len(PREFACE))
        if self.buffer[:n] != PREFACE[:n]:
            self._choose(self.http1)
        elif n == len(PREFACE):
            self._choose(self.http2)

    def _choose(self, make: Callable[[], asyncio.Protocol]) -> None:
        if self._silence is not None:
            self._silence.cancel()
            self._silence = None
        protocol = self.chosen = make()
        assert self.transport is not None
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        held, self.buffer = self.buffer, b""
        if held:
            protocol.data_received(held)

    def eof_received(self) -> bool | None:
        if self.chosen is None:
            self._choose(self.http1)  # a few bytes then EOF: HTTP/1.1's to answer
        return self.chosen.eof_received() if self.chosen is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._silence is not None:
            self._silence.cancel()
        if self.chosen is not None:
            self.chosen.connection_lost(exc)
