"""Draining an origin through a real ``originpool serve`` (issue 20 §1): real WebSocket
sessions on two origins, the drain asked on the admin listener, the CLI or by a reload, and
the closes' timestamps as the clients saw them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from proxy.drain import WINDOW, busiest_half_second
from tests.test_serve import Proc

A, B = "ws://127.0.2.1:9000", "ws://127.0.2.2:9000"
ADMIN = "http://127.0.0.1:9090"

CONFIG = """
[listen]
address = "127.0.0.1:8080"
[admin]
address = "127.0.0.1:9090"
{admin_extra}
[egress]
addresses = ["127.0.1.1"]
[proxy]
workers = {workers}
[[routes]]
host = "app.test"
origins = {origins}
[timeouts]
drain = 5
[websocket]
drain_over = {drain_over}
[log]
format = "json"
"""


def config(
    tmp_path: Path,
    origins: str = f'["{A}", "{B}"]',
    workers: int = 1,
    drain_over: float = 30,
    admin_extra: str = "",
) -> Path:
    path = tmp_path / "originpool.toml"
    path.write_text(
        CONFIG.format(
            origins=origins, workers=workers, drain_over=drain_over, admin_extra=admin_extra
        )
    )
    return path


@dataclass
class Origins:
    """Two echo origins that prefix each answer with their name and keep, per session, the
    Close code the proxy sent them."""

    codes: dict[str, list[int | None]] = field(default_factory=lambda: {"A": [], "B": []})
    live: dict[str, int] = field(default_factory=lambda: {"A": 0, "B": 0})

    def handler(self, name: str):
        async def echo(conn: ServerConnection) -> None:
            self.live[name] += 1
            try:
                async for message in conn:
                    await conn.send(f"{name}:{message}")
            except ConnectionClosed:
                pass
            finally:
                self.live[name] -= 1
                self.codes[name].append(conn.close_code)

        return echo


@pytest.fixture
async def ws_origins(ns) -> AsyncIterator[Origins]:
    seen = Origins()
    async with (
        serve(seen.handler("A"), "127.0.2.1", 9000),
        serve(seen.handler("B"), "127.0.2.2", 9000),
    ):
        yield seen


@dataclass
class Session:
    ws: ClientConnection
    origin: str  # "A" or "B": who answered the first echo
    closed_at: float | None = None
    code: int | None = None


async def open_session(port: int = 8080) -> Session:
    ws = await connect(f"ws://app.test:{port}/", host="127.0.0.1", port=port, open_timeout=10)
    await ws.send("hi")
    answer = await asyncio.wait_for(ws.recv(), 5)
    assert isinstance(answer, str)
    return Session(ws, answer.split(":", 1)[0])


async def watch(session: Session) -> None:
    """Until the proxy closes it: when (monotonic) and with which code."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            await session.ws.recv()
    session.closed_at = time.monotonic()
    session.code = session.ws.close_code


async def until(check, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``check()`` until true, bounded: the tests' only way of waiting."""
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def started(proc: Proc, workers: int = 1) -> None:
    """Every worker's ``ready`` line: each then answers on its listeners and admin port."""
    await asyncio.to_thread(proc.wait_for, "ready", 20, workers)


async def test_drain_ends_sessions_at_a_pace_with_1012_and_routes_new_ones_elsewhere(
    ws_origins: Origins, tmp_path: Path
) -> None:
    proc = Proc(config(tmp_path))
    sessions: list[Session] = []
    try:
        await started(proc)
        sessions = [await open_session() for _ in range(16)]  # round robin: 8 and 8
        on_a = [s for s in sessions if s.origin == "A"]
        on_b = [s for s in sessions if s.origin == "B"]
        assert len(on_a) == len(on_b) == 8
        watchers = [asyncio.create_task(watch(s)) for s in sessions]
        over = 2.0
        async with httpx.AsyncClient() as admin:
            t0 = time.monotonic()
            r = await admin.post(f"{ADMIN}/origins/drain", params={"origin": A, "over": over})
            assert r.status_code == 202, r.text
            assert r.json() == {"origin": A, "sessions": 8, "over_s": over}
            # from the call on, no new session goes to A
            fresh = [await open_session() for _ in range(4)]
            assert [s.origin for s in fresh] == ["B"] * 4
            await until(lambda: all(s.closed_at for s in on_a), over + 5, "A's sessions closed")
            times = [s.closed_at - t0 for s in on_a]  # type: ignore[operator]
            assert [s.code for s in on_a] == [1012] * 8  # Service Restart: reconnect
            assert all(0 <= t < over + 1.0 for t in times), times  # late only if the loop stalls
            share = WINDOW * len(on_a) / over
            assert busiest_half_second(times) <= max(1, 2 * share), times
            assert max(times) - min(times) >= over / 2, times  # paced, not all at once
            await until(lambda: len(ws_origins.codes["A"]) == 8, 5, "A saw its closes")
            assert ws_origins.codes["A"] == [1001] * 8  # Going Away, to the origin
            assert not any(s.closed_at for s in on_b)  # the other origin's untouched
            view = {o["origin"]: o for o in (await admin.get(f"{ADMIN}/origins")).json()}
            assert view[A]["state"] == "draining" and view[A]["sessions"] == 0
            assert view[B]["state"] == "active" and view[B]["sessions"] == 12
            metrics = (await admin.get(f"{ADMIN}/metrics")).text
            assert f'originpool_origin_draining{{origin="{A}"}} 1' in metrics
            assert f'originpool_drained_sessions_total{{origin="{A}"}} 8' in metrics
            done = await asyncio.to_thread(proc.wait_for, "origin_drain_done")  # window's end
            assert done["ended"] == 8 and done["origin"] == A and done["late"] == 0
            r = await admin.post(f"{ADMIN}/origins/undrain", params={"origin": A})
            assert r.status_code == 200 and r.json() == {"origin": A, "state": "active"}
            back = [await open_session() for _ in range(2)]
            assert {s.origin for s in back} == {"A", "B"}
        for s in [*fresh, *back]:
            await s.ws.close()
        for task in watchers:
            task.cancel()
    finally:
        for s in sessions:
            await s.ws.close()
        assert await asyncio.to_thread(proc.stop) == 0


async def test_every_origin_draining_answers_503_at_once(ws_origins: Origins, tmp_path: Path):
    proc = Proc(config(tmp_path))
    try:
        await started(proc)
        async with httpx.AsyncClient() as admin:
            for origin in (A, B):
                r = await admin.post(f"{ADMIN}/origins/drain", params={"origin": origin})
                assert r.status_code == 202
        t0 = time.monotonic()
        with pytest.raises(InvalidStatus) as refused:
            await open_session()
        assert refused.value.response.status_code == 503
        assert time.monotonic() - t0 < 1.0  # no connect tried, no timeout waited
        assert refused.value.response.headers["Retry-After"]
        assert ws_origins.live == {"A": 0, "B": 0}
    finally:
        assert await asyncio.to_thread(proc.stop) == 0


async def test_admin_token_and_post_only(ws_origins: Origins, tmp_path: Path) -> None:
    proc = Proc(config(tmp_path, admin_extra='token = "t0ken-for-tests"'))
    try:
        await started(proc)
        async with httpx.AsyncClient() as admin:
            url, params = f"{ADMIN}/origins/drain", {"origin": A, "over": 1}
            r = await admin.post(url, params=params)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            r = await admin.post(url, params=params, headers={"authorization": "Bearer nope"})
            assert r.status_code == 401
            r = await admin.get(
                url, params=params, headers={"authorization": "Bearer t0ken-for-tests"}
            )
            assert r.status_code == 405
            assert (await admin.get(f"{ADMIN}/origins")).json()[0]["state"] == "active"
            # the client listener routes by Host to an origin: no drain reachable there
            r = await admin.post(
                "http://127.0.0.1:8080/origins/drain",
                params=params,
                headers={"host": "app.test", "authorization": "Bearer t0ken-for-tests"},
            )
            assert (await admin.get(f"{ADMIN}/origins")).json()[0]["state"] == "active"
            r = await admin.post(
                url, params=params, headers={"authorization": "Bearer t0ken-for-tests"}
            )
            assert r.status_code == 202
            r = await admin.post(
                url,
                params={"origin": "ws://127.0.2.9:9000"},
                headers={"authorization": "Bearer t0ken-for-tests"},
            )
            assert r.status_code == 404 and A in r.json()["origins"]
    finally:
        assert await asyncio.to_thread(proc.stop) == 0


async def test_reload_removing_an_origin_drains_it_over_drain_over(
    ws_origins: Origins, tmp_path: Path
) -> None:
    path = config(tmp_path, drain_over=1.5)
    proc = Proc(path)
    sessions: list[Session] = []
    try:
        await started(proc)
        sessions = [await open_session() for _ in range(6)]
        on_a = [s for s in sessions if s.origin == "A"]
        assert len(on_a) == 3
        watchers = [asyncio.create_task(watch(s)) for s in sessions]
        path.write_text(path.read_text().replace(f'["{A}", "{B}"]', f'["{B}"]'))
        t0 = time.monotonic()
        os.kill(proc.p.pid, signal.SIGHUP)
        await asyncio.to_thread(proc.wait_for, "reloaded")
        await until(lambda: all(s.closed_at for s in on_a), 6, "A's sessions closed")
        times = sorted(s.closed_at - t0 for s in on_a)  # type: ignore[operator]
        assert [s.code for s in on_a] == [1012] * 3
        assert times[-1] < 1.5 + 0.5 and times[-1] - times[0] >= 0.5, times
        assert not any(s.closed_at for s in sessions if s.origin == "B")
        async with httpx.AsyncClient() as admin:
            await until_async(admin, lambda v: A not in [o["origin"] for o in v])
        for task in watchers:
            task.cancel()
    finally:
        for s in sessions:
            await s.ws.close()
        assert await asyncio.to_thread(proc.stop) == 0
    started_line = next(ln for ln in proc.lines if ln.get("event") == "origin_drain_started")
    assert started_line["by"] == "reload" and started_line["over_s"] == 1.5


async def until_async(admin: httpx.AsyncClient, check, timeout: float = 5) -> None:
    end = time.monotonic() + timeout
    while not check((await admin.get(f"{ADMIN}/origins")).json()):
        if time.monotonic() > end:
            raise AssertionError("GET /origins never showed it")
        await asyncio.sleep(0.05)


async def test_two_workers_drain_together_and_the_cli_does_the_same(
    ws_origins: Origins, tmp_path: Path
) -> None:
    """The admin port's call reaches the sibling worker (its sessions end too, and the
    count is the proxy's); the CLI makes the same call from the config's [admin]."""
    path = config(tmp_path, workers=2)
    proc = Proc(path)
    sessions: list[Session] = []
    try:
        await started(proc, workers=2)
        sessions = [await open_session() for _ in range(12)]
        on_a = [s for s in sessions if s.origin == "A"]
        watchers = [asyncio.create_task(watch(s)) for s in sessions]
        async with httpx.AsyncClient() as admin:  # the admin port sums both workers
            view = {o["origin"]: o for o in (await admin.get(f"{ADMIN}/origins")).json()}
        assert view[A]["sessions"] == len(on_a) and view[B]["sessions"] == 12 - len(on_a)
        assert view[A]["requests_in_flight"] == 0
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "proxy.cli", "drain", A, str(path), "--over", "1s"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == (
            f"originpool drain: {A} draining, its {len(on_a)} sessions ending over 1s\n"
        )
        await until(lambda: all(s.closed_at for s in on_a), 6, "A's sessions closed")
        assert {s.code for s in on_a} == {1012}
        drains = [ln for ln in proc.lines if ln.get("event") == "origin_drain_started"]
        assert len({ln["pid"] for ln in drains}) == 2  # both workers drained
        assert sum(ln["sessions"] for ln in drains) == len(on_a)  # each its own sessions
        fresh = [await open_session() for _ in range(4)]
        assert {s.origin for s in fresh} == {"B"}
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "proxy.cli", "undrain", A, "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert out.returncode == 0 and out.stdout == f"originpool undrain: {A} active\n"
        for s in fresh:
            await s.ws.close()
        for task in watchers:
            task.cancel()
    finally:
        for s in sessions:
            await s.ws.close()
        assert await asyncio.to_thread(proc.stop) == 0


HTTP_A, HTTP_B = "http://127.0.2.1:9000", "http://127.0.2.2:9000"


async def test_http_drain_finishes_in_flight_closes_idle_and_sends_nothing_new(
    origins, tmp_path: Path
) -> None:
    """HTTP origins: a response streaming when the drain comes completes whole; the drained
    origin's idle pooled connections close at once and the streaming one when it ends
    (instead of going idle); new requests all go to the other origin."""
    proc = Proc(config(tmp_path, origins=f'["{HTTP_A}", "{HTTP_B}"]'))
    size = 8_000_000
    try:
        await started(proc)
        async with (
            httpx.AsyncClient(headers={"host": "app.test"}, timeout=10) as client,
            httpx.AsyncClient(headers={"host": "app.test"}, timeout=10) as other,
            other.stream("GET", f"http://127.0.0.1:8080/big/{size}") as r,
        ):
            chunks = r.aiter_raw()
            got = len(await anext(chunks))
            busy = next(
                i
                for i, o in enumerate(origins)
                if any(f"/big/{size}" in c.requests for c in o.connections)
            )
            drained, kept = origins[busy], origins[1 - busy]
            url = (HTTP_A, HTTP_B)[busy]
            for _ in range(4):  # both origins get requests: the busy one on a second conn
                assert (await client.get("http://127.0.0.1:8080/hello")).status_code == 200
            opened = len(drained.connections)
            assert opened == 2  # the streaming one and one now idle in the pool
            async with httpx.AsyncClient() as admin:
                r2 = await admin.post(f"{ADMIN}/origins/drain", params={"origin": url, "over": 1})
                assert r2.status_code == 202
            gone: list[tuple] = []
            await until(lambda: _drain_queue(drained, gone) >= 1, 5, "the idle one closed")
            async for chunk in chunks:  # the request in flight finishes
                got += len(chunk)
            assert got == size and r.status_code == 200
            await until(lambda: _drain_queue(drained, gone) >= 2, 5, "the busy one closed")
            served = sum(len(c.requests) for c in kept.connections)
            for _ in range(6):
                assert (await client.get("http://127.0.0.1:8080/hello")).status_code == 200
            assert sum(len(c.requests) for c in drained.connections) == 3  # /big + 2: no more
            assert len(drained.connections) == 2
            assert sum(len(c.requests) for c in kept.connections) == served + 6
    finally:
        assert await asyncio.to_thread(proc.stop) == 0


def _drain_queue(origin, into: list) -> int:
    while not origin.disconnects.empty():
        into.append(origin.disconnects.get_nowait())
    return len(into)
