"""How close to nginx a CPython proxy gets when its features are sketched, not built.

Issue 4 asks for originpool, one worker, >= 0.5x nginx, one worker. ``bench/http_rps.py``'s
floor shows the runtime is not what stops it: a bare llhttp relay reaches ~0.9x. This
benchmark asks the next question: with the per-request features added in the cheapest form
CPython allows, fused into the two callbacks with no layers, how far does it get?

The sketch (``serve_sketch``) does, per request: one control-byte scan of the head, llhttp
parse, a token/value regex per header line, hop-by-hop removal, X-Forwarded-* and Via,
routing by a dict lookup, an idle-connection stack per origin with a checkout poll(), a
deadline set and cleared, a status counter and a latency bucket, and an orjson access line
written once per loop turn. It leaves out what makes those features correct: the h11 rules
(one Host, framing conflicts, request line grammar), response framing (HEAD, 204/304,
chunked, Connection: close), keep-alive verdicts, limits, errors, retries, TLS. It is not a
proxy anyone should run.

Inside a private network namespace, as ``bench/http_rps.py``: nginx as the origin, then
nginx as a proxy (1 worker, keepalive 64), originpool (1 worker) and the sketch, wrk
``-t1 -c50 -d10s``, interleaved rounds, medians, ratios against nginx in the same run.
Measured here: the sketch 0.40x nginx, originpool 0.20x.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import os
import re
import select
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench.http_rps import (  # noqa: E402
    BODY,
    HOST,
    LISTEN,
    NGINX_ORIGIN,
    NGINX_PROXY,
    ORIGIN,
    Children,
    _serve_on,
    listening_socket,
    run_wrk,
    start_nginx,
    start_originpool,
)
from pool import netns  # noqa: E402

SKETCH = ("127.0.0.1", 8084)
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_VALUE = re.compile(rb"[\x20-\x7e\x80-\xff\t]*")
_HOP = frozenset(
    (b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade")
).union((b"proxy-connection", b"proxy-authenticate", b"proxy-authorization"))
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def serve_sketch(fd: int, log_path: str) -> int:
    """The sketch on the inherited listening socket ``fd``; access lines to ``log_path``."""
    import asyncio

    import httptools
    import orjson

    routes = {HOST: ORIGIN}
    idle: dict[tuple[str, int], list[Up]] = {}
    requests: dict[tuple[str, int], int] = {}
    latency = [0] * (len(_BUCKETS) + 1)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    lines: list[bytes] = []
    poller = select.poll()

    def drain() -> None:
        os.write(log_fd, b"".join(lines))
        lines.clear()

    class Up(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpResponseParser(self)
            self.down: Down | None = None
            self.headers: list[tuple[bytes, bytes]] = []
            self.body: list[bytes] = []
            self.transport: Any = None
            self.fd = -1

        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.fd = transport.get_extra_info("socket").fileno()

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_begin(self) -> None:
            self.headers, self.body = [], []

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            down = self.down
            assert down is not None
            status = self.parser.get_status_code()
            out = [b"HTTP/1.1 %d OK\r\n" % status]
            for name, value in self.headers:
                _TOKEN.fullmatch(name)
                _VALUE.fullmatch(value)
                if name.lower() not in _HOP:
                    out.append(name + b": " + value + b"\r\n")
            body = b"".join(self.body)
            out.append(b"via: 1.1 originpool\r\n\r\n")
            out.append(body)
            down.deadline = 0.0
            self.down = None
            idle.setdefault(ORIGIN, []).append(self)
            if down.transport.is_closing():
                return  # wrk closed its connection at the end of a run
            down.transport.write(b"".join(out))
            seconds = time.monotonic() - down.started
            key = (down.host, status)
            requests[key] = requests.get(key, 0) + 1
            latency[bisect.bisect_left(_BUCKETS, seconds)] += 1
            if not lines:
                asyncio.get_running_loop().call_soon(drain)
            stamp = datetime.datetime.now(datetime.UTC).isoformat()
            fields = {
                "method": down.method.decode(),
                "host": down.host,
                "path": down.url.decode("latin-1"),
                "status": status,
                "bytes": len(body),
                "duration_ms": round(seconds * 1000, 3),
                "origin": f"http://{ORIGIN[0]}:{ORIGIN[1]}",
                "egress": "127.0.0.1",
                "client": down.peer,
                "event": "access",
                "level": "info",
                "timestamp": stamp,
            }
            lines.append(orjson.dumps(fields) + b"\n")

    class Down(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.peer = transport.get_extra_info("peername")[0]
            self.parser = httptools.HttpRequestParser(self)
            self.deadline = 0.0
            self.started = 0.0
            self.url = b""
            self.host = ""
            self.method = b""
            self.headers: list[tuple[bytes, bytes]] = []

        def data_received(self, data: bytes) -> None:
            if _CTL.search(data.replace(b"\r\n", b"")):
                self.transport.close()
                return
            self.parser.feed_data(data)

        def on_message_begin(self) -> None:
            self.headers, self.url = [], b""

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

        def on_message_complete(self) -> None:
            self.started = time.monotonic()
            self.method = self.parser.get_method()
            out = [self.method + b" " + self.url + b" HTTP/1.1\r\n"]
            host = b""
            for name, value in self.headers:
                _TOKEN.fullmatch(name)
                _VALUE.fullmatch(value)
                low = name.lower()
                if low in _HOP or low.startswith(b"x-forwarded-"):
                    continue
                if low == b"host":
                    host = value
                out.append(name + b": " + value + b"\r\n")
            out.append(
                b"x-forwarded-for: " + self.peer.encode() + b"\r\nx-forwarded-proto: http\r\n"
                b"x-forwarded-host: " + host + b"\r\nvia: 1.1 originpool\r\n\r\n"
            )
            self.host = host.decode("latin-1").lower().split(":", 1)[0]
            origin = routes.get(self.host)
            if origin is None:
                self.transport.close()
                return
            head = b"".join(out)
            self.deadline = time.monotonic() + 60
            stack = idle.get(origin)
            while stack:
                up = stack.pop()
                poller.register(up.fd, select.POLLIN)
                stale = poller.poll(0)
                poller.unregister(up.fd)
                if stale:
                    up.transport.close()
                    continue
                up.down = self
                up.transport.write(head)
                return
            asyncio.get_running_loop().create_task(self.connect(origin, head))

        async def connect(self, origin: tuple[str, int], head: bytes) -> None:
            loop = asyncio.get_running_loop()
            _, up = await loop.create_connection(Up, *origin)
            up.down = self
            up.transport.write(head)

    return _serve_on(fd, Down)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--serve-sketch", type=int, metavar="FD", help=argparse.SUPPRESS)
    parser.add_argument("--log", default=os.devnull, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_sketch is not None:
        return serve_sketch(args.serve_sketch, args.log)
    missing = [tool for tool in ("wrk", "nginx") if shutil.which(tool) is None]
    if missing:
        print(f"needs {' and '.join(missing)}: apt-get install -y wrk nginx-light", file=sys.stderr)
        return 2
    reason = netns.can_create()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    if not 1 <= args.rounds <= 20 or not 1 <= args.duration <= 120:
        parser.error("--rounds in 1..20, --duration in 1..120")
    netns.unshare_process(port_range=(20000, 60999))
    tmp = Path(tempfile.mkdtemp(prefix="originpool-sketch-"))
    children = Children()
    try:
        body = BODY.decode().replace("\n", "\\n")
        origin = NGINX_ORIGIN.format(ip=ORIGIN[0], port=ORIGIN[1], body=body)
        start_nginx(children, tmp, "origin", origin, ORIGIN)
        nginx, port = LISTEN["nginx"]
        proxy = NGINX_PROXY.format(
            tmp=tmp, origin_ip=ORIGIN[0], origin_port=ORIGIN[1], ip=nginx, port=port
        )
        start_nginx(children, tmp, "proxy", proxy, LISTEN["nginx"])
        start_originpool(children, tmp, "originpool", 1)
        with listening_socket(SKETCH) as sock:  # the child keeps its copy
            log = str(tmp / "sketch-access.log")
            cmd = [sys.executable, __file__, "--serve-sketch", str(sock.fileno()), "--log", log]
            children.start(cmd, pass_fds=[sock.fileno()])
        targets = {
            "nginx, 1 worker": LISTEN["nginx"],
            "originpool, 1 worker": LISTEN["originpool"],
            "sketch (features fused, not built)": SKETCH,
        }
        for address in targets.values():
            warm = run_wrk(address, 2, 50, 1)
            if not warm.clean:
                raise RuntimeError(f"{address}: warm-up had errors: {warm}")
        got: dict[str, list[float]] = {name: [] for name in targets}
        for _ in range(args.rounds):
            for name, address in targets.items():
                result = run_wrk(address, args.duration, 50, 1)
                if not result.clean:
                    print(f"  {name}: ERRORS {result}", file=sys.stderr)
                got[name].append(result.rps)
    finally:
        children.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in got.items()}
    nginx_rps = medians["nginx, 1 worker"]
    print(f"wrk -t1 -c50 -d{args.duration}s, {args.rounds} interleaved rounds, medians")
    for name, rps in medians.items():
        print(f"  {name:38s} {rps:10,.0f} req/s  {rps / nginx_rps:5.2f}x nginx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
