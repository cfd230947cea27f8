"""``originpool testbed --scenario churn|storm|faults``: refusals before anything starts, the
arithmetic of recovery, and whole runs at small scale (E=2, R=100, K=2: a 400-session limit)
as a user starts them, with the exact accounting held + refused + lost == attempted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pool import netns
from testbed import scenario_report
from testbed.wsload import parse_mix

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--egress", "2", "--origins", "2", "--port-range", "40000-40099"]


def needs_root() -> None:
    reason = netns.can_create()
    if reason:
        pytest.skip(reason)


def cli_testbed(*args: str) -> list[str]:
    return [sys.executable, "-m", "proxy.cli", "testbed", *args]


def run_json(tmp: Path, *args: str, timeout: float = 90) -> tuple[dict, dict, str]:
    """A scenario as a subprocess: its --json document and its final JSON-lines event."""
    proc = subprocess.run(
        cli_testbed(*SMALL, *args, "--progress", "json", "--json", str(tmp / "s.json")),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    (done,) = [e for e in events if e["event"] == "scenario"]
    return json.loads((tmp / "s.json").read_text()), done["detail"], proc.stdout


def assert_shape(doc: dict[str, Any]) -> None:
    """Every promised key present (null where it does not apply), nothing else."""
    assert list(doc) == list(scenario_report.DOC_KEYS)
    assert doc["proxy"] in ("originpool", "custom") and doc["limit"] == 2 * 100 * 2
    for step in doc["steps"]:
        assert list(step) == list(scenario_report.STEP_KEYS)
        assert step["t_start"] <= step["t_end"]
    for row in doc["timeline"]:
        assert list(row) == list(scenario_report.TIMELINE_KEYS)
    ts = [row["t"] for row in doc["timeline"]]
    assert ts == sorted(ts) and len(ts) >= 2
    assert doc["proxy_peak_rss_bytes"] > 0 and doc["proxy_cpu_seconds"] > 0


def assert_accounting(detail: dict[str, Any]) -> None:
    assert detail["attempted"] > 0
    assert detail["held"] + detail["refused"] + detail["lost"] == detail["attempted"]
    assert sum(detail["refused_by"].values()) == detail["refused"]
    assert sum(detail["lost_by"].values()) == detail["lost"]


# -- refused before anything starts ----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--scenario", "storm", "--target", "1.2"], "--target"),
        (["--scenario", "storm", "--rate", "5", "--duration", "10"], "--rate"),
        (["--scenario", "storm", "--storm-origins", "3"], "--storm-origins"),
        (["--scenario", "storm", "--lifetime", "5"], "--lifetime"),
        (["--scenario", "churn", "--sessions", "100"], "--sessions"),
        (["--scenario", "churn", "--lifetime", "30", "--duration", "20"], "--duration"),
        (["--scenario", "churn", "--mode", "all"], "--mode"),
        (["--scenario", "ramp", "--rate", "10"], "--rate"),
        (["--scenario", "faults", "--egress", "1"], "--egress"),
        (["--scenario", "faults", "--origins", "1"], "--origins"),
        (["--scenario", "faults", "--target", "0.9"], "--target"),
        (["--scenario", "faults", "--reload-signal", "HUP"], "--reload-signal"),
        (["--scenario", "faults", "--proxy-cmd", "x", "--stop-signal", "NOPE"], "--stop-signal"),
        (["--scenario", "storm", "--stop-signal", "QUIT"], "--stop-signal"),
        (["--scenario", "churn", "--mix", "0:0:0"], "--mix"),
    ],
)
def test_nonsense_is_refused_before_anything_starts_naming_the_option(args, named):
    proc = subprocess.run(
        cli_testbed(*SMALL, *args), capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert named in proc.stderr
    assert proc.stdout == ""  # nothing started: no limit line, no namespace


def test_recovery_times_are_monotonic_and_null_when_never_reached():
    back = [10.2, 10.1, 10.5, 11.0]
    assert scenario_report.recovery_times(4, back, 10.0) == (0.2, 1.0, 1.0)
    r50, r99, r100 = scenario_report.recovery_times(5, back, 10.0)
    assert (r50, r99, r100) == (0.5, None, None)  # 3 of 5 back at 10.5; one never came
    assert scenario_report.recovery_times(0, [], 3.0) == (0.0, 0.0, 0.0)
    ladder = [float(i) for i in range(1, 201)]
    r50, r99, r100 = scenario_report.recovery_times(200, ladder, 0.0)
    assert r50 == 100.0 and r99 == 198.0 and r100 == 200.0
    assert r50 <= r99 <= r100


def test_public_doc_keeps_exactly_the_promised_keys():
    doc = scenario_report.public_doc(
        {"scenario": "x", "steps": [{"name": "a", "drops": 3}], "timeline": [{"t": 0, "z": 1}]}
    )
    assert list(doc) == list(scenario_report.DOC_KEYS)
    assert doc["steps"][0]["recovered_50_s"] is None and doc["steps"][0]["drops"] == 3
    assert doc["timeline"] == [{"t": 0, "live": None, "failures": None, "time_wait": None,
                                "other_states": None}]  # fmt: skip


def test_close_mix_is_normalised():
    assert parse_mix("2:1:1") == (0.5, 0.25, 0.25)
    with pytest.raises(ValueError):
        parse_mix("1:1")


# -- churn -----------------------------------------------------------------------------------

CHURN = ["--scenario", "churn", "--rate", "50", "--lifetime", "2", "--duration", "5"]


@pytest.fixture(scope="module")
def churn_mixed(tmp_path_factory) -> tuple[dict, dict, str]:
    needs_root()
    return run_json(tmp_path_factory.mktemp("churn"), *CHURN, "--mix", "1:1:1")


def test_churn_accounts_for_every_session(churn_mixed):
    doc, detail, _ = churn_mixed
    assert_shape(doc)
    assert_accounting(detail)
    assert doc["scenario"] == "churn" and doc["proxy"] == "originpool"
    (step,) = doc["steps"]
    assert step["name"] == "churn" and step["recovered_50_s"] is None  # n/a: null, not absent
    # every session held to the end of its lifetime was closed by one of the three kinds
    closes = detail["closes"]
    assert set(closes) == {"close", "fin", "rst"} and all(v > 10 for v in closes.values())
    dropped = detail["lost_by"].get("dropped", 0)
    assert sum(closes.values()) + detail["checked"] + dropped == detail["held"] + detail["lost"]
    assert max(row["live"] for row in doc["timeline"]) > 50  # near rate x lifetime = 100


def test_churn_timeline_reads_the_kernel_every_second(churn_mixed):
    doc, _, stdout = churn_mixed
    samples = [json.loads(line) for line in stdout.splitlines() if '"sample"' in line]
    assert len(samples) >= 5 and all("origin_time_wait" in s for s in samples)
    gaps = [b["t"] - a["t"] for a, b in zip(doc["timeline"], doc["timeline"][1:], strict=False)]
    assert max(gaps) < 2.0


@pytest.mark.parametrize("mix", ["1:0:0", "0:1:0"])
def test_churn_time_wait_sits_with_whoever_closed_first(tmp_path, mix):
    """Measured, not assumed: a client Close handshake is answered by the origin, which
    closes its side first, so the origin holds the TIME_WAIT of the upstream leg; a client
    FIN means the client closed first on its own leg (one TIME_WAIT per close there)."""
    needs_root()
    doc, detail, _ = run_json(tmp_path, *CHURN, "--mix", mix)
    assert_accounting(detail)
    final = detail["final"]
    closes = detail["closes"]
    if mix == "1:0:0":
        n = closes["close"]
        assert n > 50
        # the origin closed first: its side holds most TIME_WAIT (about half of the closes
        # here; the rest end without one, or in both sides' when the FINs cross)
        assert final["origin_time_wait"] >= n // 4, final
        assert final["origin_time_wait"] > 2 * final["time_wait"], final
        assert doc["timeline"][-1]["time_wait"] == final["time_wait"]
    else:
        n = closes["fin"]
        assert n > 50
        assert final["client_time_wait"] == n  # every client FIN: the client's TIME_WAIT
        assert final["time_wait"] <= n // 10


# -- storm -----------------------------------------------------------------------------------

STORM = ["--scenario", "storm", "--duration", "30"]


@pytest.fixture(scope="module")
def storm_all(tmp_path_factory) -> tuple[dict, dict, str]:
    needs_root()
    return run_json(tmp_path_factory.mktemp("storm"), *STORM)


def test_storm_every_session_is_dropped_with_1011_and_comes_back(storm_all):
    doc, detail, _ = storm_all
    assert_shape(doc)
    assert_accounting(detail)
    ramp, storm = doc["steps"]
    assert ramp["name"] == "ramp" and ramp["sessions_after"] == 360  # 0.9 x 400
    assert ramp["recovered_50_s"] is None
    assert storm["name"] == "storm" and storm["sessions_before"] == 360
    assert detail["storm_expected_drops"] == 360 and detail["storm_settled"] is True
    assert doc["close_codes"] == {"1011": 360}  # originpool: Close 1011 when the origin goes
    assert storm["lost"] == 0 and storm["sessions_after"] == 360
    r50, r99, r100 = storm["recovered_50_s"], storm["recovered_99_s"], storm["recovered_100_s"]
    assert r50 is not None and r99 is not None and r100 is not None
    # each time is rounded to the millisecond on its own: the difference may be 1 ms short
    assert 0 <= r50 <= r99 <= r100 <= storm["t_end"] - storm["t_start"] + 0.002
    assert detail["held"] == 360 and detail["lost"] == 0


def test_storm_of_one_origin_drops_only_its_sessions(tmp_path):
    needs_root()
    doc, detail, _ = run_json(tmp_path, *STORM, "--storm-origins", "1", "--target", "0.5")
    assert_accounting(detail)
    _, storm = doc["steps"]
    # exactly the sessions the kernel saw on the restarted origin before the kill (least_conn
    # spreads them roughly, not exactly, in halves while handshakes overlap)
    dropped = detail["storm_expected_drops"]
    assert 0 < dropped < 200
    assert doc["close_codes"] == {"1011": dropped}
    assert storm["sessions_after"] == 200 and storm["lost"] == 0
    assert storm["recovered_50_s"] <= storm["recovered_99_s"] <= storm["recovered_100_s"]


def test_any_proxy_and_any_origin_in_a_scenario(tmp_path):
    """--proxy-cmd and --origin-cmd keep their ramp semantics: ours again, started the way a
    user would start theirs; the JSON says "custom" and the kernel still counts for it."""
    needs_root()
    from testbed.run import Options, proxy_config

    config = tmp_path / "user.toml"
    config.write_text(proxy_config("connectx", Options(egress=2, origins=2)))
    python = sys.executable
    doc, detail, _ = run_json(
        tmp_path,
        *STORM,
        "--target",
        "0.5",
        "--origin-cmd",
        f"{python} -m testbed.wsorigin --listen {{host}}:{{port}}",
        "--proxy-cmd",
        f"{python} -m proxy.cli serve --config {config}",
    )
    assert_shape(doc)
    assert_accounting(detail)
    assert doc["proxy"] == "custom" and detail["mode"] == "proxy-cmd"
    assert doc["close_codes"] == {"1011": 200} and detail["held"] == 200


def test_sigint_mid_churn_ends_every_process_and_the_namespace():
    needs_root()
    import os
    import signal

    from testbed import procs

    argv = cli_testbed(*SMALL, *CHURN[:-1], "30", "--progress", "json")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    events: list[dict] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends at the runner's exit: bounded by its own timeouts
            event = json.loads(line)
            events.append(event)
            if event["event"] == "sample" and event["live"] > 0:
                proc.send_signal(signal.SIGINT)  # mid-load, sessions held
                break
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    space = next(e for e in events if e["event"] == "namespace")["name"]
    pids = next(e for e in events if e["event"] == "pids")
    children = [pids["proxy"], *pids["origins"], *pids["clients"]]
    assert [pid for pid in children if procs.alive(pid)] == []
    assert not procs.namespace_exists(space) and not os.path.exists(f"/run/netns/{space}")


# -- faults ----------------------------------------------------------------------------------

FAULTS = ["--scenario", "faults"]  # 0.5 x 400 = 200 sessions held, 20 new ones per step


@pytest.fixture(scope="module")
def faults_run(tmp_path_factory) -> tuple[dict, dict, str]:
    needs_root()
    return run_json(tmp_path_factory.mktemp("faults"), *FAULTS)


def new_ok(ev: dict[str, Any], *keys: str) -> int:
    return sum(int((ev.get(k) or {}).get("ok", 0)) for k in keys)


def test_faults_steps_in_order_each_accounted_exactly(faults_run):
    doc, detail, _ = faults_run
    assert_shape(doc)
    assert_accounting(detail)
    names = [s["name"] for s in doc["steps"]]
    assert names == ["ramp", "reload", "egress_del", "egress_add", "kill_origin", "stop"]
    steps = {s["name"]: s for s in doc["steps"]}
    ev = doc["evidence"]
    assert steps["ramp"]["sessions_after"] == 200
    # every step: after = before + the new sessions it opened - the sessions it lost or drained
    opened = {
        "reload": new_ok(ev["reload"], "new_sessions_new_route", "new_sessions_old_route"),
        "egress_del": new_ok(ev["egress_del"], "new_sessions"),
        "egress_add": new_ok(ev["egress_add"], "new_sessions")
        + int(ev["egress_add"]["sessions_until_used"].get("ok", 0)),
        "kill_origin": new_ok(ev["kill_origin"], "new_sessions"),
        "stop": 0,
    }
    for name, n in opened.items():
        s = steps[name]
        gone = s["lost"] + ev[name]["drained_1001"]
        assert s["sessions_after"] == s["sessions_before"] + n - gone, (name, s, ev[name])
        assert s["failures"] == {}, (name, s["failures"])  # no handshake failed in any step
        assert s["recovered_50_s"] is None  # nothing reconnects here: n/a, null
    for name in ("reload", "egress_add", "stop"):
        assert steps[name]["lost"] == 0, (name, steps[name])
    # the removed IP's sessions end at once, told why (issue 18 item 2): no reply to a source
    # the host no longer owns can arrive
    gone = ev["egress_del"]
    on_it = gone["census_before"][gone["egress"]]
    assert steps["egress_del"]["lost"] == on_it > 0 and gone["close_codes"] == {"1011": on_it}
    # held sessions lost nothing across the reload, the others nothing across the removal
    assert ev["reload"]["held_echo"] == {"ok": steps["reload"]["sessions_after"], "failed": 0}
    assert ev["egress_add"]["held_echo"]["failed"] == 0
    assert ev["kill_origin"]["held_echo"]["failed"] == 0
    # the only losses: those and the killed origin's sessions, each told why with Close 1011
    lost = steps["kill_origin"]["lost"] + steps["egress_del"]["lost"]
    assert detail["lost_by"] == {"dropped_1011": lost}


def test_faults_reload_adds_a_route_for_new_sessions_only(faults_run):
    doc, _, _ = faults_run
    ev = doc["evidence"]["reload"]
    assert ev["before_status_new_route"] == 421  # no such route before the SIGHUP
    assert ev["reloaded_lines"] == 1 and ev["reload_rejected_lines"] == 0
    assert ev["new_sessions_new_route"] == {"ok": 20}
    assert ev["new_sessions_old_route"] == {"ok": 5}


def test_faults_egress_ip_shown_down_then_back_without_restart(faults_run):
    doc, _, _ = faults_run
    gone, back = doc["evidence"]["egress_del"], doc["evidence"]["egress_add"]
    ip = gone["egress"]
    assert ip == "127.0.1.2" == back["egress"]
    # removed: its connections reset at once, the new sessions all went to the other IP
    # (kernel and /ports); known down from the kernel's announcement, so seldom even tried
    assert gone["new_sessions"] == {"ok": 20}
    assert gone["census_after"][ip] == 0 < gone["census_before"][ip]
    assert gone["census_after"]["127.0.1.1"] == gone["census_before"]["127.0.1.1"] + 20
    view = gone["proxy_view"]
    assert view["egress_down"] == {"127.0.1.1": 0.0, ip: 1.0}
    assert "127.0.1.1" not in view["failover_not_on_host"]
    assert view["ports_established_by_egress"] == gone["census_after"]
    assert gone["proxy_log"]["egress_down"] >= 1 and gone["proxy_log"]["egress_unavailable"] == 0
    # re-added: used again by new sessions, gauge back to 0, one egress_up line
    assert back["back"] is True and back["egress_up_lines"] >= 1
    assert back["census_after"][ip] > back["census_before"][ip]
    assert back["proxy_view"]["egress_down"][ip] == 0.0
    assert back["proxy_view"]["ports_established_by_egress"] == back["census_after"]


def test_faults_killed_origin_sessions_get_1011_and_sigterm_drains_with_1001(faults_run):
    doc, detail, _ = faults_run
    steps = {s["name"]: s for s in doc["steps"]}
    kill, stop = doc["evidence"]["kill_origin"], doc["evidence"]["stop"]
    n = kill["sessions_on_it"]
    assert 0 < n < steps["kill_origin"]["sessions_before"]  # the other origin's continue
    assert kill["close_codes"] == {"1011": n} and steps["kill_origin"]["lost"] == n
    assert kill["all_dropped"] is True and kill["new_sessions"] == {"ok": 20}
    held = steps["stop"]["sessions_before"]
    assert stop["close_codes"] == {"1001": held} and stop["drained_1001"] == held
    assert steps["stop"]["sessions_after"] == 0 and steps["stop"]["lost"] == 0
    assert stop["exit_code"] == 0 and stop["proxy_exited"] is True
    assert stop["proxy_log"] == {"draining": 1, "stopped": 1}
    assert detail["drained"] == held and detail["proxy_exit_code"] == 0
    assert doc["close_codes"] == {"1001": held, "1011": n + steps["egress_del"]["lost"]}


def test_faults_under_another_proxy_reports_what_does_not_apply(tmp_path):
    """Ours again, started as a user starts theirs: without --reload-signal the route change
    is n/a (null, with the reason), and no census or /metrics of originpool's is read; the
    kernel's census per source IP still shows the IP gone and back."""
    needs_root()
    from testbed.run import Options, proxy_config
    from testbed.scenarios.faults import LO_SUBNETS, FaultsRun  # noqa: F401 (the module is there)

    config = tmp_path / "user.toml"
    config.write_text(proxy_config("connectx", Options(egress=2, origins=2)))
    doc, detail, _ = run_json(
        tmp_path,
        *FAULTS,
        "--proxy-cmd",
        f"{sys.executable} -m proxy.cli serve --config {config}",
    )
    assert_shape(doc)
    assert_accounting(detail)
    assert doc["proxy"] == "custom"
    reload = doc["steps"][1]
    assert reload["name"] == "reload" and reload["lost"] is None and reload["failures"] is None
    assert doc["evidence"]["reload"]["n/a"].startswith("n/a: the route change")
    gone, back = doc["evidence"]["egress_del"], doc["evidence"]["egress_add"]
    assert gone["proxy_view"] == {"n/a": "another proxy: no census or /metrics of originpool's"}
    assert gone["census_after"]["127.0.1.2"] == 0 < gone["census_before"]["127.0.1.2"]
    assert back["back"] is True and "egress_up_lines" not in back
    assert doc["evidence"]["stop"]["signal"] == "TERM"
    assert doc["evidence"]["stop"]["exit_code"] == 0
