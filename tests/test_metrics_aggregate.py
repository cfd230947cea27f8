"""One /metrics for the whole proxy (issue 18): worker 0's admin port serves the sum over
all workers, each admin port's ``?scope=worker`` its own worker; the sum of a real
two-worker ``serve`` equals the sum of its per-worker endpoints."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pool.metrics import Sample, render_prometheus
from proxy import metrics_sum
from proxy.metrics_sum import ExpositionError, merge, parse, render
from tests.test_serve import Proc

CONFIG = """
[listen]
address = "127.0.0.1:8080"
[admin]
address = "127.0.0.1:9090"
[egress]
addresses = ["127.0.1.1", "127.0.1.2"]
[[routes]]
host = "app.example"
origins = ["http://127.0.2.1:9000", "http://127.0.2.2:9000"]
[proxy]
workers = 2
pid_file = "originpool.pid"
[timeouts]
drain = 5
[log]
format = "json"
"""

HISTOGRAM = """# HELP x_seconds Time.
# TYPE x_seconds histogram
x_seconds_bucket{le="0.1"} {a}
x_seconds_bucket{le="+Inf"} {b}
x_seconds_sum {s}
x_seconds_count {b}
"""


def exposition(requests: int, live: int, util: float, a: int, b: int, s: float) -> str:
    samples = [
        Sample("originpool_requests_total", (("route", "r"), ("status", "200")), requests, True),
        Sample("originpool_egress_live_connections", (("egress", 'we"ird'),), live),
        Sample("originpool_pair_utilisation_max", (), util),
    ]
    histogram = HISTOGRAM.replace("{a}", str(a)).replace("{b}", str(b)).replace("{s}", str(s))
    return render_prometheus(samples) + histogram


def test_counters_and_gauges_are_summed_and_per_worker_gauges_labelled():
    one = parse(exposition(3, 2, 0.25, 1, 3, 0.5))
    two = parse(exposition(4, 5, 0.75, 2, 4, 1.25))
    merged = merge([(0, one), (1, two)])
    samples = {key: v for f in merged.values() for key, v in f.samples.items()}
    assert samples[("originpool_requests_total", 'route="r",status="200"')] == 7
    assert samples[("originpool_egress_live_connections", 'egress="we\\"ird"')] == 7
    assert samples[("originpool_pair_utilisation_max", 'worker="0"')] == 0.25
    assert samples[("originpool_pair_utilisation_max", 'worker="1"')] == 0.75
    assert samples[("x_seconds_bucket", 'le="0.1"')] == 3
    assert samples[("x_seconds_bucket", 'le="+Inf"')] == 7
    assert samples[("x_seconds_count", "")] == 7 and samples[("x_seconds_sum", "")] == 1.75
    assert merged["x_seconds"].type == "histogram"
    assert merged["originpool_requests_total"].type == "counter"
    text = render(merged.values())
    assert "# TYPE x_seconds histogram\n" in text
    assert 'originpool_requests_total{route="r",status="200"} 7\n' in text
    assert parse(text) == merged  # what worker 0 serves reads back as what it summed


def test_a_worker_alone_is_its_own_sum():
    text = exposition(3, 2, 0.25, 1, 3, 0.5)
    summed = merge([(0, parse(text))])
    assert (
        summed["originpool_requests_total"].samples
        == parse(text)["originpool_requests_total"].samples
    )


@pytest.mark.parametrize(
    "line",
    ["originpool_x{a=1} 2", "originpool_x two", 'originpool_x{a="1"', "not a line at all"],
)
def test_a_garbled_exposition_is_refused_naming_the_line(line):
    with pytest.raises(ExpositionError, match="line 2"):
        parse("# TYPE originpool_x counter\n" + line + "\n")


def test_a_sibling_whose_page_does_not_parse_is_counted_missing_not_summed():
    own = exposition(3, 2, 0.25, 1, 3, 0.5)
    missing: dict[int, str] = {2: "TimeoutError: "}
    text = metrics_sum.total(own, [(1, own), (3, "garbage here\n")], missing)
    assert sorted(missing) == [2, 3] and missing[3].startswith("ExpositionError: line 1")
    summed = samples_of(text)
    assert summed[("originpool_requests_total", 'route="r",status="200"')][1] == 6
    assert summed[("originpool_metrics_workers", 'state="summed"')] == ("gauge", 2)
    assert summed[("originpool_metrics_workers", 'state="missing"')] == ("gauge", 2)


def test_siblings_are_the_admin_port_plus_i_on_loopback():
    assert metrics_sum.siblings(("127.0.0.1", 9090), 3) == [
        (1, ("127.0.0.1", 9091)),
        (2, ("127.0.0.1", 9092)),
    ]
    assert metrics_sum.siblings(("0.0.0.0", 9090), 2) == [(1, ("127.0.0.1", 9091))]
    assert metrics_sum.siblings(("::", 9090), 2) == [(1, ("::1", 9091))]
    assert metrics_sum.siblings(("127.0.0.1", 0), 4) == []  # ephemeral: nothing to find
    assert metrics_sum.siblings(("127.0.0.1", 9090), 1) == []


async def test_a_sibling_that_does_not_answer_is_missing_within_the_bound():
    """A refused port and a listener that accepts but never answers: both reported missing,
    and the whole scrape ends by the timeout, not by the silent peer."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connect is refused
    try:
        peers = [(1, silent.getsockname()), (2, closed.getsockname())]
        start = time.monotonic()
        texts, missing = await metrics_sum.scrape(peers, timeout=0.3)
        elapsed = time.monotonic() - start
    finally:
        silent.close()
        closed.close()
    assert texts == [] and sorted(missing) == [1, 2]
    assert missing[1].startswith("TimeoutError") and "refused" in missing[2].lower()
    assert elapsed < 2.0, elapsed


def samples_of(text: str) -> dict[tuple[str, str], tuple[str, float]]:
    """(sample name, labels) -> (family type, value)."""
    return {key: (f.type, v) for f in parse(text).values() for key, v in f.samples.items()}


async def test_two_workers_one_metrics_equal_to_the_sum_of_the_per_worker_ones(
    origins, tmp_path: Path
):
    path = tmp_path / "originpool.toml"
    path.write_text(CONFIG)
    proc = Proc(path)
    n = 40
    try:
        await asyncio.to_thread(proc.wait_for, "ready", 20, 2)
        assert int((tmp_path / "originpool.pid").read_text()) == proc.p.pid  # the master's
        # a fresh connection per request, so SO_REUSEPORT spreads them over both workers
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(headers={"host": "app.example"}, limits=limits) as client:
            for _ in range(n):
                assert (await client.get("http://127.0.0.1:8080/x")).status_code == 200
            await asyncio.to_thread(proc.wait_for, "access", 20, n)  # every count is in
            own0 = (await client.get("http://127.0.0.1:9090/metrics?scope=worker")).text
            own1 = (await client.get("http://127.0.0.1:9091/metrics")).text
            start = time.monotonic()
            whole = (await client.get("http://127.0.0.1:9090/metrics")).text
            took = time.monotonic() - start
            assert (await client.get("http://127.0.0.1:9090/metrics?scope=x")).status_code == 400
        w0, w1, total = samples_of(own0), samples_of(own1), samples_of(whole)
        key = ("originpool_requests_total", 'route="app.example/",status="200"')
        assert w0[key][1] > 0 and w1[key][1] > 0, (w0[key], w1[key])  # both served some
        assert total[key] == ("counter", n)
        summed = [k for k, (kind, _v) in total.items() if kind in ("counter", "histogram")]
        assert len(summed) > 10
        for k in summed:
            assert total[k][1] == w0.get(k, ("", 0.0))[1] + w1.get(k, ("", 0.0))[1], k
        assert total[("originpool_draining", 'worker="0"')] == ("gauge", 0)
        assert total[("originpool_draining", 'worker="1"')] == ("gauge", 0)
        assert total[("originpool_metrics_workers", 'state="summed"')] == ("gauge", 2)
        assert total[("originpool_metrics_workers", 'state="missing"')] == ("gauge", 0)
        print(f"aggregate /metrics of 2 workers answered in {took * 1000:.1f} ms")
        # `originpool stop` finds the master through the pid file, and every worker drains
        stop = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "proxy.cli", "stop", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert stop.returncode == 0, stop.stderr
        assert f"sent SIGTERM to PID {proc.p.pid}" in stop.stdout
        assert await asyncio.to_thread(proc.p.wait, 20) == 0
        assert not (tmp_path / "originpool.pid").exists()  # removed at the clean exit
    finally:
        await asyncio.to_thread(proc.stop)
