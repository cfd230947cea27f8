"""connectx behaviour beyond raw capacity: reserved and locked ports, explicit ports, windows
the kernel would ignore, IPv6 and link-local scope, errors, and the asyncio form."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from pool import connectx, connectx_async, route, sockdiag
from tests.conftest import RANGE, Held, Listeners, R
from tests.test_connectx_table import fill

SRC = "127.0.1.1"
DST = ("127.0.2.1", 9000)
DST2 = ("127.0.2.2", 9000)
RESERVED = "40010-40019,40100"
N_RESERVED = 11


def tcp(held: Held, **kw):
    def one() -> socket.socket:
        s = held.new()
        connectx(s, (kw.get("src", SRC), 0), kw.get("dst", DST), **kw.get("opts", {}))
        return s

    return one


def udp(held: Held, **kw):
    def one() -> socket.socket:
        s = held.new(kind=socket.SOCK_DGRAM)
        connectx(s, (kw.get("src", SRC), 0), kw.get("dst", DST), **kw.get("opts", {}))
        return s

    return one


RESERVED_CASES = {
    "tcp-no-port": (tcp, {}),
    "tcp-window": (tcp, {"port_range": RANGE}),
    "tcp-userspace": (tcp, {"port_range": RANGE, "userspace_ports": True}),
    "udp": (udp, {}),
}


@pytest.mark.parametrize("case", list(RESERVED_CASES))
def test_reserved_ports_are_skipped(ns, listeners: Listeners, held: Held, case):
    listeners.add(*DST)
    ns.set_reserved_ports(RESERVED)
    make, opts = RESERVED_CASES[case]
    n, err, ports = fill(make(held, opts=opts))
    assert err.errno in (errno.EADDRNOTAVAIL, errno.EAGAIN)
    assert n == R - N_RESERVED
    assert not ports & ({*range(40010, 40020), 40100})


LOCK_CASES = {
    "tcp-no-port": (tcp, socket.SOCK_STREAM, {}),
    "tcp-userspace": (tcp, socket.SOCK_STREAM, {"port_range": RANGE, "userspace_ports": True}),
    "udp": (udp, socket.SOCK_DGRAM, {}),
}


@pytest.mark.parametrize("case", list(LOCK_CASES))
def test_port_locked_by_unconnected_bind_is_never_used(ns, listeners: Listeners, held: Held, case):
    listeners.add(*DST)
    make, kind, opts = LOCK_CASES[case]
    lock = socket.socket(socket.AF_INET, kind)  # bound without SO_REUSEADDR: the port is locked
    lock.bind((SRC, 40050))
    try:
        n, err, ports = fill(make(held, opts=opts))
        assert err.errno in (errno.EADDRNOTAVAIL, errno.EAGAIN)
        assert 40050 not in ports
        assert n == R - 1
    finally:
        lock.close()


def test_explicit_port_shares_across_destinations_but_not_a_4tuple(ns, listeners, held):
    listeners.add(*DST)
    listeners.add(*DST2)
    a = held.new()
    connectx(a, (SRC, 40070), DST)
    assert a.getsockname() == (SRC, 40070)
    b = held.new()
    with pytest.raises(OSError) as taken:
        connectx(b, (SRC, 40070), DST)
    assert taken.value.errno == errno.EADDRNOTAVAIL
    c = held.new()
    connectx(c, (SRC, 40070), DST2)
    assert c.getsockname() == (SRC, 40070)


def test_explicit_port_and_window_conflict(ns):
    with socket.socket() as s, pytest.raises(ValueError, match="not both"):
        connectx(s, (SRC, 40001), DST, port_range=(40000, 40010))


@pytest.mark.parametrize("userspace", [False, True], ids=["kernel", "userspace"])
def test_window_partly_outside_range_is_clamped(ns, listeners, held, userspace):
    listeners.add(*DST)
    n, err, ports = fill(
        tcp(held, opts={"port_range": (39990, 40009), "userspace_ports": userspace})
    )
    assert n == 10 and ports == set(range(40000, 40010))
    assert err.errno == errno.EADDRNOTAVAIL


@pytest.mark.parametrize("userspace", [False, True], ids=["kernel", "userspace"])
def test_window_wholly_outside_range_is_still_honoured(ns, listeners, held, userspace):
    """The kernel ignores such a window (any port would do); connectx must not."""
    listeners.add(*DST)
    window = (41000, 41015)
    n, err, ports = fill(tcp(held, opts={"port_range": window, "userspace_ports": userspace}))
    assert n == 16 and ports == set(range(41000, 41016))
    assert err.errno == errno.EADDRNOTAVAIL
    one = held.new()
    with pytest.raises(OSError) as full:
        connectx(one, (SRC, 0), DST, port_range=(41000, 41000))
    assert full.value.errno == errno.EADDRNOTAVAIL


def test_one_port_window_gets_exactly_that_port(ns, listeners, held):
    listeners.add(*DST)
    s = held.new()
    connectx(s, (SRC, 0), DST, port_range=(40077, 40077))
    assert s.getsockname() == (SRC, 40077)
    t = held.new()
    with pytest.raises(OSError) as taken:
        connectx(t, (SRC, 0), DST, port_range=(40077, 40077))
    assert taken.value.errno == errno.EADDRNOTAVAIL
    assert "127.0.1.1" in str(taken.value) and "127.0.2.1:9000" in str(taken.value)


def test_error_names_both_addresses_and_keeps_errno_subclass(ns, held):
    s = held.new()
    with pytest.raises(ConnectionRefusedError) as refused:
        connectx(s, (SRC, 0), ("127.0.2.9", 9999))
    assert refused.value.errno == errno.ECONNREFUSED
    assert "127.0.1.1" in str(refused.value) and "127.0.2.9:9999" in str(refused.value)
    assert refused.value.remote_addr == ("127.0.2.9", 9999)


def test_exhaustion_error_names_addresses(ns, listeners, held):
    listeners.add(*DST)
    n, err, _ = fill(tcp(held))
    assert n == R and err.errno == errno.EADDRNOTAVAIL
    assert "127.0.1.1" in str(err) and "127.0.2.1:9000" in str(err)
    u, uerr, _ = fill(udp(held))
    assert u == R and uerr.errno == errno.EAGAIN and "127.0.2.1:9000" in str(uerr)


def test_unconfigured_source_ip_fails_at_bind(ns, held):
    s = held.new()
    with pytest.raises(OSError) as nope:
        connectx(s, ("10.255.0.1", 0), DST)
    assert nope.value.errno == errno.EADDRNOTAVAIL
    assert "10.255.0.1" in str(nope.value)
    assert nope.value.stage == "bind"


def test_udp_wildcard_source_comes_from_the_route(ns, held):
    probe = held.new(kind=socket.SOCK_DGRAM)
    probe.connect(DST)
    assert route.source_for(socket.AF_INET, DST[0]) == probe.getsockname()[0]
    s = held.new(kind=socket.SOCK_DGRAM)
    connectx(s, ("0.0.0.0", 0), DST2)
    assert s.getsockname()[0] == probe.getsockname()[0]


def test_udp_route_lookup_does_not_need_a_free_port(ns, held):
    """A probe connect() would fail with EAGAIN here; the routing table still answers."""
    n, err, _ = fill(lambda: _plain_udp(held))
    assert err.errno == errno.EAGAIN and n == R
    assert route.source_for(socket.AF_INET, DST[0]) == "127.0.0.1"


def _plain_udp(held: Held) -> socket.socket:
    s = held.new(kind=socket.SOCK_DGRAM)
    s.connect(DST)
    return s


def test_udp_reuseaddr_alone_overshadows_and_connectx_does_not(ns, held):
    """Why UDP needs the sock_diag check: with SO_REUSEADDR alone the kernel lets two sockets
    hold one 4-tuple and the older silently stops receiving."""
    peer = held.new(kind=socket.SOCK_DGRAM)
    peer.bind(DST)
    a, b = held.new(kind=socket.SOCK_DGRAM), held.new(kind=socket.SOCK_DGRAM)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((SRC, 40020))
        s.connect(DST)
    peer.sendto(b"x", (SRC, 40020))
    b.settimeout(5)
    assert b.recv(10) == b"x"  # the newer gets it ...
    a.setblocking(False)
    with pytest.raises(BlockingIOError):
        a.recv(10)  # ... the older gets nothing
    # connectx refuses to make a third one on the taken 4-tuple
    c = held.new(kind=socket.SOCK_DGRAM)
    with pytest.raises(OSError) as taken:
        connectx(c, (SRC, 40020), DST)
    assert taken.value.errno == errno.EADDRNOTAVAIL


V6 = {"addresses": ["fd00::1/128", "fd00::2/128", "fd00::9/128"]}


@pytest.mark.parametrize("ns", [V6], indirect=True)
def test_ipv6_capacity_per_source_and_destination(ns, listeners, held):
    dests = [listeners.add("::1"), listeners.add("fd00::9")]
    total = 0
    for src in ("fd00::1", "fd00::2"):
        for dst in dests:
            n, err, _ = fill(lambda s=src, d=dst: _v6(held, socket.SOCK_STREAM, s, d))
            assert err.errno == errno.EADDRNOTAVAIL
            total += n
    assert total == 4 * R


@pytest.mark.parametrize("ns", [V6], indirect=True)
def test_ipv6_udp_capacity_and_no_duplicates(ns, held):
    total = 0
    for src in ("fd00::1", "::"):
        for dst in (("::1", 53), ("fd00::9", 53)):
            n, err, _ = fill(lambda s=src, d=dst: _v6(held, socket.SOCK_DGRAM, s, d))
            assert err.errno == errno.EAGAIN
            total += n
    assert total == 4 * R
    tuples = [
        (d.src, d.sport, d.dst, d.dport)
        for d in sockdiag.dump(socket.AF_INET6, socket.IPPROTO_UDP)
        if d.dport
    ]
    assert len(tuples) == len(set(tuples)) == 4 * R


def _v6(held: Held, kind: int, src: str, dst: tuple[str, int]) -> socket.socket:
    s = held.new(socket.AF_INET6, kind)
    connectx(s, (src, 0), dst)
    return s


def test_ipv6_link_local_keeps_scope_id(ns, listeners, held):
    ns.ip("link", "add", "op0", "type", "veth", "peer", "name", "op1")
    ns.ip("link", "set", "op0", "up")
    ns.ip("link", "set", "op1", "up")
    ns.ip("addr", "add", "fe80::1/64", "dev", "op0", "nodad")
    index = socket.if_nametoindex("op0")
    ls = socket.socket(socket.AF_INET6)
    listeners.socks.append(ls)
    ls.bind(("fe80::1", 9000, 0, index))
    ls.listen(16)
    remote = ("fe80::1", 9000, 0, index)
    for local in (("::", 0), ("fe80::1", 0, 0, index)):
        s = held.new(socket.AF_INET6)
        connectx(s, local, remote)
        got = s.getsockname()
        assert got[0] == "fe80::1" and got[3] == index
    taken = {sock.getsockname()[1] for sock in held.socks}
    free = next(p for p in range(40000, 40128) if p not in taken)  # the kernel chose the others
    s = held.new(socket.AF_INET6)
    connectx(s, ("::", 0), remote, port_range=(free, free), userspace_ports=True)
    assert s.getsockname()[3] == index
    u = held.new(socket.AF_INET6, socket.SOCK_DGRAM)
    connectx(u, ("::", 0), ("fe80::1", 53, 0, index))
    got = u.getsockname()
    assert got[0] == "fe80::1" and got[3] == index


async def test_async_fills_to_the_same_capacity(ns, listeners, held):
    listeners.add(*DST)

    async def one() -> None:
        s = held.new()
        s.setblocking(False)
        await connectx_async(s, (SRC, 0), DST)

    for _ in range(R):
        await one()
    with pytest.raises(OSError) as full:
        await one()
    assert full.value.errno == errno.EADDRNOTAVAIL


async def test_async_connect_does_not_block_the_loop_and_cancels_cleanly(ns, listeners, held):
    """A listener whose accept queue is full drops SYNs: the handshake hangs in the kernel."""
    ls = socket.socket()
    listeners.socks.append(ls)
    ls.bind(DST)
    ls.listen(0)
    first = held.new()
    first.connect(DST)  # fills the queue of one
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(ticker())
    s = held.new()
    s.setblocking(False)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(connectx_async(s, (SRC, 0), DST), 0.3)
    task.cancel()
    assert ticks > 100  # the loop kept running while the SYN went unanswered
    s.close()  # the caller closes: nothing of it is left in the kernel
    assert not [d for d in sockdiag.dump(socket.AF_INET, socket.IPPROTO_TCP) if d.src == SRC]
