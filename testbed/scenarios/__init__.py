"""The scenarios of ``originpool testbed --scenario NAME``, one module and one class each.

Importing this package registers every scenario (:data:`testbed.scenarios.base.REGISTRY`);
the order here is the order of ``--help``:

* ``ramp`` (:mod:`.ramp`): sessions opened one after another until the wall, per egress mode;
* ``churn`` (:mod:`.churn`): sessions come and go at ``--rate``, living ``--lifetime``;
* ``storm`` (:mod:`.storm`): a ramp, then the origins restarted at once; clients reconnect;
* ``faults`` (:mod:`.faults`): reload, egress IP removed and re-added, origin killed, stop;
* ``rotate`` (:mod:`.rotate`): a rolling deploy, one origin drained, restarted and put back
  at a time, while every client reconnects when told.
"""

from testbed.scenarios import churn, faults, ramp, rotate, storm
from testbed.scenarios.base import REGISTRY, Scenario, register

__all__ = ["REGISTRY", "Scenario", "churn", "faults", "ramp", "register", "rotate", "storm"]
