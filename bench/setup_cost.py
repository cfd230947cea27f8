"""Setup cost: WebSocket handshakes and HTTP requests through nginx, HAProxy and originpool,
side by side in one run, one worker each.

Why this exists: issue 13 asks what a session *costs to open* through originpool against the
proxies people would otherwise run, not what it costs to hold (``bench/ws_relay.py``) or what
the pool's connect() costs alone (``bench/connect_latency.py``, ``bench/pool_latency.py``).
Its targets: burst handshakes/s >= 0.8x HAProxy; the sequential median handshake at 0-50% of
the port space <= 1.2x nginx's, and at 90-100% within 1.1x of its own 0-50% figure; HTTP
requests/s >= 0.5x nginx. Absolute figures move with this VM (up to 25% between runs), so
every proxy is measured in the same run and the ratios are what to read.

What runs (as root), every phase in a named network namespace of its own
(``testbed.procs.Space``: ``lo`` up, its own ephemeral range; the host's sysctls are
never written; the namespace is deleted on exit, on Ctrl-C and on errors):

1. **burst**: namespace range R = 2,000 ports, E = 4 egress IPs (127.0.1.1-4), one raw
   WebSocket echo origin (``bench/ws_relay.py``'s RawOrigin: 101, echo, answer Close) on
   127.0.2.1:9000, and the three proxies at once: nginx (``worker_processes 1``, egress by
   ``split_clients`` + ``proxy_bind``), HAProxy (``nbthread 1``, one ``server`` line per
   egress IP with ``source``), originpool (``workers = 1``, ``testbed.run``'s config,
   connectx). A client process (this file, ``--burst-client``, raw uvloop protocols, plain
   connects from 127.0.0.1: ~85 us of its own CPU per session) opens ``--burst`` sessions at
   once, waits for every 101, then closes them all with a Close frame
   (the origin answers and closes first, as RFC 6455 has servers do, so TIME_WAIT lands on
   the origin and not on the proxy's egress ports) and waits for each EOF; ``--bursts`` times
   per round, rounds interleaved across proxies (nginx, HAProxy, originpool, nginx, ...).
   Handshakes/s = sessions opened / summed burst wall time (first connect to last 101);
   handshake = upgrade request written -> 101 read, as the testbed defines it.
2. **sequential**: a fresh namespace per proxy (a proxy's held ports and bind buckets must
   not meet the next one's), range R = ``--seq-range`` ports (9,000), E = 1, the same origin;
   ``testbed.wsclient`` opens E x R sessions one at a time (``--seq-rounds`` passes
   per proxy, interleaved, samples pooled), each verified by an echo
   and held, so the proxy's upstream port space fills from 0 to 100%. The clients take their
   ports from a window outside the range (as the testbed does: an explicit bind by the proxy
   would otherwise starve them) and are sharded over processes run one after the other (one
   at a time still; each process far under the 20,000-file cap). Medians of the handshake per
   utilisation band (0-50 / 50-90 / 90-100% of E x R at the attempt's start).
3. **http**: ``bench/http_rps.py``'s scenario: nginx ``return 200`` as origin (its Python
   origin when nginx is missing), wrk ``-t1 -c50`` keep-alive, ``--rounds`` interleaved
   rounds of ``--duration`` s, medians; nginx ``keepalive 64``, HAProxy's default server-side
   keep-alive, originpool ``http_rps``'s config.
4. **profile**: one more burst round through originpool alone under py-spy (not counted in
   the figures above): where its Python time goes, per handshake.

CPU per handshake and per request: on-CPU time of the proxy's process tree (nginx's master
and worker, HAProxy's single process, originpool's single worker), every thread's
/proc/PID/task/TID/schedstat (nanoseconds), split into user and system in the proportion of
/proc/PID/stat's utime and stime (10 ms ticks, too coarse alone for a thousand handshakes),
before and after each measured step, divided by what the step did; on 2 cores shared with the client
and the origin this is the figure the other load disturbs least. The burst figure includes
each session's close. Every proxy writes one access line per request or session to a file.
Everything this file starts is ended by PID; each load loop is bounded in count and in time.

Run as root::

    .venv/bin/python bench/setup_cost.py            # ~4 minutes on 2 cores
    .venv/bin/python bench/setup_cost.py --quick    # under 2 minutes, smaller everything
    .venv/bin/python bench/setup_cost.py --json out.json
    # before/after in one run: each tree a checkout with its own .venv (pip install -e .)
    .venv/bin/python bench/setup_cost.py --no originpool \
        --variant before=/tmp/before --variant after=/tmp/after
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script, sys.path[0] is bench/, not the repo; make the project importable.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench import http_rps, ws_relay  # noqa: E402  (needs the sys.path line above)
from bench.http_rps import Children  # noqa: E402
from pool import netns  # noqa: E402
from testbed import procs  # noqa: E402
from testbed import run as testbed  # noqa: E402

PROXIES = ("nginx", "haproxy", "originpool")
LABELS = {
    "nginx": "nginx 1 worker",
    "haproxy": "HAProxy nbthread 1",
    "originpool": "originpool 1 worker",
    "originpool-pure": "originpool, pure Python",
}
LISTEN = {
    "originpool": testbed.LISTEN,
    "originpool-pure": http_rps.LISTEN["originpool-pure"],
    "nginx": ("127.0.0.1", 8082),
    "haproxy": ("127.0.0.1", 8084),
}
WS_HOST = testbed.ROUTE_HOST
WS_ORIGIN = ws_relay.ORIGIN  # 127.0.2.1:9000, where testbed.run's config points too
MAX_SESSIONS = 9500  # per proxy process: two files per session under the 20,000 cap
SHARD_SESSIONS = 5000  # per sequential client process
STEP_TIMEOUT = 10.0
PYSPY_ARGS = ("--nonblocking", "-f", "raw", "-o")  # sample without pausing; collapsed stacks
TARGETS = {
    "burst": 0.8,  # originpool / HAProxy handshakes/s, at least
    "seq_low": 1.2,  # originpool / nginx median handshake at 0-50%, at most
    "seq_band": 1.1,  # originpool 90-100% / 0-50% median, at most
    "http": 0.5,  # originpool / nginx requests/s, at least
}
BANDS = (("0-50%", 0.0, 0.5), ("50-90%", 0.5, 0.9), ("90-100%", 0.9, 1.01))
# --variant NAME=TREE: originpool from another checkout (its own .venv), measured beside the
# others in the same run, interleaved; name -> (python, tree). Ports clear of LISTEN's.
VARIANTS: dict[str, tuple[str, Path]] = {}
VARIANT_PORT, VARIANT_ADMIN = 8090, 9200  # variant i: + i (admin: + 10 i)
_TICK = os.sysconf("SC_CLK_TCK")


# --- CPU of a process tree ---------------------------------------------------------------------


def tree_cpu(pid: int) -> tuple[float, float, float]:
    """(user, system, on-CPU) seconds of ``pid`` and every process below it, all threads:
    nginx's worker is its master's child. user and system come from /proc/PID/stat (10 ms
    ticks: the split says how much of a handshake is the kernel's, accept, connect and the
    socket calls); on-CPU from /proc/PID/task/*/schedstat (nanoseconds: 1,000 handshakes at
    100 us are only 10 ticks)."""
    user = system = on_cpu = 0.0
    for p in [pid, *procs.descendants(pid)]:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            tasks = os.listdir(f"/proc/{p}/task")
        except (OSError, IndexError):
            continue  # gone meanwhile
        user += int(fields[11]) / _TICK
        system += int(fields[12]) / _TICK
        for tid in tasks:
            with (
                contextlib.suppress(OSError, ValueError, IndexError),
                open(f"/proc/{p}/task/{tid}/schedstat") as f,
            ):
                on_cpu += int(f.read().split()[0]) / 1e9
    return user, system, on_cpu


@contextlib.contextmanager
def cpu_meter(pid: int) -> Iterator[dict[str, float]]:
    """The tree's CPU spent inside the block, in the dict yielded (filled on exit): total
    from schedstat, split into user and system in the proportion of the stat ticks."""
    out: dict[str, float] = {}
    u0, s0, c0 = tree_cpu(pid)
    try:
        yield out
    finally:
        u1, s1, c1 = tree_cpu(pid)
        total = c1 - c0
        ticks = (u1 - u0) + (s1 - s0)
        user = total * (u1 - u0) / ticks if ticks > 0 else total
        out.update(user=user, system=total - user, total=total)


# --- the proxies ---------------------------------------------------------------------------------

NGINX_WS = """
    access_log {tmp}/{name}-access.log;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
{egress_block}
    upstream ws {{ server {origin_ip}:{origin_port}; }}
    server {{
        listen {ip}:{port};
        location / {{
            proxy_pass http://ws;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_bind {bind};
            proxy_connect_timeout 5s;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
"""

HAPROXY = """
global
    nbthread 1
    maxconn 9700
    log stdout format raw local0
defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout http-request 10s
    maxconn 9700
frontend fe
    bind {ip}:{port} backlog 16384
    default_backend be
backend be
    balance roundrobin
{servers}
"""


def egress_ips(count: int) -> list[str]:
    return [f"127.0.1.{i}" for i in range(1, count + 1)]


def start_nginx(children: Children, tmp: Path, name: str, body: str) -> subprocess.Popen[bytes]:
    """nginx in the foreground on a socket already listening (``NGINX=fd;``), as
    ``bench/http_rps.py`` starts it, with room for 9,000 held sessions (18,000 connections)."""
    conf = tmp / f"{name}.conf"
    conf.write_text(http_rps.nginx_conf(tmp, name, body, nofile=19900, connections=19500))
    sock = ws_relay.listening_socket(LISTEN["nginx"])
    with sock, open(tmp / f"{name}-stderr.log", "wb") as err, procs.critical():
        return children.start(
            ["nginx", "-c", str(conf), "-e", str(tmp / f"{name}-error.log"), "-g", "daemon off;"],
            pass_fds=[sock.fileno()],
            env={**os.environ, "NGINX": f"{sock.fileno()};"},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def nginx_ws_body(tmp: Path, name: str, egress: int) -> str:
    """Egress IPs spread per connection with ``split_clients`` (nginx has no list of source
    addresses); ``proxy_bind`` without a port makes nginx use IP_BIND_ADDRESS_NO_PORT."""
    ips = egress_ips(egress)
    if egress == 1:
        block, bind = "", ips[0]
    else:
        share = math.floor(10000 / egress) / 100
        lines = [f"        {share:.2f}% {ip};" for ip in ips[:-1]] + [f"        * {ips[-1]};"]
        block = '    split_clients "${connection}" $egress {\n' + "\n".join(lines) + "\n    }"
        bind = "$egress"
    ip, port = LISTEN["nginx"]
    return NGINX_WS.format(
        tmp=tmp,
        name=name,
        egress_block=block,
        bind=bind,
        origin_ip=WS_ORIGIN[0],
        origin_port=WS_ORIGIN[1],
        ip=ip,
        port=port,
    )


def wait_listening(address: tuple[str, int], proc: subprocess.Popen[bytes], what: str) -> None:
    """For a server that announces nothing: connect until it accepts (10 s at most)."""
    end = time.monotonic() + 10
    while time.monotonic() < end:
        if proc.poll() is not None:
            break
        with socket.socket() as s:
            s.settimeout(1)
            try:
                s.connect(address)
                return
            except OSError:
                time.sleep(0.05)
    raise RuntimeError(f"{what} is not accepting on {address[0]}:{address[1]}")


def start_haproxy(
    children: Children, tmp: Path, name: str, origin: tuple[str, int], egress: int
) -> subprocess.Popen[bytes]:
    """HAProxy in the foreground (``-db``: one process, no master); one server line per egress
    IP, each with its ``source``, round robin: HAProxy's own way of spreading source IPs.
    ``egress = 0``: no source, the kernel's default (the HTTP phase, as nginx there)."""
    ips = egress_ips(egress)
    servers = [f"    server o{i} {origin[0]}:{origin[1]} source {ip}" for i, ip in enumerate(ips)]
    if not servers:
        servers = [f"    server o0 {origin[0]}:{origin[1]}"]
    ip, port = LISTEN["haproxy"]
    conf = tmp / f"{name}.cfg"
    conf.write_text(HAPROXY.format(ip=ip, port=port, servers="\n".join(servers)))
    check = subprocess.run(
        ["haproxy", "-c", "-q", "-f", str(conf)], capture_output=True, text=True, timeout=30
    )
    if check.returncode:
        raise RuntimeError(f"haproxy -c {conf}: {check.stderr.strip() or check.stdout.strip()}")
    with (
        open(tmp / f"{name}-access.log", "wb") as out,
        open(tmp / f"{name}-stderr.log", "wb") as err,
        procs.critical(),
    ):
        proc = children.start(["haproxy", "-db", "-f", str(conf)], stdout=out, stderr=err)
    try:
        wait_listening(LISTEN["haproxy"], proc, "haproxy")
    except RuntimeError as e:
        stderr = (tmp / f"{name}-stderr.log").read_text()[-1500:]
        raise RuntimeError(f"{e}; stderr: {stderr}") from None
    return proc


def start_originpool_ws(
    children: Children, tmp: Path, name: str, egress: int, port_range: tuple[int, int]
) -> subprocess.Popen[bytes]:
    """The testbed's own config (connectx, E egress IPs, one origin, generous pool limits)."""
    options = testbed.Options(egress=egress, origins=1, port_range=port_range, workers=1)
    path = tmp / f"{name}.toml"
    path.write_text(testbed.proxy_config("connectx", options))
    with procs.critical():
        proc, _ = http_rps.serve_proxy(children, path, 1)
    return proc


def add_variant(spec: str) -> str:
    """``NAME=TREE`` registered as a proxy of its own; ValueError naming what is wrong.
    The tree's proxy runs from the tree (cwd) on the tree's venv, so its compiled twins and
    its code are its own, while this file's clients, origins and configs stay the same."""
    name, sep, tree_text = spec.partition("=")
    if not sep or not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,15}", name):
        raise ValueError(f"--variant {spec!r}: want NAME=TREE, NAME [a-z0-9_-]{{1,16}}")
    if name in LABELS or name in VARIANTS:
        raise ValueError(f"--variant {spec!r}: the name {name!r} is taken")
    tree = Path(tree_text).resolve()
    python = tree / ".venv" / "bin" / "python"
    if not (tree / "proxy" / "cli.py").is_file() or not os.access(python, os.X_OK):
        raise ValueError(f"--variant {spec!r}: {tree} has no proxy/cli.py or no .venv/bin/python")
    i = len(VARIANTS)
    VARIANTS[name] = (str(python), tree)
    LABELS[name] = f"originpool {name}"
    LISTEN[name] = ("127.0.0.1", VARIANT_PORT + i)
    http_rps.ADMIN[name] = VARIANT_ADMIN + 10 * i
    return name


def serve_variant(
    children: Children, name: str, config: Path, workers: int = 1
) -> subprocess.Popen[bytes]:
    """``http_rps.serve_proxy`` with the variant's python and tree: ``serve --config`` as a
    child, returned once every worker logged ready (stderr next to the config)."""
    python, tree = VARIANTS[name]
    log = config.with_suffix(".log")
    with open(config.with_suffix(".stderr"), "wb") as err, open(log, "wb") as out:
        proc = children.start(
            [python, "-m", "proxy.cli", "serve", "--config", str(config)],
            cwd=tree,
            stdout=out,
            stderr=err,
        )
    try:
        http_rps.LogReader(proc, log).wait_for("ready", workers, timeout=30)
    except RuntimeError as e:
        stderr = config.with_suffix(".stderr").read_text()[-2000:]
        raise RuntimeError(f"{name}: {e}; stderr: {stderr}") from e
    return proc


def start_originpool_any(
    children: Children, tmp: Path, name: str, egress: int, port_range: tuple[int, int]
) -> subprocess.Popen[bytes]:
    """The WebSocket phases' originpool, this tree's or a variant's (on its own ports)."""
    if name not in VARIANTS:
        return start_originpool_ws(children, tmp, name, egress, port_range)
    options = testbed.Options(egress=egress, origins=1, port_range=port_range, workers=1)
    text = testbed.proxy_config("connectx", options)
    listen, admin = testbed.LISTEN, testbed.ADMIN
    text = text.replace(f'"{listen[0]}:{listen[1]}"', f'"{LISTEN[name][0]}:{LISTEN[name][1]}"')
    text = text.replace(f'"{admin[0]}:{admin[1]}"', f'"{admin[0]}:{http_rps.ADMIN[name]}"')
    path = tmp / f"{name}.toml"
    path.write_text(text)
    with procs.critical():
        return serve_variant(children, name, path)


def start_originpool_http(
    children: Children, tmp: Path, name: str, env: dict[str, str] | None
) -> subprocess.Popen[bytes]:
    """The HTTP phase's originpool (``http_rps``'s config), this tree's or a variant's."""
    if name not in VARIANTS:
        return http_rps.start_originpool(children, tmp, name, 1, env)
    path = tmp / f"{name}.toml"
    path.write_text(
        http_rps.ORIGINPOOL_CONFIG.format(
            ip=LISTEN[name][0],
            port=LISTEN[name][1],
            admin=http_rps.ADMIN[name],
            host=http_rps.HOST,
            origin_ip=http_rps.ORIGIN[0],
            origin_port=http_rps.ORIGIN[1],
            workers=1,
        )
    )
    return serve_variant(children, name, path)


def available(no: Sequence[str]) -> tuple[list[str], list[str]]:
    """Proxies to measure, and why the others are not: a missing package is a skip."""
    names, notes = [], []
    for name in PROXIES:
        if name in no:
            notes.append(f"{name}: skipped (--no-{name})")
        elif name != "originpool" and shutil.which(name) is None:
            pkg = "nginx" if name == "nginx" else "haproxy"
            notes.append(f"{name}: not installed, skipped (apt-get install -y {pkg})")
        else:
            names.append(name)
    names.extend(VARIANTS)
    return names, notes


_SIGNALLED: list[int] = []


def install_interrupt_handlers() -> Callable[[], None]:
    """procs' handlers (SIGINT and SIGTERM raise KeyboardInterrupt, deferred inside critical
    sections), plus a note of each signal: procs drops one that lands during a cleanup
    (``shielded``), and the run must still stop before its next phase or round."""
    restore = procs.install_interrupt_handlers()
    inner = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        _SIGNALLED.append(signum)
        previous = inner[signum]
        if callable(previous):
            previous(signum, frame)

    for sig in inner:
        signal.signal(sig, handler)
    return restore


def stop_if_signalled() -> None:
    if _SIGNALLED:
        raise KeyboardInterrupt(signal.Signals(_SIGNALLED[0]).name)


@contextlib.contextmanager
def phase_space(tag: str, port_range: tuple[int, int]) -> Iterator[Path]:
    """A named namespace for one phase and a scratch directory; both removed on the way out,
    after every process started inside (the caller's Children) has been ended."""
    space = procs.Space(f"originpool-setup-{os.getpid()}-{tag}")
    tmp = Path(tempfile.mkdtemp(prefix=f"originpool-setup-{tag}-"))
    try:
        space.enter(port_range)
        yield tmp
    finally:
        space.leave()
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def children_of_phase() -> Iterator[Children]:
    children = Children()
    try:
        yield children
    finally:
        with procs.shielded():
            children.stop_all()


# --- the burst client (a child process) ----------------------------------------------------------


class BurstSession(asyncio.Protocol):
    """One session of a burst: the upgrade written on connect, the 101 checked against its
    key, then only the Close reply and the EOF awaited."""

    __slots__ = ("accept", "buf", "closed", "opened", "request", "t_101", "t_sent", "transport")

    def __init__(self, request: bytes, accept: bytes, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.accept = accept
        self.buf = b""
        self.opened: asyncio.Future[str] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.t_sent = 0.0
        self.t_101 = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)
        self.t_sent = time.perf_counter()

    def data_received(self, data: bytes) -> None:
        if self.opened.done():
            return  # the Close reply: nothing to check but that the EOF follows
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        self.t_101 = time.perf_counter()
        head = self.buf[:end]
        self.buf = b""
        status = head.split(b"\r\n", 1)[0]
        if status.startswith(b"HTTP/1.1 101 ") and self.accept in head:
            self.opened.set_result("ok")
        else:
            self.opened.set_result(status.split(b" ")[1].decode() if b" " in status else "bad")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_result("closed")
        if not self.closed.done():
            self.closed.set_result(None)


async def _open(
    loop: asyncio.AbstractEventLoop, address: tuple[str, int], session: BurstSession
) -> str:
    """A plain connect from 127.0.0.1, the kernel's port choice: the cheapest a client can
    open a session (the client shares 2 cores with the proxy and the origin), and no bind
    bucket that the proxies' own connects would have to skip. The proxy closes each client
    connection first (after the origin's close), so no TIME_WAIT piles up on this side."""
    try:
        await loop.create_connection(lambda: session, *address)
    except OSError as e:
        return type(e).__name__
    return await session.opened


async def _burst_client(address: tuple[str, int], host: str, size: int, bursts: int) -> None:
    loop = asyncio.get_running_loop()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime
    close = ws_relay.frame(0x8, (1000).to_bytes(2, "big"), os.urandom(4))
    walls: list[float] = []
    handshakes: list[float] = []
    outcomes: Counter[str] = Counter()
    unclean = 0
    deadline = time.monotonic() + 60 + bursts * 3 * STEP_TIMEOUT
    for _ in range(bursts):
        if time.monotonic() > deadline:
            break
        sessions = []
        for _ in range(size):  # keys made before the clock starts
            key = base64.b64encode(os.urandom(16))
            request = (
                b"GET / HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (host.encode(), key)
            )
            sessions.append(BurstSession(request, ws_relay.accept_key(key), loop))
        t0 = time.perf_counter()
        tasks = [loop.create_task(_open(loop, address, s)) for s in sessions]
        await asyncio.wait(tasks, timeout=STEP_TIMEOUT)  # one timer for the whole burst
        results = []
        for task in tasks:
            if task.done():
                results.append(task.result())
            else:
                task.cancel()
                results.append("timeout")
        ok = [s for s, r in zip(sessions, results, strict=True) if r == "ok"]
        ok_ids = {id(s) for s in ok}
        outcomes.update(results)
        if ok:
            walls.append(max(s.t_101 for s in ok) - t0)
            handshakes.extend(s.t_101 - s.t_sent for s in ok)
        for s in sessions:  # a Close frame each: the origin answers it and closes first
            if s.transport is not None and not s.closed.done():
                if id(s) in ok_ids:
                    s.transport.write(close)
                else:
                    s.transport.abort()
        waits = [s.closed for s in sessions if s.transport is not None]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=STEP_TIMEOUT)
            unclean += len(pending)
        for s in sessions:
            if s.transport is not None and not s.closed.done():
                s.transport.abort()
    out = {
        "event": "result",
        "opened": len(handshakes),
        "outcomes": dict(outcomes),
        "walls": walls,
        "handshake_ms": [round(h * 1000, 4) for h in handshakes],
        "close_timeouts": unclean,
        "client_cpu_s": round(
            (lambda u: u.ru_utime + u.ru_stime)(resource.getrusage(resource.RUSAGE_SELF)) - cpu0, 4
        ),
    }
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


def run_burst_client(
    children: Children, tmp: Path, proxy: str, size: int, bursts: int
) -> dict[str, Any]:
    """This file as ``--burst-client`` for one round; its one JSON line, or why not."""
    address = LISTEN[proxy]
    out_path = tmp / f"burst-{proxy}.json"
    with open(out_path, "wb") as out, procs.critical():
        proc = children.start(
            [
                sys.executable,
                __file__,
                "--burst-client",
                f"{address[0]}:{address[1]}",
                WS_HOST,
                str(size),
                str(bursts),
            ],
            stdout=out,
        )
    try:
        proc.wait(timeout=60 + bursts * 3 * STEP_TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
        raise RuntimeError(f"burst client against {proxy} did not finish") from None
    text = out_path.read_text().strip()
    if proc.returncode or not text:
        raise RuntimeError(f"burst client against {proxy} exited {proc.returncode}")
    return dict(json.loads(text.splitlines()[-1]))


# --- phase 1: bursts -----------------------------------------------------------------------------


@dataclass
class BurstFigures:
    """One proxy's bursts over every round."""

    opened: int = 0
    wall: float = 0.0
    handshake_ms: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(
        default_factory=lambda: {"user": 0.0, "system": 0.0, "total": 0.0}
    )
    failures: Counter[str] = field(default_factory=Counter)
    close_timeouts: int = 0
    round_rates: list[float] = field(default_factory=list)
    client_cpu: float = 0.0
    origin_cpu: float = 0.0

    def add(self, result: dict[str, Any], cpu: dict[str, float], origin: dict[str, float]) -> float:
        self.opened += result["opened"]
        self.client_cpu += result["client_cpu_s"]
        self.origin_cpu += origin["total"]
        self.wall += sum(result["walls"])
        self.handshake_ms.extend(result["handshake_ms"])
        for key in self.cpu:
            self.cpu[key] += cpu[key]
        self.failures.update({k: v for k, v in result["outcomes"].items() if k != "ok"})
        self.close_timeouts += result["close_timeouts"]
        rate = result["opened"] / max(sum(result["walls"]), 1e-9)
        self.round_rates.append(rate)
        return rate

    def summary(self) -> dict[str, Any]:
        n = max(self.opened, 1)
        hs = sorted(self.handshake_ms)
        return {
            "opened": self.opened,
            "handshakes_per_s": round(self.opened / max(self.wall, 1e-9), 1),
            "round_rates": [round(r, 1) for r in self.round_rates],
            "median_handshake_ms": round(statistics.median(hs), 3) if hs else None,
            "p90_handshake_ms": round(hs[int(0.9 * (len(hs) - 1))], 3) if hs else None,
            "cpu_us_per_handshake": round(self.cpu["total"] / n * 1e6, 1),
            "user_us_per_handshake": round(self.cpu["user"] / n * 1e6, 1),
            "system_us_per_handshake": round(self.cpu["system"] / n * 1e6, 1),
            "failures": dict(self.failures),
            "close_timeouts": self.close_timeouts,
            "client_us_per_handshake": round(self.client_cpu / n * 1e6, 1),
            "origin_us_per_handshake": round(self.origin_cpu / n * 1e6, 1),
            "per_core_handshakes_per_s": round(self.opened / max(self.cpu["total"], 1e-9), 1),
        }


def phase_burst(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    port_range = (40000, 40000 + args.burst_range - 1)
    figures = {name: BurstFigures() for name in names}
    profile: dict[str, Any] | None = None
    with phase_space("burst", port_range) as tmp, children_of_phase() as children:
        origin = ws_relay.start_origin(children, "raw")
        pids: dict[str, int] = {}
        for name in names:
            if name == "nginx":
                body = nginx_ws_body(tmp, "nginx", args.egress)
                proc = start_nginx(children, tmp, "nginx", body)
            elif name == "haproxy":
                proc = start_haproxy(children, tmp, "haproxy", WS_ORIGIN, args.egress)
            else:
                proc = start_originpool_any(children, tmp, name, args.egress, port_range)
            wait_listening(LISTEN[name], proc, name)
            pids[name] = proc.pid
        for name in names:
            warm = run_burst_client(children, tmp, name, args.burst, 1)  # lazy imports, caches
            if warm["opened"] != args.burst:
                raise RuntimeError(f"{name}: warm-up burst opened {warm['opened']}: {warm}")
        for r in range(args.rounds):
            stop_if_signalled()
            for name in names:
                with cpu_meter(pids[name]) as cpu, cpu_meter(origin.pid) as origin_cpu:
                    result = run_burst_client(children, tmp, name, args.burst, args.bursts)
                rate = figures[name].add(result, cpu, origin_cpu)
                bad = {k: v for k, v in result["outcomes"].items() if k != "ok"}
                print(
                    f"  burst round {r + 1} {LABELS[name]:<22} {rate:>8,.0f} handshakes/s"
                    f"  median {statistics.median(result['handshake_ms'] or [0]):6.2f} ms"
                    f"  {cpu['total'] / max(result['opened'], 1) * 1e6:6.0f} us CPU/handshake"
                    + (f"  FAILURES {bad}" if bad else ""),
                    flush=True,
                )
        if "originpool" in names and not args.no_profile:
            profile = profile_originpool(args, children, tmp, pids["originpool"])
    return {
        "egress": args.egress,
        "port_range": list(port_range),
        "burst": args.burst,
        "bursts_per_round": args.bursts,
        "rounds": args.rounds,
        "proxies": {name: f.summary() for name, f in figures.items()},
        "profile": profile,
    }


# --- the profile -----------------------------------------------------------------------------


def _frame_key(frame: str) -> tuple[str, str]:
    """``func (path:line)`` -> (func, short path): samples of one function add up across
    its lines."""
    func, _, where = frame.rpartition(" (")
    path = where.rstrip(")").rpartition(":")[0]
    for prefix in (str(_ROOT) + "/", sys.prefix + "/", sys.base_prefix + "/"):
        if path.startswith(prefix):
            path = path[len(prefix) :]
            break
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    return func or frame, path


LOOP = ("event loop: uvloop's C code and the syscalls it makes", "")
_ENTRY_FILES = ("<frozen runpy>", "proxy/cli.py", "asyncio/runners.py", "uvloop/__init__.py")
_ENTRY_FUNCS = (("proxy/app.py", "serve"), ("proxy/worker.py", "_run_one"))


def _is_entry(key: tuple[str, str]) -> bool:
    """The frames under every sample (runpy, the CLI, serve, the loop's run): while only they
    are on the stack, the time is uvloop's own, not any Python callback's."""
    func, path = key
    return path in _ENTRY_FILES or (path, func) in _ENTRY_FUNCS


def _area(path: str) -> str:
    if not path:
        return "event loop (uvloop C code, syscalls)"
    if path.startswith(("proxy/", "pool/")):
        return path
    return path.split("/", 1)[0] if "/" in path else path


def parse_pyspy_raw(text: str, top: int) -> dict[str, Any]:
    """py-spy's collapsed stacks: self samples by leaf function, inclusive samples by
    function (once per stack), and self samples by file (the project's) or package. The
    entry frames are cut off each stack, so a sample with nothing above them is the loop's."""
    self_: Counter[tuple[str, str]] = Counter()
    incl: Counter[tuple[str, str]] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [
            _frame_key(f) for f in stack.split(";") if not f.startswith(("thread ", "process "))
        ]
        while frames and _is_entry(frames[0]):
            frames.pop(0)
        if not frames:
            frames = [LOOP]
        total += n
        self_[frames[-1]] += n
        areas[_area(frames[-1][1])] += n
        for key in set(frames):
            incl[key] += n

    def rows(counter: Counter[Any]) -> list[dict[str, Any]]:
        out = []
        for k, v in counter.most_common(top):
            what = k if isinstance(k, str) else k[0] if not k[1] else f"{k[0]}  ({k[1]})"
            out.append({"what": what, "share": v / max(total, 1)})
        return out

    return {
        "samples": total,
        "self": rows(self_),
        "inclusive": rows(incl),
        "areas": rows(areas),
    }


def profile_originpool(
    args: argparse.Namespace, children: Children, tmp: Path, pid: int
) -> dict[str, Any]:
    """One unmeasured burst round through originpool under py-spy (sampling without pausing
    the process, ``--nonblocking``, so the worker runs close to its normal speed)."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        return {"error": "py-spy not installed: .venv/bin/pip install py-spy"}
    raw = tmp / "pyspy.txt"
    with open(tmp / "pyspy.stderr", "wb") as err, procs.critical():
        spy = children.start(
            [pyspy, "record", "-p", str(pid), "-r", str(args.profile_rate), *PYSPY_ARGS, str(raw)],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    time.sleep(1.0)  # py-spy attaches
    try:
        with cpu_meter(pid) as cpu:
            result = run_burst_client(children, tmp, "originpool", args.burst, args.profile_bursts)
    finally:
        if spy.poll() is None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(timeout=5)
    if not raw.exists():
        err_text = (tmp / "pyspy.stderr").read_text(errors="replace")[-800:]
        return {"error": f"py-spy wrote nothing: {err_text}"}
    out = parse_pyspy_raw(raw.read_text(), args.top)
    n = max(result["opened"], 1)
    out.update(
        opened=result["opened"],
        cpu_us_per_handshake=round(cpu["total"] / n * 1e6, 1),
        user_us_per_handshake=round(cpu["user"] / n * 1e6, 1),
        system_us_per_handshake=round(cpu["system"] / n * 1e6, 1),
        rate_hz=args.profile_rate,
    )
    return out


# --- phase 2: sequential, 0 to 100% of E x R -----------------------------------------------------


def phase_sequential(args: argparse.Namespace, name: str) -> dict[str, Any]:
    port_range = (40000, 40000 + args.seq_range - 1)
    limit = args.seq_range  # E = 1, one origin
    window = testbed.client_port_window(port_range)
    shards = max(1, math.ceil(limit / SHARD_SESSIONS))
    with phase_space(f"seq-{name}", port_range) as tmp, children_of_phase() as children:
        ws_relay.start_origin(children, "raw")
        if name == "nginx":
            proxy = start_nginx(children, tmp, "nginx", nginx_ws_body(tmp, "nginx", 1))
        elif name == "haproxy":
            proxy = start_haproxy(children, tmp, "haproxy", WS_ORIGIN, 1)
        else:
            proxy = start_originpool_any(children, tmp, name, 1, port_range)
        wait_listening(LISTEN[name], proxy, name)
        env = {**os.environ, "PYTHONPATH": str(_ROOT), "PYTHONUNBUFFERED": "1"}
        clients = procs.Children(tmp, env)
        try:
            return _sequential_load(args, name, proxy.pid, clients, limit, shards, window)
        finally:
            for client in clients.all:
                client.send("close")
            clients.end_all(grace=30)


def _sequential_load(
    args: argparse.Namespace,
    name: str,
    pid: int,
    clients: procs.Children,
    limit: int,
    shards: int,
    window: tuple[int, int] | None,
) -> dict[str, Any]:
    """Shards one after the other, each opening its share one at a time while the earlier
    ones hold theirs: one session in flight at any moment, E x R held at the end."""
    base, extra = divmod(limit, shards)
    offsets: list[int] = []
    held = 0
    started = time.monotonic()
    with cpu_meter(pid) as cpu:
        for i in range(shards):
            argv = [
                sys.executable,
                "-m",
                "testbed.wsclient",
                "--connect",
                f"{LISTEN[name][0]}:{LISTEN[name][1]}",
                "--host",
                WS_HOST,
                "--sources",
                f"127.3.{i}.1-127.3.{i}.16",
                "--sessions",
                str(base + (i < extra)),
                "--limit",
                str(limit),
                "--timeout",
                str(STEP_TIMEOUT),
                "--deadline",
                str(args.seq_deadline),
                "--control",
            ]
            if window is not None:
                argv += ["--ports", f"{window[0] + 100}-{window[1]}"]
            child = clients.start(f"client-{i}", argv, stdin=True)
            offsets.append(held)
            done = clients.wait_for(child, "ramp_done", args.seq_deadline + 60)[0]
            held += int(done["held"])
    ramp = time.monotonic() - started
    for child in clients.all:
        child.send("check")
    results = [
        clients.wait_for(c, "result", STEP_TIMEOUT * (2 + limit // 1000) + 30)[0]
        for c in clients.all
    ]
    bands: dict[str, list[float]] = {band: [] for band, _, _ in BANDS}
    failures: Counter[str] = Counter()
    first_failure: dict[str, Any] | None = None
    for offset, result in zip(offsets, results, strict=True):
        for _started, _finished, outcome, ms, held_before in result["records"]:
            util = (offset + held_before) / limit
            if outcome != "ok" or ms is None:
                failures[outcome] += 1
                if first_failure is None:
                    first_failure = {"outcome": outcome, "utilisation": round(util, 4)}
                continue
            for band, lo, hi in BANDS:
                if lo <= util < hi:
                    bands[band].append(ms)
                    break
    medians = {b: round(statistics.median(v), 3) if v else None for b, v in bands.items()}
    low, high = medians["0-50%"], medians["90-100%"]
    attempts = sum(len(r["records"]) for r in results)
    lost = sum(int(r["lost"]) for r in results)
    print(
        f"  sequential {LABELS[name]:<22} held {held:,}/{limit:,}  median ms "
        + "  ".join(f"{b} {m if m is None else f'{m:.3f}'}" for b, m in medians.items())
        + f"  ramp {ramp:.0f} s"
        + (f"  FAILURES {dict(failures)}" if failures else "")
        + (f"  lost {lost}" if lost else ""),
        flush=True,
    )
    return {
        "limit": limit,
        "held": held,
        "attempts": attempts,
        "lost_at_final_echo": lost,
        "failures": dict(failures),
        "first_failure": first_failure,
        "median_handshake_ms": medians,
        "samples": {b: len(v) for b, v in bands.items()},
        "band_ratio": round(high / low, 3) if low and high else None,
        "ramp_s": round(ramp, 1),
        "cpu_us_per_session": round(cpu["total"] / max(attempts, 1) * 1e6, 1),
        "client_processes": shards,
        "bands_ms": bands,
    }


def merge_sequential(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """One proxy's passes as one figure: medians over every pass's samples pooled, so a
    neighbour's burst during one pass weighs as its share of the samples."""
    bands = {b: [ms for p in passes for ms in p["bands_ms"][b]] for b, _, _ in BANDS}
    medians = {b: round(statistics.median(v), 3) if v else None for b, v in bands.items()}
    low, high = medians["0-50%"], medians["90-100%"]
    failures: Counter[str] = Counter()
    for p in passes:
        failures.update(p["failures"])
    return {
        "passes": len(passes),
        "limit": passes[0]["limit"],
        "held": min(p["held"] for p in passes),
        "attempts": sum(p["attempts"] for p in passes),
        "lost_at_final_echo": sum(p["lost_at_final_echo"] for p in passes),
        "failures": dict(failures),
        "first_failure": next((p["first_failure"] for p in passes if p["first_failure"]), None),
        "median_handshake_ms": medians,
        "samples": {b: len(v) for b, v in bands.items()},
        "band_ratio": round(high / low, 3) if low and high else None,
        "band_ratio_per_pass": [p["band_ratio"] for p in passes],
        "ramp_s": [p["ramp_s"] for p in passes],
        "cpu_us_per_session": round(statistics.mean(p["cpu_us_per_session"] for p in passes), 1),
        "client_processes": passes[0]["client_processes"],
    }


# --- phase 3: HTTP requests/s ------------------------------------------------------------------


def phase_http(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """``bench/http_rps.py``'s origin, originpool config, nginx proxy config and wrk run; HAProxy
    added on the same origin."""
    have_nginx = shutil.which("nginx") is not None
    runs: dict[str, list[http_rps.WrkRun]] = {n: [] for n in names}
    cpu_us: dict[str, list[float]] = {n: [] for n in names}
    with phase_space("http", (20000, 60999)) as tmp, children_of_phase() as children:
        if have_nginx:
            body = http_rps.BODY.decode().replace("\n", "\\n")
            origin_conf = http_rps.NGINX_ORIGIN.format(
                ip=http_rps.ORIGIN[0], port=http_rps.ORIGIN[1], body=body
            )
            with procs.critical():
                http_rps.start_nginx(children, tmp, "origin", origin_conf, http_rps.ORIGIN)
            origin_kind = "nginx 1 worker, return 200"
        else:
            with procs.critical():
                http_rps.start_python_origin(children)
            origin_kind = "python (uvloop) fixed response (nginx not installed)"
        pids: dict[str, int] = {}
        for name in names:
            if name == "nginx":
                conf = http_rps.NGINX_PROXY.format(
                    tmp=tmp,
                    origin_ip=http_rps.ORIGIN[0],
                    origin_port=http_rps.ORIGIN[1],
                    ip=LISTEN["nginx"][0],
                    port=LISTEN["nginx"][1],
                )
                with procs.critical():
                    proc = http_rps.start_nginx(children, tmp, "proxy", conf, LISTEN["nginx"])
            elif name == "haproxy":
                proc = start_haproxy(children, tmp, "haproxy", http_rps.ORIGIN, 0)
            else:
                env = http_rps.PURE_ENV if name == "originpool-pure" else None
                with procs.critical():
                    proc = start_originpool_http(children, tmp, name, env)
            pids[name] = proc.pid
        for name in names:
            warm = http_rps.run_wrk(LISTEN[name], args.warmup, args.connections, 1)
            if not warm.clean:
                raise RuntimeError(f"{name}: HTTP warm-up had errors: {warm}")
        for r in range(args.rounds):
            stop_if_signalled()
            for name in names:
                with cpu_meter(pids[name]) as cpu:
                    result = http_rps.run_wrk(LISTEN[name], args.duration, args.connections, 1)
                runs[name].append(result)
                cpu_us[name].append(cpu["total"] / max(result.requests, 1) * 1e6)
                flag = "" if result.clean else f"  ERRORS {result}"
                print(
                    f"  http round {r + 1} {LABELS[name]:<22} {result.rps:>10,.0f} req/s"
                    f"  p50 {result.p50_ms:6.3f} ms  {cpu_us[name][-1]:6.1f} us CPU/req{flag}",
                    flush=True,
                )
    return {
        "origin": origin_kind,
        "wrk": f"-t1 -c{args.connections} -d{args.duration}s, {args.rounds} rounds",
        "proxies": {
            name: {
                "rps": round(statistics.median(r.rps for r in runs[name]), 1),
                "p50_ms": round(statistics.median(r.p50_ms for r in runs[name]), 3),
                "cpu_us_per_request": round(statistics.median(cpu_us[name]), 2),
                "all_clean": all(r.clean for r in runs[name]),
            }
            for name in names
        },
    }


# --- report -----------------------------------------------------------------------------------


def _get(d: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


@dataclass
class Row:
    """One measure: how to read it from each proxy's figures, its unit, its format."""

    label: str
    read: Callable[[dict[str, Any], str], float | None]
    fmt: str


def rows(summary: dict[str, Any]) -> list[Row]:
    b, s, h = summary.get("burst"), summary.get("sequential"), summary.get("http")
    burst_label = "burst handshakes/s"
    if b:
        size = b["port_range"][1] - b["port_range"][0] + 1
        burst_label += f" ({b['burst']} at once, E={b['egress']} R={size:,})"
    seq = f"seq. median handshake ms (E=1, R={summary['settings']['seq_range']:,})"
    return [
        Row(burst_label, lambda _s, p: _get(b, "proxies", p, "handshakes_per_s"), ",.0f"),
        Row(
            "burst median handshake ms",
            lambda _s, p: _get(b, "proxies", p, "median_handshake_ms"),
            ".2f",
        ),
        Row(
            "burst CPU us/handshake (user+sys, close included)",
            lambda _s, p: _get(b, "proxies", p, "cpu_us_per_handshake"),
            ",.0f",
        ),
        Row(
            "burst handshakes/s per core (1 / CPU per handshake)",
            lambda _s, p: _get(b, "proxies", p, "per_core_handshakes_per_s"),
            ",.0f",
        ),
        Row(f"{seq} 0-50%", lambda _s, p: _get(s, p, "median_handshake_ms", "0-50%"), ".3f"),
        Row(f"{seq} 50-90%", lambda _s, p: _get(s, p, "median_handshake_ms", "50-90%"), ".3f"),
        Row(f"{seq} 90-100%", lambda _s, p: _get(s, p, "median_handshake_ms", "90-100%"), ".3f"),
        Row("seq. band ratio 90-100% / 0-50%", lambda _s, p: _get(s, p, "band_ratio"), ".2f"),
        Row(
            "seq. CPU us/session (handshake + 1 echo)",
            lambda _s, p: _get(s, p, "cpu_us_per_session"),
            ",.0f",
        ),
        Row(
            "HTTP req/s (wrk -t1 -c50, keep-alive)",
            lambda _s, p: _get(h, "proxies", p, "rps"),
            ",.0f",
        ),
        Row(
            "HTTP CPU us/request", lambda _s, p: _get(h, "proxies", p, "cpu_us_per_request"), ".1f"
        ),
    ]


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def table(summary: dict[str, Any], markdown: bool) -> list[str]:
    names = summary["names"]
    out: list[str] = []
    variants = [n for n in names if n in summary.get("variants", {})]
    ours = [n for n in ("originpool", *variants) if n in names] or ["originpool"]
    shown = [*(p for p in PROXIES if p != "originpool" or p in names or not variants), *variants]
    ratios = [(o, other) for o in ours for other in ("nginx", "haproxy")]
    ratios += [(o, ours[0]) for o in ours[1:]]  # each variant against the first
    short = {"originpool": "op", "nginx": "nginx", "haproxy": "HAProxy"}
    head = ["measure", *(LABELS[n] for n in shown)]
    head += [f"{short.get(a, a)}/{short.get(b, b)}" for a, b in ratios]
    body: list[list[str]] = []
    for row in rows(summary):
        values = {p: (row.read(summary, p) if p in names else None) for p in shown}
        body.append(
            [
                row.label,
                *(_fmt(values[p], row.fmt) for p in shown),
                *(_ratio(values[a], values[b]) for a, b in ratios),
            ]
        )
    if markdown:
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        out.extend("| " + " | ".join(r) + " |" for r in body)
        return out
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    for r in [head, *body]:
        out.append(
            "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
        )
    return out


def verdicts(summary: dict[str, Any]) -> list[str]:
    """The issue's four targets, each PASS, MISS or not measured (and why)."""
    b, s, h = summary.get("burst"), summary.get("sequential"), summary.get("http")
    out: list[str] = []

    def line(ok: bool | None, text: str) -> None:
        out.append(f"{'not measured' if ok is None else 'PASS' if ok else 'MISS'}: {text}")

    op, ha = (
        _get(b, "proxies", "originpool", "handshakes_per_s"),
        _get(b, "proxies", "haproxy", "handshakes_per_s"),
    )
    r = op / ha if op and ha else None
    line(
        None if r is None else r >= TARGETS["burst"],
        f"burst handshakes/s originpool / HAProxy >= {TARGETS['burst']} ({_ratio(op, ha)})",
    )
    op, ng = (
        _get(s, "originpool", "median_handshake_ms", "0-50%"),
        _get(s, "nginx", "median_handshake_ms", "0-50%"),
    )
    r = op / ng if op and ng else None
    line(
        None if r is None else r <= TARGETS["seq_low"],
        f"sequential 0-50% median originpool / nginx <= {TARGETS['seq_low']} ({_ratio(op, ng)})",
    )
    band = _get(s, "originpool", "band_ratio")
    line(
        None if band is None else band <= TARGETS["seq_band"],
        f"originpool 90-100% / 0-50% median <= {TARGETS['seq_band']} ({_fmt(band, '.2f')})",
    )
    op, ng = _get(h, "proxies", "originpool", "rps"), _get(h, "proxies", "nginx", "rps")
    r = op / ng if op and ng else None
    line(
        None if r is None else r >= TARGETS["http"],
        f"HTTP req/s originpool / nginx >= {TARGETS['http']} ({_ratio(op, ng)})",
    )
    return out


def print_method(args: argparse.Namespace, names: list[str], notes: list[str]) -> None:
    print(
        "setup cost: nginx, HAProxy and originpool, one worker each, in front of the same origins"
    )
    print(
        f"  burst: {args.rounds} interleaved rounds x {args.bursts} bursts of {args.burst} "
        f"sessions opened at once, E={args.egress} egress IPs, R={args.burst_range:,} ports; "
        "raw WebSocket echo origin; handshake = upgrade written -> 101 read; handshakes/s = "
        "opened / summed burst wall time (first connect -> last 101); bursts closed by Close "
        "frames"
    )
    print(
        f"  sequential: E=1, R={args.seq_range:,} ports, sessions opened one at a time (echo "
        "verified) and held up to 100% of E x R, a fresh namespace per proxy and pass, "
        f"{args.seq_rounds} interleaved passes; medians per utilisation band 0-50 / 50-90 / "
        "90-100% over the passes' samples pooled"
    )
    print(
        f"  http: bench/http_rps.py's scenario, wrk -t1 -c{args.connections} -d{args.duration}s "
        f"keep-alive, {args.rounds} interleaved rounds, medians"
    )
    print(
        "  CPU: on-CPU time of each proxy's process tree, all threads (/proc/PID/task/*/schedstat;"
        " user/system split by /proc/PID/stat's ticks) around each step, per handshake (its "
        "close included) or per request"
    )
    if not (args.no_profile or args.skip_burst):
        print(
            f"  profile: {args.profile_bursts} more bursts through originpool under py-spy "
            f"--nonblocking ({args.profile_rate} Hz), not counted above; a Python function's "
            "self time includes the C calls and syscalls it makes"
        )
    print(
        f"  proxies: {', '.join(LABELS[n] for n in names)}; machine: {os.cpu_count()} CPUs, "
        f"kernel {platform.release()}, Python {platform.python_version()}"
    )
    for name, (python, tree) in VARIANTS.items():
        print(f"  variant {name}: originpool of {tree}, run by {python} from that tree")
    for note in notes:
        print(f"  {note}")
    print(flush=True)


def report(summary: dict[str, Any]) -> None:
    print()
    print("figures (ratios: originpool / the other proxy)")
    for line in table(summary, markdown=False):
        print("  " + line)
    b, s, h = summary.get("burst"), summary.get("sequential"), summary.get("http")
    notes = []
    for name in summary["names"]:
        bad = _get(b, "proxies", name, "failures")
        if bad:
            notes.append(f"{name} burst failures {bad}")
        closes = _get(b, "proxies", name, "close_timeouts")
        if closes:
            notes.append(
                f"{name}: {closes} burst sessions not closed by the proxy within {STEP_TIMEOUT:g} s"
            )
        sf = _get(s, name)
        if sf and (sf["failures"] or sf["lost_at_final_echo"] or sf["held"] != sf["limit"]):
            notes.append(
                f"{name} sequential: held {sf['held']}/{sf['limit']}, failures {sf['failures']}, "
                f"first {sf['first_failure']}, lost at the final echo {sf['lost_at_final_echo']}"
            )
        if h and name in h["proxies"] and not h["proxies"][name]["all_clean"]:
            notes.append(f"{name} HTTP: some wrk runs had errors")
    pure = _get(h, "proxies", "originpool-pure")
    compiled = _get(h, "proxies", "originpool")
    if pure and compiled:
        notes.append(
            "A/B, compiled accelerator (proxy._whole) against pure Python, same run: "
            f"{compiled['rps']:,.0f} / {pure['rps']:,.0f} req/s = "
            f"{compiled['rps'] / pure['rps']:.2f}x; CPU/request "
            f"{compiled['cpu_us_per_request']:.1f} / {pure['cpu_us_per_request']:.1f} us"
        )
    if b:
        split = ", ".join(
            f"{n} {p['user_us_per_handshake']:.0f}/{p['system_us_per_handshake']:.0f}"
            for n, p in b["proxies"].items()
        )
        notes.append(f"burst CPU us per handshake, user/system: {split}")
        load = ", ".join(
            f"{n} {p['client_us_per_handshake']:.0f}/{p['origin_us_per_handshake']:.0f}"
            for n, p in b["proxies"].items()
        )
        notes.append(
            f"burst load side, CPU us per handshake, client/origin: {load} (client, origin and "
            "proxy share 2 cores: nginx's and HAProxy's rates are bound by the machine, so "
            "compare CPU per handshake and its inverse, handshakes/s per core, too)"
        )
    if s:
        per_pass = ", ".join(
            f"{n} " + " / ".join(_fmt(r, ".2f") for r in p["band_ratio_per_pass"])
            for n, p in s.items()
        )
        notes.append(f"sequential band ratio 90-100% / 0-50% of each pass: {per_pass}")
    if h:
        notes.append(f"HTTP origin: {h['origin']}")
    for note in notes:
        print(f"  {note}")
    print()
    for line in verdicts(summary):
        print(line)
    prof = _get(b, "profile")
    if prof:
        print()
        if "error" in prof:
            print(f"profile: {prof['error']}")
        else:
            per = prof["cpu_us_per_handshake"]
            print(
                f"where originpool's time goes per handshake (py-spy, {prof['samples']:,} samples "
                f"at {prof['rate_hz']} Hz over {prof['opened']:,} handshakes; {per:.0f} us CPU "
                f"each in that round: {prof['user_us_per_handshake']:.0f} user, "
                f"{prof['system_us_per_handshake']:.0f} system; us = share x {per:.0f})"
            )
            for title, key in (
                ("by file or package (self)", "areas"),
                ("by function, self", "self"),
                ("by function, inclusive", "inclusive"),
            ):
                print(f"  {title}:")
                for r in prof[key]:
                    print(f"    {r['share']:6.1%} {r['share'] * per:7.1f} us  {r['what']}")
    print()
    print("README table (markdown):")
    for line in table(summary, markdown=True):
        print(line)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average after: {load}; total {summary['seconds']:.0f} s")


# --- main -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    names, notes = available(args.no)
    print_method(args, names, notes)
    started = time.monotonic()
    summary: dict[str, Any] = {
        "names": names,
        "notes": notes,
        "variants": {n: str(tree) for n, (_python, tree) in VARIANTS.items()},
        "settings": {
            k: getattr(args, k)
            for k in (
                "quick",
                "rounds",
                "burst",
                "bursts",
                "egress",
                "burst_range",
                "seq_range",
                "seq_rounds",
                "duration",
            )
        },
    }
    if not args.skip_burst:
        summary["burst"] = phase_burst(args, names)
    stop_if_signalled()
    if not args.skip_sequential:
        passes: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for _ in range(args.seq_rounds):  # interleaved, as the other phases' rounds
            for name in names:
                stop_if_signalled()
                passes[name].append(phase_sequential(args, name))
        summary["sequential"] = {name: merge_sequential(p) for name, p in passes.items()}
    stop_if_signalled()
    if not args.skip_http:
        if shutil.which("wrk") is None:
            notes.append("http: wrk is not installed, skipped (apt-get install -y wrk)")
            print(f"  {notes[-1]}")
        else:
            ab = ["originpool-pure"] if args.ab_pure and "originpool" in names else []
            summary["http"] = phase_http(args, names + ab)
    summary["seconds"] = time.monotonic() - started
    summary["machine"] = ws_relay.machine()
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="everything scaled down (< 2 min)")
    parser.add_argument(
        "--ab-pure",
        action="store_true",
        help="HTTP phase: also originpool with ORIGINPOOL_NO_EXTENSIONS=1 (the A/B of the"
        " compiled accelerator, proxy._whole)",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds, burst and http (3)")
    parser.add_argument("--burst", type=int, default=250, help="sessions opened at once")
    parser.add_argument("--bursts", type=int, help="bursts per round (8)")
    parser.add_argument("--egress", type=int, default=4, help="egress IPs E in the burst phase")
    parser.add_argument("--burst-range", type=int, default=2000, help="R in the burst phase")
    parser.add_argument(
        "--seq-range", type=int, help="R (= sessions) in the sequential phase (9000)"
    )
    parser.add_argument("--seq-rounds", type=int, help="sequential passes per proxy (2)")
    parser.add_argument(
        "--seq-deadline", type=float, default=300.0, help="seconds per client shard"
    )
    parser.add_argument("--duration", type=int, help="seconds per wrk run (10)")
    parser.add_argument("--warmup", type=int, help="seconds of wrk warm-up per proxy (2)")
    parser.add_argument("--connections", type=int, default=50, help="wrk -c")
    parser.add_argument("--profile-rate", type=int, default=1000, help="py-spy samples/s")
    parser.add_argument("--profile-bursts", type=int, help="bursts under py-spy (24)")
    parser.add_argument("--top", type=int, default=12, help="profile rows per list")
    parser.add_argument("--no", action="append", default=[], choices=PROXIES, help="skip a proxy")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=TREE",
        help="also originpool from checkout TREE, run on TREE/.venv/bin/python (repeatable;"
        " interleaved with the others: before/after in one run)",
    )
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--skip-burst", action="store_true")
    parser.add_argument("--skip-sequential", action="store_true")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    parser.add_argument(
        "--burst-client", nargs=4, metavar=("ADDR", "HOST", "N", "B"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.burst_client:
        addr, host, n, bursts = args.burst_client
        ip, _, port = addr.rpartition(":")
        ws_relay.run_loop(_burst_client((ip, int(port)), host, int(n), int(bursts)))
        return 0
    quick = {"rounds": 1, "bursts": 4, "profile_bursts": 8, "seq_range": 2000, "seq_rounds": 1}
    full = {"rounds": 3, "bursts": 8, "profile_bursts": 24, "seq_range": 9000, "seq_rounds": 2}
    quick.update(duration=3, warmup=1)
    full.update(duration=10, warmup=2)
    defaults = quick if args.quick else full
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 1 <= args.rounds <= 20 or not 1 <= args.bursts <= 100 or not 1 <= args.burst <= 2000:
        parser.error("--rounds 1..20, --bursts 1..100, --burst 1..2000")
    if not 1 <= args.egress <= 254 or not 256 <= args.burst_range <= 20000:
        parser.error("--egress 1..254, --burst-range 256..20000")
    if not 100 <= args.seq_range <= MAX_SESSIONS:
        parser.error(f"--seq-range 100..{MAX_SESSIONS} (two files per session, 20,000 per process)")
    if (
        not 1 <= args.duration <= 600
        or not 1 <= args.warmup <= 60
        or not 1 <= args.seq_rounds <= 10
    ):
        parser.error("--duration 1..600, --warmup 1..60, --seq-rounds 1..10")
    for spec in args.variant:
        try:
            add_variant(spec)
        except ValueError as e:
            parser.error(str(e))
    reason = netns.can_create()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    restore = install_interrupt_handlers()
    try:
        summary = run(args)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: every process started here was ended, namespaces removed",
            file=sys.stderr,
        )
        return 130
    finally:
        restore()
    report(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str) + "\n")
        print(f"figures: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
