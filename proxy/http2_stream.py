"""One HTTP/2 request stream: the client side of one exchange, then of one RFC 8441 session.

Why apart from :mod:`proxy.http2`: the connection speaks the protocol (frames, settings,
abuse counts, GOAWAY); a stream is what the exchange and the tunnel see of it, the
:class:`proxy.stream.ClientStream` and :class:`proxy.stream.ClientPipe` of HTTP/2. See
:mod:`proxy.http2` for flow control: a request's DATA is acknowledged only as the origin
takes it, and a response waits in ``out`` for the client's window, pausing its origin past
``STREAM_HIGH`` bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import h2.exceptions
from h2.errors import ErrorCodes

from proxy.exchange import Exchange
from proxy.timer import Timer

if TYPE_CHECKING:
    from proxy.http2 import H2Connection
    from proxy.tunnel import Tunnel

STREAM_HIGH = 256 * 1024  # response bytes a stream buffers before its origin is paused
STREAM_LOW = 64 * 1024
# connection-specific fields (RFC 9113 §8.2.2) and those HTTP/2 frames itself
_NOT_ON_H2 = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te")
)


def _fields(status: int, headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    out = [(b":status", str(status).encode())]
    for name, value in headers:
        name = name.lower()
        if name not in _NOT_ON_H2:
            out.append((name, value))
    return out


class H2Stream:
    """One request stream: see the module docstring."""

    __slots__ = (
        "_body_timer",
        "closed",
        "conn",
        "end_delivered",
        "handler",
        "head_sent",
        "id",
        "in_ended",
        "inbox",
        "out",
        "out_done",
        "out_end",
        "proxy",
        "reading_paused",
        "timer",
        "websocket",
        "write_paused_own",
    )

    http_version = "2"

    def __init__(self, conn: H2Connection, stream_id: int) -> None:
        self.conn = conn
        self.proxy = conn.proxy
        self.id = stream_id
        self.handler: Exchange | Tunnel | None = None
        self.timer = Timer()
        self._body_timer: Timer | None = None
        self.closed = False
        self.inbox: list[tuple[bytes, int]] = []  # DATA not yet taken, with its window share
        self.in_ended = False  # the client sent END_STREAM
        self.end_delivered = False
        self.reading_paused = False
        self.out = bytearray()  # response bytes waiting for the client's window
        self.out_end = False  # END_STREAM goes after ``out``
        self.out_done = False  # END_STREAM went
        self.head_sent = False
        self.write_paused_own = False
        self.websocket = False

    # -- facts --------------------------------------------------------------------------------
    @property
    def peer(self) -> tuple[str, int]:
        return self.conn.peer

    @property
    def client_ip(self) -> bytes:
        return self.conn.client_ip

    @property
    def scheme(self) -> bytes:
        return self.conn.scheme

    @property
    def trusted_peer(self) -> bool:
        return self.conn.trusted_peer

    @property
    def whole(self) -> bool:
        return self.proxy.whole_heads

    def local_address(self) -> tuple[str, int] | None:
        return self.conn.local_address()

    @property
    def write_paused(self) -> bool:
        return self.write_paused_own or self.conn.write_paused

    # -- request side: client -> exchange ----------------------------------------------------
    def data(self, data: bytes, window: int) -> None:
        self.inbox.append((data, window))
        self._pour()

    def ended(self) -> None:
        self.in_ended = True
        self._pour()

    def _pour(self) -> None:
        """Hand the held DATA (and the end) to the handler as far as it can take them."""
        handler = self.handler
        if handler is None or self.reading_paused or self.closed:
            return
        if handler.tunnel:
            tunnel = cast("Tunnel", handler)
            while self.inbox and not self.reading_paused and not self.closed:
                data, window = self.inbox.pop(0)
                self.conn.ack(self.id, window)
                tunnel.tunnel_to_origin(data)
            if self.in_ended and not self.inbox and not self.end_delivered:
                self.end_delivered = True
                tunnel.tunnel_eof_from_client()
            return
        ex = cast(Exchange, handler)
        if not ex.ready or ex.finished:
            return
        if self.websocket:  # the session's bytes wait for the 101: upgrade() hands them over
            if not self.end_delivered:
                self.end_delivered = True
                ex.request_end()
            return
        while self.inbox and not self.reading_paused and self.handler is ex:
            data, window = self.inbox.pop(0)
            self.conn.ack(self.id, window)
            ex.request_body(data)
        if self.in_ended and not self.inbox and not self.end_delivered and self.handler is ex:
            self.end_delivered = True
            if self._body_timer is not None:
                self._body_timer.disarm()
            ex.request_end()
        elif ex.in_body and self.handler is ex:
            self.arm_body_timer()

    def check_request_body(self) -> None:
        pass  # h2 checks the frames; content-length against DATA too

    def deliver(self) -> None:
        self.reading_paused = False
        self._pour()

    def pause_reading(self) -> None:
        self.reading_paused = True  # acks withheld: the client's window closes

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            self._pour()

    def arm_body_timer(self) -> None:
        if self._body_timer is None:
            self._body_timer = Timer()
        self._body_timer.arm(self.proxy.settings.body_idle_timeout, self._body_timeout)

    def _body_timeout(self) -> None:
        ex = self.handler
        if self.reading_paused:
            self.arm_body_timer()  # the stall is the origin's, not the client's
        elif isinstance(ex, Exchange) and ex.in_body:
            ex.abort_request(408, "request body stalled")

    # -- response side: exchange -> client ---------------------------------------------------
    def send_informational(
        self, status: int, headers: Sequence[tuple[bytes, bytes]] = (), reason: bytes = b""
    ) -> None:
        if not self.closed and status != 101:
            self._headers(_fields(status, headers))

    def send_head(self, status: int, headers: Sequence[tuple[bytes, bytes]], reason: bytes) -> None:
        if self.closed:
            return
        self._headers(_fields(status, headers))
        self.head_sent = True

    def send_body(self, data: bytes) -> None:
        if data and not self.closed:
            self.out += data
            self.pump()

    def send_end(self) -> None:
        if not self.closed:
            self.out_end = True
            self.pump()

    def send_whole(
        self, status: int, headers: Sequence[tuple[bytes, bytes]], reason: bytes, body: bytes
    ) -> None:
        if self.closed:
            return
        if not body:
            if self._headers(_fields(status, headers), end_stream=True):
                self.head_sent = self.out_done = True
                self._after_end()
            return
        self.send_head(status, headers, reason)
        self.out += body
        self.out_end = True
        self.pump()

    def _headers(self, fields: list[tuple[bytes, bytes]], end_stream: bool = False) -> bool:
        try:
            self.conn.h2.send_headers(self.id, fields, end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._lost()
            return False
        self.conn.kick()
        return True

    def _lost(self) -> None:
        """h2 refused a send: the stream (or the connection) closed under us, by frames
        read in the same turn. What is sent from here is dropped; the handler hears of it
        on the next loop turn, outside the call that was sending."""
        self.closed = True
        self.out.clear()
        asyncio.get_running_loop().call_soon(self.client_reset)

    def pump(self) -> None:
        """Send what the client's window allows; pause or resume the origin to match."""
        h2c = self.conn.h2
        out = self.out
        try:
            while out and not self.closed:
                room = min(h2c.local_flow_control_window(self.id), h2c.max_outbound_frame_size)
                if room <= 0:
                    break
                piece = bytes(out[:room])
                del out[:room]
                if not out and self.out_end:  # END_STREAM on the last DATA, not a frame more
                    h2c.send_data(self.id, piece, end_stream=True)
                    self.out_done = True
                    self._after_end()
                    break
                h2c.send_data(self.id, piece)
            if not out and self.out_end and not self.out_done and not self.closed:
                h2c.end_stream(self.id)
                self.out_done = True
                self._after_end()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._lost()
        handler = self.handler
        if len(out) > STREAM_HIGH and not self.write_paused_own:
            self.write_paused_own = True
            if handler is not None:
                handler.pause_origin()
        elif self.write_paused_own and len(out) < STREAM_LOW:
            self.write_paused_own = False
            if handler is not None and not self.conn.write_paused:
                handler.resume_origin()
        self.conn.kick()

    def _after_end(self) -> None:
        """END_STREAM went. With no handler left (the exchange done, the session closed) the
        stream is over; with one, its end comes by exchange_done (or, for a tunnel that
        half-closed, by close)."""
        if self.handler is None:
            self._finish_stream()

    def _finish_stream(self) -> None:
        """The response is out whole: a request still uploading is told to stop (RFC 9113
        §8.1: RST_STREAM NO_ERROR after a complete response); the stream is done."""
        if not self.in_ended:
            self._reset(ErrorCodes.NO_ERROR)
        else:
            self._forget()

    def answer_error(
        self, status: int, reason: str, extra: Sequence[tuple[bytes, bytes]], rid: bytes
    ) -> int:
        self.handler = None
        return self.conn.error_on(self, status, reason, extra, rid)

    def abort(self) -> None:
        self._reset(ErrorCodes.INTERNAL_ERROR)

    def exchange_done(self, clean: bool) -> None:
        self.timer.stop()
        if self._body_timer is not None:
            self._body_timer.stop()
        self.handler = None
        if self.closed:
            self._forget()
        elif not clean:
            self._reset(ErrorCodes.INTERNAL_ERROR)
        elif self.out_done:
            self._finish_stream()
        # else: the rest waits for the client's window; pump() ends the stream

    def upgrade(
        self, headers: Sequence[tuple[bytes, bytes]], reason: bytes
    ) -> tuple[H2Stream, bytes]:
        """RFC 8441 §5: the origin's 101 is a 200 on the stream; the session's DATA so far
        goes to the tunnel first."""
        keep = [
            (n, v)
            for n, v in headers
            if n.lower() not in (b"sec-websocket-accept", b"upgrade", b"connection")
        ]
        if not self.closed:
            self._headers(_fields(200, keep))
            self.head_sent = True
        held = b"".join(d for d, _ in self.inbox)
        for _, window in self.inbox:
            self.conn.ack(self.id, window)
        self.inbox.clear()
        self.websocket = False
        self.end_delivered = False  # from here the client's END_STREAM is the session's EOF
        return self, held

    # -- proxy.stream.ClientPipe: an RFC 8441 session ----------------------------------------
    def attach(self, tunnel: Tunnel) -> None:
        self.handler = tunnel
        self._pour()

    def write(self, data: bytes) -> None:
        self.send_body(data)

    def write_eof(self) -> bool:
        self.send_end()
        return not self.closed

    def close(self) -> None:
        """The session is over: END_STREAM after what is buffered, then RST_STREAM NO_ERROR
        if the client has not ended its side (its later DATA has nowhere to go)."""
        if self.closed:
            return
        self.handler = None
        if self.out_done:
            self._finish_stream()
            return
        self.out_end = True
        self.pump()

    # -- endings -------------------------------------------------------------------------------
    def _reset(self, code: ErrorCodes) -> None:
        if self.closed:
            return
        self.closed = True
        self.out.clear()
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self.conn.h2.reset_stream(self.id, code)
        self.conn.kick()
        self._forget()

    def _forget(self) -> None:
        self.closed = True
        self.timer.stop()
        if self._body_timer is not None:
            self._body_timer.stop()
        # DATA nobody will take still counts against the connection's window: give it back,
        # or a few refused uploads would stall every other stream of the connection
        for _, window in self.inbox:
            self.conn.ack(self.id, window)
        self.inbox.clear()
        self.conn.stream_over(self)

    def client_reset(self) -> None:
        """The client sent RST_STREAM, or the connection went."""
        self.closed = True
        self.out.clear()
        handler, self.handler = self.handler, None
        self._forget()
        if handler is not None:
            handler.client_gone()
