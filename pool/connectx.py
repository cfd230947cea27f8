"""The improved ``connect()``: pick a source IP without giving up per-destination port sharing.

``connectx(sock, local_addr, remote_addr, *, port_range=None)`` follows the signature of the
published userspace proposal (Cloudflare, 2022), so code written against it ports over. What
it does, by case (kernel facts in ../shared/docs/ephemeral-ports.md):

==========================  ================================================================
TCP, wildcard ip, port 0    ``SO_REUSEADDR``, plain ``connect()``: no bind
TCP, ip, port 0             ``IP_BIND_ADDRESS_NO_PORT`` + ``SO_REUSEADDR``, bind, connect
TCP, explicit port          ``SO_REUSEADDR``, bind, connect; a taken 4-tuple: EADDRNOTAVAIL
TCP, ``port_range``         ``IP_LOCAL_PORT_RANGE`` window; without it (ENOPROTOOPT, or
                            ``userspace_ports=True``) ports are chosen here: random start,
                            reserved and locked ports skipped, bounded to one pass
UDP, any                    a port whose 4-tuple sock_diag reports free; bind with
                            ``SO_REUSEADDR``, clear it (the lock), check by ``SO_COOKIE``
                            that the 4-tuple is ours, connect, set it again. EAGAIN when
                            every port is taken for that destination
==========================  ================================================================

The logic is one generator that yields whenever it needs the socket connected; the blocking
and asyncio forms only differ in how they perform that one step, so the loop never blocks
(bind, setsockopt and netlink questions return at once).

Errors are :class:`pool.errors.ConnectError`: an ``OSError`` with the kernel's errno (still a
``ConnectionRefusedError`` and friends) carrying the stage, both addresses and the errno, and
naming them in its message.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import itertools
import os
import random
import socket
import struct
import threading
from collections.abc import Generator, Iterable, Iterator
from functools import lru_cache

from pool import kernel, netlink, route, sockdiag, sockopt
from pool.errors import Address, ConnectError, Stage, format_address
from pool.netlink import NETLINK_SOCK_DIAG, open_socket

PortRange = tuple[int, int]

# The generator yields once per connect() it needs and is sent back that connect's error.
_Steps = Generator[None, OSError | None, None]

# Threads of one process must not interleave the UDP bind/check/connect sequence: the
# SO_REUSEADDR lock only keeps *new* binds out.
_udp_lock = threading.Lock()


def connectx(
    sock: socket.socket,
    local_addr: Address,
    remote_addr: Address,
    *,
    port_range: PortRange | None = None,
    userspace_ports: bool = False,
) -> None:
    """Bind ``sock`` to a source on ``local_addr`` and connect it to ``remote_addr``.

    ``sock`` must be fresh (unbound, unconnected); ``sock.getsockname()`` tells the port it
    got (not returned: that syscall would be a tenth of an idle connect, paid by every
    caller). ``userspace_ports=True`` forces the userspace port choice that older kernels
    (no ``IP_LOCAL_PORT_RANGE``) get, so both paths can be exercised on one machine.
    """
    family, kind = _raw_family(sock), _raw_type(sock)
    if family not in _FAMILIES or kind != _STREAM or port_range is not None:
        _check(family, kind, local_addr, port_range)
        if kind == _DGRAM:
            _udp(sock, family, local_addr, remote_addr, port_range)
            return
    window = _tcp_prepare(sock, family, local_addr, remote_addr, port_range, userspace_ports)
    if window is None:  # the kernel chooses the port: one connect, no generator
        try:
            sock.connect(remote_addr)
        except OSError as e:
            raise _error(e, _local_for_error(sock, local_addr), remote_addr) from None
        return
    steps = _tcp_userspace(sock, family, local_addr, remote_addr, window)
    try:
        steps.send(None)
        while True:
            try:
                sock.connect(remote_addr)
            except OSError as e:
                steps.send(e)
            else:
                steps.send(None)
    except StopIteration:
        return
    finally:
        steps.close()


async def connectx_async(
    sock: socket.socket,
    local_addr: Address,
    remote_addr: Address,
    *,
    port_range: PortRange | None = None,
    userspace_ports: bool = False,
) -> None:
    """:func:`connectx` for a non-blocking socket, awaiting the handshake on the running loop.

    Cancelling it leaves ``sock`` to the caller to close, as with ``loop.sock_connect``.
    """
    family, kind = _raw_family(sock), _raw_type(sock)
    _check(family, kind, local_addr, port_range)
    if kind == _DGRAM:
        _udp(sock, family, local_addr, remote_addr, port_range)  # never waits: no handshake
        return
    loop = asyncio.get_running_loop()
    window = _tcp_prepare(sock, family, local_addr, remote_addr, port_range, userspace_ports)
    if window is None:
        try:
            await _sock_connect(loop, sock, remote_addr)
        except OSError as e:
            raise _error(e, _local_for_error(sock, local_addr), remote_addr) from None
        return
    steps = _tcp_userspace(sock, family, local_addr, remote_addr, window)
    try:
        steps.send(None)
        while True:
            try:
                await _sock_connect(loop, sock, remote_addr)
            except OSError as e:
                steps.send(e)
            else:
                steps.send(None)
    except StopIteration:
        return
    finally:
        steps.close()


async def _sock_connect(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, remote: Address
) -> None:
    """``loop.sock_connect`` for a numeric address, without the loop's resolver step.

    uvloop's ``sock_connect`` calls ``getaddrinfo`` with no socket type, which misses its
    numeric fast path and resolves in libuv's thread pool on every call (~80 us, 8x the
    connect itself; measured by bench/pool_latency.py). ``remote`` is numeric here, so
    connect directly and wait for writability, as asyncio's selector loop does.
    """
    err = sock.connect_ex(remote)
    if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EINTR):
        fut: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()
        loop.add_writer(fd, _wake, fut)
        try:
            await fut
        finally:
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# --- the decisions, free of how connect() is awaited -------------------------------------

# socket.socket.family/.type build an enum on every read (~0.5 us each); the C-level
# descriptors give the plain ints.
_raw_family = _socket.socket.family.__get__
_raw_type = _socket.socket.type.__get__
_STREAM, _DGRAM = int(socket.SOCK_STREAM), int(socket.SOCK_DGRAM)
_FAMILIES = (int(socket.AF_INET), int(socket.AF_INET6))


def _check(family: int, kind: int, local: Address, port_range: PortRange | None) -> None:
    """Reject what connectx cannot do, before touching the socket."""
    if family not in _FAMILIES:
        raise ValueError(f"connectx: address family {family} is not AF_INET/AF_INET6")
    if kind != _STREAM and kind != _DGRAM:
        raise ValueError(f"connectx: socket type {kind} is not SOCK_STREAM/SOCK_DGRAM")
    if port_range is not None:
        if local[1]:
            raise ValueError("connectx: give an explicit local port or a port_range, not both")
        if not (0 < port_range[0] <= port_range[1] <= 65535):
            raise ValueError(f"connectx: bad port_range {port_range[0]}-{port_range[1]}")


def _tcp_prepare(
    sock: socket.socket,
    family: int,
    local: Address,
    remote: Address,
    port_range: PortRange | None,
    userspace: bool,
) -> PortRange | None:
    """Set the socket up for the kernel's port choice and return None, or return the window
    in which the port must be chosen here (no ``IP_LOCAL_PORT_RANGE``, forced, or a window
    the kernel would ignore)."""
    if port_range is not None:
        window = effective_window(*port_range)
        if window is None or userspace or not kernel.has_ip_local_port_range():
            return window or port_range
        sockopt.restrict_source_ports(sock, *window)
    # SO_REUSEADDR on every outgoing socket, bound or not: a port held without it cannot
    # be bound explicitly by anyone else, even toward another destination.
    sockopt.allow_shared_source_port(sock)
    if local[1]:
        _bind(sock, local, remote)
    elif not is_wildcard(family, local[0]):
        sockopt.share_source_port_across_destinations(sock)
        _bind(sock, local, remote)
    return None


def _tcp_userspace(
    sock: socket.socket, family: int, local: Address, remote: Address, window: PortRange
) -> _Steps:
    """Choose the port here: what kernels without ``IP_LOCAL_PORT_RANGE`` need.

    Each port of the window is tried at most once, from a random start. A port whose
    4-tuple sock_diag shows live (not TIME_WAIT, which an explicit SO_REUSEADDR bind takes
    over) is skipped without a syscall on the socket; a port locked by a listener or an
    unshared bind fails bind() with EADDRINUSE and is skipped; a port lost to a race fails
    connect() with EADDRNOTAVAIL and costs a fresh socket.
    """
    src = _source_ip(family, local, remote)
    reserved = kernel.port_sysctls().reserved
    with open_socket(NETLINK_SOCK_DIAG) as nl:
        for port in candidate_ports(*window):
            if port in reserved:
                continue
            holder = sockdiag.lookup(
                family, socket.IPPROTO_TCP, (src, port), remote, _scope(local, remote), nl
            )
            if holder is not None and holder.state != sockdiag.TCP_TIME_WAIT:
                continue
            sockopt.allow_shared_source_port(sock)
            try:
                sock.bind(_with_ip(local, src, port, remote))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    continue
                raise _error(e, (src, port), remote, "bind") from None
            err = yield
            if err is None:
                return
            if err.errno != errno.EADDRNOTAVAIL:
                raise _error(err, (src, port), remote)
            sockopt.reissue(sock)
    raise _error(errno.EADDRNOTAVAIL, (src, f"{window[0]}-{window[1]}"), remote)


def _udp(
    sock: socket.socket,
    family: int,
    local: Address,
    remote: Address,
    port_range: PortRange | None,
) -> None:
    """UDP connect that never creates a duplicate 4-tuple (the kernel does not check)."""
    src = _source_ip(family, local, remote)
    scope = _scope(local, remote)
    facts = kernel.port_sysctls()
    if local[1]:
        ports: Iterable[int] = (local[1],)
        exhausted, what = errno.EADDRNOTAVAIL, str(local[1])
    else:
        low, high = port_range or (facts.low, facts.high)
        ports = candidate_ports(low, high)
        exhausted, what = errno.EAGAIN, f"{low}-{high}"
    reserved = frozenset() if local[1] else facts.reserved
    with open_socket(NETLINK_SOCK_DIAG) as nl, _udp_lock:
        for port in ports:
            if port in reserved:
                continue
            here = (src, port)
            if sockdiag.lookup(family, socket.IPPROTO_UDP, here, remote, scope, nl):
                continue  # held: connected to this peer, or bound to receive from it
            sockopt.allow_shared_source_port(sock)
            try:
                sock.bind(_with_ip(local, src, port, remote))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    continue  # locked by a socket bound without SO_REUSEADDR
                raise _error(e, here, remote, "bind") from None
            sockopt.allow_shared_source_port(sock, False)  # the lock: no new binds here
            cookie = kernel.socket_cookie(sock)
            owner = sockdiag.lookup(family, socket.IPPROTO_UDP, here, remote, scope, nl)
            if owner is None or owner.cookie != cookie:
                sockopt.reissue(sock)  # someone bound or connected in between
                continue
            try:
                sock.connect(remote)
            except OSError as e:
                raise _error(e, here, remote) from None
            sockopt.allow_shared_source_port(sock)
            return
    raise _error(exhausted, (src, what), remote)


# --- small shared pieces ------------------------------------------------------------------


@lru_cache(maxsize=256)
def is_wildcard(family: int, ip: str) -> bool:
    """``""``, ``0.0.0.0`` and ``::`` (in any spelling) mean "let the kernel pick"."""
    if not ip:
        return True
    return not any(socket.inet_pton(family, ip))


def is_local_address(ip: str) -> bool:
    """Whether this network namespace would let a socket use ``ip`` as its source.

    Asked the way the pool itself uses the address: ``bind((ip, 0))`` on a throwaway TCP
    socket with ``IP_BIND_ADDRESS_NO_PORT`` and without ``IP_FREEBIND``. The kernel answers
    EADDRNOTAVAIL exactly when the address is not local here, with the same rules connectx
    will meet (an address on an interface, anything under a local route such as 127.0.0.0/8
    on ``lo`` or an AnyIP ``ip route add local``), which a list of interface addresses
    (RTM_GETADDR) would get wrong both ways. NO_PORT makes the probe allocate no port, so a
    full port range cannot answer EADDRINUSE and be misread. An IPv6 address still in
    duplicate address detection answers "not local", as it is not usable yet either.

    One case the bind cannot tell: with ``ip_nonlocal_bind = 1`` in this namespace every bind
    succeeds. Then the routing table decides (``ip route get IP`` is of type ``local``),
    which is the kernel's own test for a local source when it routes the SYN.
    """
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    if _nonlocal_bind(family):
        return _routed_as_local(family, ip)
    probe = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sockopt.share_source_port_across_destinations(probe)
        probe.bind((ip, 0))
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL:
            return False
        raise
    finally:
        probe.close()
    return True


_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, proto, scope, type
_RTN_LOCAL = 2


def _routed_as_local(family: int, ip: str) -> bool:
    """``ip route get IP`` says ``local``: packets to it stay on this host."""
    addr = socket.inet_pton(family, ip)
    payload = _RTMSG.pack(family, len(addr) * 8, 0, 0, 0, 0, 0, 0, 0)
    payload += netlink.attribute(route.RTA_DST, addr)
    with netlink.open_socket(netlink.NETLINK_ROUTE) as sock:
        try:
            answers = list(
                netlink.request(sock, route.RTM_GETROUTE, netlink.NLM_F_REQUEST, payload)
            )
        except OSError:
            return False  # no route at all: certainly not local
    return any(
        mtype == route.RTM_NEWROUTE and _RTMSG.unpack_from(body)[7] == _RTN_LOCAL
        for mtype, body in answers
    )


def _nonlocal_bind(family: int) -> bool:
    name = "ipv6/ip_nonlocal_bind" if family == socket.AF_INET6 else "ipv4/ip_nonlocal_bind"
    try:
        with open(f"/proc/sys/net/{name}") as f:
            return f.read().strip() != "0"
    except OSError:
        return False


def effective_window(low: int, high: int) -> PortRange | None:
    """The part of ``low..high`` the kernel will honour, or None if it would ignore it all.

    ``IP_LOCAL_PORT_RANGE`` is clamped to ``ip_local_port_range`` and a window wholly
    outside it is silently ignored (the whole range is used): connectx must not let a
    one-port window turn into "any port".
    """
    facts = kernel.port_sysctls()
    lo, hi = max(low, facts.low), min(high, facts.high)
    return (lo, hi) if lo <= hi else None


def candidate_ports(low: int, high: int) -> Iterator[int]:
    """Every port of the window once, starting at a random one, like the kernel's search.

    Lazy: building a 16,000-entry list cost more than a whole connect on an idle range.
    """
    start = low + random.randrange(high - low + 1)
    return itertools.chain(range(start, high + 1), range(low, start))


def _scope(local: Address, remote: Address) -> int:
    for addr in (local, remote):
        if len(addr) >= 4 and addr[3]:
            return int(addr[3])
    return 0


def _source_ip(family: int, local: Address, remote: Address) -> str:
    """The local ip to bind: given, or what the route to ``remote`` would use."""
    if not is_wildcard(family, local[0]):
        return str(local[0])
    try:
        return route.source_for(family, remote[0], _scope(local, remote))
    except OSError as e:
        raise _error(e, local, remote) from None


def _with_ip(local: Address, ip: str, port: int, remote: Address) -> Address:
    if len(local) >= 4:
        return (ip, port, local[2], local[3])
    if len(remote) >= 4 and remote[3]:
        return (ip, port, 0, remote[3])
    return (ip, port)


def _bind(sock: socket.socket, local: Address, remote: Address) -> None:
    try:
        sock.bind(local)
    except OSError as e:
        raise _error(e, local, remote, "bind") from None


def _local_for_error(sock: socket.socket, local: Address) -> Address:
    try:
        bound = sock.getsockname()
    except OSError:
        return local
    return bound if bound[1] else local


def _error(
    err: OSError | int, local: Address, remote: Address, stage: Stage = "connect"
) -> ConnectError:
    """The kernel's errno, typed with its stage and both addresses (see :mod:`pool.errors`)."""
    return ConnectError.of(err, stage, local, remote)


__all__ = [
    "Address",
    "PortRange",
    "candidate_ports",
    "connectx",
    "connectx_async",
    "effective_window",
    "format_address",
    "is_local_address",
    "is_wildcard",
]
