"""The response relay of an :class:`proxy.exchange.Exchange`: origin -> client.

While an exchange runs it is its pooled connection's handler; these are the handler's
methods (``data_received``, ``eof_received``, ``connection_lost``) and what they lead to: the
common response whole in one read, or the head, body pieces and end one event at a time, the
origin's 101 handed to the WebSocket switch, and the exchange finished when the last byte
went. Written apart so that ``proxy/exchange.py`` holds one job, the request's own course;
each function here is bound in :class:`~proxy.exchange.Exchange`'s body as a plain method
(``data_received = relay.data_received``), so a call costs what it did as a method defined
there: no wrapper, no added frame on the per-request path.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from proxy import health, http1
from proxy import websocket as ws

if TYPE_CHECKING:
    from proxy.exchange import Exchange


def data_received(self: Exchange, data: bytes) -> None:
    if self.client.whole:
        got = self.upstream.feed_whole(data)  # type: ignore[union-attr]
        if got is not None:  # the common response, whole in one read: no events
            self._respond_whole(*got)
            return
    self.upstream.feed(data)
    self._pump_response()


def _respond_whole(self: Exchange, event: http1.ResponseHead, body: bytes) -> None:
    """What ``_pump_response`` does with a final head, one body piece and End."""
    self._disarm()
    try:
        self.client.send_whole(event.status, self.head_to_client(event.headers), event.reason, body)
    except Exception as e:  # the client codec refusing the origin's head
        self._upstream_failed(http1.ProtocolError(502, f"bad response head: {e}"))
        return
    self.status = event.status
    if body:
        self.received += len(body)
        self.proxy.stats.bytes_out += len(body)
    self.resp = self.resp.after("whole")
    self._finish()


def _final_head(self: Exchange, event: http1.ResponseHead) -> None:
    """Send the client's head for the origin's final response; ProtocolError(502) when
    the client codec refuses it."""
    self._disarm()
    try:
        self.client.send_head(event.status, self.head_to_client(event.headers), event.reason)
    except Exception as e:
        raise http1.ProtocolError(502, f"bad response head: {e}") from e
    self.status = event.status
    self.resp = self.resp.after("head")


def _body_out(self: Exchange, data: bytes) -> None:
    """A piece of the response body, counted and sent to the client."""
    self.received += len(data)
    self.proxy.stats.bytes_out += len(data)
    self.client.send_body(data)


def eof_received(self: Exchange) -> None:
    self.upstream.feed(b"")
    self._pump_response()


def connection_lost(self: Exchange, exc: Exception | None) -> None:
    if self.finished:
        return
    reason = f"origin closed the connection: {exc}" if exc else "origin closed the connection"
    self._upstream_failed(ConnectionResetError(errno.ECONNRESET, reason))


def _pump_response(self: Exchange) -> None:
    # the client side holds its writes to the end of the loop turn (pool.turnwrite): head
    # and body of a small response still go in one send
    while not self.finished:
        try:
            event = self.upstream.next_event()
        except http1.ProtocolError as e:
            self._upstream_failed(e)
            return
        if event is http1.NEED_DATA:
            return
        if isinstance(event, http1.ResponseHead):
            if event.informational:
                if event.status == 101 and self.websocket:
                    try:  # believed only as a valid answer: else no tunnel, a 502
                        ws.check_response(self.head.headers, event.headers)
                    except ws.HandshakeError as e:
                        self._upstream_failed(e)
                        return
                    self._switch(event)
                    return
                if event.status == 100:
                    continue  # we sent our own 100 Continue, if it was asked for
                self.client.send_informational(
                    event.status, self.head_to_client(event.headers), event.reason
                )
                continue
            try:
                self._final_head(event)
            except http1.ProtocolError as e:
                self._upstream_failed(e)
                return
        elif isinstance(event, http1.Body):
            self._body_out(event.data)
        elif isinstance(event, http1.End):
            self.client.send_end()
            self.resp = self.resp.after("end")
            self._finish()
            return
        elif event is http1.CLOSED:
            self._upstream_failed(ConnectionResetError(errno.ECONNRESET, "origin closed"))
            return
        else:
            return  # PAUSED / SWITCHED: handled by the WebSocket path


def _response_timeout(self: Exchange) -> None:
    self._upstream_failed(TimeoutError(errno.ETIMEDOUT, "origin sent no response head in time"))


def _finish(self: Exchange) -> None:
    """The response went out whole (the state is already COMPLETE)."""
    self._disarm()
    reusable = self.upstream.reusable
    self._release(reusable)
    if self.origin is not None:  # passive ejection counts 5xx (proxy.health)
        health.report(self.origin, self.status < 500, self.status)
    self._record(self.status)
    self.client.exchange_done(True)
