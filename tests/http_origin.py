"""A real HTTP/1.1 origin for tests (h11 on asyncio) and a minimal client exchange over a
pooled :class:`pool.origin.UpstreamConnection`.

The origin records every connection it accepted and every request per connection, so tests
can tell reuse from reconnects by what the far end saw, not by the pool's own counters.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

import h11

from pool.origin import OriginPool, UpstreamConnection


@dataclass
class Seen:
    peer: tuple
    requests: list[str] = field(default_factory=list)
    server_name: str | None = None


class TestOrigin:
    """``GET /hello`` keep-alive 200, ``GET /close`` answers with Connection: close."""

    __test__ = False

    def __init__(self) -> None:
        self.connections: list[Seen] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.base_events.Server | None = None
        self.sni: list[str | None] = []
        self.last_headers: list = []
        self.disconnects: asyncio.Queue[tuple] = asyncio.Queue()

    async def start(self, host: str, port: int, ssl_ctx: ssl.SSLContext | None = None) -> None:
        if ssl_ctx is not None:
            ssl_ctx.sni_callback = lambda obj, name, ctx: self.sni.append(name)  # type: ignore[assignment]
        self.server = await asyncio.start_server(self._serve, host, port, ssl=ssl_ctx)

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def close_idle_connections(self) -> None:
        """The origin ends its keep-alive connections, as a real server's idle timeout does."""
        for w in self.writers:
            w.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = Seen(writer.get_extra_info("peername"))
        self.connections.append(seen)
        self.writers.append(writer)
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = bytearray()
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    if not data:
                        break
                    continue
                if isinstance(event, h11.Request):
                    request = event
                    body.clear()
                    seen.requests.append(event.target.decode())
                    self.last_headers = list(event.headers)
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    await self._respond(conn, writer, request, bytes(body), len(seen.requests))
                    if conn.our_state is h11.MUST_CLOSE:
                        break
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    break
        except (ConnectionError, h11.RemoteProtocolError):
            pass
        finally:
            writer.close()
            self.disconnects.put_nowait(seen.peer)

    async def _respond(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        request: h11.Request,
        body: bytes,
        n: int,
    ) -> None:
        target = request.target.decode()
        if target == "/slow":
            await asyncio.Event().wait()  # never answers: the proxy's timeout must fire
        if target.startswith("/big/"):
            size = int(target.rsplit("/", 1)[1])
            writer.write(conn.send(h11.Response(status_code=200, headers=[])))  # chunked
            sent = 0
            while sent < size:
                chunk = pattern(sent, min(65536, size - sent))
                writer.write(conn.send(h11.Data(data=chunk)))
                sent += len(chunk)
                await writer.drain()
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            return
        payload = body if target.startswith("/echo") else f"hello {n}".encode()
        headers = [("content-length", str(len(payload)))]
        if target == "/close":
            headers.append(("connection", "close"))
        writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
        if request.method != b"HEAD":  # h11 refuses a body after a HEAD's head, rightly
            writer.write(conn.send(h11.Data(data=payload)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()


def pattern(offset: int, size: int) -> bytes:
    """Position-dependent bytes: a dropped, duplicated or reordered chunk changes them."""
    start = offset % 256
    return (bytes(range(256)) * (size // 256 + 2))[start : start + size]


class Exchange:
    """One request/response over a pooled connection, read with h11 through the handler API."""

    def __init__(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.h11 = h11.Connection(h11.CLIENT)
        self.done: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self.body = b""
        self.status = 0

    def data_received(self, data: bytes) -> None:
        self.h11.receive_data(data)
        self._pump()

    def eof_received(self) -> None:
        self.h11.receive_data(b"")
        self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"upstream lost: {exc}"))

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def _pump(self) -> None:
        while not self.done.done():
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Response):
                self.status = event.status_code
            elif isinstance(event, h11.Data):
                self.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.done.set_result((self.status, self.body))
            elif isinstance(event, h11.ConnectionClosed):
                self.done.set_exception(ConnectionError("closed before the response"))

    async def run(self, target: str, host: str) -> tuple[int, bytes, bool]:
        self.conn.attach(self)
        self.conn.write(
            self.h11.send(h11.Request(method="GET", target=target, headers=[("host", host)]))
            + self.h11.send(h11.EndOfMessage())
        )
        status, body = await self.done
        reusable = self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE
        return status, body, reusable


async def get(pool: OriginPool, origin, target: str = "/hello") -> tuple[int, bytes]:
    """Acquire, exchange, release: what the proxy's HTTP layer will do per request."""
    conn = await pool.acquire(origin)
    reusable = False
    try:
        status, body, reusable = await Exchange(conn).run(target, origin.host)
        return status, body
    finally:
        pool.release(conn, reusable)
