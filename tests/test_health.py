"""Active health checks and passive ejection against real origins, in a namespace of the
test's own: origins stopped and started, checks seen by the kernel from the egress IPs,
requests and WebSocket sessions through the proxy's own listener (proxy.health)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Callable

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Response

from pool import census
from pool.egress import EgressSet
from pool.health_state import HealthCheck
from pool.origin import Origin, OriginPool, PoolLimits
from pool.origin_state import OriginStates, State
from proxy import health
from proxy.health import HealthChecker
from proxy.health_probe import USER_AGENT
from proxy.routing import Route, Router
from proxy.server import Listener, Proxy, Settings
from tests.http_origin import TestOrigin

EGRESS = ("127.0.1.1", "127.0.1.2")
O1 = ("127.0.2.1", 9000)
O2 = ("127.0.2.2", 9000)
FAST = HealthCheck(type="http", interval=0.1, timeout=0.1, rise=2, fall=3, path="/hello")


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Poll ``condition`` on the loop until it holds; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {seconds}s")
        await asyncio.sleep(0.01)


class Rig:
    """A proxy (listener, router with origin states, pool) and its checker, in-process."""

    def __init__(self, origins: list[Origin], checks: dict[Origin, HealthCheck], **pool) -> None:
        self.states = OriginStates()
        self.transitions: list[tuple[Origin, State, State, str]] = []
        self.states.add_listener(lambda o, old, new, by: self.transitions.append((o, old, new, by)))
        route = Route("app.test", "/", [(o, 1) for o in origins])
        self.pool = OriginPool(EgressSet(list(EGRESS)), PoolLimits(**pool))
        self.proxy = Proxy(Router([route], self.states), self.pool, Settings())
        self.listener = Listener(self.proxy, ("127.0.0.1", 0))
        self.proxy.listeners.append(self.listener)
        self.listener.start()
        self.checker = HealthChecker(lambda: self.pool, self.states)
        self.checker.configure(checks)
        health.install(self.checker)
        self.port = self.listener.address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={"host": "app.test"}, timeout=10)

    def state(self, origin: Origin) -> State:
        return self.states.state(origin)

    def results(self, origin: Origin, result: str) -> int:
        return self.checker.checks.get((origin, result), 0)

    async def close(self) -> None:
        health.install(None)
        await self.checker.close()
        self.listener.close()
        await self.pool.close()


@pytest.fixture
async def rigs(ns):
    made: list[Rig] = []

    def make(*a, **kw) -> Rig:
        rig = Rig(*a, **kw)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        await rig.close()


async def start_origin(addr: tuple[str, int]) -> TestOrigin:
    server = TestOrigin()
    await server.start(*addr)
    return server


async def test_origin_down_after_fall_failures_and_up_after_rise_passes(rigs):
    server = await start_origin(O1)
    o1 = Origin("http", *O1)
    rig = rigs([o1], {o1: FAST})
    await until(lambda: rig.results(o1, "pass") >= 2)  # confirmed up
    assert rig.state(o1) is State.ACTIVE and rig.transitions == []

    await server.close()  # stopped: connects are refused from now on
    failed_before = rig.results(o1, "connect")
    await until(lambda: rig.state(o1) is State.DOWN)
    # down exactly at the fall-th consecutive failure, none earlier
    assert rig.results(o1, "connect") - failed_before == FAST.fall
    assert rig.transitions == [(o1, State.ACTIVE, State.DOWN, "health")]
    assert not rig.checker.up(o1)

    passes_before = rig.results(o1, "pass")
    server = await start_origin(O1)
    await until(lambda: rig.state(o1) is State.ACTIVE)
    assert rig.results(o1, "pass") - passes_before == FAST.rise
    assert rig.transitions[-1] == (o1, State.DOWN, State.ACTIVE, "health")
    last = rig.states.entry(o1).last_check
    assert last is not None and last["ok"] and last["status"] == 200
    await server.close()


class RecordingOrigin(TestOrigin):
    """Records each request's User-Agent: the checker's requests from the proxied ones."""

    def __init__(self) -> None:
        super().__init__()
        self.agents: list[bytes] = []

    async def _respond(self, conn, writer, request, body, n) -> None:
        self.agents.append(dict(request.headers).get(b"user-agent", b""))
        await super()._respond(conn, writer, request, body, n)

    def proxied(self) -> int:
        return sum(1 for agent in self.agents if agent != USER_AGENT)


async def test_wrong_status_takes_it_down_and_no_request_reaches_a_down_origin(rigs):
    servers = [RecordingOrigin(), RecordingOrigin()]
    for server, addr in zip(servers, (O1, O2), strict=True):
        await server.start(*addr)
    o1, o2 = Origin("http", *O1), Origin("http", *O2)
    # o1's check asks for a page it answers 200, but expects 204: the check fails, while
    # the origin itself still answers traffic (so only the down mark can keep it away)
    bad = HealthCheck(
        type="http", interval=0.1, timeout=0.1, path="/hello", expect_status=(204, 204)
    )
    rig = rigs([o1, o2], {o1: bad, o2: FAST})
    await until(lambda: rig.state(o1) is State.DOWN)
    assert rig.results(o1, "status") >= 1
    assert "expected 204-204" in rig.states.entry(o1).reason
    assert servers[0].agents, "o1 got its checks"
    async with rig.client() as client:
        for _ in range(20):
            assert (await client.get("/hello")).status_code == 200
    # o1 saw only the checker's requests; all 20 proxied ones went to o2
    assert servers[0].proxied() == 0
    assert servers[1].proxied() == 20
    for s in servers:
        await s.close()


def blackhole(listeners) -> tuple[str, int]:
    """An address whose SYNs go unanswered: a listener that never accepts, its backlog full."""
    addr = listeners.add(O1[0], O1[1], backlog=0)
    held = []
    for _ in range(4):  # fill the accept queue; later SYNs are dropped
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(addr)
        held.append(s)
    listeners.socks.extend(held)
    return addr


async def test_every_origin_down_answers_503_at_once_not_after_the_connect_timeout(rigs, listeners):
    addr = blackhole(listeners)
    o1 = Origin("http", *addr)
    spec = HealthCheck(type="tcp", interval=0.2, timeout=0.2)
    rig = rigs([o1], {o1: spec}, connect_timeout=3.0)
    await until(lambda: rig.state(o1) is State.DOWN)  # the first check timed out
    assert rig.results(o1, "timeout") >= 1
    async with rig.client() as client:
        started = time.monotonic()
        answer = await client.get("/hello")
        took = time.monotonic() - started
    assert answer.status_code == 503
    assert answer.headers.get("retry-after") is not None
    assert took < 0.3, took  # no connect tried: far below connect_timeout (3 s)


# -- WebSocket: a session survives its origin's down mark ----------------------------------------


class WsOrigin:
    """An echo WebSocket origin whose ``/health`` answers ``self.status``."""

    def __init__(self) -> None:
        self.status = 200
        self.sessions = 0

    def process_request(self, conn, request) -> Response | None:
        if request.path == "/health":
            return Response(self.status, "X", Headers([("content-length", "0")]), b"")
        return None

    async def echo(self, conn) -> None:
        self.sessions += 1
        try:
            async for message in conn:
                await conn.send(message)
        except ConnectionClosed:
            pass


async def test_websocket_session_survives_a_down_mark_and_new_ones_are_refused(rigs):
    origin = WsOrigin()
    server = await serve(origin.echo, *O1, process_request=origin.process_request)
    o1 = Origin("ws", *O1)
    spec = HealthCheck(type="http", interval=0.1, timeout=0.1, path="/health", fall=2)
    rig = rigs([o1], {o1: spec})
    await until(lambda: rig.results(o1, "pass") >= 1)
    url = f"ws://app.test:{rig.port}/"
    try:
        async with connect(url, host="127.0.0.1", port=rig.port, open_timeout=5) as ws:
            await ws.send("before")
            assert await ws.recv() == "before"
            origin.status = 503  # the origin says it is unwell: checks fail
            await until(lambda: rig.state(o1) is State.DOWN)
            for i in range(50):  # the session goes on, byte exact, after the mark
                await ws.send(f"after {i}")
                assert await ws.recv() == f"after {i}"
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url, host="127.0.0.1", port=rig.port, open_timeout=5):
                    pass
            assert refused.value.response.status_code == 503
            assert origin.sessions == 1  # the refused handshake never reached the origin
            await ws.send("still")
            assert await ws.recv() == "still"
    finally:
        server.close()
        await server.wait_closed()


# -- the checks' own sockets: from the egress IPs, in the census, no TIME_WAIT left ---------------


async def test_checks_come_from_the_egress_ips_and_leave_no_time_wait(rigs):
    server = await start_origin(O1)
    o1 = Origin("http", *O1)
    # /slow never answers: each check holds its connection for the whole timeout
    slow = HealthCheck(type="http", interval=0.3, timeout=0.25, path="/slow")
    rig = rigs([o1], {o1: slow})
    seen: set[tuple[str, str]] = set()

    def census_now() -> bool:
        for pair in census.take_census(("tcp",)):
            if pair.dst == f"{O1[0]}:{O1[1]}" and pair.established:
                seen.add((pair.src, pair.dst))
        return bool(seen)

    await until(census_now)
    assert {src for src, _dst in seen} <= set(EGRESS), seen
    await until(lambda: rig.results(o1, "timeout") >= 2)
    # the origin saw the checks arrive from the egress IPs too
    assert {c.peer[0] for c in server.connections} <= set(EGRESS)
    last = rig.states.entry(o1).last_check
    assert last is not None and last["egress"] in EGRESS
    # TCP checks: the checker connects and closes first, so a FIN would leave a TIME_WAIT on
    # an egress port per check; each ends with RST instead
    rig.checker.configure({o1: HealthCheck(type="tcp", interval=0.05, timeout=0.05)})
    passed = rig.results(o1, "pass")
    await until(lambda: rig.results(o1, "pass") >= passed + 10)
    await rig.checker.close()
    pairs = [p for p in census.take_census(("tcp",)) if p.dst == f"{O1[0]}:{O1[1]}"]
    assert sum(p.time_wait for p in pairs) == 0, pairs
    await server.close()


# -- passive ejection ----------------------------------------------------------------------------


class FailingOrigin(TestOrigin):
    """``/fail`` answers 500; everything else as TestOrigin."""

    async def _respond(self, conn, writer, request, body, n) -> None:
        import h11

        if request.target == b"/fail":
            writer.write(
                conn.send(h11.Response(status_code=500, headers=[("content-length", "0")]))
                + conn.send(h11.EndOfMessage())
            )
            await writer.drain()
            return
        await super()._respond(conn, writer, request, body, n)


async def test_passive_ejection_after_n_5xx_until_a_check_passes(rigs):
    server = FailingOrigin()
    await server.start(*O1)
    o1 = Origin("http", *O1)
    spec = HealthCheck(
        type="http", interval=0.5, timeout=0.2, rise=1, path="/hello", passive_fails=3
    )
    rig = rigs([o1], {o1: spec})
    await until(lambda: rig.results(o1, "pass") >= 1)
    async with rig.client() as client:
        for _ in range(3):
            assert (await client.get("/fail")).status_code == 500
        assert rig.state(o1) is State.DOWN
        assert rig.transitions == [(o1, State.ACTIVE, State.DOWN, "passive")]
        assert "HTTP 500" in rig.states.entry(o1).reason
        assert (await client.get("/hello")).status_code == 503  # not sent to the origin
        await until(lambda: rig.state(o1) is State.ACTIVE)  # the next check passed
        assert rig.transitions[-1][3] == "health"
        assert (await client.get("/hello")).status_code == 200
    await server.close()


async def test_passive_ejection_after_n_connect_failures(rigs):
    o1 = Origin("http", *O1)  # nothing listens: each request's connect is refused
    spec = HealthCheck(type="tcp", interval=20, timeout=0.2, passive_fails=2)
    rig = rigs([o1], {})
    # as worker 1 of 2: its first check is half an interval (10 s) away, so only traffic
    # can take the origin down within this test
    rig.checker = HealthChecker(lambda: rig.pool, rig.states, worker=1, workers=2)
    rig.checker.configure({o1: spec})
    health.install(rig.checker)
    async with rig.client() as client:
        assert (await client.get("/hello")).status_code == 502
        assert rig.state(o1) is State.ACTIVE
        assert (await client.get("/hello")).status_code == 502
        assert rig.state(o1) is State.DOWN
        assert rig.transitions == [(o1, State.ACTIVE, State.DOWN, "passive")]
        assert "ECONNREFUSED" in rig.states.entry(o1).reason
        started = time.monotonic()
        assert (await client.get("/hello")).status_code == 503
        assert time.monotonic() - started < 0.3
    assert rig.checker.passive_failures[o1] == 2
    assert sum(rig.checker.checks.values()) == 0  # no check had run: traffic alone did it


async def test_reload_keeps_the_verdict_and_a_removed_check_marks_the_origin_up(rigs):
    o1 = Origin("http", *O1)  # nothing listens: down at the first check
    rig = rigs([o1], {o1: FAST})
    await until(lambda: rig.state(o1) is State.DOWN)
    rig.checker.configure({o1: HealthCheck(type="tcp", interval=0.2, timeout=0.1, rise=3)})
    assert rig.state(o1) is State.DOWN and len(rig.transitions) == 1  # SIGHUP changed nothing
    rig.checker.configure({})
    assert rig.state(o1) is State.ACTIVE
    assert rig.states.entry(o1).reason == "health check removed"


# -- https origins: the check's TLS is the traffic's (SNI, verification) -------------------------


async def test_https_origin_checked_with_sni_and_verification(ns, tmp_path):
    from pool.origin import Resolver, TLSConfig
    from proxy.health_probe import probe

    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("origin.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    server = TestOrigin()
    await server.start(*O1, ssl_ctx=server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    async def lookup(host: str, port: int) -> list[str]:
        return [O1[0]]

    pool = OriginPool(
        EgressSet(list(EGRESS)),
        tls=TLSConfig(ca_file=str(ca_file)),
        resolver=Resolver(lookup=lookup),
    )
    origin = Origin("https", "origin.test", O1[1])
    try:
        http = await probe(pool, origin, FAST, pool.tls.context())
        assert (http.result, http.status) == ("pass", 200), http
        assert server.sni == ["origin.test"]
        tcp = await probe(pool, origin, HealthCheck(timeout=1), pool.tls.context())
        assert tcp.result == "pass" and "TLS handshake" in tcp.detail
        # a certificate the proxy would refuse for traffic fails the check too
        untrusted = await probe(pool, origin, FAST, ssl.create_default_context())
        assert untrusted.result == "connect" and "CERTIFICATE_VERIFY_FAILED" in untrusted.detail
        assert untrusted.egress in EGRESS
    finally:
        await pool.close()
        await server.close()


async def test_a_check_that_breaks_counts_as_failed_and_the_checks_go_on(ns):
    from pool.origin import Resolver

    async def broken(host: str, port: int) -> list[str]:
        raise RuntimeError("resolver bug")

    pool = OriginPool(EgressSet(list(EGRESS)), resolver=Resolver(lookup=broken))
    states = OriginStates()
    checker = HealthChecker(lambda: pool, states)
    origin = Origin("http", "origin.test", 9000)
    checker.configure({origin: FAST})
    try:
        await until(lambda: checker.checks.get((origin, "error"), 0) >= 3)
        assert states.state(origin) is State.DOWN
        assert "RuntimeError: resolver bug" in states.entry(origin).reason
    finally:
        await checker.close()
        await pool.close()
