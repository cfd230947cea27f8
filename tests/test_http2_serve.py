"""HTTP/2 through a real ``originpool serve``: a SIGHUP (reload) and a SIGTERM (drain) each
send GOAWAY NO_ERROR with the last stream id, and the stream in flight finishes whole.

Why through the CLI: the worker's reload and drain are what call ``drain()`` on each client
connection; an in-process test would test a copy of that wiring.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import h2.events
from hyperframe.frame import DataFrame, GoAwayFrame

from tests.test_http2 import H2Client, raw_frames
from tests.test_serve import Proc, write_config


async def _big_in_flight(size: int) -> tuple[H2Client, int, int]:
    client = await H2Client.open(8080)
    head, body = await client.get("/hello", authority=b"app.example")
    assert head[b":status"] == b"200" and body.startswith(b"hello")
    sid = client.request(f"/big/{size}", authority=b"app.example")
    # the client's 64 KiB window holds the rest at the proxy: the stream stays in flight
    await client.read(lambda c: c.of(sid, h2.events.DataReceived))
    got = sum(len(e.data) for e in client.of(sid, h2.events.DataReceived))
    assert got < size
    return client, sid, got


def _finished(frames: list, sid: int, got: int, size: int) -> GoAwayFrame:
    [goaway] = [f for f in frames if isinstance(f, GoAwayFrame)]
    assert goaway.error_code == 0 and goaway.last_stream_id == sid
    data = [f for f in frames if isinstance(f, DataFrame) and f.stream_id == sid]
    assert data and "END_STREAM" in data[-1].flags
    assert got + sum(len(f.data) for f in data) == size
    return goaway


async def test_reload_and_drain_send_goaway_and_finish_the_stream(origins, tmp_path) -> None:  # type: ignore[no-untyped-def]
    proc = Proc(write_config(tmp_path))
    try:
        await asyncio.to_thread(proc.wait_for, "ready")
        size = 2 << 20
        client, sid, got = await _big_in_flight(size)
        os.kill(proc.p.pid, signal.SIGHUP)
        await asyncio.to_thread(proc.wait_for, "reloaded")
        _finished(await raw_frames(client), sid, got, size)
        client.close()
        # the proxy still serves: a new connection, then SIGTERM's drain
        client, sid, got = await _big_in_flight(size)
        started = time.monotonic()
        os.kill(proc.p.pid, signal.SIGTERM)
        _finished(await raw_frames(client), sid, got, size)
        assert time.monotonic() - started < 5  # finished, not cut at the drain timeout
        client.close()
    finally:
        assert await asyncio.to_thread(proc.stop) == 0
