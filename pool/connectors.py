"""The connectors of each egress mode: one attempt, one socket, connected or closed.

Why apart from :mod:`pool.egress`: the egress set decides which source IP and which port
window to ask for (its counts, its free-port record, failover); how a socket is then set up
and connected differs by mode and knows nothing of counts. Kept here, a mode is read and
changed in one place, and every failure leaves as a typed :class:`~pool.errors.ConnectError`
whose stage the set's failover reads.

==============  ==========================================================================
``connectx``    :func:`pool.connectx.connectx_async`: ``IP_BIND_ADDRESS_NO_PORT`` and an
                optional ``IP_LOCAL_PORT_RANGE`` window (one port when the record chose it)
``bind``        ``bind((ip, 0))`` then ``connect``: what most proxies do; the port is taken
                at bind, exclusive across destinations (kept for side-by-side runs)
``plain``       ``connect`` alone: the kernel's source and port
==============  ==========================================================================
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Literal

from pool.connectx import PortRange, connectx_async
from pool.errors import ConnectError, Destination

Mode = Literal["connectx", "bind", "plain"]
MODES: tuple[Mode, ...] = ("connectx", "bind", "plain")


async def open_socket(
    mode: Mode, family: int, source: str, destination: Destination, window: PortRange | None
) -> socket.socket:
    """A fresh non-blocking socket from ``source`` (``""``: the kernel's) to ``destination``.

    ``window`` applies in connectx mode only. On any failure, cancellation included, the
    socket is closed before the error leaves: the caller never holds a half-made socket.
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        if mode == "connectx":
            local = (source or wildcard(family), 0)
            await connectx_async(sock, local, destination, port_range=window)
        else:
            await legacy_connect(sock, source if mode == "bind" else "", destination)
    except BaseException:
        sock.close()
        raise
    return sock


async def legacy_connect(sock: socket.socket, source: str, destination: Destination) -> None:
    """``bind`` (with a ``source``) and ``plain`` modes: bind if asked, then connect."""
    loop = asyncio.get_running_loop()
    if source:
        try:
            sock.bind((source, 0))
        except OSError as e:
            raise ConnectError.of(e, "bind", (source, 0), destination) from None
    try:
        await loop.sock_connect(sock, destination)
    except OSError as e:
        raise ConnectError.of(e, "connect", bound(sock, source), destination) from None


def wildcard(family: int) -> str:
    """The address that lets the kernel pick the source in ``family``."""
    return "::" if family == socket.AF_INET6 else "0.0.0.0"


def bound(sock: socket.socket, source: str) -> tuple[str, int]:
    """The source a failed connect had (the kernel binds before the SYN), else the asked one."""
    try:
        local = sock.getsockname()
    except OSError:
        return (source, 0)
    return (str(local[0]), int(local[1])) if local[1] else (source, 0)


def timed_out(
    source: str, family: int, destination: Destination, timeout: float | None
) -> ConnectError:
    """The error for a connect, retries included, that outlived its ``timeout``."""
    local = (source or wildcard(family), 0)
    return ConnectError.of(errno.ETIMEDOUT, "connect", local, destination, f"after {timeout}s")


__all__ = ["MODES", "Mode", "bound", "legacy_connect", "open_socket", "timed_out", "wildcard"]
