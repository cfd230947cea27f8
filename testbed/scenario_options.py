"""The options every scenario shares: which belong to which, their flags, and the checks
made before anything starts.

Its own module because the command line needs all of it (the ``--scenario`` choices, which
options apply to which scenario, the refusals) long before a namespace or a process exists.
What is one scenario's own (its defaults, its refusals) lives in its class
(:mod:`testbed.scenarios`); this module only asks the registry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from testbed.options import Options, storm_sessions

if TYPE_CHECKING:
    from testbed.scenarios.base import Scenario

# the scenario modules import this one (check_target, flag): the registry is imported late
__all__ = ["FLAG", "check_target", "flag", "only_for", "resolve", "scenarios", "storm_sessions"]

NOT_BUILT = "not built yet (see testbed/scenarios/ and docs/testbed)"
TW_REUSE = 0

FLAG = {
    "records_path": "--records",
    "storm_origins": "--storm-origins",
    "tw_reuse": "--tw-reuse",
    "reload_signal": "--reload-signal",
    "stop_signal": "--stop-signal",
    "reload_hold": "--reload-hold",
    "drain_over": "--drain-over",
}


def scenarios() -> dict[str, type[Scenario]]:
    """Every registered scenario, by name (importing the package registers them)."""
    import testbed.scenarios  # noqa: F401
    from testbed.scenarios.base import REGISTRY

    return dict(sorted(REGISTRY.items(), key=lambda kv: kv[1].order))


def only_for() -> dict[str, tuple[str, ...]]:
    """Option -> the scenarios that take it: given with another, it is refused."""
    out: dict[str, list[str]] = {}
    for name, cls in scenarios().items():
        for option in cls.takes:
            out.setdefault(option, []).append(name)
    return {option: tuple(names) for option, names in out.items()}


def flag(name: str) -> str:
    return FLAG.get(name, "--" + name.replace("_", "-"))


def scenario_of(options: Options) -> Scenario:
    return scenarios()[options.scenario](options)


def resolve(options: Options) -> None:
    """Per-scenario defaults for what the user did not say (in place)."""
    from testbed.scenarios.base import set_default

    scenario = scenario_of(options)
    scenario.defaults()
    if "tw_reuse" in scenario.takes:
        set_default(options, tw_reuse=TW_REUSE)


def validate(options: Options, given: set[str]) -> str | None:
    """Nonsense refused before anything starts, naming the option (one sentence)."""
    name = options.scenario
    for option, names in only_for().items():
        if option in given and name not in names:
            return f"{flag(option)} does not apply to --scenario {name} (only {'/'.join(names)})"
    scenario = scenario_of(options)
    if scenario.default_mode != "all" and len(options.modes) != 1:
        return f"--mode: --scenario {name} runs one egress mode (plain, bind or connectx)"
    resolve(options)
    if scenario.default_mode != "all":
        assert options.rate is not None and options.duration is not None
        if not options.rate > 0 or not options.duration > 0:
            return "--rate and --duration must be positive"
    return scenario.check(given)


def check_target(options: Options, top: float, why: str = "") -> str | None:
    """``--target`` is a share of the limit in (0, top] and at least one session."""
    assert options.target is not None
    if not 0 < options.target <= top:
        return (
            f"--target {options.target:g}: a share of the physical limit "
            f"{options.limit:,}, more than 0 and at most {top:g}{why}"
        )
    if storm_sessions(options) < 1:
        return f"--target {options.target:g} of {options.limit:,} is not one session"
    return None
