"""``[log] access_file`` / ``error_file`` and the signals an operator sends, against a real
``originpool serve`` by PID: logrotate's rename + SIGUSR1 with 1 and 2 workers (the next
lines land in a new file at the old path, none lost), the shipped logrotate rule run by the
real ``logrotate``, a reopen that fails, check-config naming an unwritable log directory, and
USR2, WINCH, PIPE and QUIT never fatal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog

from tests.test_serve import Proc

ROOT = Path(__file__).resolve().parent.parent
LOGROTATE_RULE = ROOT / "deploy" / "logrotate.d" / "originpool"

CONFIG = """
[listen]
address = "127.0.0.1:8080"
[admin]
address = "127.0.0.1:9090"
[egress]
addresses = ["127.0.1.1"]
[[routes]]
host = "app.example"
origins = ["http://127.0.2.1:9000"]
[proxy]
workers = {workers}
pid_file = "{dir}/originpool.pid"
[timeouts]
drain = 5
[log]
format = "json"
access_file = "{dir}/logs/access.log"
"""

Line = dict[str, object]


def write_config(tmp_path: Path, workers: int, extra: str = "") -> Path:
    (tmp_path / "logs").mkdir(exist_ok=True)
    path = tmp_path / "originpool.toml"
    text = CONFIG.replace("{workers}", str(workers)).replace("{dir}", str(tmp_path))
    path.write_text(text + extra)
    return path


def lines_of(path: Path) -> list[Line]:
    """Every line of a log file, each one whole JSON (a torn line fails the test here)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path} ends in a partial line"
    return [json.loads(raw) for raw in data.splitlines()]


def wait_until(what: str, done: Callable[[], bool], timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while not done():
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def wait_event(proc: Proc, event: str, timeout: float = 20, count: int = 1) -> Line:
    """The count-th line with this event on stdout, as ``Proc.wait_for``, but a proxy that
    died (a signal's default action) fails at once with its exit status: its orphaned
    workers would keep the pipes open that ``Proc.wait_for`` reads to the end."""
    end = time.monotonic() + timeout
    while True:
        found = [line for line in proc.lines if line.get("event") == event]
        if len(found) >= count:
            return found[count - 1]
        code = proc.p.poll()
        if code is not None or time.monotonic() > end:
            raise AssertionError(f"{count} {event!r} lines not seen; proxy exit status {code}")
        time.sleep(0.02)


async def get(path: str) -> int:
    """One request on a new connection (Connection: close): with 2 workers SO_REUSEPORT
    spreads new connections by their 4-tuple, so a batch reaches both."""
    reader, writer = await asyncio.open_connection("127.0.0.1", 8080)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    return int(head.split(b" ", 2)[1])


async def batch(tag: str, count: int) -> list[str]:
    paths = [f"/{tag}/{i}" for i in range(count)]
    assert await asyncio.gather(*(get(p) for p in paths)) == [200] * count
    return paths


def finish(proc: Proc, *logs: Path) -> int:
    """``proc.stop()``, then every worker it left behind (a master a signal killed leaves
    them serving) killed by PID, checked to be this test's serve first."""
    try:
        return proc.stop()
    finally:
        seen = proc.lines + [line for f in logs for line in lines_of(f)]
        config = proc.p.args[-1]
        for pid in {line.get("pid") for line in seen} - {proc.p.pid}:
            with contextlib.suppress(OSError):
                if isinstance(pid, int) and config in Path(f"/proc/{pid}/cmdline").read_text():
                    os.kill(pid, signal.SIGKILL)


def access_paths(*files: Path) -> list[str]:
    return [str(line["path"]) for f in files for line in lines_of(f)]


@pytest.mark.parametrize("workers", [1, 2])
async def test_rename_then_usr1_moves_the_next_lines_to_a_new_file_none_lost(
    origins, tmp_path, workers
):
    """What logrotate does (rename, then postrotate's SIGUSR1 to the master by PID), with
    requests in flight while the signal arrives: every request has exactly one access line,
    in the old file or the new, and every request after the reopen is in the new file."""
    log, rotated = tmp_path / "logs" / "access.log", tmp_path / "logs" / "access.log.1"
    proc = Proc(write_config(tmp_path, workers))
    try:
        await asyncio.to_thread(wait_event, proc, "ready", 20, workers)
        before = await batch("before", 40)
        await asyncio.to_thread(wait_until, "40 lines before", lambda: len(access_paths(log)) == 40)
        os.rename(log, rotated)

        # requests racing the signal: each lands in one file or the other, none lost
        racing = asyncio.create_task(batch("racing", 120))
        await asyncio.sleep(0)
        os.kill(proc.p.pid, signal.SIGUSR1)
        during = await racing
        reopened = workers + (workers > 1)  # each worker, and the master that forwarded it
        await asyncio.to_thread(wait_event, proc, "logs_reopened", 20, reopened)
        assert log.exists()

        after = await batch("after", 40)
        everything = before + during + after
        await asyncio.to_thread(
            wait_until,
            "every request's line",
            lambda: len(access_paths(rotated, log)) >= len(everything),
        )
        assert sorted(access_paths(rotated, log)) == sorted(everything)  # once each
        assert set(after) <= set(access_paths(log))
        assert set(before) <= set(access_paths(rotated))
        new = lines_of(log)
        assert {line["worker"] for line in new if line["path"] in after} == set(range(workers))
        assert all(line["event"] == "access" for line in new)
        assert proc.p.poll() is None
    finally:
        code = await asyncio.to_thread(finish, proc)
    assert code == 0
    reopens = [ln for ln in proc.lines if ln.get("event") == "logs_reopened"]
    assert all(ln["files"] == [str(log)] and ln["failed"] == 0 for ln in reopens)


async def test_error_file_takes_every_other_line_and_rotates_with_the_access_log(origins, tmp_path):
    """Both keys set: stdout stays empty, the ready/reopened lines go to the error log, the
    access lines to the access log, and one SIGUSR1 reopens both (2 workers)."""
    logs = tmp_path / "logs"
    config = write_config(tmp_path, 2, f'error_file = "{logs}/error.log"\n')
    access, error = logs / "access.log", logs / "error.log"

    def events(path: Path) -> list[object]:
        return [line["event"] for line in lines_of(path)]

    proc = Proc(config)
    try:
        await asyncio.to_thread(
            wait_until, "2 ready lines", lambda: events(error).count("ready") == 2
        )
        await batch("one", 10)
        await asyncio.to_thread(wait_until, "10 access lines", lambda: len(events(access)) == 10)
        os.rename(access, logs / "access.log.1")
        os.rename(error, logs / "error.log.1")
        os.kill(proc.p.pid, signal.SIGUSR1)
        await asyncio.to_thread(
            wait_until, "3 reopens", lambda: events(error).count("logs_reopened") == 3
        )
        await batch("two", 10)
        await asyncio.to_thread(
            wait_until, "10 new access lines", lambda: len(events(access)) == 10
        )
        assert set(events(access)) == {"access"}
        assert "access" not in events(error) and "ready" in events(logs / "error.log.1")
    finally:
        code = await asyncio.to_thread(finish, proc, error, logs / "error.log.1")
    assert code == 0
    assert proc.lines == []  # nothing on stdout
    assert "stopped" in events(error) and "master_stopped" in events(error)


async def test_a_reopen_that_fails_names_the_key_and_keeps_writing_to_the_old_file(
    origins, tmp_path
):
    """The log directory renamed away (the path cannot be opened now): the failure is one
    error line naming log.access_file, and the lines keep going to the file open before."""
    proc = Proc(write_config(tmp_path, 1))
    try:
        await asyncio.to_thread(wait_event, proc, "ready")
        os.rename(tmp_path / "logs", tmp_path / "moved")
        os.kill(proc.p.pid, signal.SIGUSR1)
        failed = await asyncio.to_thread(wait_event, proc, "log_reopen_failed")
        assert failed["key"] == "log.access_file" and failed["errno"] == "ENOENT"
        assert failed["path"] == str(tmp_path / "logs" / "access.log")
        paths = await batch("kept", 10)
        old = tmp_path / "moved" / "access.log"
        await asyncio.to_thread(wait_until, "10 lines", lambda: len(access_paths(old)) == 10)
        assert sorted(access_paths(old)) == sorted(paths)
    finally:
        assert await asyncio.to_thread(finish, proc) == 0


@pytest.mark.parametrize("workers", [1, 2])
async def test_usr2_winch_and_pipe_are_never_fatal_and_quit_stops_gracefully(
    origins, tmp_path, workers
):
    """nginx's binary-upgrade signals are ignored with one line each, SIGPIPE silently, the
    proxy keeps serving; SIGQUIT (nginx's graceful stop) drains and exits 0."""
    proc = Proc(write_config(tmp_path, workers))
    try:
        await asyncio.to_thread(wait_event, proc, "ready", 20, workers)
        for sig in (signal.SIGUSR2, signal.SIGWINCH, signal.SIGPIPE):
            os.kill(proc.p.pid, sig)
        await asyncio.to_thread(wait_event, proc, "signal_ignored", 20, 2)
        await batch("still", 10)
        assert proc.p.poll() is None
        os.kill(proc.p.pid, signal.SIGQUIT)
        assert await asyncio.to_thread(proc.p.wait, 20) == 0
    finally:
        await asyncio.to_thread(finish, proc)
    ignored = [ln for ln in proc.lines if ln.get("event") == "signal_ignored"]
    assert sorted(ln["signal"] for ln in ignored) == ["SIGUSR2", "SIGWINCH"]
    assert all(ln["worker"] == ("master" if workers > 1 else 0) for ln in ignored)
    assert any(ln.get("event") == "stopped" for ln in proc.lines)


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate is not installed")
@pytest.mark.parametrize("workers", [1, 2])
async def test_the_shipped_logrotate_rule_rotates_a_running_proxy(origins, tmp_path, workers):
    """deploy/logrotate.d/originpool as shipped, its paths pointed at the test's files, run
    by the real logrotate (-f): it renames, its postrotate sends SIGUSR1 to the pid file's
    PID, and the next lines land in a new access.log with none lost."""
    config = write_config(tmp_path, workers)
    logs = tmp_path / "logs"
    rule = LOGROTATE_RULE.read_text()
    assert "/var/log/originpool/" in rule and "/run/originpool.pid" in rule
    rule = rule.replace("/var/log/originpool/", f"{logs}/").replace(
        "/run/originpool.pid", str(tmp_path / "originpool.pid")
    )
    (tmp_path / "logrotate.conf").write_text(rule)
    proc = Proc(config)
    try:
        await asyncio.to_thread(wait_event, proc, "ready", 20, workers)
        before = await batch("before", 20)
        log = logs / "access.log"
        await asyncio.to_thread(wait_until, "20 lines", lambda: len(access_paths(log)) == 20)
        out = await asyncio.to_thread(
            subprocess.run,
            ["logrotate", "-f", "-s", str(tmp_path / "state"), str(tmp_path / "logrotate.conf")],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        await asyncio.to_thread(wait_event, proc, "logs_reopened", 20, workers + (workers > 1))
        after = await batch("after", 20)
        rotated = logs / "access.log.1"  # delaycompress: the newest rotation stays plain
        await asyncio.to_thread(wait_until, "20 new lines", lambda: len(access_paths(log)) == 20)
        assert sorted(access_paths(rotated)) == sorted(before)
        assert sorted(access_paths(log)) == sorted(after)
    finally:
        assert await asyncio.to_thread(finish, proc) == 0


def check_config(path: Path, *wrap: str) -> subprocess.CompletedProcess[str]:
    cmd = [*wrap, sys.executable, "-m", "proxy.cli", "check-config", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def test_check_config_names_the_key_of_a_log_file_that_cannot_be_written(tmp_path):
    """No directory, a directory given as the file, and a read-only directory (a read-only
    tmpfs in a mount namespace of the test's own: unwritable even to root)."""
    config = write_config(tmp_path, 1, f'error_file = "{tmp_path}/nowhere/error.log"\n')
    config.write_text(config.read_text().replace("logs/access.log", "logs"))
    out = check_config(config)
    assert out.returncode == 2, out
    assert f"log.access_file: {tmp_path}/logs: is a directory" in out.stderr
    assert f"log.error_file: {tmp_path}/nowhere/error.log: cannot be created: no dir" in (
        out.stderr
    )
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) for the read-only mount")
    config = write_config(tmp_path, 1)
    script = f'mount -t tmpfs -o ro none "{tmp_path}/logs" && exec "$@"'
    out = check_config(config, "unshare", "-m", "sh", "-c", script, "sh")
    assert out.returncode == 2, out
    assert f"log.access_file: {tmp_path}/logs/access.log: cannot be created: directory" in (
        out.stderr
    )
    assert check_config(config).returncode == 0  # the same config where it can write


@pytest.fixture
def fresh_logs(monkeypatch):
    """logs.configure() in this process, undone after: structlog's defaults and the access
    path's module state back as they were, the test's files closed."""
    from proxy import logs

    real = structlog.configure
    monkeypatch.setattr(
        structlog, "configure", lambda **kw: real(**{**kw, "cache_logger_on_first_use": False})
    )
    for name in ("_files", "_access_out", "_access_json", "_access_log"):
        monkeypatch.setattr(logs, name, {} if name == "_files" else getattr(logs, name))
    yield logs
    logs.flush()
    for _key, sink in logs._files.values():
        os.close(sink._fd)
    structlog.reset_defaults()


def test_console_format_goes_to_the_files_too_and_a_reopen_follows_the_rename(fresh_logs, tmp_path):
    """format = "console" with both files: readable lines, each in its own file, and
    logs.reopen() after a rename starts a new file at the path (the old keeps its lines)."""
    access, error = tmp_path / "access.log", tmp_path / "error.log"
    fresh_logs.configure("console", "info", str(access), str(error))
    structlog.get_logger("t").info("ready", listen=["127.0.0.1:8080"])
    fresh_logs.access({"method": "GET", "path": "/one", "status": 200})
    fresh_logs.flush()
    os.rename(access, tmp_path / "access.log.1")
    assert fresh_logs.reopen() == []
    fresh_logs.access({"method": "GET", "path": "/two", "status": 200})
    fresh_logs.flush()
    assert "ready" in error.read_text() and "access" not in error.read_text()
    old, new = (tmp_path / "access.log.1").read_text(), access.read_text()
    assert "path=/one" in old and "/two" not in old
    assert "path=/two" in new and "/one" not in new
    assert sorted(fresh_logs.open_files()) == sorted([str(access), str(error)])


LOGGED = re.compile(r'\.(?:debug|info|warning|error|exception)\(\s*"([a-z_]+)"')
# events passed as values rather than written at the call: logs.access's, serve's start-up
PASSED = {"access", "websocket_session", "open_file_limit_low"}


def test_the_readme_table_has_a_row_for_every_event_and_none_stale():
    """README's "Log lines and their fields" lists every event the proxy logs (a new line
    without a row fails here), and no event the code no longer writes."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("### Log lines and their fields", 1)[1].split("\n#", 1)[0]
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", table, re.M))
    sources = [
        p.read_text()
        for d in ("proxy", "pool")
        for p in sorted((ROOT / d).glob("*.py"))  # not testbed: the bench's own lines
    ]
    logged = {name for text in sources for name in LOGGED.findall(text)} | PASSED
    assert logged - rows == set(), "events without a README row"
    assert {row for row in rows if not any(f'"{row}"' in text for text in sources)} == set()


async def test_a_reload_that_changes_log_keeps_the_files_and_says_so(origins, tmp_path):
    """SIGHUP with another access_file: one reload_kept_log line (worker 0's, of 2), and
    the lines keep going to the file opened at start."""
    config = write_config(tmp_path, 2)
    proc = Proc(config)
    try:
        await asyncio.to_thread(wait_event, proc, "ready", 20, 2)
        config.write_text(config.read_text().replace("access.log", "other.log"))
        os.kill(proc.p.pid, signal.SIGHUP)
        await asyncio.to_thread(wait_event, proc, "reloaded", 20, 2)
        paths = await batch("kept", 10)
        log = tmp_path / "logs" / "access.log"
        await asyncio.to_thread(wait_until, "10 lines", lambda: len(access_paths(log)) == 10)
        assert sorted(access_paths(log)) == sorted(paths)
        assert not (tmp_path / "logs" / "other.log").exists()
    finally:
        assert await asyncio.to_thread(finish, proc) == 0
    kept = [line for line in proc.lines if line.get("event") == "reload_kept_log"]
    assert [line["worker"] for line in kept] == [0]
