"""Limits per client address: concurrent connections (nginx's ``limit_conn``) and a request
rate and a WebSocket handshake rate (``limit_req``), each a token bucket per address.

Sans I/O, with the clock injected, so a test can drain a bucket and move time without
sleeping. Each bucket is one float, GCRA's "theoretical arrival time" (the moment the bucket
would be full again), which is the token bucket's arithmetic without a second number: an
address costs a dict slot, its key and that float. The table is a bounded LRU (a plain dict
in access order: a hit moves the key to the end, the full table drops from the front): the
address dropped is the one idle longest, whose bucket has most likely refilled already, and
at worst it starts again with a full burst. Connections are counted only while open, so that
table is bounded by the connections themselves and needs no LRU.

Every table is per worker (as each worker's listening socket takes its share of the
clients): with N workers an address holding connections on several gets up to N times
each limit. nginx shares its zones between workers; the README says the difference.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from proxy.headers import Network, is_trusted

__all__ = ["KINDS", "ClientLimits", "LimitSettings", "TokenBuckets", "forwarded_client"]

KINDS: Final = ("conn", "rate", "websocket")  # originpool_limited_total{kind}
DEFAULT_MAX_TRACKED: Final = 100_000


class TokenBuckets:
    """A token bucket per key: ``rate`` tokens a second, at most ``burst`` at once.

    :meth:`take` answers 0.0 when a token was there (and takes it), otherwise how many
    seconds until one will be (a Retry-After), taking nothing: a client refused does not
    dig itself deeper, as nginx's ``limit_req`` counts only the requests it lets through.
    """

    __slots__ = ("_clock", "_tat", "burst", "interval", "max_keys", "rate", "tolerance")

    def __init__(
        self,
        rate: float,
        burst: int,
        max_keys: int = DEFAULT_MAX_TRACKED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError(f"rate {rate} > 0, burst {burst} >= 1, max_keys {max_keys} >= 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self.interval = 1.0 / rate
        self.tolerance = (burst - 1) * self.interval  # how far ahead of now a key may run
        self._clock = clock
        self._tat: dict[Hashable, float] = {}

    def __len__(self) -> int:
        return len(self._tat)

    def take(self, key: Hashable) -> float:
        now = self._clock()
        table = self._tat
        tat = table.pop(key, now)  # popped and put back: the key moves to the LRU's end
        if tat < now:
            tat = now
        wait = tat - now - self.tolerance
        if wait > 1e-9:  # sums of 1/rate drift by ulps: the burst-th token must still pass
            table[key] = tat
            return wait
        table[key] = tat + self.interval
        if len(table) > self.max_keys:
            del table[next(iter(table))]
        return 0.0


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """The ``[limits]`` keys of this module; None is off. ``*_burst`` None: one second's
    worth (at least 1)."""

    conn_per_ip: int | None = None
    rate_per_ip: float | None = None
    rate_burst: int | None = None
    websocket_rate_per_ip: float | None = None
    websocket_burst: int | None = None
    max_tracked_addresses: int = DEFAULT_MAX_TRACKED

    @property
    def any(self) -> bool:
        return (
            self.conn_per_ip is not None
            or self.rate_per_ip is not None
            or self.websocket_rate_per_ip is not None
        )


def _burst(rate: float, burst: int | None) -> int:
    return burst if burst is not None else max(1, math.ceil(rate))


class ClientLimits:
    """One worker's limits and what they refused; built only when a limit is set, so with
    every limit off the data path pays one ``is None`` per connection and per request."""

    __slots__ = ("conns", "last_kind", "limited", "rate", "settings", "websocket")

    def __init__(
        self, settings: LimitSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.conns: dict[Hashable, int] = {}
        self.limited: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.last_kind = ""  # what the last refusal of request() was: "rate" or "websocket"
        s = settings
        self.rate = (
            None
            if s.rate_per_ip is None
            else TokenBuckets(
                s.rate_per_ip,
                _burst(s.rate_per_ip, s.rate_burst),
                s.max_tracked_addresses,
                clock,
            )
        )
        self.websocket = (
            None
            if s.websocket_rate_per_ip is None
            else TokenBuckets(
                s.websocket_rate_per_ip,
                _burst(s.websocket_rate_per_ip, s.websocket_burst),
                s.max_tracked_addresses,
                clock,
            )
        )

    def replaced_by(self, settings: LimitSettings) -> ClientLimits | None:
        """The limits after a reload: open connections stay counted, and buckets whose
        rate and burst are unchanged keep their state (a reload must not hand every client
        a fresh burst); None when every limit is now off."""
        if not settings.any:
            return None
        new = ClientLimits(settings)
        new.conns = self.conns
        new.limited = self.limited
        for name in ("rate", "websocket"):
            old, now = getattr(self, name), getattr(new, name)
            same = old is not None and now is not None
            if same and (old.rate, old.burst) == (now.rate, now.burst):
                old.max_keys = now.max_keys
                setattr(new, name, old)
        return new

    def open(self, key: Hashable) -> bool:
        """A connection from ``key`` is accepted (True, counted until :meth:`close`) or
        over ``conn_per_ip`` (False, counted in ``limited``)."""
        n = self.conns.get(key, 0)
        cap = self.settings.conn_per_ip
        if cap is not None and n >= cap:
            self.limited["conn"] += 1
            return False
        self.conns[key] = n + 1
        return True

    def close(self, key: Hashable) -> None:
        n = self.conns.get(key, 0) - 1
        if n > 0:
            self.conns[key] = n
        else:
            self.conns.pop(key, None)

    def request(self, key: Hashable, websocket: bool = False) -> float:
        """0.0 to go on, or the seconds a 429's Retry-After should say. A WebSocket
        handshake takes from both buckets: it is a request too."""
        if self.rate is not None:
            wait = self.rate.take(key)
            if wait:
                self.limited["rate"] += 1
                self.last_kind = "rate"
                return wait
        if websocket and self.websocket is not None:
            wait = self.websocket.take(key)
            if wait:
                self.limited["websocket"] += 1
                self.last_kind = "websocket"
                return wait
        return 0.0


def forwarded_client(
    headers: Iterable[tuple[bytes, bytes]], trusted: Sequence[Network]
) -> bytes | None:
    """The client a trusted proxy in front names in X-Forwarded-For, for ``rate_per_ip``'s
    key: the right-most address that is not itself a trusted proxy (nginx's realip with
    ``real_ip_recursive on``), or the left-most when all are. None (keep the peer's) for no
    header or an entry that is not an IP address: a garbled chain names no one for sure."""
    chain: list[bytes] = []
    for name, value in headers:
        if name == b"x-forwarded-for":
            chain += [part.strip() for part in value.split(b",")]
    if not chain:
        return None
    for part in reversed(chain):
        text = part.decode("latin-1")
        try:
            packed = ipaddress.ip_address(text)
        except ValueError:
            return None
        if not is_trusted(text, trusted):
            return str(packed).encode()
    return str(ipaddress.ip_address(chain[0].decode("latin-1"))).encode()


def retry_after(wait: float) -> int:
    """Retry-After is whole seconds (RFC 9110 §10.2.3): rounded up, never 0."""
    return max(1, math.ceil(wait))
