"""Kernel facts the pool depends on: socket option numbers and the namespace's port sysctls.

Python's ``socket`` module lacks some of the options we need (``IP_LOCAL_PORT_RANGE``,
``SO_COOKIE`` on 3.11), so their Linux numbers live here, named once. The port sysctls are per
network namespace and are read on the hot path (to know whether a port window will be
honoured), so they are cached briefly; :func:`forget` drops the cache when a thread moves to
another namespace.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass

# Linux socket option numbers (include/uapi/linux/in.h, asm-generic/socket.h).
IP_BIND_ADDRESS_NO_PORT = 24
IP_LOCAL_PORT_RANGE = 51
SO_COOKIE = 57
SO_REUSEADDR = socket.SO_REUSEADDR
SOL_IP = socket.IPPROTO_IP

CLONE_NEWNET = 0x40000000

_PROC = "/proc/sys/net/ipv4/"
_CACHE_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class PortSysctls:
    """One reading of the namespace's ephemeral-port settings."""

    low: int
    high: int
    reserved: frozenset[int]

    @property
    def size(self) -> int:
        """Ports the kernel may hand out automatically (reserved ones excluded)."""
        inside = sum(1 for p in self.reserved if self.low <= p <= self.high)
        return self.high - self.low + 1 - inside


def parse_port_list(text: str) -> frozenset[int]:
    """Parse the ``ip_local_reserved_ports`` syntax: ``"1000-1010,2000"``."""
    ports: set[int] = set()
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        if "-" in item:
            lo, hi = item.split("-", 1)
            ports.update(range(int(lo), int(hi) + 1))
        else:
            ports.add(int(item))
    return frozenset(ports)


def _read(name: str) -> str:
    with open(_PROC + name) as f:
        return f.read()


def read_port_sysctls() -> PortSysctls:
    """Read the current thread's namespace settings, uncached."""
    low, high = (int(x) for x in _read("ip_local_port_range").split())
    return PortSysctls(low, high, parse_port_list(_read("ip_local_reserved_ports")))


_lock = threading.Lock()
_cached: tuple[float, PortSysctls] | None = None


def port_sysctls() -> PortSysctls:
    """Cached for a second: reading /proc costs more than a whole connect() on an idle range."""
    global _cached
    now = time.monotonic()
    cached = _cached
    if cached is not None and now - cached[0] < _CACHE_SECONDS:
        return cached[1]
    value = read_port_sysctls()
    with _lock:
        _cached = (now, value)
    return value


def forget() -> None:
    """Drop cached namespace facts: call after setns() or after writing the sysctls."""
    global _cached
    with _lock:
        _cached = None


def pack_port_range(low: int, high: int) -> bytes:
    """``IP_LOCAL_PORT_RANGE`` takes a u32 (lo | hi << 16); a Python int above 2**31 overflows."""
    if not (0 <= low <= high <= 65535):
        raise ValueError(f"bad port window {low}-{high}")
    return struct.pack("=I", low | high << 16)


_has_port_range: bool | None = None


def has_ip_local_port_range() -> bool:
    """Whether this kernel knows ``IP_LOCAL_PORT_RANGE`` (Linux 6.3+); probed once."""
    global _has_port_range
    if _has_port_range is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.setsockopt(SOL_IP, IP_LOCAL_PORT_RANGE, pack_port_range(0, 0))
                _has_port_range = True
            except OSError:
                _has_port_range = False
    return _has_port_range


def socket_cookie(sock: socket.socket) -> int:
    """The kernel's unique id of a socket: sock_diag answers name sockets by it."""
    return int(struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0])
