"""Active health checks and passive ejection, per origin, in each worker.

Each worker checks the origins its routes name on its own (HAProxy checks once per
process; nginx Plus once per worker group through shared memory). The alternative, worker
0 checking and the others learning through the admin fan-out, would make every worker's
routing depend on worker 0 and on a loopback scrape being answered, and passive ejection
(what one worker's traffic saw) would still be per worker. So the verdict is each
worker's own, from its own checks through its own egress slice: an origin sees ``workers``
checks per ``interval``, spread evenly over it (worker i starts ``i / workers`` of an
interval late, and each interval is jittered by +-10% so the workers do not fall into
step), and a worker finds an origin down after ``fall x interval``, as configured, not
``workers`` times that.

The counting is :mod:`pool.health_state`'s; one check's I/O is :mod:`proxy.health_probe`'s.
This module schedules the checks, keeps the verdicts and tells the worker's origin states
(:class:`pool.origin_state.OriginStates`: ``mark_down``/``mark_up``, which log the one
``origin_state`` line per change and make routing skip a down origin; a health change that
does not change the state, because the origin is also draining, gets one ``origin_health``
line instead). ``GET /origins`` shows the last check (``record_check``).

Passive ejection: the data path calls :func:`report` with what real traffic saw (a
connect failure or a 5xx: False; any other answer: True).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog

from pool.health_state import HealthCheck, OriginHealth, Transition
from pool.metrics import Sample
from pool.origin import Origin, OriginPool
from pool.origin_state import OriginStates
from proxy.health_probe import RESULTS, CheckResult, probe

log = structlog.get_logger("originpool.health")

JITTER = 0.1  # each interval is interval x (1 +- JITTER)

HELP = {
    "originpool_origin_up": (
        "1 while the origin passes its health checks (or has none), by route and origin; "
        "one sample per worker."
    ),
    "originpool_health_checks_total": (
        "Active health checks done, by origin and result (pass, connect, timeout, status, "
        "protocol, no_port, error)."
    ),
    "originpool_passive_failures_total": (
        "Connect failures and 5xx answers seen by traffic, by origin (passive ejection's input)."
    ),
}


@dataclass
class _Watched:
    """One checked origin: its verdict and the task that checks it."""

    health: OriginHealth
    task: asyncio.Task[None] | None = None


class HealthChecker:
    """The worker's checks. ``pool`` is asked for the worker's current pool at every check
    (a reload may replace it); ``states`` is told every change of verdict."""

    def __init__(
        self,
        pool: Callable[[], OriginPool],
        states: OriginStates,
        worker: int = 0,
        workers: int = 1,
        rng: random.Random | None = None,
    ) -> None:
        self._pool = pool
        self.states = states
        self.worker = worker
        self.workers = max(1, workers)
        self._rng = rng or random.Random()
        self._watched: dict[Origin, _Watched] = {}
        self._ssl: tuple[OriginPool, ssl.SSLContext] | None = None
        self.checks: dict[tuple[Origin, str], int] = {}
        self.passive_failures: dict[Origin, int] = {}
        # origins with a passive count above 0: the only ones a success must reach (reset),
        # so the common report, a success, costs a set look-up (see report())
        self.failing: set[Origin] = set()
        self.closed = False

    # -- configuration -----------------------------------------------------------------------

    def configure(self, checks: Mapping[Origin, HealthCheck]) -> None:
        """The origins to check and how (at start and on every reload; needs a running loop).

        An origin that stays keeps its verdict (down before SIGHUP is down after) and only
        takes the new thresholds; one no longer checked is marked up, so a check removed
        from the config cannot leave an origin ejected forever."""
        for origin in [o for o in self._watched if o not in checks]:
            watched = self._watched.pop(origin)
            self.failing.discard(origin)
            if watched.task is not None:
                watched.task.cancel()
            if not watched.health.up:
                self.states.mark_up(origin, by="health", reason="health check removed")
        for origin, spec in checks.items():
            known = self._watched.get(origin)
            if known is None:
                fresh = self._watched[origin] = _Watched(OriginHealth(spec))
                fresh.task = asyncio.get_running_loop().create_task(self._run(origin))
            elif known.health.spec != spec:
                known.health.renew(spec)

    async def close(self) -> None:
        self.closed = True
        tasks = [w.task for w in self._watched.values() if w.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- what the data path asks and tells -----------------------------------------------------

    def up(self, origin: Origin) -> bool:
        """This worker's verdict; an origin without a check is up."""
        watched = self._watched.get(origin)
        return watched is None or watched.health.up

    def report(self, origin: Origin, ok: bool, detail: str | int = "") -> None:
        """What real traffic saw (passive ejection): cheap when the origin has no check.
        ``detail``: what failed, or the response's status (made text only when it counts)."""
        watched = self._watched.get(origin)
        if watched is None:
            return
        if isinstance(detail, int):
            detail = f"HTTP {detail}"
        if not ok:
            self.passive_failures[origin] = self.passive_failures.get(origin, 0) + 1
        change = watched.health.report(ok, detail)
        if watched.health.passive:
            self.failing.add(origin)
        else:
            self.failing.discard(origin)
        if change is not None:
            self._changed(origin, change, None)

    # -- the checks ----------------------------------------------------------------------------

    async def _run(self, origin: Origin) -> None:
        """Check ``origin`` until cancelled: the first one at this worker's phase of the
        interval, then every interval +-10%. The wait is a schedule, not a synchronisation."""
        watched = self._watched[origin]
        phase = (self.worker % self.workers) / self.workers
        delay = watched.health.spec.interval * phase
        while not self.closed:
            await asyncio.sleep(delay)
            spec = watched.health.spec  # a reload may have changed it
            result = await probe(self._pool(), origin, spec, self._context(origin))
            if self._watched.get(origin) is not watched:
                return  # removed by a reload while the check ran
            self.observe(origin, result)
            delay = spec.interval * (1 + self._rng.uniform(-JITTER, JITTER))

    def observe(self, origin: Origin, result: CheckResult) -> None:
        """One check's result: counted, shown in ``GET /origins``, fed to the rise/fall rules
        (``no_port`` is not: a full egress says nothing about the origin)."""
        watched = self._watched.get(origin)
        if watched is None:
            return
        key = (origin, result.result)
        self.checks[key] = self.checks.get(key, 0) + 1
        self.states.record_check(origin, _as_json(result))
        if not result.counts:
            return
        change = watched.health.check(result.ok, result.detail)
        if change is not None:
            self._changed(origin, change, result)

    def _context(self, origin: Origin) -> ssl.SSLContext | None:
        """The pool's upstream TLS settings (verification, CA file), one context per pool."""
        if not origin.tls:
            return None
        pool = self._pool()
        if self._ssl is None or self._ssl[0] is not pool:
            self._ssl = (pool, pool.tls.context())
        return self._ssl[1]

    def _changed(self, origin: Origin, change: Transition, result: CheckResult | None) -> None:
        by = "passive" if change.cause == "passive" else "health"
        if change.up:
            reason = f"{change.count} checks passed: {change.detail}"
        elif change.cause == "passive":
            reason = f"{change.count} failures seen by traffic, last: {change.detail}"
        else:
            what = "check failed" if change.count == 1 else "checks failed"
            reason = f"{change.count} {what}: {change.detail}"
        if result is not None and result.four_tuple:
            reason += f" ({result.four_tuple})"
        if change.up:
            changed = self.states.mark_up(origin, by="health", reason=reason)
        else:
            changed = self.states.mark_down(origin, reason, by=by)
        if not changed:  # the state shown did not move (the origin is draining): still said
            log.info(
                "origin_health",
                origin=str(origin),
                up=change.up,
                by=by,
                reason=reason,
                state=self.states.state(origin).value,
            )

    # -- views ---------------------------------------------------------------------------------

    def samples(self, routes: Iterable[tuple[str, Iterable[Origin]]]) -> list[Sample]:
        """``originpool_origin_up`` per (route, origin) of ``routes``, the check counts."""
        out = [
            Sample("originpool_origin_up", (("route", name), ("origin", str(o))), int(self.up(o)))
            for name, origins in routes
            for o in origins
        ]
        for origin in self._watched:
            for result in RESULTS:
                n = self.checks.get((origin, result), 0)
                labels = (("origin", str(origin)), ("result", result))
                out.append(Sample("originpool_health_checks_total", labels, n, True))
        for origin, n in sorted(self.passive_failures.items(), key=lambda kv: str(kv[0])):
            out.append(
                Sample("originpool_passive_failures_total", (("origin", str(origin)),), n, True)
            )
        return out


def _as_json(result: CheckResult) -> dict[str, object]:
    return {
        "ok": result.ok,
        "result": result.result,
        "detail": result.detail,
        "status": result.status,
        "at": round(result.at, 3),
        "seconds": round(result.seconds, 6),
        "egress": result.egress,
        "four_tuple": result.four_tuple,
    }


# the worker's checker, for the data path's passive reports: one per process (see install)
_current: HealthChecker | None = None


def install(checker: HealthChecker | None) -> None:
    """Make ``checker`` the one :func:`report` feeds (a worker process has one)."""
    global _current
    _current = checker


def report(origin: Origin, ok: bool, detail: str | int = "") -> None:
    """Passive ejection's input from the data path: ``ok`` False for a connect failure or a
    5xx from ``origin``. Nothing to do (one global read) when no checker is installed."""
    checker = _current
    if checker is None or (ok and (not checker.failing or origin not in checker.failing)):
        return  # the common case, a success with nothing to reset: no hash of the origin
    checker.report(origin, ok, detail)
