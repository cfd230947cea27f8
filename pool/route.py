"""Which source address the kernel would use toward a destination (rtnetlink RTM_GETROUTE).

A UDP ``connect()`` used only to learn the source address auto-binds a port, and fails with
EAGAIN exactly when the UDP range is full, the moment connectx needs the answer most. Asking
the routing table allocates nothing.
"""

from __future__ import annotations

import socket
import struct

from pool import netlink

RTM_NEWROUTE = 24
RTM_GETROUTE = 26
RTA_DST = 1
RTA_OIF = 4
RTA_PREFSRC = 7
_RTMSG = struct.Struct("=BBBBBBBBI")


def source_for(family: int, dst: str, ifindex: int = 0) -> str:
    """The preferred source address for ``dst`` (``ip route get DST``'s "src").

    Raises ``OSError`` with the kernel's errno (ENETUNREACH, EHOSTUNREACH, ...) when there is
    no route.
    """
    addr = socket.inet_pton(family, dst)
    payload = _RTMSG.pack(family, len(addr) * 8, 0, 0, 0, 0, 0, 0, 0) + netlink.attribute(
        RTA_DST, addr
    )
    if ifindex:
        payload += netlink.attribute(RTA_OIF, struct.pack("=I", ifindex))
    with netlink.open_socket(netlink.NETLINK_ROUTE) as sock:
        for mtype, body in netlink.request(sock, RTM_GETROUTE, netlink.NLM_F_REQUEST, payload):
            if mtype != RTM_NEWROUTE:
                continue
            for atype, value in netlink.attributes(body, _RTMSG.size):
                if atype == RTA_PREFSRC:
                    return socket.inet_ntop(family, value)
    raise OSError(
        101, f"no source address for {dst}: the route has none (ip route get {dst})"
    )  # ENETUNREACH
