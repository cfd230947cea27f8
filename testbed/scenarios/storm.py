"""``--scenario storm``: a ramp to ``--target`` of the limit, then every origin (or
``--storm-origins N``) SIGKILLed and started again at once while every client reconnects with
jittered exponential backoff: an origin's crash, or a deploy that restarts it blind."""

from __future__ import annotations

from typing import Any

from testbed.kernel_view import established_to
from testbed.scenario_options import check_target, storm_sessions
from testbed.scenario_run import ScenarioRun
from testbed.scenarios.base import Scenario, register, set_default

STORM_TARGET = 0.9
STORM_RATE = 1000.0
STORM_WINDOW = 60.0


class StormRun(ScenarioRun):
    def body(self) -> None:
        opts = self.options
        assert opts.rate is not None and opts.duration is not None
        assert opts.storm_origins is not None
        self.ramp_to_target()
        chosen = opts.origin_addresses()[: opts.storm_origins]
        expected = established_to(set(chosen))
        self.storm_expected = expected
        self.mark("storm", disruption=True)
        drops_before = self.total("drops")
        self.storm_restart_seconds = self.restart_origins(chosen)
        self.storm_settled = self.wait_or_timeout(
            lambda: self.settled(drops_before, expected), opts.duration
        )

    def settled(self, drops_before: int, expected: int) -> bool:
        """Every client has reported since the step began, the expected drops are seen and
        no session waits to reconnect."""
        progressed = all(
            float(s.get("t", 0)) > self.t0 + self.steps[-1].t_start for s in self.state.values()
        )
        return (
            progressed
            and self.total("drops") - drops_before >= expected
            and self.total("pending") == 0
        )


def ramp_check(options: Any, top: float = 1.0) -> str | None:
    """``--target`` and ``--rate`` against ``--duration``: the ramp must fit in it."""
    problem = check_target(options, top)
    if problem:
        return problem
    sessions = storm_sessions(options)
    ramp = sessions / options.rate
    if ramp > options.duration:
        return (
            f"--rate {options.rate:g}/s cannot reach --target {options.target:g} "
            f"({sessions:,} sessions) in --duration {options.duration:g} s "
            f"(it needs {ramp:.0f} s)"
        )
    return None


@register
class Storm(Scenario):
    name = "storm"
    order = 2
    summary = "ramp to --target, restart the origins, every client reconnects with backoff"
    takes = ("target", "storm_origins", "rate", "duration", "tw_reuse")
    runner = StormRun

    def defaults(self) -> None:
        opts = self.options
        set_default(opts, target=STORM_TARGET, rate=STORM_RATE, duration=STORM_WINDOW)
        set_default(opts, storm_origins=opts.origins)

    def check(self, given: set[str]) -> str | None:
        opts = self.options
        assert opts.storm_origins is not None
        problem = check_target(opts, 1.0)
        if problem:
            return problem
        if not 1 <= opts.storm_origins <= opts.origins:
            return f"--storm-origins {opts.storm_origins}: between 1 and --origins {opts.origins}"
        return ramp_check(opts)

    def intro(self) -> str:
        opts = self.options
        assert opts.target is not None and opts.rate is not None and opts.duration is not None
        return (
            f"ramp to {opts.target:g} of the limit ({int(opts.target * opts.limit):,} sessions) "
            f"at {opts.rate:g}/s, then restart {opts.storm_origins} of {opts.origins} origins at "
            f"once; clients reconnect with jittered exponential backoff for up to "
            f"{opts.duration:g} s"
        )

    def report_rows(self, detail: dict[str, Any]) -> list[tuple[str, str]]:
        if detail.get("storm_expected_drops") is None:
            return []
        return [
            *open_rate_rows(detail),
            (
                "storm",
                f"{detail['storm_expected_drops']:,} upstream connections to the restarted "
                f"origins; they listened again after {detail['storm_origin_restart_seconds']:.2f} s"
                + ("" if detail["storm_settled"] else "; not settled within --duration"),
            ),
        ]


def open_rate_rows(detail: dict[str, Any]) -> list[tuple[str, str]]:
    """The peak rate of new sessions each origin saw (its own count, per half second)."""
    peak = detail.get("peak_new_sessions_per_s")
    if not peak:
        return []
    text = ", ".join(f"{origin} {rate:,.0f}/s" for origin, rate in peak.items())
    return [("peak new sessions per origin (0.5 s buckets)", text)]
