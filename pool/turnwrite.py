"""Writes held to the end of the event-loop turn: one send per socket per turn.

A write to a loopback or LAN peer that sleeps in epoll_wait wakes it, and on virtual
machines that wake-up (an inter-processor interrupt) costs more than the send itself:
perf measured ~22% of a worker's CPU in ``sock_def_readable`` under wrk. Sent back to back at
the end of the turn, the writes of many requests wake each peer once: the first wakes it,
the rest find it running. Netty's FlushConsolidationHandler does this for the same reason.

Owners (one per socket) keep their pending bytes in ``held``, half-close with
:func:`write_eof` and call :func:`flush` before anything else that ends the transport, so
bytes never overtake a FIN.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Owner(Protocol):
    held: bytes

    @property  # read-only here, so an owner's asyncio.Transport (a subclass) matches
    def transport(self) -> asyncio.WriteTransport | None: ...


BULK = 16384  # bytes: a write this large (one TLS record's worth) is sent at once

# per running loop: the owners holding bytes this turn (a worker has one loop; tests and the
# httpx backend may run several, one per thread)
_turns: dict[asyncio.AbstractEventLoop, list[Owner]] = {}


def write(owner: Owner, data: bytes) -> None:
    """Send ``data`` at the end of this loop turn, after what was held before it; at once
    when it is bulk (a body streaming through), where the transport's flow control must see
    each write as it happens and a wake-up per write costs nothing next to the copy."""
    if not data:
        return
    held = owner.held
    if held:
        if len(held) + len(data) < BULK:
            owner.held = held + data
            return
    elif len(data) < BULK:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop turn to wait for
            loop = None
        if loop is not None:
            dirty = _turns.get(loop)
            if dirty is None:
                dirty = _turns[loop] = []
                loop.call_soon(end_of_turn, loop)
            dirty.append(owner)
            owner.held = data
            return
    flush(owner)
    if owner.transport is not None:
        owner.transport.write(data)


def write_now(owner: Owner, data: bytes) -> None:
    """Send ``data`` now, after what was held: for relayed streams (a WebSocket tunnel), whose
    writes are paced by the peers and gain nothing from waiting, only copies."""
    flush(owner)
    if data and owner.transport is not None:
        owner.transport.write(data)


def write_eof(owner: Owner) -> bool:
    """Half-close after what is held; False when the transport cannot (TLS) or is gone."""
    transport = owner.transport
    if transport is None or not transport.can_write_eof():
        return False
    flush(owner)
    transport.write_eof()
    return True


def flush(owner: Owner) -> None:
    """Send what ``owner`` holds now: before close, write_eof, or a write that must not wait."""
    data = owner.held
    if data:
        owner.held = b""
        transport = owner.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)


def end_of_turn(loop: asyncio.AbstractEventLoop) -> None:
    """Send what every owner holds: the loop runs this once per turn (scheduled by the first
    held write); a benchmark driving callbacks without loop turns calls it itself."""
    for owner in _turns.pop(loop, ()):
        flush(owner)
