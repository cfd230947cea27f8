"""pool.turnwrite: small writes of one loop turn leave together at its end, in order, never
after the FIN, and bulk writes go at once (flow control sees them as before)."""

from __future__ import annotations

import asyncio
import socket

from pool import turnwrite


class Owner:
    """A protocol-side owner of a real socket transport, as Downstream and
    UpstreamConnection are; counts the transport writes it causes."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.held = b""
        self.transport: asyncio.WriteTransport | None = transport
        self.sends = 0
        real = transport.write

        def counting(data: bytes) -> None:
            self.sends += 1
            real(data)

        transport.write = counting  # type: ignore[method-assign]


async def pair() -> tuple[Owner, socket.socket]:
    """A real connected socket pair: our end under an asyncio transport, theirs blocking."""
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    theirs.settimeout(5)
    return Owner(transport), theirs  # type: ignore[arg-type]


def read_until_eof(sock: socket.socket) -> bytes:
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


def test_small_writes_of_one_turn_leave_in_one_send() -> None:
    async def main() -> None:
        owner, peer = await pair()
        for i in range(10):
            turnwrite.write(owner, b"%d," % i)
        assert owner.sends == 0  # held until the end of the turn
        await asyncio.sleep(0)  # one turn: the flush runs
        assert owner.sends == 1
        assert peer.recv(100) == b"0,1,2,3,4,5,6,7,8,9,"
        owner.transport.close()  # type: ignore[union-attr]
        peer.close()

    asyncio.run(main())


def test_bytes_never_overtake_close_or_bulk() -> None:
    """close() after a held write, and a bulk write after held ones: order kept."""

    async def main() -> None:
        owner, peer = await pair()
        turnwrite.write(owner, b"head;")
        big = b"x" * turnwrite.BULK
        turnwrite.write(owner, big)  # bulk: the held bytes go first, then this, at once
        assert owner.sends == 2 and not owner.held
        turnwrite.write(owner, b";tail")
        assert turnwrite.write_eof(owner)  # the held tail goes before the FIN
        owner.transport.close()  # type: ignore[union-attr]
        await asyncio.sleep(0)
        data = await asyncio.to_thread(read_until_eof, peer)
        assert data == b"head;" + big + b";tail"
        peer.close()

    asyncio.run(main())


def test_held_bytes_stay_bounded() -> None:
    """Many small writes in one turn: once they reach BULK they are sent, not held."""

    async def main() -> None:
        owner, peer = await pair()
        piece = b"y" * 1000
        for _ in range(100):
            turnwrite.write(owner, piece)
            assert len(owner.held) < turnwrite.BULK
        await asyncio.sleep(0)
        owner.transport.close()  # type: ignore[union-attr]
        data = await asyncio.to_thread(read_until_eof, peer)
        assert data == piece * 100
        peer.close()

    asyncio.run(main())


def test_a_closed_transport_gets_nothing_and_loops_are_apart() -> None:
    async def one_loop() -> None:
        owner, peer = await pair()
        turnwrite.write(owner, b"lost")
        owner.transport.abort()  # type: ignore[union-attr]  # abort drops what is buffered
        await asyncio.sleep(0)
        assert owner.sends == 0
        peer.close()

    asyncio.run(one_loop())
    asyncio.run(one_loop())  # a new loop gets its own flush, nothing left from the last one
    assert not turnwrite._turns


def test_without_a_running_loop_writes_at_once() -> None:
    class Direct:
        held = b""

        def __init__(self) -> None:
            self.transport = self
            self.sent: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.sent.append(data)

        def is_closing(self) -> bool:
            return False

    owner = Direct()
    turnwrite.write(owner, b"now")  # type: ignore[arg-type]
    assert owner.sent == [b"now"]


def test_write_now_sends_after_what_was_held() -> None:
    """The tunnel's path: no waiting, and never ahead of bytes already held (a Close frame)."""

    async def main() -> None:
        owner, peer = await pair()
        turnwrite.write(owner, b"held;")
        turnwrite.write_now(owner, b"now")
        assert owner.sends == 2 and not owner.held
        assert peer.recv(100) == b"held;now"
        owner.transport.close()  # type: ignore[union-attr]
        peer.close()

    asyncio.run(main())
