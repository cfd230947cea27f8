"""``--scenario ramp`` (the default): sessions opened one after another until the wall, once
per egress mode. Its orchestrator is :mod:`testbed.run`, older than the scenario frame and
with figures of its own (the bands, per egress IP, the records)."""

from __future__ import annotations

from typing import ClassVar

from testbed.scenarios.base import Scenario, register


@register
class Ramp(Scenario):
    name = "ramp"
    order = 0
    summary = "sessions opened one after another until the wall, once per egress mode"
    takes = ("sessions", "hold", "concurrency", "records_path")
    default_mode: ClassVar[str] = "all"
    reconnects: ClassVar[bool] = False

    def execute(self) -> int:
        from testbed.run import run

        return run(self.options)
