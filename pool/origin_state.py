"""Each origin's state in this worker: whether it takes new requests and sessions, and why.

One registry per worker process (:class:`OriginStates`), shared by the routes (``Route.pick``
skips an origin that does not :meth:`~OriginStates.admits`), the admin listener (``GET
/origins``, drain, undrain), the drainer (:mod:`proxy.drain`) and the health checks.

Two facts decide an origin's state, held apart because they have different owners and must
not overwrite each other:

* *drained*: the operator's (``POST /origins/drain``, ``originpool drain``) or a reload's
  (the origin left every route). Only an undrain (or the origin's return to a route) clears
  it.
* *down*: the health checks' (active ``health``, or ``passive`` after failures seen on real
  traffic). Only :meth:`~OriginStates.mark_up` clears it.

The state shown is :class:`State`: ``DRAINING`` while drained (a drained origin that is also
down still drains: the operator's intent wins, and an undrain then leaves it ``DOWN``),
else ``DOWN`` while down, else ``ACTIVE``. Only ``ACTIVE`` admits. Every change of the
state is one ``origin_state`` log line (origin, from, to, by, reason) and one call of each
listener; an event that changes nothing (a second mark_down) logs nothing.

For the health checks (and anyone else), the whole interface is::

    states.mark_down(origin, "3 checks failed: ECONNREFUSED", by="health")  # or by="passive"
    states.mark_up(origin, by="health")
    states.record_check(origin, {"ok": False, "at": time.time(), "detail": "..."})
    states.add_listener(fn)  # fn(origin, old_state, new_state, change) on every change

``record_check`` keeps the last check's result for ``GET /origins`` (any JSON-able mapping).

Admission (issue 20 §2) lives here too, because it is per origin and follows the state:
:meth:`~OriginStates.admit_session` is asked once per WebSocket handshake that is about to go
to an origin; with ``max_session_rate`` set it is a token bucket, and for ``slow_start``
seconds after the origin becomes ``ACTIVE`` again (back up, or undrained) the rate ramps
from a tenth to the full rate, as HAProxy's ``slowstart`` ramps a server's weight. The rate
in the config is the whole proxy's; each worker enforces its share (``rate / workers``):
the kernel's SO_REUSEPORT spreads connections over the workers evenly enough for that.

Sessions and requests in flight per origin are counted where they start and end (the proxy's
tunnels and exchanges); the proxy hands the registry a ``counter`` callable so the view
(:meth:`~OriginStates.view`) shows them without a second count to keep in step.

Pure state and arithmetic, no I/O and no event loop: clocks and the RNG are injectable.
"""

from __future__ import annotations

import enum
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from pool.origin_spec import Origin

log = structlog.get_logger("originpool.origin")


class State(enum.Enum):
    ACTIVE = "active"
    DRAINING = "draining"
    DOWN = "down"


class Event(enum.Enum):
    DRAIN = "drain"
    UNDRAIN = "undrain"
    MARK_DOWN = "mark_down"
    MARK_UP = "mark_up"


# who may set which fact: a typo'd "by" is a programming error, not a new kind of cause
DRAIN_CAUSES = frozenset({"admin", "reload"})
DOWN_CAUSES = frozenset({"health", "passive"})

# (drained, down) -> state, and which fact each event sets: the whole machine, as a table
_STATE = {
    (False, False): State.ACTIVE,
    (True, False): State.DRAINING,
    (True, True): State.DRAINING,
    (False, True): State.DOWN,
}
_SETS = {
    Event.DRAIN: ("drained", True),
    Event.UNDRAIN: ("drained", False),
    Event.MARK_DOWN: ("down", True),
    Event.MARK_UP: ("down", False),
}

SLOW_START_FLOOR = 0.1  # the share of the rate an origin gets the moment it is back


class AdmissionRefused(Exception):
    """A new session to ``origin`` over its ``max_session_rate``: answer 503 with
    ``Retry-After: retry_after`` (whole seconds, jittered: see :meth:`Admission.take`)."""

    def __init__(self, origin: Origin, rate: float, retry_after: int) -> None:
        super().__init__(
            f"{origin}: over max_session_rate {rate:g}/s in this worker; retry in {retry_after}s"
        )
        self.origin = origin
        self.rate = rate
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Limits:
    """An origin's admission settings (the route's origins table); 0 means off."""

    max_session_rate: float = 0.0  # new WebSocket sessions per second, whole proxy
    slow_start: float = 0.0  # seconds over which the rate ramps after the origin is back


@dataclass
class Admission:
    """A token bucket for one origin in one worker, its capacity one second of its rate.

    A refused handshake is told to come back after a jittered ``Retry-After``: the refused
    clients of one second are spread over as many seconds as the rate needs to take them
    (``refused_recently / rate``), not all sent back together to make the same burst again.
    """

    rate: float  # this worker's share, sessions per second
    slow_start: float = 0.0
    tokens: float = 0.0
    updated: float = 0.0
    since: float | None = None  # when slow start began (None: not ramping)
    refused: float = 0.0  # refusals, decaying by one second's worth per second

    def current_rate(self, now: float) -> float:
        if self.since is None or self.slow_start <= 0:
            return self.rate
        share = (now - self.since) / self.slow_start
        if share >= 1:
            return self.rate
        return max(self.rate * max(share, SLOW_START_FLOOR), min(self.rate, 1.0))

    def take(self, now: float, rng: random.Random) -> int:
        """0 when a session may start now (a token taken), else the seconds to tell the
        client to wait (at least 1)."""
        rate = self.current_rate(now)
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(max(rate, 1.0), self.tokens + elapsed * rate)
        self.refused = max(0.0, self.refused - elapsed * rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0
        self.refused += 1
        wait = (1.0 - self.tokens) / rate
        spread = self.refused / rate  # when the rate would have taken every refused client
        return max(1, math.ceil(wait + rng.uniform(0.0, spread)))


@dataclass
class Entry:
    """One origin's facts; the state derives from them (see the module docstring)."""

    origin: Origin
    drained: bool = False
    down: bool = False
    drained_by: str | None = None
    down_by: str | None = None
    reason: str = ""
    since: float = field(default_factory=time.time)  # wall clock of the last state change
    last_check: Mapping[str, Any] | None = None
    limits: Limits = Limits()
    admission: Admission | None = None
    drained_sessions: int = 0  # sessions a drain ended: originpool_drained_sessions_total

    @property
    def state(self) -> State:
        return _STATE[(self.drained, self.down)]

    @property
    def set_by(self) -> str | None:
        """Who put it in its state: the drain's cause, the down mark's, or None (active)."""
        if self.drained:
            return self.drained_by
        return self.down_by if self.down else None


Listener = Callable[[Origin, State, State, str], object]
Counter = Callable[[Origin], tuple[int, int]]  # (sessions, requests in flight)


class OriginStates:
    """The worker's registry; an origin it has never heard of is ACTIVE and unlimited."""

    def __init__(
        self,
        workers: int = 1,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.workers = max(1, workers)
        self._clock = clock
        self._rng = rng or random.Random()
        self._entries: dict[Origin, Entry] = {}
        self._listeners: list[Listener] = []
        self.counter: Counter = lambda _origin: (0, 0)

    # -- the data path's question -------------------------------------------------------------

    def admits(self, origin: Origin) -> bool:
        """Whether ``origin`` may get a new request or session (only ACTIVE does)."""
        entry = self._entries.get(origin)
        return entry is None or not (entry.drained or entry.down)

    def admit_session(self, origin: Origin) -> None:
        """Take a token for one new WebSocket session to ``origin``; raises
        :class:`AdmissionRefused` over its ``max_session_rate``."""
        entry = self._entries.get(origin)
        if entry is None or entry.admission is None:
            return
        wait = entry.admission.take(self._clock(), self._rng)
        if wait:
            raise AdmissionRefused(origin, entry.admission.rate, wait)

    # -- configuration -----------------------------------------------------------------------

    def configure(self, limits: Mapping[Origin, Limits]) -> None:
        """The origins the routes name and their admission settings (at start and on every
        reload). Facts of origins already known are kept; a changed rate starts full."""
        for origin, lim in limits.items():
            entry = self.entry(origin)
            if lim == entry.limits:
                continue
            entry.limits = lim
            if lim.max_session_rate <= 0:
                entry.admission = None
                continue
            rate = lim.max_session_rate / self.workers
            entry.admission = Admission(
                rate, lim.slow_start, tokens=max(rate, 1.0), updated=self._clock()
            )

    def entry(self, origin: Origin) -> Entry:
        found = self._entries.get(origin)
        if found is None:
            found = self._entries[origin] = Entry(origin)
        return found

    def forget(self, origin: Origin) -> None:
        """An origin no route names and nothing drains any more: out of the view."""
        self._entries.pop(origin, None)

    # -- events ------------------------------------------------------------------------------

    def drain(self, origin: Origin, by: str = "admin", reason: str = "") -> bool:
        """Stop sending new work to ``origin``; True if that changed its state."""
        if by not in DRAIN_CAUSES:
            raise ValueError(f"drain cause must be one of {sorted(DRAIN_CAUSES)}, not {by!r}")
        return self._apply(origin, Event.DRAIN, by, reason or f"drained by {by}")

    def undrain(self, origin: Origin, by: str = "admin") -> bool:
        return self._apply(origin, Event.UNDRAIN, by, f"undrained by {by}")

    def mark_down(self, origin: Origin, reason: str, by: str = "health") -> bool:
        """The health checks' verdict (``by`` "health" or "passive"): no new work until
        :meth:`mark_up`. Sessions already open are not cut by this."""
        if by not in DOWN_CAUSES:
            raise ValueError(f"down cause must be one of {sorted(DOWN_CAUSES)}, not {by!r}")
        return self._apply(origin, Event.MARK_DOWN, by, reason)

    def mark_up(self, origin: Origin, by: str = "health", reason: str = "") -> bool:
        return self._apply(origin, Event.MARK_UP, by, reason or f"up ({by})")

    def session_drained(self, origin: Origin) -> None:
        self.entry(origin).drained_sessions += 1

    def record_check(self, origin: Origin, result: Mapping[str, Any]) -> None:
        self.entry(origin).last_check = dict(result)

    def add_listener(self, listener: Listener) -> None:
        """``listener(origin, old, new, by)`` after every state change, in this worker."""
        self._listeners.append(listener)

    def _apply(self, origin: Origin, event: Event, by: str, reason: str) -> bool:
        entry = self.entry(origin)
        old = entry.state
        fact, value = _SETS[event]
        setattr(entry, fact, value)
        setattr(entry, f"{fact}_by", by if value else None)
        new = entry.state
        if new is old:
            return False
        entry.reason = reason
        entry.since = time.time()
        adm = entry.admission
        if new is State.ACTIVE and adm is not None and adm.slow_start > 0:
            # slow start: the rate ramps from here, from one token (not a full bucket
            # refilled while the origin was out)
            adm.since = adm.updated = self._clock()
            adm.tokens = min(adm.tokens, 1.0)
        log.info(
            "origin_state",
            origin=str(origin),
            old=old.value,
            new=new.value,
            by=by,
            change=event.value,
            reason=reason,
        )
        for listener in list(self._listeners):
            listener(origin, old, new, by)
        return True

    # -- views -------------------------------------------------------------------------------

    def state(self, origin: Origin) -> State:
        entry = self._entries.get(origin)
        return State.ACTIVE if entry is None else entry.state

    def origins(self) -> Iterable[Origin]:
        return list(self._entries)

    def find(self, url: str) -> Origin | None:
        """The known origin ``url`` names (as written in a route, or any equal spelling)."""
        try:
            wanted = Origin.parse(url)
        except ValueError:
            return None
        return wanted if wanted in self._entries else None

    def view(self) -> list[dict[str, Any]]:
        """``GET /origins``: one JSON-able dict per origin, in the order they became known."""
        out = []
        for origin, entry in self._entries.items():
            sessions, in_flight = self.counter(origin)
            adm = entry.admission
            out.append(
                {
                    "origin": str(origin),
                    "state": entry.state.value,
                    "by": entry.set_by,
                    "reason": entry.reason,
                    "since": round(entry.since, 3),
                    "sessions": sessions,
                    "requests_in_flight": in_flight,
                    "last_check": entry.last_check,
                    "max_session_rate": entry.limits.max_session_rate or None,
                    "session_rate_now": (
                        round(adm.current_rate(self._clock()) * self.workers, 3) if adm else None
                    ),
                }
            )
        return out
