"""Whether an origin is healthy: the rise/fall counting of active checks and the passive
ejection count, as a pure state machine per origin (no I/O, no clock, no logging).

Apart from the checker (:mod:`proxy.health`), which needs sockets, h11 and the event loop,
so that the rules operators tune (HAProxy's ``rise``/``fall``, nginx Plus's
``passes``/``fails``) can be tested exhaustively without any of those, and so that the
pool layer can hold the verdict without importing anything above it.

The rules, as HAProxy's ``check inter rise fall`` with its default ``init-state up``:

- An origin starts **up, unconfirmed**: it takes traffic at once (a proxy that refused
  everything until ``rise`` checks passed would fail a restart), but its first failed check
  takes it down, so a dead origin does not get ``fall x interval`` of traffic after a start.
- Once a check has passed it is **confirmed up**: ``fall`` consecutive failed checks take it
  down. A passed check resets the failure count.
- **Down**: ``rise`` consecutive passed checks bring it up (confirmed). A failed check
  resets the count.
- **Passive**: with ``passive_fails = N > 0``, N consecutive failures seen by real traffic
  (a connect failure or a 5xx) take an up origin down; only active checks bring it back.
  A success seen by real traffic resets the count. Reports about a down origin are ignored:
  what is still in flight there says nothing new.

Each observation returns the :class:`Transition` it caused, or None: the caller logs one
line per transition and tells the routing layer, never more than once per change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CheckType = Literal["http", "tcp"]
CHECK_TYPES: tuple[CheckType, ...] = ("http", "tcp")
Cause = Literal["check", "passive"]


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """One origin's check, from ``[routes.health_check]`` or an origin's ``health_check``.

    Defaults are HAProxy's (``inter 2s rise 2 fall 3``; 2xx and 3xx pass, as both HAProxy's
    ``option httpchk`` and nginx Plus's ``health_check`` accept). ``host`` None sends the
    origin's own name as Host. ``passive_fails`` 0 turns passive ejection off.
    """

    type: CheckType = "tcp"
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    method: str = "GET"
    path: str = "/"
    expect_status: tuple[int, int] = (200, 399)
    host: str | None = None
    passive_fails: int = 0

    def expects(self, status: int) -> bool:
        return self.expect_status[0] <= status <= self.expect_status[1]


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of verdict: ``up`` is the new one; ``cause`` what decided it; ``detail`` the
    observation that tipped it (the failed check's reason, the last 5xx)."""

    up: bool
    cause: Cause
    detail: str
    count: int  # the consecutive observations that made it (rise, fall or passive_fails)


class OriginHealth:
    """The verdict on one origin and the counts that lead to the next one."""

    __slots__ = ("confirmed", "failures", "passive", "spec", "successes", "up")

    def __init__(self, spec: HealthCheck) -> None:
        self.spec = spec
        self.up = True
        self.confirmed = False  # no check has passed yet: one failure is enough
        self.successes = 0  # consecutive passed checks (counted while down)
        self.failures = 0  # consecutive failed checks (counted while up)
        self.passive = 0  # consecutive failures seen by traffic (while up)

    def check(self, ok: bool, detail: str = "") -> Transition | None:
        """One active check's outcome."""
        if ok:
            self.failures = 0
            if self.up:
                self.confirmed = True
                return None
            self.successes += 1
            if self.successes < self.spec.rise:
                return None
            return self._set(True, "check", detail or "check passed", self.successes)
        self.successes = 0
        if not self.up:
            return None
        self.failures += 1
        need = self.spec.fall if self.confirmed else 1
        if self.failures < need:
            return None
        return self._set(False, "check", detail or "check failed", self.failures)

    def report(self, ok: bool, detail: str = "") -> Transition | None:
        """What real traffic saw: ``ok`` False for a connect failure or a 5xx."""
        if not self.up or not self.spec.passive_fails:
            return None
        if ok:
            self.passive = 0
            return None
        self.passive += 1
        if self.passive < self.spec.passive_fails:
            return None
        return self._set(False, "passive", detail or "failures seen by traffic", self.passive)

    def _set(self, up: bool, cause: Cause, detail: str, count: int) -> Transition:
        self.up = up
        self.confirmed = up
        self.successes = self.failures = self.passive = 0
        return Transition(up, cause, detail, count)

    def renew(self, spec: HealthCheck) -> None:
        """A reload's spec: the verdict stays (an origin down before SIGHUP is down after),
        the counts restart under the new thresholds."""
        self.spec = spec
        self.successes = self.failures = self.passive = 0
