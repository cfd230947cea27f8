"""Draining an origin: no new work for it, and its WebSocket sessions ended at a pace.

An origin's deploy is its sessions' most violent moment: if they all drop together, every
client comes back together (the testbed's ``storm``). A proxy that knows every session can
move them instead: told Close 1012 (Service Restart, RFC 6455 §7.4.1's registry), a client
reconnects, and the routes send it to another origin, because the drained one no longer
admits (:mod:`pool.origin_state`). Spread over a window, the reconnections arrive at the
other origins at ``sessions / window`` per second instead of all at once.

Two parts:

* :func:`pace`, sans-I/O: given N sessions, a window of S seconds and a seeded RNG, the
  offsets at which to end them. Slot i of N (each S/N long) gets one close, at its middle
  moved by up to ``jitter`` of a slot either way (so workers draining together do not close
  in lock-step), and the jitter is bounded so that no half second holds more than twice the
  even share of closes (see :func:`max_jitter`).
* :class:`Drainer`, per worker: marks the origin draining, closes its idle pooled
  connections (in-flight requests finish on theirs, which then close instead of going back
  idle), and runs the schedule against the worker's live tunnels of that origin: each one
  still open at its time gets Close 1012 to the client and 1001 to the origin. Sessions
  that started after the drain began (a handshake already on its way) are ended at the end
  of the window. A worker whose loop is held up closes late, not in a bunch: the rest of
  the schedule moves back by the delay (the window grows by as much).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from pool.origin_spec import Origin
from pool.origin_state import OriginStates

log = structlog.get_logger("originpool.drain")

SERVICE_RESTART = 1012  # RFC 6455 §7.4.1 registry (IANA): the client should reconnect
GOING_AWAY = 1001
WINDOW = 0.5  # the half second in which no more than twice the even share may close
JITTER = 0.25  # of a slot, either way, when the pace allows it


def max_jitter(n: int, over: float) -> float:
    """The jitter (as a share of a slot, either way of its middle) that keeps every half
    second at or under twice the even share of closes.

    With slot length d = S/N and the even share s = 0.5/d, closes i < k in one half-open
    half second satisfy (k - i) d - 2 j d < 0.5, so a window holds fewer than s + 2j + 1.
    When s >= 1 that is at most 2s for j <= (floor(2s) - s) / 2, which is at least 0.25.
    When s < 1 the bound is one close, and a gap of at least 0.5 s between closes holds it:
    j <= (1 - s) / 2. An exact even pace (j = 0) meets the bound everywhere.
    """
    if n <= 1 or over <= 0:
        return JITTER
    share = WINDOW * n / over
    if share >= 1:
        return min(JITTER, (math.floor(2 * share) - share) / 2 * 0.999)
    return min(JITTER, (1 - share) / 2 * 0.999)


def pace(n: int, over: float, rng: random.Random) -> list[float]:
    """Offsets in seconds from the drain's start, ascending, all in ``[0, over)``, at which
    to end ``n`` sessions: one per slot of ``over / n``, jittered (see :func:`max_jitter`)."""
    if n <= 0:
        return []
    if over <= 0:
        return [0.0] * n
    slot = over / n
    j = max_jitter(n, over)
    return [(i + 0.5 + rng.uniform(-j, j)) * slot for i in range(n)]


def busiest_half_second(times: Iterable[float]) -> int:
    """The most closes in any half-open half second: what the pacing promise is about."""
    ordered = sorted(times)
    most = 0
    first = 0
    for last, t in enumerate(ordered):
        while t - ordered[first] >= WINDOW:
            first += 1
        most = max(most, last - first + 1)
    return most


class Session(Protocol):
    """What the drainer needs of a live WebSocket session (:class:`proxy.tunnel.Tunnel`)."""

    origin: Origin
    finished: bool

    def end(self, client_code: int, origin_code: int, reason: str) -> None: ...


@dataclass
class Drain:
    """One origin's drain in this worker."""

    origin: Origin
    over: float
    by: str
    sessions: int  # live when it began
    started: float = field(default_factory=time.monotonic)
    ended: int = 0
    task: asyncio.Task[None] | None = None


class Drainer:
    """A worker's drains. ``sessions`` lists its live sessions (all origins); ``close_idle``
    closes an origin's idle pooled connections and keeps released ones from going idle
    (``close_idle(origin, False)`` lets them again, on undrain)."""

    def __init__(
        self,
        states: OriginStates,
        sessions: Callable[[], Iterable[Session]],
        close_idle: Callable[[Origin, bool], object] = lambda _o, _on: None,
        rng: random.Random | None = None,
    ) -> None:
        self.states = states
        self.sessions = sessions
        self.close_idle = close_idle
        self.rng = rng or random.Random()
        self.drains: dict[Origin, Drain] = {}

    def live(self, origin: Origin) -> list[Session]:
        return [s for s in self.sessions() if s.origin == origin and not s.finished]

    def drain(self, origin: Origin, over: float, by: str = "admin") -> Drain:
        """Start (or restart, with a new window) draining ``origin``; returns at once."""
        self.states.drain(origin, by=by, reason=f"drained by {by} over {over:g}s")
        old = self.drains.pop(origin, None)
        if old is not None and old.task is not None:
            old.task.cancel()
        self.close_idle(origin, True)
        sessions = self.live(origin)
        drain = Drain(origin, over, by, len(sessions))
        self.drains[origin] = drain
        drain.task = asyncio.get_running_loop().create_task(self._run(drain, sessions))
        log.info(
            "origin_drain_started", origin=str(origin), sessions=len(sessions), over_s=over, by=by
        )
        return drain

    def undrain(self, origin: Origin, by: str = "admin") -> bool:
        """Admit ``origin`` again; sessions already ended stay ended. True if it was drained."""
        drain = self.drains.pop(origin, None)
        if drain is not None and drain.task is not None:
            drain.task.cancel()
        self.close_idle(origin, False)
        return self.states.undrain(origin, by=by) or drain is not None

    def draining(self, origin: Origin) -> bool:
        return origin in self.drains

    def routes_changed(
        self, old: Iterable[Origin], new: Iterable[Origin], over: float
    ) -> list[Origin]:
        """A reload: drain the origins no route names any more (``by="reload"``), undrain
        those a reload drained that a route names again. Returns the origins drained."""
        kept = set(new)
        gone = [o for o in old if o not in kept]
        for origin in gone:
            self.drain(origin, over, by="reload")
        for origin in kept:
            drain = self.drains.get(origin)
            if drain is not None and drain.by == "reload":
                self.undrain(origin, by="reload")
        return gone

    async def _run(self, drain: Drain, sessions: list[Session]) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        slot = drain.over / len(sessions) if sessions else 0.0
        for offset, session in zip(
            pace(len(sessions), drain.over, self.rng), sessions, strict=True
        ):
            delay = start + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # the schedule itself, not a wait for something
            behind = loop.time() - (start + offset)
            if behind > slot / 2:
                # the loop was held up (a long callback, a stopped process): the rest of
                # the schedule moves back by as much, rather than firing its overdue closes
                # together, which would be the burst the pace exists to avoid
                start += behind
            self._end(drain, session)
        remaining = start + drain.over - loop.time()
        if remaining > 0:
            await asyncio.sleep(remaining)
        late = self.live(drain.origin)  # handshakes under way when the drain began
        for session in late:
            self._end(drain, session)
        if drain.by == "reload" and self.drains.get(drain.origin) is drain:
            del self.drains[drain.origin]
            self.close_idle(drain.origin, False)
            self.states.forget(drain.origin)  # no route names it: out of /origins
        log.info(
            "origin_drain_done",
            origin=str(drain.origin),
            ended=drain.ended,
            late=len(late),
            seconds=round(time.monotonic() - drain.started, 3),
        )

    def _end(self, drain: Drain, session: Session) -> None:
        if session.finished:
            return  # ended on its own meanwhile
        session.end(SERVICE_RESTART, GOING_AWAY, "origin draining")
        drain.ended += 1
        self.states.session_drained(drain.origin)
