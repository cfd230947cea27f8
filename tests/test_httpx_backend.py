"""pool.httpx_backend in namespaces: one httpx client past one source IP's range, no leaks.

The origin is a real HTTP/1.1 server (asyncio + h11) on 127.0.2.1 inside the test's
namespace. A server only accepts, which takes no ephemeral ports: all of the namespace's
128 go to the client's connections, so their count is exactly what the test controls.
"""

from __future__ import annotations

import asyncio
import select
import shutil
import socket
import ssl
import subprocess
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path

import h11
import httpcore
import httpx
import pytest

from pool.egress import EgressSet
from pool.httpx_backend import EgressNetworkBackend, EgressTransport, egress_transport
from tests.conftest import R

HOST, PORT = "127.0.2.1", 9000
BASE = f"http://{HOST}:{PORT}"
E2 = ["127.0.1.1", "127.0.1.2"]
FIRST, REST = b"first chunk;", b"the rest, after the release"
HELLO = b"hello"
UNLIMITED = httpx.Limits(max_connections=None, max_keepalive_connections=None)
DEADLINE = 60  # seconds for a whole test's network part: a hang fails, it does not stall


class Origin:
    """HTTP/1.1 origin that records every connection's peer, for the test's assertions.

    ``GET /stream``: chunked, one chunk at once and the rest when ``release`` is set, so
    a test can hold many responses open. Anything else: a small keep-alive response.
    """

    MAX_REQUESTS = 10_000  # per connection: the serving loop is bounded

    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []
        self.requests = 0
        self.release = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []
        self.idle: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.server = await asyncio.start_server(
            self._serve, host, port, ssl=tls, backlog=4096, reuse_address=True
        )

    async def close(self) -> None:
        assert self.server is not None
        self.release.set()  # let held responses finish rather than leave their tasks pending
        self.server.close()
        for w in self.writers:
            w.close()
        await self.server.wait_closed()

    async def close_idle(self) -> None:
        """Close every connection waiting for its next request, as a server's timeout does."""
        closing = list(self.idle)
        for w in closing:
            w.close()
        for w in closing:
            await w.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peername"))
        self.writers.append(writer)
        conn = h11.Connection(h11.SERVER)

        async def next_event() -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
            while (event := conn.next_event()) is h11.NEED_DATA:
                self.idle.add(writer)
                data = await reader.read(65536)
                self.idle.discard(writer)
                conn.receive_data(data)
            return event

        try:
            for _ in range(self.MAX_REQUESTS):
                request = await next_event()
                if not isinstance(request, h11.Request):
                    return  # closed by the client
                while not isinstance(await next_event(), h11.EndOfMessage):
                    pass  # GETs: no body
                self.requests += 1
                await self._respond(conn, writer, request.target)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.RemoteProtocolError):
            return
        finally:
            self.idle.discard(writer)
            writer.close()

    async def _respond(self, conn: h11.Connection, writer: asyncio.StreamWriter, target: bytes):
        def send(event: h11.Event) -> None:
            writer.write(conn.send(event) or b"")

        if target == b"/stream":
            send(h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")]))
            send(h11.Data(data=FIRST))
            await writer.drain()
            await self.release.wait()
            send(h11.Data(data=REST))
        else:
            send(h11.Response(status_code=200, headers=[("content-length", str(len(HELLO)))]))
            send(h11.Data(data=HELLO))
        send(h11.EndOfMessage())
        await writer.drain()


@pytest.fixture
async def origin(ns):
    server = Origin()
    await server.start(HOST, PORT)
    yield server
    await server.close()


def live(egress: EgressSet) -> int:
    return sum(egress.live_by_egress().values())


async def open_streams(client: httpx.AsyncClient, stack: AsyncExitStack, n: int) -> list:
    """``n`` responses held open at once, each with its first chunk read."""
    held = []
    for _ in range(n):
        response = await stack.enter_async_context(client.stream("GET", f"{BASE}/stream"))
        assert response.status_code == 200
        chunks = response.aiter_raw()
        held.append((response, chunks, await anext(chunks)))
    return held


async def finish(held: list) -> None:
    for _response, chunks, first in held:
        body = first + b"".join([chunk async for chunk in chunks])
        assert body == FIRST + REST


# -- the test: more than R concurrent streams to one origin ------------------------


async def test_one_client_holds_more_streams_than_one_ips_range(origin):
    egress = EgressSet(E2)
    n = R + 20
    transport = egress_transport(egress, limits=UNLIMITED)
    async with asyncio.timeout(DEADLINE), httpx.AsyncClient(transport=transport) as client:
        async with AsyncExitStack() as stack:
            held = await open_streams(client, stack, n)
            peers = set(origin.peers)
            assert len(peers) == n > R  # one connection per stream, all at once
            by_ip = Counter(ip for ip, _port in peers)
            assert set(by_ip) == set(E2) and max(by_ip.values()) <= R, by_ip
            assert egress.live_by_egress() == dict(by_ip)
            origin.release.set()
            await finish(held)
        # every connection went back to the pool: the next requests reuse them
        before = len(origin.peers)
        for _ in range(20):
            assert (await client.get(f"{BASE}/hello")).content == HELLO
        assert len(origin.peers) == before
        assert live(egress) == n
    assert live(egress) == 0  # closing the client gave every slot back


async def test_keep_alive_reuses_one_connection(origin):
    egress = EgressSet(E2)
    async with asyncio.timeout(DEADLINE):
        async with httpx.AsyncClient(transport=egress_transport(egress)) as client:
            for _ in range(20):
                response = await client.get(f"{BASE}/hello")
                assert response.content == HELLO
                assert live(egress) == 1
            stream = response.extensions["network_stream"]
            slot = stream.get_extra_info("egress_slot")
            assert stream.get_extra_info("client_addr") == slot.local
            assert stream.get_extra_info("server_addr") == (HOST, PORT)
            assert slot.local[0] in E2
        assert len(origin.peers) == 1 and origin.requests == 20
        assert origin.peers[0] == slot.local
    assert live(egress) == 0 and slot.released


async def test_past_every_egress_the_error_names_them_and_the_errno(origin):
    egress = EgressSet(["127.0.1.1"])
    transport = egress_transport(egress, limits=UNLIMITED)
    async with (
        asyncio.timeout(DEADLINE),
        httpx.AsyncClient(transport=transport) as client,
        AsyncExitStack() as stack,
    ):
        held = await open_streams(client, stack, R)
        with pytest.raises(httpx.ConnectError) as full:
            await open_streams(client, stack, 1)
        message = str(full.value)
        assert "127.0.1.1" in message and "EADDRNOTAVAIL" in message, message
        assert "127.0.2.1:9000" in message
        assert live(egress) == R  # the failed attempt holds nothing
        origin.release.set()
        await finish(held)
    assert live(egress) == 0


# -- connection life cycle -----------------------------------------------------------------


async def test_idle_connection_closed_by_the_origin_is_replaced_not_failed(origin):
    egress = EgressSet(E2)
    async with asyncio.timeout(DEADLINE):
        async with httpx.AsyncClient(transport=egress_transport(egress)) as client:
            first = await client.get(f"{BASE}/hello")
            sock = first.extensions["network_stream"].get_extra_info("socket")
            slot = first.extensions["network_stream"].get_extra_info("egress_slot")
            await origin.close_idle()
            if sock.fileno() >= 0:  # asyncio has not seen the FIN yet: wait for the kernel's
                poll = select.poll()
                poll.register(sock, select.POLLIN | select.POLLRDHUP)
                assert poll.poll(5000)
            second = await client.get(f"{BASE}/hello")  # would be a RemoteProtocolError
            assert second.content == HELLO
            assert len(origin.peers) == 2
            assert slot.released and live(egress) == 1
    assert live(egress) == 0


async def test_refused_connect_is_a_connect_error_and_holds_nothing(ns):
    egress = EgressSet(E2)
    async with httpx.AsyncClient(transport=egress_transport(egress)) as client:
        with pytest.raises(httpx.ConnectError) as refused:
            await client.get(f"http://{HOST}:9001/")
    assert "127.0.2.1:9001" in str(refused.value)
    assert isinstance(refused.value.__cause__, httpcore.ConnectError)
    assert live(egress) == 0


async def test_connect_timeout_is_a_connect_timeout(ns):
    dead = socket.socket()  # accept queue of one, filled: further SYNs go unanswered
    dead.bind(("127.0.2.2", 9000))
    dead.listen(0)
    filler = socket.socket()
    filler.connect(("127.0.2.2", 9000))
    egress = EgressSet(E2)
    try:
        transport = egress_transport(egress)
        async with httpx.AsyncClient(transport=transport, timeout=0.2) as client:
            with pytest.raises(httpx.ConnectTimeout):
                await client.get("http://127.0.2.2:9000/")
    finally:
        filler.close()
        dead.close()
    assert live(egress) == 0


# -- addresses -----------------------------------------------------------------------------


async def test_resolver_names_and_family_filter(origin):
    asked = []

    async def resolver(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return ["fd00::9", HOST, HOST]  # no IPv6 egress: fd00::9 must not even be tried

    egress = EgressSet(E2)
    transport = egress_transport(egress, resolver=resolver)
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get(f"http://origin.test:{PORT}/hello")
        assert response.content == HELLO
    assert asked == [("origin.test", PORT)]
    assert egress.metrics.attempts.total() == 1

    async def v6_only(host: str, port: int) -> list[str]:
        return ["fd00::9"]

    transport = egress_transport(egress, resolver=v6_only)
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.ConnectError, match="no egress IP of that family"):
            await client.get(f"http://origin.test:{PORT}/hello")
    assert live(egress) == 0


async def test_next_address_after_a_refusal(origin):
    async def resolver(host: str, port: int) -> list[str]:
        return ["127.0.2.9", HOST]  # nothing listens on the first

    egress = EgressSet(E2)
    transport = egress_transport(egress, resolver=resolver)
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get(f"http://origin.test:{PORT}/hello")).content == HELLO
    assert live(egress) == 0


async def test_system_resolver(ns, listeners):
    answers = socket.getaddrinfo("localhost", PORT, socket.AF_INET, socket.SOCK_STREAM)
    v4 = {info[4][0] for info in answers}
    if not v4 or not all(ip.startswith("127.") for ip in v4):
        pytest.skip(f"localhost is {v4} here, not loopback IPv4")
    for ip in v4:
        listeners.add(ip, PORT)
    egress = EgressSet(E2)
    stream = await EgressNetworkBackend(egress).connect_tcp("localhost", PORT, timeout=5)
    try:
        assert stream.get_extra_info("server_addr") in {(ip, PORT) for ip in v4}
        assert live(egress) == 1
    finally:
        await stream.aclose()
        await stream.aclose()  # idempotent: the slot is given back once
    assert live(egress) == 0


# -- the backend on its own ----------------------------------------------------------------


async def test_stream_read_write_options_and_timeouts(origin):
    egress = EgressSet(["127.0.1.1"])
    backend = EgressNetworkBackend(egress)
    keepalive = (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    stream = await backend.connect_tcp(HOST, PORT, socket_options=[keepalive])
    try:
        sock = stream.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert stream.get_extra_info("client_addr")[0] == "127.0.1.1"
        assert stream.get_extra_info("ssl_object") is None
        assert stream.get_extra_info("is_readable") is False
        await stream.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
        head = b""
        for _ in range(100):
            head += await stream.read(65536, timeout=5)
            if FIRST in head:
                break
        assert head.startswith(b"HTTP/1.1 200") and FIRST in head
        with pytest.raises(httpcore.ReadTimeout):
            await stream.read(65536, timeout=0.05)  # the rest waits for the release
        assert stream.get_extra_info("is_readable") is False
    finally:
        await stream.aclose()
    assert live(egress) == 0
    assert stream.get_extra_info("is_readable") is True  # closed: reads would end at once
    with pytest.raises(httpcore.WriteError):
        await stream.write(b"x")


async def test_refuses_what_would_bypass_the_egress_set(origin):
    egress = EgressSet(E2)
    backend = EgressNetworkBackend(egress)
    with pytest.raises(httpcore.ConnectError, match="local_address"):
        await backend.connect_tcp(HOST, PORT, local_address="127.0.0.1")
    bogus = (socket.SOL_SOCKET, 9999, 1)  # ENOPROTOOPT once connected: closed, not leaked
    with pytest.raises(httpcore.ConnectError, match="Protocol not available"):
        await backend.connect_tcp(HOST, PORT, socket_options=[bogus])
    with pytest.raises(httpcore.UnsupportedProtocol):
        await backend.connect_unix_socket("/tmp/x.sock")
    for kwargs in ({"proxy": "http://127.0.0.1:3128"}, {"uds": "/x"}, {"local_address": "::"}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            egress_transport(egress, **kwargs)
    with pytest.raises(TypeError, match="bogus"):
        egress_transport(egress, bogus=1)
    assert isinstance(egress_transport(egress, proxy=None), EgressTransport)
    assert live(egress) == 0


# -- TLS -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for origin.test (openssl(1): no Python dependency)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl(1) to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=origin.test",
            "-addext", "subjectAltName=DNS:origin.test",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
async def tls_origin(ns, certificate):
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = Origin()
    await server.start(HOST, 9443, tls=context)
    yield server
    await server.close()


async def pinned(host: str, port: int) -> list[str]:
    return [HOST]


async def test_tls_upgrade_keeps_one_slot_and_releases_it_once(tls_origin, certificate):
    egress = EgressSet(E2)
    trust = ssl.create_default_context(cafile=str(certificate[0]))
    transport = egress_transport(egress, verify=trust, resolver=pinned)
    async with asyncio.timeout(DEADLINE):
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(5):
                response = await client.get("https://origin.test:9443/hello")
                assert response.content == HELLO
                assert live(egress) == 1
            stream = response.extensions["network_stream"]
            assert stream.get_extra_info("ssl_object").server_hostname == "origin.test"
            slot = stream.get_extra_info("egress_slot")
        assert len(tls_origin.peers) == 1
    assert slot.released and live(egress) == 0


async def test_failed_tls_handshake_closes_and_releases(tls_origin):
    egress = EgressSet(E2)
    transport = egress_transport(egress, resolver=pinned)  # the test CA is not trusted
    async with asyncio.timeout(DEADLINE), httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.get("https://origin.test:9443/hello")
    assert live(egress) == 0


# -- uvloop, which the proxy runs on ---------------------------------------------------------


@pytest.mark.parametrize(
    "scenario",
    [
        test_one_client_holds_more_streams_than_one_ips_range,
        test_keep_alive_reuses_one_connection,
        test_idle_connection_closed_by_the_origin_is_replaced_not_failed,
        test_tls_upgrade_keeps_one_slot_and_releases_it_once,
    ],
    ids=lambda f: f.__name__.removeprefix("test_"),
)
def test_under_uvloop(ns, certificate, scenario):
    """The same scenarios on uvloop, whose transports are not asyncio classes."""
    uvloop = pytest.importorskip("uvloop")
    tls = scenario is test_tls_upgrade_keeps_one_slot_and_releases_it_once

    async def main() -> None:
        context = None
        if tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*certificate)
        server = Origin()
        await server.start(HOST, 9443 if tls else PORT, tls=context)
        try:
            await (scenario(server, certificate) if tls else scenario(server))
        finally:
            await server.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
