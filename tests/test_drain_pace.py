"""The drain's schedule (sans-I/O): even pace, jittered, never a burst (property tests)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.drain import WINDOW, busiest_half_second, max_jitter, pace


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
