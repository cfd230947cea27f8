"""The gate between accept() and the protocol, on real loopback sockets in a namespace: the
header read off the bare socket (in pieces, then exactly its length), what follows left in
the kernel, and every refusal a reset, counted by reason."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from proxy.limits import ClientLimits, LimitSettings
from proxy.proxy_accept import Gate, preamble
from proxy.proxy_protocol import ProxyHeader, build_v1, build_v2

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
ELSEWHERE = (ipaddress.ip_network("192.0.2.0/24"),)


@dataclass
class Settings:
    trusted_proxies: tuple[ipaddress.IPv4Network, ...]
    header_timeout: float


@dataclass
class Owner:
    settings: Settings
    limits: ClientLimits | None = None


class Bench:
    """A listening socket whose accepted connections go through a Gate."""

    def __init__(self, trusted: tuple[ipaddress.IPv4Network, ...], timeout: float = 2.0) -> None:
        self.loop = asyncio.get_running_loop()
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.setblocking(False)
        self.address = self.lsock.getsockname()
        self.started: asyncio.Queue[tuple[socket.socket, tuple[str, int] | None]] = asyncio.Queue()
        self.owner = Owner(Settings(trusted, timeout))
        self.gate = Gate(self._start, self.owner)
        self.keys: list[bytes | None] = []
        self.loop.add_reader(self.lsock.fileno(), self._accept)

    def _start(self, sock: socket.socket, header: ProxyHeader | None, key: bytes | None) -> None:
        self.keys.append(key)
        self.started.put_nowait((sock, header.source if header is not None else None))

    def _accept(self) -> None:
        conn, addr = self.lsock.accept()
        conn.setblocking(False)
        self.gate.admit(self.loop, conn, addr, True)

    async def client(self, *pieces: bytes) -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await self.loop.sock_connect(sock, self.address)
            for piece in pieces:
                await self.loop.sock_sendall(sock, piece)
                await asyncio.sleep(0)  # a loop turn between pieces: separate reads, mostly
        except (ConnectionResetError, BrokenPipeError):
            pass  # refused before we were done: refused() reads the same from here
        return sock

    async def refused(self, sock: socket.socket) -> None:
        """The client sees the reset (or EOF) within a deadline."""
        async with asyncio.timeout(5):
            try:
                data = await self.loop.sock_recv(sock, 100)
            except OSError:  # reset
                return
        assert data == b"", data

    def close(self) -> None:
        self.loop.remove_reader(self.lsock.fileno())
        self.lsock.close()
        self.gate.close()


@pytest.fixture
async def bench(ns: object) -> AsyncIterator[Bench]:
    b = Bench(LOOPBACK)
    yield b
    b.close()


async def _started(bench: Bench) -> tuple[socket.socket, tuple[str, int] | None]:
    async with asyncio.timeout(5):
        return await bench.started.get()


@pytest.mark.parametrize("build", [build_v1, build_v2])
async def test_header_in_pieces_then_the_rest_left_in_the_kernel(
    bench: Bench, build: object
) -> None:
    assert callable(build)
    header = build(("203.0.113.7", 40000), ("198.51.100.1", 443))
    payload = b"\x16\x03\x01 or GET / HTTP/1.1\r\n\r\n"
    client = await bench.client(header[:5], header[5:9], header[9:] + payload)
    sock, source = await _started(bench)
    assert source == ("203.0.113.7", 40000)
    loop = asyncio.get_running_loop()
    got = b""
    async with asyncio.timeout(5):
        while len(got) < len(payload):
            got += await loop.sock_recv(sock, 100)
    assert got == payload  # not one byte of it taken with the header
    sock.close()
    client.close()
    assert not bench.gate.pending


async def test_local_command_keeps_the_socket_peer(bench: Bench) -> None:
    client = await bench.client(build_v2(None, None))
    sock, source = await _started(bench)
    assert source is None
    sock.close()
    client.close()


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "signature"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n", "address"),
        (b"PROXY " + b"x" * 200, "too_long"),
        (b"\r\n\r\n\x00\r\nQUIT\n\x22\x11\x00\x0c" + bytes(12), "command"),
    ],
)
async def test_malformed_is_reset_and_counted(bench: Bench, wire: bytes, reason: str) -> None:
    client = await bench.client(wire)
    await bench.refused(client)
    client.close()
    assert bench.gate.refused[reason] == 1
    assert bench.started.empty() and not bench.gate.pending


async def test_eof_before_a_whole_header(bench: Bench) -> None:
    client = await bench.client(b"PROXY TCP4 1.2")
    client.shutdown(socket.SHUT_WR)
    await bench.refused(client)
    client.close()
    assert bench.gate.refused["eof"] == 1


async def test_untrusted_peer_is_reset_before_reading(ns: object) -> None:
    bench = Bench(ELSEWHERE)
    try:
        client = await bench.client(build_v2(("203.0.113.7", 1), ("127.0.0.1", 80)))
        await bench.refused(client)
        client.close()
        assert bench.gate.refused["untrusted"] == 1 and bench.started.empty()
    finally:
        bench.close()


async def test_no_header_within_the_timeout(ns: object) -> None:
    bench = Bench(LOOPBACK, timeout=0.2)
    try:
        client = await bench.client(b"PROXY TCP4")
        await bench.refused(client)
        client.close()
        assert bench.gate.refused["timeout"] == 1
    finally:
        bench.close()


async def test_conn_limit_counts_the_headers_address(bench: Bench) -> None:
    limits = bench.owner.limits = ClientLimits(LimitSettings(conn_per_ip=2))
    header = build_v1(("203.0.113.7", 1), ("127.0.0.1", 80))
    kept = [await bench.client(header) for _ in range(2)]
    accepted = [await _started(bench) for _ in range(2)]
    third = await bench.client(header)
    await bench.refused(third)
    other = await bench.client(build_v1(("203.0.113.8", 1), ("127.0.0.1", 80)))
    accepted.append(await _started(bench))
    assert limits.limited["conn"] == 1
    assert limits.conns == {b"203.0.113.7": 2, b"203.0.113.8": 1}
    assert bench.keys == [b"203.0.113.7", b"203.0.113.7", b"203.0.113.8"]
    for sock, _ in accepted:
        sock.close()
    for sock in [*kept, third, other]:
        sock.close()


def test_preamble_for_an_origin() -> None:
    """send_proxy_protocol's header: the client and the address it reached; without a
    destination from a header in front, the client socket's own, and LOCAL when unknown."""

    class Transport:
        def get_extra_info(self, name: str) -> object:
            return ("127.0.0.1", 8080) if name == "sockname" else None

    v2 = preamble("v2", ("203.0.113.7", 1), ("198.51.100.1", 443), None)
    assert v2 == build_v2(("203.0.113.7", 1), ("198.51.100.1", 443))
    v1 = preamble("v1", ("203.0.113.7", 1), None, Transport())
    assert v1 == b"PROXY TCP4 203.0.113.7 127.0.0.1 1 8080\r\n"
    assert preamble("v2", ("203.0.113.7", 1), None, object()) == build_v2(None, None)
