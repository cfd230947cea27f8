"""PROXY protocol and per-client limits through a real ``originpool serve`` in a namespace:
curl's ``--haproxy-protocol``, a v2 header built here, an untrusted sender, and the limits
answered 429 with Retry-After or reset at accept, each counted in /metrics."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from proxy.proxy_protocol import build_v1, build_v2
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
