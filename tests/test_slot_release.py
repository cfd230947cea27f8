"""Every way an upstream connection ends gives its egress slot back, explicitly (issue 22).

The slot used to carry a ``weakref.finalize`` on its socket as a safety net (266 bytes per
held connection, most of an idle session's non-transport memory); it is gone, so the pool's
own close paths must release. Each test keeps a reference to every connection (and so to
its slot) until the counts are checked: the slot's ``__del__`` net cannot run, and only an
explicit ``release()`` brings the egress counts back to zero.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from pool.egress import Egress, EgressSet
from pool.origin import Origin, OriginPool, PoolLimits, UpstreamConnection
from tests.http_origin import TestOrigin, get

HOST, PORT = "127.0.2.1", 9000
ORIGIN = Origin("http", HOST, PORT)
EGRESS = ["127.0.1.1", "127.0.1.2"]
N = 6  # connections per case: both egress IPs used


@pytest.fixture
async def origin(ns) -> AsyncIterator[TestOrigin]:
    server = TestOrigin()
    await server.start(HOST, PORT)
    yield server
    await server.close()


def live(pool: OriginPool) -> int:
    return sum(pool.egress.live_by_egress().values())


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll ``condition`` each loop turn (the close callbacks run on the loop) until true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.01)


async def all_given_back(pool: OriginPool, conns: list[UpstreamConnection]) -> None:
    await until(lambda: not any(c.alive for c in conns), "every connection closed")
    await until(lambda: live(pool) == 0, f"egress counts back to 0 (live {live(pool)})")
    assert all(c.slot.released for c in conns)
    assert pool.egress.utilisation() == []  # no pair left behind, free-port records dropped


async def leased(pool: OriginPool) -> list[UpstreamConnection]:
    conns = [await pool.lease(ORIGIN) for _ in range(N)]
    assert live(pool) == N
    assert {c.slot.egress.ip for c in conns} == set(EGRESS)
    assert all(c.slot.local == c.transport.get_extra_info("sockname") for c in conns)
    return conns


async def test_close_and_lease_release(origin) -> None:
    pool = OriginPool(EgressSet(EGRESS), PoolLimits())
    conns = await leased(pool)
    for conn in conns[:3]:
        conn.close()
    for conn in conns[3:]:
        pool.release(conn, reusable=True)  # a lease's release closes it
    await all_given_back(pool, conns)
    await pool.close()


async def test_reset_and_abort(origin) -> None:
    pool = OriginPool(EgressSet(EGRESS), PoolLimits())
    conns = await leased(pool)
    for conn in conns[:3]:
        conn.reset()
    for conn in conns[3:]:
        conn.abort()
    await all_given_back(pool, conns)
    await pool.close()


async def test_origin_closes_idle_connections(origin) -> None:
    pool = OriginPool(EgressSet(EGRESS), PoolLimits())
    conns = [await pool.acquire(ORIGIN) for _ in range(N)]
    for conn in conns:
        conn.transport.resume_reading()
        pool.release(conn, reusable=True)  # idle, kept for reuse
    assert live(pool) == N and all(c.alive for c in conns)
    origin.close_idle_connections()  # the origin's FIN reaches idle connections
    await all_given_back(pool, conns)
    await pool.close()


async def test_drain_closes_idle_and_retires_busy(origin) -> None:
    pool = OriginPool(EgressSet(EGRESS), PoolLimits())
    conns = [await pool.acquire(ORIGIN) for _ in range(N)]
    for conn in conns[:3]:
        pool.release(conn, reusable=True)
    assert pool.close_idle(ORIGIN) == 3  # idle ones now
    for conn in conns[3:]:
        pool.release(conn, reusable=True)  # retiring: closed on release, never idle
    await all_given_back(pool, conns)
    await pool.close()


async def test_egress_removal_resets_its_connections(origin) -> None:
    pool = OriginPool(EgressSet(EGRESS), PoolLimits())
    conns = await leased(pool)
    for ip in EGRESS:
        pool._egress_gone(Egress(ip), "address removed from the host")
    assert all(c.lost is not None for c in conns)
    await all_given_back(pool, conns)
    await pool.close()


async def test_connect_refused_and_failed_handshake(origin) -> None:
    pool = OriginPool(EgressSet(EGRESS), PoolLimits(connect_timeout=2.0))
    with pytest.raises(ConnectionRefusedError) as refused:
        await pool.acquire(Origin("http", HOST, PORT + 1))  # nobody listens
    # the traceback keeps the failed frames, and with them any slot they held: only an
    # explicit release gives the counts back while it lives
    assert refused.value.__traceback__ is not None and live(pool) == 0
    with pytest.raises(OSError) as handshake:
        await pool.acquire(Origin("https", HOST, PORT))  # TLS to a cleartext origin
    assert handshake.value.__traceback__ is not None and live(pool) == 0
    assert pool.egress.utilisation() == []
    assert await get(pool, ORIGIN) == (200, b"hello 1")  # and the pool still works
    await pool.close()


async def test_a_slot_dropped_unreleased_gives_its_count_back(origin) -> None:
    """The safety net: a slot nobody released, once dropped, still returns its count."""
    egress = EgressSet(EGRESS)
    sock, slot = await egress.connect((HOST, PORT))
    assert sum(egress.live_by_egress().values()) == 1 and not slot.released
    sock.close()
    del slot
    assert sum(egress.live_by_egress().values()) == 0
    assert egress.utilisation() == []
