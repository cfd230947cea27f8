"""The testbed's WebSocket echo origin: thousands of idle sessions for almost nothing.

``python -m testbed.wsorigin --listen 127.0.2.1:9000 --listen 127.0.2.2:9000`` prints
one JSON line ``{"event": "ready", ...}`` once every address listens, then echoes every
message of every session until SIGTERM/SIGINT.

Why it is built this way:

* **Raw asyncio Protocols, no streams, no ``websockets`` library.** An origin that costs
  more per session than the proxy would make the proxy's own figures unreadable on a 2-core
  machine; a Protocol with ``__slots__`` and wsproto's frame layer is a few hundred bytes of
  Python per idle session. wsproto's HTTP handshake object (an h11 connection) is dropped
  the moment the 101 is written: only the frame state lives on.
* **Many listen addresses per process, SO_REUSEPORT on each.** K origin addresses cost one
  process, and big runs start several processes on the same addresses: the kernel spreads
  the connections, each process stays under the open-file cap.
* **Plain HTTP GET answers 200** with the live session count, so a health check (or a
  person with curl) can see the origin without speaking WebSocket.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

Address = tuple[str, int]

MAX_HEAD = 16384  # a request head longer than this is not a client of ours
BACKLOG = 65535  # clamped by net.core.somaxconn, which the testbed raises in its namespace


def parse_address(text: str) -> Address:
    """``IP:PORT`` (``[v6]:PORT`` too): numeric, because a testbed must not depend on DNS."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r}: expected IP:PORT")
    return host.strip("[]"), int(port)


OPENS_BUCKET = 0.5  # seconds: the new-session rate is reported per half second


class OriginStats:
    """Counters shared by every connection of one process (read by the health answer)."""

    __slots__ = ("closed", "connections", "messages", "opens", "sessions", "sessions_total")

    def __init__(self) -> None:
        self.connections = 0  # TCP connections open now
        self.sessions = 0  # WebSocket sessions open now
        self.sessions_total = 0
        self.messages = 0
        self.closed = 0
        # new sessions per bucket of the system-wide monotonic clock (index = t // 0.5): the
        # buckets of every origin process line up, so the testbed can add them
        self.opens: dict[int, int] = {}

    def opened(self) -> None:
        self.sessions += 1
        self.sessions_total += 1
        bucket = int(time.monotonic() // OPENS_BUCKET)
        self.opens[bucket] = self.opens.get(bucket, 0) + 1

    def take_opens(self, before: int) -> dict[int, int]:
        """The buckets that ended before bucket ``before``, removed (each reported once)."""
        done = {k: v for k, v in self.opens.items() if k < before}
        for k in done:
            del self.opens[k]
        return done

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__ if name != "opens"}


class EchoProtocol(asyncio.Protocol):
    """One client connection: an HTTP head, then either a health answer or a WebSocket echo.

    State is four slots; the head buffer is dropped once the head is read, the handshake
    object once the 101 is sent.
    """

    __slots__ = ("conn", "head", "registry", "stats", "transport")

    def __init__(self, stats: OriginStats, registry: set[EchoProtocol] | None = None) -> None:
        self.stats = stats
        self.registry = registry  # where the origin finds us again to abort us on shutdown
        if registry is not None:
            registry.add(self)
        self.transport: asyncio.Transport | None = None
        self.head: bytes | None = b""
        self.conn: Connection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.stats.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.connections -= 1
        if self.conn is not None:
            self.stats.sessions -= 1
            self.stats.closed += 1
            self.conn = None
        self.transport = None
        if self.registry is not None:
            self.registry.discard(self)

    def pause_writing(self) -> None:
        # a peer that does not read gets no more echoes: stop reading what it sends, so
        # memory stays bounded by the transport's high-water mark
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.conn is not None:
            self._frames(data)
            return
        if self.head is None:
            return  # a health answer is on its way out; ignore the rest
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > MAX_HEAD:
                self._http(431, b"request head too large\n")
            return
        head, rest = self.head[: end + 4], self.head[end + 4 :]
        self.head = None
        if _is_upgrade(head):
            self._upgrade(head, rest)
        else:
            body = json.dumps({"ok": True, "pid": os.getpid(), **self.stats.as_dict()})
            self._http(200, body.encode() + b"\n", b"application/json")

    def eof_received(self) -> bool:
        return False  # close our side too: an echo has nothing to send after the peer's FIN

    def _http(self, status: int, body: bytes, ctype: bytes = b"text/plain") -> None:
        assert self.transport is not None
        reason = {200: b"OK", 400: b"Bad Request", 431: b"Request Header Fields Too Large"}
        self.head = None
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s"
            % (status, reason.get(status, b"Error"), ctype, len(body), body)
        )
        self.transport.close()

    def _upgrade(self, head: bytes, rest: bytes) -> None:
        assert self.transport is not None
        handshake = H11Handshake(ConnectionType.SERVER)
        try:
            handshake.receive_data(head)
            request = next((e for e in handshake.events() if isinstance(e, Request)), None)
        except RemoteProtocolError as e:
            self._http(400, f"bad WebSocket handshake: {e}\n".encode())
            return
        if request is None:
            self._http(400, b"bad WebSocket handshake\n")
            return
        subprotocol = request.subprotocols[0] if request.subprotocols else None
        self.transport.write(handshake.send(AcceptConnection(subprotocol=subprotocol)))
        self.conn = handshake.connection
        self.stats.opened()
        if rest:
            self._frames(rest)

    def _frames(self, data: bytes) -> None:
        conn, transport = self.conn, self.transport
        assert conn is not None and transport is not None
        out = b""
        try:
            conn.receive_data(data)
            for event in conn.events():
                if isinstance(event, TextMessage | BytesMessage):
                    self.stats.messages += event.message_finished
                    kind = type(event)
                    out += conn.send(kind(data=event.data, message_finished=event.message_finished))
                elif isinstance(event, Ping):
                    out += conn.send(event.response())
                elif isinstance(event, CloseConnection):
                    if conn.state is ConnectionState.REMOTE_CLOSING:
                        out += conn.send(event.response())
                    transport.write(out)
                    transport.close()
                    return
        except RemoteProtocolError:
            # a broken frame: tell the peer why (1002) and drop the connection
            with contextlib.suppress(Exception):
                out += conn.send(CloseConnection(code=1002, reason="protocol error"))
            transport.write(out)
            transport.close()
            return
        if out:
            transport.write(out)


def _is_upgrade(head: bytes) -> bool:
    """A WebSocket handshake names ``websocket`` in its Upgrade header; nothing else does."""
    for line in head.lower().split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip() == b"upgrade" and b"websocket" in value:
            return True
    return False


def listen_socket(address: Address, reuse_port: bool = True) -> socket.socket:
    """A listening socket; SO_REUSEPORT so several origin processes can share the address."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class EchoOrigin:
    """Every listen address of one process, and the connections they accepted."""

    def __init__(self) -> None:
        self.stats = OriginStats()
        self.servers: list[asyncio.base_events.Server] = []
        self.addresses: list[Address] = []
        self._protocols: set[EchoProtocol] = set()

    def _factory(self) -> EchoProtocol:
        return EchoProtocol(self.stats, self._protocols)

    async def start(self, addresses: Sequence[Address], reuse_port: bool = True) -> None:
        loop = asyncio.get_running_loop()
        for address in addresses:
            sock = listen_socket(address, reuse_port)
            server = await loop.create_server(self._factory, sock=sock, backlog=BACKLOG)
            self.servers.append(server)
            self.addresses.append(sock.getsockname()[:2])

    async def close(self) -> None:
        """Stop listening and drop every connection at once (RST: no TIME_WAIT left behind)."""
        for server in self.servers:
            server.close()
        for proto in list(self._protocols):
            if proto.transport is not None:
                proto.transport.abort()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        self.servers.clear()


def emit(event: str, **fields: object) -> None:
    """One JSON line on stdout, flushed: the testbed synchronises on these."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def report_opens(stats: OriginStats) -> None:
    """``{"event": "opens", "buckets": {index: n}}`` for every half second that ended with
    new sessions: the rate this origin saw, from its own side (a proxy's figures could not
    show what nginx or HAProxy sent where)."""
    for _ in range(10**8):  # bounded; cancelled at the stop
        now = time.monotonic()
        await asyncio.sleep(OPENS_BUCKET - now % OPENS_BUCKET + 0.01)  # a report rate
        done = stats.take_opens(int(time.monotonic() // OPENS_BUCKET))
        if done:
            emit("opens", buckets={str(k): v for k, v in sorted(done.items())})


async def _main(addresses: Sequence[Address], reuse_port: bool, opens: bool = False) -> int:
    origin = EchoOrigin()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await origin.start(addresses, reuse_port)
    except OSError as e:
        emit("error", error=str(e), errno=e.errno)
        return 1
    emit(
        "ready",
        pid=os.getpid(),
        listen=[f"{host}:{port}" for host, port in origin.addresses],
    )
    reporter = loop.create_task(report_opens(origin.stats)) if opens else None
    await stop.wait()
    if reporter is not None:
        reporter.cancel()
    stats = origin.stats.as_dict()
    await origin.close()
    emit("stopped", pid=os.getpid(), **stats)
    return 0


def run(runner: Callable[..., int] | None = None, argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.wsorigin",
        description="WebSocket echo origin for the testbed (health: plain GET answers 200).",
    )
    parser.add_argument(
        "--listen",
        action="append",
        required=True,
        metavar="IP:PORT",
        help="an address to listen on; repeat or comma-separate for more",
    )
    parser.add_argument(
        "--no-reuse-port", action="store_true", help="refuse to share an address with others"
    )
    parser.add_argument(
        "--report-opens",
        action="store_true",
        help=f"a JSON line per {OPENS_BUCKET:g} s with the new sessions it saw (the testbed's)",
    )
    args = parser.parse_args(argv)
    try:
        addresses = [parse_address(a) for item in args.listen for a in item.split(",") if a]
    except ValueError as e:
        parser.error(str(e))
    if runner is None:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
    return int(runner(_main(addresses, not args.no_reuse_port, args.report_opens)))


if __name__ == "__main__":
    sys.exit(run())
