"""Egress IPs the host does not have: the kernel's facts, the probe, failover and its return,
the counters, and what check-config and serve say. Every test runs in a namespace of its own
whose ``lo`` holds only /32 addresses (with 127.0.0.1/8 every 127.x address is local)."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from pool import kernel, netns
from pool.connectx import connectx, is_local_address
from pool.egress import (
    NO_PORT,
    NOT_ON_HOST,
    Egress,
    EgressExhausted,
    EgressSet,
    EgressUnavailable,
)
from pool.egress_health import not_on_host
from pool.errors import ConnectError, Stage
from pool.metrics import collect
from tests.conftest import RANGE, Listeners, R, abort

ROOT = Path(__file__).resolve().parent.parent
DST = ("127.0.2.1", 9000)
E2 = ["127.0.1.1", "127.0.1.2"]
SLASH32 = {"addresses": ["127.0.1.1/32", "127.0.1.2/32", "127.0.2.1/32"]}


class FakeClock:
    """The pool's backoff clock, moved by the test: no waiting for a re-probe."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ns32(request: pytest.FixtureRequest) -> Iterator[netns.Namespace]:
    """A namespace whose lo has 127.0.0.1/32 instead of /8, plus the SLASH32 addresses."""
    reason = netns.can_create()
    if reason:
        pytest.skip(reason)
    with netns.namespace(port_range=RANGE, addresses=SLASH32["addresses"]) as space:
        space.ip("addr", "del", "127.0.0.1/8", "dev", "lo")
        space.ip("addr", "add", "127.0.0.1/32", "dev", "lo")
        yield space


def sample(pool: EgressSet, name: str, **labels: str) -> float:
    want = tuple(sorted(labels.items()))
    found = [s.value for s in collect(pool) if s.name == name and tuple(sorted(s.labels)) == want]
    return found[0] if found else 0.0


def close_all(held: list[tuple[socket.socket, object]]) -> None:
    for sock, slot in held:
        abort(sock)
        slot.release()  # type: ignore[attr-defined]
    held.clear()


# -- the kernel's facts the classification rests on --------------------------------------------


def test_same_errno_different_stage(ns32, listeners: Listeners) -> None:
    """Exhaustion fails connect(); an IP the host lacks fails bind(); one deleted between
    the two fails connect() with ENETUNREACH."""
    listeners.add(*DST)
    held = []
    try:
        for _ in range(R):
            s = socket.socket()
            held.append(s)
            connectx(s, ("127.0.1.1", 0), DST)
        with socket.socket() as s, pytest.raises(OSError) as full:
            connectx(s, ("127.0.1.1", 0), DST)
        assert (full.value.errno, full.value.stage) == (errno.EADDRNOTAVAIL, "connect")
        assert is_local_address("127.0.1.1")  # a full range is not an absent IP: no port taken

        with socket.socket() as s, pytest.raises(OSError) as absent:
            connectx(s, ("127.0.1.9", 0), DST)
        assert (absent.value.errno, absent.value.stage) == (errno.EADDRNOTAVAIL, "bind")

        with socket.socket() as s:
            s.setsockopt(kernel.SOL_IP, kernel.IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind(("127.0.1.2", 0))
            ns32.ip("addr", "del", "127.0.1.2/32", "dev", "lo")
            with pytest.raises(OSError) as gone:
                s.connect(DST)
            assert gone.value.errno == errno.ENETUNREACH
    finally:
        for s in held:
            abort(s)


def test_is_local_address_follows_the_namespace(ns32) -> None:
    assert is_local_address("127.0.1.1") and is_local_address("127.0.0.1")
    assert not is_local_address("127.0.1.9")
    ns32.ip("addr", "add", "127.0.1.9/32", "dev", "lo")
    assert is_local_address("127.0.1.9")
    ns32.ip("addr", "add", "127.5.0.0/16", "dev", "lo")  # a whole local subnet binds
    assert is_local_address("127.5.4.3")
    ns32.ip("addr", "add", "fd00::1/128", "dev", "lo", "nodad")
    assert is_local_address("fd00::1") and not is_local_address("fd00::2")
    # ip_nonlocal_bind = 1 (this namespace's own): every bind succeeds, the probe must not
    ns32.set_sysctl("net.ipv4.ip_nonlocal_bind", "1")
    with socket.socket() as s:
        s.bind(("127.0.1.8", 0))  # what a bind-only probe would have believed
    assert not is_local_address("127.0.1.8")
    assert is_local_address("127.0.1.1") and is_local_address("127.5.4.3")


# -- at run time: failover, counters, the return ---------------------------------------------


async def test_removed_ip_fails_over_counts_not_on_host_and_comes_back(ns32, listeners) -> None:
    listeners.add(*DST)
    clock = FakeClock()
    egress = EgressSet(E2, backoff=(1.0, 8.0), clock=clock)
    held: list[tuple[socket.socket, object]] = []
    try:
        for _ in range(20):
            held.append(await egress.connect(DST))
        assert egress.live_by_egress() == {"127.0.1.1": 10, "127.0.1.2": 10}

        ns32.ip("addr", "del", "127.0.1.2/32", "dev", "lo")
        with capture_logs() as logs:
            for _ in range(10):
                sock, slot = await egress.connect(DST)
                held.append((sock, slot))
                assert slot.egress.ip == "127.0.1.1"
        assert egress.live_by_egress() == {"127.0.1.1": 20, "127.0.1.2": 10}
        down = [e for e in logs if e["event"] == "egress_down"]
        assert len(down) == 1  # found once, then skipped until the backoff is over
        assert down[0]["egress"] == "127.0.1.2" and down[0]["destination"] == "127.0.2.1:9000"
        assert (down[0]["errno"], down[0]["reason"]) == (
            "EADDRNOTAVAIL",
            "egress IP not on this host",
        )
        assert not any(e["event"] in ("egress_exhausted", "egress_unavailable") for e in logs)
        failover = "originpool_egress_failover_total"
        assert sample(egress, failover, egress="127.0.1.2", reason=NOT_ON_HOST) == 1
        assert sample(egress, failover, egress="127.0.1.2", reason=NO_PORT) == 0
        assert sample(egress, "originpool_egress_down", egress="127.0.1.2") == 1
        assert sample(egress, "originpool_egress_exhausted_total") == 0

        ns32.ip("addr", "add", "127.0.1.2/32", "dev", "lo")
        clock.now += 1.01  # the backoff is over: the next connect probes it
        with capture_logs() as logs:
            sock, slot = await egress.connect(DST)
        held.append((sock, slot))
        assert slot.egress.ip == "127.0.1.2"  # the emptier one, back in use
        assert [e["egress"] for e in logs if e["event"] == "egress_up"] == ["127.0.1.2"]
        assert sample(egress, "originpool_egress_down", egress="127.0.1.2") == 0
        for _ in range(9):
            held.append(await egress.connect(DST))
        assert egress.live_by_egress() == {"127.0.1.1": 20, "127.0.1.2": 20}
    finally:
        close_all(held)


async def test_every_ip_gone_is_not_on_host_never_exhaustion(ns32, listeners) -> None:
    listeners.add(*DST)
    egress = EgressSet(E2, clock=FakeClock())
    ns32.ip("addr", "del", "127.0.1.1/32", "dev", "lo")
    ns32.ip("addr", "del", "127.0.1.2/32", "dev", "lo")
    with capture_logs() as logs, pytest.raises(EgressUnavailable) as gone:
        await egress.connect(DST)
    assert isinstance(gone.value, EgressExhausted)  # the proxy's 503 path stays the same
    assert gone.value.errno == errno.EADDRNOTAVAIL
    message = str(gone.value)
    assert "egress IP not on this host" in message and "no source port left" not in message
    assert "127.0.1.1" in message and "127.0.1.2" in message and "127.0.2.1:9000" in message
    (line,) = [e for e in logs if e["event"] == "egress_unavailable"]
    assert sorted(line["egress"]) == E2 and line["destination"] == "127.0.2.1:9000"
    assert (line["errno"], line["reason"]) == ("EADDRNOTAVAIL", "egress IP not on this host")
    assert not any(e["event"] == "egress_exhausted" for e in logs)

    with pytest.raises(EgressUnavailable) as skipped:  # both down: none tried, both named
        await egress.connect(DST)
    assert skipped.value.attempts == [] and sorted(skipped.value.not_on_host) == E2
    assert "127.0.1.1: down (egress IP not on this host)" in str(skipped.value)
    assert sample(egress, "originpool_egress_unavailable_total") == 2
    assert sample(egress, "originpool_egress_exhausted_total") == 0


async def test_full_and_gone_together_say_which_is_which(ns32, listeners) -> None:
    listeners.add(*DST)
    egress = EgressSet(E2, clock=FakeClock())
    held: list[tuple[socket.socket, object]] = []
    try:
        for _ in range(2 * R):
            held.append(await egress.connect(DST))
        ns32.ip("addr", "del", "127.0.1.2/32", "dev", "lo")
        with pytest.raises(EgressExhausted) as refused:
            await egress.connect(DST)
        assert not isinstance(refused.value, EgressUnavailable)
        assert "127.0.1.1: EADDRNOTAVAIL (Cannot assign requested address)" in str(refused.value)
        assert "127.0.1.2: EADDRNOTAVAIL (egress IP not on this host)" in str(refused.value)
        failover = "originpool_egress_failover_total"
        assert sample(egress, failover, egress="127.0.1.1", reason=NO_PORT) == 1
        assert sample(egress, failover, egress="127.0.1.2", reason=NOT_ON_HOST) == 1
    finally:
        close_all(held)


async def test_a_busy_pair_losing_its_ip_parks_no_ports(ns32, listeners) -> None:
    """Busy pairs connect through one-port windows from the free-port record; a bind refused
    because the IP is gone is not that port's fault and must not park it for a minute."""
    listeners.add(*DST)
    clock = FakeClock()
    egress = EgressSet(["127.0.1.1"], clock=clock)
    held: list[tuple[socket.socket, object]] = []
    try:
        for _ in range(R // 2 + 8):  # past busy_threshold: the record is in use
            held.append(await egress.connect(DST))
        pair = egress._pairs[(Egress("127.0.1.1"), DST)]
        assert pair.free is not None
        ns32.ip("addr", "del", "127.0.1.1/32", "dev", "lo")
        with pytest.raises(EgressUnavailable):
            await egress.connect(DST)
        assert list(pair.parked) == []
        ns32.ip("addr", "add", "127.0.1.1/32", "dev", "lo")
        clock.now += 1.01
        while len(held) < R:  # the whole range again, through the record
            held.append(await egress.connect(DST))
        assert len({s.getsockname()[1] for s, _ in held}) == R
    finally:
        close_all(held)


def test_connect_stage_failures_are_checked_against_presence(ns32) -> None:
    here, gone = Egress("127.0.1.1"), Egress("127.0.1.9")

    def err(code: int, stage: Stage | None) -> OSError:
        if stage is None:
            return OSError(code, os.strerror(code))
        return ConnectError.of(code, stage, (gone.ip, 0), ("127.0.2.1", 80))

    check = not_on_host
    assert check(gone, err(errno.EADDRNOTAVAIL, "bind"), errno.EADDRNOTAVAIL)
    assert not check(here, err(errno.EADDRINUSE, "bind"), errno.EADDRINUSE)  # bind mode, full
    assert not check(here, err(errno.EADDRNOTAVAIL, "connect"), errno.EADDRNOTAVAIL)  # full
    assert check(gone, err(errno.ENETUNREACH, "connect"), errno.ENETUNREACH)  # deleted midway
    assert not check(here, err(errno.ENETUNREACH, None), errno.ENETUNREACH)  # a real route fault
    assert not check(gone, err(errno.ECONNREFUSED, "connect"), errno.ECONNREFUSED)
    assert not check(Egress(""), err(errno.EADDRNOTAVAIL, "bind"), errno.EADDRNOTAVAIL)


# -- at start: check-config and serve ---------------------------------------------------------

CONFIG = """
[listen]
address = "127.0.0.1:8080"
[admin]
address = "127.0.0.1:9090"
[egress]
addresses = {addresses}
{extra}
[[routes]]
host = "app.example"
origins = ["http://127.0.2.1:9000"]
[timeouts]
drain = 1
[log]
format = "json"
"""


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_check_config_and_serve_refuse_an_ip_the_host_lacks(ns32, tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(CONFIG.format(addresses='["127.0.1.1", "127.0.1.2", "127.0.1.9"]', extra=""))
    expected = (
        f"{path}: egress.addresses[2]: 127.0.1.9 is not assigned to any interface in this "
        "namespace (add it, see deploy/egress-ips.md; or set [egress] allow_unassigned = true "
        "if it is added after the proxy starts)\n"
    )
    checked = cli("check-config", str(path))
    assert (checked.returncode, checked.stdout, checked.stderr) == (2, "", expected)
    served = cli("serve", "--config", str(path))  # refuses before it binds anything
    assert (served.returncode, served.stderr) == (2, expected)

    ns32.ip("addr", "add", "127.0.1.9/32", "dev", "lo")
    checked = cli("check-config", str(path))
    assert (checked.returncode, checked.stderr) == (0, "")


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args: object) -> None:
        pass


def test_serve_with_allow_unassigned_warns_503s_and_takes_the_ip_when_added(
    ns32, tmp_path: Path
) -> None:
    # clients, proxy and origin share this namespace's ports, and the retries below leave
    # connections in TIME_WAIT: a 128-port range would run out before the IP is back
    ns32.set_port_range(20000, 60999)
    origin = ThreadingHTTPServer(DST, _Hello)  # its socket is made here, in the namespace
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    path = tmp_path / "p.toml"
    path.write_text(CONFIG.format(addresses='["127.0.1.9"]', extra="allow_unassigned = true"))
    checked = cli("check-config", str(path))
    assert checked.returncode == 0 and checked.stdout.startswith(f"{path}: ok (")
    assert checked.stderr == (
        f"{path}: egress.addresses[0]: warning: 127.0.1.9 is not assigned to any interface in "
        "this namespace; allow_unassigned = true: the pool keeps it down and uses it once it "
        "is added\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines: list[dict] = []

    def until(event: str) -> dict:
        assert proc.stdout is not None
        for raw in proc.stdout:  # blocks on the proxy's own log lines: the synchronisation
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue
            if lines[-1].get("event") == event:
                return lines[-1]
        raise AssertionError(f"no {event!r} line; got {[ln.get('event') for ln in lines]}")

    try:
        warned = until("config_warning")
        assert "egress.addresses[0]: warning: 127.0.1.9 is not assigned" in warned["problem"]
        until("ready")
        with httpx.Client(base_url="http://127.0.0.1:8080", headers={"host": "app.example"}) as c:
            refused = c.get("/")
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            error = until("upstream_error")
            assert error["errno"] == "EADDRNOTAVAIL" and error["destination"] == "127.0.2.1:9000"
            assert "egress IP not on this host" in error["error"] and "127.0.1.9" in error["error"]
            assert "no source port left" not in error["error"]
            metrics = httpx.get("http://127.0.0.1:9090/metrics").text
            # known down from the start (the kernel's address list, pool.addrwatch): not tried
            assert 'originpool_egress_down{egress="127.0.1.9"} 1' in metrics
            assert "originpool_egress_failover_total" not in metrics
            assert "originpool_egress_exhausted_total 0" in metrics

            ns32.ip("addr", "add", "127.0.1.9/32", "dev", "lo")  # no reload, no restart
            # up once the worker has read the kernel's announcement: until then, refused
            deadline = time.monotonic() + 15
            got = c.get("/")
            while got.status_code != 200 and time.monotonic() < deadline:
                until("upstream_error")  # each refusal is logged: wait for it, then try again
                got = c.get("/")
            assert got.status_code == 200 and got.text == "hello"
        assert until("egress_up")["egress"] == "127.0.1.9"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            origin.shutdown()
            origin.server_close()
