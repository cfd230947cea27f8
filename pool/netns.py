"""Private network namespaces: where tests, benchmarks and the testbed exhaust ports safely.

Port exhaustion must be reproduced at small scale without touching the host: each user of
this module gets a namespace of its own with ``lo`` up and a shrunken
``ip_local_port_range``. Only the calling *thread* moves (``setns``), and it moves back on
exit; child processes started meanwhile are born inside. Needs root (CAP_SYS_ADMIN).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from pool import kernel

_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count()


def _setns(fd: int) -> None:
    if _libc.setns(fd, kernel.CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")
    kernel.forget()


def can_create() -> str | None:
    """None if namespaces can be made here, else the reason (for pytest skips)."""
    if os.geteuid() != 0:
        return "needs root to create a network namespace (CI runs as root)"
    if subprocess.run(["ip", "-V"], capture_output=True).returncode != 0:
        return "needs iproute2's ip(8)"
    return None


@dataclass(frozen=True)
class Namespace:
    """A namespace the current thread is inside."""

    name: str

    def ip(self, *args: str) -> None:
        """Run ``ip ARGS`` in this namespace; failures raise with ip's own words."""
        proc = subprocess.run(["ip", "-n", self.name, *args], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")

    def set_sysctl(self, name: str, value: str) -> None:
        """Write a sysctl of *this* namespace (the thread is inside it)."""
        with open("/proc/sys/" + name.replace(".", "/"), "w") as f:
            f.write(value)
        kernel.forget()

    def set_port_range(self, low: int, high: int) -> None:
        self.set_sysctl("net.ipv4.ip_local_port_range", f"{low} {high}")

    def set_reserved_ports(self, ports: str) -> None:
        self.set_sysctl("net.ipv4.ip_local_reserved_ports", ports)


@contextmanager
def namespace(
    port_range: tuple[int, int] = (40000, 40199),
    addresses: Sequence[str] = (),
    somaxconn: int = 65535,
) -> Iterator[Namespace]:
    """Create a namespace, move this thread into it, and undo both on exit.

    ``addresses`` are added to ``lo`` (``"127.0.1.1/32"``, ``"fd00::1/128"``); all of
    127.0.0.0/8 is local already. ``somaxconn`` is raised so a listener that never accepts
    can hold thousands of established connections for capacity tests.
    """
    name = f"originpool-{os.getpid()}-{next(_counter)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            ns = Namespace(name)
            ns.ip("link", "set", "lo", "up")
            for addr in addresses:
                ns.ip("addr", "add", addr, "dev", "lo")
            ns.set_port_range(*port_range)
            ns.set_sysctl("net.core.somaxconn", str(somaxconn))
            yield ns
        finally:
            _setns(home)
    finally:
        os.close(home)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def unshare_process(port_range: tuple[int, int], addresses: Sequence[str] = ()) -> None:
    """Move this whole (single-threaded) process into a new namespace for good.

    For benchmark and demo processes, which have nothing to go back to.
    """
    if _libc.unshare(kernel.CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
    kernel.forget()
    commands = [["link", "set", "lo", "up"], *(["addr", "add", a, "dev", "lo"] for a in addresses)]
    for args in commands:
        subprocess.run(["ip", *args], check=True, capture_output=True)
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
        f.write(f"{port_range[0]} {port_range[1]}")
    with open("/proc/sys/net/core/somaxconn", "w") as f:
        f.write("65535")
    kernel.forget()
