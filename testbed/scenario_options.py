"""Which scenarios there are, their defaults, and the option combinations refused before
anything starts.

Its own module because the command line needs all of it (the ``--scenario`` choices, which
options apply to which scenario, the refusals) long before a namespace or a process exists,
and none of it depends on how a scenario runs.
"""

from __future__ import annotations

from typing import Any

from proxy.testbed.options import SESSIONS_PER_PROCESS, Options

# name -> what it does (None: not built yet; the CLI refuses it with that sentence)
SCENARIOS: dict[str, str | None] = {
    "ramp": "sessions opened one after another until the wall, once per egress mode",
    "churn": "sessions arrive at --rate and live --lifetime on average (Little's law)",
    "storm": "ramp to --target, restart the origins, every client reconnects with backoff",
    "faults": "with sessions held: reload, egress IP removed and re-added, origin killed, stop",
}
NOT_BUILT = "not built yet (registered in proxy/testbed/scenario_options.py; see docs/testbed)"

CHURN_LIFETIME = 30.0
CHURN_DURATION = 120.0
CHURN_MIX = (1 / 3, 1 / 3, 1 / 3)  # close : fin : rst, as shares
STORM_TARGET = 0.9
STORM_RATE = 1000.0
STORM_WINDOW = 60.0
TW_REUSE = 0


def _default(options: Options, **values: Any) -> None:
    """Each of ``values`` where the user said nothing (the option is still None)."""
    for name, value in values.items():
        if getattr(options, name) is None:
            setattr(options, name, value)


def resolve(options: Options) -> None:
    """Per-scenario defaults for what the user did not say (in place)."""
    if options.scenario == "churn":
        _default(options, lifetime=CHURN_LIFETIME)
        if options.rate is None:
            # steady state rate x lifetime = the limit (Little's law): churn at the wall
            options.rate = round(options.limit / options.lifetime, 3)
        _default(options, duration=CHURN_DURATION, mix=CHURN_MIX)
    elif options.scenario == "faults":
        from proxy.testbed.faults import FAULTS_RATE, FAULTS_TARGET, RELOAD_HOLD

        # duration: the clients' give-up, no reconnects here
        _default(options, target=FAULTS_TARGET, rate=FAULTS_RATE, duration=STORM_WINDOW)
        if options.proxy_cmd:
            _default(options, stop_signal="TERM")
        _default(options, reload_hold=RELOAD_HOLD)
    elif options.scenario == "storm":
        _default(options, target=STORM_TARGET, rate=STORM_RATE, duration=STORM_WINDOW)
        _default(options, storm_origins=options.origins)
    if options.scenario != "ramp":
        _default(options, tw_reuse=TW_REUSE)


# options that belong to one scenario only: given with another, they are refused
ONLY_FOR = {
    "sessions": ("ramp",),
    "hold": ("ramp",),
    "concurrency": ("ramp",),
    "records_path": ("ramp",),
    "lifetime": ("churn",),
    "mix": ("churn",),
    "target": ("storm", "faults"),
    "storm_origins": ("storm",),
    "rate": ("churn", "storm", "faults"),
    "reload_signal": ("faults",),
    "stop_signal": ("faults",),
    "reload_hold": ("faults",),
    "duration": ("churn", "storm"),
    "tw_reuse": ("churn", "storm", "faults"),
}
FLAG = {
    "records_path": "--records",
    "storm_origins": "--storm-origins",
    "tw_reuse": "--tw-reuse",
    "reload_signal": "--reload-signal",
    "stop_signal": "--stop-signal",
    "reload_hold": "--reload-hold",
}


def flag(name: str) -> str:
    return FLAG.get(name, "--" + name.replace("_", "-"))


def validate(options: Options, given: set[str]) -> str | None:
    """Nonsense refused before anything starts, naming the option (one sentence)."""
    name = options.scenario
    for option, scenarios in ONLY_FOR.items():
        if option in given and name not in scenarios:
            only = "/".join(scenarios)
            return f"{flag(option)} does not apply to --scenario {name} (only {only})"
    if name == "faults":
        if options.egress < 2:
            return "--scenario faults needs --egress 2 or more: it removes one egress IP"
        if options.origins < 2:
            return "--scenario faults needs --origins 2 or more: it kills one origin"
        for option in ("reload_signal", "stop_signal", "reload_hold"):
            if option in given and not options.proxy_cmd:
                return (
                    f"{flag(option)} applies to --proxy-cmd only (originpool reloads on SIGHUP "
                    "and drains on SIGTERM)"
                )
        from proxy.testbed.faults import signal_number

        for option in ("reload_signal", "stop_signal"):
            value = getattr(options, option)
            if value is not None:
                try:
                    signal_number(value)
                except ValueError as e:
                    return f"{flag(option)}: {e}"
    if name == "ramp":
        return None
    if len(options.modes) != 1:
        return f"--mode: --scenario {name} runs one egress mode (plain, bind or connectx)"
    resolve(options)
    assert options.rate is not None and options.duration is not None
    if not options.rate > 0 or not options.duration > 0:
        return "--rate and --duration must be positive"
    if name == "churn":
        assert options.lifetime is not None
        if options.duration < 2 * options.lifetime:
            return (
                f"--duration {options.duration:g} is shorter than 2 x --lifetime "
                f"{options.lifetime:g}: churn would end before it came near its steady state"
            )
        if options.rate * options.duration > 2_000_000:
            return "--rate x --duration: at most 2,000,000 sessions per run"
        if options.rate * options.lifetime > 256 * SESSIONS_PER_PROCESS:
            return "--rate x --lifetime: more live sessions than 256 client processes hold"
    if name == "faults":
        assert options.target is not None
        if not 0 < options.target <= 0.8:
            return (
                f"--target {options.target:g}: a share of the physical limit "
                f"{options.limit:,}, more than 0 and at most 0.8 (the steps open new sessions)"
            )
        if storm_sessions(options) < 1:
            return f"--target {options.target:g} of {options.limit:,} is not one session"
    if name == "storm":
        assert options.target is not None and options.storm_origins is not None
        if not 0 < options.target <= 1:
            return (
                f"--target {options.target:g}: a share of the physical limit "
                f"{options.limit:,}, more than 0 and at most 1"
            )
        if not 1 <= options.storm_origins <= options.origins:
            return (
                f"--storm-origins {options.storm_origins}: between 1 and --origins "
                f"{options.origins}"
            )
        sessions = storm_sessions(options)
        if sessions < 1:
            return f"--target {options.target:g} of {options.limit:,} is not one session"
        ramp = sessions / options.rate
        if ramp > options.duration:
            return (
                f"--rate {options.rate:g}/s cannot reach --target {options.target:g} "
                f"({sessions:,} sessions) in --duration {options.duration:g} s "
                f"(it needs {ramp:.0f} s)"
            )
    return None


def storm_sessions(options: Options) -> int:
    assert options.target is not None
    return int(options.target * options.limit)
