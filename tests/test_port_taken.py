"""``originpool serve`` when a listening address cannot be had (issue 18, item 3): one line
naming ``listen[i]`` or ``admin`` and the reason, exit status 1, fast, whatever the worker
count, because every socket is bound before the first fork. And a worker that dies at start
says why, in its own ``worker_failed`` line and in the master's lines.

Every case runs the real ``serve`` in a namespace of the test's own, against a real holder
socket (with and without SO_REUSEPORT: a holder of the same uid with SO_REUSEPORT must not be
joined silently)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from proxy import binding
from proxy.app import _run_logged
from proxy.config import parse
from tests.test_serve import Proc

CONFIG = """
[[listen]]
address = "127.0.0.1:8080"
[[listen]]
address = "{second}"
[admin]
address = "127.0.0.1:9090"
[egress]
addresses = ["127.0.0.1"]
[[routes]]
host = "app.example"
origins = ["http://127.0.2.1:9000"]
[proxy]
workers = {workers}
[log]
format = "json"
"""


def write_config(tmp_path: Path, workers: int, second: str = "127.0.0.1:8081") -> Path:
    path = tmp_path / "originpool.toml"
    path.write_text(CONFIG.format(workers=workers, second=second))
    return path


@contextlib.contextmanager
def holder(port: int, reuse_port: bool) -> Iterator[socket.socket]:
    """Another program's listener on the port (this process: same uid, as the worst case)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    try:
        yield sock
    finally:
        sock.close()


def run_serve(config: Path, prefix: list[str] | None = None) -> tuple[int, str, str, float]:
    """(exit status, stderr, stdout, seconds); bounded: a serve that does not exit in 20 s
    (the bug: it would be serving, or restarting workers) is killed and fails the test."""
    started = time.monotonic()
    argv = [*(prefix or []), sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        raise AssertionError("serve did not exit within 20 s") from None
    return proc.returncode, err.decode(), out.decode(), time.monotonic() - started


def in_use(what: str, port: int) -> str:
    return (
        f"{what}: 127.0.0.1:{port}: address already in use "
        f"(another process holds it: ss -ltnp 'sport = :{port}')\n"
    )


TAKEN = [
    pytest.param(1, 8080, "listen[0]", id="1-worker-listen"),
    pytest.param(2, 8080, "listen[0]", id="2-workers-listen"),
    pytest.param(4, 8081, "listen[1]", id="4-workers-second-listener"),
    pytest.param(1, 9090, "admin", id="1-worker-admin"),
    pytest.param(2, 9091, "admin (worker 1: admin port + 1)", id="2-workers-admin-of-worker-1"),
]


@pytest.mark.parametrize("reuse_port", [False, True], ids=["holder-plain", "holder-reuseport"])
@pytest.mark.parametrize(("workers", "port", "what"), TAKEN)
def test_a_taken_port_is_one_line_and_exit_1(ns, tmp_path, workers, port, what, reuse_port):
    with holder(port, reuse_port) as held:
        code, err, out, seconds = run_serve(write_config(tmp_path, workers))
        assert held.fileno() >= 0
    assert (code, err) == (1, in_use(what, port)), out[-2000:]
    assert "worker_died" not in out and "Traceback" not in err
    assert seconds < 5, seconds  # ~0.3 s here: no worker ever started


def test_an_address_not_on_the_host_names_its_listener(ns, tmp_path):
    code, err, _out, _s = run_serve(write_config(tmp_path, 2, second="10.255.255.1:8080"))
    assert (code, err) == (
        1,
        "listen[1]: 10.255.255.1:8080: address not available "
        "(10.255.255.1 is not assigned to any interface in this namespace)\n",
    )


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
def test_a_low_port_without_the_capability_is_permission_denied(ns, tmp_path):
    config = write_config(tmp_path, 2, second="127.0.0.1:80")
    drop = ["setpriv", "--bounding-set=-net_bind_service", "--"]
    code, err, _out, _s = run_serve(config, prefix=drop)
    assert (code, err) == (
        1,
        "listen[1]: 127.0.0.1:80: permission denied (ports below 1024 need root or "
        "CAP_NET_BIND_SERVICE; see net.ipv4.ip_unprivileged_port_start)\n",
    )


TLS_CONFIG = """
[listen]
address = "127.0.0.1:8443"
tls_cert = "{cert}"
tls_key = "{key}"
[admin]
address = "127.0.0.1:9090"
[egress]
addresses = ["127.0.0.1"]
[[routes]]
host = "app.example"
origins = ["http://127.0.2.1:9000"]
[proxy]
workers = 2
[log]
format = "json"
"""


def test_a_worker_that_dies_at_start_says_why(ns, tmp_path):
    """A certificate replaced by a broken file after start: the next worker to start fails
    loading it. Its ``worker_failed`` line carries the error, the master's ``worker_died``
    names it, and when restarts keep failing ``workers_keep_dying`` names the last reason."""
    trustme = pytest.importorskip("trustme")
    cert = trustme.CA().issue_cert("app.example")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    config = tmp_path / "originpool.toml"
    config.write_text(TLS_CONFIG.format(cert=cert_path, key=key_path))
    proc = Proc(config)
    try:
        proc.wait_for("ready", 20, 2)
        pid = next(ln["pid"] for ln in proc.lines if ln.get("event") == "ready")
        cert_path.write_text("not a certificate\n")
        os.kill(pid, signal.SIGKILL)  # a worker this test's serve started, by its PID
        died = proc.wait_for("worker_died")
        assert died["reason"] == "killed by SIGKILL", died
        failed = proc.wait_for("worker_failed")
        assert "PEM" in failed["error"], failed  # the certificate's loading error
        assert "Traceback" in failed.get("exception", ""), failed
        second = proc.wait_for("worker_died", count=2)
        assert second["reason"] == failed["error"], second
        gave_up = proc.wait_for("workers_keep_dying")
        assert "PEM" in gave_up["last_reason"], gave_up
        assert proc.p.wait(timeout=20) == 1
    finally:
        proc.stop()


def test_a_worker_restarted_after_a_reload_serves_the_sockets_bound_at_start(ns, tmp_path):
    """A reload that adds a listener cannot bind it (the master bound everything at start):
    one warning says so, and a worker restarted afterwards comes up on the sockets the
    master holds instead of dying on a listener it has no socket for."""
    config = write_config(tmp_path, 2)
    proc = Proc(config)
    try:
        proc.wait_for("ready", 20, 2)
        more = '[[listen]]\naddress = "127.0.0.1:8082"\n[admin]'
        config.write_text(config.read_text().replace("[admin]", more))
        os.kill(proc.p.pid, signal.SIGHUP)
        proc.wait_for("reloaded", 20, 2)  # both workers: the master has the new config
        pid = next(ln["pid"] for ln in proc.lines if ln.get("event") == "ready")
        os.kill(pid, signal.SIGKILL)  # a worker this test's serve started, by its PID
        again = proc.wait_for("ready", 20, 3)
        assert again["listen"] == ["127.0.0.1:8080", "127.0.0.1:8081"], again
        assert not [ln for ln in proc.lines if ln.get("event") == "worker_failed"]
        kept = proc.wait_for("reload_kept_listeners")
        assert kept["listen"] == ["127.0.0.1:8080", "127.0.0.1:8081"], kept
    finally:
        assert proc.stop() == 0


def test_a_lone_worker_that_fails_at_start_logs_why_and_exits_1(ns):
    """workers = 1 runs in serve's own process: its failure is a worker_failed line with
    the error, not a bare traceback (here: a worker handed fewer sockets than listeners)."""
    config = parse(CONFIG.format(workers=1, second="127.0.0.1:8081"), "t.toml")
    bound = binding.bind_all([s.address for s in config.listen], config.admin, 1)
    short = binding.WorkerSockets(bound.for_worker(0).listen[:1], bound.for_worker(0).admin)
    try:
        with capture_logs() as logs:
            code, reason = _run_logged(config, None, short, 0)
    finally:
        bound.close()
    assert code == 1 and reason is not None and reason.startswith("ValueError: "), reason
    failed = [line for line in logs if line["event"] == "worker_failed"]
    assert [line["error"] for line in failed] == [reason]


def test_connections_queued_on_a_worker_that_dies_are_answered_by_its_successor(ns, tmp_path):
    """The master holds every worker's sockets, so the connections waiting in a dead
    worker's accept queue are taken by the worker restarted in its place; a socket the
    worker had bound itself died with it and reset them."""
    proc = Proc(write_config(tmp_path, 2))
    try:
        proc.wait_for("ready", 20, 2)
        stuck = next(
            ln["pid"] for ln in proc.lines if ln.get("event") == "ready" and ln["worker"] == 1
        )
        os.kill(stuck, signal.SIGSTOP)  # worker 1 stops accepting; its queue fills
        clients = []
        for i in range(40):  # many source addresses: the kernel's hash spreads them
            sock = socket.socket()
            sock.bind((f"127.3.0.{i + 1}", 0))
            sock.connect(("127.0.0.1", 8080))  # the kernel completes the handshake itself
            sock.sendall(b"GET / HTTP/1.1\r\nHost: nowhere.test\r\nConnection: close\r\n\r\n")
            clients.append(sock)
        os.kill(stuck, signal.SIGKILL)  # by its PID; SIGKILL ends a stopped process too
        answers = []
        for sock in clients:
            sock.settimeout(20)
            try:
                answers.append(sock.recv(12))
            except OSError as e:
                answers.append(type(e).__name__.encode())
            finally:
                sock.close()
        assert answers == [b"HTTP/1.1 421"] * 40, answers
        restarted = proc.wait_for("ready", 20, 3)
        assert restarted["worker"] == 1
    finally:
        assert proc.stop() == 0
