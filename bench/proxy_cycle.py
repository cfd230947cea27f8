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
    .venv/bin/python bench/proxy_cycle.py --pieces      # timeit of the pieces no proxy drops
    .venv/bin/python bench/proxy_cycle.py --http2       # the same cycle over HTTP/2 (h2c)
    .venv/bin/python bench/proxy_cycle.py --http2 --profile   # cProfile of the proxy's h2 calls

The HTTP/2 cycle is timed on the thread's CPU clock (a shared machine's preemptions stay out).
Measured 2026-12-07, one run, 4 x best of 3: 127 µs a request before issue 21's per-request work,
94 after (README "HTTP/2", what paid).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from pool import turnwrite  # noqa: E402
from pool.egress import EgressSet  # noqa: E402
from pool.origin import Origin, OriginPool, PoolLimits  # noqa: E402
from proxy import logs  # noqa: E402
from proxy.routing import Route, Router  # noqa: E402
from proxy.server import Proxy, Settings  # noqa: E402
from proxy.testing import MemoryTransport, memory_connection, transport_of  # noqa: E402

REQUEST = (
    b"GET /api/items?page=2 HTTP/1.1\r\nHost: bench.example\r\nUser-Agent: bench/1.0\r\n"
    b"Accept: */*\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Fri, 27 Nov 2026 19:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\n"
    b"hello, world\n"
)


async def cycle(parser: str, count: int, profile: cProfile.Profile | None = None) -> float:
    """Seconds per request over ``count`` requests on one kept-alive client connection."""
    origin = Origin("http", "127.0.2.1", 9000)
    pool = OriginPool(EgressSet(["127.0.1.1"]), PoolLimits(max_requests=10**9))
    proxy = Proxy(
        Router([Route("bench.example", "/", [(origin, 1)])]),
        pool,
        Settings(http_parser=parser, max_body_bytes=0),
    )
    # one pooled connection (proxy.testing): its fd is an idle, silent pipe, so the
    # checkout poll is real too
    conn = memory_connection(pool, origin)
    upstream = transport_of(conn)
    pool._state(origin).idle.append(conn)
    client = proxy.protocol()
    downstream = MemoryTransport(("127.0.0.1", 50000))
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
    upstream.close()
    return elapsed / count


async def cycle_h2(count: int, profile: cProfile.Profile | None = None) -> float:
    """Seconds of the proxy's own Python per request over HTTP/2 (h2c, one stream per
    request on one connection, the default codec upstream). The test client's h2 work (its
    encoding and decoding) is outside the clock: only the proxy's calls are timed."""
    import h2.config
    import h2.connection

    from proxy.http2 import H2Connection

    origin = Origin("http", "127.0.2.1", 9000)
    pool = OriginPool(EgressSet(["127.0.1.1"]), PoolLimits(max_requests=10**9))
    proxy = Proxy(
        Router([Route("bench.example", "/", [(origin, 1)])]), pool, Settings(max_body_bytes=0)
    )
    conn = memory_connection(pool, origin)
    upstream = transport_of(conn)
    pool._state(origin).idle.append(conn)
    server = H2Connection(proxy)
    downstream = MemoryTransport(("127.0.0.1", 50000))
    server.connection_made(downstream)  # type: ignore[arg-type]
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    client.initiate_connection()
    loop = asyncio.get_running_loop()
    headers = [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"bench.example"),
        (b":path", b"/api/items?page=2"),
        (b"user-agent", b"bench/1.0"),
        (b"accept", b"*/*"),
    ]
    # this thread's CPU time, not the wall clock: on a shared machine a preemption between two
    # reads would count another process's work as the proxy's (runs moved 2x with perf_counter)
    clock = time.thread_time
    spent = 0.0
    for i in range(count + 100):  # the first 100: warm-up, not timed
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, headers, end_stream=True)
        request = client.data_to_send()
        if i >= 100 and profile is not None:
            profile.enable()  # the proxy's calls only, as the clock
        t0 = clock()
        server.data_received(request)
        turnwrite.end_of_turn(loop)
        conn.data_received(RESPONSE)
        turnwrite.end_of_turn(loop)
        server._flush()  # what the kick's loop callback does at the turn's end
        took = clock() - t0
        if profile is not None:
            profile.disable()
        if i >= 100:
            spent += took
        events = client.receive_data(downstream.take())
        for event in events:
            if hasattr(event, "flow_controlled_length") and event.flow_controlled_length:
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        upstream.take()
        if i % 500 == 0:
            await asyncio.sleep(0)  # the kicks' queued callbacks run (untimed)
    assert pool.stats()[0].reused >= count and not server.streams
    upstream.close()
    return spent / count


def pieces(rounds: int = 5, number: int = 50000) -> list[tuple[str, float]]:
    """µs per call of each piece a strict proxy cannot drop, on this file's request and
    response: what the 0.5x-nginx budget has to fit (README, "HTTP parsing")."""
    import timeit

    from proxy import headers as hdrs
    from proxy import request_id
    from proxy.http1_fast import FastServerSide
    from proxy.http1_fast_client import FastClientSide
    from proxy.target import resolve

    head = FastServerSide().feed_whole(REQUEST)
    assert head is not None
    rewrite = {"client_ip": b"127.0.0.1", "scheme": b"http", "trusted_peer": False}
    rewrite |= {"host": b"bench.example", "request_id": b"0" * 32}
    out = hdrs.to_origin(head.headers, **rewrite)

    def sent() -> FastClientSide:
        codec = FastClientSide()
        codec.request_head(head.method, head.target, out)
        codec.end()
        return codec

    got = sent().feed_whole(RESPONSE)
    assert got is not None
    response, _body = got
    back = hdrs.to_client(response.headers)
    server = FastServerSide()
    server.feed_whole(REQUEST)
    fields = {"method": "GET", "host": "bench.example", "path": "/api/items?page=2"}
    fields |= {"status": 200, "bytes": 13, "duration_ms": 0.1, "client": "127.0.0.1"}

    def access() -> None:
        logs.access(dict(fields))  # held to the end of the loop turn: written in one go

    parser = FastServerSide()

    def parse() -> None:  # one connection's codec, request after request, as in the proxy
        parser.feed_whole(REQUEST)
        parser.next_event()
        parser.start_next()

    base = min(timeit.repeat(sent, number=number, repeat=rounds))
    timed = {
        "request head parsed and checked": parse,
        "host resolved (proxy.target)": lambda: resolve(head.target, head.headers, b"1.1"),
        "request id": request_id.new,
        "header rewrite to the origin": lambda: hdrs.to_origin(head.headers, **rewrite),
        "request written as h11 writes it": sent,
        "response parsed and checked": lambda: sent().feed_whole(RESPONSE),
        "header rewrite to the client": lambda: hdrs.to_client(response.headers),
        "response framing": lambda: server.response_head(200, back, b"OK"),
        "access line (rendered and written)": access,
    }
    result = []
    for name, fn in timed.items():
        seconds = min(timeit.repeat(fn, number=number, repeat=rounds)) / number
        if name == "response parsed and checked":
            seconds -= base / number  # the request it answers is the piece above
        result.append((name, seconds * 1e6))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--pieces", action="store_true")
    parser.add_argument("--http2", action="store_true", help="the HTTP/2 (h2c) cycle instead")
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
        if args.pieces:

            async def in_loop() -> list[tuple[str, float]]:
                return pieces()  # inside the loop: access lines wait for the turn's end

            timed = loop.run_until_complete(in_loop())
            os.dup2(saved, 1)
            for name, micros in timed:
                print(f"{name:38s} {micros:6.2f} µs")
            print(f"{'together':38s} {sum(m for _, m in timed):6.2f} µs")
            return 0
        if args.profile:
            prof = cProfile.Profile()
            if args.http2:
                loop.run_until_complete(cycle_h2(args.count, prof))
            else:
                loop.run_until_complete(cycle("httptools", args.count, prof))
            os.dup2(saved, 1)
            pstats.Stats(prof).sort_stats(os.environ.get("SORT", "tottime")).print_stats(
                int(os.environ.get("LINES", "30"))
            )
            return 0
        if args.http2:
            h2best = min(loop.run_until_complete(cycle_h2(args.count)) for _ in range(args.rounds))
            os.dup2(saved, 1)
            print(
                f"{'h2':10s} {h2best * 1e6:7.1f} µs of Python per proxied request "
                f"(best of {args.rounds})"
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
