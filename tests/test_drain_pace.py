"""The drain's schedule (sans-I/O): even pace, jittered, never a burst (property tests)."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from pool.origin import Origin
from pool.origin_state import Limits, OriginStates, State
from proxy.drain import WINDOW, Drainer, busiest_half_second, max_jitter, pace


@settings(max_examples=400, deadline=None)
@given(
    n=st.integers(1, 3000),
    over=st.floats(0.05, 600, allow_nan=False, allow_infinity=False),
    seed=st.integers(0, 2**32 - 1),
)
def test_never_more_than_twice_the_even_share_in_any_half_second(
    n: int, over: float, seed: int
) -> None:
    times = pace(n, over, random.Random(seed))
    assert len(times) == n
    assert times == sorted(times)
    assert all(0 <= t < over for t in times)
    share = WINDOW * n / over  # the even share of one half second
    assert busiest_half_second(times) <= max(1, 2 * share)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(2, 2000),
    over=st.floats(1, 120, allow_nan=False, allow_infinity=False),
    seed=st.integers(0, 2**32 - 1),
)
def test_one_close_per_slot(n: int, over: float, seed: int) -> None:
    """Even pace: the i-th close falls in the i-th of n equal slots, so the count closed by
    any time t is within one of n t / over."""
    times = pace(n, over, random.Random(seed))
    slot = over / n
    for i, t in enumerate(times):
        assert i * slot <= t < (i + 1) * slot


def test_jittered_and_seeded() -> None:
    a = pace(100, 30, random.Random(1))
    b = pace(100, 30, random.Random(1))
    c = pace(100, 30, random.Random(2))
    assert a == b and a != c
    even = [(i + 0.5) * 0.3 for i in range(100)]
    assert any(abs(x - y) > 0.01 for x, y in zip(a, even, strict=True))


def test_jitter_bound_is_what_the_proof_needs() -> None:
    assert max_jitter(10, 30) == 0.25  # slow pace: a quarter slot either way
    assert max_jitter(59, 30) < 0.01  # a close just under every 0.5 s: almost none
    assert 0.24 < max_jitter(89, 30) <= 0.25  # share ~1.48: the tightest of s >= 1


def test_degenerate_windows() -> None:
    assert pace(0, 30, random.Random(0)) == []
    assert pace(3, 0, random.Random(0)) == [0.0, 0.0, 0.0]
    assert busiest_half_second([0.0, 0.49, 0.5, 0.99, 1.0]) == 2


# -- the Drainer against fake sessions (the schedule run on a real event loop) -------------

A = Origin.parse("ws://127.0.2.1:9000")
B = Origin.parse("ws://127.0.2.2:9000")


@dataclass
class FakeSession:
    origin: Origin
    finished: bool = False
    ended: list[tuple[float, int, int]] = field(default_factory=list)

    def end(self, client_code: int, origin_code: int, reason: str) -> None:
        self.ended.append((asyncio.get_running_loop().time(), client_code, origin_code))
        self.finished = True


async def until_done(drainer: Drainer, origin: Origin, timeout: float = 5) -> None:
    task = drainer.drains[origin].task
    assert task is not None
    await asyncio.wait_for(asyncio.shield(task), timeout)


async def test_a_held_up_loop_closes_late_not_in_a_bunch() -> None:
    sessions = [FakeSession(A) for _ in range(20)]
    closed_idle: list[tuple[Origin, bool]] = []
    drainer = Drainer(
        OriginStates(),
        lambda: sessions,
        lambda o, on: closed_idle.append((o, on)),
        random.Random(3),
    )
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    drain = drainer.drain(A, 1.0)
    assert drain.sessions == 20 and closed_idle == [(A, True)]
    loop.call_later(0.2, time.sleep, 0.4)  # a stall of 0.4 s: 8 slots' worth
    await until_done(drainer, A)
    times = [s.ended[0][0] - t0 for s in sessions]
    assert all(s.ended[0][1:] == (1012, 1001) for s in sessions)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) > 0.01, gaps  # without the shift, 8 overdue closes fire together
    assert times[-1] < 1.0 + 0.4 + 0.2  # the window grew by the stall, no more


async def test_undrain_stops_the_schedule_and_late_sessions_end_at_the_window() -> None:
    states = OriginStates()
    sessions = [FakeSession(A) for _ in range(10)]
    drainer = Drainer(states, lambda: sessions, rng=random.Random(1))
    drainer.drain(A, 0.5)
    late = FakeSession(A)
    sessions.append(late)  # a handshake under way when the drain began
    await until_done(drainer, A)
    assert late.ended and all(s.finished for s in sessions)
    assert states.entry(A).drained_sessions == 11
    again = [FakeSession(A) for _ in range(10)]
    sessions[:] = again
    drainer.drain(A, 10)
    await asyncio.sleep(0)  # let the task start: its first close is ~0.5 s away
    assert drainer.undrain(A)
    assert states.state(A) is State.ACTIVE and not any(s.finished for s in again)


async def test_routes_changed_drains_the_removed_and_forgets_it_after() -> None:
    states = OriginStates()
    states.configure({A: Limits()})
    sessions = [FakeSession(A), FakeSession(B)]
    drainer = Drainer(states, lambda: sessions)
    assert drainer.routes_changed([A, B], [B], 0.2) == [A]
    assert states.state(A) is State.DRAINING and states.entry(A).drained_by == "reload"
    await until_done(drainer, A)
    assert sessions[0].finished and not sessions[1].finished
    assert A not in list(states.origins())  # no route names it: out of /origins
    drainer.drain(B, 30, by="reload")
    drainer.routes_changed([B], [B], 30)  # a reload that names it again: admitted
    assert states.state(B) is State.ACTIVE
