"""Which source IP and port each upstream connection uses, so one destination reaches E x R.

An :class:`EgressSet` is the list of source IPs the host may use (each optionally with a port
window, for hosts or processes that slice one IP's range). For every new connection to a
destination ``(ip, port)`` it:

* picks the egress IP with the most free capacity *for that destination* (ties: round
  robin), so E egress IPs fill evenly to E x R instead of stalling on the fullest one;
* once a (egress, destination) pair is busy (half full: where the kernel's own port search
  gets ~35x slower), hands connectx one port it knows is free, as a one-port
  ``IP_LOCAL_PORT_RANGE`` window, so connect() stays flat up to 99% utilisation. The
  free-port record exists only for busy pairs;
* fails over within the same call when a pair is full or an IP has vanished from the host,
  and raises :class:`EgressExhausted` naming every egress tried only when none had room, or
  :class:`EgressUnavailable` when the only reason was that the IPs are not on this host;
* marks an IP that the host no longer has down with backoff and tries it again later, so
  re-adding it brings it back without a restart; when the kernel's address announcements
  are watched (:mod:`pool.addrwatch`), an IP is down exactly while it is missing instead:
  from start when the host lacks it, at once when it is removed, up again when it is added.

"Not on this host" and "no port left" share an errno (EADDRNOTAVAIL) and must never be
confused; :mod:`pool.egress_health` tells them apart by the stage of the typed
:class:`~pool.errors.ConnectError` and keeps which IPs are down. The errors live in
:mod:`pool.errors` and are re-exported here.

Counts are reserved before the connect and released in ``finally`` paths and by
:meth:`~pool.ports.Slot.release` (idempotent, also run if the slot is dropped unreleased), so
errors, timeouts and cancellation cannot leak them; what is counted lives in :mod:`pool.ports`
(re-exported here), how each mode connects in :mod:`pool.connectors`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from pool import kernel
from pool.connectors import MODES, Mode, open_socket, timed_out
from pool.connectx import effective_window
from pool.egress_health import EgressHealth, not_on_host
from pool.errors import (
    NOT_ON_HOST_TEXT,
    ConnectError,
    Destination,
    EgressExhausted,
    EgressLost,
    EgressUnavailable,
    format_address,
)
from pool.ports import FreePorts, Pair, PairUsage, Slot, room

log = structlog.get_logger("originpool.egress")


# errnos that mean "this (egress, destination) pair has no port left": try the next egress.
_FULL = frozenset({errno.EADDRNOTAVAIL, errno.EADDRINUSE, errno.EAGAIN})

# why a connect moved on to the next egress IP: the label of the failover counter
NOT_ON_HOST = "not_on_host"
NO_PORT = "no_port"

# A recorded port the kernel refuses is held by someone the record does not know (another
# process sharing the IP, or our own actively closed connection in TIME_WAIT/FIN_WAIT2): park
# it for as long as those states last, and let the kernel search after this many refusals in
# one call, so a polluted record costs a bounded number of attempts per connect.
_PARK_SECONDS = 60.0
_RECORD_MISSES = 4


@dataclass(frozen=True, slots=True)
class Egress:
    """One source IP (``""``: the kernel's default source) and an optional port window."""

    ip: str
    window: tuple[int, int] | None = None

    @property
    def family(self) -> int | None:
        """None for the default source, which serves either family."""
        if not self.ip:
            return None
        return socket.AF_INET6 if ":" in self.ip else socket.AF_INET

    @classmethod
    def parse(cls, text: str) -> Egress:
        """``"IP"``, ``"IP:LO-HI"``, ``"[V6]:LO-HI"`` or a bare IPv6 address.

        Raises ``ValueError`` with the reason, for the config layer to name the key.
        """
        text = text.strip()
        window: tuple[int, int] | None = None
        ip = text
        if text.startswith("["):
            end = text.find("]")
            if end < 0:
                raise ValueError(f"{text!r}: missing ']'")
            ip, rest = text[1:end], text[end + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"{text!r}: expected ':LO-HI' after ']'")
                window = _parse_window(text, rest[1:])
        elif text.count(":") == 1:
            ip, rest = text.split(":")
            window = _parse_window(text, rest)
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                socket.inet_pton(family, ip)
                break
            except OSError:
                continue
        else:
            raise ValueError(f"{text!r}: {ip!r} is not a numeric IPv4 or IPv6 address")
        return cls(ip, window)

    def __str__(self) -> str:
        shown = self.ip or "default"
        if self.window:
            shown = f"[{shown}]" if ":" in shown else shown
            return f"{shown}:{self.window[0]}-{self.window[1]}"
        return shown


def _parse_window(text: str, spec: str) -> tuple[int, int]:
    try:
        lo_s, hi_s = spec.split("-")
        lo, hi = int(lo_s), int(hi_s)
    except ValueError:
        raise ValueError(f"{text!r}: port window must be LO-HI, got {spec!r}") from None
    if not (1 <= lo <= hi <= 65535):
        raise ValueError(f"{text!r}: port window {lo}-{hi} must satisfy 1 <= LO <= HI <= 65535")
    return (lo, hi)


@dataclass
class EgressMetrics:
    """Counters the proxy exports (Prometheus names are chosen there)."""

    attempts: Counter[str] = field(default_factory=Counter)  # by egress
    failures: Counter[tuple[str, str]] = field(default_factory=Counter)  # (egress, errno)
    failover: Counter[tuple[str, str]] = field(default_factory=Counter)  # (egress, reason)
    exhausted: int = 0  # refused: no port left on the egress IPs that are on the host
    unavailable: int = 0  # refused: every usable egress IP is gone from the host


class EgressSet:
    """Source-address selection and accounting for every upstream connection of a process."""

    def __init__(
        self,
        addresses: Sequence[Egress | str] = (),
        mode: Mode = "connectx",
        *,
        busy_threshold: float = 0.5,
        backoff: tuple[float, float] = (1.0, 30.0),
        clock: Callable[[], float] = time.monotonic,
        share: tuple[int, int] = (0, 1),
    ) -> None:
        """``share=(i, n)``: this is worker i of n processes using the same egress IPs.

        Each worker then prefers its own contiguous slice of every window (no collisions,
        its free-port record stays true, connect() stays flat) and overflows into the whole
        window through the kernel's search once its slice is full, by its own connections
        or by other workers' overflow, so SO_REUSEPORT's uneven spread never costs capacity:
        together the workers still reach E x R, and none refuses before that.
        """
        if mode not in MODES:
            raise ValueError(f"egress mode must be one of {', '.join(MODES)}, not {mode!r}")
        parsed = [a if isinstance(a, Egress) else Egress.parse(a) for a in addresses]
        if mode == "plain" or not parsed:
            # plain: one source, the kernel's; windows still apply in connectx mode
            parsed = [Egress("", parsed[0].window if parsed and mode != "plain" else None)]
        self.egresses: tuple[Egress, ...] = tuple(parsed)
        self.mode: Mode = mode
        self.busy_threshold = busy_threshold
        self._clock = clock
        self.health = EgressHealth(backoff, clock)
        self._pairs: dict[tuple[Egress, Destination], Pair] = {}
        self._rr = 0
        if not (0 <= share[0] < share[1]):
            raise ValueError(f"share must be (index, count) with 0 <= index < count: {share}")
        self.share = share
        self.metrics = EgressMetrics()
        self._ints: dict[int, int] = {}  # see _shared: a few capacities per process

    # -- capacity -------------------------------------------------------------------------

    def capacity(self, egress: Egress) -> int:
        """Ports this egress can hold toward any one destination."""
        return room(self._ports_of(egress))

    def _ports_of(self, egress: Egress) -> range:
        facts = kernel.port_sysctls()
        if egress.window is None:
            return range(facts.low, facts.high + 1)
        lo, hi = effective_window(*egress.window) or egress.window
        return range(lo, hi + 1)

    def _slice_of(self, egress: Egress) -> range:
        """This worker's own part of the egress window (the whole of it for one worker)."""
        full = self._ports_of(egress)
        index, count = self.share
        if count == 1:
            return full
        size = len(full)
        return range(full.start + size * index // count, full.start + size * (index + 1) // count)

    def utilisation(self) -> list[PairUsage]:
        """Every pair with live connections, fullest first."""
        rows = [
            PairUsage(str(e), format_address(d), pair.live, self.capacity(e))
            for (e, d), pair in self._pairs.items()
        ]
        return sorted(rows, key=lambda r: r.utilisation, reverse=True)

    def live_by_egress(self) -> dict[str, int]:
        out: Counter[str] = Counter({str(e): 0 for e in self.egresses})
        for (e, _d), pair in self._pairs.items():
            out[str(e)] += pair.live
        return dict(out)

    # -- presence (pool.egress_health) ------------------------------------------------------

    def is_down(self, egress: Egress) -> bool:
        return self.health.is_down(egress)

    def forget_presence(self) -> None:
        self.health.forget_presence()

    def set_present(self, egress: Egress, present: bool) -> bool:
        """See :meth:`pool.egress_health.EgressHealth.set_present`."""
        return self.health.set_present(egress, present)

    # -- selection ------------------------------------------------------------------------

    def _candidates(self, destination: Destination) -> list[Egress]:
        family = socket.AF_INET6 if ":" in destination[0] else socket.AF_INET
        usable = [
            (i, e)
            for i, e in enumerate(self.egresses)
            if e.family in (None, family) and not self.is_down(e)
        ]
        self._rr += 1
        n = len(self.egresses)

        def key(item: tuple[int, Egress]) -> tuple[int, int]:
            i, e = item
            pair = self._pairs.get((e, destination))
            free = self.capacity(e) - (pair.live if pair else 0)
            return (-free, (i - self._rr) % n)

        return [e for _i, e in sorted(usable, key=key)]

    # -- connecting -----------------------------------------------------------------------

    async def connect(
        self, destination: Destination, *, timeout: float | None = None
    ) -> tuple[socket.socket, Slot]:
        """A connected non-blocking socket to ``destination`` and the slot that counts it.

        Raises :class:`EgressExhausted` when no egress could take it (its subclass
        :class:`EgressUnavailable` when the only reason is that the IPs are not on this
        host), or the connect's own error (refused, timed out, unreachable) naming both
        addresses.
        """
        attempts: list[tuple[str, int]] = []
        gone: list[str] = []
        for egress in self._candidates(destination):
            self.metrics.attempts[str(egress)] += 1
            try:
                return await self._connect_via(egress, destination, timeout)
            except OSError as e:
                code = e.errno or errno.ETIMEDOUT
                self.metrics.failures[(str(egress), errno.errorcode.get(code, str(code)))] += 1
                if not_on_host(egress, e, code):
                    self.metrics.failover[(str(egress), NOT_ON_HOST)] += 1
                    self.health.mark_down(egress, destination, code)
                    gone.append(egress.ip)
                elif code in _FULL:
                    self.metrics.failover[(str(egress), NO_PORT)] += 1
                else:
                    raise
                attempts.append((egress.ip, code))
        raise self._refused(destination, attempts, gone)

    def _refused(
        self, destination: Destination, attempts: list[tuple[str, int]], gone: list[str]
    ) -> EgressExhausted:
        """The error for a connect no egress IP could take, counted and logged once."""
        family = socket.AF_INET6 if ":" in destination[0] else socket.AF_INET
        skipped = [e.ip for e in self.egresses if e.family in (None, family) and self.is_down(e)]
        gone = list(dict.fromkeys([*gone, *skipped]))
        tried = [
            {"egress": ip or "default", "errno": errno.errorcode.get(c, c), "error": _why(c)}
            for ip, c in attempts
        ]
        for row in tried:
            if row["egress"] in gone:
                row["error"] = NOT_ON_HOST_TEXT
        if gone and all(ip in gone for ip, _c in attempts):
            self.metrics.unavailable += 1
            log.warning(
                "egress_unavailable",
                destination=format_address(destination),
                egress=gone,
                errno="EADDRNOTAVAIL",
                reason=NOT_ON_HOST_TEXT,
                attempts=tried,
            )
            return EgressUnavailable(destination, attempts, gone)
        self.metrics.exhausted += 1
        log.warning(
            "egress_exhausted",
            destination=format_address(destination),
            attempts=tried,
            not_on_host=gone,
        )
        return EgressExhausted(destination, attempts, gone)

    async def _connect_via(
        self, egress: Egress, destination: Destination, timeout: float | None
    ) -> tuple[socket.socket, Slot]:
        key = (egress, destination)
        pair = self._pairs.get(key)
        if pair is None:
            pair = self._pairs[key] = Pair()
        capacity = self.capacity(egress)
        if self.mode == "connectx" and pair.live >= capacity:
            self.forget_if_idle(key, pair)
            raise _full(egress, destination)
        pair.live += 1  # reserved before the await: concurrent callers see it
        own = self._slice_of(egress)
        own_capacity = self._shared(capacity if self.share[1] == 1 else room(own))
        slot = Slot(self, egress, destination, pair, own_capacity)

        family = socket.AF_INET6 if ":" in destination[0] else socket.AF_INET
        try:
            sock = await self._open(egress, destination, family, pair, own, own_capacity, timeout)
        except BaseException:
            slot.release()
            raise
        local = sock.getsockname()
        port = int(local[1])
        if local[0] != egress.ip:
            slot.ip = str(local[0])  # the default source: the kernel's pick
        pair.ports.add(port)
        if port in own:
            pair.in_slice += 1
        if pair.free is not None:
            pair.free.discard(port)
        self.health.connected(egress, destination)
        slot.port, slot.in_own = port, port in own
        return sock, slot

    async def _open(
        self,
        egress: Egress,
        destination: Destination,
        family: int,
        pair: Pair,
        own: range,
        own_capacity: int,
        timeout: float | None,
    ) -> socket.socket:
        """Which port window each attempt asks for; :mod:`pool.connectors` makes the attempt.

        In connectx mode the port comes, in order of preference, from this worker's slice
        via the kernel (while the slice is less than busy_threshold full), from the slice via
        the free-port record (busy: flat latency), or from the whole window via the kernel
        (slice full: overflow into room other workers left). The slice also counts as full
        when the kernel finds no port in it although this worker holds fewer than its size:
        other workers' overflow took the rest, and the free ports left are in their slices,
        so a worker must never refuse before the whole window is used. ``timeout`` bounds
        the whole call, retries on refused recorded ports included.
        """
        sliced = self.share[1] > 1
        own_window = (own.start, own.stop - 1) if sliced and len(own) else egress.window
        misses = 0
        spill = False  # the slice has no port left, whoever holds them: the whole window
        try:
            async with asyncio.timeout(timeout):
                while True:
                    port: int | None = None
                    room = pair.in_slice < own_capacity and not spill
                    window = own_window if room else egress.window
                    busy = pair.in_slice >= own_capacity * self.busy_threshold
                    if self.mode == "connectx" and room and busy and misses < _RECORD_MISSES:
                        if pair.free is None:
                            reserved = kernel.port_sysctls().reserved
                            pair.free = FreePorts(
                                p for p in own if p not in pair.ports and p not in reserved
                            )
                        now = self._clock()
                        while pair.parked and pair.parked[0][0] <= now:
                            parked = pair.parked.popleft()[1]
                            if parked not in pair.ports:
                                pair.free.add(parked)
                        if len(pair.free):
                            port = pair.free.pop_random()
                    if port is not None:
                        window = (port, port)
                    try:
                        return await open_socket(self.mode, family, egress.ip, destination, window)
                    except OSError as e:
                        refused_at_connect = (
                            isinstance(e, ConnectError)
                            and e.stage == "connect"
                            and e.errno == errno.EADDRNOTAVAIL
                        )
                        if port is not None and refused_at_connect:
                            # a refused recorded port; at bind the IP itself is gone: not
                            # the port's fault, and parking it would hide it for a minute
                            pair.parked.append((self._clock() + _PARK_SECONDS, port))
                            misses += 1
                            continue
                        if room and sliced and self.mode == "connectx" and refused_at_connect:
                            spill = True  # one more try, over the whole window
                            continue
                        raise
        except TimeoutError as e:
            if isinstance(e, ConnectError):
                raise  # the kernel's own ETIMEDOUT (SYNs unanswered): its 4-tuple is the truth
            raise timed_out(egress.ip, family, destination, timeout) from None

    def _shared(self, value: int) -> int:
        """One int object per distinct capacity, not one per held slot (32 bytes each)."""
        return self._ints.setdefault(value, value)

    def forget_if_idle(self, key: tuple[Egress, Destination], pair: Pair) -> None:
        if pair.live == 0 and self._pairs.get(key) is pair:
            del self._pairs[key]


def _full(egress: Egress, destination: Destination) -> ConnectError:
    """The pair holds its capacity: refused here, as the kernel would, without a syscall."""
    return ConnectError.of(
        errno.EADDRNOTAVAIL, "connect", (egress.ip, 0), destination, f"all {egress} ports held"
    )


def _why(code: int) -> str:
    return os.strerror(code)


__all__ = [
    "MODES",
    "Egress",
    "EgressExhausted",
    "EgressLost",
    "EgressSet",
    "EgressUnavailable",
    "FreePorts",
    "Mode",
    "PairUsage",
    "Slot",
]
