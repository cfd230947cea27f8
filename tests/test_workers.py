"""The real `originpool serve` with WebSocket sessions open: workers = 2 sharing one listener
and the egress IPs (capacity to one destination still E x R), SIGTERM (Close 1001, exit 0)
and SIGHUP (sessions keep flowing, new config for new sessions)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import InvalidStatus

from pool import connectx_async
from tests.conftest import R
from tests.test_serve import Proc
from tests.test_websocket import echo

CONFIG = """
[listen]
address = "127.0.0.1:8080"
[admin]
address = "127.0.0.1:9090"
[egress]
addresses = ["127.0.1.1", "127.0.1.2"]
[[routes]]
host = "app.example"
origins = ["ws://127.0.2.1:9000"]
[pool]
max_connections = 4096
[proxy]
workers = {workers}
[timeouts]
drain = 5
"""


async def open_session(i: int):
    """A client from its own source IP via connectx, so clients never hold ports by bind()."""
    sock = socket.socket()
    sock.setblocking(False)
    await connectx_async(sock, (f"127.3.{i // 250}.{i % 250 + 1}", 0), ("127.0.0.1", 8080))
    return await connect("ws://app.example/", sock=sock, open_timeout=10)


def config(tmp_path: Path, workers: int) -> Path:
    path = tmp_path / "originpool.toml"
    path.write_text(CONFIG.replace("{workers}", str(workers)))
    return path


@pytest.fixture
async def origin(ns):
    async with serve(echo, "127.0.2.1", 9000) as server:
        yield server


async def test_two_workers_share_listener_and_reach_e_times_r(origin, tmp_path):
    proc = Proc(config(tmp_path, 2))
    sessions = []
    try:
        await asyncio.to_thread(proc.wait_for, "ready", 20, 2)  # both workers
        for i in range(2 * R):
            ws = await open_session(i)
            sessions.append(ws)
            await ws.send(f"m{i}")
            assert await ws.recv() == f"m{i}"
        with pytest.raises(InvalidStatus) as full:
            await open_session(2 * R)
        assert full.value.response.status_code == 503
        for ws in sessions:  # every session still alive and in order
            await ws.send("again")
            assert await ws.recv() == "again"
        workers = {
            line.get("worker")
            for line in proc.lines
            if line.get("event") == "access" and line.get("status") == 101
        }
        await asyncio.to_thread(proc.wait_for, "upstream_error")
        assert workers == {0, 1}, workers
    finally:
        for ws in sessions:
            await ws.close()
        assert await asyncio.to_thread(proc.stop) == 0


async def test_sigterm_sends_close_1001_and_exits_0(origin, tmp_path):
    proc = Proc(config(tmp_path, 1))
    await asyncio.to_thread(proc.wait_for, "ready")
    sessions = [await open_session(i) for i in range(5)]
    for ws in sessions:
        await ws.send("x")
        assert await ws.recv() == "x"
    os.kill(proc.p.pid, signal.SIGTERM)
    for ws in sessions:
        await asyncio.wait_for(ws.wait_closed(), 5)
        assert ws.close_code == 1001
    assert await asyncio.to_thread(proc.p.wait, 20) == 0


async def test_sighup_keeps_sessions_and_applies_to_new_ones(origin, tmp_path):
    path = config(tmp_path, 1)
    proc = Proc(path)
    try:
        await asyncio.to_thread(proc.wait_for, "ready")
        old = [await open_session(i) for i in range(5)]
        path.write_text(path.read_text().replace('"127.0.1.1", "127.0.1.2"', '"127.0.1.3"'))
        os.kill(proc.p.pid, signal.SIGHUP)
        await asyncio.to_thread(proc.wait_for, "reloaded")
        for ws in old:
            await ws.send("still here")
            assert await ws.recv() == "still here"
        new = await open_session(10)
        await new.send("n")
        assert await new.recv() == "n"
        await new.close()
        line = await asyncio.to_thread(proc.wait_for, "websocket_session")
        assert line["egress"] == "127.0.1.3"
        for ws in old:
            await ws.close()
    finally:
        assert await asyncio.to_thread(proc.stop) == 0
