"""The open-file budget: the shipped defaults never warn about themselves, and a limit the
process cannot carry is warned about once, with the arithmetic and the number that fits."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.app import FileBudget, build_settings, startup_warnings
from proxy.config import parse

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "originpool.toml"
MINIMAL = """
[listen]
address = "127.0.0.1:8080"
[[routes]]
host = "app.example"
origins = ["http://127.0.2.1:9000"]
"""
NOFILE = 4000  # lowered for the child (allowed to anyone): the figures do not depend on CI


def test_budget_arithmetic() -> None:
    budget = FileBudget(20_000)
    assert budget.max_connections == 9_968  # (20,000 - 64) // 2
    assert budget.shortfall(9_968) is None
    assert budget.shortfall(10_000) == (
        "max_connections 10,000 x 2 sockets + 64 reserve = 20,064 > RLIMIT_NOFILE 20,000 per "
        'worker: lower [limits] max_connections to 9,968 (or to "auto") or raise LimitNOFILE'
    )
    assert FileBudget(100).max_connections == 18 and FileBudget(10).max_connections == 1


def test_auto_is_what_this_process_carries_and_never_warns() -> None:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    config = parse(MINIMAL)
    assert config.limits.max_connections is None
    assert build_settings(config).max_connections == FileBudget(soft).max_connections
    assert startup_warnings(config, soft) == []
    assert startup_warnings(config, 200) == []  # "auto" fits any limit by construction
    explicit = parse(MINIMAL + "[limits]\nmax_connections = 5000\n")
    assert build_settings(explicit).max_connections == 5000
    ((event, fields),) = startup_warnings(explicit, 10_000)
    assert event == "open_file_limit_low" and fields["max_connections"] == 5000
    assert fields["why"] == FileBudget(10_000).shortfall(5000)


def serve_until_ready(config: Path) -> list[dict]:
    """``serve`` under RLIMIT_NOFILE = NOFILE, its log lines up to "ready", then SIGTERM."""
    code = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({NOFILE}, {NOFILE}))\n"
        "from proxy.cli import main\n"
        f"sys.exit(main(['serve', '--config', {str(config)!r}]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines: list[dict] = []
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:  # the proxy's own lines are the synchronisation
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue
            if lines[-1].get("event") == "ready":
                break
        else:
            assert proc.stderr is not None
            raise AssertionError(f"no 'ready': {lines} {proc.stderr.read().decode()}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return lines


@pytest.mark.parametrize("which", ["deploy example", "defaults"])
def test_shipped_configs_start_without_a_file_limit_warning(ns, tmp_path: Path, which) -> None:
    if which == "deploy example":
        path = EXAMPLE
    else:
        path = tmp_path / "minimal.toml"
        path.write_text(MINIMAL)
    events = [line["event"] for line in serve_until_ready(path)]
    assert events[-1] == "ready"
    assert "open_file_limit_low" not in events and "config_warning" not in events


def test_a_config_that_trips_it_gets_the_arithmetic_in_one_line(ns, tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    path.write_text(MINIMAL + "[limits]\nmax_connections = 2000\n")
    (warning,) = [ln for ln in serve_until_ready(path) if ln["event"] == "open_file_limit_low"]
    assert warning["nofile"] == NOFILE and warning["max_connections"] == 2000
    assert warning["why"] == (
        "max_connections 2,000 x 2 sockets + 64 reserve = 4,064 > RLIMIT_NOFILE 4,000 per "
        'worker: lower [limits] max_connections to 1,968 (or to "auto") or raise LimitNOFILE'
    )
    assert "\n" not in warning["why"]
