"""Minimal netlink transport: one request out, its answers back.

Hand-written rather than pyroute2 because connectx asks sock_diag one exact question per
candidate port on its hot path: a packed struct and one recv cost a few microseconds, where a
general netlink library costs hundreds. Only what sock_diag and rtnetlink need is here.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

NETLINK_ROUTE = 0
NETLINK_SOCK_DIAG = 4

NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_RECV = 1 << 16


def _align(n: int) -> int:
    return (n + 3) & ~3


def open_socket(protocol: int) -> socket.socket:
    """A netlink socket in the calling thread's network namespace."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)


def request(
    sock: socket.socket, msg_type: int, flags: int, payload: bytes, seq: int = 1
) -> Iterator[tuple[int, bytes]]:
    """Send one message and yield (type, payload) of each answer until the kernel is done.

    A kernel error (NLMSG_ERROR with a non-zero code) raises ``OSError`` with that errno, so
    "no such socket" arrives as ENOENT like any other lookup miss.
    """
    sock.send(_HDR.pack(_HDR.size + len(payload), msg_type, flags, seq, 0) + payload)
    multi = bool(flags & NLM_F_DUMP)
    while True:
        data = sock.recv(_RECV)
        offset = 0
        while offset + _HDR.size <= len(data):
            length, mtype, _mflags, mseq, _pid = _HDR.unpack_from(data, offset)
            if length < _HDR.size:
                raise OSError(errno.EPROTO, "netlink: truncated message")
            body = data[offset + _HDR.size : offset + length]
            offset += _align(length)
            if mseq != seq:
                continue
            if mtype == NLMSG_DONE:
                return
            if mtype == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", body)
                if code:
                    raise OSError(-code, os.strerror(-code))
                return
            yield mtype, body
            if not multi:
                return


def attributes(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """Walk rtattr/nlattr TLVs: (type, value)."""
    while offset + 4 <= len(data):
        length, atype = struct.unpack_from("=HH", data, offset)
        if length < 4:
            return
        yield atype & 0x3FFF, data[offset + 4 : offset + length]
        offset += _align(length)


def attribute(atype: int, value: bytes) -> bytes:
    """Pack one attribute, padded."""
    raw = struct.pack("=HH", 4 + len(value), atype) + value
    return raw + b"\0" * (_align(len(raw)) - len(raw))
