"""The log sink: whole lines, at most PIPE_BUF per write, nothing held past a loop turn, and
access lines identical to what structlog renders for the same fields."""

from __future__ import annotations

import asyncio
import json
import os
import select

import pytest
import structlog

from proxy import logs


@pytest.fixture(autouse=True)
def _no_lasting_configuration(monkeypatch):
    """logs.configure() is process-wide: loggers it caches, and the access lines' direct
    path, would bypass structlog.testing.capture_logs in every test that runs after these."""
    real = structlog.configure
    monkeypatch.setattr(
        structlog, "configure", lambda **kw: real(**{**kw, "cache_logger_on_first_use": False})
    )
    yield
    structlog.reset_defaults()
    logs._access_json = False


def read_all(fd: int) -> bytes:
    out = b""
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out += chunk
    return out


def test_outside_a_loop_every_flush_writes() -> None:
    r, w = os.pipe()
    try:
        sink = logs.TurnBuffer(w)
        sink.write(b'{"a":1}\n')
        sink.flush()
        assert read_all(r) == b'{"a":1}\n'
    finally:
        os.close(r)
        os.close(w)


def test_lines_of_one_turn_leave_together_in_whole_lines_of_at_most_pipe_buf() -> None:
    r, w = os.pipe()
    writes: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes) -> int:
        if fd == w:
            writes.append(len(data))
        return real_write(fd, data)

    async def turn() -> bytes:
        sink = logs.TurnBuffer(w)
        for i in range(200):
            sink.write(b'{"line":%d,"pad":"%s"}\n' % (i, b"x" * 60))
            sink.flush()
        held = read_all(r)  # nothing yet: the turn has not ended
        await asyncio.sleep(0)
        return held

    os.write = counting_write  # type: ignore[assignment]
    try:
        held = asyncio.run(turn())
    finally:
        os.write = real_write  # type: ignore[assignment]
    data = read_all(r)
    os.close(r)
    os.close(w)
    assert held == b""
    lines = data.splitlines()
    assert [json.loads(line)["line"] for line in lines] == list(range(200))
    assert len(writes) > 1 and max(writes) <= select.PIPE_BUF
    assert sum(writes) == len(data)


def test_access_line_is_the_line_structlog_renders(capfd) -> None:
    logs.configure("json")
    structlog.contextvars.bind_contextvars(worker=3)
    try:
        fields = {"method": "GET", "path": "/a", "status": 200, "origin": None, "bytes": 13}
        structlog.get_logger("t").info("access", **fields)
        logs.access(dict(fields))
        logs.flush()
    finally:
        structlog.contextvars.clear_contextvars()
    slow, fast = [json.loads(line) for line in capfd.readouterr().out.splitlines()[-2:]]
    assert slow.pop("timestamp")[:16] == fast.pop("timestamp")[:16]
    assert list(slow.items()) == list(fast.items())
    assert fast["event"] == "access" and fast["worker"] == 3
