"""The port accounting of the egress set: what each (egress, destination) pair holds.

Why apart from :mod:`pool.egress`: the set chooses a source and a port window; this is what it
counts to choose, and what every held connection keeps for days (one :class:`Slot` per
connection, so its size is paid per idle session). Counts are reserved before the connect
and released by :meth:`Slot.release` (idempotent, also run if the slot is dropped
unreleased), so errors, timeouts and cancellation cannot leak them.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pool import kernel
from pool.errors import Destination

if TYPE_CHECKING:
    from pool.egress import Egress, EgressSet


class FreePorts:
    """Ports known free for one busy pair: O(1) random pick, removal and return."""

    __slots__ = ("_index", "_ports")

    def __init__(self, ports: Iterable[int]) -> None:
        self._ports = list(ports)
        self._index = {p: i for i, p in enumerate(self._ports)}

    def __len__(self) -> int:
        return len(self._ports)

    def __contains__(self, port: object) -> bool:
        return port in self._index

    def pop_random(self) -> int:
        i = random.randrange(len(self._ports))
        port = self._ports[i]
        self.discard(port)
        return port

    def discard(self, port: int) -> None:
        i = self._index.pop(port, None)
        if i is None:
            return
        last = self._ports.pop()
        if i < len(self._ports):
            self._ports[i] = last
            self._index[last] = i

    def add(self, port: int) -> None:
        if port not in self._index:
            self._index[port] = len(self._ports)
            self._ports.append(port)


@dataclass(slots=True)
class Pair:
    """Live state of one (egress, destination) pair; dropped when it holds nothing."""

    live: int = 0  # connected plus in flight
    ports: set[int] = field(default_factory=set)  # ports of connected sockets
    in_slice: int = 0  # of those, ports in this worker's own slice
    free: FreePorts | None = None  # only while busy
    parked: deque[tuple[float, int]] = field(default_factory=deque)  # (until, port)


@dataclass(frozen=True, slots=True)
class PairUsage:
    """What operators and metrics see for one pair."""

    egress: str
    destination: str
    live: int
    capacity: int

    @property
    def utilisation(self) -> float:
        return self.live / self.capacity if self.capacity else 1.0


class Slot:
    """One counted connection: its share of its (egress, destination) pair, given back once.

    One slotted object per held connection, and nothing else: an idle WebSocket session
    keeps it for days, so what it pins is paid per session (issue 22). It replaced a
    ``Slot`` with a ``weakref.finalize`` on the socket, a ``_Claim`` and the
    ``getsockname()`` tuple (~630 bytes traced, now ~100): the owners release it on every
    close path (the pool's ``connection_lost``, a failed wrap, the httpx backend's close),
    and ``__del__`` stays as the safety net for a slot dropped without ``release()``.
    """

    __slots__ = (
        "destination",
        "egress",
        "in_own",
        "ip",
        "own_capacity",
        "owner",
        "pair",
        "port",
        "released",
    )

    def __init__(
        self,
        owner: EgressSet,
        egress: Egress,
        destination: Destination,
        pair: Pair,
        own_capacity: int,
    ) -> None:
        self.owner, self.egress, self.destination = owner, egress, destination
        self.pair, self.own_capacity = pair, own_capacity
        self.port: int | None = None  # set once connected
        self.ip = egress.ip  # the source IP (the kernel's pick for the default source)
        self.in_own = False
        self.released = False

    @property
    def local(self) -> tuple[str, int]:
        """The socket's own (IP, port), built when asked: not kept per connection."""
        return (self.ip, self.port or 0)

    def release(self) -> None:
        """Idempotent: the first call gives the count back, later ones do nothing."""
        if self.released:
            return
        self.released = True
        pair, port = self.pair, self.port
        pair.live -= 1
        if port is not None:
            pair.ports.discard(port)
            if self.in_own:
                pair.in_slice -= 1
                if pair.free is not None:
                    pair.free.add(port)
        busy = self.own_capacity * self.owner.busy_threshold / 2
        if pair.free is not None and pair.in_slice < busy:
            pair.free = None  # no longer busy: the kernel's search is cheap again
            pair.parked.clear()
        self.owner.forget_if_idle((self.egress, self.destination), pair)

    def __del__(self) -> None:
        # the safety net: a slot dropped without release() still gives its count back
        if not self.released:
            self.release()


def room(ports: range) -> int:
    """Ports of a window the kernel may use: reserved ones (ip_local_reserved_ports) excluded."""
    reserved = kernel.port_sysctls().reserved
    return len(ports) - sum(1 for p in reserved if p in ports)


__all__ = ["FreePorts", "Pair", "PairUsage", "Slot", "room"]
