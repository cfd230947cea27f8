"""The origin state machine, admission's token bucket and the routes' use of them (no I/O)."""

from __future__ import annotations

import random

import pytest

from pool.origin import Origin
from pool.origin_state import Admission, AdmissionRefused, Limits, OriginStates, State
from proxy.routing import Route, Router

A = Origin.parse("ws://127.0.2.1:9000")
B = Origin.parse("ws://127.0.2.2:9000")


def test_drain_and_down_are_separate_facts() -> None:
    states = OriginStates()
    seen: list[tuple[str, State, State, str]] = []
    states.add_listener(lambda o, old, new, by: seen.append((str(o), old, new, by)))
    assert states.admits(A) and states.state(A) is State.ACTIVE
    assert states.drain(A)
    # down while drained: the fact is kept, the state shown stays DRAINING (no change) ...
    assert not states.mark_down(A, "connect refused")
    assert states.state(A) is State.DRAINING
    assert not states.drain(A)  # nothing changes: no line, no listener call
    assert states.undrain(A)
    assert states.state(A) is State.DOWN and not states.admits(A)  # ... undrained: DOWN
    assert states.mark_up(A)
    assert states.admits(A)
    assert [(old.value, new.value, by) for _o, old, new, by in seen] == [
        ("active", "draining", "admin"),
        ("draining", "down", "admin"),
        ("down", "active", "health"),
    ]


def test_causes_are_checked() -> None:
    states = OriginStates()
    with pytest.raises(ValueError, match="down cause"):
        states.mark_down(A, "x", by="admin")
    with pytest.raises(ValueError, match="drain cause"):
        states.drain(A, by="health")


def test_pick_skips_origins_that_do_not_admit() -> None:
    states = OriginStates()
    route = Route("*", "/", [(A, 1), (B, 1)])
    Router([route], states)
    states.drain(A)
    assert {route.pick() for _ in range(6)} == {B}
    states.mark_down(B, "checks failed")
    assert route.pick() is None  # every origin out: the caller answers 503 at once
    states.undrain(A)
    assert route.pick() is A
    single = Route("*", "/", [(B, 1)])
    Router([single], states)
    assert single.pick() is None


def test_view_and_find() -> None:
    states = OriginStates()
    states.configure({A: Limits(), B: Limits(max_session_rate=10)})
    states.counter = lambda o: (3, 1) if o == A else (0, 0)
    states.record_check(B, {"ok": True})
    assert states.find("ws://127.0.2.1:9000/") == A
    assert states.find("ws://127.0.9.9:9000") is None
    assert states.find("not a url") is None
    view = {v["origin"]: v for v in states.view()}
    assert view[str(A)]["sessions"] == 3 and view[str(A)]["requests_in_flight"] == 1
    assert view[str(B)]["last_check"] == {"ok": True}
    assert view[str(B)]["max_session_rate"] == 10


def test_token_bucket_rate_and_jittered_retry_after() -> None:
    now = [100.0]
    states = OriginStates(workers=2, clock=lambda: now[0], rng=random.Random(7))
    states.configure({A: Limits(max_session_rate=20)})  # 10/s in this worker
    taken = 0
    waits = []
    for _ in range(40):  # 40 at once: a second's worth (10) goes, the rest are told to wait
        try:
            states.admit_session(A)
            taken += 1
        except AdmissionRefused as e:
            waits.append(e.retry_after)
    assert taken == 10
    assert min(waits) >= 1 and max(waits) <= 5  # 30 refused at 10/s: spread over ~3 s
    assert len(set(waits)) > 1  # jittered, not one second for all
    now[0] += 1.0
    taken = sum(1 for _ in range(40) if _try(states, A))
    assert taken == 10


def _try(states: OriginStates, origin: Origin) -> bool:
    try:
        states.admit_session(origin)
    except AdmissionRefused:
        return False
    return True


def test_slow_start_ramps_after_coming_back() -> None:
    now = [0.0]
    states = OriginStates(clock=lambda: now[0], rng=random.Random(1))
    states.configure({A: Limits(max_session_rate=100, slow_start=10)})
    states.mark_down(A, "crashed")
    now[0] = 50.0
    states.mark_up(A)
    adm = states.entry(A).admission
    assert isinstance(adm, Admission)
    assert adm.current_rate(50.0) == pytest.approx(10.0)  # the floor: a tenth
    assert adm.current_rate(55.0) == pytest.approx(50.0)
    assert adm.current_rate(61.0) == pytest.approx(100.0)
    # what it admits in the first second back is about the floor, not the full rate
    now[0] = 50.0
    counts = 0
    for step in range(100):
        now[0] = 50.0 + step / 100
        counts += _try(states, A)
    assert counts <= 15
