"""The ramp's accounting cannot say what cannot be (issue 22).

A run once reported ``held 130000, held_pct 101.56`` against a 128,000 limit: "held" counted
sessions that had answered an echo once, when they opened, and 44,968 of them were gone by
the end. Held is now what answered the final echo, never more than the kernel's census of
upstream connections at the end, and the clients say which of their sessions ended and with
what Close code, so a run tells who closed them.
"""

from __future__ import annotations

import asyncio
import time

from wsproto.events import CloseConnection

from testbed import report
from testbed.wsclient import ClientOptions, LoadClient
from testbed.wsorigin import EchoOrigin

ORIGIN = ("127.0.2.1", 9000)
SOURCES = [f"127.3.0.{i}" for i in range(1, 5)]


_BASE: dict = {
    "mode": "connectx",
    "egress": 1,
    "origins": 1,
    "port_range": (40000, 40001),
    "lost": 0,
    "lost_reasons": {},
    "first_proxy_error": None,
    "proxy_errors": {},
    "per_egress": {},
    "per_egress_metrics": None,
    "rss_before": None,
    "rss_held": None,
    "ramp_seconds": 1.0,
    "hold_seconds": 0.0,
    "workers": 2,
    "concurrency": 1,
    "client_processes": 2,
}


def _run(opened: int, lost: int, census_end: dict[str, int] | None) -> dict:
    merged = report.merge([[[float(i), float(i) + 0.5, "ok", 1.0, i] for i in range(opened)]])
    return report.build_run(
        mode="connectx",
        egress=2,
        origins=1,
        port_range=(40000, 40049),
        merged=merged,
        held=opened,
        lost=lost,
        lost_reasons={"closed": lost} if lost else {},
        lost_close_codes={"none": lost} if lost else {},
        first_proxy_error=None,
        proxy_errors={},
        per_egress={"127.0.1.1": 50, "127.0.1.2": 50},
        per_egress_metrics=None,
        per_egress_end=census_end,
        rss_before=None,
        rss_held=None,
        ramp_seconds=1.0,
        hold_seconds=5.0,
        workers=4,
        concurrency=1,
        client_processes=1,
    )


def test_held_is_what_answered_at_the_end_and_never_above_the_census():
    # 104 opened over a 100 limit (sessions closed during the ramp made room), 30 lost since
    run = _run(104, 30, {"127.0.1.1": 37, "127.0.1.2": 37})
    assert (run["opened"], run["verified_at_end"], run["held"]) == (104, 74, 74)
    assert run["held_pct"] == 74.0 and run["unbacked"] == 0
    assert "final echo" in run["held_means"] and "census" in run["held_means"]
    # answers the kernel cannot account for are not held, and are named
    run = _run(104, 0, {"127.0.1.1": 50, "127.0.1.2": 50})
    assert (run["held"], run["unbacked"], run["held_pct"]) == (100, 4, 100.0)
    rows = dict(report.table_rows(run))
    assert "alive at the end" in rows["sessions held"]
    assert "census 100 upstream" in rows["sessions held"]
    assert rows["answered without an upstream"].startswith("4:")
    # no census (it could not be taken): the echo's word, and unbacked unknown
    run = _run(50, 5, None)
    assert (run["held"], run["unbacked"]) == (45, None)


def test_the_table_says_who_closed_the_lost_sessions():
    run = _run(100, 10, {"127.0.1.1": 45, "127.0.1.2": 45})
    run["lost_close_codes"] = {"1011": 7, "none": 3}
    run["proxy_session_ends"] = {"origin 1011": 7, "client -": 3}
    run["proxy_worker_deaths"] = [{"worker": 3, "pid": 1, "exit": -9}]
    text = dict(report.table_rows(run))["lost after opening"]
    assert text.startswith("10 of 100 opened")
    assert "Close 1011: 7" in text and "no Close frame: 3" in text
    assert "origin 1011: 7" in text and "1 proxy worker(s) died" in text


def test_a_failure_while_other_clients_finish_is_not_before_the_limit():
    """Nine clients at the full-limit run: the first 503 was attempt 127,991 in start order,
    when 128,000 sessions were held or finishing their echo; it was counted as one of 8
    failures before the limit, as if those sessions had no upstream connection yet."""
    rows = [[0.0, 0.5, "ok", 1.0, 0], [1.0, 1.5, "ok", 1.0, 1], [1.1, 1.2, "503", None, 1]]
    merged = report.merge([rows])
    run = report.build_run(
        **{**_BASE, "merged": merged, "held": 2, "per_egress_end": {"127.0.1.1": 2}},
    )
    assert run["first_failure_client"]["held"] == 2 and run["limit"] == 2
    assert run["failures_before_limit"] == 0
    rows[1] = [1.3, 1.5, "ok", 1.0, 1]  # a session that started after the 503 came back
    run = report.build_run(**{**_BASE, "merged": report.merge([rows]), "held": 2})
    assert run["failures_before_limit"] == 1


async def _until(condition, seconds: float = 10.0) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.01)  # polling a condition with a deadline


async def test_clients_know_which_held_sessions_ended_and_how(ns):
    origin = EchoOrigin()
    await origin.start([ORIGIN])
    client = LoadClient(ClientOptions(ORIGIN, "o", SOURCES, sessions=20, limit=20))
    try:
        await client.ramp()
        assert client.counts()["alive"] == 20
        protocols = sorted(origin._protocols, key=id)
        for proto in protocols[:5]:  # the origin ends five with a Close frame
            assert proto.conn is not None and proto.transport is not None
            proto.transport.write(proto.conn.send(CloseConnection(code=1011, reason="bye")))
        for proto in protocols[5:8]:  # and drops three without one
            assert proto.transport is not None
            proto.transport.abort()
        await _until(lambda: client.counts()["alive"] == 12)
        counts = client.counts()
        assert counts["held"] == 20 and counts["ended"] == {"1011": 5, "none": 3}
        assert counts["utilisation"] == 0.6
        checked = await client.check()
        assert checked["verified"] == 12 and checked["lost"] == 8
        assert checked["lost_close_codes"] == {"1011": 5, "none": 3}
    finally:
        client.close()
        await origin.close()
