"""What a scenario is to the rest of the testbed: a class in a registry.

The command line, the option checks, the intro sentence, the report and the plot used to ask
``if scenario == "storm"`` in 17 places; a new scenario meant touching each. Now each scenario
is one class in one module (``testbed/scenarios/NAME.py``) that says which options it takes,
fills in its defaults, refuses what makes no sense for it, runs, and adds its own rows to the
report; the rest of the testbed reads :data:`REGISTRY` and asks the class.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from testbed.options import Options
    from testbed.scenario_run import ScenarioRun
    from testbed.ui import Ui

REGISTRY: dict[str, type[Scenario]] = {}


def register(cls: type[Scenario]) -> type[Scenario]:
    """Class decorator: the scenario is offered by ``--scenario`` under ``cls.name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"scenario {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def set_default(options: Options, **values: Any) -> None:
    """Each of ``values`` where the user said nothing (the option is still None)."""
    for name, value in values.items():
        if getattr(options, name) is None:
            setattr(options, name, value)


class Scenario:
    """One ``--scenario``. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line: the --help text and the README's list
    order: ClassVar[int] = 100  # place in --help and the --scenario choices
    # the options only some scenarios take (Options field names); any other scenario refuses them
    takes: ClassVar[tuple[str, ...]] = ()
    default_mode: ClassVar[str] = "connectx"  # --mode when not given ("all": every mode)
    port_range: ClassVar[tuple[int, int] | None] = None  # --port-range when not given
    # a dropped session is reconnected (recovery times apply), not only counted
    reconnects: ClassVar[bool] = True
    runner: ClassVar[type[ScenarioRun] | None] = None  # the orchestrator of ``run``

    def __init__(self, options: Options) -> None:
        self.options = options

    def defaults(self) -> None:
        """Fill in what the user did not say (in place)."""

    def check(self, given: set[str]) -> str | None:
        """Nonsense refused before anything starts, naming the option (one sentence), after
        :meth:`defaults`; ``given`` holds the options the user typed."""
        return None

    def intro(self) -> str:
        """What is about to happen, in one sentence, with the resolved defaults."""
        return self.summary

    def run(self, mode: str, ui: Ui, workdir: Path) -> dict[str, Any]:
        """The scenario end to end in its own namespace: ``{"doc": ..., "detail": ...}``."""
        assert self.runner is not None, f"scenario {self.name} has no runner"
        return self.runner(mode, self.options, ui, workdir).run()

    def report_rows(self, detail: dict[str, Any]) -> list[tuple[str, str]]:
        """The scenario's own lines of the summary table, after the shared ones."""
        return []

    def plot(self, doc: dict[str, Any], path: str) -> None:
        """The PNG of ``--plot``: the shared timeline unless the scenario draws more."""
        from testbed import scenario_report

        scenario_report.plot(doc, path)

    def execute(self) -> int:
        """The whole invocation (namespace, live display, figures, JSON, plot): exit code."""
        from testbed.cli import run_scenario

        return run_scenario(self)
