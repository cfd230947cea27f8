"""``originpool testbed --scenario faults``: the operator's bad day, one fault at a time.

With ``--target`` of the limit held, in order: ``reload`` (SIGHUP with a route added),
``egress_del`` (one egress IP removed from the namespace), ``egress_add`` (the same IP
back), ``kill_origin`` (the last origin SIGKILLed, not restarted), ``stop`` (SIGTERM: the
drain). Each step reports what the clients saw (sessions before and after, lost, handshake
failures by status) and what the proxy and the kernel showed, in ``evidence``.

Why it is built this way:

* **The accounting stays exact** (held + refused + lost == attempted). A session dropped by
  the other side is lost, with the Close code it got as the reason (``dropped_1011``): the
  killed origin's sessions are lost by design, and counted in that step. A session the
  proxy ends with Close 1001 *during the stop step* is **held**: it lived until the proxy
  was told to stop and was told why, which is what a drain promises; it is also counted as
  ``drained``. Any other end during the stop (no Close frame, another code) is lost.
* **Nothing waits on a clock.** Each step waits for what proves it happened: the proxy's
  ``reloaded`` lines, the clients' ``opened`` and ``echoed`` lines, the kernel's census of
  upstream sockets per source IP (any proxy), the clients' drop counts, the proxy's exit.
  The one timed wait is ``--reload-hold`` under ``--proxy-cmd``: a measurement window long
  enough for another proxy's old workers to end what they still hold after a reload.
* **An egress IP can only be removed if it is an address of its own**, so the namespace's
  ``lo`` gets /32 (and /24, /16 for the client, origin and runner subnets) instead of
  127.0.0.1/8, under which every 127.x address is local and ``ip addr del`` changes nothing.
* **Held sessions are not echoed while the egress IP is gone**: their upstream legs could not
  send (no route from a source the host lacks) and TCP would retransmit only once it is back.
  They are echoed after ``egress_add``, which is when "held sessions lose nothing" is true
  or false.
* **Another proxy is measured where the step means the same thing, and said n/a where it
  does not**: the route change needs our config format (``--reload-signal`` sends that
  proxy's own reload with its config unchanged: nginx HUP, HAProxy master-worker USR2); the
  census and ``/metrics`` are originpool's (the kernel's census per source IP is shown for
  every proxy); ``--stop-signal`` is its graceful stop (nginx QUIT, HAProxy USR1).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from collections import Counter
from typing import Any, ClassVar

from pool import sockdiag
from testbed import procs
from testbed.kernel_view import established_to
from testbed.procs import Child, ChildFailed
from testbed.run import ADMIN_SOURCE, LISTEN, ROUTE_HOST, http_get, proxy_config
from testbed.scenario_options import check_target, flag, storm_sessions
from testbed.scenario_run import ScenarioRun
from testbed.scenarios.base import Scenario, register, set_default

NEW_ROUTE_HOST = "reloaded.testbed.example"
FAULTS_TARGET = 0.5
FAULTS_RATE = 1000.0
RELOAD_HOLD = 15.0  # --proxy-cmd: longer than the nginx recipe's worker_shutdown_timeout
STORM_WINDOW = 60.0  # the clients' give-up (as storm's window; nothing reconnects here)
DRAIN_SECONDS = 10  # the generated config's [timeouts] drain for this scenario
STEPS = ("reload", "egress_del", "egress_add", "kill_origin", "stop")
# lo's addresses in this scenario: one of their own for each egress IP, subnets for the rest
LO_SUBNETS = ("127.0.0.1/32", "127.0.2.0/24", "127.3.0.0/16", "127.4.0.0/16")


def probe_size(limit: int) -> int:
    """New sessions per step: enough to cross every egress IP many times, small next to the
    limit so a step never needs more room than the ramp left."""
    return max(20, min(500, limit // 40))


def signal_number(name: str) -> int:
    """``HUP``, ``SIGHUP`` or a number, as kill(1) takes it; ValueError otherwise."""
    text = name.upper()
    if text.isdigit():
        return int(text)
    try:
        return int(signal.Signals[text if text.startswith("SIG") else "SIG" + text])
    except KeyError:
        raise ValueError(f"{name!r}: not a signal name") from None


def established_by_source(origins: set[tuple[str, int]]) -> Counter[str]:
    """The kernel's census of upstream connections per source IP: any proxy's, live."""
    out: Counter[str] = Counter()
    for s in sockdiag.dump(socket.AF_INET, socket.IPPROTO_TCP, 1 << 1):
        if (s.dst, s.dport) in origins:
            out[s.src] += 1
    return out


def upgrade_status(host: str, timeout: float = 5.0) -> int:
    """The status the proxy answers one WebSocket upgrade naming ``host`` with, from the
    runner's own source (not a client session: not counted in the accounting)."""
    with socket.socket() as s:
        s.settimeout(timeout)
        s.bind((ADMIN_SOURCE, 0))
        s.connect(LISTEN)
        s.sendall(
            f"GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        for _ in range(64):  # bounded: a status line is far shorter
            chunk = s.recv(4096)
            head += chunk
            if not chunk or b"\r\n" in head:
                break
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


_METRIC = re.compile(
    r"^(originpool_egress_down|originpool_egress_failover_total)\{([^}]*)\} (\S+)$"
)


def egress_metrics(text: str) -> dict[str, dict[str, float]]:
    """The egress gauges and failover counters of one /metrics page, by egress IP."""
    down: dict[str, float] = {}
    failover: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if m.group(1) == "originpool_egress_down":
            down[labels.get("egress", "")] = float(m.group(3))
        elif labels.get("reason") == "not_on_host":
            failover[labels.get("egress", "")] = float(m.group(3))
    return {"egress_down": down, "failover_not_on_host": failover}


class FaultsRun(ScenarioRun):
    """The faults scenario on the shared frame of :class:`ScenarioRun`."""

    client_load: ClassVar[str] = "count"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.tagged: dict[tuple[str, str], dict[Child, dict[str, Any]]] = {}
        self.proxy_events: Counter[str] = Counter()
        self.proxy_event_lines: list[dict[str, Any]] = []
        self.evidence: dict[str, dict[str, Any]] = {}
        self.not_applicable: dict[str, str] = {}
        # the file start_proxy writes and serve re-reads on SIGHUP
        self.config_path = self.workdir / f"originpool-{self.mode}.toml"
        self._scrapes = 0
        self._batches = 0
        self.proxy_exit: int | None = None
        self.retry_at = 0.0  # monotonic time the pool announced it re-probes a missing IP

    # -- the frame's hooks --------------------------------------------------------------------

    def prepare(self, space: procs.Space) -> None:
        """Addresses of their own on lo, so one egress IP can be removed (module docstring)."""
        space.ip("addr", "del", "127.0.0.1/8", "dev", "lo")
        for address in LO_SUBNETS:
            space.ip("addr", "add", address, "dev", "lo")
        for ip in self.options.egress_ips():
            space.ip("addr", "add", f"{ip}/32", "dev", "lo")

    def config_text(self, extra_route: bool = False) -> str:
        text = proxy_config(self.mode, self.options)
        text = text.replace("drain = 1\n", f"drain = {DRAIN_SECONDS}\n")
        if extra_route:
            first = self.options.origin_addresses()[0]
            text += (
                f'\n[[routes]]\nhost = "{NEW_ROUTE_HOST}"\npath_prefix = "/"\n'
                f'origins = ["ws://{first[0]}:{first[1]}"]\n'
            )
        return text

    def proxy_config_text(self) -> str:
        return self.config_text()

    def on_line(self, child: Child, line: dict[str, Any]) -> None:
        super().on_line(child, line)
        if child is self.proxy:
            event = str(line.get("event"))
            if event in ("reloaded", "reload_rejected", "egress_down", "egress_up", "draining",
                         "stopped", "egress_unavailable", "egress_exhausted"):  # fmt: skip
                self.proxy_events[event] += 1
                if event == "egress_down":
                    # when the pool says it will try the IP again: its own announced backoff
                    retry = float(line.get("retry_in_s") or 0.0)
                    self.retry_at = time.monotonic() + retry
                if len(self.proxy_event_lines) < 200:
                    self.proxy_event_lines.append(line)
            elif event == "upstream_error" and len(self.proxy_event_lines) < 200:
                self.proxy_event_lines.append(line)

    def on_client(self, who: Child, line: dict[str, Any]) -> None:
        super().on_client(who, line)
        event = line.get("event")
        if event in ("opened", "echoed") and who in self.clients:
            self.tagged.setdefault((str(event), str(line.get("tag"))), {})[who] = line

    def peak_sessions(self) -> int:
        return storm_sessions(self.options) + 12 * probe_size(self.options.limit)

    # -- helpers ------------------------------------------------------------------------------

    def origin_set(self) -> set[tuple[str, int]]:
        return set(self.options.origin_addresses())

    def census(self) -> dict[str, int]:
        by_source = established_by_source(self.origin_set())
        return {ip: by_source.get(ip, 0) for ip in self.options.egress_ips()}

    def scrape(self, path: str) -> str | None:
        """One admin page of worker 0 (originpool only), from a rotating runner port."""
        if self.options.proxy_cmd or not self.admins or not self._admin_port:
            return None
        self._scrapes += 1
        try:
            return http_get(self.admins[0], path, self._admin_port + self._scrapes % 100)
        except OSError as e:
            return f"unavailable: {e}"

    def proxy_view(self) -> dict[str, Any]:
        """What originpool itself shows: /metrics' egress gauges, /ports per egress IP."""
        if self.options.proxy_cmd:
            return {"n/a": "another proxy: no census or /metrics of originpool's"}
        metrics = self.scrape("/metrics") or ""
        ports = self.scrape("/ports") or "{}"
        per_ip: Counter[str] = Counter()
        try:
            for pair in json.loads(ports).get("pairs", []):
                per_ip[str(pair.get("src"))] += int(pair.get("established", 0))
        except ValueError:
            pass
        ips = self.options.egress_ips()
        return {
            **egress_metrics(metrics),
            "ports_established_by_egress": {ip: per_ip.get(ip, 0) for ip in ips},
        }

    def open_batch(self, count: int, host: str = ROUTE_HOST) -> dict[str, int]:
        """``count`` new sessions over the shards; returns their outcomes once all answered."""
        self._batches += 1
        tag = f"b{self._batches}"
        n = len(self.clients)
        for i, client in enumerate(self.clients):
            share = count // n + (i < count % n)
            client.send(f"open {tag} {share} {host}")
        key = ("opened", tag)
        wait = 4 * self.options.timeout + count / 50 + 30
        self.wait(lambda: len(self.tagged.get(key, {})) == n, wait, f"batch {tag}")
        out: Counter[str] = Counter()
        for line in self.tagged[key].values():
            out.update(line.get("outcomes") or {})
        return dict(out)

    def echo_all(self) -> dict[str, int]:
        """An echo on every held session; those that do not answer are lost in this step."""
        self._batches += 1
        tag = f"e{self._batches}"
        for client in self.clients:
            client.send(f"echo {tag}")
        key = ("echoed", tag)
        wait = 2 * self.options.timeout + 30
        self.wait(lambda: len(self.tagged.get(key, {})) == len(self.clients), wait, f"echo {tag}")
        lines = self.tagged[key].values()
        return {
            "ok": sum(int(v["echo_ok"]) for v in lines),
            "failed": sum(int(v["echo_failed"]) for v in lines),
        }

    def wait_proxy_events(self, event: str, count: int, timeout: float) -> bool:
        return self.wait_or_timeout(lambda: self.proxy_events[event] >= count, timeout)

    # -- the scenario -------------------------------------------------------------------------

    def body(self) -> None:
        self.ramp_to_target()
        self.reload()
        self.egress_del()
        self.egress_add()
        self.kill_origin()
        self.stop()

    def reload(self) -> None:
        opts = self.options
        probe = probe_size(opts.limit)
        ev: dict[str, Any] = self.evidence.setdefault("reload", {})
        if opts.proxy_cmd and opts.reload_signal is None:
            reason = (
                "n/a: the route change needs originpool's config format; give --reload-signal "
                "for that proxy's own reload with its config unchanged (nginx HUP, HAProxy -W USR2)"
            )
            self.not_applicable["reload"] = reason
            self.mark("reload")
            ev["n/a"] = reason
            return
        self.mark("reload")
        t = time.monotonic()
        if opts.proxy_cmd:
            assert self.proxy is not None and opts.reload_signal is not None
            ev["signal"] = opts.reload_signal
            ev["route_set"] = "unchanged (another proxy's config is not the testbed's to write)"
            self.proxy.signal(signal_number(opts.reload_signal))
            # a measurement window, not a synchronisation: what old workers still hold after
            # a reload ends within it (the nginx recipe's worker_shutdown_timeout is 10 s)
            self.wait_or_timeout(lambda: False, opts.reload_hold)
            ev["new_sessions"] = self.open_batch(probe)
        else:
            assert self.proxy is not None
            ev["before_status_new_route"] = upgrade_status(NEW_ROUTE_HOST)
            self.config_path.write_text(self.config_text(extra_route=True))
            self.proxy.signal(signal.SIGHUP)
            got = self.wait_proxy_events("reloaded", opts.workers, 30)
            ev["reloaded_lines"] = self.proxy_events["reloaded"]
            ev["reload_rejected_lines"] = self.proxy_events["reload_rejected"]
            if not got:
                raise ChildFailed("the proxy did not log 'reloaded' within 30 s of SIGHUP")
            ev["reload_seconds"] = round(time.monotonic() - t, 3)
            ev["route_added"] = NEW_ROUTE_HOST
            ev["new_sessions_new_route"] = self.open_batch(probe, NEW_ROUTE_HOST)
            ev["new_sessions_old_route"] = self.open_batch(probe // 4)
        ev["held_echo"] = self.echo_all()

    def egress_del(self) -> None:
        opts = self.options
        ip = opts.egress_ips()[-1]
        self.removed = ip
        ev: dict[str, Any] = self.evidence.setdefault("egress_del", {"egress": ip})
        self.mark("egress_del")
        ev["census_before"] = self.census()
        procs.ip_in_current("addr", "del", f"{ip}/32", "dev", "lo")
        ev["new_sessions"] = self.open_batch(probe_size(opts.limit))
        ev["census_after"] = self.census()
        ev["proxy_log"] = {
            k: self.proxy_events[k]
            for k in ("egress_down", "egress_unavailable", "egress_exhausted")
        }
        ev["proxy_view"] = self.proxy_view()
        ev["held_echo"] = "not while the IP is gone: its legs cannot send (after egress_add)"

    def egress_add(self) -> None:
        opts = self.options
        ip = self.removed
        ev: dict[str, Any] = self.evidence.setdefault("egress_add", {"egress": ip})
        self.mark("egress_add")
        t = time.monotonic()
        before = self.census()
        ev["census_before"] = before
        ups_before = self.proxy_events["egress_up"]
        procs.ip_in_current("addr", "add", f"{ip}/32", "dev", "lo")
        # small batches until the kernel sees a new connection from the IP (any proxy). The
        # pool re-probes a missing IP once the backoff its egress_down line announced (1-30
        # s) is over: each batch waits for that moment, so the other IPs are not filled
        # meanwhile by connects the pool would not send to this one anyway (any proxy that
        # logs originpool's egress_down lines). A proxy that announces nothing is polled: a
        # batch every half second, the kernel's census the judge
        batch = max(4, probe_size(opts.limit) // 10)
        outcomes: Counter[str] = Counter()
        back = False
        for _ in range(120):
            if time.monotonic() - t > 45:
                break
            self.wait_or_timeout(lambda: time.monotonic() >= self.retry_at, 31)
            outcomes.update(self.open_batch(batch))
            if self.census()[ip] > before[ip]:
                back = True
                break
            self.wait_or_timeout(lambda: False, 0.5)  # the poll's pace
        ev["back"] = back
        ev["seconds_until_used"] = round(time.monotonic() - t, 3) if back else None
        ev["sessions_until_used"] = dict(outcomes)
        if not opts.proxy_cmd:
            ev["egress_up_lines"] = self.proxy_events["egress_up"] - ups_before
        ev["new_sessions"] = self.open_batch(probe_size(opts.limit))
        ev["census_after"] = self.census()
        ev["proxy_view"] = self.proxy_view()
        ev["held_echo"] = self.echo_all()

    def kill_origin(self) -> None:
        opts = self.options
        address = opts.origin_addresses()[-1]
        ev: dict[str, Any] = self.evidence.setdefault(
            "kill_origin", {"origin": f"{address[0]}:{address[1]}"}
        )
        self.mark("kill_origin")
        expected = established_to({address})
        ev["sessions_on_it"] = expected
        drops_before = self.total("drops")
        group = self.origin_groups[address]
        self.restarting.update(group)
        ev["pids"] = [c.pid for c in group]
        for child in group:
            child.note_family()
            child.signal(signal.SIGKILL)
        for child in group:
            child.popen.wait(timeout=10)
        t = time.monotonic()
        settled = self.wait_or_timeout(
            lambda: self.total("drops") - drops_before >= expected, 2 * opts.timeout + 30
        )
        ev["all_dropped"] = settled
        ev["seconds_until_dropped"] = round(time.monotonic() - t, 3)
        ev["new_sessions"] = self.open_batch(probe_size(opts.limit))
        ev["held_echo"] = self.echo_all()

    def stop(self) -> None:
        opts = self.options
        assert self.proxy is not None
        name = opts.stop_signal if opts.proxy_cmd else "TERM"
        assert name is not None
        ev: dict[str, Any] = self.evidence.setdefault("stop", {"signal": name})
        self.mark("stop")
        self.restarting.add(self.proxy)
        t = time.monotonic()
        self.proxy.note_family()
        self.proxy.signal(signal_number(name))
        wait = DRAIN_SECONDS + 3 * opts.timeout + 30
        exited = self.wait_or_timeout(
            lambda: self.proxy is not None and self.proxy.popen.poll() is not None, wait
        )
        ev["proxy_exited"] = exited
        ev["exit_seconds"] = round(time.monotonic() - t, 3) if exited else None
        self.proxy_exit = self.proxy.popen.poll()
        ev["exit_code"] = self.proxy_exit
        # the clients see the last closes a moment after the proxy's exit: their counts say
        ended = self.wait_or_timeout(lambda: self.total("live") == 0, 2 * opts.timeout + 10)
        ev["every_session_ended"] = ended
        if not opts.proxy_cmd:
            ev["proxy_log"] = {k: self.proxy_events[k] for k in ("draining", "stopped")}

    # -- figures ------------------------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        out = super().figures()
        doc, detail = out["doc"], out["detail"]
        per_step: dict[str, dict[str, Any]] = {}
        for result in self.results.values():
            for s in result.get("steps", []):
                row = per_step.setdefault(
                    str(s["name"]), {"close_codes": Counter(), "drained": 0, "drops": 0}
                )
                row["close_codes"].update(s.get("close_codes") or {})
                row["drained"] += int(s.get("drained", 0))
                row["drops"] += int(s.get("drops", 0))
        for step in doc["steps"]:
            if step["name"] not in STEPS:
                continue
            seen = per_step.get(step["name"], {})
            ev = self.evidence.setdefault(step["name"], {})
            ev["close_codes"] = dict(seen.get("close_codes", {}))
            ev["drained_1001"] = seen.get("drained", 0)
            ev["seconds"] = round((step["t_end"] or step["t_start"]) - step["t_start"], 3)
            if step["name"] in self.not_applicable:
                step["lost"] = None
                step["failures"] = None
                ev["n/a"] = self.not_applicable[step["name"]]
        doc["evidence"] = self.evidence
        detail["drained"] = sum(int(r.get("drained", 0)) for r in self.results.values())
        detail["proxy_exit_code"] = self.proxy_exit
        detail["reload_signal"] = self.options.reload_signal
        detail["stop_signal"] = self.options.stop_signal
        return out


@register
class Faults(Scenario):
    name = "faults"
    order = 3
    summary = "with sessions held: reload, egress IP removed and re-added, origin killed, stop"
    takes = ("target", "rate", "reload_signal", "stop_signal", "reload_hold", "tw_reuse")
    reconnects: ClassVar[bool] = False  # a dropped session is counted, not reconnected
    runner = FaultsRun

    def defaults(self) -> None:
        opts = self.options
        # duration: the clients' give-up, no reconnects here
        set_default(opts, target=FAULTS_TARGET, rate=FAULTS_RATE, duration=STORM_WINDOW)
        if opts.proxy_cmd:
            set_default(opts, stop_signal="TERM")
        set_default(opts, reload_hold=RELOAD_HOLD)

    def check(self, given: set[str]) -> str | None:
        opts = self.options
        if opts.egress < 2:
            return "--scenario faults needs --egress 2 or more: it removes one egress IP"
        if opts.origins < 2:
            return "--scenario faults needs --origins 2 or more: it kills one origin"
        for option in ("reload_signal", "stop_signal", "reload_hold"):
            if option in given and not opts.proxy_cmd:
                return (
                    f"{flag(option)} applies to --proxy-cmd only (originpool reloads on SIGHUP "
                    "and drains on SIGTERM)"
                )
        for option in ("reload_signal", "stop_signal"):
            value = getattr(opts, option)
            if value is not None:
                try:
                    signal_number(value)
                except ValueError as e:
                    return f"{flag(option)}: {e}"
        return check_target(opts, 0.8, " (the steps open new sessions)")

    def intro(self) -> str:
        opts = self.options
        assert opts.target is not None and opts.rate is not None
        return (
            f"ramp to {opts.target:g} of the limit ({int(opts.target * opts.limit):,} sessions) "
            f"at {opts.rate:g}/s, then in order: reload with a route added, egress IP "
            f"{opts.egress_ips()[-1]} removed, re-added, origin "
            f"{opts.origin_addresses()[-1][0]} SIGKILLed, the proxy stopped"
        )

    def report_rows(self, detail: dict[str, Any]) -> list[tuple[str, str]]:
        if "drained" not in detail:
            return []
        return [
            (
                "faults: closed by the drain",
                f"{detail['drained']:,} with Close 1001 (counted held); proxy exit code "
                f"{detail['proxy_exit_code']}",
            )
        ]
