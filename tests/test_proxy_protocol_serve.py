"""PROXY protocol and per-client limits through a real ``originpool serve`` in a namespace:
curl's ``--haproxy-protocol``, a v2 header built here, an untrusted sender, and the limits
answered 429 with Retry-After or reset at accept, each counted in /metrics."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
import trustme

from proxy.proxy_protocol import ProxyHeader, build_v1, build_v2, parse
from tests.http_origin import TestOrigin
from tests.test_serve import Proc

CONFIG = """
[[listen]]
address = "127.0.0.1:8080"
proxy_protocol = true
[[listen]]
address = "127.0.0.1:8081"
[admin]
address = "127.0.0.1:9090"
[egress]
addresses = ["127.0.1.1"]
[[routes]]
host = "app.example"
origins = ["http://127.0.2.1:9000"]
[limits]
conn_per_ip = 3
rate_per_ip = 0.1
rate_burst = 4
websocket_rate_per_ip = "6r/m"
websocket_burst = 1
[proxy]
trusted_proxies = ["127.0.0.1/32"]
[timeouts]
drain = 2
[log]
format = "json"
"""

GET = b"GET /hello HTTP/1.1\r\nHost: app.example\r\n\r\n"
WS = (
    b"GET /chat HTTP/1.1\r\nHost: app.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.fixture
async def served(ns: object, tmp_path: Path):  # type: ignore[no-untyped-def]
    origin = TestOrigin()
    await origin.start("127.0.2.1", 9000)
    path = tmp_path / "originpool.toml"
    path.write_text(CONFIG)
    proc = Proc(path)
    try:
        await asyncio.to_thread(proc.wait_for, "ready")
        yield proc, origin
    finally:
        assert await asyncio.to_thread(proc.stop) == 0
        await origin.close()


async def exchange(
    port: int, data: bytes, source: str = "127.0.0.1", keep: bool = False
) -> tuple[bytes, socket.socket | None]:
    """``data`` on a new connection from ``source``; the response head (and body) as read
    within a deadline, b"" for a reset. ``keep``: return the socket open after one response."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    out = b""
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, data)
        async with asyncio.timeout(10):
            while b"\r\n\r\n" not in out or not _whole(out):
                chunk = await loop.sock_recv(sock, 65536)
                if not chunk:
                    break
                out += chunk
    except (ConnectionResetError, BrokenPipeError):
        out = b""
    if keep and out:
        return out, sock
    sock.close()
    return out, None


def _whole(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    return m is not None and len(body) >= int(m.group(1))


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response else 0


def header(response: bytes, name: bytes) -> bytes | None:
    m = re.search(rb"(?im)^" + name + rb": *([^\r]*)\r$", response.partition(b"\r\n\r\n")[0])
    return m.group(1) if m else None


def xff(origin: TestOrigin) -> bytes | None:
    return dict(origin.last_headers).get(b"x-forwarded-for")


async def metrics() -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get("http://127.0.0.1:9090/metrics")).text


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_curl_haproxy_protocol_and_without_it(served) -> None:  # type: ignore[no-untyped-def]
    proc, origin = served
    out = await asyncio.to_thread(
        subprocess.run,
        [
            "curl",
            "-sS",
            "--haproxy-protocol",
            "-H",
            "Host: app.example",
            "http://127.0.0.1:8080/hello",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and out.stdout.startswith("hello"), out
    assert xff(origin) == b"127.0.0.1"
    bare = await asyncio.to_thread(
        subprocess.run,
        ["curl", "-sS", "-H", "Host: app.example", "http://127.0.0.1:8080/hello"],
        capture_output=True,
        text=True,
    )
    assert bare.returncode != 0  # reset: a request without the header is never served
    line = await asyncio.to_thread(proc.wait_for, "proxy_protocol_refused")
    assert line["reason"] == "signature"
    assert 'originpool_proxy_protocol_refused_total{reason="signature"} 1' in await metrics()


async def test_v2_header_names_the_client_everywhere(served) -> None:  # type: ignore[no-untyped-def]
    proc, origin = served
    head = build_v2(("203.0.113.7", 40000), ("198.51.100.1", 443))
    out, _ = await exchange(8080, head + GET)
    assert status(out) == 200
    assert xff(origin) == b"203.0.113.7"
    access = await asyncio.to_thread(proc.wait_for, "access")
    assert access["client"] == "203.0.113.7"
    v1, _ = await exchange(8080, build_v1(("2001:db8::5", 1), ("2001:db8::1", 80)) + GET)
    assert status(v1) == 200 and xff(origin) == b"2001:db8::5"


async def test_untrusted_sender_is_reset_counted_logged(served) -> None:  # type: ignore[no-untyped-def]
    proc, origin = served
    head = build_v2(("203.0.113.7", 40000), ("198.51.100.1", 443))
    out, _ = await exchange(8080, head + GET, source="127.0.0.2")
    assert out == b""
    line = await asyncio.to_thread(proc.wait_for, "proxy_protocol_refused")
    assert line["reason"] == "untrusted" and line["peer"].startswith("127.0.0.2:")
    assert 'originpool_proxy_protocol_refused_total{reason="untrusted"} 1' in await metrics()
    assert not origin.connections


async def test_rate_limit_429_retry_after_per_proxied_address(served) -> None:  # type: ignore[no-untyped-def]
    _proc, origin = served
    a = build_v1(("192.0.2.10", 1), ("127.0.0.1", 8080))
    b = build_v1(("192.0.2.11", 1), ("127.0.0.1", 8080))
    answers = [status((await exchange(8080, a + GET))[0]) for _ in range(4)]
    assert answers == [200] * 4  # the burst
    refused, _ = await exchange(8080, a + GET)
    assert status(refused) == 429
    assert 1 <= int(header(refused, b"retry-after") or b"0") <= 10  # one token per 10 s
    assert status((await exchange(8080, b + GET))[0]) == 200  # another client, its own bucket
    text = await metrics()
    assert 'originpool_limited_total{kind="rate"} 1' in text
    served_requests = sum(len(c.requests) for c in origin.connections)
    assert served_requests == 5  # the 429 never reached the origin


async def test_rate_limit_keys_on_a_trusted_proxys_x_forwarded_for(served) -> None:  # type: ignore[no-untyped-def]
    """From 127.0.0.1 (trusted) each X-Forwarded-For client has its own bucket; from an
    untrusted peer the header is ignored and the peer's bucket is used."""
    _proc, _origin = served

    def via(client: bytes) -> bytes:
        return GET.replace(b"\r\n\r\n", b"\r\nX-Forwarded-For: " + client + b"\r\n\r\n")

    for client in (b"198.51.100.20", b"198.51.100.21"):
        got = [status((await exchange(8081, via(client)))[0]) for _ in range(5)]
        assert got == [200, 200, 200, 200, 429], client
    spoofed = [
        status((await exchange(8081, via(b"198.51.100.%d" % i), source="127.0.0.7"))[0])
        for i in range(30, 35)
    ]
    assert spoofed == [200, 200, 200, 200, 429]  # one bucket: 127.0.0.7's


async def test_conn_limit_resets_the_extra_connection(served) -> None:  # type: ignore[no-untyped-def]
    _proc, _origin = served
    held = []
    for i in range(3):
        out, sock = await exchange(8081, GET, source="127.0.0.3", keep=True)
        assert status(out) == 200, i
        held.append(sock)
    extra, _ = await exchange(8081, GET, source="127.0.0.3")
    assert extra == b""
    other, _ = await exchange(8081, GET, source="127.0.0.4")
    assert status(other) == 200
    assert 'originpool_limited_total{kind="conn"} 1' in await metrics()
    for sock in held:
        assert sock is not None
        sock.close()
    # the closes reach the proxy: a fourth connection from .3 is let in within a deadline
    async with asyncio.timeout(10):
        while True:
            again, _ = await exchange(8081, GET, source="127.0.0.3")
            if status(again) == 200:
                break
            await asyncio.sleep(0.05)


async def test_websocket_handshake_rate(served) -> None:  # type: ignore[no-untyped-def]
    _proc, _origin = served
    first, _ = await exchange(8081, WS, source="127.0.0.5")
    assert status(first) not in (0, 429)  # the origin is no WebSocket server: 502, not ours
    second, _ = await exchange(8081, WS, source="127.0.0.5")
    assert status(second) == 429
    assert 1 <= int(header(second, b"retry-after") or b"0") <= 10
    assert 'originpool_limited_total{kind="websocket"} 1' in await metrics()


class HeaderHTTPOrigin:
    """An origin behind ``send_proxy_protocol``: reads the PROXY header, then answers each
    request head with 200 "ok" (keep-alive), recording the header of every connection."""

    def __init__(self) -> None:
        self.headers: list[ProxyHeader] = []
        self.requests = 0
        self.server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        try:
            while not isinstance(header := parse(data), ProxyHeader):
                chunk = await reader.read(4096)
                if not chunk:
                    return
                data += chunk
            self.headers.append(header)
            data = data[header.length :]
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = await reader.read(4096)
                    if not chunk:
                        return
                    data += chunk
                data = data.split(b"\r\n\r\n", 1)[1]
                self.requests += 1
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


SEND_PROXY = """
[[listen]]
address = "127.0.0.1:8080"
proxy_protocol = true
[[listen]]
address = "127.0.0.1:8443"
proxy_protocol = true
tls_cert = "{cert}"
tls_key = "{key}"
[admin]
address = "127.0.0.1:9090"
[egress]
addresses = ["127.0.1.1"]
[[routes]]
host = "app.example"
origins = ["http://127.0.2.3:9000"]
send_proxy_protocol = "v2"
[[routes]]
host = "plain.example"
origins = ["http://127.0.2.1:9000"]
[timeouts]
drain = 2
[log]
format = "json"
"""


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_tls_listener_and_send_proxy_to_the_origin(ns: object, tmp_path: Path) -> None:
    """A TLS listener with proxy_protocol: curl's header, then its ClientHello, is served;
    a send_proxy_protocol route's origin gets the client's address in a v2 header on a
    connection of its own per request, while another route keeps its keep-alive pool."""
    ca = trustme.CA()
    cert = ca.issue_cert("app.example")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "both.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    header_origin, plain = HeaderHTTPOrigin(), TestOrigin()
    await header_origin.start("127.0.2.3", 9000)
    await plain.start("127.0.2.1", 9000)
    path = tmp_path / "originpool.toml"
    pem = str(tmp_path / "both.pem")
    path.write_text(SEND_PROXY.format(cert=pem, key=pem))
    proc = Proc(path)
    try:
        await asyncio.to_thread(proc.wait_for, "ready")
        url = "https://app.example:8443/hello"
        out = await asyncio.to_thread(
            subprocess.run,
            [
                "curl",
                "-sS",
                "--haproxy-protocol",
                "--cacert",
                str(tmp_path / "ca.pem"),
                "--resolve",
                "app.example:8443:127.0.0.1",
                url,
            ],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0 and out.stdout == "ok", out
        assert header_origin.headers[0].source is not None
        assert header_origin.headers[0].source[0] == "127.0.0.1"  # curl's own, through TLS
        # two requests on one client connection, with a header naming 203.0.113.9
        front = build_v2(("203.0.113.9", 5555), ("198.51.100.1", 443))
        two = front + GET + GET
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", 8080))
        await loop.sock_sendall(sock, two)
        got = b""
        async with asyncio.timeout(10):
            while got.count(b"\r\nok") + got.count(b"\n\nok") < 2:
                chunk = await loop.sock_recv(sock, 65536)
                assert chunk, got
                got += chunk
        sock.close()
        later = header_origin.headers[1:]
        assert [(h.source, h.destination) for h in later] == [
            (("203.0.113.9", 5555), ("198.51.100.1", 443))
        ] * 2  # one origin connection per request: never reused for another
        # the other route: one pooled connection for both requests
        plain_get = GET.replace(b"app.example", b"plain.example")
        out2, _ = await exchange(8080, front + plain_get + plain_get)
        assert status(out2) == 200
        assert len(plain.connections) == 1
    finally:
        assert await asyncio.to_thread(proc.stop) == 0
        await header_origin.close()
        await plain.close()


async def test_reload_turns_both_on_for_new_connections(ns: object, tmp_path: Path) -> None:
    """SIGHUP with proxy_protocol and a rate set where there were none: the next connection
    must bring a header and the next requests meet the bucket; a connection open across the
    reload keeps being served as it began."""
    origin = TestOrigin()
    await origin.start("127.0.2.1", 9000)
    path = tmp_path / "originpool.toml"
    before = CONFIG.replace("proxy_protocol = true\n", "").split("[limits]")[0]
    path.write_text(before + '[timeouts]\ndrain = 2\n[log]\nformat = "json"\n')
    proc = Proc(path)
    try:
        await asyncio.to_thread(proc.wait_for, "ready")
        first, kept = await exchange(8080, GET, keep=True)
        assert status(first) == 200 and kept is not None
        assert "originpool_limited_total" not in await metrics()  # off: not even rendered
        path.write_text(CONFIG.replace("rate_burst = 4", "rate_burst = 2"))
        os.kill(proc.p.pid, signal.SIGHUP)
        await asyncio.to_thread(proc.wait_for, "reloaded")
        bare, _ = await exchange(8080, GET)
        assert bare == b""  # a header is required from now on
        head = build_v1(("192.0.2.20", 1), ("127.0.0.1", 8080))
        got = [status((await exchange(8080, head + GET))[0]) for _ in range(3)]
        assert got == [200, 200, 429]
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(kept, GET)  # began without a header: still served
        again = b""
        async with asyncio.timeout(10):
            while not _whole(again):
                chunk = await loop.sock_recv(kept, 65536)
                assert chunk
                again += chunk
        assert status(again) in (200, 429)  # its address (127.0.0.1) now has a bucket too
        kept.close()
    finally:
        code = await asyncio.to_thread(proc.stop)
        await origin.close()
    assert code == 0, [ln for ln in proc.lines if ln.get("level") in ("error", "critical")]
