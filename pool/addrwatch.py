"""Which egress IPs the host has, learnt the moment the kernel announces a change.

An address removed under pooled connections is worse than one missing at connect time: the
kernel keeps the established sockets, their requests still leave, and every reply to the
vanished source is dropped, so a request on such a connection waits for the response
timeout. Polling cannot see it in time and traffic alone only sees it at the next connect.
The kernel announces every address change on rtnetlink's multicast groups
(``RTM_NEWADDR`` / ``RTM_DELADDR`` to ``RTMGRP_IPV4_IFADDR`` and ``RTMGRP_IPV6_IFADDR``); this
module subscribes a non-blocking netlink socket read by the event loop (``add_reader``),
one per pool and so per worker process, and after each announcement asks
:func:`pool.connectx.is_local_address` about every egress IP. The announcement is only the
trigger: the bind probe is the judge, because "local" is decided by routes as well as by
interface addresses (a /16 on ``lo`` makes all of it local; an IPv6 address is announced
while still tentative and announced again when usable), and after a lost announcement
(ENOBUFS: the socket overran) every IP is checked anyway.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from pool import netlink
from pool.connectx import is_local_address
from pool.egress import Egress, EgressSet

log = structlog.get_logger("originpool.egress")

RTM_NEWADDR = 20
RTM_DELADDR = 21
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
IFA_ADDRESS = 1
IFA_LOCAL = 2
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, ifindex
_RCVBUF = 1 << 20  # a burst of announcements (an interface going down) must not overrun


@dataclass(frozen=True, slots=True)
class AddressEvent:
    """One announcement: an address added to or removed from an interface."""

    added: bool
    address: str  # "" when the message carried none it could parse
    ifindex: int


def parse(data: bytes) -> list[AddressEvent]:
    """The address announcements in one datagram; other message types are skipped."""
    out: list[AddressEvent] = []
    offset = 0
    while offset + 16 <= len(data):
        length, mtype = struct.unpack_from("=IH", data, offset)
        if length < 16:
            break
        body = data[offset + 16 : offset + length]
        offset += (length + 3) & ~3
        if mtype not in (RTM_NEWADDR, RTM_DELADDR) or len(body) < _IFADDRMSG.size:
            continue
        family, _plen, _flags, _scope, ifindex = _IFADDRMSG.unpack_from(body)
        found: dict[int, bytes] = {}
        for atype, value in netlink.attributes(body, _IFADDRMSG.size):
            if atype in (IFA_ADDRESS, IFA_LOCAL):
                found[atype] = value
        raw = found.get(IFA_LOCAL) or found.get(IFA_ADDRESS)  # IFA_LOCAL: ours on p2p links
        address = ""
        if raw is not None and family in (socket.AF_INET, socket.AF_INET6):
            try:
                address = socket.inet_ntop(family, raw)
            except ValueError:
                address = ""
        out.append(AddressEvent(mtype == RTM_NEWADDR, address, ifindex))
    return out


class AddressWatch:
    """A subscription to the kernel's address announcements, read by the running loop.

    ``on_change(events)`` runs after each readable burst with what it carried; an empty list
    means announcements were lost (the socket overran) and the caller must check everything.
    ``on_failed()`` runs if the socket fails for good: from then on no change is announced,
    and the caller must stop trusting what it learnt from the watch.
    """

    def __init__(
        self,
        on_change: Callable[[list[AddressEvent]], None],
        on_failed: Callable[[], None] | None = None,
    ) -> None:
        self._on_change = on_change
        self._on_failed = on_failed
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Subscribe in this thread's network namespace; raises OSError if netlink refuses."""
        sock = socket.socket(
            socket.AF_NETLINK,
            socket.SOCK_RAW | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
            netlink.NETLINK_ROUTE,
        )
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            loop = asyncio.get_running_loop()
            loop.add_reader(sock.fileno(), self._readable)
        except BaseException:
            sock.close()
            raise
        self._sock, self._loop = sock, loop

    @property
    def running(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(sock.fileno())
        sock.close()

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        events: list[AddressEvent] = []
        overran = False
        for _ in range(1024):  # bounded: a storm of announcements cannot starve the loop
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    overran = True  # announcements were dropped: recheck every address
                    continue
                log.warning("address_watch_failed", errno=errno.errorcode.get(e.errno or 0, ""))
                self.close()
                if self._on_failed is not None:
                    self._on_failed()
                return
            events.extend(parse(data))
        if overran:
            self._on_change([])
        elif events:
            self._on_change(events)


def reconcile(egress: EgressSet) -> tuple[list[Egress], list[Egress]]:
    """Ask the kernel about every egress IP and record its answer: (newly gone, back)."""
    gone: list[Egress] = []
    back: list[Egress] = []
    for e in egress.egresses:
        if not e.ip:
            continue  # the kernel's default source: whatever the host has
        try:
            present = is_local_address(e.ip)
        except OSError as err:
            log.warning("egress_presence_unknown", egress=str(e), error=str(err))
            continue
        if egress.set_present(e, present):
            (back if present else gone).append(e)
    return gone, back


__all__ = ["AddressEvent", "AddressWatch", "parse", "reconcile"]
