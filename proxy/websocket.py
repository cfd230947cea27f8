"""What the proxy needs to know about WebSocket traffic it relays as bytes.

After the origin's 101 the proxy does not parse frames: payloads are neither unmasked nor
copied. It does follow frame *boundaries* in each direction (a few header bytes per frame),
because two decisions depend on them: whether a Close frame already went through (then a
TCP close is the normal end, not a failure), and whether the proxy may inject its own Close
frame (1011 when the other side failed, 1001 on shutdown) without cutting a frame in half.
The Close frames themselves are built with wsproto.
"""

from __future__ import annotations

from wsproto.frame_protocol import CloseReason, FrameProtocol

OP_CLOSE = 0x8

GOING_AWAY = CloseReason.GOING_AWAY  # 1001: shutdown, or the other side went away
INTERNAL_ERROR = CloseReason.INTERNAL_ERROR  # 1011: the origin failed


def is_upgrade(headers: list[tuple[bytes, bytes]], method: bytes) -> bool:
    """A WebSocket opening handshake (RFC 6455 section 4.1): GET, Upgrade, Connection."""
    if method != b"GET":
        return False
    upgrade = connection = False
    for n, v in headers:  # one pass: this runs for every GET
        if n == b"upgrade":
            upgrade = upgrade or b"websocket" in v.lower()
        elif n == b"connection":
            connection = connection or b"upgrade" in [t.strip() for t in v.lower().split(b",")]
    return upgrade and connection


class FrameTracker:
    """Follows frame boundaries in one direction of a relayed WebSocket stream."""

    __slots__ = (
        "_close_payload",
        "_head",
        "_in_close",
        "_mask",
        "_remaining",
        "close_code",
        "closed",
    )

    def __init__(self) -> None:
        self._head = b""  # an incomplete frame header
        self._remaining = 0  # payload bytes of the current frame still to pass
        self._in_close = False
        self._close_payload = b""
        self._mask = b""
        self.closed = False  # a complete Close frame went through
        self.close_code: int | None = None

    @property
    def at_boundary(self) -> bool:
        return self._remaining == 0 and not self._head

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._remaining:
                take = min(self._remaining, end - pos)
                if self._in_close:
                    self._close_payload += data[pos : pos + take]
                pos += take
                self._remaining -= take
                if not self._remaining and self._in_close:
                    self._close_done()
                continue
            need = 2 - len(self._head)
            if need > 0:
                self._head += data[pos : pos + need]
                pos += need
                if len(self._head) < 2:
                    return
            b1 = self._head[1]
            size = b1 & 0x7F
            header_len = (
                2 + (2 if size == 126 else 8 if size == 127 else 0) + (4 if b1 & 0x80 else 0)
            )
            need = header_len - len(self._head)
            if need > 0:
                self._head += data[pos : pos + need]
                pos += need
                if len(self._head) < header_len:
                    return
            head, self._head = self._head, b""
            if size == 126:
                size = int.from_bytes(head[2:4], "big")
            elif size == 127:
                size = int.from_bytes(head[2:10], "big")
            self._in_close = head[0] & 0x0F == OP_CLOSE
            self._mask = head[header_len - 4 : header_len] if b1 & 0x80 else b""
            self._close_payload = b""
            self._remaining = size
            if not size and self._in_close:
                self._close_done()

    def _close_done(self) -> None:
        self.closed = True
        self._in_close = False
        payload = self._close_payload
        if len(payload) >= 2:
            mask = self._mask
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload[:2]))
            self.close_code = int.from_bytes(payload[:2], "big")
        else:
            self.close_code = 1005  # no status code present


def close_frame(code: int, reason: str, *, to_origin: bool) -> bytes:
    """A Close frame as the proxy's side of that connection must send it.

    Toward the origin the proxy acts as the client, so the frame is masked (RFC 6455 5.3).
    """
    proto = FrameProtocol(client=to_origin, extensions=[])
    return proto.close(code=code, reason=reason)
