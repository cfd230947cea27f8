"""The technique table of ephemeral-ports.md, reproduced with exact counts in a namespace.

Each row fills one (source, destination) choice until the kernel refuses, and checks the
count and the errno. R = 128 ports in the namespace's range.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

import pytest

from pool import connectx, sockdiag
from pool.kernel import IP_BIND_ADDRESS_NO_PORT
from tests.conftest import RANGE, Held, Listeners, R

SRC = ["127.0.1.1", "127.0.1.2"]
DST = [("127.0.2.1", 9000), ("127.0.2.2", 9000)]
W = (40000, 40031)  # a 32-port window inside the range
LIMIT = 10 * R  # every fill loop is bounded


def fill(connect_one: Callable[[], socket.socket]) -> tuple[int, OSError, set[int]]:
    """Connect until refused; return how many held, the refusal, and the ports used."""
    ports: set[int] = set()
    for n in range(LIMIT):
        try:
            s = connect_one()
        except OSError as e:
            return n, e, ports
        ports.add(s.getsockname()[1])
    raise AssertionError(f"no exhaustion after {LIMIT} connections")


def tcp_plain(held: Held, src: str | None, dst: tuple[str, int]) -> socket.socket:
    s = held.new()
    s.connect(dst)
    return s


def tcp_bind(held: Held, src: str | None, dst: tuple[str, int]) -> socket.socket:
    s = held.new()
    s.bind((src, 0))
    s.connect(dst)
    return s


def tcp_connectx(held: Held, src: str | None, dst: tuple[str, int]) -> socket.socket:
    s = held.new()
    connectx(s, (src or "0.0.0.0", 0), dst)
    return s


def tcp_window(held: Held, src: str | None, dst: tuple[str, int]) -> socket.socket:
    s = held.new()
    connectx(s, (src or "0.0.0.0", 0), dst, port_range=W)
    return s


def tcp_window_userspace(held: Held, src: str | None, dst: tuple[str, int]) -> socket.socket:
    s = held.new()
    connectx(s, (src or "0.0.0.0", 0), dst, port_range=W, userspace_ports=True)
    return s


WN = W[1] - W[0] + 1

# technique, sources, destinations, expected total, errno when full
TCP_ROWS = [
    ("plain", [None], DST[:1], R, errno.EADDRNOTAVAIL),
    ("plain", [None], DST, 2 * R, errno.EADDRNOTAVAIL),
    ("bind", SRC[:1], DST[:1], R, errno.EADDRINUSE),
    ("bind", SRC[:1], DST, R, errno.EADDRINUSE),  # the port is gone for every destination
    ("bind", SRC, DST[:1], 2 * R, errno.EADDRINUSE),
    ("connectx", SRC[:1], DST[:1], R, errno.EADDRNOTAVAIL),
    ("connectx", SRC[:1], DST, 2 * R, errno.EADDRNOTAVAIL),
    ("connectx", SRC, DST[:1], 2 * R, errno.EADDRNOTAVAIL),
    ("connectx", SRC, DST, 4 * R, errno.EADDRNOTAVAIL),
    ("connectx", [None], DST, 2 * R, errno.EADDRNOTAVAIL),
    ("window", SRC[:1], DST[:1], WN, errno.EADDRNOTAVAIL),
    ("window", SRC, DST, 4 * WN, errno.EADDRNOTAVAIL),
    ("window_userspace", SRC[:1], DST[:1], WN, errno.EADDRNOTAVAIL),
    ("window_userspace", SRC, DST, 4 * WN, errno.EADDRNOTAVAIL),
]
TCP = {
    "plain": tcp_plain,
    "bind": tcp_bind,
    "connectx": tcp_connectx,
    "window": tcp_window,
    "window_userspace": tcp_window_userspace,
}


@pytest.mark.parametrize(
    ("technique", "sources", "dests", "expected", "code"),
    TCP_ROWS,
    ids=[f"{r[0]}-{len(r[1])}src-{len(r[2])}dst" for r in TCP_ROWS],
)
def test_tcp_capacity(
    ns, listeners: Listeners, held: Held, technique, sources, dests, expected, code
):
    for dst in dests:
        listeners.add(*dst)
    total = 0
    for src in sources:
        for dst in dests:
            n, err, ports = fill(lambda s=src, d=dst: TCP[technique](held, s, d))
            assert err.errno == code, err
            total += n
            lo, hi = W if technique.startswith("window") else RANGE
            assert all(lo <= p <= hi for p in ports), sorted(ports)
    assert total == expected


def udp_plain(held: Held, src: str | None, dst: tuple[str, int]) -> socket.socket:
    s = held.new(kind=socket.SOCK_DGRAM)
    s.connect(dst)
    return s


def udp_no_port(held: Held, src: str | None, dst: tuple[str, int]) -> socket.socket:
    s = held.new(kind=socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    s.bind((src, 0))
    s.connect(dst)
    return s


def udp_connectx(held: Held, src: str | None, dst: tuple[str, int]) -> socket.socket:
    s = held.new(kind=socket.SOCK_DGRAM)
    connectx(s, (src or "0.0.0.0", 0), dst)
    return s


def udp_window(held: Held, src: str | None, dst: tuple[str, int]) -> socket.socket:
    s = held.new(kind=socket.SOCK_DGRAM)
    connectx(s, (src or "0.0.0.0", 0), dst, port_range=W)
    return s


UDP = {"plain": udp_plain, "no_port": udp_no_port, "connectx": udp_connectx, "window": udp_window}
UDP_ROWS = [
    ("plain", [None], DST[:1], R, errno.EAGAIN),
    ("plain", [None], DST, R, errno.EAGAIN),  # no sharing at all: range in total
    ("no_port", SRC[:1], DST, R, errno.EAGAIN),  # IP_BIND_ADDRESS_NO_PORT does nothing for UDP
    ("connectx", SRC[:1], DST[:1], R, errno.EAGAIN),
    ("connectx", SRC[:1], DST, 2 * R, errno.EAGAIN),
    ("connectx", SRC, DST, 4 * R, errno.EAGAIN),
    ("connectx", [None], DST, 2 * R, errno.EAGAIN),
    ("window", SRC, DST, 4 * WN, errno.EAGAIN),
]


@pytest.mark.parametrize(
    ("technique", "sources", "dests", "expected", "code"),
    UDP_ROWS,
    ids=[f"{r[0]}-{len(r[1])}src-{len(r[2])}dst" for r in UDP_ROWS],
)
def test_udp_capacity(ns, held: Held, technique, sources, dests, expected, code):
    total = 0
    for src in sources:
        for dst in dests:
            n, err, _ports = fill(lambda s=src, d=dst: UDP[technique](held, s, d))
            assert err.errno == code, err
            total += n
    assert total == expected
    assert_no_duplicate_udp_tuples(expected)


def assert_no_duplicate_udp_tuples(connected: int) -> None:
    """The kernel's own census (sock_diag dump) must show each connected 4-tuple once."""
    tuples = [
        (d.src, d.sport, d.dst, d.dport)
        for d in sockdiag.dump(socket.AF_INET, socket.IPPROTO_UDP)
        if d.dport
    ]
    assert len(tuples) == connected
    assert len(tuples) == len(set(tuples)), "duplicate UDP 4-tuple"
