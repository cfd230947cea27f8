"""HTTP/2 to clients (RFC 9113) with h2, and WebSocket over it (RFC 8441).

One :class:`H2Connection` per client connection speaks the protocol through h2's sans-I/O
state machine; each request stream is an :class:`H2Stream`, which is the
:class:`proxy.stream.ClientStream` of that stream's :class:`proxy.exchange.Exchange` and,
after an extended CONNECT's upgrade, the :class:`proxy.stream.ClientPipe` of its
:class:`proxy.tunnel.Tunnel`. Routes, pool, header rewriting, error bodies and request ids
are the exchange's, exactly as for HTTP/1.1; upstream stays HTTP/1.1 through the pool.

Flow control both ways, bodies never held whole: a request body's DATA is acknowledged
(WINDOW_UPDATE) only as the origin connection takes it, so a slow origin closes the client's
window; a response body waits in the stream's buffer for the client's window, and past
``STREAM_HIGH`` bytes the origin connection is paused until it drains below ``STREAM_LOW``.

Hardening (each a test in tests/test_http2*.py): h2 bounds concurrent streams, frame size,
header list size (``SETTINGS_MAX_HEADER_LIST_SIZE`` = ``max_header_bytes``), the HPACK table
and CONTINUATION backlog; this module adds what h2 leaves to its user, in
:mod:`proxy.http2_guard`: resets, PINGs and SETTINGS counted per connection (rapid reset,
CVE-2023-44487, and floods end in GOAWAY ENHANCE_YOUR_CALM), a header block in progress
bounded in bytes (CONTINUATION floods, CVE-2024-27316), a request whose HEADERS and
RST_STREAM arrive in one read never reaching the router or the pool, and the timeouts of
``[timeouts]`` per connection (idle) and per stream (request body).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import structlog
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from proxy import access, http1, request_id
from proxy import headers as hdrs
from proxy.exchange import Exchange
from proxy.http2_guard import Guard
from proxy.http2_head import Malformed, check_trailers, request_head
from proxy.http2_hpack import MemoDecoder, MemoEncoder
from proxy.http2_stream import H2Stream
from proxy.stream import sockname
from proxy.timer import Timer

if TYPE_CHECKING:
    from proxy.proxy_protocol import ProxyHeader
    from proxy.server import Proxy

log = structlog.get_logger("originpool.proxy")

MAX_CONCURRENT_STREAMS = 100
WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024
LINGER = 2.0  # seconds a closing connection keeps reading (see H2Connection._linger)


class H2Connection:
    """One HTTP/2 client connection: see the module docstring."""

    http2 = True

    def __init__(
        self,
        proxy: Proxy,
        scheme: bytes = b"http",
        header: ProxyHeader | None = None,
        limit_key: bytes | None = None,
    ) -> None:
        """``header`` and ``limit_key``: as for :class:`proxy.server.Downstream` (the PROXY
        header's source is the client; the address counted against ``conn_per_ip``)."""
        self.proxy = proxy
        self.scheme = scheme
        self.limit_key = limit_key
        s = proxy.settings
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            # RFC 9113 §8.2-8.3: the client's fields are checked in one pass by
            # http2_head.request_head (h2's seven generators cost ~10 us a request), and its
            # cookie crumbs joined there
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
            # ours are built checked (http2_stream._fields): h2's second pass cost ~15 us
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config=config)
        # the same blocks coded once per table state (proxy.http2_hpack)
        self.h2.encoder = MemoEncoder()
        self.h2.decoder = MemoDecoder()
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_bytes,
                h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,
            },
        )
        # h2 applies a local setting when the peer acknowledges it; these bound the
        # decoder from the first HEADERS on
        self.h2.decoder.max_header_list_size = s.max_header_bytes
        self.h2.decoder.max_allowed_table_size = 4096
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
        self.peer = ("", 0)
        self.local: tuple[str, int] | None = None  # where the client connected, if a header said
        if header is not None and header.source is not None:
            self.peer, self.local = header.source, header.destination
        self.client_ip = b""
        self.trusted_peer = False
        self.closed = False
        self.write_paused = False
        self.reading_paused = False
        self.goaway_sent = False
        self.lingering = False
        self.guard = Guard(s.max_header_bytes)
        self._flush_pending = False
        self._idle = Timer()

    def local_address(self) -> tuple[str, int] | None:
        """See :meth:`proxy.stream.ClientStream.local_address`."""
        return self.local or sockname(self.transport)

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        peer = self.peer if self.peer[0] else transport.get_extra_info("peername")
        if peer:
            self.peer = (str(peer[0]), int(peer[1]))
            self.client_ip = self.peer[0].encode()
            self.trusted_peer = hdrs.is_trusted(self.peer[0], self.proxy.settings.trusted_proxies)
        proxy = self.proxy
        proxy.clients.add(self)  # type: ignore[arg-type]
        proxy.stats.connections += 1
        proxy.stats.connections_total += 1
        proxy.stats.http2_connections_total += 1
        self.h2.initiate_connection()
        self._flush()
        self._idle.arm(proxy.settings.header_timeout, self._idle_timeout)

    def data_received(self, data: bytes) -> None:
        if self.closed or self.lingering:
            return  # after the last stream and the GOAWAY: read and drop
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            log.info("http2_refused", client=f"{self.peer[0]}:{self.peer[1]}", error=str(e))
            self.goaway_sent = True  # h2 queued its GOAWAY with the error's code
            self._end_streams()
            self._linger()
            return
        calm = self.guard.header_backlog(self.h2) or self.guard.count(events)
        if calm:
            self.calm_down(calm)
            return
        self._handle(events)
        self._flush()

    def _handle(self, events: list[h2.events.Event]) -> None:
        started: list[tuple[H2Stream, list[tuple[bytes, bytes]], bool]] = []
        stream: H2Stream | None
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                stream = H2Stream(self, event.stream_id)
                self.streams[event.stream_id] = stream
                ended = event.stream_ended is not None
                started.append((stream, cast(list[tuple[bytes, bytes]], event.headers), ended))
                self._idle.disarm()
            elif isinstance(event, h2.events.DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is None:
                    self.ack(event.stream_id, event.flow_controlled_length)
                else:
                    stream.data(event.data, event.flow_controlled_length)
            elif isinstance(event, h2.events.StreamEnded):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.ended()
            elif isinstance(event, h2.events.TrailersReceived):
                try:
                    check_trailers(cast(list[tuple[bytes, bytes]], event.headers))
                except Malformed as e:  # else dropped: an HTTP/1.1 origin gets none
                    stream = self.streams.get(event.stream_id)
                    if stream is not None:
                        self.malformed(stream, e)
            elif isinstance(event, h2.events.StreamReset):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.client_reset()
            elif isinstance(event, h2.events.WindowUpdated):
                if event.stream_id == 0:
                    for stream in list(self.streams.values()):
                        if stream.out:
                            stream.pump()
                else:
                    stream = self.streams.get(event.stream_id)
                    if stream is not None and stream.out:
                        stream.pump()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.close()
                return
        for stream, fields, ended in started:
            if not stream.closed:  # HEADERS and RST_STREAM in one read: never started
                self._begin(stream, fields, ended)

    def _begin(self, stream: H2Stream, fields: list[tuple[bytes, bytes]], ended: bool) -> None:
        try:
            head = request_head(fields, ended)
        except http1.ProtocolError as e:
            self.refuse(stream, e.status, e.reason)
            return
        except Malformed as e:
            self.malformed(stream, e)
            return
        if self.goaway_sent:  # opened after the GOAWAY named the last stream served
            stream.closed = True
            self.h2.reset_stream(stream.id, ErrorCodes.REFUSED_STREAM)
            stream._forget()
            return
        stream.websocket = (
            head.method == b"GET"
            and any(n == b"sec-websocket-key" for n, _ in head.headers)
            and any(n == b":protocol" for n, _ in fields)
        )
        ex = Exchange(stream, head)
        stream.handler = ex
        if ended:
            stream.in_ended = True
        ex.start()
        if stream.handler is ex and ex.ready:
            stream.deliver()

    # -- writing -------------------------------------------------------------------------------
    def kick(self) -> None:
        """Send what h2 has queued at the end of this loop turn: the frames of many streams
        (and a small response's HEADERS and DATA) in one write."""
        if not self._flush_pending and not self.closed:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def ack(self, stream_id: int, window: int) -> None:
        """The origin took ``window`` bytes of the stream's DATA: the client may send more."""
        if window and not self.closed:
            try:
                self.h2.acknowledge_received_data(window, stream_id)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.h2.increment_flow_control_window(window)  # the connection's share only
            self.kick()

    def error_on(
        self,
        stream: H2Stream,
        status: int,
        reason: str,
        extra: Sequence[tuple[bytes, bytes]],
        rid: bytes,
    ) -> int:
        """The proxy's own answer on one stream: the same body and headers as on HTTP/1.1
        (:func:`proxy.http1.error_message`), the connection left open."""
        if stream.closed or stream.head_sent:
            stream.abort()
            return 0
        body, headers = http1.error_message(
            status, f"{reason}\nrequest id: {rid.decode('ascii')}", [*extra, (b"x-request-id", rid)]
        )
        stream.send_whole(status, headers, b"", body)
        if status < 500:
            log.info(
                "client_error",
                status=status,
                reason=reason,
                client=f"{self.peer[0]}:{self.peer[1]}",
                request_id=rid.decode("ascii"),
            )
        return len(body)

    def malformed(self, stream: H2Stream, e: Malformed) -> None:
        """RFC 9113 §8.1.1: a malformed request is a stream error of type PROTOCOL_ERROR;
        the connection's other streams go on. Counted with the client's own resets: a stream
        after stream of malformed blocks ends in ENHANCE_YOUR_CALM as a rapid reset does."""
        self.guard.resets += 1
        log.info(
            "http2_malformed",
            client=f"{self.peer[0]}:{self.peer[1]}",
            stream=stream.id,
            error=str(e),
        )
        stream.client_reset()  # its handler, if any, hears the stream is gone
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self.h2.reset_stream(stream.id, ErrorCodes.PROTOCOL_ERROR)

    def refuse(self, stream: H2Stream, status: int, reason: str) -> None:
        """A request no exchange holds (its head is one the proxy does not serve): answered,
        counted and logged as on HTTP/1.1 (:meth:`proxy.server.Downstream.refuse`)."""
        rid = request_id.new()
        body_bytes = self.error_on(stream, status, reason, (), rid)
        access.refusal(
            self.proxy.stats,
            0.0,
            status=status,
            body_bytes=body_bytes,
            client=self.peer[0],
            request_id=rid.decode("ascii"),
            http_version="2",
        )

    # -- flow ----------------------------------------------------------------------------------
    def pause_writing(self) -> None:
        self.write_paused = True
        if self.transport is not None and not self.reading_paused:
            # nor read: PING and SETTINGS answers would pile up behind a client not reading
            self.reading_paused = True
            self.transport.pause_reading()
        for stream in list(self.streams.values()):
            if stream.handler is not None:
                stream.handler.pause_origin()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()
        for stream in list(self.streams.values()):
            if stream.handler is not None and not stream.write_paused_own:
                stream.handler.resume_origin()

    # -- endings -------------------------------------------------------------------------------
    def stream_over(self, stream: H2Stream) -> None:
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
        if not self.streams:
            if self.goaway_sent or self.proxy.draining:
                self.drain()
            else:
                self._idle.arm(self.proxy.settings.header_timeout, self._idle_timeout)

    def drain(self) -> None:
        """GOAWAY with the last stream id taken (RFC 9113 §6.8): the client opens no new
        stream here; those in flight finish, then the connection closes."""
        if self.closed:
            return
        if not self.goaway_sent:
            self.goaway_sent = True
            self._goaway()
        if not self.streams:
            self._linger()

    def _linger(self) -> None:
        """Close without losing the last response: half-close, read and drop what the client
        still sends (WINDOW_UPDATEs, its own GOAWAY) until its FIN or ``LINGER`` seconds.
        Closing with unread input would send a reset, which can destroy response bytes
        still on their way to the client (as for HTTP/1.1's error answers)."""
        transport = self.transport
        if transport is None or self.closed or self.lingering:
            return
        self._flush()
        if not transport.can_write_eof():
            self.close()  # TLS: close_notify is its own end of stream
            return
        self.lingering = True
        transport.write_eof()
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()
        self._idle.arm(LINGER, self.close)

    def _goaway(self) -> None:
        """GOAWAY NO_ERROR written beside h2, not through it: h2's close_connection moves
        its state machine to CLOSED, which refuses every frame after, the DATA and
        WINDOW_UPDATE of the streams that are to finish included."""
        self._flush()
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.h2.highest_inbound_stream_id
        frame.error_code = ErrorCodes.NO_ERROR
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame.serialize())

    def calm_down(self, why: str) -> None:
        """An abusive client (see :mod:`proxy.http2_guard`): GOAWAY ENHANCE_YOUR_CALM, and
        every stream ends now."""
        log.warning("http2_abuse", client=f"{self.peer[0]}:{self.peer[1]}", what=why)
        if not self.goaway_sent:
            self.goaway_sent = True
            self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        self._end_streams()
        self._linger()  # a close with unread input would reset, and lose the GOAWAY

    def _end_streams(self) -> None:
        for stream in list(self.streams.values()):
            stream.client_reset()

    def _idle_timeout(self) -> None:
        if self.lingering:
            self.close()
        elif not self.streams:
            self.drain()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.lingering = False
            if not self.goaway_sent:
                self.goaway_sent = True
                if self.h2.state_machine.state is not ConnectionState.CLOSED:
                    self._goaway()  # else h2 queued its own (a protocol error's)
            self._flush()
            self.closed = True
            self._idle.stop()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

    def eof_received(self) -> bool | None:
        if self.lingering:
            self.close()
        return None  # a client's FIN ends an HTTP/2 connection: no half-close here

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._idle.stop()
        proxy = self.proxy
        proxy.clients.discard(self)
        proxy.stats.connections -= 1
        if self.limit_key is not None and proxy.limits is not None:
            proxy.limits.close(self.limit_key)
        for stream in list(self.streams.values()):
            stream.client_reset()
        self.streams.clear()
        for listener in proxy.listeners:
            listener.connection_closed()
        if proxy.draining and not proxy.clients:
            proxy.all_closed.set()
