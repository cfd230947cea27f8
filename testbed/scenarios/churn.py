"""``--scenario churn``: sessions arrive at ``--rate`` (Poisson) and live an exponential time
of mean ``--lifetime``: what TIME_WAIT on the proxy's egress ports costs when sessions come
and go. Dropped sessions are lost, not reconnected (a churning client would not notice)."""

from __future__ import annotations

from typing import ClassVar

from testbed.options import SESSIONS_PER_PROCESS
from testbed.scenario_run import ScenarioRun
from testbed.scenarios.base import Scenario, register, set_default

CHURN_LIFETIME = 30.0
CHURN_DURATION = 120.0
CHURN_MIX = (1 / 3, 1 / 3, 1 / 3)  # close : fin : rst, as shares


class ChurnRun(ScenarioRun):
    client_load: ClassVar[str] = "churn"

    def peak_sessions(self) -> int:
        opts = self.options
        assert opts.rate is not None and opts.lifetime is not None
        return int(min(opts.rate * opts.lifetime * 1.3, opts.limit * 1.3)) + 1

    def client_sessions(self) -> int:
        return 0  # open-ended: arrivals for --duration

    def client_args(self) -> list[str]:
        opts = self.options
        assert opts.mix is not None
        return ["--lifetime", str(opts.lifetime), "--mix", ":".join(map(str, opts.mix))]

    def live_estimate(self) -> int:
        opts = self.options
        assert opts.rate is not None and opts.lifetime is not None
        return int(opts.rate * opts.lifetime * 1.3) + 1  # the steady state, not the limit

    def body(self) -> None:
        opts = self.options
        assert opts.duration is not None
        self.mark("churn")
        for client in self.clients:
            client.send("start")
        self.wait(
            lambda: len(self.done_events) == len(self.clients),
            opts.duration + 3 * opts.timeout + 60,
            "every client's load_done",
        )


@register
class Churn(Scenario):
    name = "churn"
    order = 1
    summary = "sessions arrive at --rate and live --lifetime on average (Little's law)"
    takes = ("lifetime", "mix", "rate", "duration", "tw_reuse")
    reconnects: ClassVar[bool] = True
    runner = ChurnRun

    def defaults(self) -> None:
        opts = self.options
        set_default(opts, lifetime=CHURN_LIFETIME)
        if opts.rate is None:
            assert opts.lifetime is not None
            # steady state rate x lifetime = the limit (Little's law): churn at the wall
            opts.rate = round(opts.limit / opts.lifetime, 3)
        set_default(opts, duration=CHURN_DURATION, mix=CHURN_MIX)

    def check(self, given: set[str]) -> str | None:
        opts = self.options
        assert opts.lifetime is not None and opts.rate is not None
        assert opts.duration is not None
        if opts.duration < 2 * opts.lifetime:
            return (
                f"--duration {opts.duration:g} is shorter than 2 x --lifetime "
                f"{opts.lifetime:g}: churn would end before it came near its steady state"
            )
        if opts.rate * opts.duration > 2_000_000:
            return "--rate x --duration: at most 2,000,000 sessions per run"
        if opts.rate * opts.lifetime > 256 * SESSIONS_PER_PROCESS:
            return "--rate x --lifetime: more live sessions than 256 client processes hold"
        return None

    def intro(self) -> str:
        opts = self.options
        assert opts.rate is not None and opts.lifetime is not None and opts.mix is not None
        assert opts.duration is not None
        mix = " / ".join(f"{100 * m:.0f}%" for m in opts.mix)
        return (
            f"{opts.rate:g} sessions/s for {opts.duration:g} s, each living {opts.lifetime:g} s "
            f"on average (steady state {opts.rate * opts.lifetime:,.0f} = "
            f"{100 * opts.rate * opts.lifetime / opts.limit:.0f}% of the limit); client closes "
            f"Close / FIN / RST {mix}; tcp_tw_reuse {opts.tw_reuse} in the namespace"
        )
