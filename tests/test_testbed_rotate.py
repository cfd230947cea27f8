"""``originpool testbed --scenario rotate``: how each proxy is told an origin leaves and returns
(against fakes of the admin API, nginx and HAProxy's stats socket), the origin's own count of
new sessions per half second, the scenario registry, and one small rotation end to end."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pool import netns
from testbed.scenario_options import only_for, scenarios
from testbed.scenarios.rotate import (
    AdminRotator,
    HaproxyRotator,
    NginxRotator,
    RotateError,
    proxy_kind,
    server_lines,
    servers_at,
    stats_socket_of,
)
from testbed.wsclient import ClientOptions, LoadClient
from testbed.wsorigin import OPENS_BUCKET, EchoOrigin

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "docs" / "testbed" / "nginx.conf"
HAPROXY_CFG = ROOT / "docs" / "testbed" / "haproxy.cfg"
O1, O2 = ("127.0.2.1", 9000), ("127.0.2.2", 9000)


# -- the registry ---------------------------------------------------------------------------


def test_every_scenario_is_a_registered_class_and_the_cli_offers_each():
    registry = scenarios()
    assert list(registry) == ["ramp", "churn", "storm", "faults", "rotate"]
    for name, cls in registry.items():
        assert cls.name == name and cls.summary
        assert cls.__module__ == f"testbed.scenarios.{name}"
    taken = only_for()
    assert taken["drain_over"] == ("rotate",)
    assert set(taken["target"]) == {"storm", "faults", "rotate"}
    done = subprocess.run(
        [sys.executable, "-m", "testbed", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0 and "rotate" in done.stdout and "--drain-over" in done.stdout


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--origins", "1"], "--origins"),
        (["--target", "0.6"], "do not fit"),
        (["--drain-over", "0"], "--drain-over"),
        (["--proxy-cmd", "envoy -c x.yaml"], "--proxy-cmd"),
        (["--proxy-cmd", f"nginx -c {NGINX_CONF}", "--drain-over", "5"], "--drain-over"),
        (["--reload-hold", "5"], "--reload-hold"),
        (["--storm-origins", "1"], "--storm-origins"),
    ],
)
def test_rotate_nonsense_is_refused_before_anything_starts(args, named):
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "testbed", "--scenario", "rotate", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert named in done.stderr and done.stdout == ""


def test_drain_over_belongs_to_rotate_only():
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "testbed", "--scenario", "storm", "--drain-over", "5"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 2 and "only rotate" in done.stderr


# -- originpool: the admin API --------------------------------------------------------------


class FakeAdmin:
    """An admin listener that records each request line and answers as the drain API does
    (202 for drain, 200 for undrain), or with ``status`` for every request."""

    def __init__(self, status: int | None = None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()[:2]
        self.requests: list[str] = []
        self.status = status
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        for _ in range(20):  # bounded: a test sends a handful
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                line = head.split(b"\r\n", 1)[0].decode()
                self.requests.append(line)
                status = self.status or (202 if "/drain?" in line else 200)
                body = json.dumps({"origin": "x", "sessions": 7, "over_s": 2.5}).encode()
                conn.sendall(
                    f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n".encode()
                    + body
                )

    def close(self) -> None:
        self.sock.close()


def test_admin_rotator_posts_drain_with_the_window_then_undrain(monkeypatch):
    monkeypatch.setattr("testbed.scenarios.rotate.ADMIN_SOURCE", "127.0.0.1")
    admin = FakeAdmin()
    try:
        rotator = AdminRotator(admin.address, 2.5, 0)
        left = rotator.leave(O1)
        back = rotator.back(O1)
    finally:
        admin.close()
    assert admin.requests == [
        "POST /origins/drain?origin=ws%3A%2F%2F127.0.2.1%3A9000&over=2.5 HTTP/1.1",
        "POST /origins/undrain?origin=ws%3A%2F%2F127.0.2.1%3A9000 HTTP/1.1",
    ]
    assert left == {"status": 202, "answer": {"origin": "x", "sessions": 7, "over_s": 2.5}}
    assert back["status"] == 200


def test_admin_rotator_refusal_is_a_typed_error_with_its_context(monkeypatch):
    monkeypatch.setattr("testbed.scenarios.rotate.ADMIN_SOURCE", "127.0.0.1")
    admin = FakeAdmin(status=404)
    try:
        with pytest.raises(RotateError) as info:
            AdminRotator(admin.address, 2.5, 0).leave(O2)
    finally:
        admin.close()
    assert info.value.origin == "ws://127.0.2.2:9000" and info.value.what == "drain"
    assert "HTTP 404" in str(info.value)
    unused = socket.socket()
    unused.bind(("127.0.0.1", 0))
    nowhere = unused.getsockname()[:2]
    unused.close()
    with pytest.raises(RotateError) as refused:  # nothing listens there
        AdminRotator(nowhere, 2.5, 0).leave(O2)
    assert refused.value.errno is not None


# -- nginx: the server line out and back, a reload each time ----------------------------------


def test_nginx_rotator_comments_out_exactly_the_origins_line_and_reloads(tmp_path):
    text = NGINX_CONF.read_text()
    assert len(server_lines(text, O1)) == 1 and len(server_lines(text, O2)) == 1
    calls = tmp_path / "calls"
    fake = tmp_path / "nginx"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    copy = tmp_path / "copy.conf"
    rotator = NginxRotator(str(fake), NGINX_CONF, copy, 0.0)
    left = rotator.leave(O1)
    assert left["server_lines_removed"] == 1
    edited = copy.read_text()
    assert server_lines(edited, O1) == [] and len(server_lines(edited, O2)) == 1
    assert edited.count("\n") == text.count("\n")  # commented out, nothing else moved
    rotator.back(O1)
    assert copy.read_text() == text
    assert calls.read_text().splitlines() == [f"-c {copy} -s reload"] * 2


def test_nginx_rotator_says_which_line_it_could_not_find(tmp_path):
    fake = tmp_path / "nginx"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    rotator = NginxRotator(str(fake), NGINX_CONF, tmp_path / "c.conf", 0.0)
    with pytest.raises(RotateError, match=r"no 'server 127\.0\.2\.9:9000' line"):
        rotator.leave(("127.0.2.9", 9000))


# -- HAProxy: the runtime API ---------------------------------------------------------------

SERVERS_STATE = """1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port
3 origins 1 o1-e1 127.0.2.1 2 0 1 1 5 6 3 4 6 0 0 0 - 9000 - 0 0 - - 0
3 origins 2 o1-e2 127.0.2.1 2 0 1 1 5 6 3 4 6 0 0 0 - 9000 - 0 0 - - 0
3 origins 5 o2-e1 127.0.2.2 2 0 1 1 5 6 3 4 6 0 0 0 - 9000 - 0 0 - - 0
"""  # noqa: E501 (HAProxy's own header line)


class FakeStatsSocket:
    """A stats socket answering ``show servers state`` and recording every command."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.commands: list[str] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        for _ in range(50):  # bounded
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                command = conn.recv(4096).decode().strip()
                self.commands.append(command)
                conn.sendall(SERVERS_STATE.encode() if command.startswith("show") else b"\n")

    def close(self) -> None:
        self.sock.close()


def test_haproxy_rotator_drains_then_shuts_sessions_then_readies_every_line(tmp_path):
    assert stats_socket_of(HAPROXY_CFG.read_text()) == "/tmp/originpool-testbed-haproxy.sock"
    assert servers_at(SERVERS_STATE, O1) == ["origins/o1-e1", "origins/o1-e2"]
    fake = FakeStatsSocket(tmp_path / "stats.sock")
    try:
        rotator = HaproxyRotator(str(fake.path))
        assert rotator.leave(O1) == {"servers": ["origins/o1-e1", "origins/o1-e2"]}
        rotator.back(O1)
    finally:
        fake.close()
    assert fake.commands == [
        "show servers state",
        "set server origins/o1-e1 state drain",
        "set server origins/o1-e2 state drain",
        "shutdown sessions server origins/o1-e1",
        "shutdown sessions server origins/o1-e2",
        "show servers state",
        "set server origins/o1-e1 state ready",
        "set server origins/o1-e2 state ready",
    ]


def test_haproxy_rotator_error_names_the_socket_and_errno(tmp_path):
    with pytest.raises(RotateError) as info:
        HaproxyRotator(str(tmp_path / "absent.sock")).leave(O1)
    assert str(tmp_path / "absent.sock") in str(info.value) and info.value.errno is not None


def test_proxy_kind_reads_the_config_a_proxy_command_names():
    assert proxy_kind(f"nginx -c {NGINX_CONF}") == ("nginx", str(NGINX_CONF))
    assert proxy_kind("/usr/sbin/haproxy -W -db -f /x.cfg") == ("haproxy", "/x.cfg")
    assert proxy_kind("envoy -c x") == ("envoy", None)


# -- the origin's own count of new sessions ------------------------------------------------


async def test_origin_counts_its_new_sessions_per_half_second_bucket(ns):
    origin = EchoOrigin()
    await origin.start([("127.0.2.1", 9000)])
    client = LoadClient(
        ClientOptions(
            connect=("127.0.2.1", 9000), host="o", sources=["127.0.0.1"], sessions=0, timeout=5
        )
    )
    sessions = []
    try:
        for i in range(30):
            session = await client._connect(i)
            assert await session.start("o", "/") == "ok"
            sessions.append(session)
        deadline = time.monotonic() + 5
        while origin.stats.sessions_total < 30 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # poll the origin's count, bounded
        now = int(time.monotonic() // OPENS_BUCKET)
        assert sum(origin.stats.opens.values()) == 30
        assert all(k <= now for k in origin.stats.opens)
        done = origin.stats.take_opens(now + 1)
        assert sum(done.values()) == 30 and origin.stats.opens == {}
        assert origin.stats.take_opens(now + 1) == {}  # each bucket reported once
    finally:
        for session in sessions:
            session.abort()
        await origin.close()


# -- one small rotation, end to end -----------------------------------------------------------


def test_small_rotation_loses_nothing_and_tells_every_moved_client_1012(tmp_path):
    """2 origins, 2 egress IPs x 100 ports: 120 sessions fit on one origin while the other
    is out, with room for the TIME_WAIT the first drain leaves towards it (at most the 60 it
    moved); each drain over 1 s. Every session is held, every client of a drained origin got
    Close 1012 and came back, no handshake failed, and each origin's new-session rate is in
    the steps and the document."""
    reason = netns.can_create()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "rotate.json"
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "testbed", "--scenario", "rotate", "--egress", "2",
         "--origins", "2", "--port-range", "40000-40099", "--target", "0.3",
         "--drain-over", "1", "--duration", "20", "--progress", "json", "--json", str(out),
         "--plot", str(tmp_path / "rotate.png")],
        capture_output=True, text=True, cwd=ROOT, timeout=180,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    doc = json.loads(out.read_text())
    assert [s["name"] for s in doc["steps"]] == ["ramp", "rotate_127.0.2.1", "rotate_127.0.2.2"]
    events = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    (result,) = [e for e in events if e["event"] == "scenario"]
    detail = result["detail"]
    assert detail["attempted"] == detail["held"] == 120 and detail["lost"] == 0
    for step in doc["steps"][1:]:
        ev = doc["evidence"][step["name"]]
        assert ev["sessions_on_origin"] > 0
        assert step["close_codes"] == {"1012": ev["sessions_on_origin"]}
        assert step["lost"] == 0 and step["failures"] == {}
        assert step["recovered_100_s"] is not None  # every dropped session came back
        assert ev["left_on_origin"] == 0 and ev["every_client_told_1012"]
        assert set(step["peak_new_sessions_per_s"]) == {"127.0.2.1:9000", "127.0.2.2:9000"}
    # the second origin's clients all went to the first, which counted them itself
    last = doc["steps"][2]
    assert last["peak_new_sessions_per_s"]["127.0.2.1:9000"] > 0
    assert sum(n for _, n in doc["new_sessions"]["127.0.2.1:9000"]) > 0
    assert (tmp_path / "rotate.png").stat().st_size > 0
