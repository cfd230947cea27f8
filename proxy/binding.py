"""The listening sockets, bound once before any worker forks, as nginx's master binds them.

A port that cannot be had (another program holds it, a low port without the capability, an
address the host lacks) must be one clear line and exit status 1 whatever the worker count.
Workers that bound their own sockets died of it instead: a traceback with one worker, a
restart loop with several, and the reason never named. So the master (or the lone worker's
process, before its event loop) binds everything here and each worker inherits its sockets
through fork; a worker the master restarts gets the same sockets, so connections waiting in
that worker's accept queue are not reset while it comes back.

Workers keep an accept queue each: per listener, one ``SO_REUSEPORT`` socket per worker and
the kernel spreads connections over them. The first socket of a group is bound *without*
``SO_REUSEPORT`` and given it only after bind() succeeded: a bind with the option set would
join, silently, a group another program of the same uid holds with the option, and the two
programs would split the traffic. Bound first without it, any listener already on the port
is EADDRINUSE; the siblings bound after it join the group the first started, nobody else's.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from dataclasses import dataclass, field
from pathlib import Path

BACKLOG = 4096
UNPRIVILEGED_PORT_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")


def host_port(address: tuple[str, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _unprivileged_start() -> int:
    try:
        return int(UNPRIVILEGED_PORT_START.read_text())
    except (OSError, ValueError):
        return 1024


class BindError(Exception):
    """A listening address that could not be bound: which one (``listen[i]`` or ``admin``),
    the address and the errno, rendered as the one line ``serve`` prints before it exits 1."""

    def __init__(self, what: str, address: tuple[str, int], error: OSError) -> None:
        self.what = what
        self.address = (address[0], address[1])
        self.errno = error.errno or 0
        self.strerror = error.strerror or str(error)
        super().__init__(str(self))

    @property
    def errno_name(self) -> str:
        return errno.errorcode.get(self.errno, str(self.errno))

    def explain(self) -> str:
        host, port = self.address
        if self.errno == errno.EADDRINUSE:
            return f"address already in use (another process holds it: ss -ltnp 'sport = :{port}')"
        if self.errno == errno.EACCES:
            start = _unprivileged_start()
            return (
                f"permission denied (ports below {start} need root or CAP_NET_BIND_SERVICE; "
                "see net.ipv4.ip_unprivileged_port_start)"
            )
        if self.errno == errno.EADDRNOTAVAIL:
            return (
                f"address not available ({host} is not assigned to any interface in this namespace)"
            )
        return f"{self.strerror.lower()} ({self.errno_name})"

    def __str__(self) -> str:
        return f"{self.what}: {host_port(self.address)}: {self.explain()}"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listening_socket(
    what: str,
    address: tuple[str, int],
    reuse_port: bool = False,
    join: bool = False,
    backlog: int = BACKLOG,
) -> socket.socket:
    """One bound, listening socket, or :class:`BindError`.

    ``reuse_port``: the socket takes part in a ``SO_REUSEPORT`` group. ``join`` says whether
    it joins one (a sibling, option set before bind) or starts one (option set after bind,
    so the bind itself is exclusive: see the module docstring).
    """
    sock = socket.socket(_family(address[0]), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and join:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(address)
        except OSError as e:
            raise BindError(what, address, e) from None
        if reuse_port and not join:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def socket_group(what: str, address: tuple[str, int], count: int) -> list[socket.socket]:
    """``count`` sockets on one address, one accept queue each (count 1: a plain socket).
    The siblings bind the port the first got, so a port 0 is still one port."""
    first = listening_socket(what, address, reuse_port=count > 1)
    group = [first]
    try:
        bound = (address[0], first.getsockname()[1])
        for _ in range(count - 1):
            group.append(listening_socket(what, bound, reuse_port=True, join=True))
    except BaseException:
        for sock in group:
            sock.close()
        raise
    return group


@dataclass
class WorkerSockets:
    """What one worker serves on: a socket per ``[listen]`` entry, in order, and its admin."""

    listen: list[socket.socket]
    admin: socket.socket


@dataclass
class Bound:
    """Every listening socket of the proxy, bound before the first fork; the master keeps
    them all (a restarted worker inherits its own again) until it stops."""

    workers: list[WorkerSockets] = field(default_factory=list)

    def for_worker(self, index: int) -> WorkerSockets:
        return self.workers[index]

    def keep_only(self, index: int) -> None:
        """In worker ``index`` after fork: close the other workers' copies, so a socket
        lives in its own worker (and the master) only."""
        for i, sockets in enumerate(self.workers):
            if i != index:
                _close(sockets)

    def close(self) -> None:
        for sockets in self.workers:
            _close(sockets)


def _close(sockets: WorkerSockets) -> None:
    for sock in [*sockets.listen, sockets.admin]:
        with contextlib.suppress(OSError):
            sock.close()


def admin_what(worker: int) -> str:
    return "admin" if worker == 0 else f"admin (worker {worker}: admin port + {worker})"


def bind_all(listen: list[tuple[str, int]], admin: tuple[str, int], workers: int) -> Bound:
    """Every listener (``workers`` sockets each) and every worker's admin port (worker i on
    the admin port + i; port 0 stays 0, an ephemeral port each), or the first
    :class:`BindError`, with whatever was bound already closed."""
    groups: list[list[socket.socket]] = []
    admins: list[socket.socket] = []
    try:
        for i, address in enumerate(listen):
            groups.append(socket_group(f"listen[{i}]", address, workers))
        host, port = admin
        for i in range(workers):
            admins.append(listening_socket(admin_what(i), (host, port + i if port else 0)))
    except BaseException:
        for sock in [*(s for g in groups for s in g), *admins]:
            sock.close()
        raise
    return Bound([WorkerSockets([g[i] for g in groups], admins[i]) for i in range(workers)])
