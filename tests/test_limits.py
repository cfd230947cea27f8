"""The per-address limits without sockets: buckets drained and refilled on a fake clock,
the connection count, the LRU bound, and the memory one tracked address costs."""

from __future__ import annotations

import gc
import ipaddress
import tracemalloc

import pytest

from proxy.limits import (
    ClientLimits,
    LimitSettings,
    TokenBuckets,
    forwarded_client,
    retry_after,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refused_with_the_wait_then_refilled() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock)
    assert [buckets.take(b"a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take(b"a") == pytest.approx(0.5)  # one token every 0.5 s
    assert buckets.take(b"a") == pytest.approx(0.5)  # a refusal takes nothing
    assert buckets.take(b"b") == 0.0  # another address has its own bucket
    clock.now += 0.5
    assert buckets.take(b"a") == 0.0
    assert buckets.take(b"a") == pytest.approx(0.5)
    clock.now += 100  # idle a long time: a full burst again, no more
    assert [buckets.take(b"a") for _ in range(4)][-1] > 0


def test_sustained_rate_is_the_rate() -> None:
    """Asked 10 times a second for 10 s at rate 4/s burst 2: 2 + 4 x 10 get through."""
    clock = Clock()
    buckets = TokenBuckets(rate=4.0, burst=2, clock=clock)
    allowed = 0
    for _ in range(100):
        allowed += buckets.take("x") == 0.0
        clock.now += 0.1
    assert allowed in (41, 42)  # 2 + 40, give or take the last tick's float rounding


def test_lru_bound_evicts_the_idlest() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=1.0, burst=1, max_keys=3, clock=clock)
    for key in ("a", "b", "c"):
        buckets.take(key)
    buckets.take("a")  # refused, but touched: a is now the most recent
    buckets.take("d")  # over the bound: b, the idlest, goes
    assert len(buckets) == 3
    assert buckets.take("a") > 0  # still tracked, still empty
    assert buckets.take("b") == 0.0  # forgotten: starts with a full bucket


def test_conn_limit_counts_open_connections_only() -> None:
    limits = ClientLimits(LimitSettings(conn_per_ip=2))
    assert limits.open(b"1.2.3.4") and limits.open(b"1.2.3.4")
    assert not limits.open(b"1.2.3.4")
    assert limits.open(b"5.6.7.8")
    assert limits.limited["conn"] == 1
    limits.close(b"1.2.3.4")
    assert limits.open(b"1.2.3.4")
    for _ in range(2):
        limits.close(b"1.2.3.4")
    limits.close(b"5.6.7.8")
    assert limits.conns == {}  # nothing kept for an address with no connection


def test_request_and_websocket_kinds_are_counted_apart() -> None:
    clock = Clock()
    s = LimitSettings(rate_per_ip=10, rate_burst=5, websocket_rate_per_ip=1, websocket_burst=1)
    limits = ClientLimits(s, clock=clock)
    assert limits.request(b"ip", websocket=True) == 0.0
    assert limits.request(b"ip", websocket=True) == pytest.approx(1.0)
    assert [limits.request(b"ip") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limits.request(b"ip") > 0
    assert limits.limited == {"conn": 0, "rate": 1, "websocket": 1}
    assert retry_after(0.01) == 1 and retry_after(1.0) == 1 and retry_after(1.2) == 2


def test_default_burst_is_one_seconds_worth() -> None:
    limits = ClientLimits(LimitSettings(rate_per_ip=0.5))
    assert limits.rate is not None and limits.rate.burst == 1
    assert ClientLimits(LimitSettings(rate_per_ip=20)).rate.burst == 20  # type: ignore[union-attr]


def test_reload_keeps_counts_and_unchanged_buckets() -> None:
    clock = Clock()
    old = ClientLimits(LimitSettings(conn_per_ip=5, rate_per_ip=1, rate_burst=1), clock=clock)
    old.open(b"a")
    old.request(b"a")
    same = old.replaced_by(LimitSettings(conn_per_ip=1, rate_per_ip=1, rate_burst=1))
    assert same is not None
    assert not same.open(b"a")  # the open connection still counts against the new cap
    assert same.request(b"a") > 0  # the emptied bucket was not refilled by the reload
    changed = old.replaced_by(LimitSettings(rate_per_ip=2))
    assert changed is not None and changed.rate is not old.rate
    assert old.replaced_by(LimitSettings()) is None


def test_settings_validate() -> None:
    with pytest.raises(ValueError):
        TokenBuckets(rate=0, burst=1)
    with pytest.raises(ValueError):
        TokenBuckets(rate=1, burst=0)
    assert not LimitSettings().any and LimitSettings(conn_per_ip=1).any


def _addresses(n: int) -> list[bytes]:
    """Distinct addresses as Downstream keys them (its ``client_ip``, bytes); IPv4 and IPv6."""
    out = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}".encode() for i in range(n // 2)]
    out += [f"2001:db8::{i:x}".encode() for i in range(n - n // 2)]
    return out


def test_memory_per_tracked_address_at_100k() -> None:
    """100,000 addresses, each with a request bucket and a WebSocket bucket, held within the
    bound; what each costs (its key, as the connection's client_ip spells it and as the
    tables keep it once the connection is gone, two dict slots, two floats) is measured:
    ~200 bytes, the figure deploy/originpool.toml and the README state."""
    n = 100_000
    clock = Clock()
    s = LimitSettings(rate_per_ip=1, websocket_rate_per_ip=1, max_tracked_addresses=n)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        limits = ClientLimits(s, clock=clock)
        for key in _addresses(n):  # each key lives on in the tables alone
            limits.request(key, websocket=True)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert limits.rate is not None and limits.websocket is not None
    assert len(limits.rate) == len(limits.websocket) == n
    per_address = (after - before) / n
    print(f"limits: {per_address:.0f} bytes per tracked address (two buckets, key included)")
    assert per_address < 260
    # past the bound, every new address evicts one: the tables do not grow
    for key in _addresses(2 * n)[n:]:
        limits.request(key + b"x")
    assert len(limits.rate) == n


def test_lru_bound_holds_with_many_addresses() -> None:
    """300,000 distinct addresses through a table bounded at 1,000: never more than 1,000,
    and the addresses kept are the last ones seen."""
    clock = Clock()
    buckets = TokenBuckets(rate=1, burst=1, max_keys=1000, clock=clock)
    keys = _addresses(300_000)
    for key in keys:
        buckets.take(key)
        clock.now += 0.0001
    assert len(buckets) == 1000
    assert buckets.take(keys[-1]) > 0  # the newest is still tracked (and empty)
    assert buckets.take(keys[0]) == 0.0  # the oldest was dropped


def test_forwarded_client_is_the_right_most_untrusted() -> None:
    """X-Forwarded-For from a trusted proxy: the client nearest it that is not itself one
    (nginx's real_ip_recursive); a garbled chain names no one, the peer is kept."""
    trusted = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    xff = b"x-forwarded-for"
    assert forwarded_client([(xff, b"203.0.113.7, 10.0.0.2")], trusted) == b"203.0.113.7"
    assert forwarded_client([(xff, b"6.6.6.6"), (xff, b"203.0.113.7")], trusted) == (
        b"203.0.113.7"  # a second header continues the chain: its last entry is nearest
    )
    assert forwarded_client([(xff, b"10.0.0.3 , 10.0.0.2")], trusted) == b"10.0.0.3"
    assert forwarded_client([(xff, b"2001:DB8::1, ::1")], trusted) == b"2001:db8::1"
    assert forwarded_client([(xff, b"junk, 10.0.0.2")], trusted) is None
    assert forwarded_client([(xff, b"1.2.3.4:5678")], trusted) is None
    assert forwarded_client([(b"x-real-ip", b"1.2.3.4")], trusted) is None
