"""WebSocket relay: messages/s and MB/s through originpool against direct, and the proxy's
memory per idle session with 9,000 sessions held.

Why this exists: issue 5's traffic is WebSocket sessions that live for days, so two figures
decide what a proxy costs: how fast it relays once a session is open (it copies bytes and
follows frame boundaries, nothing more), and how much memory an *idle* session pins, which
times 9,000 per process is the proxy's footprint. The reference figures, measured on this
kind of machine in the same kind of scenario: HAProxy 6.0 KB, nginx 18.2 KB per session;
bare asyncio transports ~2.5 KB per session pair (downstream + upstream). Target: <= 6 KB.

Three parts, all inside a private network namespace (``pool.netns.unshare_process``):

1. **throughput**: a ``websockets`` echo origin in a child process; a ``websockets`` client
   here sends N messages of 64 B, 4 KiB and 64 KiB with at most ``--window`` unanswered,
   checking every echo byte for byte, (a) straight to the origin and (b) through
   ``originpool serve`` (one worker). Interleaved rounds, medians. MB/s counts payload one
   way (each byte also comes back). The proxy's CPU time per message is reported too (the
   figure other load on the machine disturbs least), with its share of a core and both
   cores' busy share: with a window, the rate is bound by round-trip latency unless one
   of those is near 100%.
2. **RSS per idle session**: a fresh one-worker ``originpool serve``; a cheap raw WebSocket
   origin in a child process (a Protocol with ``__slots__``, 101 then echo); a raw client in
   another child process (plain sockets: handshake, one echo, then held) opening
   ``--sessions`` sessions from source IPs 127.3.x.y via ``pool.connectx_async``. RSS per
   session = (proxy VmRSS with the sessions held - VmRSS before) / sessions, both read
   from /proc/<pid>/status; "before" is after a warm-up of a few hundred sessions opened
   and closed, so one-time costs (lazy imports, first-use caches) are not charged to the
   sessions. The same proxy after the sessions closed shows how much memory comes back.
3. **where the memory goes** (when the figure misses the target, or ``--attribute``): the
   proxy cannot be traced from outside, so the same data path (``proxy.server.Proxy`` and
   ``Listener``, as tests/test_websocket.py builds them) runs in this process under
   ``tracemalloc`` with the client and origin in child processes; the snapshot difference
   across ``--attr-sessions`` sessions, per session, by file/line and by the proxy frame
   that caused it. tracemalloc sees Python's allocator only: libuv's own handles and the
   allocator's fragmentation are the gap between its total and the RSS figure.

The client holds ``--sessions`` sockets and the origin as many (each under the 20,000-file
cap); the proxy holds two per session. Every child is ended by PID; the namespace goes away
with this process.

Run as root::

    .venv/bin/python bench/ws_relay.py                    # 3 rounds, 9,000 sessions
    .venv/bin/python bench/ws_relay.py --rounds 1 --sessions 2000 --scale 0.2
    .venv/bin/python bench/ws_relay.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import linecache
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script, sys.path[0] is bench/, not the repo; make the project importable.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench.http_rps import Children, serve_proxy, tree_cpu_seconds  # noqa: E402
from pool import connectx_async, netns  # noqa: E402

HOST = "bench.example"
ORIGIN = ("127.0.2.1", 9000)
PROXY = ("127.0.0.1", 8080)
EGRESS = ("127.0.1.1", "127.0.1.2")
TARGET_KB = 6.0
REFERENCE_KB = {"HAProxy": 6.0, "nginx": 18.2, "bare asyncio transports (pair)": 2.5}
SIZES = ((64, 20_000), (4096, 10_000), (65536, 2_000))  # (bytes, messages) at --scale 1
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
STEP_TIMEOUT = 10.0  # seconds for any one network step
_OURS = (str(_ROOT / "proxy") + "/", str(_ROOT / "pool") + "/")  # the project's own code

PROXY_CONFIG = """
[listen]
address = "{ip}:{port}"
[admin]
address = "127.0.0.1:{admin}"
[egress]
addresses = {egress}
[[routes]]
host = "{host}"
origins = ["ws://{origin_ip}:{origin_port}"]
[limits]
max_connections = {max_connections}
[log]
format = "json"
level = "info"
"""


def run_loop(main: Awaitable[Any]) -> Any:
    """uvloop when installed: the proxy's own loop, and the cheaper one for our children."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)  # type: ignore[arg-type]
    return uvloop.run(main)  # type: ignore[arg-type]


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine from /proc/stat: with the client, the
    origin and the proxy on 2 cores, a relay run is often bound by the machine, not by any
    one process, and this says which."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def listening_socket(address: tuple[str, int], backlog: int = 16384) -> socket.socket:
    """Bound and listening before the server that inherits it starts: no start-up wait."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(backlog)
    return sock


def write_proxy_config(path: Path, admin: int, max_connections: int) -> Path:
    path.write_text(
        PROXY_CONFIG.format(
            ip=PROXY[0],
            port=PROXY[1],
            admin=admin,
            egress=json.dumps(list(EGRESS)),
            host=HOST,
            origin_ip=ORIGIN[0],
            origin_port=ORIGIN[1],
            max_connections=max_connections,
        )
    )
    return path


# --- frames, the few a raw peer needs ----------------------------------------------------------


def frame(opcode: int, payload: bytes, mask: bytes | None) -> bytes:
    """One FIN frame; ``mask`` for client-to-server frames (RFC 6455 5.3)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if mask is None:
        return head + payload
    return head + mask + apply_mask(payload, mask)


def apply_mask(data: bytes, mask: bytes) -> bytes:
    """XOR with the repeating 4-byte key, as one big-integer operation (fast enough)."""
    if not data:
        return data
    n = len(data)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def parse_frame(buf: bytes) -> tuple[int, bytes, int] | None:
    """(opcode, unmasked payload, bytes used) of the first complete frame, or None."""
    if len(buf) < 2:
        return None
    n, pos = buf[1] & 0x7F, 2
    if n == 126:
        if len(buf) < 4:
            return None
        n, pos = struct.unpack("!H", buf[2:4])[0], 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n, pos = struct.unpack("!Q", buf[2:10])[0], 10
    mask = None
    if buf[1] & 0x80:
        if len(buf) < pos + 4:
            return None
        mask, pos = buf[pos : pos + 4], pos + 4
    if len(buf) < pos + n:
        return None
    payload = buf[pos : pos + n]
    if mask is not None:
        payload = apply_mask(payload, mask)
    return buf[0] & 0x0F, payload, pos + n


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


# --- child: the raw WebSocket origin ---------------------------------------------------------


class RawOrigin(asyncio.Protocol):
    """101 to any upgrade, then echo; a few hundred bytes per held session."""

    __slots__ = ("buf", "open", "transport")

    KEY = re.compile(rb"(?i)\r\nsec-websocket-key:[ \t]*([^\r\n]+)")

    def __init__(self) -> None:
        self.buf = b""
        self.open = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buf = self.buf + data if self.buf else data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            m = self.KEY.search(buf, 0, end + 2)
            if m is None:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                self.transport.close()
                return
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                + accept_key(m.group(1).strip())
                + b"\r\n\r\n"
            )
            self.open = True
            buf = buf[end + 4 :]
        out = []
        while True:
            parsed = parse_frame(buf)
            if parsed is None:
                break
            opcode, payload, used = parsed
            buf = buf[used:]
            if opcode == 0x8:  # Close: answer it and end
                out.append(frame(0x8, payload[:2], None))
                self.transport.write(b"".join(out))
                self.transport.close()
                self.buf = b""
                return
            if opcode in (0x1, 0x2):
                out.append(frame(opcode, payload, None))
        if out:
            self.transport.write(b"".join(out))
        self.buf = buf


async def _serve_raw(fd: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(RawOrigin, sock=socket.socket(fileno=fd), backlog=16384)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()


async def _echo(conn: Any) -> None:
    from websockets.exceptions import ConnectionClosed

    with contextlib.suppress(ConnectionClosed):
        async for message in conn:
            await conn.send(message)


async def _serve_websockets(fd: int) -> None:
    from websockets.asyncio.server import serve

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with serve(
        _echo, sock=socket.socket(fileno=fd), max_size=None, compression=None, max_queue=64
    ):
        await stop.wait()


def start_origin(children: Children, kind: str) -> subprocess.Popen[bytes]:
    """This file as ``--serve-origin KIND FD`` on a socket already listening."""
    with listening_socket(ORIGIN) as sock:  # the child keeps its copy
        fd = sock.fileno()
        return children.start(
            [sys.executable, __file__, "--serve-origin", kind, str(fd)], pass_fds=[fd]
        )


# --- child: the raw session client -----------------------------------------------------------


def source_ip(i: int) -> str:
    """127.3.x.y, 250 sessions per source IP: no client-side port is ever scarce."""
    return f"127.3.{i // 250}.{i % 250 + 1}"


async def _recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = b""
    for _ in range(n + 1):  # each recv returns at least one byte or EOF
        if len(buf) >= n:
            return buf
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


async def open_session(i: int, proxy: tuple[str, int]) -> socket.socket:
    """Connect from ``source_ip(i)``, upgrade, exchange one echo; the socket stays open."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await connectx_async(sock, (source_ip(i), 0), proxy)
        key = base64.b64encode(os.urandom(16))
        await loop.sock_sendall(
            sock,
            b"GET / HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (HOST.encode(), key),
        )
        head = b""
        for _ in range(64):  # the 101 head is well under 64 reads
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            head += chunk
            if b"\r\n\r\n" in head:
                break
        status, _, rest = head.partition(b"\r\n")
        if b" 101 " not in status or accept_key(key) not in rest:
            raise ConnectionError(f"bad handshake answer: {status!r}")
        if not head.endswith(b"\r\n\r\n"):
            raise ConnectionError("bytes after the 101 head")
        await echo_once(sock, f"hello {i}".encode())
        return sock
    except BaseException:
        sock.close()
        raise


async def echo_once(sock: socket.socket, text: bytes) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, frame(0x1, text, os.urandom(4)))
    answer = await _recv_exact(loop, sock, 2 + len(text))  # unmasked, < 126 bytes
    if answer != frame(0x1, text, None):
        raise ConnectionError(f"bad echo {answer!r}")


async def _client(sessions: int, proxy: tuple[str, int], concurrency: int) -> None:
    """Opens ``sessions`` and reports; then obeys stdin: ``check`` echoes once on every
    session, EOF closes them all and exits."""
    loop = asyncio.get_running_loop()
    out = sys.stdout
    held: list[socket.socket] = []
    failures: dict[str, int] = {}
    started = time.monotonic()
    queue = iter(range(sessions))

    async def worker() -> None:
        for i in queue:
            try:
                held.append(await asyncio.wait_for(open_session(i, proxy), STEP_TIMEOUT))
            except (OSError, TimeoutError) as e:
                name = type(e).__name__
                failures[name] = failures.get(name, 0) + 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    report = {"event": "held", "held": len(held), "failures": failures}
    report["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(report), file=out, flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    for _ in range(100):  # a handful of commands at most
        line = await reader.readline()
        if not line:
            break
        if line.strip() == b"check":
            bad = 0
            for i, sock in enumerate(held):
                try:
                    await asyncio.wait_for(echo_once(sock, b"check %d" % i), STEP_TIMEOUT)
                except (OSError, TimeoutError):
                    bad += 1
            print(json.dumps({"event": "checked", "ok": len(held) - bad, "bad": bad}), flush=True)
    for sock in held:
        sock.close()


class ClientProc:
    """The session client as a child process, driven over its stdin and stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls, sessions: int, proxy: tuple[str, int], concurrency: int = 64
    ) -> AsyncIterator[ClientProc]:
        """The client for the ``async with`` block; closed (or killed by PID) on the way out."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--client",
            str(sessions),
            f"{proxy[0]}:{proxy[1]}",
            str(concurrency),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        client = cls(proc)
        try:
            yield client
        finally:
            await client.close()

    async def report(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError("session client exited early")
        return dict(json.loads(line))

    async def check(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"check\n")
        await self.proc.stdin.drain()
        return await self.report(timeout)

    async def close(self, timeout: float = 60) -> None:
        """EOF on stdin: the client closes its sessions and exits; killed by PID if not."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


# --- part 1: throughput ----------------------------------------------------------------------


@dataclass
class Series:
    """One (target, size): per-round messages/s and the proxy's CPU per message."""

    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)  # proxy CPU seconds / wall seconds
    machine: list[float] = field(default_factory=list)  # all cores' busy share


async def pump(uri_host: tuple[str, int], size: int, count: int, window: int) -> float:
    """Seconds to send ``count`` messages with at most ``window`` unanswered; every echo is
    compared with what was sent (a proxy that corrupts is not fast, it is broken)."""
    from websockets.asyncio.client import connect

    payload = os.urandom(size)
    async with connect(
        f"ws://{HOST}/",
        host=uri_host[0],
        port=uri_host[1],
        max_size=None,
        compression=None,
        open_timeout=STEP_TIMEOUT,
        max_queue=window * 2,
    ) as ws:
        room = asyncio.Semaphore(window)

        async def receive() -> None:
            for _ in range(count):
                message = await ws.recv()
                if message != payload:
                    raise RuntimeError(f"echo differs ({len(message)} bytes, sent {size})")
                room.release()

        started = time.perf_counter()
        receiver = asyncio.get_running_loop().create_task(receive())
        try:
            for _ in range(count):
                if receiver.done():
                    receiver.result()  # raises what went wrong on the way back
                await asyncio.wait_for(room.acquire(), STEP_TIMEOUT)
                await ws.send(payload)
            await asyncio.wait_for(receiver, STEP_TIMEOUT)
        finally:
            receiver.cancel()
        return time.perf_counter() - started


async def throughput(args: argparse.Namespace, tmp: Path, children: Children) -> dict[str, Any]:
    start_origin(children, "websockets")
    proxy, _log = serve_proxy(children, write_proxy_config(tmp / "relay.toml", 9090, 10000))
    targets = {"direct": ORIGIN, "proxy": PROXY}
    sizes = [(size, max(10, int(n * args.scale))) for size, n in SIZES]
    results: dict[tuple[str, int], Series] = {}
    for size, count in sizes:  # warm-up: one short run each
        for address in targets.values():
            await pump(address, size, max(10, count // 20), args.window)
    for r in range(args.rounds):
        for size, count in sizes:
            for name, address in targets.items():
                cpu, ticks = tree_cpu_seconds(proxy.pid), machine_ticks()
                seconds = await pump(address, size, count, args.window)
                cpu = tree_cpu_seconds(proxy.pid) - cpu
                busy, total = (b - a for a, b in zip(ticks, machine_ticks(), strict=True))
                series = results.setdefault((name, size), Series())
                series.rates.append(count / seconds)
                series.cpu_us.append(cpu / count * 1e6)
                series.busy.append(cpu / seconds)
                series.machine.append(busy / max(total, 1))
                if not args.json:
                    extra = f"  machine {series.machine[-1]:4.0%} busy"
                    if name == "proxy":
                        extra += f", proxy {series.cpu_us[-1]:6.1f} us CPU/msg"
                        extra += f", {series.busy[-1]:4.0%} of a core"
                    print(
                        f"  round {r + 1} {size:>6} B {name:<6} {count / seconds:>10,.0f} msg/s"
                        f" {count * size / seconds / 1e6:>9.1f} MB/s{extra}",
                        flush=True,
                    )
    out: dict[str, Any] = {"window": args.window, "rounds": args.rounds, "sizes": {}}
    for size, count in sizes:
        row: dict[str, Any] = {"messages": count}
        for name in targets:
            s = results[(name, size)]
            rate = statistics.median(s.rates)
            row[name] = {
                "msg_per_s": round(rate, 1),
                "mb_per_s": round(rate * size / 1e6, 2),
                "machine_busy": round(statistics.median(s.machine), 3),
            }
        p = results[("proxy", size)]
        row["proxy"]["cpu_us_per_msg"] = round(statistics.median(p.cpu_us), 1)
        row["proxy"]["core_busy"] = round(statistics.median(p.busy), 3)
        row["proxy/direct"] = round(row["proxy"]["msg_per_s"] / row["direct"]["msg_per_s"], 3)
        out["sizes"][str(size)] = row
    return out


# --- part 2: RSS per idle session through the real proxy -------------------------------------


async def memory(args: argparse.Namespace, tmp: Path, children: Children) -> dict[str, Any]:
    origin = start_origin(children, "raw")
    config = write_proxy_config(tmp / "memory.toml", 9190, args.sessions + 1000)
    proxy, log = serve_proxy(children, config)
    async with ClientProc.running(args.warmup_sessions, PROXY) as warm:
        held = await warm.report(120)
    if held["held"] != args.warmup_sessions:
        raise RuntimeError(f"warm-up: {held}")
    await asyncio.to_thread(log.wait_for, "websocket_session", args.warmup_sessions, 60)
    before = vm_rss_kib(proxy.pid)
    origin_before = vm_rss_kib(origin.pid)
    async with ClientProc.running(args.sessions, PROXY) as client:
        held = await client.report(args.sessions / 50 + 120)
        during = vm_rss_kib(proxy.pid)
        origin_during = vm_rss_kib(origin.pid)
        client_rss = vm_rss_kib(client.proc.pid)
        checked = await client.check(args.sessions / 100 + 60)
    closed = args.warmup_sessions + held["held"]
    await asyncio.to_thread(log.wait_for, "websocket_session", closed, 120)
    after = vm_rss_kib(proxy.pid)
    n = max(held["held"], 1)
    per_session = (during - before) * 1024 / n / 1000  # kB, as the reference figures
    return {
        "sessions": held["held"],
        "failures": held["failures"],
        "ramp_seconds": held["seconds"],
        "echo_check": checked,
        "proxy_rss_kib": {"before": before, "held": during, "after_close": after},
        "proxy_kb_per_session": round(per_session, 2),
        "origin_kb_per_session": round((origin_during - origin_before) * 1.024 / n, 2),
        "client_rss_kib": client_rss,
        "target_kb": TARGET_KB,
        "pass": per_session <= TARGET_KB and held["held"] == args.sessions,
    }


# --- part 3: where the memory goes, in-process under tracemalloc -----------------------------


class LogSink:
    """Where the in-process proxy's log lines go: rendered as deployed (so their
    allocations count) into a temporary file (the log writes to a file descriptor, not to
    a Python stream), counted by the one event we wait for."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 (open as long as the proxy logs)

    def fileno(self) -> int:
        return self._file.fileno()

    def write(self, text: str) -> int:  # for redirect_stdout's type; the log uses fileno()
        return os.write(self.fileno(), text.encode())

    def flush(self) -> None:
        pass

    def sessions_ended(self) -> int:
        return os.pread(self.fileno(), 1 << 30, 0).count(b'"websocket_session"')

    async def wait_sessions_ended(self, count: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while self.sessions_ended() < count:  # polled with the deadline above
                await asyncio.sleep(0.1)


def in_process_proxy(sink: LogSink) -> tuple[Any, Any]:
    """The proxy's data path as tests/test_websocket.py builds it, logging JSON at info
    into ``sink``."""
    from pool.egress import EgressSet
    from pool.origin import Origin, OriginPool, PoolLimits
    from proxy import logs
    from proxy.routing import Route, Router
    from proxy.server import Listener, Proxy, Settings

    # the report quotes source lines: read them now, as imported, not at report time from
    # files that may have been edited meanwhile
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None) or ""
        if path.startswith(_OURS):
            linecache.getlines(path)
    with contextlib.redirect_stdout(sink):  # type: ignore[type-var]
        logs.configure("json", "info")  # binds sys.stdout as it is now: the sink
    route = Route(HOST, "/", [(Origin("ws", *ORIGIN), 1)])
    pool = OriginPool(EgressSet(list(EGRESS)), PoolLimits())
    proxy = Proxy(Router([route]), pool, Settings(max_connections=20000))
    listener = Listener(proxy, ("127.0.0.1", 0))
    proxy.listeners.append(listener)
    listener.start()
    return proxy, listener


def _where(frame_: tracemalloc.Frame) -> str:
    """``path:line  source``: line numbers alone go stale as the code changes."""
    path = frame_.filename
    for prefix in (str(_ROOT) + "/", sys.prefix + "/", sys.base_prefix + "/"):
        if path.startswith(prefix):
            path = path[len(prefix) :]
            break
    code = linecache.getline(frame_.filename, frame_.lineno).strip()
    return f"{path}:{frame_.lineno}  {code[:70]}"


def _blame(trace: tracemalloc.StatisticDiff) -> str:
    """The innermost frame in the project: which line of ours caused the allocation."""
    for frame_ in reversed(trace.traceback):  # stored oldest first
        if frame_.filename.startswith(_OURS):
            return _where(frame_)
    return "(no proxy/ or pool/ frame: the event loop's own, e.g. accepted transports)"


async def attribute(args: argparse.Namespace, children: Children) -> dict[str, Any]:
    start_origin(children, "raw")
    tracemalloc.start(16)
    sink = LogSink()
    proxy, listener = in_process_proxy(sink)
    address = listener.address
    try:
        async with ClientProc.running(args.warmup_sessions, address) as warm:
            await warm.report(120)
        await sink.wait_sessions_ended(args.warmup_sessions, 60)
        for _ in range(1000):  # closes complete within a few loop iterations, no timer
            if not proxy.clients:
                break
            await asyncio.sleep(0)
        leftover = len(proxy.clients)
        first = tracemalloc.take_snapshot()
        async with ClientProc.running(args.attr_sessions, address) as client:
            held = await client.report(args.attr_sessions / 50 + 120)
            second = tracemalloc.take_snapshot()
    finally:
        listener.close()
        tracemalloc.stop()
    n = max(held["held"], 1)
    keep = [tracemalloc.Filter(False, tracemalloc.__file__)]
    first, second = first.filter_traces(keep), second.filter_traces(keep)
    lines = second.compare_to(first, "lineno")
    total = sum(d.size_diff for d in lines)  # net: what the held sessions keep
    by_line = [d for d in lines if d.size_diff > 0]
    by_trace = [d for d in second.compare_to(first, "traceback") if d.size_diff > 0]
    blame: dict[str, list[int]] = {}
    for d in by_trace:
        entry = blame.setdefault(_blame(d), [0, 0])
        entry[0] += d.size_diff
        entry[1] += d.count_diff
    top_lines = sorted(by_line, key=lambda d: d.size_diff, reverse=True)[: args.top]
    top_blame = sorted(blame.items(), key=lambda kv: kv[1][0], reverse=True)[: args.top]
    return {
        "sessions": held["held"],
        "warmup_clients_left_at_first_snapshot": leftover,
        "traced_bytes_per_session": round(total / n, 1),
        "by_allocating_line": [
            {
                "where": _where(d.traceback[0]),
                "bytes_per_session": round(d.size_diff / n, 1),
                "blocks_per_session": round(d.count_diff / n, 2),
            }
            for d in top_lines
        ],
        "by_proxy_line": [
            {
                "where": where,
                "bytes_per_session": round(size / n, 1),
                "blocks_per_session": round(count / n, 2),
            }
            for where, (size, count) in top_blame
        ],
    }


# --- the benchmark ---------------------------------------------------------------------------


async def run_all(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    if not args.skip_throughput:
        children = Children()
        try:
            summary["throughput"] = await throughput(args, tmp, children)
        finally:
            await asyncio.to_thread(children.stop_all)
    if not args.skip_memory:
        children = Children()
        try:
            summary["memory"] = await memory(args, tmp, children)
        finally:
            await asyncio.to_thread(children.stop_all)
    missed = "memory" in summary and not summary["memory"]["pass"]
    if args.attribute or (missed and not args.no_attribute):
        children = Children()
        try:
            summary["attribution"] = await attribute(args, children)
        finally:
            await asyncio.to_thread(children.stop_all)
    summary["machine"] = machine()
    return summary


def report(summary: dict[str, Any]) -> None:
    t = summary.get("throughput")
    if t is not None:
        print()
        print(
            f"relay throughput, echo, window {t['window']}, {t['rounds']} interleaved rounds, "
            "medians (MB/s: payload one way)"
        )
        print(
            f"{'size':>7}{'msgs':>7}{'direct msg/s':>13}{'MB/s':>8}{'mach':>6}"
            f"{'proxy msg/s':>12}{'MB/s':>8}{'mach':>6}{'ratio':>7}{'proxy us/msg':>13}{'core':>6}"
        )
        for size, row in t["sizes"].items():
            d, p = row["direct"], row["proxy"]
            print(
                f"{int(size):>7}{row['messages']:>7}{d['msg_per_s']:>13,.0f}{d['mb_per_s']:>8.1f}"
                f"{d['machine_busy']:>6.0%}{p['msg_per_s']:>12,.0f}{p['mb_per_s']:>8.1f}"
                f"{p['machine_busy']:>6.0%}{row['proxy/direct']:>7.3f}"
                f"{p['cpu_us_per_msg']:>13.1f}{p['core_busy']:>6.0%}"
            )
        print(
            "  mach: both cores' busy share during the run (client, origin and proxy share them);"
            " ratio: proxy/direct msg/s;\n  proxy us/msg: the proxy's CPU per echoed message"
            " (two frames relayed); core: the proxy's share of one core"
        )
    m = summary.get("memory")
    if m is not None:
        rss = m["proxy_rss_kib"]
        print()
        print(
            f"idle sessions through one worker: {m['sessions']} held "
            f"(failures {m['failures'] or 'none'}, ramp {m['ramp_seconds']} s, "
            f"final echo ok {m['echo_check']['ok']}, bad {m['echo_check']['bad']})"
        )
        print(
            f"proxy VmRSS: {rss['before'] / 1024:.1f} MiB before, {rss['held'] / 1024:.1f} MiB "
            f"held, {rss['after_close'] / 1024:.1f} MiB after they closed"
        )
        refs = ", ".join(f"{k} {v} KB" for k, v in REFERENCE_KB.items())
        print(f"proxy per session: {m['proxy_kb_per_session']:.2f} KB  (reference: {refs})")
        print(
            f"(for scale: the raw origin {m['origin_kb_per_session']:.2f} KB per session; "
            f"client process {m['client_rss_kib'] / 1024:.1f} MiB)"
        )
        label = "PASS" if m["pass"] else "MISS"
        print(f"{label}: proxy RSS per idle session <= {m['target_kb']} KB")
    a = summary.get("attribution")
    if a is not None:
        print()
        print(
            f"where it goes: in-process proxy under tracemalloc, {a['sessions']} sessions, "
            f"{a['traced_bytes_per_session']:.0f} traced bytes per session"
        )
        print("  by allocating line (bytes / blocks per session):")
        for row in a["by_allocating_line"]:
            print(
                f"    {row['bytes_per_session']:>8.0f} B {row['blocks_per_session']:>6.2f}  "
                f"{row['where']}"
            )
        print("  by the proxy line that caused it (innermost proxy/ or pool/ frame):")
        for row in a["by_proxy_line"]:
            print(
                f"    {row['bytes_per_session']:>8.0f} B {row['blocks_per_session']:>6.2f}  "
                f"{row['where']}"
            )
    load = ", ".join(f"{x:.2f}" for x in summary["machine"]["loadavg_after"])
    print(f"load average after: {load}")


def machine() -> dict[str, Any]:
    """What a figure was measured on, written beside it (load average: how quiet it was)."""
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_after": os.getloadavg(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies message counts")
    parser.add_argument("--window", type=int, default=16, help="unanswered messages at most")
    parser.add_argument("--sessions", type=int, default=9000, help="idle sessions held")
    parser.add_argument("--warmup-sessions", type=int, default=300)
    parser.add_argument("--attr-sessions", type=int, default=2000, help="sessions traced")
    parser.add_argument("--top", type=int, default=12, help="allocators listed")
    parser.add_argument("--attribute", action="store_true", help="trace even on PASS")
    parser.add_argument("--no-attribute", action="store_true", help="never trace")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--serve-origin", nargs=2, metavar=("KIND", "FD"), help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=3, metavar=("N", "ADDR", "C"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_origin:
        kind, fd = args.serve_origin
        serve: Callable[[int], Awaitable[None]] = _serve_raw if kind == "raw" else _serve_websockets
        run_loop(serve(int(fd)))
        return 0
    if args.client:
        n, addr, concurrency = args.client
        host, _, port = addr.rpartition(":")
        run_loop(_client(int(n), (host, int(port)), int(concurrency)))
        return 0
    reason = netns.can_create()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    if not 1 <= args.sessions <= 9500 or not 1 <= args.attr_sessions <= 9000:
        parser.error("--sessions 1..9500 and --attr-sessions 1..9000 (20,000 files per process)")
    if not 1 <= args.rounds <= 50 or not 0 < args.scale <= 100 or not 1 <= args.window <= 1024:
        parser.error("--rounds 1..50, --scale (0, 100], --window 1..1024")
    netns.unshare_process(port_range=(20000, 60999))
    tmp = Path(tempfile.mkdtemp(prefix="originpool-ws-"))
    try:
        summary = run_loop(run_all(args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        report(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
