"""``originpool testbed``: the WebSocket-origin scenario the project exists for, end to end.

An edge proxy carrying many long-lived WebSocket sessions runs out of ephemeral ports long
before the physical limit (egress IPs x port range x destinations). The testbed reproduces
that on one machine, in a network namespace of its own, and measures how close a proxy gets:

* :mod:`testbed.wsorigin`: the WebSocket echo origin (asyncio Protocols + wsproto);
* :mod:`testbed.wsclient`: the load client, one process per shard, JSON lines out;
* :mod:`testbed.cli`: the command line: options, their checks, which scenario runs;
* :mod:`testbed.options`: one invocation's settings, addresses and generated config;
* :mod:`testbed.ui`: the live display for people, JSON lines for tools;
* :mod:`testbed.kernel_view`: socket states and CPU as the kernel reports them;
* :mod:`testbed.run`: the ramp's orchestrator (namespace, processes, sampling);
* :mod:`testbed.report`: what the ramp's figures mean (bands, tables, JSON, plot);
* :mod:`testbed.scenarios`, :mod:`testbed.faults`: churn and storm, and faults,
  with :mod:`testbed.scenario_options` (their defaults and refusals),
  :mod:`testbed.wsload` (their load client's process), :mod:`testbed.scenario_client`
  (its sessions, modes and accounting) and
  :mod:`testbed.scenario_report` (their steps, table, JSON and plot).

Origin and client are separate processes so they never share a core's event loop with the
proxy they measure, and so big runs can shard them under the per-process open-file cap.
"""
