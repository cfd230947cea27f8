"""The metrics snapshot reflects real connects and failures."""

from __future__ import annotations

import pytest

from pool.egress import EgressExhausted, EgressSet
from pool.metrics import collect, render_prometheus
from pool.origin import Origin, OriginPool
from tests.conftest import Listeners, R, abort
from tests.http_origin import TestOrigin, get


def value(samples, name, **labels):
    want = tuple(sorted(labels.items()))
    return next(s.value for s in samples if s.name == name and tuple(sorted(s.labels)) == want)


async def test_metrics_follow_connects_and_exhaustion(ns, listeners: Listeners):
    listeners.add("127.0.2.1", 9000)
    egress = EgressSet(["127.0.1.1"])
    held = []
    for _ in range(R):
        held.append(await egress.connect(("127.0.2.1", 9000)))
    with pytest.raises(EgressExhausted):
        await egress.connect(("127.0.2.1", 9000))
    samples = collect(egress)
    assert value(samples, "originpool_egress_live_connections", egress="127.0.1.1") == R
    assert value(samples, "originpool_pair_utilisation_max") == 1.0
    assert value(samples, "originpool_egress_exhausted_total") == 1
    assert (
        value(
            samples, "originpool_connect_failures_total", egress="127.0.1.1", errno="EADDRNOTAVAIL"
        )
        == 1
    )
    text = render_prometheus(samples)
    assert "# TYPE originpool_connect_attempts_total counter" in text
    assert f'originpool_egress_live_connections{{egress="127.0.1.1"}} {R}' in text
    for sock, slot in held:
        abort(sock)
        slot.release()
    assert value(collect(egress), "originpool_egress_live_connections", egress="127.0.1.1") == 0


async def test_origin_gauges(ns):
    server = TestOrigin()
    await server.start("127.0.2.1", 9000)
    pool = OriginPool(EgressSet(["127.0.1.1"]))
    origin = Origin("http", "127.0.2.1", 9000)
    await get(pool, origin)
    conn = await pool.acquire(origin)
    samples = collect(pool.egress, pool)
    o = "http://127.0.2.1:9000"
    assert value(samples, "originpool_origin_active_connections", origin=o) == 1
    assert value(samples, "originpool_origin_idle_connections", origin=o) == 0
    pool.release(conn, reusable=True)
    assert value(collect(pool.egress, pool), "originpool_origin_idle_connections", origin=o) == 1
    await pool.close()
    await server.close()
