"""bench/h2_rps.py runs end to end: nginx, HAProxy and originpool side by side over h2 (TLS and
h2c), each row clean (every request answered 2xx over HTTP/2, no failure). The figures are the
bench's business, not a test's; what this keeps from rotting is that the three configurations
still serve h2 with the packages CI installs, so the README's table can be measured again.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import h2_rps
from pool import netns

ROOT = Path(__file__).resolve().parent.parent

SAMPLE = """starting benchmark...
spawning thread #0: 10 total client(s). Timing-based test with 0s of warm-up time and 2s ...
Application protocol: h2
finished in 2.00s, 26020.50 req/s, 2.38MB/s
requests: 52041 total, 52141 started, 52041 done, 52040 succeeded, 1 failed, 0 errored, 0 timeout
status codes: 52040 2xx, 0 3xx, 0 4xx, 1 5xx
"""


def test_parse_h2load_reads_the_summary_and_a_failure_makes_it_unclean() -> None:
    run = h2_rps.parse_h2load(SAMPLE)
    assert (run.rps, run.done, run.succeeded, run.failed, run.protocol) == (
        26020.5,
        52041,
        52040,
        1,
        "h2",
    )
    assert not run.clean  # one failed
    good = SAMPLE.replace("1 failed", "0 failed").replace("52040 succeeded", "52041 succeeded")
    good = good.replace("52040 2xx", "52041 2xx").replace("1 5xx", "0 5xx")
    assert h2_rps.parse_h2load(good).clean
    # a response landing as the timed run ends: in "status codes", not in "done"
    assert h2_rps.parse_h2load(good.replace("52041 2xx", "52042 2xx")).clean
    assert not h2_rps.parse_h2load(good.replace("52041 2xx", "52040 2xx")).clean  # one not 2xx
    assert not h2_rps.parse_h2load(good.replace("Application protocol: h2", "")).clean
    with pytest.raises(ValueError, match="unexpected h2load output"):
        h2_rps.parse_h2load("connect failed\n")


@pytest.fixture(scope="module")
def bench() -> dict[str, Any]:
    reason = netns.can_create()
    if reason:
        pytest.skip(reason)
    for binary, package in (
        ("h2load", "nghttp2-client"),
        ("nginx", "nginx-light"),
        ("haproxy", "haproxy"),
    ):
        if shutil.which(binary) is None:
            pytest.skip(
                f"{binary} is not installed (.ci/run installs it: apt-get install -y {package})"
            )
    cmd = [sys.executable, "bench/h2_rps.py", "--duration", "1", "--rounds", "1", "--warmup", "1"]
    done = subprocess.run([*cmd, "--json"], capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


PROTOCOL = {"tls": "h2", "h2c": "h2c", "h1": "http/1.1"}


@pytest.mark.parametrize("proxy", ["nginx", "haproxy"])
@pytest.mark.parametrize("mode", ["tls", "h2c", "h1"])
def test_the_references_serve_h2_cleanly(bench: dict[str, Any], proxy: str, mode: str) -> None:
    row = bench["targets"][f"{proxy}/{mode}"]
    assert row["all_clean"], row
    assert row["protocol"] == [PROTOCOL[mode]]
    assert row["rps_median"] > 0 and row["cpu_us_per_request_median"] > 0


@pytest.mark.parametrize("mode", ["tls", "h2c", "h1"])
def test_originpool_serves_h2_cleanly_beside_them(bench: dict[str, Any], mode: str) -> None:
    row = bench["targets"][f"originpool/{mode}"]
    assert row["all_clean"], row
    assert row["protocol"] == [PROTOCOL[mode]]
    assert row["rps_vs_nginx"] > 0
