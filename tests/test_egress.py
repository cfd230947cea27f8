"""pool.egress in namespaces: E x R to one destination, balance, failover, no count leaks."""

from __future__ import annotations

import asyncio
import errno
import random
import socket

import pytest
from structlog.testing import capture_logs

from pool.egress import Egress, EgressExhausted, EgressSet, FreePorts
from tests.conftest import Listeners, R, abort

DST = ("127.0.2.1", 9000)
E2 = ["127.0.1.1", "127.0.1.2"]


def spread(egress: EgressSet) -> list[int]:
    return list(egress.live_by_egress().values())


# -- parsing and the free-port record: no network ------------------------------------------


@pytest.mark.parametrize(
    ("text", "ip", "window"),
    [
        ("127.0.1.1", "127.0.1.1", None),
        ("127.0.1.2:40000-40499", "127.0.1.2", (40000, 40499)),
        ("fd00::1", "fd00::1", None),
        ("[fd00::1]:40000-40100", "fd00::1", (40000, 40100)),
        ("[fd00::1]", "fd00::1", None),
    ],
)
def test_egress_parse(text, ip, window):
    assert Egress.parse(text) == Egress(ip, window)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("example.com", "not a numeric"),
        ("127.0.1.1:40000", "LO-HI"),
        ("127.0.1.1:500-400", "LO <= HI"),
        ("[fd00::1", "missing"),
        ("127.0.1.1:0-10", "1 <= LO"),
    ],
)
def test_egress_parse_rejects_with_reason(text, reason):
    with pytest.raises(ValueError, match=reason):
        Egress.parse(text)


def test_free_ports_record():
    free = FreePorts(range(10))
    seen = {free.pop_random() for _ in range(10)}
    assert seen == set(range(10)) and len(free) == 0
    free.add(3)
    free.add(3)
    assert len(free) == 1 and 3 in free
    free.discard(3)
    free.discard(3)
    assert len(free) == 0


# -- capacity ------------------------------------------------------------------------------


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        abort(s)
    socks.clear()


@pytest.mark.parametrize("n_egress", [1, 2, 3])
async def test_one_destination_reaches_e_times_r_balanced(ns, listeners: Listeners, n_egress):
    listeners.add(*DST)
    ips = [f"127.0.1.{i + 1}" for i in range(n_egress)]
    egress = EgressSet(ips)
    held: list[socket.socket] = []
    slots = []
    try:
        for _ in range(n_egress * R):
            sock, slot = await egress.connect(DST)
            held.append(sock)
            slots.append(slot)
            counts = spread(egress)
            assert max(counts) - min(counts) <= 1, counts
        ports = {(slot.local[0], slot.local[1]) for slot in slots}
        assert len(ports) == n_egress * R  # every (egress, port) once
        with capture_logs() as logs, pytest.raises(EgressExhausted) as full:
            await egress.connect(DST)
        assert full.value.errno == errno.EADDRNOTAVAIL
        assert sorted(ip for ip, _ in full.value.attempts) == ips
        assert all(code == errno.EADDRNOTAVAIL for _, code in full.value.attempts)
        for ip in ips:
            assert ip in str(full.value)
        line = next(e for e in logs if e["event"] == "egress_exhausted")
        assert line["destination"] == "127.0.2.1:9000"
        assert [a["egress"] for a in line["attempts"]] == [ip for ip, _ in full.value.attempts]
        assert line["attempts"][0]["errno"] == "EADDRNOTAVAIL"
        assert all(u.utilisation == 1.0 for u in egress.utilisation())
    finally:
        close_all(held)
        for slot in slots:
            slot.release()
    assert egress.utilisation() == []


async def test_port_windows_bound_each_egress(ns, listeners):
    listeners.add(*DST)
    egress = EgressSet(["127.0.1.1:40000-40015", "127.0.1.2:40016-40047"])
    held = []
    try:
        got = {"127.0.1.1": set(), "127.0.1.2": set()}
        for _ in range(16 + 32):
            sock, slot = await egress.connect(DST)
            held.append(sock)
            got[slot.local[0]].add(slot.local[1])
        assert got["127.0.1.1"] == set(range(40000, 40016))
        assert got["127.0.1.2"] == set(range(40016, 40048))
        with pytest.raises(EgressExhausted):
            await egress.connect(DST)
    finally:
        close_all(held)


async def test_concurrent_connects_never_exceed_capacity(ns, listeners):
    listeners.add(*DST)
    egress = EgressSet(E2)
    results = await asyncio.gather(
        *(egress.connect(DST) for _ in range(2 * R + 7)), return_exceptions=True
    )
    ok = [r for r in results if not isinstance(r, BaseException)]
    failed = [r for r in results if isinstance(r, BaseException)]
    try:
        assert len(ok) == 2 * R
        assert len(failed) == 7 and all(isinstance(f, EgressExhausted) for f in failed)
        assert spread(egress) == [R, R]
    finally:
        close_all([s for s, _ in ok])
        for _, slot in ok:
            slot.release()
    assert spread(egress) == [0, 0]


async def test_busy_pair_uses_the_record_and_skips_ports_taken_elsewhere(ns, listeners):
    """Another process holds ports of the pair: the record learns them and moves on."""
    listeners.add(*DST)
    foreign = []
    for port in range(40000, 40064):  # half the range, taken behind the pool's back
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.1.1", port))
        s.connect(DST)
        foreign.append(s)
    egress = EgressSet(["127.0.1.1"])
    held = []
    slots = []
    try:
        for _ in range(R - 64):
            sock, slot = await egress.connect(DST)
            held.append(sock)
            slots.append(slot)  # the count lives as long as its slot
        assert {s.getsockname()[1] for s in held} == set(range(40064, 40128))
        with pytest.raises(EgressExhausted):
            await egress.connect(DST)
    finally:
        close_all(held)
        close_all(foreign)


# -- failover ------------------------------------------------------------------------------

SLASH32 = {"addresses": ["127.0.1.1/32", "127.0.1.2/32", "127.0.2.1/32"]}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("ns", [SLASH32], indirect=True)
async def test_failover_when_an_egress_ip_leaves_the_host_and_its_return(ns, listeners):
    # lo's 127.0.0.1/8 would make every 127.x address bindable: keep only /32s
    ns.ip("addr", "del", "127.0.0.1/8", "dev", "lo")
    ns.ip("addr", "add", "127.0.0.1/32", "dev", "lo")
    listeners.add(*DST)
    clock = FakeClock()
    egress = EgressSet(E2, backoff=(1.0, 8.0), clock=clock)
    held = []
    slots = []
    try:
        for _ in range(20):
            sock, slot = await egress.connect(DST)
            held.append(sock)
            slots.append(slot)  # the count lives as long as its slot
        assert spread(egress) == [10, 10]
        ns.ip("addr", "del", "127.0.1.2/32", "dev", "lo")
        with capture_logs() as logs:
            for _ in range(20):
                sock, slot = await egress.connect(DST)
                held.append(sock)
                slots.append(slot)
                assert slot.egress.ip == "127.0.1.1"
        assert egress.is_down(Egress("127.0.1.2"))
        assert any(e["event"] == "egress_down" and "127.0.1.2" in e["egress"] for e in logs)
        # fill the survivor: the error names only the egress that was tried
        while spread(egress)[0] < R:
            sock, slot = await egress.connect(DST)
            held.append(sock)
            slots.append(slot)  # the count lives as long as its slot
        with pytest.raises(EgressExhausted) as full:
            await egress.connect(DST)
        assert [ip for ip, _ in full.value.attempts] == ["127.0.1.1"]
        # back on the host; after the backoff the next connect probes it and it returns
        ns.ip("addr", "add", "127.0.1.2/32", "dev", "lo")
        clock.now += 1.01
        sock, slot = await egress.connect(DST)
        held.append(sock)
        assert slot.egress.ip == "127.0.1.2"
        assert not egress.is_down(Egress("127.0.1.2"))
    finally:
        close_all(held)


@pytest.mark.parametrize("ns", [SLASH32], indirect=True)
async def test_backoff_grows_while_the_ip_stays_away(ns, listeners):
    ns.ip("addr", "del", "127.0.0.1/8", "dev", "lo")
    ns.ip("addr", "add", "127.0.0.1/32", "dev", "lo")
    listeners.add(*DST)
    clock = FakeClock()
    egress = EgressSet(["127.0.1.9"], backoff=(1.0, 4.0), clock=clock)
    delays = []
    for _ in range(4):
        with pytest.raises(EgressExhausted) as none:
            await egress.connect(DST)
        assert none.value.attempts == [("127.0.1.9", errno.EADDRNOTAVAIL)]
        until, delay = egress.health.down[Egress("127.0.1.9")]
        delays.append(delay)
        with pytest.raises(EgressExhausted) as skipped:  # still down: not even tried
            await egress.connect(DST)
        assert skipped.value.attempts == []
        clock.now = until  # due again: the next connect probes it
    assert delays == [1.0, 2.0, 4.0, 4.0]


# -- no leaks ------------------------------------------------------------------------------


async def test_no_count_leaks_after_random_open_close_cancel_timeout(ns, listeners):
    listeners.add(*DST)
    dead = socket.socket()  # accept queue of one, filled: further SYNs go unanswered
    dead.bind(("127.0.2.2", 9000))
    dead.listen(0)
    filler = socket.socket()
    filler.connect(("127.0.2.2", 9000))
    egress = EgressSet(E2)
    rng = random.Random(20261127)
    held: list[tuple[socket.socket, object]] = []
    outcomes = {"open": 0, "close": 0, "cancel": 0, "timeout": 0, "full": 0, "drop": 0}
    try:
        for _ in range(10_000):
            op = rng.random()
            if op < 0.45:
                try:
                    held.append(await egress.connect(DST))
                    outcomes["open"] += 1
                except EgressExhausted:
                    outcomes["full"] += 1
            elif op < 0.75 and held:
                sock, slot = held.pop(rng.randrange(len(held)))
                abort(sock)
                slot.release()
                outcomes["close"] += 1
            elif op < 0.8 and held:
                sock, _slot = held.pop(rng.randrange(len(held)))
                abort(sock)  # dropped without release(): the finalizer must give it back
                del sock, _slot
                outcomes["drop"] += 1
            elif op < 0.9:
                task = asyncio.ensure_future(egress.connect(DST))
                for _ in range(rng.randrange(3)):
                    await asyncio.sleep(0)
                task.cancel()
                try:
                    held.append(await task)  # it may have finished before the cancel
                except asyncio.CancelledError:
                    outcomes["cancel"] += 1
                except EgressExhausted:
                    outcomes["full"] += 1
            else:
                with pytest.raises(OSError) as slow:
                    await egress.connect(("127.0.2.2", 9000), timeout=0.0005)
                assert slow.value.errno == errno.ETIMEDOUT
                outcomes["timeout"] += 1
            live = egress.live_by_egress()
            assert sum(live.values()) == len(held), (live, len(held))
    finally:
        for sock, slot in held:
            abort(sock)
            slot.release()
        abort(filler)
        dead.close()
    assert all(v > 50 for v in outcomes.values()), outcomes
    assert spread(egress) == [0, 0]
    assert egress.utilisation() == []


async def test_two_sets_sharing_an_ip_still_reach_the_full_range(ns, listeners):
    """Two workers' EgressSets on one IP, no windows: the kernel keeps them apart and each
    record learns the other's ports, so together they hold the whole range."""
    listeners.add(*DST)
    a, b = EgressSet(["127.0.1.1"]), EgressSet(["127.0.1.1"])
    held = []
    try:
        for _ in range(28):
            held.append(await a.connect(DST))
        b_count = 0
        while True:  # b turns busy at R/2 and then picks from a record that lists a's ports
            try:
                held.append(await b.connect(DST, timeout=2))
            except EgressExhausted:
                break
            b_count += 1
            assert b_count <= R
        assert b_count == R - 28
        ports = [s.getsockname()[1] for s, _ in held]
        assert len(set(ports)) == R  # the whole range, each port once
    finally:
        for sock, slot in held:
            abort(sock)
            slot.release()


async def test_workers_fill_their_own_slice_first_then_overflow_to_the_full_range(ns, listeners):
    listeners.add(*DST)
    w0 = EgressSet(["127.0.1.1"], share=(0, 2))
    w1 = EgressSet(["127.0.1.1"], share=(1, 2))
    held = []
    try:
        for _ in range(R // 2):  # worker 0 takes exactly its half, by its own record
            held.append(await w0.connect(DST))
        assert {s.getsockname()[1] for s, _ in held} == set(range(40000, 40064))
        for _ in range(10):  # worker 1 starts in its own half
            held.append(await w1.connect(DST))
        assert all(40064 <= s.getsockname()[1] <= 40127 for s, _ in held[-10:])
        while True:  # worker 0 overflows into what worker 1 has not taken
            try:
                held.append(await w0.connect(DST, timeout=2))
            except EgressExhausted:
                break
        assert len(held) == R
        assert len({s.getsockname()[1] for s, _ in held}) == R
        with pytest.raises(EgressExhausted):
            await w1.connect(DST)
    finally:
        for sock, slot in held:
            abort(sock)
            slot.release()


def test_share_must_name_a_worker():
    with pytest.raises(ValueError, match="share"):
        EgressSet(["127.0.1.1"], share=(2, 2))
