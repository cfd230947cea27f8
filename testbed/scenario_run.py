"""``originpool testbed --scenario NAME``: the same namespace, proxy and origins, other loads.

* ``ramp`` (the default, :mod:`testbed.run`): sessions opened one after another until
  the wall, once per egress mode.
* ``churn``: sessions arrive at ``--rate`` and live an exponential time of mean
  ``--lifetime``: what TIME_WAIT on the proxy's egress ports costs when sessions come and go.
* ``storm``: a ramp to ``--target`` of the limit, then every origin (or ``--storm-origins
  N``) restarted at once while every client reconnects with jittered backoff.
* ``faults`` (:mod:`testbed.faults`): with sessions held, a reload with a route added,
  an egress IP removed and re-added, an origin killed, the proxy stopped.

Why it is built this way:

* **One orchestrator loop for every scenario** (:meth:`ScenarioRun.wait`): it reads every
  child's lines, takes one timeline sample a second and checks that the children it needs are
  alive. A scenario is then a short list of steps (``body``) with the clients' own log lines
  as the synchronisation; nothing waits on a sleep.
* **Steps are acknowledged by every client before anything happens**: ``step NAME`` goes to
  every shard and the disruption (an origin restart) starts only once each has answered, so
  every failure and drop is counted in the step that caused it.
* **The timeline reads the kernel, not the proxy**: TIME_WAIT and the other non-established
  states of the sockets towards the origins come from ``NETLINK_SOCK_DIAG`` (as ``originpool
  ports`` reads them), so any proxy under ``--proxy-cmd`` is measured the same way, and the
  origin's side of the same connections is counted too: who closed first is whose 4-tuple sits
  in TIME_WAIT, and that is measured, not assumed.
* **TIME_WAIT reuse is off in the namespace by default** (``--tw-reuse 0``): the kernel's
  default (2) reuses TIME_WAIT 4-tuples only for loopback traffic, and every address of the
  testbed is loopback, so without this the testbed would hide what churn costs on real egress
  IPs. The setting is the namespace's own; the host's sysctls are never written.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from testbed import procs, scenario_report
from testbed.kernel_view import (
    KernelSample,
    cpu_seconds,
    kernel_sample,
    vars_of,
)
from testbed.options import (
    CLIENT_SOURCES_PER_SHARD,
    LISTEN,
    ROUTE_HOST,
    SESSIONS_PER_PROCESS,
    client_port_window,
    storm_sessions,
)
from testbed.procs import Child, ChildFailed, Space
from testbed.run import ModeRun
from testbed.wsorigin import OPENS_BUCKET

SAMPLE_EVERY = 1.0


# -- one scenario ----------------------------------------------------------------------------


@dataclass
class StepRecord:
    name: str
    t_start: float
    sessions_before: int
    t_end: float | None = None
    sessions_after: int | None = None
    disruption: bool = False  # recovery times apply


class ScenarioRun(ModeRun):
    """One scenario from namespace to figures; ``body`` is the scenario itself."""

    client_load: ClassVar[str] = "reconnect"  # what the clients do (testbed.wsload LOADS)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.t0 = time.monotonic()
        self.state: dict[Child, dict[str, Any]] = {}
        self.acks: dict[str, dict[Child, dict[str, Any]]] = {}
        self.results: dict[Child, dict[str, Any]] = {}
        self.origin_groups: dict[tuple[str, int], list[Child]] = {}
        self.restarting: set[Child] = set()
        self.steps: list[StepRecord] = []
        self.timeline: list[dict[str, Any]] = []
        self.kernel: list[KernelSample] = []
        self.next_sample = 0.0
        self.sampling = False  # the timeline starts once every client is there
        self.last_failures: Counter[str] = Counter()
        self.peak_rss = 0
        self.cpu = 0.0
        self.done_events: dict[Child, dict[str, Any]] = {}
        self.origin_address: dict[Child, tuple[str, int]] = {}
        self.storm_expected: int | None = None
        self.storm_restart_seconds: float | None = None
        self.storm_settled: bool | None = None
        # origin "host:port" -> new sessions per half-second bucket of the monotonic clock
        self.origin_opens: dict[str, Counter[int]] = {}

    # -- the frame every scenario shares ------------------------------------------------------

    def run(self) -> dict[str, Any]:
        opts = self.options
        space = Space(f"originpool-testbed-{os.getpid()}-{opts.scenario}")
        try:
            space.enter(opts.port_range)
            space.sysctl("net.ipv4.tcp_tw_reuse", str(opts.tw_reuse))
            self.prepare(space)
            self.ui.event("namespace", mode=opts.scenario, name=space.name)
            self.start_origins()
            self.start_proxy()
            assert self.proxy is not None
            self.start_clients()
            self.ui.event(
                "pids",
                mode=opts.scenario,
                proxy=self.proxy.pid,
                origins=[c.pid for c in self.origins],
                clients=[c.pid for c in self.clients],
            )
            self.wait(
                lambda: all(c in self.state for c in self.clients), 30, "every client started"
            )
            self.t0 = time.monotonic()  # the timeline starts with the load
            self.next_sample = self.t0
            self.timeline.clear()
            self.kernel.clear()
            self.last_failures = Counter()
            self.sampling = True
            self.ui.scenario_start(opts)
            self.body()
            self.mark("end")
            self.sample(force=True)
            for client in self.clients:
                client.send("check")
            wait = opts.timeout * 3 + 60
            self.wait(lambda: len(self.results) == len(self.clients), wait, "every result")
            self.sample(force=True)
            for client in self.clients:
                client.send("close")
        finally:
            self.ui.scenario_end()
            self.children.end_all()
            space.leave()
        return self.figures()

    def prepare(self, space: Space) -> None:
        """The namespace before any process starts: nothing more for churn and storm."""

    def wait(self, until: Callable[[], bool], timeout: float, what: str) -> bool:
        """Read lines, sample the timeline and watch the children until ``until()`` holds;
        raises after ``timeout`` seconds (the scenario cannot go on without it)."""
        if not self.wait_or_timeout(until, timeout):
            raise ChildFailed(f"{what}: not within {timeout:g} s")
        return True

    def wait_or_timeout(self, until: Callable[[], bool], timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not until():
            now = time.monotonic()
            if now >= end:
                return False
            pause = min(end - now, max(0.0, self.next_sample - now), 0.25)
            for who, line in self.children.pump(pause):
                self.on_line(who, line)
                self.on_client(who, line)
                self.on_origin(who, line)
            self.sample()
            self.check_alive()
        return True

    def on_client(self, who: Child, line: dict[str, Any]) -> None:
        if who not in self.clients:
            return
        event = line.get("event")
        counted = ("progress", "step", "load_done", "ramp_done", "settled")
        if event in counted or (event == "started" and who not in self.state):
            self.state[who] = line
        if event == "step":
            self.acks.setdefault(str(line.get("name")), {})[who] = line
        elif event in ("load_done", "ramp_done"):
            self.done_events[who] = line
        elif event == "result":
            self.results[who] = line
            self.state[who] = line

    def on_origin(self, who: Child, line: dict[str, Any]) -> None:
        """An origin's new sessions per half second (``opens``), added up per address."""
        if line.get("event") != "opens" or who not in self.origin_address:
            return
        host, port = self.origin_address[who]
        buckets = self.origin_opens.setdefault(f"{host}:{port}", Counter())
        for index, n in (line.get("buckets") or {}).items():
            buckets[int(index)] += int(n)

    def peak_open_rate(self, t_start: float, t_end: float | None) -> dict[str, float]:
        """Per origin, the most new sessions it saw in one half second between two moments
        of the timeline (seconds since ``t0``), as a rate per second."""
        # a bucket belongs to the step it starts in (the one the step starts in is mostly
        # the previous step's: a ramp's last sessions are not a drain's)
        lo = math.ceil((self.t0 + t_start) / OPENS_BUCKET)
        hi = math.inf if t_end is None else (self.t0 + t_end) / OPENS_BUCKET
        out: dict[str, float] = {}
        for origin, buckets in sorted(self.origin_opens.items()):
            inside = [n for k, n in buckets.items() if lo <= k < hi]
            out[origin] = max(inside, default=0) / OPENS_BUCKET
        return out

    def check_alive(self) -> None:
        for child in [self.proxy, *self.origins, *self.clients]:
            if child is None or child in self.restarting or child in self.results:
                continue
            if child.eof or child.popen.poll() is not None:
                raise ChildFailed(
                    f"{child.name} exited ({child.popen.poll()}) during the scenario; "
                    f"stderr: {child.stderr_tail() or '(empty)'}"
                )

    def total(self, key: str) -> int:
        return sum(int(s.get(key, 0) or 0) for s in self.state.values())

    def total_counter(self, key: str) -> Counter[str]:
        out: Counter[str] = Counter()
        for s in self.state.values():
            out.update(s.get(key) or {})
        return out

    def sample(self, force: bool = False) -> None:
        """One timeline row a second: the clients' live sessions and new failures by status,
        the kernel's TIME_WAIT and other states towards the origins, the proxy's RSS and CPU."""
        now = time.monotonic()
        if not self.sampling or (not force and now < self.next_sample):
            return
        self.next_sample = max(self.next_sample + SAMPLE_EVERY, now + SAMPLE_EVERY / 2)
        origins = set(self.options.origin_addresses())
        kernel = kernel_sample(origins, LISTEN)
        failures = self.total_counter("failures")
        new = failures - self.last_failures
        self.last_failures = failures
        row = {
            "t": round(now - self.t0, 3),
            "live": self.total("live"),
            "failures": dict(new),
            "time_wait": kernel.time_wait,
            "other_states": kernel.other,
        }
        self.timeline.append(row)
        self.kernel.append(kernel)
        if self.proxy is not None and self.proxy.popen.poll() is None:
            self.proxy.note_family()
            family = sorted(self.proxy.family)
            self.peak_rss = max(self.peak_rss, procs.rss_bytes(family))
            self.cpu = max(self.cpu, cpu_seconds(family))
        self.ui.scenario_sample(row, kernel, self.options.limit, self.current_step())

    def current_step(self) -> str:
        return self.steps[-1].name if self.steps and self.steps[-1].t_end is None else "-"

    def mark(self, name: str, disruption: bool = False) -> None:
        """Every client starts counting in step ``name``; returns once all have said so."""
        t = time.monotonic()
        for client in self.clients:
            client.send(f"step {name}")
        self.wait(lambda: len(self.acks.get(name, {})) == len(self.clients), 30, f"step {name}")
        live = sum(int(a.get("live", 0)) for a in self.acks[name].values())
        if self.steps and self.steps[-1].t_end is None:
            self.steps[-1].t_end = round(t - self.t0, 3)
            self.steps[-1].sessions_after = live
        if name != "end":
            self.steps.append(StepRecord(name, round(t - self.t0, 3), live, disruption=disruption))
            self.ui.scenario_step(name, round(t - self.t0, 1), live)

    # -- processes ----------------------------------------------------------------------------

    def start_origins(self) -> None:
        """One process (group) per origin address, so one origin can be restarted alone."""
        opts = self.options
        per_origin = max(1, math.ceil(self.peak_sessions() / opts.origins / SESSIONS_PER_PROCESS))
        for address in opts.origin_addresses():
            group = [self.start_origin(address, i) for i in range(per_origin)]
            self.origin_groups[address] = group
            self.origins.extend(group)
        for group in self.origin_groups.values():
            for child in group:
                self.origin_ready(child)

    def start_origin(self, address: tuple[str, int], index: int) -> Child:
        host, port = address
        name = f"origin-{host}-{index}-{len(self.children.all)}"
        if self.options.origin_cmd:
            import shlex

            argv = [a.format(host=host, port=port) for a in shlex.split(self.options.origin_cmd)]
        else:
            argv = [sys.executable, "-m", "testbed.wsorigin", "--listen", f"{host}:{port}"]
            argv.append("--report-opens")
        child = self.children.start(name, argv)
        self.origin_address[child] = address
        return child

    def origin_ready(self, child: Child) -> None:
        if self.options.origin_cmd:
            self.wait_listening(self.origin_address[child], child)
        else:
            self.children.wait_for(child, "ready", 30, self.on_line)

    def restart_origins(
        self, addresses: list[tuple[str, int]], sig: signal.Signals = signal.SIGKILL
    ) -> float:
        """Signal every process of these origins by PID (SIGKILL: the kernel resets their
        connections, as a crash does; SIGTERM: a deploy's stop), wait for their exit, then
        start them again; returns seconds until all listen again."""
        t = time.monotonic()
        old = [c for a in addresses for c in self.origin_groups[a]]
        self.restarting.update(old)
        for child in old:
            child.note_family()
            child.signal(sig)
        for child in old:
            child.popen.wait(timeout=10)
            for pid in sorted(child.family - {child.pid}):
                if procs.alive(pid):
                    os.kill(pid, signal.SIGKILL)
        fresh: list[Child] = []
        for address in addresses:
            group = [self.start_origin(address, i) for i in range(len(self.origin_groups[address]))]
            self.origin_groups[address] = group
            fresh.extend(group)
        self.origins = [c for c in self.origins if c not in old] + fresh
        for child in fresh:
            self.origin_ready(child)
        return time.monotonic() - t

    def peak_sessions(self) -> int:
        """The most sessions alive at once: how many origin and client processes it takes."""
        return storm_sessions(self.options)

    def live_estimate(self) -> int:
        """The live sessions the client shards are sized for (one per 15,000)."""
        return self.peak_sessions()

    def client_sessions(self) -> int:
        """Logical sessions the clients open on ``start`` (0: churn's open-ended arrivals)."""
        return storm_sessions(self.options)

    def client_args(self) -> list[str]:
        """What the scenario's clients do beyond the shared arguments (wsload's options)."""
        return ["--give-up", str(self.options.duration), "--drain-step", "stop"]

    def start_clients(self) -> None:
        opts = self.options
        shards = opts.client_processes or max(
            1, math.ceil(self.live_estimate() / SESSIONS_PER_PROCESS)
        )
        window = client_port_window(opts.port_range)
        if window is not None:
            window = (window[0] + 100, window[1])
        base, extra = divmod(self.client_sessions(), shards)
        assert opts.rate is not None and opts.duration is not None
        for i in range(shards):
            argv = [
                sys.executable,
                "-m",
                "testbed.wsload",
                "--load",
                self.client_load,
                "--connect",
                f"{LISTEN[0]}:{LISTEN[1]}",
                "--host",
                ROUTE_HOST,
                "--sources",
                f"127.3.{i}.1-127.3.{i}.{CLIENT_SOURCES_PER_SHARD}",
                "--rate",
                str(opts.rate / shards),
                "--duration",
                str(opts.duration),
                "--timeout",
                str(opts.timeout),
                "--seed",
                str(opts.seed * 1000 + i),
                "--sessions",
                str(base + (i < extra)),
                *self.client_args(),
            ]
            if window is not None:
                argv += ["--ports", f"{window[0]}-{window[1]}"]
            self.clients.append(self.children.start(f"client-{i}", argv, stdin=True))

    # -- the steps scenarios share ------------------------------------------------------------

    def body(self) -> None:
        """The scenario itself: its steps, each marked (:meth:`mark`) before it starts."""
        raise NotImplementedError

    def ramp_to_target(self) -> None:
        """The ``ramp`` step of storm, faults and rotate: every client shard opens its share of
        the target, and the step ends when each has reported ``ramp_done``."""
        opts = self.options
        assert opts.rate is not None and opts.target is not None
        self.mark("ramp")
        for client in self.clients:
            client.send("start")
        self.wait(
            lambda: len(self.done_events) == len(self.clients),
            storm_sessions(opts) / opts.rate + 3 * opts.timeout + 120,
            "every client's ramp_done",
        )

    # -- figures ------------------------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        opts = self.options
        results = list(self.results.values())
        by_step: dict[str, list[dict[str, Any]]] = {}
        for result in results:
            for s in result.get("steps", []):
                by_step.setdefault(str(s["name"]), []).append(s)
        steps = [
            scenario_report.step_figures(rec, by_step.get(rec.name, []), self.t0)
            for rec in self.steps
        ]
        close_codes: Counter[str] = Counter()
        closes: Counter[str] = Counter()
        refused_by: Counter[str] = Counter()
        lost_by: Counter[str] = Counter()
        for r in results:
            close_codes.update(r.get("close_codes") or {})
            closes.update(r.get("closes") or {})
            refused_by.update(r.get("refused_by") or {})
            lost_by.update(r.get("lost_by") or {})
        for step, rec in zip(steps, self.steps, strict=True):
            step["peak_new_sessions_per_s"] = self.peak_open_rate(rec.t_start, rec.t_end)
        disrupted = [s for s, rec in zip(steps, self.steps, strict=True) if rec.disruption]
        peak_opens: dict[str, float] = {}
        for step in disrupted:
            for origin, rate in (step["peak_new_sessions_per_s"] or {}).items():
                peak_opens[origin] = max(peak_opens.get(origin, 0.0), rate)
        doc = {
            "scenario": opts.scenario,
            "proxy": "custom" if opts.proxy_cmd else "originpool",
            "limit": opts.limit,
            "steps": steps,
            "timeline": self.timeline,
            "close_codes": dict(sorted(close_codes.items())),
            "proxy_peak_rss_bytes": None if opts.proxy_cmd and not self.peak_rss else self.peak_rss,
            "proxy_cpu_seconds": round(self.cpu, 3),
            "new_sessions": {
                origin: [
                    [round(k * OPENS_BUCKET - self.t0, 3), n / OPENS_BUCKET]
                    for k, n in sorted(buckets.items())
                ]
                for origin, buckets in sorted(self.origin_opens.items())
            },
        }
        peak = max(self.kernel, key=lambda k: k.time_wait, default=KernelSample())
        detail = {
            "attempted": sum(int(r.get("attempted", 0)) for r in results),
            "held": sum(int(r.get("held", 0)) for r in results),
            "refused": sum(int(r.get("refused", 0)) for r in results),
            "lost": sum(int(r.get("lost", 0)) for r in results),
            "checked": sum(int(r.get("live", 0)) for r in results),  # given the final echo
            "closes": dict(closes),
            "refused_by": dict(refused_by),
            "lost_by": dict(lost_by),
            "peak_live": max((row["live"] for row in self.timeline), default=0),
            "peak_time_wait": peak.time_wait,
            "peak_time_wait_by_source": dict(sorted(peak.time_wait_by_source.items())),
            "final": vars_of(self.kernel[-1]) if self.kernel else None,
            "peak_origin_time_wait": max((k.origin_time_wait for k in self.kernel), default=0),
            "mode": "proxy-cmd" if opts.proxy_cmd else opts.modes[0],
            "tw_reuse": opts.tw_reuse,
            "rate": opts.rate,
            "duration": opts.duration,
            "lifetime": opts.lifetime,
            "mix": opts.mix,
            "target": opts.target,
            "storm_origins": opts.storm_origins,
            "storm_expected_drops": self.storm_expected,
            "storm_origin_restart_seconds": self.storm_restart_seconds,
            "storm_settled": self.storm_settled,
            "client_processes": len(self.clients),
            # the proxy's upstream_error lines by errno (originpool's; empty for another)
            "proxy_upstream_errors": dict(self.proxy_errors),
            # per origin, the peak of the disruptions' steps (storm, rotate): the comparison
            "peak_new_sessions_per_s": peak_opens or None,
        }
        return {"doc": doc, "detail": detail}
