"""``originpool testbed --scenario rotate``: a rolling deploy of the origins, one at a time.

With ``--target`` of the limit held, each origin in turn is one step: it leaves the proxy's
rotation (originpool: ``POST /origins/drain?origin=URL&over=S`` on the admin listener; nginx:
its ``server`` line removed and ``nginx -s reload``; HAProxy: ``set server B/S state drain``
then ``shutdown sessions server B/S`` on its stats socket), the testbed waits until the
origin holds no connection and every client that was cut is back, stops the origin process
(SIGTERM), starts it, and puts it back (``POST /origins/undrain``; the line restored and a
reload; ``set server B/S state ready``). Clients reconnect after any close, with jittered
backoff, as in storm; a Close 1012 (Service Restart) is the proxy telling them to.

Per step: sessions lost, drops and the Close codes the clients saw, handshake failures, the
step's time, and the peak rate of new sessions each origin saw, counted by the origin itself
per half second (``testbed.wsorigin --report-opens``), so nginx and HAProxy are measured the
same way. The storm scenario reports the same peak, which is the comparison that matters: a
deploy should not look like a crash to the origin that takes the sessions over.

Why it is built this way:

* **The proxy is told the way its operator would tell it**, through its own interface (the
  admin API, a config reload, the runtime API), never by the testbed touching its state.
* **Waits are on facts**: the kernel's count of upstream connections to the origin (any
  proxy), the clients' drop and reconnect counts, the origin's ``ready`` line. Under nginx a
  reload leaves the old worker holding its sessions until ``worker_shutdown_timeout``; the
  testbed then measures a ``--reload-hold`` window after each reload, as faults does.
* **Errors carry their context**: a drain refused names the origin, the HTTP status and the
  body (:class:`RotateError`); an admin or stats socket that cannot be reached, its errno.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

from testbed.kernel_view import established_to
from testbed.options import ADMIN, ADMIN_SOURCE, storm_sessions
from testbed.procs import Child
from testbed.scenario_options import check_target
from testbed.scenario_run import ScenarioRun
from testbed.scenarios.base import Scenario, register, set_default
from testbed.scenarios.storm import STORM_RATE, STORM_WINDOW, open_rate_rows, ramp_check

# storm's 7,200 sessions, on three times storm's port range: while one of 2 origins is out
# the other holds every session, and one origin's share of the limit is E x R (4 x 1,000 =
# 4,000 in storm's namespace, 12,000 here), with room for the TIME_WAIT the first drain leaves
# towards it (with 8,000 the last 705 reconnects met the port wall: README); 7,200 of the
# 24,000 limit is 0.3
ROTATE_PORT_RANGE = (40000, 42999)
ROTATE_TARGET = 0.3
# the admin API's drain window per origin, as originpool's own [websocket] drain_over: 7,200
# sessions drained from the last origin is 240/s on average and, by the drain's pacing bound
# (never twice the even share in a half second), at most 480/s: under a quarter of the
# 3,024/s one origin took in the storm scenario's reconnect (README)
DRAIN_OVER = 30.0
RELOAD_HOLD = 15.0  # nginx: longer than the recipe's worker_shutdown_timeout (10 s)
KNOWN_PROXIES = ("nginx", "haproxy")


class RotateError(RuntimeError):
    """A proxy refused or could not be told that an origin leaves or returns."""

    def __init__(self, origin: str, what: str, detail: str, err: int | None = None) -> None:
        self.origin, self.what, self.detail, self.errno = origin, what, detail, err
        super().__init__(f"{what} {origin}: {detail}")


def origin_url(address: tuple[str, int]) -> str:
    """The origin as the generated config's route writes it (the admin API's ``origin=``)."""
    return f"ws://{address[0]}:{address[1]}"


def admin_post(
    admin: tuple[str, int], path: str, source: tuple[str, int], timeout: float = 10.0
) -> tuple[int, str]:
    """One POST to the admin listener from the runner's own source: (status, body)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.settimeout(timeout)
        s.bind(source)
        s.connect(admin)
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: testbed\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        chunks: list[bytes] = []
        for _ in range(1000):  # bounded: an answer of a few hundred bytes
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1:2]
    code = int(status[0]) if status and status[0].isdigit() else 0
    return code, body.decode(errors="replace")


class Rotator:
    """How one proxy is told that an origin leaves its rotation and comes back."""

    how: ClassVar[str]
    hold: float = 0.0  # a measurement window after each change (a reload's old worker)

    def leave(self, address: tuple[str, int]) -> dict[str, Any]:
        raise NotImplementedError

    def back(self, address: tuple[str, int]) -> dict[str, Any]:
        raise NotImplementedError


class AdminRotator(Rotator):
    """originpool: its admin API drains the origin over ``over`` seconds (Close 1012)."""

    how = "POST /origins/drain?origin=URL&over=S, then /origins/undrain"

    def __init__(self, admin: tuple[str, int], over: float, first_port: int) -> None:
        self.admin, self.over, self._port = admin, over, first_port
        self._calls = 0

    def _post(self, what: str, address: tuple[str, int], **query: Any) -> dict[str, Any]:
        url = origin_url(address)
        path = f"/origins/{what}?" + urllib.parse.urlencode({"origin": url, **query})
        self._calls += 1
        # the runner's own ports (below the clients'), 50 of them from the window's 51st
        source = (ADMIN_SOURCE, self._port + self._calls % 50 if self._port else 0)
        try:
            status, body = admin_post(self.admin, path, source)
        except OSError as e:
            where = f"admin {self.admin[0]}:{self.admin[1]}"
            raise RotateError(url, what, f"{where}: {e}", e.errno) from e
        if status != 202 and not (what == "undrain" and status == 200):
            raise RotateError(url, what, f"HTTP {status}: {body.strip()[:300]}")
        try:
            answer = json.loads(body) if body.strip() else {}
        except ValueError:
            answer = {"body": body.strip()[:300]}
        return {"status": status, "answer": answer}

    def leave(self, address: tuple[str, int]) -> dict[str, Any]:
        return self._post("drain", address, over=f"{self.over:g}")

    def back(self, address: tuple[str, int]) -> dict[str, Any]:
        return self._post("undrain", address)


def server_lines(text: str, address: tuple[str, int]) -> list[int]:
    """Indexes of the nginx ``server HOST:PORT ...;`` lines naming this origin."""
    pattern = re.compile(rf"^\s*server\s+{re.escape(address[0])}:{address[1]}[\s;]")
    return [i for i, line in enumerate(text.splitlines()) if pattern.match(line)]


class NginxRotator(Rotator):
    """nginx: the origin's ``server`` line out of a copy of the config, ``nginx -s reload``;
    the line back and another reload."""

    how = "server line removed, nginx -s reload; put back, nginx -s reload"

    def __init__(self, binary: str, original: Path, copy: Path, hold: float) -> None:
        self.binary, self.original, self.copy, self.hold = binary, original, copy, hold

    def write(self, without: tuple[str, int] | None) -> int:
        """The copy, with this origin's lines commented out; returns how many."""
        lines = self.original.read_text().splitlines()
        gone = server_lines("\n".join(lines), without) if without else []
        for i in gone:
            lines[i] = "# rotated out: " + lines[i]
        self.copy.write_text("\n".join(lines) + "\n")
        return len(gone)

    def reload(self, origin: str, what: str) -> dict[str, Any]:
        argv = [self.binary, "-c", str(self.copy), "-s", "reload"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise RotateError(origin, what, f"{shlex.join(argv)}: exit {done.returncode}: "
                              f"{done.stderr.strip()[:300]}")  # fmt: skip
        return {"command": shlex.join(argv)}

    def leave(self, address: tuple[str, int]) -> dict[str, Any]:
        url = origin_url(address)
        removed = self.write(address)
        if removed == 0:
            raise RotateError(url, "drain", f"no 'server {address[0]}:{address[1]}' line in "
                              f"{self.original}")  # fmt: skip
        return {"server_lines_removed": removed, **self.reload(url, "drain")}

    def back(self, address: tuple[str, int]) -> dict[str, Any]:
        self.write(None)
        return self.reload(origin_url(address), "undrain")


def stats_socket_of(config: str) -> str | None:
    """The path of HAProxy's ``stats socket`` (the first one) in a config's text."""
    m = re.search(r"^\s*stats\s+socket\s+(\S+)", config, re.MULTILINE)
    return m.group(1) if m else None


def runtime_api(path: str, command: str, timeout: float = 10.0) -> str:
    """One command on HAProxy's stats socket (non-interactive mode: it answers and closes)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(command.encode() + b"\n")
        chunks: list[bytes] = []
        for _ in range(10000):  # bounded: a server list is a few KiB
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def servers_at(state: str, address: tuple[str, int]) -> list[str]:
    """``BACKEND/SERVER`` of every server line at this address, from ``show servers state``
    (columns: be_id be_name srv_id srv_name srv_addr ...; srv_port is the 19th)."""
    out = []
    for line in state.splitlines():
        cols = line.split()
        if len(cols) < 19 or not cols[0].isdigit():
            continue
        if cols[4] == address[0] and cols[18] == str(address[1]):
            out.append(f"{cols[1]}/{cols[3]}")
    return out


class HaproxyRotator(Rotator):
    """HAProxy: ``set server B/S state drain`` then ``shutdown sessions server B/S`` for every
    server line of the origin; ``set server B/S state ready`` to bring it back."""

    how = "set server state drain, shutdown sessions server; set server state ready"

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    def command(self, origin: str, what: str, command: str) -> str:
        try:
            answer = runtime_api(self.socket_path, command).strip()
        except OSError as e:
            where = f"stats socket {self.socket_path}"
            raise RotateError(origin, what, f"{where}: {e}", e.errno) from e
        if answer and not answer.startswith("#") and "\n" not in answer:
            raise RotateError(origin, what, f"{command!r}: {answer[:300]}")
        return answer

    def servers(self, address: tuple[str, int], what: str) -> list[str]:
        url = origin_url(address)
        found = servers_at(self.command(url, what, "show servers state"), address)
        if not found:
            raise RotateError(url, what, f"no server line at {address[0]}:{address[1]}")
        return found

    def leave(self, address: tuple[str, int]) -> dict[str, Any]:
        url = origin_url(address)
        names = self.servers(address, "drain")
        for name in names:
            self.command(url, "drain", f"set server {name} state drain")
        for name in names:
            self.command(url, "drain", f"shutdown sessions server {name}")
        return {"servers": names}

    def back(self, address: tuple[str, int]) -> dict[str, Any]:
        url = origin_url(address)
        names = self.servers(address, "undrain")
        for name in names:
            self.command(url, "undrain", f"set server {name} state ready")
        return {"servers": names}


def proxy_kind(proxy_cmd: str) -> tuple[str, str | None]:
    """(``nginx`` | ``haproxy`` | other, the config file its command names with -c / -f)."""
    argv = shlex.split(proxy_cmd)
    kind = os.path.basename(argv[0]) if argv else ""
    flag = {"nginx": "-c", "haproxy": "-f"}.get(kind)
    path = None
    if flag and flag in argv[:-1]:
        path = argv[argv.index(flag) + 1]
    return kind, path


class RotateRun(ScenarioRun):
    """The rotate scenario on the shared frame: ramp, then one step per origin."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.evidence: dict[str, dict[str, Any]] = {}
        self.rotator: Rotator | None = None
        self.nginx_copy = self.workdir / "nginx-rotate.conf"
        self.state_lines: list[dict[str, Any]] = []
        self._next_census = 0.0

    def on_line(self, child: Child, line: dict[str, Any]) -> None:
        """originpool's own word on each origin's state (``origin_state`` lines), kept for
        the evidence: which change happened when, and who made it."""
        super().on_line(child, line)
        wanted = child is self.proxy and line.get("event") == "origin_state"
        if wanted and len(self.state_lines) < 200:
            keys = ("origin", "old", "new", "by", "reason")
            t = round(time.monotonic() - self.t0, 3)
            self.state_lines.append({"t": t, **{k: line.get(k) for k in keys}})

    def proxy_argv(self) -> list[str]:
        """nginx runs on a copy of its config, the one the rotation edits."""
        argv = super().proxy_argv()
        kind, path = proxy_kind(self.options.proxy_cmd or "")
        if kind == "nginx" and path:
            self.nginx_copy.write_text(Path(path).read_text())
            argv[argv.index("-c") + 1] = str(self.nginx_copy)
        return argv

    def make_rotator(self) -> Rotator:
        opts = self.options
        assert opts.drain_over is not None and opts.reload_hold is not None
        if not opts.proxy_cmd:
            admin = self.admins[0] if self.admins else ADMIN
            first = self._admin_port + 50 if self._admin_port else 0
            return AdminRotator(admin, opts.drain_over, first)
        kind, path = proxy_kind(opts.proxy_cmd)
        assert path is not None  # Rotate.check refused anything else
        if kind == "nginx":
            binary = shlex.split(opts.proxy_cmd)[0]
            return NginxRotator(binary, Path(path), self.nginx_copy, opts.reload_hold)
        socket_path = stats_socket_of(Path(path).read_text())
        assert socket_path is not None
        return HaproxyRotator(socket_path)

    def body(self) -> None:
        self.ramp_to_target()
        self.rotator = self.make_rotator()
        for address in self.options.origin_addresses():
            self.rotate(address, self.rotator)

    def settled(self, drops_before: int, at_least: int) -> bool:
        """Every client reported since the step began, saw the drops and waits for nothing."""
        progressed = all(
            float(s.get("t", 0)) > self.t0 + self.steps[-1].t_start for s in self.state.values()
        )
        return (
            progressed
            and self.total("drops") - drops_before >= at_least
            and self.total("pending") == 0
        )

    def emptied(self, address: tuple[str, int]) -> bool:
        """No upstream connection to the origin left, asked of the kernel at most once a
        second: a dump of every established socket (30,000 at the default size) costs the
        runner CPU that the proxy, the origins and the clients share on a small machine."""
        now = time.monotonic()
        if now < self._next_census:
            return False
        self._next_census = now + 1.0
        return established_to({address}) == 0

    def rotate(self, address: tuple[str, int], rotator: Rotator) -> None:
        opts = self.options
        assert opts.drain_over is not None and opts.duration is not None
        name = f"rotate_{address[0]}"
        held = established_to({address})
        self.mark(name, disruption=True)
        t = time.monotonic()
        ev: dict[str, Any] = {"origin": origin_url(address), "how": rotator.how}
        ev["t_start"] = round(t - self.t0, 3)
        ev["sessions_on_origin"] = held
        drops_before = self.total("drops")
        ev["leave"] = rotator.leave(address)
        if rotator.hold:
            self.wait_or_timeout(lambda: False, rotator.hold)  # the measurement window
        window = opts.drain_over + opts.duration + 3 * opts.timeout
        emptied = self.wait_or_timeout(lambda: self.emptied(address), window)
        ev["emptied_s"] = round(time.monotonic() - t, 3) if emptied else None
        ev["left_on_origin"] = 0 if emptied else established_to({address})
        ev["clients_back"] = self.wait_or_timeout(
            lambda: self.settled(drops_before, held if emptied else 0), opts.duration
        )
        ev["restart_s"] = round(self.restart_origins([address], signal.SIGTERM), 3)
        ev["back"] = rotator.back(address)
        if rotator.hold:
            # a reload under nginx: its old worker holds (then drops) what it had
            drops = self.total("drops")
            self.wait_or_timeout(lambda: False, rotator.hold)
            self.wait_or_timeout(lambda: self.settled(drops, 0), opts.duration)
        ev["seconds"] = round(time.monotonic() - t, 3)
        ev["t_end"] = round(time.monotonic() - self.t0, 3)
        self.evidence[name] = ev

    def figures(self) -> dict[str, Any]:
        out = super().figures()
        doc, detail = out["doc"], out["detail"]
        for step in doc["steps"]:
            ev = self.evidence.get(step["name"])
            if ev is None:
                continue
            codes = Counter(step.get("close_codes") or {})
            ev["told_1012"] = codes.get("1012", 0)
            ev["every_client_told_1012"] = codes.get("1012", 0) >= ev["sessions_on_origin"]
        doc["evidence"] = self.evidence
        for ev in self.evidence.values():
            lo, hi = ev.get("t_start", 0.0), ev.get("t_end", math.inf)
            ev["proxy_origin_states"] = [x for x in self.state_lines if lo <= x["t"] <= hi]
        detail["drain_over"] = self.options.drain_over
        detail["rotated_by"] = self.rotator.how if self.rotator else None
        return out


@register
class Rotate(Scenario):
    name = "rotate"
    order = 4
    summary = "a rolling deploy: each origin drained, restarted and put back, one at a time"
    takes = ("target", "rate", "duration", "drain_over", "reload_hold", "tw_reuse")
    port_range: ClassVar[tuple[int, int] | None] = ROTATE_PORT_RANGE
    runner = RotateRun

    def defaults(self) -> None:
        opts = self.options
        set_default(opts, target=ROTATE_TARGET, rate=STORM_RATE, duration=STORM_WINDOW)
        set_default(opts, drain_over=DRAIN_OVER, reload_hold=RELOAD_HOLD)

    def check(self, given: set[str]) -> str | None:
        opts = self.options
        assert opts.drain_over is not None
        if opts.origins < 2:
            return "--scenario rotate needs --origins 2 or more: the others take the sessions"
        if not opts.drain_over > 0:
            return "--drain-over must be positive (seconds)"
        if opts.proxy_cmd:
            kind, path = proxy_kind(opts.proxy_cmd)
            if kind not in KNOWN_PROXIES or path is None:
                return (
                    "--scenario rotate with --proxy-cmd knows nginx (-c FILE) and HAProxy "
                    "(-f FILE with a 'stats socket' line): it must edit or ask that proxy"
                )
            if not Path(path).is_file():
                return f"--proxy-cmd: {path}: no such file"
            if kind == "haproxy" and stats_socket_of(Path(path).read_text()) is None:
                return f"--proxy-cmd: {path} has no 'stats socket PATH level admin' line"
            if "drain_over" in given:
                return "--drain-over applies to originpool only (nginx and HAProxy cut at once)"
        elif "reload_hold" in given:
            return "--reload-hold applies to --proxy-cmd nginx only (originpool drains)"
        problem = check_target(opts, 1.0) or ramp_check(opts)
        if problem:
            return problem
        one_out = (opts.origins - 1) * opts.egress * opts.size
        if storm_sessions(opts) > one_out:
            return (
                f"--target {opts.target:g}: {storm_sessions(opts):,} sessions do not fit on "
                f"{opts.origins - 1} origin(s) while one is out ({opts.egress} egress IPs x "
                f"{opts.size:,} ports each = {one_out:,}); lower it or widen --port-range"
            )
        return None

    def intro(self) -> str:
        opts = self.options
        assert opts.target is not None and opts.rate is not None
        if opts.proxy_cmd:
            how = f"told by {proxy_kind(opts.proxy_cmd)[0]}'s own interface"
        else:
            how = f"drained over {opts.drain_over:g} s by the admin API (Close 1012)"
        return (
            f"ramp to {opts.target:g} of the limit ({int(opts.target * opts.limit):,} sessions) "
            f"at {opts.rate:g}/s, then each of {opts.origins} origins in turn {how}, stopped, "
            f"started and put back; clients reconnect with jittered backoff"
        )

    def report_rows(self, detail: dict[str, Any]) -> list[tuple[str, str]]:
        rows = [("rotated by", str(detail.get("rotated_by")))]
        if detail.get("mode") != "proxy-cmd":
            rows.append(("drain window per origin", f"{detail.get('drain_over'):g} s"))
        errors = detail.get("proxy_upstream_errors")
        if errors:
            text = ", ".join(f"{k}: {v:,}" for k, v in sorted(errors.items()))
            rows.append(("proxy upstream errors (its log)", text))
        return rows + open_rate_rows(detail)

    def plot(self, doc: dict[str, Any], path: str) -> None:
        from testbed import scenario_report

        scenario_report.plot(doc, path, opens=True)
