"""HTTP/1.1 requests/s through originpool against the origin alone and nginx as a proxy.

Why this exists: issue 4 sets a throughput target, "originpool one worker >= 0.5x nginx one
worker", with wrk ``-t1 -c50 -d10s`` as the load. A proxy written in Python pays per request
for parsing both heads, rewriting headers, the pool checkout and an access log line; nginx
pays for the same work in C. The ratio against nginx on the same machine, in the same run,
is the figure that means something: absolute requests/s move with the machine and with
whatever else runs on it.

What runs, all inside a private network namespace (``pool.netns.unshare_process``: the host
sysctls and ports stay untouched, and everything goes away with this process):

* **origin** on 127.0.2.1:9000: nginx with one worker answering a fixed 13-byte 200 from
  memory (``return 200``), so the origin is never the bottleneck; without nginx, a minimal
  uvloop origin in a child process (this file, ``--serve-origin``) with a fixed response;
* **a** wrk straight at the origin: the ceiling of this machine's loopback and of wrk;
* **b** originpool ``serve`` with ``workers = 1`` (a generated config, access log on, as
  deployed), on 127.0.0.1:8080, upstream keep-alive through one egress IP;
* **c** nginx with one worker as a reverse proxy (``upstream { keepalive 64; }``,
  ``proxy_http_version 1.1``, ``proxy_set_header Connection ""``, access log on to a file),
  when nginx is installed;
* **b2** the same originpool with ``workers = 2`` (SO_REUSEPORT), an extra line.
* **f** the floor: this file in ``--serve-floor`` mode, a bare llhttp relay in CPython on
  uvloop (see ``serve_floor``), what the runtime allows before any of originpool's work.

Every target runs once per round, rounds interleaved (a, b, c, b2, f, a, b, c, b2, f, ...), so a
neighbour's burst lands on all of them alike; the figures are per-target medians over the
rounds and the ratios are ratios of medians. Listening sockets of nginx and of the Python
origin are created here and handed over (nginx's ``NGINX`` environment variable, pass_fds),
so they accept from the first moment and no start-up wait is needed; originpool is ready
when its workers log ``ready``.

On 2 cores wrk, the origin and the proxy share the CPU for b and c (and b2's two workers
compete with both), the same for each proxy; wrk's own thread takes most of a core. So each
line also has the serving process tree's CPU time per request (from /proc/PID/schedstat),
the figure a neighbour's load disturbs least, and what any speed-up has to shrink.

Both nginx instances get ``keepalive_requests 1000000`` so neither closes wrk's connections
every 1,000 requests (originpool never does); upstream, nginx's ``keepalive`` and
originpool's ``max_requests`` both renew a connection every 1,000 requests by default.

Run as root::

    .venv/bin/python bench/http_rps.py                       # 3 rounds of 10 s each
    .venv/bin/python bench/http_rps.py --duration 3 --rounds 1
    .venv/bin/python bench/http_rps.py --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Run as a script, sys.path[0] is bench/, not the repo; make ``pool`` importable.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from pool import netns  # noqa: E402  (needs the sys.path line above)

HOST = "bench.example"
ORIGIN = ("127.0.2.1", 9000)
BODY = b"hello, world\n"
TARGET_RATIO = 0.5  # originpool one worker / nginx one worker (issue 4)

LISTEN = {
    "originpool": ("127.0.0.1", 8080),
    "originpool-2w": ("127.0.0.1", 8081),
    "nginx": ("127.0.0.1", 8082),
    "floor": ("127.0.0.1", 8083),
    "originpool-pure": ("127.0.0.1", 8085),  # bench/setup_cost.py --ab-pure
}
ADMIN = {"originpool": 9090, "originpool-2w": 9100, "originpool-pure": 9110}  # worker i: + i
# the proxy with its compiled accelerator switched off (proxy.whole), for A/B runs
PURE_ENV = {**os.environ, "ORIGINPOOL_NO_EXTENSIONS": "1"}


# --- wrk -------------------------------------------------------------------------------------


@dataclass
class WrkRun:
    """One wrk run's figures, parsed from its ``--latency`` report."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    socket_errors: int
    non_2xx: int

    @property
    def clean(self) -> bool:
        """A run with errors measured something else (refusals are cheap and fast)."""
        return self.socket_errors == 0 and self.non_2xx == 0


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if m is None:
        raise ValueError(f"wrk latency {text!r}: unknown unit")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> WrkRun:
    """The figures of a ``wrk --latency`` report; ValueError if a line is missing."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    total = re.search(r"^\s+(\d+) requests in", out, re.M)
    if not (rps and p50 and p99 and total):
        raise ValueError(f"unexpected wrk output:\n{out}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkRun(
        rps=float(rps.group(1)),
        p50_ms=_ms(p50.group(1)),
        p99_ms=_ms(p99.group(1)),
        requests=int(total.group(1)),
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


def run_wrk(address: tuple[str, int], duration: int, connections: int, threads: int) -> WrkRun:
    """wrk against ``address`` with the route's Host; bounded by its duration plus slack."""
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",  # whole seconds: wrk refuses fractions
        "--latency",
        "--timeout",
        "5s",
        "-H",
        f"Host: {HOST}",
        f"http://{address[0]}:{address[1]}/",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited {proc.returncode}: {proc.stderr.strip()}")
    return parse_wrk(proc.stdout)


# --- children --------------------------------------------------------------------------------


class Children:
    """Every process this benchmark starts, ended by PID (SIGTERM, then SIGKILL) at exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(list(cmd), **kw)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        """Newest first, each gone before the next: proxies finish before their origin."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()  # by PID, as send_signal
                proc.wait(timeout=5)


def listening_socket(address: tuple[str, int]) -> socket.socket:
    """Bound and listening before its server starts: clients queue in the backlog."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(4096)
    return sock


NGINX_COMMON = """
worker_processes 1;
user root;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections {connections}; }}
http {{
    client_body_temp_path {tmp}/{name}-body;
    proxy_temp_path {tmp}/{name}-proxy;
    fastcgi_temp_path {tmp}/{name}-fastcgi;
    uwsgi_temp_path {tmp}/{name}-uwsgi;
    scgi_temp_path {tmp}/{name}-scgi;
    keepalive_requests 1000000;
{body}
}}
"""


def nginx_conf(
    tmp: Path, name: str, body: str, nofile: int = 16384, connections: int = 8192
) -> str:
    """One nginx process's config around ``body``; bench/setup_cost.py raises the limits."""
    return NGINX_COMMON.format(
        tmp=tmp, name=name, body=body, nofile=nofile, connections=connections
    )


NGINX_ORIGIN = """
    access_log off;
    server {{
        listen {ip}:{port};
        location / {{
            default_type text/plain;
            return 200 "{body}";
        }}
    }}
"""

NGINX_PROXY = """
    access_log {tmp}/proxy-access.log;
    upstream origin {{
        server {origin_ip}:{origin_port};
        keepalive 64;
    }}
    server {{
        listen {ip}:{port};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""


def start_nginx(
    children: Children, tmp: Path, name: str, body: str, address: tuple[str, int]
) -> subprocess.Popen[bytes]:
    """nginx in the foreground on an inherited listening socket (``NGINX=fd;``)."""
    conf = tmp / f"{name}.conf"
    conf.write_text(nginx_conf(tmp, name, body))
    sock = listening_socket(address)
    with sock, open(tmp / f"{name}-stderr.log", "wb") as err:  # the child keeps its copies
        return children.start(
            ["nginx", "-c", str(conf), "-e", str(tmp / f"{name}-error.log"), "-g", "daemon off;"],
            pass_fds=[sock.fileno()],
            env={**os.environ, "NGINX": f"{sock.fileno()};"},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def start_python_origin(children: Children) -> subprocess.Popen[bytes]:
    """The fallback origin: this file in ``--serve-origin`` mode on an inherited socket."""
    with listening_socket(ORIGIN) as sock:  # the child keeps its copy
        return children.start(
            [sys.executable, __file__, "--serve-origin", str(sock.fileno())],
            pass_fds=[sock.fileno()],
        )


ORIGINPOOL_CONFIG = """
[listen]
address = "{ip}:{port}"
[admin]
address = "127.0.0.1:{admin}"
[egress]
mode = "connectx"
addresses = ["127.0.1.1"]
[[routes]]
host = "{host}"
origins = ["http://{origin_ip}:{origin_port}"]
[proxy]
workers = {workers}
[log]
format = "json"
level = "info"
"""


class LogReader:
    """Counts the proxy's log lines by event, read from the file its stdout goes to, so
    callers can wait for ``ready`` and the like; the lines themselves are not kept.

    A file, as nginx's access log in this bench: a pipe read here would wake this process
    for every write the proxy makes, a cost (CPU and an IPI per wake-up) nginx does not pay,
    taken from the 2 cores wrk and the proxies share.
    """

    _EVENT = re.compile(rb'"event": ?"([^"]*)"')

    def __init__(self, proc: subprocess.Popen[bytes], path: Path) -> None:
        self.proc = proc
        self.path = path
        self.counts: dict[str, int] = {}
        self._pos = 0
        self._rest = b""

    def _scan(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self._pos)
            chunk = f.read()
        self._pos += len(chunk)
        *complete, self._rest = (self._rest + chunk).split(b"\n")
        for line in complete:
            m = self._EVENT.search(line)
            if m is not None:
                name = m.group(1).decode()
                self.counts[name] = self.counts.get(name, 0) + 1

    def count(self, event: str) -> int:
        self._scan()
        return self.counts.get(event, 0)

    def wait_for(self, event: str, count: int, timeout: float) -> None:
        """Until ``count`` lines of ``event`` were logged; RuntimeError at the timeout or if
        the proxy exits. Polls the file every 20 ms: a bench's set-up, not a test."""
        end = time.monotonic() + timeout
        while self.count(event) < count:
            if self.proc.poll() is not None or time.monotonic() > end:
                have = self.counts.get(event, 0)
                raise RuntimeError(f"proxy logged {have}/{count} {event!r} lines")
            time.sleep(0.02)


def start_originpool(
    children: Children, tmp: Path, name: str, workers: int, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    ip, port = LISTEN[name]
    path = tmp / f"{name}.toml"
    path.write_text(
        ORIGINPOOL_CONFIG.format(
            ip=ip,
            port=port,
            admin=ADMIN[name],
            host=HOST,
            origin_ip=ORIGIN[0],
            origin_port=ORIGIN[1],
            workers=workers,
        )
    )
    proc, _ = serve_proxy(children, path, workers, env)
    return proc


def serve_proxy(
    children: Children, config: Path, workers: int = 1, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], LogReader]:
    """``originpool serve --config`` as a child, returned once every worker logged ready.

    stderr goes to a file next to the config (read it when something fails); stdout, the
    JSON log, to another (``.log``), counted by a :class:`LogReader`.
    """
    log = config.with_suffix(".log")
    with open(config.with_suffix(".stderr"), "wb") as err, open(log, "wb") as out:
        proc = children.start(  # the child keeps its copies of both files
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)],
            cwd=_ROOT,
            stdout=out,
            stderr=err,
            env=env,
        )
    reader = LogReader(proc, log)
    try:
        reader.wait_for("ready", workers, timeout=30)
    except RuntimeError as e:
        raise RuntimeError(
            f"{e}; stderr: {config.with_suffix('.stderr').read_text()[-2000:]}"
        ) from e
    return proc, reader


# --- the fallback origin ---------------------------------------------------------------------


def _serve_on(fd: int, protocol: Callable[[], Any]) -> int:
    """Serve ``protocol`` on the inherited listening socket ``fd`` until SIGTERM, on uvloop
    when installed: the loop of the children this file runs as (origin, floor)."""
    import asyncio

    async def main() -> None:
        sock = socket.socket(fileno=fd)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(protocol, sock=sock, backlog=4096)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
        return 0
    uvloop.run(main())
    return 0


def serve_origin(fd: int) -> int:
    """A keep-alive origin as cheap as Python gets: one fixed response per request head.

    Only used when nginx is missing. It answers every ``\\r\\n\\r\\n`` it sees (wrk sends
    bodiless GETs), which is enough to load a proxy and nothing more.
    """
    import asyncio

    response = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (
        len(BODY),
        BODY,
    )

    class Conn(asyncio.Protocol):
        __slots__ = ("buf", "transport")

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            buf = self.buf + data
            n = buf.count(b"\r\n\r\n")
            if n:
                self.transport.write(response * n)
                buf = buf[buf.rfind(b"\r\n\r\n") + 4 :]
            self.buf = buf

    return _serve_on(fd, Conn)


def serve_floor(fd: int) -> int:
    """What CPython itself allows: the least an HTTP-aware proxy can do per request.

    llhttp (httptools) parses each request and each response, the heads are written again
    from the parsed fields, one kept-alive origin connection per client connection. Nothing
    else: no checks beyond llhttp's, no routing, no pool, no header rewrite, no timers, no
    log, no metrics. Not a proxy anyone should run; the figure tells how much of the gap to
    nginx is the runtime (asyncio/uvloop callbacks, syscalls) and how much is originpool's own
    per-request work.
    """
    import asyncio

    import httptools

    class Upstream(asyncio.Protocol):
        def __init__(self, down: Downstream) -> None:
            self.down = down
            self.parser = httptools.HttpResponseParser(self)
            self.lines: list[bytes] = []
            self.body: list[bytes] = []

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_header(self, name: bytes, value: bytes) -> None:
            self.lines.append(name + b": " + value + b"\r\n")

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            if self.down.transport.is_closing():
                return  # wrk closed its connection at the end of a run
            status = b"HTTP/1.1 %d OK\r\n" % self.parser.get_status_code()
            self.down.transport.write(status + b"".join(self.lines) + b"\r\n" + b"".join(self.body))
            self.lines, self.body = [], []

    class Downstream(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]
            self.parser = httptools.HttpRequestParser(self)
            self.up: Upstream | None = None
            self.waiting: list[bytes] = []
            self.url = b""
            self.lines: list[bytes] = []
            asyncio.get_running_loop().create_task(self.connect())

        async def connect(self) -> None:
            loop = asyncio.get_running_loop()
            _, self.up = await loop.create_connection(lambda: Upstream(self), *ORIGIN)
            for head in self.waiting:
                self.up.transport.write(head)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.up is not None:
                self.up.transport.close()

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.lines.append(name + b": " + value + b"\r\n")

        def on_message_complete(self) -> None:
            head = self.parser.get_method() + b" " + self.url + b" HTTP/1.1\r\n"
            head += b"".join(self.lines) + b"\r\n"
            self.url, self.lines = b"", []
            if self.up is None:
                self.waiting.append(head)
            else:
                self.up.transport.write(head)

    return _serve_on(fd, Downstream)


def start_floor(children: Children) -> subprocess.Popen[bytes]:
    with listening_socket(LISTEN["floor"]) as sock:  # the child keeps its copy
        return children.start(
            [sys.executable, __file__, "--serve-floor", str(sock.fileno())],
            pass_fds=[sock.fileno()],
        )


# --- the benchmark ---------------------------------------------------------------------------


@dataclass
class Target:
    """What wrk runs against, and whose CPU time is charged to its requests."""

    key: str
    label: str
    address: tuple[str, int]
    pid: int  # the serving process (master or single worker); its children count too
    runs: list[WrkRun] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # per request, this process tree

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)


_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces


def _on_cpu_seconds(pid: int) -> float:
    """Time on CPU of the process's main thread: /proc/PID/schedstat counts nanoseconds,
    where /proc/PID/stat counts 10 ms ticks (too coarse for a one-second run)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        fields = _stat(pid)
        return (int(fields[11]) + int(fields[12])) / _TICK


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its children (nginx's or originpool's workers), each
    single-threaded.

    CPU per request is the figure the machine's other load disturbs least: a neighbour
    steals wall-clock time from the proxy, not (much) CPU time per request.
    """
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat(int(entry))[1]) == pid:
                    pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
    total = 0.0
    for p in pids:
        with contextlib.suppress(OSError):
            total += _on_cpu_seconds(p)
    return total


def run(args: argparse.Namespace) -> dict[str, Any]:
    have_nginx = shutil.which("nginx") is not None and not args.no_nginx
    netns.unshare_process(port_range=(20000, 60999))
    tmp = Path(tempfile.mkdtemp(prefix="originpool-rps-"))
    children = Children()
    try:
        if have_nginx:
            body = BODY.decode().replace("\n", "\\n")
            origin = start_nginx(
                children,
                tmp,
                "origin",
                NGINX_ORIGIN.format(ip=ORIGIN[0], port=ORIGIN[1], body=body),
                ORIGIN,
            )
            origin_kind = "nginx 1 worker, return 200"
        else:
            origin = start_python_origin(children)
            origin_kind = "python (uvloop) fixed response; install nginx for a faster origin"
        targets = [Target("a", "origin directly", ORIGIN, origin.pid)]
        proc = start_originpool(children, tmp, "originpool", 1)
        targets.append(Target("b", "originpool, 1 worker", LISTEN["originpool"], proc.pid))
        if have_nginx:
            proxy = NGINX_PROXY.format(
                tmp=tmp,
                origin_ip=ORIGIN[0],
                origin_port=ORIGIN[1],
                ip=LISTEN["nginx"][0],
                port=LISTEN["nginx"][1],
            )
            proc = start_nginx(children, tmp, "proxy", proxy, LISTEN["nginx"])
            targets.append(Target("c", "nginx, 1 worker, keepalive 64", LISTEN["nginx"], proc.pid))
        if not args.no_two_workers:
            proc = start_originpool(children, tmp, "originpool-2w", 2)
            targets.append(Target("b2", "originpool, 2 workers", LISTEN["originpool-2w"], proc.pid))
        if not args.no_floor:
            proc = start_floor(children)
            targets.append(
                Target("f", "floor: bare llhttp relay (CPython)", LISTEN["floor"], proc.pid)
            )
        for t in targets:  # warm-up: upstream keep-alive pools filled, code paths hot
            warm = run_wrk(t.address, args.warmup, args.connections, args.threads)
            if not warm.clean:
                raise RuntimeError(f"{t.label}: warm-up had errors: {warm}")
        for r in range(args.rounds):
            for t in targets:
                cpu = tree_cpu_seconds(t.pid)
                result = run_wrk(t.address, args.duration, args.connections, args.threads)
                cpu = tree_cpu_seconds(t.pid) - cpu
                t.runs.append(result)
                t.cpu_us.append(cpu / max(result.requests, 1) * 1e6)
                if not args.json:
                    flag = "" if result.clean else f"  ERRORS {result}"
                    print(
                        f"  round {r + 1} {t.key:<2} {t.label:<30} {result.rps:>10,.0f} req/s"
                        f"  p50 {result.p50_ms:7.3f} ms  p99 {result.p99_ms:7.3f} ms"
                        f"  {t.cpu_us[-1]:6.1f} us CPU/req{flag}",
                        flush=True,
                    )
    finally:
        children.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    by_key = {t.key: t for t in targets}
    summary: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "loadavg_after": os.getloadavg(),
        },
        "wrk": {
            "threads": args.threads,
            "connections": args.connections,
            "duration_s": args.duration,
            "rounds": args.rounds,
        },
        "origin": origin_kind,
        "targets": {
            t.key: {
                "label": t.label,
                "rps_median": round(t.median("rps"), 1),
                "p50_ms_median": round(t.median("p50_ms"), 3),
                "p99_ms_median": round(t.median("p99_ms"), 3),
                "cpu_us_per_request_median": round(statistics.median(t.cpu_us), 1),
                "runs": [asdict(r) for r in t.runs],
                "all_clean": all(r.clean for r in t.runs),
            }
            for t in targets
        },
    }
    a = by_key["a"].median("rps")
    b = by_key["b"].median("rps")
    ratios: dict[str, float] = {"b/a": round(b / a, 3)}
    if "c" in by_key:
        c = by_key["c"].median("rps")
        ratios["c/a"] = round(c / a, 3)
        ratios["b/c"] = round(b / c, 3)
    if "b2" in by_key:
        ratios["b2/a"] = round(by_key["b2"].median("rps") / a, 3)
        if "c" in by_key:
            ratios["b2/c"] = round(by_key["b2"].median("rps") / by_key["c"].median("rps"), 3)
    if "f" in by_key:
        ratios["b/f"] = round(b / by_key["f"].median("rps"), 3)
        if "c" in by_key:
            ratios["f/c"] = round(by_key["f"].median("rps") / by_key["c"].median("rps"), 3)
    summary["ratios"] = ratios
    if "b/c" in ratios:
        summary["target"] = {
            "what": f"originpool 1 worker >= {TARGET_RATIO}x nginx 1 worker",
            "ratio": ratios["b/c"],
            "pass": ratios["b/c"] >= TARGET_RATIO,
        }
    return summary


def report(summary: dict[str, Any]) -> None:
    w = summary["wrk"]
    print()
    print(
        f"wrk -t{w['threads']} -c{w['connections']} -d{w['duration_s']:g}s, "
        f"{w['rounds']} interleaved rounds, medians; origin: {summary['origin']}"
    )
    print(f"{'':3}{'target':<32}{'req/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'CPU us/req':>12}")
    for key, t in summary["targets"].items():
        flag = "" if t["all_clean"] else "  (some runs had errors)"
        print(
            f"{key:<3}{t['label']:<32}{t['rps_median']:>12,.0f}"
            f"{t['p50_ms_median']:>10.3f}{t['p99_ms_median']:>10.3f}"
            f"{t['cpu_us_per_request_median']:>12.1f}{flag}"
        )
    print("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["ratios"].items()))
    target = summary.get("target")
    if target is None:
        print("target (b/c >= 0.5): not measured, nginx is not installed")
    else:
        label = "PASS" if target["pass"] else "MISS"
        print(f"{label}: {target['what']}: b/c = {target['ratio']:.3f}")
    print(
        f"load average after: {', '.join(f'{x:.2f}' for x in summary['machine']['loadavg_after'])}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50, help="wrk -c")
    parser.add_argument("--threads", type=int, default=1, help="wrk -t")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per target")
    parser.add_argument("--no-nginx", action="store_true", help="python origin, no c")
    parser.add_argument("--no-two-workers", action="store_true", help="skip b2")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--no-floor", action="store_true", help="skip f")
    parser.add_argument("--serve-origin", type=int, metavar="FD", help=argparse.SUPPRESS)
    parser.add_argument("--serve-floor", type=int, metavar="FD", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_origin is not None:
        return serve_origin(args.serve_origin)
    if args.serve_floor is not None:
        return serve_floor(args.serve_floor)
    if shutil.which("wrk") is None:
        print(
            "wrk is not installed: apt-get install -y wrk (and nginx-light for c)", file=sys.stderr
        )
        return 2
    reason = netns.can_create()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    if not 1 <= args.rounds <= 100 or not 1 <= args.duration <= 600 or not 1 <= args.warmup <= 60:
        parser.error("--rounds in 1..100, --duration in 1..600, --warmup in 1..60")
    summary = run(args)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        report(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
