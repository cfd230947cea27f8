"""Python CPU per proxied request, without sockets: where the proxy's own time goes.

Why this exists: ``bench/http_rps.py`` measures the whole machine (wrk, the origin and the
kernel share 2 cores), so a few microseconds saved in the proxy's Python are lost in its
noise. This drives the real data path (``proxy.server.Downstream`` and ``Exchange``, the
real codecs, header rewriting, routing, pool checkout and checkin, metrics and the access
log to /dev/null) with in-memory transports: a request head goes in, the request bytes
come out toward a pooled "origin" connection, a response goes in there, the response comes
out toward the client. Nothing else runs, so the figure is the proxy's Python per request.

Baseline in the same run: the same cycle with ``http_parser = "h11"`` (the reference codec
on the client side); the figure for the default codec is also given as a ratio of it.

    .venv/bin/python bench/proxy_cycle.py               # 20,000 requests per codec, best of 5
    .venv/bin/python bench/proxy_cycle.py --profile     # cProfile of the default codec
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import socket
import sys
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from pool import turnwrite  # noqa: E402
from pool.egress import EgressSet, Slot  # noqa: E402
from pool.origin import Origin, OriginPool, PoolLimits, UpstreamConnection  # noqa: E402
from proxy import logs  # noqa: E402
from proxy.routing import Route, Router  # noqa: E402
from proxy.server import Proxy, Settings  # noqa: E402

REQUEST = (
    b"GET /api/items?page=2 HTTP/1.1\r\nHost: bench.example\r\nUser-Agent: bench/1.0\r\n"
    b"Accept: */*\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Fri, 27 Nov 2026 19:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\n"
    b"hello, world\n"
)


class Transport:
    """The part of an asyncio transport the data path uses; writes are kept, not sent."""

    def __init__(self, peer: tuple[str, int], sock: socket.socket | None = None) -> None:
        self.peer = peer
        self.sock = sock
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "socket": self.sock}.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


async def cycle(parser: str, count: int, profile: cProfile.Profile | None = None) -> float:
    """Seconds per request over ``count`` requests on one kept-alive client connection."""
    origin = Origin("http", "127.0.2.1", 9000)
    pool = OriginPool(EgressSet(["127.0.1.1"]), PoolLimits(max_requests=10**9))
    proxy = Proxy(
        Router([Route("bench.example", "/", [(origin, 1)])]),
        pool,
        Settings(http_parser=parser, max_body_bytes=0),
    )
    # one pooled connection: a real (idle, silent) socket so the checkout poll is real too
    a, b = socket.socketpair()
    slot = Slot.__new__(Slot)
    slot.local, slot.destination = ("127.0.1.1", 40000), ("127.0.2.1", 9000)
    conn = UpstreamConnection(pool, origin, slot, time.monotonic())
    upstream = Transport(("127.0.2.1", 9000), a)
    conn.connection_made(upstream)  # type: ignore[arg-type]
    pool._state(origin).idle.append(conn)
    client = proxy.protocol()
    downstream = Transport(("127.0.0.1", 50000))
    client.connection_made(downstream)  # type: ignore[arg-type]
    # warm-up and a check that the cycle really proxies
    loop = asyncio.get_running_loop()
    client.data_received(REQUEST)
    turnwrite.end_of_turn(loop)  # the end of the loop turn: held writes go out
    conn.data_received(RESPONSE)
    turnwrite.end_of_turn(loop)
    assert upstream.written and downstream.written[-1].endswith(b"hello, world\n"), downstream
    if profile is not None:
        profile.enable()
    t0 = time.perf_counter()
    for _ in range(count):
        client.data_received(REQUEST)
        turnwrite.end_of_turn(loop)
        conn.data_received(RESPONSE)
        turnwrite.end_of_turn(loop)
    elapsed = time.perf_counter() - t0
    if profile is not None:
        profile.disable()
    assert len(downstream.written) >= count and pool.stats()[0].reused >= count
    a.close()
    b.close()
    return elapsed / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(1)
    os.dup2(devnull, 1)  # the access log goes to /dev/null, through the real logger
    logs.configure("json")
    try:  # the loop the proxy runs on
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    try:
        if args.profile:
            prof = cProfile.Profile()
            loop.run_until_complete(cycle("httptools", args.count, prof))
            os.dup2(saved, 1)
            pstats.Stats(prof).sort_stats(os.environ.get("SORT", "tottime")).print_stats(
                int(os.environ.get("LINES", "30"))
            )
            return 0
        best = {
            p: min(loop.run_until_complete(cycle(p, args.count)) for _ in range(args.rounds))
            for p in ("h11", "httptools")
        }
    finally:
        loop.close()
        logs.flush()
        os.dup2(saved, 1)
    for p, seconds in best.items():
        print(
            f"{p:10s} {seconds * 1e6:7.1f} µs of Python per proxied request (best of {args.rounds})"
        )
    print(f"ratio httptools / h11: {best['httptools'] / best['h11']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
