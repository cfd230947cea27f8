"""The PROXY protocol, v1 (text) and v2 (binary), as HAProxy's proxy-protocol.txt defines it:
a parser fed bytes as they arrive, and the builders an origin's connection starts with.

Sans I/O so that every malformed header can be tried without a socket: the L4 balancer in
front (AWS NLB, HAProxy ``send-proxy``, Cloudflare Spectrum) writes one header before the
client's first byte, and whatever follows it (an HTTP head, a TLS ClientHello) is not ours to
touch; :func:`parse` says how many bytes the header took so the caller can leave the rest in
the kernel. A header is required on a listener that expects one (as HAProxy's
``accept-proxy``): a connection that starts with anything else is refused, never guessed at.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "NEED_DATA",
    "V1_MAX",
    "V2_SIGNATURE",
    "Command",
    "NeedData",
    "ProxyHeader",
    "ProxyProtocolError",
    "build_v1",
    "build_v2",
    "parse",
]

V1_PREFIX: Final = b"PROXY "
V1_MAX: Final = 107  # the spec's worst case, "PROXY UNKNOWN" + two IPv6 + ports + CRLF
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEAD: Final = 16  # signature, version/command, family/transport, length
V2_MAX: Final = V2_HEAD + 0xFFFF  # the length field's own bound

Command = Literal["proxy", "local"]
Address = tuple[str, int]

_FAMILIES: Final = {0x1: 4, 0x2: 16}  # INET, INET6: bytes per address
_ADDRESS_BLOCK: Final = {0x0: 0, 0x1: 12, 0x2: 36, 0x3: 216}  # AF_UNSPEC, INET, INET6, UNIX


class NeedData:
    """Not a whole header yet, and nothing wrong so far: read more."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class ProxyProtocolError(ValueError):
    """A header that is not one: the connection is closed. ``reason`` is a short word for the
    counter's label (``signature``, ``version``, ``command``, ``family``, ``address``,
    ``length``, ``tlv``, ``too_long``); the message says what was seen."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"PROXY protocol header refused ({reason}): {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the balancer said of the connection. ``source`` None: use the socket's own
    endpoints (v2 LOCAL, a health check from the balancer itself; v2 AF_UNSPEC or UNIX; v1
    UNKNOWN), as the spec requires of a receiver. ``length``: the bytes the header took."""

    version: int
    command: Command
    source: Address | None
    destination: Address | None
    length: int
    tlvs: tuple[tuple[int, bytes], ...] = ()


def parse(data: bytes | bytearray | memoryview, max_v2: int = V2_MAX) -> ProxyHeader | NeedData:
    """The header at the start of ``data``; NEED_DATA while it may still become one.

    While NEED_DATA is returned, every byte of ``data`` belongs to the header (neither
    version's header can be complete before its end is seen), so a reader may consume them.
    Raises :class:`ProxyProtocolError` as soon as the bytes cannot start a valid header.
    ``max_v2`` bounds a v2 header's total size (the 16-bit length allows 65,551 bytes).
    """
    view = bytes(data[:V2_MAX]) if len(data) > V2_MAX else bytes(data)
    if view[:1] == b"P":
        return _parse_v1(view)
    if view[:1] == b"\r":
        return _parse_v2(view, max_v2)
    if not view:
        return NEED_DATA
    raise ProxyProtocolError("signature", f"starts with {view[:8]!r}, not a PROXY header")


def _parse_v1(data: bytes) -> ProxyHeader | NeedData:
    n = min(len(data), len(V1_PREFIX))
    if data[:n] != V1_PREFIX[:n]:
        raise ProxyProtocolError("signature", f"starts with {data[:8]!r}, not a PROXY header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError("too_long", f"no CRLF in the first {V1_MAX} bytes")
        if b"\n" in data or (b"\r" in data[:-1]):
            raise ProxyProtocolError("signature", "a bare CR or LF in a v1 header")
        return NEED_DATA
    line = data[len(V1_PREFIX) : end]
    if b"\r" in line or b"\n" in line:
        raise ProxyProtocolError("signature", "a bare CR or LF in a v1 header")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("signature", "non-ASCII byte in a v1 header") from None
    length = end + 2
    parts = text.split(" ")
    if parts[0] == "UNKNOWN":  # the rest of the line is to be ignored
        return ProxyHeader(1, "proxy", None, None, length)
    if len(parts) != 5 or parts[0] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError("family", f"v1 line {text[:60]!r}: not TCP4/TCP6 with 4 fields")
    family = socket.AF_INET if parts[0] == "TCP4" else socket.AF_INET6
    src = _v1_address(parts[1], family)
    dst = _v1_address(parts[2], family)
    return ProxyHeader(1, "proxy", (src, _v1_port(parts[3])), (dst, _v1_port(parts[4])), length)


def _v1_address(text: str, family: int) -> str:
    # inet_pton: the kernel's own reading (no leading zeros in IPv4, no scope id in IPv6),
    # and ~10x faster than ipaddress
    try:
        packed = socket.inet_pton(family, text)
    except (OSError, ValueError):
        want = 4 if family == socket.AF_INET else 6
        raise ProxyProtocolError("address", f"{text[:46]!r} is not an IPv{want} address") from None
    return _spelling(packed)


_MAPPED: Final = bytes(10) + b"\xff\xff"


def _spelling(packed: bytes) -> str:
    """One spelling per address, the socket module's (inet_ntop, as a peer's address reads),
    whichever version said it: an IPv4-mapped IPv6 address (a dual-stack balancer's IPv4
    client) is the IPv4 address, so the trust check, the limits' key and X-Forwarded-For see
    the same client either way."""
    if len(packed) == 4:
        return socket.inet_ntop(socket.AF_INET, packed)
    if packed[:12] == _MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed)


def _v1_port(text: str) -> int:
    # decimal, no sign, no leading zero (the spec's own examples; HAProxy refuses them too)
    if not text.isdigit() or not text.isascii() or len(text) > 5 or text != str(int(text)):
        raise ProxyProtocolError("address", f"port {text[:8]!r} is not 0-65535")
    port = int(text)
    if port > 0xFFFF:
        raise ProxyProtocolError("address", f"port {port} is not 0-65535")
    return port


def _parse_v2(data: bytes, max_v2: int) -> ProxyHeader | NeedData:
    n = min(len(data), len(V2_SIGNATURE))
    if data[:n] != V2_SIGNATURE[:n]:
        raise ProxyProtocolError("signature", f"starts with {data[:8]!r}, not a PROXY header")
    if len(data) < V2_HEAD:
        if len(data) > 12 and data[12] >> 4 != 2:
            raise ProxyProtocolError("version", f"version {data[12] >> 4}, not 2")
        return NEED_DATA
    ver_cmd, fam_proto, size = struct.unpack_from("!BBH", data, 12)
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError("version", f"version {ver_cmd >> 4}, not 2")
    cmd = ver_cmd & 0xF
    if cmd not in (0, 1):
        raise ProxyProtocolError("command", f"command {cmd:#x}, neither LOCAL nor PROXY")
    family, transport = fam_proto >> 4, fam_proto & 0xF
    if family not in _ADDRESS_BLOCK or transport > 2:
        raise ProxyProtocolError("family", f"family/transport byte {fam_proto:#04x}")
    total = V2_HEAD + size
    if total > max_v2:
        raise ProxyProtocolError("too_long", f"{total} bytes, over the bound of {max_v2}")
    need = _ADDRESS_BLOCK[family]
    if size < need:
        raise ProxyProtocolError("length", f"length {size}, the address block needs {need}")
    if len(data) < total:
        return NEED_DATA
    tlvs = _tlvs(data[V2_HEAD + need : total])
    if cmd == 0:  # LOCAL: the balancer's own connection, its endpoints are the real ones
        return ProxyHeader(2, "local", None, None, total, tlvs)
    if family not in _FAMILIES or transport != 1:  # AF_UNSPEC, UNIX, or not a stream
        return ProxyHeader(2, "proxy", None, None, total, tlvs)
    width = _FAMILIES[family]
    block = data[V2_HEAD : V2_HEAD + need]
    src = _spelling(block[:width])
    dst = _spelling(block[width : 2 * width])
    sport, dport = struct.unpack_from("!HH", block, 2 * width)
    return ProxyHeader(2, "proxy", (src, sport), (dst, dport), total, tlvs)


def _tlvs(block: bytes) -> tuple[tuple[int, bytes], ...]:
    """Every TLV, each bounded by the block: one that runs past it is a malformed header
    (unknown types are kept as bytes, for whoever wants them, and otherwise ignored)."""
    out: list[tuple[int, bytes]] = []
    at = 0
    while at < len(block):
        if len(block) - at < 3:
            raise ProxyProtocolError("tlv", f"{len(block) - at} stray bytes after the TLVs")
        kind, size = struct.unpack_from("!BH", block, at)
        at += 3
        if at + size > len(block):
            raise ProxyProtocolError("tlv", f"TLV {kind:#04x} of {size} bytes overruns the header")
        out.append((kind, block[at : at + size]))
        at += size
    return tuple(out)


def _pair(source: Address, destination: Address) -> tuple[int, bytes, bytes]:
    """Both addresses packed in one family: an IPv4 one beside an IPv6 one is written as
    IPv4-mapped IPv6, as HAProxy does (a dual-stack listener hears both)."""
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        src, dst = (
            ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a for a in (src, dst)
        )
    return src.version, src.packed, dst.packed


def build_v2(
    source: Address | None,
    destination: Address | None,
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """A v2 header (HAProxy's ``send-proxy-v2``): PROXY over TCP from ``source`` to
    ``destination``, or LOCAL when either is None (nothing to say of a client)."""
    extra = b"".join(struct.pack("!BH", kind, len(v)) + v for kind, v in tlvs)
    if source is None or destination is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, len(extra)) + extra
    version, src, dst = _pair(source, destination)
    fam = 0x11 if version == 4 else 0x21
    block = src + dst + struct.pack("!HH", source[1], destination[1]) + extra
    if len(block) > 0xFFFF:
        raise ValueError(f"TLVs too long for a v2 header: {len(block)} bytes")
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, fam, len(block)) + block


def build_v1(source: Address | None, destination: Address | None) -> bytes:
    """A v1 line (HAProxy's ``send-proxy``); ``PROXY UNKNOWN`` when either end is None."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    version, src, dst = _pair(source, destination)
    name = "TCP4" if version == 4 else "TCP6"
    af = socket.AF_INET if version == 4 else socket.AF_INET6
    s, d = socket.inet_ntop(af, src), socket.inet_ntop(af, dst)
    return f"PROXY {name} {s} {d} {source[1]} {destination[1]}\r\n".encode("ascii")
