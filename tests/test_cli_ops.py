"""The operator's command line (issue 18): every config problem in one run, FILE and
--config FILE everywhere a config is read, a bare ``originpool`` is a usage error,
``demo --ports`` checked, and ``originpool reload``/``stop`` through the pid file."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import app, config_model, pidfile
from proxy.config import ConfigError, parse, pid_file_of
from tests.test_serve import Proc

ROOT = Path(__file__).resolve().parent.parent

BASE = """
[listen]
address = "127.0.0.1:8080"
[admin]
address = "127.0.0.1:9090"
[[routes]]
host = "app.example"
origins = ["http://127.0.2.1:9000"]
[log]
format = "json"
"""


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


def write(tmp_path: Path, text: str, name: str = "originpool.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- check-config names every problem at once ------------------------------------------------


def test_check_config_names_the_missing_address_and_the_bad_one_together(ns, tmp_path):
    """10.99.99.99 is valid anywhere but not on this host; 'bogus' is invalid anywhere: the
    host's answer used to wait for the document's problems to be fixed."""
    path = write(tmp_path, BASE + '[egress]\naddresses = ["10.99.99.99", "bogus"]\n')
    proc = cli("check-config", str(path))
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert [line.split(": ", 2)[1] for line in lines] == [
        "egress.addresses[0]",
        "egress.addresses[1]",
    ], lines
    assert "10.99.99.99 is not assigned to any interface in this namespace" in lines[0]
    assert "'bogus'" in lines[1]


def test_host_problems_and_problems_elsewhere_all_come_out(ns, tmp_path):
    path = write(
        tmp_path,
        BASE.replace('format = "json"', 'format = "jsonn"')
        + '[egress]\naddresses = ["127.0.1.1", "10.99.99.98", "10.99.99.99"]\n',
    )
    proc = cli("check-config", "--config", str(path))
    assert proc.returncode == 2
    keys = [line.split(": ", 2)[1] for line in proc.stderr.splitlines()]
    assert keys == ["log.format", "egress.addresses[1]", "egress.addresses[2]"], proc.stderr


def test_plain_mode_with_addresses_is_an_error_naming_both_keys(tmp_path):
    path = write(tmp_path, BASE + '[egress]\nmode = "plain"\naddresses = ["127.0.1.1"]\n')
    proc = cli("check-config", str(path))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"{path}: egress.addresses: ")
    assert 'egress.mode = "plain"' in proc.stderr and "ignore them" in proc.stderr
    assert cli("check-config", str(write(tmp_path, BASE + '[egress]\nmode = "plain"\n'))).stdout


# -- one spelling of the config everywhere ---------------------------------------------------


def test_file_and_config_flag_are_both_accepted_everywhere(tmp_path):
    path = str(write(tmp_path, BASE + '[egress]\nmode = "plain"\n'))
    for args in (("check-config", path), ("check-config", "--config", path)):
        proc = cli(*args)
        assert proc.returncode == 0 and proc.stdout.startswith(f"{path}: ok ("), proc.stderr
    missing = str(tmp_path / "missing.toml")
    for command in ("serve", "reload", "ports"):
        for args in ((command, missing), (command, "--config", missing)):
            proc = cli(*args)
            # the config was read (and is missing): not refused as a usage error
            assert proc.returncode == 2 and "cannot read" in proc.stderr, (args, proc.stderr)
            assert "usage:" not in proc.stderr and "Traceback" not in proc.stderr
    both = cli("check-config", path, "--config", missing)
    assert both.returncode == 2 and "differ: give one" in both.stderr
    assert cli("check-config", path, "--config", path).returncode == 0  # the same file twice
    serve = cli("serve")
    assert serve.returncode == 2 and "serve needs the config" in serve.stderr


def test_bare_originpool_is_a_usage_error():
    proc = cli()
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("usage: originpool")
    assert "required: COMMAND" in proc.stderr


# -- demo --ports ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ports", "said"),
    [
        ("0", "--ports must be 1..25,536"),
        ("70000", "--ports must be 1..25,536"),
        ("-5", "--ports must be 1..25,536"),
        ("100000000", "--ports must be 1..25,536"),
    ],
)
def test_demo_ports_out_of_range_is_one_line_not_a_traceback(ports, said):
    proc = cli("demo", "--ports", ports)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"originpool demo: {said}"), proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_demo_ports_beyond_the_open_file_limit_are_refused_with_the_arithmetic():
    from proxy.demo import ports_problem

    assert ports_problem(200, nofile=20000) is None
    assert ports_problem(4984, nofile=20000) is None
    said = ports_problem(4985, nofile=20000)
    assert said == (
        "--ports 4,985 needs 19,940 open sockets + 64 and this process may open 20,000 "
        "(RLIMIT_NOFILE): at most --ports 4,984 here"
    )


def test_demo_still_runs_at_the_smallest_range():
    if os.geteuid() != 0:
        pytest.skip("the demo makes a namespace: root")
    proc = cli("demo", "--ports", "1")
    assert proc.returncode == 0, proc.stderr
    assert "physical limit: 2 x 1 x 2 = 4" in proc.stdout
    assert proc.stdout.splitlines()[-1].split()[:2] == ["connectx", "4"]


# -- the pid file ----------------------------------------------------------------------------


def test_pid_file_key_is_a_path_relative_to_the_config(tmp_path):
    parsed = parse(BASE + '[proxy]\npid_file = "run/p.pid"\n', base_dir=tmp_path)
    assert parsed.proxy.pid_path == str(tmp_path / "run" / "p.pid")
    assert parse(BASE).proxy.pid_file is None
    assert parse(BASE).proxy.pid_path == "/run/originpool.pid"  # where nginx users look
    for bad in ('""', "5", '"dir/"'):
        with pytest.raises(ConfigError, match=r"proxy\.pid_file: must be (a string )?.?the path"):
            parse(BASE + f"[proxy]\npid_file = {bad}\n", "t.toml")


def test_stop_reads_only_the_pid_file_of_a_config_being_edited(tmp_path):
    broken = BASE.replace('format = "json"', "format = 5") + '[proxy]\npid_file = "x.pid"\n'
    path = write(tmp_path, broken)
    assert pid_file_of(path) == str(tmp_path / "x.pid")
    assert pid_file_of(write(tmp_path, BASE, "plain.toml")) == "/run/originpool.pid"
    with pytest.raises(ConfigError, match=r"proxy\.pid_file"):
        pid_file_of(write(tmp_path, BASE + "[proxy]\npid_file = 1\n", "bad.toml"))


def test_default_pid_file_unwritable_only_warns_a_named_one_stops_the_start(tmp_path, monkeypatch):
    nowhere = str(tmp_path / "no-such-dir" / "originpool.pid")
    monkeypatch.setattr(config_model, "DEFAULT_PID_FILE", nowhere)
    assert app.claim_pid_file(parse(BASE)) is None  # a non-root container: serve anyway
    named = parse(BASE + f'[proxy]\npid_file = "{nowhere}"\n')
    with pytest.raises(pidfile.PidFileError) as info:
        app.claim_pid_file(named)
    assert info.value.path == nowhere and info.value.errno == 2
    assert str(info.value) == f"pid file {nowhere}: cannot write: No such file or directory"
    good = parse(BASE + '[proxy]\npid_file = "p.pid"\n', base_dir=tmp_path)
    assert app.claim_pid_file(good) == str(tmp_path / "p.pid")
    assert (tmp_path / "p.pid").read_text() == f"{os.getpid()}\n"
    pidfile.remove(str(tmp_path / "p.pid"), os.getpid() + 1)  # not ours: left alone
    assert (tmp_path / "p.pid").exists()
    pidfile.remove(str(tmp_path / "p.pid"))
    assert not (tmp_path / "p.pid").exists()


def test_stop_and_reload_without_a_running_proxy_exit_1_and_signal_nobody(tmp_path):
    pid_path = tmp_path / "originpool.pid"
    path = write(tmp_path, BASE + f'[egress]\nmode = "plain"\n[proxy]\npid_file = "{pid_path}"\n')
    for command in ("stop", "reload"):
        proc = cli(command, "--config", str(path))
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr == (
            f"originpool {command}: pid file {pid_path}: no such file: is the proxy running, "
            "with this [proxy] pid_file?\n"
        )
    # a PID that has exited: the stale file of a proxy that was killed
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    pid_path.write_text(f"{gone.pid}\n")
    proc = cli("stop", str(path))
    assert proc.returncode == 1 and f"stale: PID {gone.pid} is not running" in proc.stderr
    # a live PID that is not the proxy (reused): it must not get the signal
    other = subprocess.Popen(["sleep", "60"])
    try:
        pid_path.write_text(f"{other.pid}\n")
        proc = cli("stop", "--pid-file", str(pid_path))
        assert proc.returncode == 1 and "is not originpool serve" in proc.stderr
        assert other.poll() is None  # still alive: nothing was sent
    finally:
        other.kill()
        other.wait()
    pid_path.write_text("garbage\n")
    proc = cli("reload", str(path))
    assert proc.returncode == 1 and "does not hold a PID (it holds 'garbage')" in proc.stderr


async def test_reload_checks_first_then_signals_and_stop_drains(origins, tmp_path):
    pid_path = tmp_path / "run.pid"
    text = BASE + f'[egress]\naddresses = ["127.0.1.1"]\n[proxy]\npid_file = "{pid_path}"\n'
    path = write(tmp_path, text)
    proc = Proc(path)
    try:
        await asyncio.to_thread(proc.wait_for, "ready")
        assert pid_path.read_text() == f"{proc.p.pid}\n"
        path.write_text(text.replace('["127.0.1.1"]', '["127.0.1.2"]'))
        good = await asyncio.to_thread(cli, "reload", "--config", str(path))
        assert good.returncode == 0, good.stderr
        assert good.stdout == f"originpool reload: sent SIGHUP to PID {proc.p.pid} ({pid_path})\n"
        line = await asyncio.to_thread(proc.wait_for, "reloaded")
        assert line["egress"] == ["127.0.1.2"]
        # a config the proxy would refuse is not sent: check-config's problems, exit 2
        path.write_text(text.replace('["127.0.1.1"]', '["10.99.99.99"]'))
        bad = await asyncio.to_thread(cli, "reload", str(path))
        assert bad.returncode == 2
        assert "egress.addresses[0]: 10.99.99.99 is not assigned" in bad.stderr
        assert bad.stderr.endswith("originpool reload: not sent: the proxy keeps its config\n")
        stop = await asyncio.to_thread(cli, "stop", str(path))  # needs only the pid file
        assert stop.returncode == 0, stop.stderr
        assert await asyncio.to_thread(proc.p.wait, 20) == 0
        await asyncio.to_thread(proc.wait_for, "stopped")
        # SIGHUP (1) is delivered before SIGTERM (15): had the bad reload sent one, the
        # proxy would have logged reload_rejected before it stopped
        events = [ln.get("event") for ln in proc.lines]
        assert events.count("reloaded") == 1 and "reload_rejected" not in events
        assert not pid_path.exists()
        again = await asyncio.to_thread(cli, "stop", str(path))
        assert again.returncode == 1 and "no such file" in again.stderr
    finally:
        if proc.p.poll() is None:
            os.kill(proc.p.pid, signal.SIGTERM)
        await asyncio.to_thread(proc.stop)


async def test_a_pid_file_the_config_names_must_be_writable(ns, tmp_path):
    nowhere = tmp_path / "missing-dir" / "x.pid"
    path = write(tmp_path, BASE + f'[egress]\nmode = "plain"\n[proxy]\npid_file = "{nowhere}"\n')
    proc = await asyncio.to_thread(cli, "serve", str(path))
    assert proc.returncode == 2
    assert f"originpool serve: pid file {nowhere}: cannot write: No such file" in proc.stderr
