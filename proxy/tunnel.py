"""A WebSocket session after the origin's 101: bytes both ways, Close frames where needed.

Its own small object, not the HTTP exchange that set it up: an idle session may live for
days, and what it pins is what the proxy pays per session (the issue's budget is 6 KB, two
sockets included). So the request head, the HTTP codecs, the routing and retry state all go
when the exchange hands over; the tunnel keeps the two connections, two frame trackers and
the few fields its end-of-session log line reports.

It is the upstream connection's handler (``UpstreamConnection.attach``); of the client it
knows only a :class:`proxy.stream.ClientPipe` (an HTTP/1.1 connection after its 101, or an
RFC 8441 stream on an HTTP/2 connection), which routes the client's bytes, EOF, loss and
back-pressure to it (``attach``): HTTP/1.1's connection keeps it in its ``exchange`` slot
with ``tunnel = True``, without a second slot per connection.

The proxy ends a session of its own accord with :meth:`Tunnel.end` (Close codes of its
choosing each way: 1001 both ways on shutdown, 1012/1001 when an origin drains); the live
sessions of a worker, per origin, are ``Proxy.tunnels(origin)`` (each one's ``origin``), and
a leased upstream connection's ``handler`` is its tunnel.

What it knows of WebSocket is :mod:`proxy.websocket`'s: frame boundaries only, so that it
knows whether a Close went through and where it may inject its own: Close 1011 to the client
when the origin fails, 1001 to the origin when the client vanishes, 1001 both ways on
shutdown or after the optional idle timeout.

Toward the origin the proxy is the WebSocket client, and RFC 6455 §7.1.1 says the server
closes the TCP connection first, so that the server holds the TIME_WAIT. Once a Close has
gone to the origin (the client's, relayed, or the proxy's own), the session ends for the
client at once, but the origin connection waits, bounded by ``ORIGIN_CLOSE_WAIT``, for the
origin's Close and FIN. Closing it at once instead would make the origin's Close reply
meet a closed socket: a reset instead of a clean close, for every client that vanished.
And a proxy that closed first would hold a TIME_WAIT on an egress port per session, which
under churn costs the very capacity the pool exists to keep (the testbed's ``churn``
scenario measures it).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal

import structlog

from pool.origin import Origin, UpstreamConnection
from proxy import observe
from proxy import websocket as ws

if TYPE_CHECKING:
    from proxy.stream import ClientPipe
    from proxy.tracecontext import Trace

log = structlog.get_logger("originpool.proxy")

# seconds the origin gets to answer the proxy's Close and close its side (nginx's
# lingering_timeout is 5 s too); then the connection is reset, which leaves no TIME_WAIT
ORIGIN_CLOSE_WAIT = 5.0


class Tunnel:
    """One relayed WebSocket session; see the module docstring."""

    tunnel: Literal[True] = True  # Downstream holds an Exchange or a Tunnel in one slot
    ready = True

    __slots__ = (
        "c2o",
        "client",
        "client_eof",
        "close_code",
        "closed_by",
        "conn",
        "finished",
        "host",
        "last_activity",
        "o2c",
        "origin",
        "origin_eof",
        "path",
        "received",
        "request_id",
        "route",
        "sent",
        "started",
        "stopping",
        "told_origin",
        "trace",
    )

    def __init__(
        self,
        client: ClientPipe,
        conn: UpstreamConnection,
        origin: Origin,
        head: tuple[str, str, bytes],
    ) -> None:
        self.client = client
        self.conn: UpstreamConnection | None = conn
        self.origin = origin
        # what the session's log line names, as three fields: a tuple more per session
        self.host, self.path, self.request_id = head
        self.c2o = ws.ClientFrames()  # frame boundaries client -> origin
        self.o2c = ws.OriginFrames()
        self.client_eof = False
        self.origin_eof = False
        self.closed_by: str | None = None
        self.close_code: int | None = None
        self.stopping = False
        self.told_origin = False  # a Close frame of the proxy's own went to the origin
        self.finished = False
        self.sent = 0
        self.received = 0
        self.started = time.monotonic()
        # None while the session has no idle timeout (see start)
        self.last_activity: float | None = self.started
        self.route = ""  # the route's name and the request's trace: set by the exchange
        self.trace: Trace | None = None

    def start(self, from_origin: bytes, from_client: bytes) -> None:
        """Take over both connections; relay what arrived with the 101 (or before it)."""
        proxy = self.client.proxy
        observe.session_started(self)
        assert self.conn is not None
        self.conn.attach(self)
        self.client.attach(self)
        idle = proxy.settings.websocket_idle_timeout
        if idle > 0:
            self.client.timer.arm(idle, self._idle_check)
        else:  # no idle timeout: no clock read per chunk, no float kept per session
            self.last_activity = None
        if from_origin:
            self.data_received(from_origin)
        if from_client:
            self.tunnel_to_origin(from_client)
        self.client.resume_reading()

    # -- origin -> client (the upstream connection's handler) -------------------------------

    def data_received(self, data: bytes) -> None:
        if self.stopping:
            return
        if self.last_activity is not None:
            self.last_activity = time.monotonic()
        self.o2c.feed(data)
        if self.o2c.closed and self.closed_by is None:
            self.closed_by, self.close_code = "origin", self.o2c.close_code
        self.received += len(data)
        self.client.proxy.stats.bytes_out += len(data)
        self.client.write(data)

    def eof_received(self) -> None:
        self.origin_eof = True
        if self.finished:
            self._release_origin()  # the origin closed first, as it should: no TIME_WAIT here
            return
        if not self.o2c.closed and not self.stopping:
            self._origin_failed("origin closed without a Close frame")
            return
        if not self.client.closed:
            self.client.write_eof()
        if self.client_eof:
            self._end()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.finished:
            self._release_origin()
            return
        if self.o2c.closed or self.stopping:
            self._end()  # after its Close frame: the normal end
        else:
            self._origin_failed(f"origin connection lost: {exc}" if exc else "origin closed")

    def pause_writing(self) -> None:
        self.client.pause_reading()

    def resume_writing(self) -> None:
        self.client.resume_reading()

    # -- client -> origin (called by Downstream) --------------------------------------------

    def tunnel_to_origin(self, data: bytes) -> None:
        if self.stopping or self.conn is None:
            return
        if self.last_activity is not None:
            self.last_activity = time.monotonic()
        self.c2o.feed(data)
        if self.c2o.closed and self.closed_by is None:
            self.closed_by, self.close_code = "client", self.c2o.close_code
        self.sent += len(data)
        self.client.proxy.stats.bytes_in += len(data)
        self.conn.write_now(data)

    def tunnel_eof_from_client(self) -> None:
        """The client half-closed: pass the FIN on, or treat it as the client gone."""
        self.client_eof = True
        if not self.c2o.closed and not self.stopping:
            self._tell_origin(ws.GOING_AWAY, "client went away")
            self.closed_by = self.closed_by or "client"
            self._end()
            return
        if self.conn is not None:
            self.conn.write_eof()
        if self.origin_eof:
            self._end()

    def client_gone(self) -> None:
        if self.finished:
            return
        if not self.c2o.closed and not self.stopping:
            self._tell_origin(ws.GOING_AWAY, "client went away")
            self.closed_by = self.closed_by or "client"
        self._end()

    def pause_origin(self) -> None:
        if self.conn is not None:
            self.conn.pause_reading()

    def resume_origin(self) -> None:
        if self.conn is not None:
            self.conn.resume_reading()

    # -- endings -----------------------------------------------------------------------------

    def _origin_failed(self, reason: str) -> None:
        """The client must learn it from a Close 1011, not from a bare TCP close."""
        # the log names a code only when a Close frame carried it: never the proxy's own
        # Close that could not be sent (mid-frame, or a stream that is no WebSocket)
        self.closed_by, self.close_code = "origin", None
        if self.o2c.at_boundary and not self.client.closed:
            self.client.write(ws.close_frame(ws.INTERNAL_ERROR, "origin failed", to_origin=False))
            self.close_code = int(ws.INTERNAL_ERROR)
        log.warning(
            "websocket_origin_failed",
            origin=str(self.origin),
            egress=self.conn.egress_ip if self.conn else None,
            reason=reason,
            request_id=self.request_id.decode("ascii"),
            **observe.trace_fields(self.trace),
        )
        self._end()

    def _tell_origin(self, code: int, reason: str) -> None:
        conn = self.conn
        if conn is not None and conn.alive and self.c2o.at_boundary:
            conn.write(ws.close_frame(code, reason, to_origin=True))
            self.told_origin = True
            self.close_code = self.close_code or int(code)

    def _idle_check(self) -> None:
        """One timer per idle period, not one reset per chunk: cheap for busy sessions."""
        if self.finished:
            return
        limit = self.client.proxy.settings.websocket_idle_timeout
        quiet = time.monotonic() - (self.last_activity or self.started)
        if quiet < limit:
            self.client.timer.arm(limit - quiet, self._idle_check)
            return
        self.closed_by, self.close_code = "proxy", None
        if self.o2c.at_boundary and not self.client.closed:
            self.client.write(ws.close_frame(ws.GOING_AWAY, "idle timeout", to_origin=False))
            self.close_code = int(ws.GOING_AWAY)
        self._tell_origin(ws.GOING_AWAY, "idle timeout")
        self._end()

    def shutdown(self) -> None:
        """Proxy shutdown: Close 1001 to both sides, then stop relaying; the drain closes."""
        self.end()

    def end(
        self,
        client_code: int = ws.GOING_AWAY,
        origin_code: int = ws.GOING_AWAY,
        reason: str = "proxy shutting down",
    ) -> None:
        """End the session of the proxy's own accord: a Close frame with ``client_code`` to
        the client and one with ``origin_code`` to the origin (each only where a frame
        boundary allows one), then stop relaying. Each peer answers its Close and closes,
        which ends the session as any end does (the access line says ``closed_by``
        ``proxy``); a peer that does not close within ``ORIGIN_CLOSE_WAIT`` seconds is cut
        off then. E.g. ``end(1012, 1001, "origin draining")`` for an origin leaving."""
        if self.finished or self.stopping:
            return
        if self.o2c.at_boundary and not self.client.closed:
            self.client.write(ws.close_frame(client_code, reason, to_origin=False))
            self.close_code = self.close_code or int(client_code)
        self._tell_origin(origin_code, reason)
        self.stopping = True
        self.closed_by = self.closed_by or "proxy"
        self.client.timer.arm(ORIGIN_CLOSE_WAIT, self._end)

    def _end(self) -> None:
        """The session is over: log it, close the client, and close the origin connection
        now, or once the origin has closed its side (see the module docstring)."""
        if self.finished:
            return
        self.finished = True
        self.stopping = True  # nothing more is relayed either way
        client = self.client
        client.timer.stop()
        conn = self.conn
        host, path, rid = self.host, self.path, self.request_id
        seconds = time.monotonic() - self.started
        observe.session_ended(
            self,
            {
                "host": host,
                "path": path,
                "origin": str(self.origin),
                "egress": conn.egress_ip if conn else None,
                "duration_s": round(seconds, 3),
                "bytes_to_origin": self.sent,
                "bytes_to_client": self.received,
                "closed_by": self.closed_by or "unknown",
                "close_code": self.close_code,
                "request_id": rid.decode("ascii"),
            },
            seconds,
        )
        client.close()
        if conn is None:
            return
        closing = self.told_origin or self.c2o.closed  # a Close went to the origin
        if closing and not self.origin_eof and conn.alive:
            client.timer.arm(ORIGIN_CLOSE_WAIT, self._origin_close_timeout)
            return
        self._release_origin()

    def _origin_close_timeout(self) -> None:
        """The origin did not close in time: reset, which leaves no TIME_WAIT either."""
        if self.conn is not None:
            self.conn.reset()
        self._release_origin()

    def _release_origin(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        self.client.timer.stop()
        active = self.client.proxy._active_by_origin
        active[conn.origin] = active.get(conn.origin, 0) - 1
        conn.pool.release(conn, False)  # a lease: closing it flushes, then FIN
