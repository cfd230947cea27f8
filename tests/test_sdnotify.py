"""sd_notify: READY=1 only once every worker accepts, STOPPING=1 when the drain starts, from
the process systemd watches (the master with workers > 1)."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from proxy import sdnotify
from tests.test_serve import Proc

CONFIG = """
[listen]
address = "127.0.0.1:8080"
[admin]
address = "127.0.0.1:9090"
[egress]
addresses = ["127.0.1.1"]
[[routes]]
host = "app.example"
origins = ["http://127.0.2.1:9000"]
[proxy]
workers = {workers}
[timeouts]
drain = 5
"""


def receiver(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)  # a bound on a stuck proxy, not a wait: recv returns on arrival
    return sock


def test_notify_needs_the_socket_and_speaks_the_protocol(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    for name in (str(tmp_path / "n"), f"@originpool-test-{os.getpid()}"):
        sock = receiver(name.replace("@", "\0", 1))
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        assert sdnotify.notify("READY=1\nSTATUS=x") is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=x"
        sock.close()
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    assert sdnotify.notify("READY=1") is False  # refused: logged nowhere, never raised


def accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_when_every_worker_accepts_and_stopping_at_sigterm(
    ns, tmp_path: Path, workers: int
) -> None:
    config = tmp_path / "originpool.toml"
    config.write_text(CONFIG.format(workers=workers))
    sock = receiver(str(tmp_path / "notify"))
    proc = Proc(config, env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        ready = sock.recv(4096).split(b"\n")
        assert b"READY=1" in ready, ready
        # at READY=1 the listener and every worker's admin listener (port + i) accept
        assert accepts(8080)
        assert all(accepts(9090 + i) for i in range(workers))
        os.kill(proc.p.pid, signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"  # the only other message: no second READY
        # the SIGTERM above is the only one: a second (Proc.stop) could land after the proxy
        # dropped its handlers on the way out and end it with -15
        assert proc.p.wait(timeout=20) == 0
    finally:
        if proc.p.poll() is None:
            proc.stop()
        sock.close()
