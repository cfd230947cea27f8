"""An egress IP removed under pooled connections (issue 18, item 2), in a namespace of its own.

Two egress IPs on a veth device, 10.9.0.1/24 and 10.9.0.2/24 (the second a secondary, so the
subnet's route stays when it goes). Origins listen on ``lo``. Once 10.9.0.2 is deleted, the
origins' replies to it leave through the veth and are never answered: exactly the host that
no longer owns a source address. The proxy runs in-process (its listener, its pool, the
kernel's address announcements), so a failure shows its traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from types import SimpleNamespace

import httpx
import pytest
from structlog.testing import capture_logs
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed, ConnectionClosedError

from pool import netns
from pool.addrwatch import parse
from pool.egress import EgressLost, EgressSet
from pool.metrics import collect
from pool.origin import Origin, OriginPool, PoolLimits
from proxy.exchange import Exchange
from proxy.routing import Route, Router
from proxy.server import Listener, Proxy, Settings

KEEP, GONE, LATER = "10.9.0.1", "10.9.0.2", "10.9.0.3"
HTTP_IDLE = ("127.0.2.1", 9000)  # idle pooled connections only, when the IP goes
HTTP_BUSY = ("127.0.2.3", 9000)  # requests in flight when the IP goes
HTTP_BACK = ("127.0.2.4", 9000)  # fresh pairs after the IP is back
WS = ("127.0.2.2", 9000)
RESPONSE_TIMEOUT = 5.0  # what the hung requests would wait for without the watch


class FakeClock:
    """The egress backoff clock: moved by hand, to show "down" does not lapse with time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def space() -> Iterator[netns.Namespace]:
    reason = netns.can_create()
    if reason:
        pytest.skip(reason)
    with netns.namespace(port_range=(20000, 60999)) as ns:
        ns.ip("link", "add", "eg0", "type", "veth", "peer", "name", "eg1")
        ns.ip("link", "set", "eg0", "up")
        ns.ip("link", "set", "eg1", "up")  # the far side: up, and answers for nothing
        ns.ip("addr", "add", f"{KEEP}/24", "dev", "eg0")
        ns.ip("addr", "add", f"{GONE}/24", "dev", "eg0")  # secondary: the /24 route stays
        yield ns


class PeerOrigin:
    """HTTP/1.1 keep-alive origin answering each request with the peer's IP (the egress).

    ``/gate/NAME/N`` answers once N such requests are waiting, so N connections open together;
    ``/hold/NAME/N`` too, but then never answers one from GONE (its reply could not arrive).
    """

    def __init__(self) -> None:
        self.servers: list[asyncio.Server] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.gates: dict[bytes, tuple[int, asyncio.Event]] = {}
        self.held = 0
        self.heads: list[tuple[str, bytes]] = []  # (peer, method) of every request head

    async def start(self, *addresses: tuple[str, int]) -> None:
        for host, port in addresses:
            self.servers.append(await asyncio.start_server(self._serve, host, port))

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        peer = str(writer.get_extra_info("peername")[0])
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path = head.split(b" ", 2)[:2]
                self.heads.append((peer, method))
                length = 0
                for line in head.lower().split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                if path.startswith((b"/gate/", b"/hold/")):
                    want = int(path.rsplit(b"/", 1)[1])
                    seen, event = self.gates.get(path, (0, asyncio.Event()))
                    self.gates[path] = (seen + 1, event)
                    if seen + 1 >= want:
                        event.set()
                    await event.wait()
                    if path.startswith(b"/hold/") and peer == GONE:
                        self.held += 1
                        await asyncio.Event().wait()
                body = b" ".join((peer.encode(), body)) if body else peer.encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.tasks.discard(task)


async def ws_origin(conn) -> None:  # type: ignore[no-untyped-def]
    """Tells the client which egress IP reached it, then echoes."""
    await conn.send(str(conn.remote_address[0]))
    try:
        async for message in conn:
            await conn.send(message)
    except ConnectionClosed:
        pass


def down_metric(egress: EgressSet, ip: str) -> float:
    (value,) = [
        s.value
        for s in collect(egress)
        if s.name == "originpool_egress_down" and s.labels == (("egress", ip),)
    ]
    return value


async def until(check: Callable[[], bool], seconds: float = 5.0) -> None:
    """Poll a condition the event loop makes true, with a deadline."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def make_proxy(egress: EgressSet) -> tuple[Proxy, Listener]:
    routes = [
        Route("idle.test", "/", [(Origin("http", *HTTP_IDLE), 1)]),
        Route("busy.test", "/", [(Origin("http", *HTTP_BUSY), 1)]),
        Route("back.test", "/", [(Origin("http", *HTTP_BACK), 1)]),
        Route("ws.test", "/", [(Origin("ws", *WS), 1)]),
    ]
    pool = OriginPool(egress, PoolLimits())
    settings = Settings(upstream_response_timeout=RESPONSE_TIMEOUT)
    proxy = Proxy(Router(routes), pool, dataclasses.replace(settings))
    listener = Listener(proxy, ("127.0.0.1", 0))
    proxy.listeners.append(listener)
    listener.start()
    return proxy, listener


@pytest.fixture
async def origins(space: netns.Namespace) -> AsyncIterator[PeerOrigin]:
    origin = PeerOrigin()
    await origin.start(HTTP_IDLE, HTTP_BUSY, HTTP_BACK)
    yield origin
    await origin.close()


async def test_removed_ip_with_pooled_connections_requests_and_sessions(space, origins) -> None:
    clock = FakeClock()
    egress = EgressSet([KEEP, GONE], clock=clock)
    proxy, listener = make_proxy(egress)
    proxy.pool.watch_egress()
    port = listener.address[1]
    sessions: list[tuple[ClientConnection, str]] = []
    try:
        async with (
            serve(ws_origin, *WS),
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client,
        ):

            async def get(host: str, path: str) -> tuple[int, str]:
                r = await client.get(path, headers={"host": host})
                return r.status_code, r.text

            async def many(host: str, path: str, n: int = 16) -> Counter[tuple[int, str]]:
                return Counter(await asyncio.gather(*(get(host, path) for _ in range(n))))

            # 16 pooled connections to each HTTP origin, 8 from each egress IP
            for host in ("idle.test", "busy.test"):
                assert await many(host, f"/gate/{host}/16") == {(200, KEEP): 8, (200, GONE): 8}
            assert egress.live_by_egress() == {KEEP: 16, GONE: 16}
            # 16 requests on them: those through GONE are in flight when it goes
            busy = [asyncio.create_task(get("busy.test", "/hold/busy/16")) for _ in range(16)]
            await until(lambda: origins.held == 8)
            for _ in range(4):
                ws = await connect(f"ws://ws.test:{port}/", host="127.0.0.1", port=port)
                sessions.append((ws, str(await ws.recv())))
            assert Counter(ip for _ws, ip in sessions) == {KEEP: 2, GONE: 2}
            assert down_metric(egress, GONE) == 0

            with capture_logs() as logs:
                removed = time.monotonic()
                space.ip("addr", "del", f"{GONE}/24", "dev", "eg0")
                # in flight: failed at once and retried on a fresh connection from KEEP
                answered = Counter(await asyncio.wait_for(asyncio.gather(*busy), 10))
                in_flight_s = time.monotonic() - removed
                # idle: closed, so none of the next 16 lands on a connection that cannot answer
                started = time.monotonic()
                after = await asyncio.wait_for(many("idle.test", "/after"), 10)
                idle_s = time.monotonic() - started
                for ws, ip in sessions:
                    if ip == GONE:
                        with pytest.raises(ConnectionClosedError) as closed:
                            await asyncio.wait_for(ws.recv(), 5)
                        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
                    else:
                        await ws.send("still here")
                        assert await asyncio.wait_for(ws.recv(), 5) == "still here"
            assert answered == {(200, KEEP): 16}
            assert after == {(200, KEEP): 16}
            assert in_flight_s < RESPONSE_TIMEOUT / 2 and idle_s < RESPONSE_TIMEOUT / 2
            (down,) = [e for e in logs if e["event"] == "egress_down"]
            assert down["egress"] == GONE and down["reason"] == "address removed from the host"
            assert (down["idle"], down["in_flight"], down["sessions"]) == (8, 8, 2)
            failed = [e for e in logs if e["event"] == "websocket_origin_failed"]
            assert len(failed) == 2
            gone = f"egress IP {GONE} gone (address removed from the host)"
            assert all(gone in e["reason"] for e in failed)
            retried = [e for e in logs if e["event"] == "upstream_retry"]
            assert len(retried) == 8 and all(e["egress"] == GONE for e in retried)
            assert all(e["errno"] == "ECONNABORTED" and gone in e["error"] for e in retried)
            assert egress.live_by_egress()[GONE] == 0

            # down while missing, whatever the time (the backoff would have lapsed)
            assert down_metric(egress, GONE) == 1
            clock.now += 3600
            assert down_metric(egress, GONE) == 1 and egress.is_down(egress.egresses[1])

            with capture_logs() as logs:
                space.ip("addr", "add", f"{GONE}/24", "dev", "eg0")
                await until(lambda: down_metric(egress, GONE) == 0)
            assert [e["egress"] for e in logs if e["event"] == "egress_up"] == [GONE]
            # fresh pairs use it again
            assert await many("back.test", "/gate/back/2", 2) == {(200, KEEP): 1, (200, GONE): 1}
    finally:
        for ws, _ip in sessions:
            await ws.close()
        listener.close()
        await proxy.pool.close()


async def test_an_ip_missing_at_start_is_down_until_the_kernel_announces_it(space, origins) -> None:
    clock = FakeClock()
    egress = EgressSet([KEEP, LATER], clock=clock)
    proxy, listener = make_proxy(egress)
    try:
        assert down_metric(egress, LATER) == 0  # before the watch, nothing is known
        with capture_logs() as logs:
            proxy.pool.watch_egress()
        assert down_metric(egress, LATER) == 1 and down_metric(egress, KEEP) == 0
        (down,) = [e for e in logs if e["event"] == "egress_down"]
        assert down["egress"] == LATER and down["reason"] == "not on the host"
        clock.now += 3600
        assert down_metric(egress, LATER) == 1  # no traffic, no lapse
        url = f"http://127.0.0.1:{listener.address[1]}"
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            r = await client.get("/", headers={"host": "back.test"})
            assert (r.status_code, r.text) == (200, KEEP)
            assert egress.metrics.failover == {}  # never tried: known down
            space.ip("addr", "add", f"{LATER}/24", "dev", "eg0")
            await until(lambda: down_metric(egress, LATER) == 0)
            got = await asyncio.gather(
                *(client.get("/gate/start/2", headers={"host": "idle.test"}) for _ in range(2))
            )
            assert sorted(r.text for r in got) == [KEEP, LATER]
    finally:
        listener.close()
        await proxy.pool.close()


async def test_a_body_not_yet_sent_follows_its_request_to_a_fresh_connection(
    space, origins
) -> None:
    """A POST whose head went out through the removed IP, its body not yet: the origin cannot
    have acted on it, so it goes again (head now, body as the client sends it)."""
    egress = EgressSet([KEEP, GONE])
    proxy, listener = make_proxy(egress)
    proxy.pool.watch_egress()
    clients = []
    try:
        for _ in range(2):  # two fresh connections to one destination: one per egress IP
            reader, writer = await asyncio.open_connection(*listener.address)
            writer.write(b"POST /post HTTP/1.1\r\nHost: busy.test\r\nContent-Length: 5\r\n\r\n")
            clients.append((reader, writer))
        await until(lambda: len(origins.heads) == 2)
        assert sorted(peer for peer, _m in origins.heads) == [KEEP, GONE]
        with capture_logs() as logs:
            space.ip("addr", "del", f"{GONE}/24", "dev", "eg0")
            await until(lambda: len(origins.heads) == 3)  # the head again, through KEEP
        assert origins.heads[2] == (KEEP, b"POST")
        assert [e["egress"] for e in logs if e["event"] == "upstream_retry"] == [GONE]
        for reader, writer in clients:
            writer.write(b"hello")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert await reader.readexactly(len(KEEP) + 6) == f"{KEEP} hello".encode()
    finally:
        for _reader, writer in clients:
            writer.close()
        listener.close()
        await proxy.pool.close()


async def test_a_connect_that_finds_the_ip_gone_first_still_lets_the_watch_reset(
    space, origins
) -> None:
    """Under load a connect can meet the missing IP before the worker reads the kernel's
    announcement: that connect's failover must not hide the removal from the watch, whose
    reset of the pooled connections is what keeps later requests from hanging."""
    egress = EgressSet([KEEP, GONE])
    proxy, listener = make_proxy(egress)
    proxy.pool.watch_egress()
    url = f"http://127.0.0.1:{listener.address[1]}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            got = await asyncio.gather(
                *(client.get("/gate/race/4", headers={"host": "idle.test"}) for _ in range(4))
            )
            assert sorted(r.text for r in got) == [KEEP, KEEP, GONE, GONE]
            with capture_logs() as logs:
                # the loop is not run between the removal and the connect below: the
                # announcement waits in the netlink socket while the connect fails over
                space.ip("addr", "del", f"{GONE}/24", "dev", "eg0")
                gone = egress.egresses[1]
                egress.health.mark_down(gone, HTTP_BACK, errno.EADDRNOTAVAIL)  # what connect() does
                await until(lambda: egress.live_by_egress()[GONE] == 0)
            down = [e for e in logs if e["event"] == "egress_down"]
            assert [e.get("idle") for e in down] == [None, 2]  # the connect's, then the watch's
            egress.health.clock = lambda: 1e9  # far past any backoff: down by the kernel's word
            assert down_metric(egress, GONE) == 1
    finally:
        listener.close()
        await proxy.pool.close()


async def test_ipv6_egress_follows_the_announcements_too(space) -> None:
    """RTMGRP_IPV6_IFADDR: an IPv6 egress IP missing at start, added (usable only once out
    of duplicate address detection: nodad here), removed with a connection on it."""
    egress = EgressSet(["fd00::1", "fd00::2"])
    pool = OriginPool(egress, PoolLimits())
    space.ip("addr", "add", "fd00::1/128", "dev", "lo", "nodad")
    server = await asyncio.start_server(lambda r, w: None, "::1", 9000)
    try:
        pool.watch_egress()
        assert down_metric(egress, "fd00::2") == 1 and down_metric(egress, "fd00::1") == 0
        space.ip("addr", "add", "fd00::2/128", "dev", "lo", "nodad")
        await until(lambda: down_metric(egress, "fd00::2") == 0)
        origin = Origin("http", "::1", 9000)
        conns = [await pool.acquire(origin) for _ in range(2)]
        assert sorted(c.egress_ip for c in conns) == ["fd00::1", "fd00::2"]
        space.ip("addr", "del", "fd00::2/128", "dev", "lo")
        await until(lambda: down_metric(egress, "fd00::2") == 1)
        await until(lambda: egress.live_by_egress()["fd00::2"] == 0)
        lost = [c for c in conns if c.lost is not None]
        assert [c.egress_ip for c in lost] == ["fd00::2"] and not lost[0].alive
        for c in conns:
            pool.release(c, reusable=False)
    finally:
        server.close()
        await pool.close()


async def test_a_watch_that_fails_hands_back_to_the_connect_time_detection(space) -> None:
    """An IP marked absent would never come back once no announcement can arrive."""
    egress = EgressSet([KEEP, LATER])
    pool = OriginPool(egress, PoolLimits())
    pool.watch_egress()
    watch = pool._watch
    assert watch is not None and egress.is_down(egress.egresses[1])
    real = watch._sock
    assert real is not None

    class Broken:
        """The subscribed socket, failing as a netlink socket should never fail."""

        def fileno(self) -> int:
            return real.fileno()

        def recv(self, size: int) -> bytes:
            raise OSError(errno.EBADF, "broken")

        def close(self) -> None:
            real.close()

    watch._sock = Broken()  # type: ignore[assignment]
    with capture_logs() as logs:
        watch._readable()
    assert [e["event"] for e in logs] == ["address_watch_failed"]
    assert pool._watch is None and not watch.running and real.fileno() == -1
    assert not egress.is_down(egress.egresses[1])  # a connect finds out, with its backoff
    await pool.close()


def test_announcements_parse_what_the_kernel_sends(space) -> None:
    """Real RTM_NEWADDR / RTM_DELADDR datagrams, read from a subscribed socket."""
    import socket

    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 0)
    sock.bind((0, 0x10 | 0x100))
    try:
        space.ip("addr", "add", f"{LATER}/24", "dev", "eg0")
        space.ip("addr", "del", f"{LATER}/24", "dev", "eg0")
        space.ip("addr", "add", "fd00::5/128", "dev", "lo", "nodad")
        events = []
        deadline = time.monotonic() + 5
        while len(events) < 3 and time.monotonic() < deadline:
            try:
                events.extend(parse(sock.recv(65536)))
            except BlockingIOError:
                time.sleep(0.001)
    finally:
        sock.close()
    assert [(e.added, e.address) for e in events] == [
        (True, LATER),
        (False, LATER),
        (True, "fd00::5"),
    ]


# which requests are retried once after a connection failure before any response byte
CASES = [
    # method, has_body, request_done, sent, reused, error, retried?
    ("GET", False, True, 0, True, ConnectionResetError(), True),  # keep-alive race
    ("GET", False, True, 0, False, ConnectionResetError(), False),  # fresh: the origin's fault
    ("GET", False, True, 0, False, "lost", True),  # fresh, but its egress IP left
    ("DELETE", False, True, 0, True, "lost", True),
    ("POST", False, True, 0, True, "lost", False),  # complete at the origin: may have acted
    ("POST", False, True, 0, True, ConnectionResetError(), False),
    ("POST", True, False, 0, True, "lost", True),  # its body not begun: it cannot have acted
    ("POST", True, False, 10, True, "lost", False),  # body bytes gone and not kept
    ("PUT", True, True, 10, True, "lost", False),
    ("GET", False, True, 0, True, TimeoutError(), False),  # the origin may still be at it
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_retry_rules(case: tuple) -> None:
    method, has_body, done, sent, reused, error, expected = case
    if error == "lost":
        error = EgressLost(GONE, (GONE, 40000), HTTP_BUSY, "address removed from the host")
    exchange = SimpleNamespace(
        _retried=False,
        response_started=False,
        received=0,
        sent=sent,
        reused=reused,
        request_done=done,
        head=SimpleNamespace(method=method.encode(), has_body=has_body),
    )
    assert Exchange._may_retry(exchange, error) is expected  # type: ignore[arg-type]
