"""Health checks in ``originpool serve`` with two workers, in a namespace: an origin stopped
is marked down by each worker, shown in ``/metrics`` and ``GET /origins``, gets no request,
stays down across SIGHUP and comes back when restarted."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import httpx

from tests.http_origin import TestOrigin
from tests.test_serve import Proc

CONFIG = """
[listen]
address = "127.0.0.1:8080"
[admin]
address = "127.0.0.1:9090"
[proxy]
workers = 2
[egress]
addresses = ["127.0.1.1", "127.0.1.2"]
[[routes]]
host = "app.example"
origins = ["http://127.0.2.1:9000", "http://127.0.2.2:9000"]
[routes.health_check]
type = "http"
path = "/hello"
interval = 0.2
timeout = 0.1
fall = {fall}
rise = 2
[timeouts]
drain = 5
[log]
format = "json"
"""
O2 = "http://127.0.2.2:9000"


def state_lines(proc: Proc, new: str) -> list[dict]:
    return [
        line
        for line in proc.lines
        if line.get("event") == "origin_state" and line.get("origin") == O2 and line["new"] == new
    ]


def metric(text: str, name: str, **labels: str) -> list[float]:
    """Every sample of ``name`` whose labels include ``labels``."""
    out = []
    for match in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            out.append(float(match.group(2)))
    return out


async def test_serve_marks_a_stopped_origin_down_in_every_worker_and_back_up(
    origins: list[TestOrigin], tmp_path: Path
):
    config = tmp_path / "originpool.toml"
    config.write_text(CONFIG.replace("{fall}", "2"))
    proc = Proc(config)
    try:
        await asyncio.to_thread(proc.wait_for, "ready", 20, 2)
        await origins[1].close()
        await asyncio.to_thread(proc.wait_for, "origin_state", 20, 2)  # one per worker
        down = state_lines(proc, "down")
        assert sorted(line["worker"] for line in down) == [0, 1]
        reasons = [(line["by"], line["reason"]) for line in down]
        # which failure took it down depends on where a check was when the origin stopped (a
        # reset, an EOF or a silence mid-check, or the next SYN refused): the checks' own
        # verdict, not traffic's, with the check's 4-tuple; the refusal itself is judged below
        assert all(by == "health" for by, _ in reasons), reasons
        assert all("127.0.1." in why for _, why in reasons), reasons  # the check's 4-tuple

        async with httpx.AsyncClient(base_url="http://127.0.0.1:9090", timeout=10) as admin:
            text = (await admin.get("/metrics")).text
            ups = metric(text, "originpool_origin_up", route="app.example/", origin=O2)
            assert ups == [0.0, 0.0], text  # one sample per worker, each down
            assert metric(text, "originpool_origin_up", origin="http://127.0.2.1:9000") == [1, 1]
            assert sum(metric(text, "originpool_health_checks_total", origin=O2, result="connect"))
            # a check begun after the origin stopped: the kernel refuses its SYN
            deadline = time.monotonic() + 10
            while True:
                view = (await admin.get("/origins")).json()
                entries = view["origins"] if isinstance(view, dict) else view
                mine = [e for e in entries if e["origin"] == O2]
                assert mine and mine[0]["state"] == "down", view
                last = mine[0]["last_check"]
                refused = last["result"] == "connect" and "ECONNREFUSED" in last["detail"]
                if refused or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)  # polled with a deadline: checks run every 0.2 s
        assert last["result"] == "connect", last
        assert "ECONNREFUSED" in last["detail"], last

        seen_before = len(origins[0].connections)
        async with httpx.AsyncClient(
            base_url="http://127.0.0.1:8080", headers={"host": "app.example"}, timeout=10
        ) as client:
            for _ in range(10):
                assert (await client.get("/hello")).status_code == 200
        assert len(origins[0].connections) > seen_before  # all went to the live one

        # a reload with other thresholds keeps the verdict: no line, still down
        config.write_text(CONFIG.replace("{fall}", "4"))
        os.kill(proc.p.pid, signal.SIGHUP)
        await asyncio.to_thread(proc.wait_for, "reloaded", 20, 2)
        assert state_lines(proc, "active") == []

        await origins[1].start("127.0.2.2", 9000)
        await asyncio.to_thread(proc.wait_for, "origin_state", 20, 4)
        up = state_lines(proc, "active")
        assert sorted(line["worker"] for line in up) == [0, 1]
        assert all("2 checks passed" in line["reason"] for line in up)
    finally:
        assert await asyncio.to_thread(proc.stop) == 0
