"""``originpool testbed``: the orchestrator. One namespace, origins, a proxy, load, figures.

For each mode (plain, bind, connectx: the proxy's ways of choosing a source address) it
creates a fresh network namespace with ``lo`` up and the ephemeral range shrunk to R ports,
starts K WebSocket echo origins on 127.0.2.1..K:9000, starts ``originpool serve`` with E
egress IPs 127.0.1.1..E, ramps N client sessions through it, samples the proxy while they
are all held, holds them, checks every one with a final echo, and ends everything by PID.

Why it is built this way:

* **A fresh namespace and a fresh proxy per mode**, so one mode's TIME_WAIT entries, bound
  ports or memory cannot leak into the next one's figures.
* **The proxy's own log lines are the synchronisation**: its ``ready`` line before load,
  the clients' ``ramp_done`` lines before sampling; the hold is the only timed wait, and it
  is the measurement itself.
* **Sampling at the peak** (RSS of the proxy's process tree, its /metrics, the kernel's
  census of upstream sockets) happens after every shard reports ``ramp_done`` and before the
  final echo, when the number of held sessions is what the figures divide by.
* **Clients take their ports outside the namespace's ephemeral range** (see
  :mod:`testbed.wsclient`): a bind-mode proxy would otherwise starve them and the
  testbed would be measuring itself.
* **Any proxy can be measured** (``--proxy-cmd``) in the same scenario, and any origin
  (``--origin-cmd``): the staging use, where the origin is the user's own server.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import shlex
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from testbed import procs, report
from testbed.kernel_view import cpu_seconds, kernel_sample
from testbed.options import (
    ADMIN,
    ADMIN_SOURCE,
    CLIENT_SOURCES_PER_SHARD,
    LISTEN,
    MODES,
    ORIGIN_PORT,
    PACKAGE_ROOT,
    ROUTE_HOST,
    SESSIONS_PER_PROCESS,
    Options,
    client_port_window,
    proxy_config,
)
from testbed.procs import Child, ChildFailed, Children, Space
from testbed.ui import Ui

T = TypeVar("T")

# the names other modules, tests and bench/setup_cost.py have always imported from here
__all__ = [
    "ADMIN",
    "ADMIN_SOURCE",
    "CLIENT_SOURCES_PER_SHARD",
    "LISTEN",
    "MODES",
    "ORIGIN_PORT",
    "PACKAGE_ROOT",
    "ROUTE_HOST",
    "SESSIONS_PER_PROCESS",
    "ModeRun",
    "Options",
    "Ui",
    "client_port_window",
    "http_get",
    "not_root",
    "proxy_config",
    "run",
]


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def http_get(address: tuple[str, int], path: str, source_port: int, timeout: float = 10.0) -> str:
    """A one-shot GET from a source of the runner's own: a bind-mode proxy may hold every port
    of the range, so the kernel could not pick one for us."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.settimeout(timeout)
        s.bind((ADMIN_SOURCE, source_port))
        s.connect(address)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: testbed\r\nConnection: close\r\n\r\n".encode())
        chunks: list[bytes] = []
        for _ in range(100000):  # bounded: a /metrics page is far smaller
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    data = b"".join(chunks)
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1:2]
    if status != [b"200"]:
        raise OSError(f"GET {path}: {head[:200]!r}")
    return body.decode(errors="replace")


@dataclass
class ModeRun:
    """One mode, start to end; ``run()`` returns its figures (or raises with the reason)."""

    mode: str
    options: Options
    ui: Ui
    workdir: Path
    children: Children = field(init=False)
    proxy: Child | None = None
    origins: list[Child] = field(default_factory=list)
    clients: list[Child] = field(default_factory=list)
    first_proxy_error: dict[str, Any] | None = None
    proxy_errors: Counter[str] = field(default_factory=Counter)
    # who ended the sessions the proxy relayed ("origin 1011", "client 1000", ...), from its
    # websocket_session lines, and the workers its master reported dead: which side closed
    session_ends: Counter[str] = field(default_factory=Counter)
    worker_deaths: list[dict[str, Any]] = field(default_factory=list)
    admins: list[tuple[str, int]] = field(default_factory=list)
    _admin_port: int = 0
    t0: float = field(default_factory=time.monotonic)  # the whole run's start: one time line
    timeline: list[dict[str, Any]] = field(default_factory=list)
    _next_sample: float = 0.0
    _failures_seen: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        self.children = Children(self.workdir, env)
        window = client_port_window(self.options.port_range)
        self._admin_port = window[0] if window else 0

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        opts = self.options
        space = Space(f"originpool-testbed-{os.getpid()}-{self.mode}")
        try:
            space.enter(opts.port_range)
            self.ui.event("namespace", mode=self.mode, name=space.name)
            self.start_origins()
            self.start_proxy()
            assert self.proxy is not None
            self.proxy.note_family()
            rss_before = procs.rss_bytes(sorted(self.proxy.family))
            self.start_clients()
            self.ui.event(
                "pids",
                mode=self.mode,
                proxy=self.proxy.pid,
                origins=[c.pid for c in self.origins],
                clients=[c.pid for c in self.clients],
            )
            t_start = time.monotonic() - self.t0
            ramp = self.ramp()
            self.proxy.note_family()
            rss_held = procs.rss_bytes(sorted(self.proxy.family))
            per_egress, per_egress_metrics = self.pumping(self.sample_egress)
            self.hold(opts.hold)
            results = self.check()
            # the kernel's word at the end, while every verified session is still open: a run
            # may not call more sessions held than it shows upstream connections
            per_egress_end, _ = self.pumping(lambda: self.sample_egress(metrics=False))
            t_end = time.monotonic() - self.t0
            self.proxy.note_family()
            cpu = cpu_seconds(sorted(self.proxy.family))
            for client in self.clients:
                client.send("close")
        finally:
            self.ui.ramp_end()
            self.children.end_all()
            space.leave()
        merged = report.merge([r["records"] for r in results])
        if opts.records_path:
            report.append_records(opts.records_path, self.mode, merged)
        run = report.build_run(
            mode=self.mode,
            egress=opts.egress,
            origins=opts.origins,
            port_range=opts.port_range,
            merged=merged,
            held=sum(r["held"] for r in results),
            lost=sum(r["lost"] for r in results),
            lost_reasons=dict(sum((Counter(r["lost_reasons"]) for r in results), Counter())),
            lost_close_codes=dict(
                sum((Counter(r.get("lost_close_codes") or {}) for r in results), Counter())
            ),
            per_egress_end=per_egress_end,
            proxy_session_ends=dict(self.session_ends),
            proxy_worker_deaths=self.worker_deaths,
            first_proxy_error=self.first_proxy_error,
            proxy_errors=dict(self.proxy_errors),
            per_egress=per_egress,
            per_egress_metrics=per_egress_metrics,
            rss_before=rss_before,
            rss_held=rss_held,
            ramp_seconds=ramp,
            hold_seconds=opts.hold,
            workers=opts.workers,
            concurrency=opts.concurrency,
            client_processes=len(self.clients),
        )
        # the scenario document's view of this mode (see scenario_report.ramp_doc)
        run.update(t_start=round(t_start, 3), t_end=round(t_end, 3), proxy_cpu_seconds=cpu)
        run["timeline"] = self.timeline
        return run

    def sample(self, state: dict[Child, dict[str, Any]]) -> None:
        """A timeline row a second during the ramp, as the other scenarios take them."""
        now = time.monotonic()
        if now < self._next_sample:
            return
        self._next_sample = now + 1.0
        kernel = kernel_sample(set(self.options.origin_addresses()), LISTEN)
        failures: Counter[str] = Counter()
        for line in state.values():
            failures.update(line.get("failures") or {})
        new = failures - self._failures_seen
        self._failures_seen = failures
        self.timeline.append(
            {
                "t": round(now - self.t0, 3),
                # sessions verified and not ended since, as the clients know them (the
                # scenario document's row: its keys are fixed, scenario_report.TIMELINE_KEYS)
                "live": sum(_alive(line) for line in state.values()),
                "failures": dict(new),
                "time_wait": kernel.time_wait,
                "other_states": kernel.other,
            }
        )

    # -- origins -----------------------------------------------------------------------------

    def start_origins(self) -> None:
        opts = self.options
        addresses = opts.origin_addresses()
        if opts.origin_cmd:
            for host, port in addresses:
                argv = [a.format(host=host, port=port) for a in shlex.split(opts.origin_cmd)]
                child = self.children.start(f"origin-{host}", argv)
                self.origins.append(child)
                self.wait_listening((host, port), child)
            return
        shards = max(1, math.ceil(min(opts.sessions, opts.limit) / SESSIONS_PER_PROCESS))
        listen = ",".join(f"{h}:{p}" for h, p in addresses)
        for i in range(shards):
            argv = [sys.executable, "-m", "testbed.wsorigin", "--listen", listen]
            self.origins.append(self.children.start(f"origin-{i}", argv))
        for child in self.origins:
            self.children.wait_for(child, "ready", 30, self.on_line)

    def wait_listening(self, address: tuple[str, int], child: Child, timeout: float = 30) -> None:
        """For a process that announces nothing: connect until it accepts. Between probes the
        wait is on the child's own output (it may die, or say why)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with socket.socket() as s:
                s.settimeout(1)
                try:
                    s.connect(address)
                    return
                except OSError:
                    pass
            if child.popen.poll() is not None:
                break
            self.children.pump(0.05, only=[child])
        raise ChildFailed(
            f"{child.name} ({shlex.join(child.argv)}) is not accepting on "
            f"{address[0]}:{address[1]}; stderr: {child.stderr_tail() or '(empty)'}"
        )

    # -- the proxy ---------------------------------------------------------------------------

    def start_proxy(self) -> None:
        opts = self.options
        if opts.proxy_cmd:
            self.proxy = self.children.start("proxy", self.proxy_argv())
            self.wait_listening(LISTEN, self.proxy)
            return
        config = self.workdir / f"originpool-{self.mode}.toml"
        config.write_text(self.proxy_config_text())
        argv = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)]
        # access lines are most of what it writes: not worth parsing
        self.proxy = self.children.start("proxy", argv, skip=b'"event":"access"')
        # one ready line per worker, each naming its own admin address (port + index)
        ready = self.children.wait_for(
            self.proxy, "ready", 30 + 2 * opts.workers, self.on_line, count=opts.workers
        )
        self.admins = [_address(str(line["admin"])) for line in ready if line.get("admin")]

    def proxy_argv(self) -> list[str]:
        """The command of ``--proxy-cmd`` (a scenario may point it at a copy of its config)."""
        return shlex.split(self.options.proxy_cmd or "")

    def proxy_config_text(self) -> str:
        return proxy_config(self.mode, self.options)

    def on_line(self, child: Child, line: dict[str, Any]) -> None:
        if child is not self.proxy:
            return
        event = line.get("event")
        if event == "websocket_session":
            code = line.get("close_code")
            self.session_ends[f"{line.get('closed_by', 'unknown')} {code or '-'}"] += 1
        elif event == "worker_died":
            self.worker_deaths.append({k: line.get(k) for k in ("worker", "pid", "exit")})
        elif event == "upstream_error":
            self.proxy_errors[str(line.get("errno"))] += 1
            if self.first_proxy_error is None:
                self.first_proxy_error = {
                    k: line.get(k) for k in ("errno", "error", "egress", "destination", "origin")
                }

    # -- clients -----------------------------------------------------------------------------

    def start_clients(self) -> None:
        opts = self.options
        shards = opts.client_processes or max(1, math.ceil(opts.sessions / SESSIONS_PER_PROCESS))
        window = client_port_window(opts.port_range)
        if window is not None:
            # the first ports of the window are the runner's own (admin scrapes)
            window = (window[0] + 100, window[1])
        base, extra = divmod(opts.sessions, shards)
        for i in range(shards):
            n = base + (i < extra)
            sources = f"127.3.{i}.1-127.3.{i}.{CLIENT_SOURCES_PER_SHARD}"
            argv = [
                sys.executable,
                "-m",
                "testbed.wsclient",
                "--connect",
                f"{LISTEN[0]}:{LISTEN[1]}",
                "--host",
                ROUTE_HOST,
                "--sources",
                sources,
                "--sessions",
                str(n),
                "--concurrency",
                str(opts.concurrency),
                "--limit",
                str(opts.limit),
                "--timeout",
                str(opts.timeout),
                "--deadline",
                str(opts.deadline),
                "--control",
            ]
            if window is not None:
                argv += ["--ports", f"{window[0]}-{window[1]}"]
            self.clients.append(self.children.start(f"client-{i}", argv, stdin=True))

    def ramp(self) -> float:
        """Until every shard reports ramp_done; the progress bar follows their reports."""
        self.ui.ramp_start(self.mode, self.options.sessions)
        state: dict[Child, dict[str, Any]] = {c: {} for c in self.clients}
        done: dict[Child, dict[str, Any]] = {}
        end = time.monotonic() + self.options.deadline + 60
        while len(done) < len(self.clients) and time.monotonic() < end:
            changed = False
            for who, line in self.children.pump(0.5):
                self.on_line(who, line)
                if who in state and line.get("event") in ("progress", "ramp_done"):
                    state[who] = line
                    changed = True
                    if line["event"] == "ramp_done":
                        done[who] = line
            self.sample(state)
            if changed:
                self.ui.ramp_update(
                    self.mode,
                    sum(s.get("attempted", 0) for s in state.values()),
                    sum(_alive(s) for s in state.values()),
                    sum(s.get("failed", 0) for s in state.values()),
                )
            self._check_alive(done)
        self.ui.ramp_end()
        if len(done) < len(self.clients):
            raise ChildFailed(f"the ramp did not end within {self.options.deadline + 60:g} s")
        return max(line.get("seconds", 0.0) for line in done.values())

    def _check_alive(self, done: dict[Child, dict[str, Any]]) -> None:
        for child in [self.proxy, *self.origins, *self.clients]:
            if child is None or child in done:
                continue
            if child.eof or child.popen.poll() is not None:
                code = child.popen.poll()
                raise ChildFailed(
                    f"{child.name} exited ({code}) during the ramp; "
                    f"stderr: {child.stderr_tail() or '(empty)'}"
                )

    # -- at the peak -------------------------------------------------------------------------

    def sample_egress(self, metrics: bool = True) -> tuple[dict[str, int], dict[str, int] | None]:
        """Upstream connections per source IP: the kernel's census (any proxy), and the
        proxy's own /metrics gauge (originpool only) to compare with."""
        from pool import census

        destinations = {f"{h}:{p}" for h, p in self.options.origin_addresses()}
        per_egress = report.per_egress_from_census(census.take_census(("tcp",)), destinations)
        gauges: Counter[str] | None = None
        if metrics and self.admins and self._admin_port:
            gauges = Counter()
            for i, admin in enumerate(self.admins):  # every worker's own view, summed
                try:
                    # each worker's own: worker 0's plain /metrics is already the sum
                    text = http_get(admin, "/metrics?scope=worker", self._admin_port + i % 100)
                except OSError as e:
                    self.ui.say(f"(admin /metrics of {admin[0]}:{admin[1]} unavailable: {e})")
                    return per_egress, None
                gauges.update(report.parse_live_per_egress(text))
        return per_egress, None if gauges is None else dict(sorted(gauges.items()))

    def pumping(self, work: Callable[[], T]) -> T:
        """``work`` in a thread while this one keeps reading every child's pipe.

        A proxy worker whose stdout pipe is full blocks in its write, event loop and all, so
        it cannot answer its /metrics while the runner waits on that answer instead of
        reading: each worker scraped cost the GET's whole timeout (issue 22's "admin
        /metrics of 127.0.0.1:9098 unavailable: timed out", when thousands of session-end
        lines were being written). The census takes seconds at 100k sessions too."""
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(work)
            while not future.done():
                for who, line in self.children.pump(0.1):
                    self.on_line(who, line)
            return future.result()

    def hold(self, seconds: float) -> None:
        """The hold is the measurement (do sessions survive idle?), not a synchronisation;
        the proxy's pipe is read meanwhile so it never blocks on a log line."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for who, line in self.children.pump(end - time.monotonic()):
                self.on_line(who, line)

    def check(self) -> list[dict[str, Any]]:
        for client in self.clients:
            client.send("check")
        results: list[dict[str, Any]] = []
        wait = self.options.timeout * (1 + self.options.sessions // 1000) + 30
        for client in self.clients:
            results.append(self.children.wait_for(client, "result", wait, self.on_line)[0])
        return results


def _alive(line: dict[str, Any]) -> int:
    """A client's live sessions from its report (older clients said only "held")."""
    return int(line.get("alive", line.get("held", 0)))


def not_root() -> bool:
    """True (and says so in one line) when the testbed cannot create its namespace."""
    if os.geteuid() == 0:
        return False
    print(
        "originpool testbed: needs root (it creates a network namespace); run it as root",
        file=sys.stderr,
    )
    return True


def run(options: Options) -> int:
    """Every mode in turn; figures printed as each ends. Exit 0, 1 (a mode failed), 2 (not
    root or a bad option), 130 (interrupted)."""
    if not_root():
        return 2
    ui = Ui(options.progress)
    restore = procs.install_interrupt_handlers()
    runs: list[dict[str, Any]] = []
    code = 0
    try:
        opts = options
        ui.say(
            f"originpool testbed: physical limit = {opts.egress} egress IPs x {opts.size:,} "
            f"ports ({opts.port_range[0]}-{opts.port_range[1]}) x {opts.origins} origins "
            f"= {opts.limit:,} sessions"
        )
        ui.say(
            f"{opts.sessions:,} WebSocket sessions attempted per mode "
            f"({opts.concurrency} in flight), each verified by an echo and held "
            f"{opts.hold:g} s; one fresh namespace and proxy per mode"
        )
        if opts.records_path:
            Path(opts.records_path).write_text("")
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="originpool-testbed-") as tmp:
            modes = ("proxy-cmd",) if opts.proxy_cmd and opts.modes == MODES else opts.modes
            for mode in modes:
                workdir = Path(tmp) / mode
                workdir.mkdir()
                try:
                    result = ModeRun(mode, opts, ui, workdir, t0=t0).run()
                except (ChildFailed, RuntimeError, OSError) as e:
                    result = {"mode": mode, "error": str(e)}
                    code = 1
                runs.append(result)
                ui.run_done(result)
        ui.summary(runs)
    except KeyboardInterrupt:
        ui.ramp_end()
        ui.say("originpool testbed: interrupted; every process it started has been ended")
        ui.event("interrupted")
        code = 130
    finally:
        restore()
    _write_outputs(options, runs, ui)
    return code


def _write_outputs(options: Options, runs: list[dict[str, Any]], ui: Ui) -> None:
    if not runs:
        return
    if options.json_path:
        from testbed import scenario_report

        doc = {
            # the scenario document's keys first (every scenario writes them), then the
            # ramp's own, which tools already read
            **scenario_report.ramp_doc(runs, options.limit, bool(options.proxy_cmd)),
            "runs": runs,
            "settings": {
                "egress": options.egress,
                "origins": options.origins,
                "port_range": list(options.port_range),
                "sessions": options.sessions,
                "hold": options.hold,
                "workers": options.workers,
                "concurrency": options.concurrency,
                "proxy_cmd": options.proxy_cmd,
                "origin_cmd": options.origin_cmd,
            },
        }
        Path(options.json_path).write_text(json.dumps(doc, indent=1) + "\n")
        ui.say(f"figures: {options.json_path}")
    if options.plot_path:
        report.plot(runs, options.plot_path)
        ui.say(f"plot: {options.plot_path}")
