"""Ask the kernel which sockets hold a 4-tuple (``NETLINK_SOCK_DIAG``, inet_diag).

Two uses: connectx's exact lookup ("is src:sport -> dst:dport taken, and by whom?"), which is
what keeps UDP from creating duplicate 4-tuples, and the census dump behind ``originpool
ports``. IPv4 and IPv6 alike; addresses are returned as text.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from pool import netlink

SOCK_DIAG_BY_FAMILY = 20
INET_DIAG_NOCOOKIE = 0xFFFFFFFF

# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid.
_REQ = struct.Struct("=BBBBI")
# inet_diag_sockid: sport, dport (big endian), src[16], dst[16], if, cookie[2].
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
# inet_diag_msg: family, state, timer, retrans, sockid (48), expires, rqueue, wqueue, uid, inode.
_MSG_HEAD = struct.Struct("=BBBB")
_MSG_TAIL = struct.Struct("=IIIII")

TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
}
TCP_TIME_WAIT = 6
TCP_LISTEN = 10
ALL_STATES = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class DiagSocket:
    """One socket as sock_diag reports it."""

    family: int
    protocol: int
    state: int
    src: str
    sport: int
    dst: str
    dport: int
    cookie: int
    inode: int
    uid: int


def _pack_addr(family: int, ip: str) -> bytes:
    return socket.inet_pton(family, ip).ljust(16, b"\0")


def _unpack_addr(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw[:4] if family == socket.AF_INET else raw[:16])


def _request(
    family: int,
    protocol: int,
    states: int,
    sport: int,
    dport: int,
    src: bytes,
    dst: bytes,
    ifindex: int,
) -> bytes:
    return (
        _REQ.pack(family, protocol, 0, 0, states)
        + _SOCKID.pack(sport, dport, src, dst)
        + _SOCKID_TAIL.pack(ifindex, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    )


def _parse(protocol: int, body: bytes) -> DiagSocket:
    family, state, _timer, _retrans = _MSG_HEAD.unpack_from(body, 0)
    sport, dport, src, dst = _SOCKID.unpack_from(body, 4)
    _if, c0, c1 = _SOCKID_TAIL.unpack_from(body, 4 + _SOCKID.size)
    _exp, _rq, _wq, uid, inode = _MSG_TAIL.unpack_from(body, 4 + 48)
    return DiagSocket(
        family,
        protocol,
        state,
        _unpack_addr(family, src),
        sport,
        _unpack_addr(family, dst),
        dport,
        c0 | c1 << 32,
        inode,
        uid,
    )


def lookup(
    family: int,
    protocol: int,
    local: tuple[str, int],
    remote: tuple[str, int],
    ifindex: int = 0,
    nl: socket.socket | None = None,
) -> DiagSocket | None:
    """The socket the kernel would deliver remote -> local traffic to, or None.

    This is the kernel's own exact lookup (no ``NLM_F_DUMP``): it answers for a connected
    socket holding the 4-tuple, or failing that the bound socket that would receive it.
    UDP's request names the peer as "src" (the kernel swaps them "for historical reasons",
    net/ipv4/udp_diag.c); TCP's names the local side as "src".
    """
    lsrc, rdst = _pack_addr(family, local[0]), _pack_addr(family, remote[0])
    if protocol == socket.IPPROTO_UDP:
        payload = _request(family, protocol, ALL_STATES, remote[1], local[1], rdst, lsrc, ifindex)
    else:
        payload = _request(family, protocol, ALL_STATES, local[1], remote[1], lsrc, rdst, ifindex)
    own = nl is None
    sock = netlink.open_socket(netlink.NETLINK_SOCK_DIAG) if nl is None else nl
    try:
        for _type, body in netlink.request(
            sock, SOCK_DIAG_BY_FAMILY, netlink.NLM_F_REQUEST, payload
        ):
            return _parse(protocol, body)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    finally:
        if own:
            sock.close()
    return None


def dump(family: int, protocol: int, states: int = ALL_STATES) -> Iterator[DiagSocket]:
    """Every socket of one family and protocol in the calling thread's namespace."""
    zero = b"\0" * 16
    payload = _request(family, protocol, states, 0, 0, zero, zero, 0)
    with netlink.open_socket(netlink.NETLINK_SOCK_DIAG) as sock:
        for _type, body in netlink.request(
            sock, SOCK_DIAG_BY_FAMILY, netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP, payload
        ):
            yield _parse(protocol, body)
