"""A drain through a real ``originpool serve``: how paced the closes are, and how the
reconnections land on the other origin (issue 20; README "Draining an origin").

2 x N sessions over two echo origins (A, B), each client reconnecting when the proxy closes
it, as a client told 1012 does; then ``POST /origins/drain`` of A over ``--over`` seconds.
Prints one JSON line: the closes' first and last times, the most closes in any half second
against the even share, and the same for the reconnections B saw. ``--over 0`` is the
storm's shape (every session of A at once). As root (a namespace of its own)::

    .venv/bin/python bench/drain_pace.py --sessions 1000 --over 10 [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from pool import netns
from proxy.drain import busiest_half_second

CONFIG = """
[listen]
address = "127.0.0.1:8080"
[admin]
address = "127.0.0.1:9090"
[egress]
addresses = ["127.0.1.1"]
[proxy]
workers = {workers}
[[routes]]
host = "app.test"
origins = ["ws://127.0.2.1:9000", "ws://127.0.2.2:9000"]
[timeouts]
drain = 2
[log]
level = "warning"
"""
URL, ADMIN = "ws://app.test:8080/", "http://127.0.0.1:9090"


async def run(n: int, over: float, workers: int, config: Path) -> dict[str, object]:
    new_on_b: list[float] = []
    closes: list[float] = []
    codes: set[int | None] = set()
    failed: list[str] = []

    async def origin(name: str, conn: ServerConnection) -> None:
        if name == "B":
            new_on_b.append(time.monotonic())
        with contextlib.suppress(ConnectionClosed):
            async for _message in conn:
                await conn.send(name)

    async def client() -> None:
        async with connect(URL, host="127.0.0.1", port=8080, open_timeout=30) as ws:
            await ws.send("x")
            who = await ws.recv()
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await ws.recv()
        if who != "A":
            return
        closes.append(time.monotonic())
        codes.add(ws.close_code)
        try:  # back, as told: to the other origin
            async with connect(URL, host="127.0.0.1", port=8080, open_timeout=30) as again:
                await again.send("x")
                await again.recv()
        except (OSError, ConnectionClosed, EOFError, TimeoutError) as e:
            failed.append(type(e).__name__)

    config.write_text(CONFIG.format(workers=workers))
    async with (
        serve(lambda c: origin("A", c), "127.0.2.1", 9000),
        serve(lambda c: origin("B", c), "127.0.2.2", 9000),
    ):
        proxy = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
        )
        tasks: list[asyncio.Task[None]] = []
        try:
            async with httpx.AsyncClient() as admin:
                deadline = time.monotonic() + 20
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        if (await admin.get(f"{ADMIN}/readyz")).status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise SystemExit("the proxy did not start")
                    await asyncio.sleep(0.1)
                for i in range(2 * n):
                    tasks.append(asyncio.create_task(client()))
                    if i % 50 == 49:
                        await asyncio.sleep(0.05)  # a ramp, not the storm under test
                deadline = time.monotonic() + 60
                while len(new_on_b) < n and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                before = len(new_on_b)
                t0 = time.monotonic()
                answer = await admin.post(
                    f"{ADMIN}/origins/drain", params={"origin": "ws://127.0.2.1:9000", "over": over}
                )
                deadline = t0 + over + 30
                while len(closes) < answer.json()["sessions"] and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(1)  # the last reconnections land
        finally:
            for task in tasks:
                task.cancel()
            proxy.terminate()
            proxy.wait(30)
    t = [c - t0 for c in closes]
    back = [b - t0 for b in new_on_b[before:]]
    return {
        "sessions_drained": answer.json()["sessions"],
        "over_s": over,
        "workers": workers,
        "closed": len(t),
        "close_codes": sorted(c for c in codes if c is not None),
        "first_close_s": round(min(t), 3) if t else None,
        "last_close_s": round(max(t), 3) if t else None,
        "most_closes_in_a_half_second": busiest_half_second(t),
        "even_share_per_half_second": round(0.5 * len(t) / over, 1) if over else None,
        "reconnected_on_B": len(back),
        "reconnects_failed": len(failed),
        "most_new_on_B_in_a_half_second": busiest_half_second(back),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1000, help="on each origin")
    parser.add_argument("--over", type=float, default=10.0, help="the drain's window")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    with (
        netns.namespace(port_range=(20000, 60999), addresses=["127.0.1.1/32"]),
        tempfile.TemporaryDirectory() as tmp,
    ):
        result = asyncio.run(run(args.sessions, args.over, args.workers, Path(tmp) / "p.toml"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
