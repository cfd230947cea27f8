"""What an idle WebSocket session pins in the proxy's own objects (issue 22's memory target).

A session lives for days, so every object it keeps is paid per session for as long as it
lives: the target is <= 4 KB of RSS per idle session, of which the two event-loop transports
take ~2.4 KB. This guards the rest: the bytes allocated by lines of ``proxy/`` and ``pool/``
(the client connection, the tunnel, the upstream connection, its egress slot and what they
hold) that are still alive while N sessions sit idle, per session, under tracemalloc. The
transports themselves are the event loop's and are not counted here (their share is the
bench's: ``bench/ws_side_by_side.py --skip-relay --only originpool``).

Measured when written: 1,170 bytes per session on the asyncio loop; 1,969 before issue 22's
changes (a ``weakref.finalize`` per slot, the ``getsockname()`` tuple, a second slot object,
the connection's HTTP timers and addresses kept after the 101), which this test fails.
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import serve

from tests.test_websocket import ORIGIN, echo, make_proxy

ROOT = Path(__file__).resolve().parent.parent
OURS = [tracemalloc.Filter(True, str(ROOT / pkg / "*")) for pkg in ("proxy", "pool")]
SESSIONS = 300
BUDGET = 1_300  # bytes per idle session, the proxy's own objects (see the docstring)


async def until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.01)


async def open_idle(rig, n: int) -> list[ClientConnection]:
    """n sessions, each having relayed one echo, then quiet."""
    held = []
    for i in range(n):
        ws = await rig.connect(compression=None).__aenter__()
        await ws.send(f"hello {i}")
        assert await ws.recv() == f"hello {i}"
        held.append(ws)
    return held


@pytest.mark.parametrize("ns", [{"port_range": (20000, 60999)}], indirect=True)
async def test_an_idle_session_pins_little_of_the_proxys_own(ns) -> None:
    rig = make_proxy()
    proxy = rig.proxy
    async with serve(echo, *ORIGIN, compression=None):
        warm = await open_idle(rig, 30)  # first-use caches and lazy imports, not sessions
        for ws in warm:
            await ws.close()
        await until(lambda: not proxy.sessions and not proxy.clients, "warm-up sessions gone")
        gc.collect()
        tracemalloc.start(1)
        try:
            before = tracemalloc.take_snapshot().filter_traces(OURS)
            held = await open_idle(rig, SESSIONS)
            await until(lambda: len(proxy.sessions) == SESSIONS, "sessions held")
            gc.collect()
            during = tracemalloc.take_snapshot().filter_traces(OURS)
        finally:
            tracemalloc.stop()
        grown = sum(d.size_diff for d in during.compare_to(before, "lineno"))
        per_session = grown / SESSIONS
        top = sorted(during.compare_to(before, "lineno"), key=lambda d: -d.size_diff)[:8]
        where = "\n".join(f"{d.size_diff / SESSIONS:7.0f} B  {d.traceback}" for d in top)
        for ws in held:
            await ws.close()
        await until(lambda: not proxy.sessions, "sessions closed")
    rig.listener.close()
    await proxy.pool.close()
    print(f"idle session: {per_session:.0f} B of the proxy's own objects")
    assert per_session <= BUDGET, f"{per_session:.0f} B per idle session:\n{where}"
    assert per_session > 300, f"{per_session:.0f} B: the measure missed the sessions"


async def test_a_tunnels_client_connection_keeps_no_http_state(ns) -> None:
    """After the 101 the client connection keeps no HTTP deadline, address or parser; a
    session that needs its timer again (a close) gets one of its own, never a shared one."""
    from proxy import server

    rig = make_proxy()
    async with serve(echo, *ORIGIN, compression=None):
        (ws,) = await open_idle(rig, 1)
        (down,) = list(rig.proxy.clients)
        tunnel = down.exchange
        assert tunnel is not None and tunnel.tunnel
        assert down._timer is server._SPENT_TIMER and down._ex_timer is server._SPENT_TIMER
        assert down.http is server._SPENT_SERVER
        assert down.peer == ("", 0) and down.client_ip == b""
        assert tunnel.last_activity is None  # no idle timeout: no clock read per chunk
        assert tunnel.conn.fd == -1
        await ws.close()
        await until(lambda: not rig.proxy.sessions, "session closed")
        assert server._SPENT_TIMER._handle is None and server._SPENT_TIMER._callback is None
    rig.listener.close()
    await rig.proxy.pool.close()
