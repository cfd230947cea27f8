"""Workers' port slices overflow without a refusal before the physical limit.

Each worker prefers its own slice of every egress window and overflows into the whole window
once its slice is full. A worker whose slice was filled by *other* workers' overflow (it holds
fewer ports than its slice has) must overflow too: otherwise it answers 503 while ports are
free in the slices of workers that get no new clients, the failures before the limit that
issue 22 measured (first 503 at attempt 987 of 1,000 with 4 workers, none with 1).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pool import netns
from pool.egress import EgressExhausted, EgressSet
from tests.conftest import Listeners, R, abort

ROOT = Path(__file__).resolve().parent.parent
DST = ("127.0.2.1", 9000)


async def test_a_slice_taken_by_others_overflows_into_theirs(ns, listeners: Listeners):
    """Three workers on one IP: worker 0 fills its slice and overflows into the others';
    worker 1 must then reach the whole range, its own leftovers and worker 2's free ports."""
    listeners.add(*DST)
    w0, w1 = (EgressSet(["127.0.1.1"], share=(i, 3)) for i in range(2))
    w0_slice = w0._slice_of(w0.egresses[0])
    held = []
    try:
        for _ in range(len(w0_slice) + 30):  # its slice, then 30 more via the kernel's search
            held.append(await w0.connect(DST, timeout=2))
        overflow = [s.getsockname()[1] for s, _ in held[len(w0_slice) :]]
        assert not any(p in w0_slice for p in overflow)
        w1_count = 0
        while True:
            try:
                held.append(await w1.connect(DST, timeout=2))
            except EgressExhausted:
                break
            w1_count += 1
            assert w1_count <= R
        assert len(held) == R  # the first refusal comes only at the physical limit
        assert len({s.getsockname()[1] for s, _ in held}) == R
    finally:
        for sock, slot in held:
            abort(sock)
            slot.release()


# -- through a real `originpool serve`, as the testbed runs it -------------------------------

E, PORTS, K = 2, 100, 1
LIMIT = E * PORTS * K


@pytest.mark.parametrize("workers", [4, 7])
def test_first_503_comes_at_the_limit_whatever_the_worker_count(tmp_path, workers):
    """2 egress x 100 ports x 1 origin through `serve` with N workers: held LIMIT, every
    session verified, and the first client failure is attempt LIMIT + 1."""
    reason = netns.can_create()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "tb.json"
    argv = [
        sys.executable,
        "-m",
        "proxy.cli",
        "testbed",
        "--mode",
        "connectx",
        "--egress",
        str(E),
        "--origins",
        str(K),
        "--port-range",
        f"40000-{40000 + PORTS - 1}",
        "--sessions",
        str(LIMIT + 30),
        "--workers",
        str(workers),
        "--hold",
        "0",
        "--progress",
        "json",
        "--json",
        str(out),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads(out.read_text())["runs"][0]
    first = run["first_failure_client"]
    assert (first["attempt"], first["outcome"]) == (LIMIT + 1, "503"), run
    assert run["failures_before_limit"] == 0
    assert run["held"] == LIMIT and run["lost"] == 0
    assert sum(run["per_egress"].values()) == LIMIT
    # held: alive and verified at the end, and the kernel's census then agrees
    assert sum(run["per_egress_at_end"].values()) == run["held"] == run["verified_at_end"]
