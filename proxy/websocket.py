"""What the proxy needs to know about WebSocket traffic it relays as bytes.

After the origin's 101 the proxy does not parse frames: payloads are neither unmasked nor
copied. It does follow frame *boundaries* in each direction (a few header bytes per frame),
because two decisions depend on them: whether a Close frame already went through (then a
TCP close is the normal end, not a failure), and whether the proxy may inject its own Close
frame (1011 when the other side failed, 1001 on shutdown) without cutting a frame in half.
The Close frames themselves are built with wsproto.

Before all that, the opening handshake is checked both ways (RFC 6455 §4.1, §4.2.1), because
the 101 is where the proxy stops reading HTTP on both connections: a 101 the proxy believed
wrongly would send the client's next request to that origin unrouted (the WebSocket
smuggling of 0ang3el/websocket-smuggle). So an upgrade request that is no valid client
handshake is refused before any origin is contacted (:func:`check_request`), and the
origin's 101 must be a valid answer to the handshake the proxy forwarded
(:func:`check_response`), as RFC 6455 §4.1 asks of any client, or it is a 502.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
from collections.abc import Sequence
from typing import Final

from wsproto.frame_protocol import CloseReason, FrameProtocol

from proxy import accel
from proxy.http1 import ProtocolError, comma_items

Headers = Sequence[tuple[bytes, bytes]]

OP_CLOSE = 0x8

GOING_AWAY = CloseReason.GOING_AWAY  # 1001: shutdown, or the other side went away
INTERNAL_ERROR = CloseReason.INTERNAL_ERROR  # 1011: the origin failed

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
VERSION = b"13"  # the only version RFC 6455 defines, and the only one relayed
_HANDSHAKE = frozenset(
    (
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-protocol",
        b"sec-websocket-extensions",
        b"sec-websocket-accept",
        b"upgrade",
        b"connection",
    )
)


class HandshakeError(ProtocolError):
    """An opening handshake the proxy does not go on with: the client's (400 or 426, the
    origin never contacted) or the origin's 101 (502, the upstream connection closed).

    ``check`` names the rule that failed, for the log line; ``headers`` go with the answer.
    """

    def __init__(self, status: int, check: str, detail: str, headers: Headers = ()) -> None:
        super().__init__(status, f"{detail} ({check})")
        self.check = check
        self.headers = list(headers)


def is_upgrade(headers: Headers) -> bool:
    """The request asks for a WebSocket upgrade: Upgrade names ``websocket`` and Connection
    ``upgrade`` (RFC 6455 §4.1), whatever the method: one that is no valid handshake (not a
    GET, say) must be refused by :func:`check_request`, not relayed as a plain request."""
    for n, _ in headers:  # this runs for every request: one compare per header, no Upgrade
        if n == b"upgrade":
            break
    else:
        return False
    upgrade = connection = False
    for n, v in headers:
        if n == b"upgrade":
            upgrade = upgrade or b"websocket" in comma_items(v)
        elif n == b"connection":
            connection = connection or b"upgrade" in comma_items(v)
    return upgrade and connection


def _fields(headers: Headers) -> dict[bytes, list[bytes]]:
    """The handshake's header values by name, as the next hop gets them: a header the
    Connection header names is hop-by-hop (RFC 9110 §7.6.1) and never forwarded, so it
    counts as absent."""
    found: dict[bytes, list[bytes]] = {}
    for n, v in headers:
        if n in _HANDSHAKE:
            if n in found:
                found[n].append(v)
            else:
                found[n] = [v]
    connection = found.get(b"connection")
    if connection is not None:
        listed = b",".join(connection).lower()
        if b"sec-" in listed:  # rare: the usual Connection names only upgrade
            for name in comma_items(listed):
                if name.startswith(b"sec-websocket-"):
                    found.pop(name, None)
    return found


def _list(values: list[bytes]) -> list[bytes]:
    """A comma-separated header's items, case kept (subprotocols compare exactly)."""
    return [item.strip() for v in values for item in v.split(b",") if item.strip()]


def _extension_names(values: list[bytes]) -> set[bytes]:
    return {item.split(b";", 1)[0].strip().lower() for item in _list(values)}


def accept_for(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept that answers ``key`` (RFC 6455 §4.2.2 item 5.4)."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def check_request(headers: Headers, method: bytes, http_version: bytes) -> None:
    """Raise :class:`HandshakeError` unless the upgrade request is a valid client opening
    handshake (RFC 6455 §4.2.1): an HTTP/1.1 GET with one Sec-WebSocket-Key, the base64 of
    16 bytes, and Sec-WebSocket-Version 13. A version other than 13 is a 426 naming 13
    (§4.4); anything else a 400. Upgrade and Connection are :func:`is_upgrade`'s."""
    if method != b"GET":
        raise HandshakeError(400, "method", "a WebSocket handshake must be a GET")
    if http_version < b"1.1":
        raise HandshakeError(400, "http-version", "a WebSocket handshake needs HTTP/1.1")
    found = _fields(headers)
    keys = found.get(b"sec-websocket-key", [])
    try:
        nonce = base64.b64decode(keys[0], validate=True) if len(keys) == 1 else b""
    except binascii.Error:
        nonce = b""
    if len(nonce) != 16:
        raise HandshakeError(
            400, "key", "Sec-WebSocket-Key must be one header, the base64 of 16 bytes"
        )
    versions = found.get(b"sec-websocket-version", [])
    if not versions:
        raise HandshakeError(400, "version", "Sec-WebSocket-Version is missing")
    if versions != [VERSION]:
        raise HandshakeError(
            426,
            "version",
            "only Sec-WebSocket-Version 13 is supported",
            [
                (b"sec-websocket-version", VERSION),
                (b"upgrade", b"websocket"),
                (b"connection", b"upgrade"),
            ],
        )


def _shown(values: list[bytes] | None) -> str:
    """Header values for a log line: the origin's bytes, quoted and cut short."""
    if not values:
        return "none"
    return repr(b", ".join(values)[:80])[1:]


def check_response(request: Headers, response: Headers) -> None:
    """Raise :class:`HandshakeError` (502) unless the origin's 101 answers the handshake the
    proxy forwarded as RFC 6455 §4.1 requires of a client before it treats the connection
    as upgraded: Upgrade ``websocket``, Connection naming ``upgrade``, one
    Sec-WebSocket-Accept matching the key sent, and extensions and a subprotocol only from
    those offered. ``request`` is the client's request headers (forwarded as they are).
    The error names the check and what the origin sent instead."""
    sent = _fields(request)
    got = _fields(response)
    upgrade = got.get(b"upgrade")
    if upgrade != [b"websocket"] and comma_items(b",".join(upgrade or [])) != [b"websocket"]:
        raise HandshakeError(
            502, "upgrade", f"the origin's 101 has Upgrade {_shown(upgrade)}, not websocket"
        )
    connection = got.get(b"connection")
    if connection != [b"Upgrade"] and b"upgrade" not in comma_items(b",".join(connection or [])):
        raise HandshakeError(
            502,
            "connection",
            f"the origin's 101 has Connection {_shown(connection)}, without upgrade",
        )
    accepts = got.get(b"sec-websocket-accept", [])
    key = sent.get(b"sec-websocket-key", [b""])[0]
    if len(accepts) != 1 or accepts[0].strip() != accept_for(key.strip()):
        raise HandshakeError(
            502,
            "accept",
            f"the origin's 101 has Sec-WebSocket-Accept {_shown(accepts)}, "
            "not the one answering the key sent",
        )
    extensions = got.get(b"sec-websocket-extensions")
    if extensions is not None:
        offered = _extension_names(sent.get(b"sec-websocket-extensions", []))
        if not _extension_names(extensions) <= offered or not _list(extensions):
            raise HandshakeError(
                502,
                "extensions",
                f"the origin's 101 has Sec-WebSocket-Extensions {_shown(extensions)}, "
                f"offered {_shown(sent.get(b'sec-websocket-extensions'))}",
            )
    protocols = got.get(b"sec-websocket-protocol")
    if protocols is not None:
        chosen = _list(protocols)
        offered_protocols = _list(sent.get(b"sec-websocket-protocol", []))
        if len(chosen) != 1 or chosen[0] not in offered_protocols:
            raise HandshakeError(
                502,
                "protocol",
                f"the origin's 101 has Sec-WebSocket-Protocol {_shown(protocols)}, "
                f"offered {_shown(sent.get(b'sec-websocket-protocol'))}",
            )


class FrameTracker:
    """Follows frame boundaries in one direction of a relayed WebSocket stream.

    It reports a Close frame, and its code, only from a frame header that can be one: a
    control frame is never fragmented and carries at most 125 bytes (RFC 6455 §5.5), a Close
    payload is empty or starts with a 2-byte code (§5.5.1), and frames are masked from the
    client and never from the origin (§5.1; ``masked``, checked by the two subclasses).
    Bytes that break those rules are no WebSocket stream the proxy can follow (an HTTP
    response read as frames: "HT" is a fragmented Close, "TP" its code 21584), so from
    there on the tracker is ``lost``: no boundary, no Close, no code, whatever comes.
    """

    masked: bool | None = None  # whether this direction's frames must be masked, if known

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

    @property
    def lost(self) -> bool:
        """The stream broke the framing rules: boundaries and Close frames are unknown."""
        return self._remaining < 0

    def _lose(self) -> None:
        self._remaining = -1  # at_boundary is False from now on, and feed() reads nothing
        self._head = self._close_payload = b""
        self._in_close = False

    def feed(self, data: bytes) -> None:
        if self._remaining < 0:
            return
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
            b0 = head[0]
            opcode = b0 & 0x0F
            if (opcode & 0x08 and (not b0 & 0x80 or size > 125)) or (
                opcode == OP_CLOSE and size == 1
            ):
                self._lose()  # a fragmented or long control frame, or a 1-byte Close
                return
            if self.masked is not None and self.masked != bool(b1 & 0x80):
                self._lose()
                return
            if size == 126:
                size = int.from_bytes(head[2:4], "big")
            elif size == 127:
                size = int.from_bytes(head[2:10], "big")
            self._in_close = opcode == OP_CLOSE
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


class ClientFrames(FrameTracker):
    """Client to origin: every frame masked (RFC 6455 §5.1)."""

    __slots__ = ()
    masked = True


class OriginFrames(FrameTracker):
    """Origin to client: no frame masked (RFC 6455 §5.1)."""

    __slots__ = ()
    masked = False


# The trackers above are the spec and the fallback; proxy/_frames.c is their compiled twin
# (a feed is ~0.1 us there, ~1 us here, twice per relayed message), taken when it was built
# and proxy.accel allows it. tests/test_frames.py holds the two to the same states.
PURE: Final = {
    "FrameTracker": FrameTracker,
    "ClientFrames": ClientFrames,
    "OriginFrames": OriginFrames,
}

if not accel.NO_EXTENSIONS:
    with contextlib.suppress(ImportError):  # not built (no compiler at install)
        from proxy._frames import (  # type: ignore[no-redef,import-not-found]
            ClientFrames,
            FrameTracker,
            OriginFrames,
        )

COMPILED: Final = FrameTracker is not PURE["FrameTracker"]


def close_frame(code: int, reason: str, *, to_origin: bool) -> bytes:
    """A Close frame as the proxy's side of that connection must send it.

    Toward the origin the proxy acts as the client, so the frame is masked (RFC 6455 5.3).
    """
    proto = FrameProtocol(client=to_origin, extensions=[])
    return bytes(proto.close(code=code, reason=reason))  # wsproto builds a bytearray
