"""HTTP/2 to clients through the proxy over real sockets: h2c prior knowledge and TLS ALPN,
the same routes, headers, error bodies and request ids as HTTP/1.1, flow control both ways,
and RFC 8441 WebSocket. Each test runs in its own network namespace.

The client is h2's own client-side state machine over an asyncio stream (so a test can send
exactly the frames it wants), or httpx with ``http2=True`` where a real client's view is the
point.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import time
from collections.abc import AsyncIterator

import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
import pytest
import trustme
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, WindowUpdateFrame
from structlog.testing import capture_logs

from pool.egress import EgressSet
from pool.origin import Origin, OriginPool, PoolLimits
from proxy.routing import Route, Router
from proxy.server import Listener, Proxy, Settings
from tests.http_origin import TestOrigin, pattern

O1 = ("127.0.2.1", 9000)


@dataclasses.dataclass
class Rig:
    proxy: Proxy
    listener: Listener
    origin: TestOrigin

    @property
    def port(self) -> int:
        return int(self.listener.address[1])


async def make_rig(settings: Settings | None = None, **listener_kw: object) -> Rig:
    origin = TestOrigin()
    await origin.start(*O1)
    route = Route("app.test", "/", [(Origin("http", *O1), 1)])
    pool = OriginPool(EgressSet(["127.0.1.1"]), PoolLimits())
    proxy = Proxy(Router([route]), pool, settings or Settings())
    listener = Listener(proxy, ("127.0.0.1", 0), **listener_kw)  # type: ignore[arg-type]
    proxy.listeners.append(listener)
    listener.start()
    return Rig(proxy, listener, origin)


async def close_rig(rig: Rig) -> None:
    rig.listener.close()
    for client in list(rig.proxy.clients):
        client.abort()
    await rig.proxy.pool.close()
    await rig.origin.close()


@pytest.fixture
async def rig(ns) -> AsyncIterator[Rig]:
    r = await make_rig()
    yield r
    await close_rig(r)


class H2Client:
    """h2's client state machine over one TCP (or TLS) connection: frames as a test wants."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.events: list[h2.events.Event] = []
        self.closed = False

    @classmethod
    async def open(cls, port: int, ssl_ctx: ssl.SSLContext | None = None) -> H2Client:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ssl_ctx, server_hostname="app.test" if ssl_ctx else None
        )
        client = cls(reader, writer)
        client.conn.initiate_connection()
        client.flush()
        return client

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    async def read(self, until: object, timeout: float = 5.0) -> None:
        """Read frames until ``until(self)`` is true or the connection ends."""
        deadline = time.monotonic() + timeout
        while not until(self):  # type: ignore[operator]
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; events: {self.events[-5:]}"
            try:
                data = await asyncio.wait_for(self.reader.read(65536), left)
            except (ConnectionError, ssl.SSLError):
                data = b""
            if not data:
                self.closed = True
                return
            for event in self.conn.receive_data(data):
                self.events.append(event)
                if isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
            self.flush()

    def of(self, stream_id: int, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind) and e.stream_id == stream_id]

    def ended(self, stream_id: int) -> bool:
        return bool(
            self.of(stream_id, h2.events.StreamEnded) or self.of(stream_id, h2.events.StreamReset)
        )

    def response(self, stream_id: int) -> tuple[dict[bytes, bytes], bytes]:
        [head] = self.of(stream_id, h2.events.ResponseReceived)
        body = b"".join(e.data for e in self.of(stream_id, h2.events.DataReceived))
        return dict(head.headers), body

    def request(
        self,
        path: str = "/hello",
        method: str = "GET",
        extra: list[tuple[bytes, bytes]] | None = None,
        end: bool = True,
        authority: bytes = b"app.test",
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", authority),
            (b":path", path.encode()),
            *(extra or []),
        ]
        self.conn.send_headers(sid, headers, end_stream=end)
        self.flush()
        return sid

    async def get(self, path: str = "/hello", **kw: object) -> tuple[dict[bytes, bytes], bytes]:
        sid = self.request(path, **kw)  # type: ignore[arg-type]
        await self.read(lambda c: c.ended(sid))
        return self.response(sid)

    async def send_all(self, sid: int, data: bytes, end: bool = False) -> None:
        """DATA as the stream's and the connection's windows allow, waiting for them."""
        sent = 0
        while sent < len(data) or (end and not sent and not data):
            room = min(self.conn.local_flow_control_window(sid), 16384, len(data) - sent)
            if room <= 0 and data:
                await self.read(lambda c: c.conn.local_flow_control_window(sid) > 0)
                continue
            last = sent + room == len(data)
            self.conn.send_data(sid, data[sent : sent + room], end_stream=end and last)
            self.flush()
            sent += room
            if not data:
                break

    def close(self) -> None:
        self.writer.close()


async def test_h2c_prior_knowledge_get_reaches_the_route(rig: Rig) -> None:
    client = await H2Client.open(rig.port)
    with capture_logs() as logs:
        head, body = await client.get("/hello")
    assert head[b":status"] == b"200" and body == b"hello 1"
    assert head[b"via"] == b"1.1 originpool"
    access = [line for line in logs if line["event"] == "access"]
    assert access and access[0]["http_version"] == "2" and access[0]["status"] == 200
    seen = dict(rig.origin.last_headers)
    assert access[0]["request_id"] == seen[b"x-request-id"].decode()
    # many streams at once on one connection, one pooled origin connection each at most
    sids = [client.request(f"/hello?{i}") for i in range(20)]
    await client.read(lambda c: all(c.ended(s) for s in sids))
    assert all(client.response(s)[0][b":status"] == b"200" for s in sids)
    assert rig.proxy.stats.http2_connections_total == rig.proxy.stats.connections_total == 1
    from proxy.admin import proxy_samples

    [sample] = [s for s in proxy_samples(rig.proxy) if "http2" in s.name]
    assert sample.name == "originpool_http2_connections_total" and sample.value == 1
    client.close()


async def test_authority_is_the_host_and_cookie_crumbs_are_joined(rig: Rig) -> None:
    client = await H2Client.open(rig.port)
    extra = [(b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"x-forwarded-host", b"evil.test")]
    head, _ = await client.get("/hello", extra=extra)
    assert head[b":status"] == b"200"
    seen = {n.lower(): v for n, v in rig.origin.last_headers}
    assert seen[b"host"] == b"app.test" and seen[b"x-forwarded-host"] == b"app.test"
    assert seen[b"cookie"] == b"a=1; b=2"
    # no route for this authority: the proxy's own 421, its error body and request id
    head, body = await client.get("/hello", authority=b"nowhere.test")
    assert head[b":status"] == b"421" and b"no route for this host" in body
    assert head[b"x-request-id"].decode() in body.decode()
    # a Host that disagrees with :authority is a second view of the host: refused
    # (RFC 9113 §8.3.1), and nothing of it reaches the origin
    requests = len(rig.origin.connections[0].requests)
    client.conn.config.validate_outbound_headers = False
    sid = client.request("/hello", extra=[(b"host", b"evil.test")])
    await client.read(lambda c: c.closed or c.ended(sid))
    assert not client.of(sid, h2.events.ResponseReceived)
    assert len(rig.origin.connections[0].requests) == requests
    client.close()


async def test_connection_specific_headers_are_refused(rig: Rig) -> None:
    client = await H2Client.open(rig.port)
    client.conn.config.validate_outbound_headers = False
    client.conn.config.normalize_outbound_headers = False
    client.request("/hello", extra=[(b"connection", b"keep-alive")])
    await client.read(
        lambda c: (
            c.closed
            or any(
                isinstance(e, (h2.events.ConnectionTerminated, h2.events.StreamReset))
                for e in c.events
            )
        )
    )
    assert not client.of(1, h2.events.ResponseReceived)
    assert not rig.origin.connections  # nothing reached the origin
    client.close()


async def test_request_and_response_bodies_stream_with_flow_control(rig: Rig) -> None:
    """A 1 MiB upload through the client's 64 KiB window (acked as the origin takes it) and
    a 4 MiB download through the proxy's send window, both byte-exact."""
    client = await H2Client.open(rig.port)
    size = 1 << 20
    upload = pattern(0, size)
    sid = client.request("/echo", "POST", [(b"content-length", str(size).encode())], end=False)
    sent = 0
    deadline = time.monotonic() + 20
    while sent < size:
        assert time.monotonic() < deadline
        room = min(client.conn.local_flow_control_window(sid), 16384, size - sent)
        if room <= 0:
            await client.read(lambda c: c.conn.local_flow_control_window(sid) > 0)
            continue
        client.conn.send_data(sid, upload[sent : sent + room], end_stream=sent + room == size)
        client.flush()
        sent += room
    await client.read(lambda c: c.ended(sid), timeout=20)
    head, body = client.response(sid)
    assert head[b":status"] == b"200" and body == upload
    big = 4 << 20
    head, body = await client.get(f"/big/{big}")
    assert head[b":status"] == b"200" and len(body) == big and body == pattern(0, big)
    client.close()


async def test_tls_listener_offers_h2_by_alpn_and_httpx_speaks_it(ns) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("app.test", "127.0.0.1")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(server)
    server.set_alpn_protocols(["h2", "http/1.1"])
    rig = await make_rig(ssl_context=server)
    try:
        verify = ssl.create_default_context()
        ca.configure_trust(verify)
        async with httpx.AsyncClient(
            http2=True, verify=verify, transport=httpx.AsyncHTTPTransport(http2=True, verify=verify)
        ) as client:
            for i in range(3):
                r = await client.get(
                    f"https://127.0.0.1:{rig.port}/hello", headers={"host": "app.test"}
                )
                assert r.http_version == "HTTP/2" and r.status_code == 200
                assert r.text == f"hello {i + 1}"
        # a client offering only http/1.1 gets HTTP/1.1 on the same listener
        async with httpx.AsyncClient(verify=verify) as client:
            r = await client.get(
                f"https://127.0.0.1:{rig.port}/hello", headers={"host": "app.test"}
            )
            assert r.http_version == "HTTP/1.1" and r.status_code == 200
    finally:
        await close_rig(rig)


async def test_http2_false_serves_http1_only(ns) -> None:
    rig = await make_rig(http2=False)
    try:
        client = await H2Client.open(rig.port)
        await client.read(lambda c: c.closed, timeout=5)
        assert not any(isinstance(e, h2.events.ResponseReceived) for e in client.events)
        async with httpx.AsyncClient() as http1:
            r = await http1.get(f"http://127.0.0.1:{rig.port}/hello", headers={"host": "app.test"})
            assert r.status_code == 200 and r.http_version == "HTTP/1.1"
    finally:
        await close_rig(rig)


async def test_h2c_and_http1_side_by_side_on_one_listener(rig: Rig) -> None:
    async with httpx.AsyncClient() as http1:
        r = await http1.get(f"http://127.0.0.1:{rig.port}/hello", headers={"host": "app.test"})
        assert r.status_code == 200 and r.http_version == "HTTP/1.1"
    async with httpx.AsyncClient(http1=False, http2=True) as h2c:  # prior knowledge
        r = await h2c.get(f"http://127.0.0.1:{rig.port}/hello", headers={"host": "app.test"})
        assert r.status_code == 200 and r.http_version == "HTTP/2"


async def raw_frames(client: H2Client, timeout: float = 10.0) -> list:
    """Every frame until EOF, parsed with hyperframe alone (h2's client state machine stops
    taking frames once it has seen a GOAWAY, and the point here is what comes after one);
    each DATA frame is acknowledged with WINDOW_UPDATEs, so the stream can go on."""
    reader = client.reader
    buf = bytes(client.conn.incoming_buffer._data)  # what h2 holds of a frame cut by a read
    frames = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "no EOF in time"
        try:
            data = await asyncio.wait_for(reader.read(65536), left)
        except ConnectionError:
            data = b""
        if not data:
            return frames
        buf += data
        while len(buf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(buf[:9]))
            if len(buf) < 9 + length:
                break
            frame.parse_body(memoryview(buf[9 : 9 + length]))
            frames.append(frame)
            if isinstance(frame, DataFrame) and frame.data:
                for stream_id in (0, frame.stream_id):
                    update = WindowUpdateFrame(stream_id)
                    update.window_increment = len(frame.data)
                    with contextlib.suppress(ConnectionError):  # the proxy may be done
                        client.writer.write(update.serialize())
            buf = buf[9 + length :]


async def test_drain_sends_goaway_with_the_last_stream_and_lets_it_finish(rig: Rig) -> None:
    client = await H2Client.open(rig.port)
    await client.get("/hello")
    size = 3 << 20
    sid = client.request(f"/big/{size}")
    # the client's window (64 KiB) holds the rest of the response at the proxy
    await client.read(lambda c: c.of(sid, h2.events.DataReceived))
    got = sum(len(e.data) for e in client.of(sid, h2.events.DataReceived))
    assert got < size
    rig.proxy.draining = True
    for conn in list(rig.proxy.clients):
        conn.drain()  # what the worker's drain does to every client
    frames = await raw_frames(client)
    [goaway] = [f for f in frames if isinstance(f, GoAwayFrame)]
    assert goaway.error_code == 0 and goaway.last_stream_id == sid
    after = frames[frames.index(goaway) + 1 :]
    data = [f for f in after if isinstance(f, DataFrame) and f.stream_id == sid]
    got += sum(len(f.data) for f in frames if isinstance(f, DataFrame) and f.stream_id == sid)
    assert data and "END_STREAM" in data[-1].flags  # the stream in flight finished
    assert got == size
    client.writer.write_eof()  # the proxy lingers for this, then closes
    await until_closed(rig)


async def until_closed(rig: Rig, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while rig.proxy.clients:
        assert time.monotonic() < deadline, "the proxy kept the connection"
        await asyncio.sleep(0.01)


def test_listener_http2_key_in_the_config() -> None:
    """``http2`` per listener: on by default, ``false`` turns it off, anything but a boolean
    is a problem naming the key (as check-config reports it)."""
    from proxy.config import ConfigError, parse

    base = '[listen]\naddress = "127.0.0.1:8080"\n{}\n[[routes]]\nhost = "a.example"\n'
    base += 'origins = ["http://127.0.2.1:9000"]\n'
    assert parse(base.format("")).listen[0].http2 is True
    assert parse(base.format("http2 = false")).listen[0].http2 is False
    with pytest.raises(ConfigError) as info:
        parse(base.format('http2 = "no"'), "t.toml")
    assert any("listen.http2" in p for p in info.value.problems), info.value.problems


async def test_a_preface_split_across_reads_is_still_http2(rig: Rig) -> None:
    """The preface may come in pieces; until it is whole (or not a preface) the connection
    is counted as a client like any other."""
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    piece = H2Client(reader, writer)
    piece.conn.initiate_connection()
    data = piece.conn.data_to_send()
    writer.write(data[:10])
    await writer.drain()
    deadline = time.monotonic() + 5
    while not rig.proxy.clients:  # counted (and header-timed) before it is known
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    writer.write(data[10:])
    head, body = await piece.get("/hello")
    assert head[b":status"] == b"200" and body.startswith(b"hello")
    assert len(rig.proxy.clients) == 1 and rig.proxy.stats.connections_total == 1
    piece.close()


async def test_bytes_that_only_start_like_the_preface_are_http1(rig: Rig) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    writer.write(b"PRI * HTTP/1.1\r\nHost: app.test\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(65536), 5)
    assert answer.startswith(b"HTTP/1.1 4"), answer[:40]
    writer.close()


async def test_refused_uploads_give_their_window_back(rig: Rig) -> None:
    """Uploads answered before they are read (no route: 421) must not eat the connection's
    flow-control window: after several of 40 KiB each, a normal upload still goes through."""
    client = await H2Client.open(rig.port)
    for _ in range(4):  # 4 x 40 KiB > the connection's 64 KiB window
        sid = client.request("/up", "POST", end=False, authority=b"nowhere.test")
        await client.send_all(sid, b"x" * 40000, end=True)
        await client.read(lambda c, s=sid: c.ended(s))
        assert client.response(sid)[0][b":status"] == b"421"
    sid = client.request("/echo", "POST", [(b"content-length", b"50000")], end=False)
    await client.send_all(sid, b"y" * 50000, end=True)
    await client.read(lambda c: c.ended(sid), timeout=10)
    head, body = client.response(sid)
    assert head[b":status"] == b"200" and body == b"y" * 50000
    client.close()
