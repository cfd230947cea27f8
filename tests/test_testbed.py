"""``originpool testbed``: its origin and client in a namespace, its arithmetic, and whole
runs at small scale (R=100, E=2, K=2) as a real subprocess, SIGINT mid-ramp included."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pool import netns
from testbed import procs, report
from testbed.run import Options, client_port_window, proxy_config
from testbed.wsclient import ClientOptions, LoadClient, parse_sources
from testbed.wsorigin import EchoOrigin

ROOT = Path(__file__).resolve().parent.parent
ORIGINS = [("127.0.2.1", 9000), ("127.0.2.2", 9000)]
SOURCES = [f"127.3.0.{i}" for i in range(1, 5)]


def needs_root() -> None:
    reason = netns.can_create()
    if reason:
        pytest.skip(reason)


# -- the origin ------------------------------------------------------------------------------


@pytest.fixture
async def origin(ns):
    server = EchoOrigin()
    await server.start(ORIGINS)
    yield server
    await server.close()


async def _get(address: tuple[str, int], path: str = "/") -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


async def test_origin_echoes_on_every_address_and_answers_health(origin):
    for address in ORIGINS:
        client = LoadClient(ClientOptions(address, "origin.test", SOURCES, sessions=20))
        await client.ramp()
        assert len(client.held) == 20 and not client.failures
        assert (await client.check())["lost"] == 0
        client.close()
    health = await _get(ORIGINS[0])
    assert health.startswith(b"HTTP/1.1 200 ")
    body = json.loads(health.split(b"\r\n\r\n", 1)[1])
    assert body["ok"] is True and body["sessions_total"] == 40


async def test_origin_keeps_thousands_of_sessions_with_small_state(origin):
    opts = ClientOptions(
        ORIGINS[1], "origin.test", SOURCES, sessions=2000, concurrency=8, ports=(20000, 29999)
    )
    client = LoadClient(opts)
    await client.ramp()
    assert len(client.held) == 2000
    assert origin.stats.sessions == 2000
    assert (await client.check())["lost"] == 0
    client.close()
    # what an idle session costs the origin: the protocol's slots and wsproto's frame state
    proto = next(iter(origin._protocols))
    assert not hasattr(proto, "__dict__") and proto.head is None


async def test_origin_refuses_a_bad_handshake_with_400_and_a_huge_head_with_431(origin):
    reader, writer = await asyncio.open_connection(*ORIGINS[0])
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 400 ")
    writer.close()
    reader, writer = await asyncio.open_connection(*ORIGINS[0])
    writer.write(b"GET / HTTP/1.1\r\nX: " + b"a" * 20000)
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 431 ")
    writer.close()


async def test_origin_as_a_process_says_ready_with_its_addresses(ns):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "testbed.wsorigin",
        "--listen",
        "127.0.2.1:9000,127.0.2.2:9000",
        "--listen",
        "127.0.2.3:9001",
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        line = json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))
        assert line["event"] == "ready" and line["pid"] == proc.pid
        assert line["listen"] == ["127.0.2.1:9000", "127.0.2.2:9000", "127.0.2.3:9001"]
        assert (await _get(("127.0.2.3", 9001))).startswith(b"HTTP/1.1 200 ")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    stopped = json.loads(await proc.stdout.readline())
    assert stopped["event"] == "stopped"


# -- the client ------------------------------------------------------------------------------


async def test_client_sources_round_robin_with_the_kernels_port_choice(origin):
    opts = ClientOptions(ORIGINS[0], "o", SOURCES, sessions=40)
    client = LoadClient(opts)
    await client.ramp()
    peers = [s.transport.get_extra_info("sockname") for s in client.held]
    assert [ip for ip, _ in peers] == SOURCES * 10
    assert all(40000 <= port <= 40127 for _, port in peers)  # the namespace's range
    client.close()


async def test_client_takes_ports_from_its_window_outside_the_range(origin):
    opts = ClientOptions(ORIGINS[0], "o", SOURCES[:1], sessions=30, ports=(20000, 20009))
    client = LoadClient(opts)
    await client.ramp()
    # the window has 10 ports: past it, the same ports again (to one destination the
    # 4-tuples would clash, so every port is held at most once: 10 sessions)
    ports = sorted(s.transport.get_extra_info("sockname")[1] for s in client.held)
    assert ports == list(range(20000, 20010))
    assert sum(client.failures.values()) == 20
    client.close()


async def test_client_records_the_http_status_and_the_socket_error(ns):
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.2.9", 9000)
    events: list[dict] = []
    try:
        client = LoadClient(
            ClientOptions(("127.0.2.9", 9000), "o", SOURCES, sessions=3, limit=10), events.append
        )
        await client.ramp()
        assert client.failures == {"503": 3}
        failure = next(e for e in events if e["event"] == "failure")
        assert failure["outcome"] == "503" and failure["index"] == 0 and failure["held"] == 0
        assert [e["event"] for e in events][-1] == "ramp_done"
    finally:
        server.close()
    client = LoadClient(ClientOptions(("127.0.2.9", 9001), "o", SOURCES, sessions=2))
    await client.ramp()
    assert client.failures == {"ECONNREFUSED": 2}
    assert [a.handshake_ms for a in client.attempts] == [None, None]


async def test_client_counts_sessions_lost_during_the_hold(ns):
    server = EchoOrigin()
    await server.start(ORIGINS[:1])
    client = LoadClient(ClientOptions(ORIGINS[0], "o", SOURCES, sessions=50))
    await client.ramp()
    assert len(client.held) == 50
    first = client.attempts[0]
    assert first.outcome == "ok" and first.handshake_ms and first.handshake_ms > 0
    assert [a.held_before for a in client.attempts] == list(range(50))
    await server.close()  # the origin drops every session
    checked = await client.check()
    assert (checked["lost"], checked["lost_reasons"]) == (50, {"closed": 50})
    assert (checked["verified"], checked["lost_close_codes"]) == (0, {"none": 50})
    client.close()


async def test_client_as_a_process_is_driven_by_its_stdin(origin):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "testbed.wsclient",
        "--connect",
        "127.0.2.1:9000",
        "--host",
        "o",
        "--sources",
        "127.3.0.1-127.3.0.4",
        "--ports",
        "20000-29999",
        "--sessions",
        "100",
        "--limit",
        "200",
        "--control",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )

    async def until(event: str) -> dict:
        for _ in range(10000):
            raw = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert raw, f"client exited before {event!r}"
            line = json.loads(raw)
            if line["event"] == event:
                return line
        raise AssertionError(event)

    try:
        assert (await until("started"))["pid"] == proc.pid
        done = await until("ramp_done")
        assert done["attempted"] == done["held"] == 100 and done["utilisation"] == 0.5
        proc.stdin.write(b"check\n")
        result = await until("result")
        assert result["lost"] == 0 and len(result["records"]) == 100
        started, finished, outcome, ms, held = result["records"][-1]
        assert outcome == "ok" and finished >= started and ms > 0 and held == 99
        proc.stdin.write(b"close\n")
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_parse_sources_ranges_and_lists():
    assert parse_sources("127.3.0.1-127.3.0.3,127.3.1.1") == [
        "127.3.0.1",
        "127.3.0.2",
        "127.3.0.3",
        "127.3.1.1",
    ]
    with pytest.raises(ValueError):
        parse_sources("127.3.0.9-127.3.0.1")


# -- the arithmetic --------------------------------------------------------------------------


def test_merge_puts_shards_on_one_time_line():
    # [started, finished, outcome, handshake_ms, held_before (the shard's own)]
    a = [[1.0, 1.1, "ok", 1.0, 0], [3.0, 3.1, "ok", 1.0, 1], [5.0, 5.1, "503", None, 2]]
    b = [[2.0, 2.1, "ok", 2.0, 0], [4.0, 4.1, "503", None, 1]]
    merged = report.merge([a, b])
    assert merged.outcome == ["ok", "ok", "ok", "503", "503"]
    assert merged.held_before == [0, 1, 2, 3, 3]
    assert merged.held_at_end == [0, 1, 2, 3, 3]
    assert report.held_curve(merged) == [1, 2, 3, 3, 3]
    first = report.first_client_failure(merged, limit=3)
    assert first == {"attempt": 4, "outcome": "503", "held": 3, "utilisation": 1.0}


def test_a_failure_counts_sessions_still_opening_when_it_arrived():
    # concurrency 2: the success started at 1.0 ends at 1.5, after the 503 that started
    # at 1.1 came back at 1.2; that session already had its upstream connection
    rows = [[0.0, 0.5, "ok", 1.0, 0], [1.0, 1.5, "ok", 1.0, 1], [1.1, 1.2, "503", None, 1]]
    merged = report.merge([rows])
    assert merged.held_at_end == [0, 1, 2]
    assert report.first_client_failure(merged, limit=2)["utilisation"] == 1.0


def test_latency_bands_and_their_ratio():
    rows = [[float(i), i + 0.5, "ok", 1.0 if i < 5 else 1.2, i] for i in range(10)]
    merged = report.merge([rows])
    bands = report.latency_bands(merged, limit=10)
    assert bands == {"0-50%": 1.0, "50-90%": 1.2, "90-100%": 1.2}
    assert report.latency_ratio(bands) == 1.2
    assert report.latency_ratio({"0-50%": 1.0, "50-90%": None, "90-100%": None}) is None
    assert report.band_counts(merged, 10) == {"0-50%": 5, "50-90%": 4, "90-100%": 1}


def test_proxy_error_is_told_in_the_kernels_words():
    line = {
        "errno": "EADDRNOTAVAIL",
        "error": "[Errno 99] no source port left for 127.0.2.1:9000 on any egress IP "
        "(tried 127.0.1.2: EADDRINUSE, 127.0.1.1: EADDRINUSE)",
        "egress": ["127.0.1.2", "127.0.1.1"],
        "destination": "127.0.2.1:9000",
    }
    assert report.describe_proxy_error(line) == (
        'EADDRINUSE "Address already in use" (127.0.1.2, 127.0.1.1 -> 127.0.2.1:9000)'
    )
    plain = {"errno": "EADDRNOTAVAIL", "error": "[Errno 99] Cannot assign requested address"}
    assert report.describe_proxy_error(plain) == ('EADDRNOTAVAIL "Cannot assign requested address"')
    assert report.describe_proxy_error(None) == "-"


def test_metrics_and_census_per_egress():
    text = (
        "# TYPE originpool_egress_live_connections gauge\n"
        'originpool_egress_live_connections{egress="127.0.1.1"} 7\n'
        'originpool_egress_live_connections{egress=""} 3\n'
    )
    assert report.parse_live_per_egress(text) == {"127.0.1.1": 7, "default": 3}

    class P:
        def __init__(self, src: str, dst: str, n: int, proto: str = "tcp") -> None:
            self.proto, self.src, self.dst, self.established = proto, src, dst, n

    pairs = [P("127.0.1.1", "127.0.2.1:9000", 5), P("127.3.0.1", "127.0.0.1:8080", 9)]
    pairs.append(P("127.0.1.1", "127.0.2.2:9000", 2))
    dests = {"127.0.2.1:9000", "127.0.2.2:9000"}
    assert report.per_egress_from_census(pairs, dests) == {"127.0.1.1": 7}


def test_client_ports_stay_out_of_the_proxys_range():
    assert client_port_window((40000, 40999)) == (10000, 39999)
    assert client_port_window((10000, 64999)) is None
    assert client_port_window((1024, 9999)) == (10000, 65535)


def test_generated_config_is_valid_for_every_mode():
    from proxy import config

    for mode in ("plain", "bind", "connectx"):
        parsed = config.parse(proxy_config(mode, Options(egress=3, origins=2, workers=2)))
        assert parsed.egress.mode == mode
        assert [str(e) for e in parsed.egress.addresses] == (
            [] if mode == "plain" else ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
        )
        assert parsed.routes[0].host == "testbed.example"
        assert parsed.routes[0].balance == "least_conn"
        assert len(parsed.routes[0].origins) == 2 and parsed.proxy.workers == 2
        assert parsed.log.format == "json"


def test_without_root_it_says_so_in_one_line_and_exits_2(monkeypatch, capsys):
    from testbed import run

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert run.run(Options()) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs root" in err


# -- whole runs, as a user starts them -------------------------------------------------------

SMALL = ["--egress", "2", "--origins", "2", "--port-range", "40000-40099", "--hold", "1"]


def cli_testbed(*args: str) -> list[str]:
    return [sys.executable, "-m", "proxy.cli", "testbed", *args]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> tuple[dict, Path, str]:
    needs_root()
    out = tmp_path_factory.mktemp("testbed")
    proc = subprocess.run(
        cli_testbed(
            *SMALL,
            "--sessions",
            "450",
            "--json",
            str(out / "tb.json"),
            "--plot",
            str(out / "tb.png"),
        ),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / "tb.json").read_text()), out / "tb.png", proc.stdout


def test_small_run_modes_land_where_they_must(small_run):
    doc, _, _ = small_run
    runs = {r["mode"]: r for r in doc["runs"]}
    assert list(runs) == ["plain", "bind", "connectx"]
    r, e, k = 100, 2, 2
    # plain: the kernel's default source to each origin: K x R, one source IP
    assert abs(runs["plain"]["held"] - k * r) <= 2
    assert list(runs["plain"]["per_egress"]) == ["127.0.0.1"]
    # bind: ports exclusive per egress IP whatever the destination: E x R
    assert abs(runs["bind"]["held"] - e * r) <= 2
    assert sorted(runs["bind"]["per_egress"]) == ["127.0.1.1", "127.0.1.2"]
    assert "EADDRINUSE" in runs["bind"]["first_error"]
    # connectx: the physical limit, and no client failure before it
    connectx = runs["connectx"]
    assert connectx["held"] >= 0.995 * e * r * k
    assert connectx["failures_before_limit"] == 0
    assert connectx["first_failure_client"]["utilisation"] >= 0.995
    assert connectx["first_failure_client"]["outcome"] == "503"
    assert "EADDRNOTAVAIL" in connectx["first_error"]
    assert "Cannot assign requested address" in connectx["first_error"]


def test_small_run_json_is_complete_and_consistent(small_run):
    doc, _, _ = small_run
    keys = {
        "mode",
        "egress",
        "origins",
        "port_range_size",
        "limit",
        "attempted",
        "held",
        "lost",
        "first_error",
        "per_egress",
        "proxy_rss_bytes_per_session",
        "ramp_seconds",
    }
    for run in doc["runs"]:
        assert keys <= set(run), keys - set(run)
        assert (run["egress"], run["origins"], run["port_range_size"]) == (2, 2, 100)
        assert run["limit"] == 400 and run["attempted"] == 450
        assert run["held"] + run["failed"] == run["attempted"]
        assert sum(run["failures"].values()) == run["failed"]
        assert sum(run["per_egress"].values()) == run["held"]
        assert sum(run["per_egress_metrics"].values()) == run["held"]
        assert run["lost"] == 0
        assert run["proxy_rss_bytes_per_session"] > 0 and run["ramp_seconds"] > 0
        assert run["curve"][-1] == [450, run["held"]]


def test_small_run_plot_is_a_png_and_the_output_has_a_table_per_mode(small_run):
    _, png, stdout = small_run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for mode in ("plain", "bind", "connectx"):
        assert f"mode {mode}" in stdout
    assert "physical limit E x R x K" in stdout and "summary" in stdout


def test_sigint_mid_ramp_ends_every_process_and_the_namespace():
    needs_root()
    proc = subprocess.Popen(
        cli_testbed(
            "--mode",
            "connectx",
            "--port-range",
            "40000-40999",
            "--sessions",
            "6000",
            "--concurrency",
            "1",
            "--progress",
            "json",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    events: list[dict] = []
    buf = b""
    fd = proc.stdout.fileno()

    def read_until(predicate, timeout: float = 60) -> dict:
        nonlocal buf
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                event = json.loads(raw)
                events.append(event)
                if predicate(event):
                    return event
        raise AssertionError(f"not seen; events: {[e.get('event') for e in events][-10:]}")

    try:
        space = read_until(lambda e: e["event"] == "namespace")["name"]
        pids = read_until(lambda e: e["event"] == "pids")
        read_until(lambda e: e["event"] == "progress" and e["attempted"] > 0)
        assert procs.namespace_exists(space)
        os.kill(proc.pid, signal.SIGINT)
        read_until(lambda e: e["event"] == "interrupted", timeout=60)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    children = [pids["proxy"], *pids["origins"], *pids["clients"]]
    assert len(children) >= 3
    assert [pid for pid in children if procs.alive(pid)] == []
    assert not procs.namespace_exists(space)
    assert not Path(f"/run/netns/{space}").exists()


def test_a_proxy_that_does_not_start_is_reported_with_its_own_words(tmp_path):
    needs_root()
    proc = subprocess.run(
        cli_testbed(
            *SMALL,
            "--mode",
            "connectx",
            "--sessions",
            "10",
            "--proxy-cmd",
            f"{sys.executable} -c 'import sys; sys.exit(\"no such proxy here\")'",
            "--json",
            str(tmp_path / "tb.json"),
        ),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 1
    run = json.loads((tmp_path / "tb.json").read_text())["runs"][0]
    assert "no such proxy here" in run["error"]


def test_unit_socket_helpers_in_namespace(ns):
    # rss and descendants on ourselves: what the runner reads for the proxy's tree
    assert procs.rss_bytes([os.getpid()]) > 0
    child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    try:
        assert child.pid in procs.descendants(os.getpid())
        assert procs.alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not procs.alive(child.pid)
    with socket.socket() as s:  # the namespace is ours: 127/8 is local
        s.bind(("127.0.1.9", 0))


def test_any_origin_and_any_proxy_in_the_same_scenario(tmp_path):
    """The staging use: the user's origin command and the user's proxy with its own config
    (here ours again, started the way a user would start theirs)."""
    needs_root()
    config = tmp_path / "user.toml"
    config.write_text(proxy_config("connectx", Options(egress=2, origins=2)))
    python = sys.executable
    proc = subprocess.run(
        cli_testbed(
            *SMALL,
            "--sessions",
            "420",
            "--origin-cmd",
            f"{python} -m testbed.wsorigin --listen {{host}}:{{port}}",
            "--proxy-cmd",
            f"{python} -m proxy.cli serve --config {config}",
            "--json",
            str(tmp_path / "tb.json"),
        ),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run,) = json.loads((tmp_path / "tb.json").read_text())["runs"]
    assert run["mode"] == "proxy-cmd"
    assert run["held"] >= 0.995 * 400 and run["lost"] == 0
    assert sum(run["per_egress"].values()) == run["held"]


def test_small_run_json_has_the_scenario_documents_keys_too(small_run):
    """--scenario ramp writes what every scenario writes (one step per mode, one time line),
    next to the ramp's own keys that tools already read."""
    from testbed import scenario_report

    doc, _, _ = small_run
    assert set(scenario_report.DOC_KEYS) <= set(doc) and "runs" in doc
    assert doc["scenario"] == "ramp" and doc["proxy"] == "originpool" and doc["limit"] == 400
    assert [s["name"] for s in doc["steps"]] == ["plain", "bind", "connectx"]
    for step, run in zip(doc["steps"], doc["runs"], strict=True):
        assert list(step) == list(scenario_report.STEP_KEYS)
        assert step["sessions_after"] == run["held"] and step["recovered_100_s"] is None
        assert step["t_start"] < step["t_end"]
    assert doc["close_codes"] is None  # no origin goes away in a ramp
    assert doc["timeline"] and all(
        list(r) == list(scenario_report.TIMELINE_KEYS) for r in doc["timeline"]
    )
    ts = [r["t"] for r in doc["timeline"]]
    assert ts == sorted(ts)
    assert doc["proxy_peak_rss_bytes"] > 0 and doc["proxy_cpu_seconds"] > 0
