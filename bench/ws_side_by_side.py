"""WebSocket relay cost side by side: nginx, HAProxy and originpool, one worker each, the same
echo origin, in one run: CPU per relayed message, messages/s, and RSS per idle session.

Why this exists: issue 22. A WebSocket session lives for hours or days, so what it costs while
it lives (the proxy's CPU per message it relays, its memory while idle) is the figure to
compare against the proxies people would otherwise run. ``bench/ws_relay.py`` measures
originpool against a direct connection; this runs the others beside it, as
``bench/setup_cost.py`` does for handshakes, and reuses both files' pieces (the raw echo
origin, the session client, nginx's and HAProxy's configs and the /proc CPU meter).

Two parts, as root, each in a private network namespace:

1. **relay**: one raw echo origin (``bench/ws_relay.py``'s RawOrigin: 101, then echo) on
   127.0.2.1:9000; nginx (``worker_processes 1``), HAProxy (``nbthread 1``), originpool
   (``workers = 1``, compiled accelerators) and, with ``--pure``, originpool with
   ``ORIGINPOOL_NO_EXTENSIONS=1`` (the A/B of the compiled twins), all running at once. One
   client process per proxy (raw uvloop protocols) opens ``--relay-sessions`` sessions (200)
   before anything is measured, then each session keeps one message in flight: a masked
   binary frame out, the origin's echo back, checked byte for byte, the next. ``--rounds``
   rounds, each size (64 B, 4 KiB, 64 KiB) through each proxy in turn (and direct to the
   origin, for scale); medians. CPU per message: on-CPU time of the proxy's process tree
   (schedstat, every thread, nginx's master and worker) across the step / messages echoed
   (one message = client to origin and the echo back: two frames relayed).
2. **idle**: per proxy, a fresh namespace (a child process of this file), its port range
   R = ``--range`` (2,000) and E = 4 egress IPs; ``--sessions`` (8,000) sessions opened and
   held by ``bench/ws_relay.py``'s session client (handshake, one echo, then quiet) after a
   warm-up of a few hundred opened and closed. RSS per idle session = (VmRSS of the proxy's
   tree held - before) / sessions held. RSS counts user-space memory only: the kernel's
   socket memory (skbs, socket structs) is not in it, for any of the three; the namespace's
   ``sockstat`` "mem" pages are reported beside it for the tree's sockets.

The machine is shared and 2 cores: the ratios, measured in the same run, are what to read;
the load average is printed with the figures. Every child is ended by PID.

    .venv/bin/python bench/ws_side_by_side.py                 # ~3 minutes
    .venv/bin/python bench/ws_side_by_side.py --rounds 1 --scale 0.3 --sessions 2000
    .venv/bin/python bench/ws_side_by_side.py --skip-idle --pure --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Run as a script, sys.path[0] is bench/, not the repo; make the project importable.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench import setup_cost, ws_relay  # noqa: E402
from bench.http_rps import Children, serve_proxy  # noqa: E402
from pool import netns  # noqa: E402

PROXIES = ("nginx", "haproxy", "originpool")
LISTEN = {
    "direct": ws_relay.ORIGIN,
    "nginx": setup_cost.LISTEN["nginx"],
    "haproxy": setup_cost.LISTEN["haproxy"],
    "originpool": ws_relay.PROXY,
    "originpool-pure": setup_cost.LISTEN["originpool-pure"],
}
ADMIN = {"originpool": 9190, "originpool-pure": 9192}
VARIANTS: dict[str, dict[str, str]] = {}  # originpool-vN: the environment it runs with
LABELS = {
    "direct": "direct",
    "nginx": "nginx",
    "haproxy": "HAProxy",
    "originpool": "originpool",
    "originpool-pure": "op pure",
}
SIZES = ((64, 40_000), (4096, 30_000), (65536, 6_000))  # (bytes, messages) at --scale 1
EGRESS_IDLE = 4
STEP_TIMEOUT = 60.0
TARGET_KB = 4.0
MASK = b"\x11\x22\x33\x44"


# --- the relay client: N sessions, one message in flight each ---------------------------------


class Session(asyncio.Protocol):
    """One raw WebSocket session: the handshake, then one frame out and its echo back at a
    time, ``left`` times; bytes compared with the echo expected."""

    def __init__(self, request: bytes, opened: asyncio.Future[None]) -> None:
        self.request = request
        self.opened = opened
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.open = False
        self.got = bytearray()
        self.out = b""
        self.expect = b""
        self.left = 0
        self.bad = 0
        self.done: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.open:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            if b" 101 " not in self.head[: self.head.find(b"\r\n")] or end + 4 != len(self.head):
                self.opened.set_exception(ConnectionError(f"bad 101: {self.head[:80]!r}"))
                return
            self.open = True
            self.opened.set_result(None)
            return
        self.got += data
        if len(self.got) < len(self.expect):
            return
        if self.got != self.expect:
            self.bad += 1
        self.got.clear()
        self.left -= 1
        if self.left > 0:
            assert self.transport is not None
            self.transport.write(self.out)
        elif self.done is not None and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        error = ConnectionError(f"session closed: {exc}")
        if not self.opened.done():
            self.opened.set_exception(error)
        if self.done is not None and not self.done.done():
            self.done.set_exception(error)

    def start(self, out: bytes, expect: bytes, count: int) -> asyncio.Future[None]:
        self.out, self.expect, self.left = out, expect, count
        self.done = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(out)
        return self.done


async def _relay_client(address: tuple[str, int], sessions: int) -> None:
    """Opens ``sessions``, says so, then obeys stdin: ``SIZE COUNT`` echoes COUNT messages of
    SIZE bytes spread over the sessions and prints the seconds; EOF closes all and exits."""
    loop = asyncio.get_running_loop()
    held: list[Session] = []
    for i in range(sessions):
        key = base64.b64encode(os.urandom(16))
        request = (
            b"GET / HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (ws_relay.HOST.encode(), key)
        )
        opened: asyncio.Future[None] = loop.create_future()
        _, session = await loop.create_connection(
            lambda r=request, o=opened: Session(r, o),  # type: ignore[misc]
            *address,
            local_addr=(ws_relay.source_ip(i), 0),
        )
        await asyncio.wait_for(opened, ws_relay.STEP_TIMEOUT)
        held.append(session)
    print(json.dumps({"event": "open", "sessions": len(held)}), flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    for _ in range(10_000):  # a bounded number of commands
        line = await reader.readline()
        if not line:
            break
        size, count = (int(v) for v in line.split())
        payload = os.urandom(size)
        out = ws_relay.frame(0x2, payload, MASK)
        expect = ws_relay.frame(0x2, payload, None)
        each = max(1, count // len(held))
        started = time.perf_counter()
        waits = [s.start(out, expect, each) for s in held]
        await asyncio.wait_for(asyncio.gather(*waits), STEP_TIMEOUT)
        seconds = time.perf_counter() - started
        bad = sum(s.bad for s in held)
        print(
            json.dumps({"messages": each * len(held), "seconds": seconds, "bad": bad}),
            flush=True,
        )
    for s in held:
        if s.transport is not None:
            s.transport.close()


class RelayClient:
    """The relay client as a child process, driven over its stdin and stdout."""

    def __init__(self, name: str, sessions: int) -> None:
        host, port = LISTEN[name]
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--relay-client", f"{host}:{port}", str(sessions)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the child's own timeouts bound this
        if not line:
            raise RuntimeError("relay client exited early")
        return dict(json.loads(line))

    def run(self, size: int, count: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"%d %d\n" % (size, count))
        self.proc.stdin.flush()
        return self.answer()

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # by PID
            self.proc.wait(timeout=5)


# --- starting the proxies ---------------------------------------------------------------------


def originpool_config(
    path: Path, name: str, egress: Sequence[str], max_connections: int, workers: int = 1
) -> Path:
    ip, port = LISTEN[name]
    path.write_text(
        ws_relay.PROXY_CONFIG.format(
            ip=ip,
            port=port,
            admin=ADMIN[name],
            egress=json.dumps(list(egress)),
            host=ws_relay.HOST,
            origin_ip=ws_relay.ORIGIN[0],
            origin_port=ws_relay.ORIGIN[1],
            max_connections=max_connections,
        )
    )
    return path


def start_proxy(
    children: Children, tmp: Path, name: str, egress: int, max_connections: int
) -> subprocess.Popen[bytes]:
    """One proxy, one worker, in front of ws_relay's origin, returned once it accepts."""
    if name == "nginx":
        body = setup_cost.nginx_ws_body(tmp, name, egress)
        proc = setup_cost.start_nginx(children, tmp, name, body)
        setup_cost.wait_listening(LISTEN[name], proc, name)
        return proc
    if name == "haproxy":
        return setup_cost.start_haproxy(children, tmp, name, ws_relay.ORIGIN, egress)
    env = dict(os.environ)
    if name == "originpool-pure":
        env["ORIGINPOOL_NO_EXTENSIONS"] = "1"
    env.update(VARIANTS.get(name, {}))
    config = originpool_config(
        tmp / f"{name}.toml", name, setup_cost.egress_ips(egress), max_connections
    )
    proc, _ = serve_proxy(children, config, 1, env=env)
    return proc


def available(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """The proxies to run, and a note for each one skipped because it is not installed."""
    keep, notes = [], []
    for name in names:
        if name in ("nginx", "haproxy") and shutil.which(name) is None:
            notes.append(f"{name}: not installed, skipped (apt-get install -y {name})")
        else:
            keep.append(name)
    return keep, notes


# --- part 1: relay CPU per message ---------------------------------------------------------------


def relay(args: argparse.Namespace, names: list[str], tmp: Path) -> dict[str, Any]:
    children = Children()
    clients: dict[str, RelayClient] = {}
    try:
        ws_relay.start_origin(children, "raw")
        pids = {n: start_proxy(children, tmp, n, 2, 2000).pid for n in names}
        for name in ["direct", *names]:
            clients[name] = RelayClient(name, args.relay_sessions)
        for client in clients.values():
            opened = client.answer()
            if opened.get("sessions") != args.relay_sessions:
                raise RuntimeError(f"relay client: {opened}")
        sizes = [(size, max(args.relay_sessions, int(n * args.scale))) for size, n in SIZES]
        for size, count in sizes:  # warm-up, not counted
            for client in clients.values():
                client.run(size, max(args.relay_sessions, count // 10))
        samples: dict[tuple[str, int], list[dict[str, float]]] = {}
        for r in range(args.rounds):
            for size, count in sizes:
                for name, client in clients.items():
                    if name == "direct":
                        result = client.run(size, count)
                        cpu: dict[str, float] = {"total": 0.0, "user": 0.0, "system": 0.0}
                    else:
                        with setup_cost.cpu_meter(pids[name]) as cpu:
                            result = client.run(size, count)
                    if result["bad"]:
                        raise RuntimeError(f"{name}: {result['bad']} echoes differ at {size} B")
                    n, seconds = result["messages"], result["seconds"]
                    sample = {
                        "msg_per_s": n / seconds,
                        "cpu_us": cpu["total"] / n * 1e6,
                        "user_us": cpu["user"] / n * 1e6,
                        "system_us": cpu["system"] / n * 1e6,
                    }
                    samples.setdefault((name, size), []).append(sample)
                    if not args.json:
                        print(
                            f"  round {r + 1} {size:>6} B {LABELS[name]:<10} "
                            f"{sample['msg_per_s']:>9,.0f} msg/s {sample['cpu_us']:>7.1f} us/msg",
                            flush=True,
                        )
    finally:
        for client in clients.values():
            client.close()
        children.stop_all()
    out: dict[str, Any] = {"sessions": args.relay_sessions, "rounds": args.rounds, "sizes": {}}
    for size, count in sizes:
        row: dict[str, Any] = {"messages": count}
        for name in clients:
            s = samples[(name, size)]
            row[name] = {k: round(statistics.median(x[k] for x in s), 2) for k in s[0]}
        out["sizes"][str(size)] = row
    return out


# --- part 2: RSS per idle session, one proxy per namespace -----------------------------------


def tree_rss_kib(pid: int) -> int:
    total = 0
    for p in [pid, *setup_cost.procs.descendants(pid)]:
        with contextlib.suppress(OSError, RuntimeError):
            total += ws_relay.vm_rss_kib(p)
    return total


def sockstat_mem_pages() -> int:
    """The namespace's TCP socket memory (pages): what RSS does not count."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("mem") + 1])
    return 0


async def idle_one(args: argparse.Namespace, name: str, tmp: Path) -> dict[str, Any]:
    """Inside this process's own namespace: one proxy, ``--sessions`` held through it."""
    children = Children()
    try:
        origin = ws_relay.start_origin(children, "raw")
        proc = start_proxy(children, tmp, name, EGRESS_IDLE, args.sessions + 1000)
        address = LISTEN[name]
        async with ws_relay.ClientProc.running(args.warmup_sessions, address) as warm:
            await warm.report(120)
        for _ in range(300):  # the warm-up's sessions closing: poll until the RSS is flat
            await asyncio.sleep(0.1)
            if sockstat_mem_pages() == 0:
                break
        before = tree_rss_kib(proc.pid)
        mem_before = sockstat_mem_pages()
        origin_before = ws_relay.vm_rss_kib(origin.pid)
        async with ws_relay.ClientProc.running(args.sessions, address) as client:
            held = await client.report(args.sessions / 50 + 120)
            during = tree_rss_kib(proc.pid)
            mem_during = sockstat_mem_pages()
            origin_during = ws_relay.vm_rss_kib(origin.pid)
            checked = await client.check(args.sessions / 100 + 60)
    finally:
        await asyncio.to_thread(children.stop_all)
    n = max(held["held"], 1)
    return {
        "sessions": held["held"],
        "failures": held["failures"],
        "echo_check": checked,
        "rss_kib": {"before": before, "held": during},
        "kb_per_session": round((during - before) * 1.024 / n, 2),
        "socket_mem_kb_per_session_all": round((mem_during - mem_before) * 4.096 / n, 2),
        "origin_kb_per_session": round((origin_during - origin_before) * 1.024 / n, 2),
    }


def idle(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """Each proxy in a child of this file with a namespace of its own: one proxy's held ports
    and TIME_WAITs must not meet the next one's."""
    out: dict[str, Any] = {"sessions": args.sessions, "egress": EGRESS_IDLE, "range": args.range}
    for name in names:
        cmd = [
            sys.executable,
            __file__,
            "--idle-one",
            name,
            "--sessions",
            str(args.sessions),
            "--range",
            str(args.range),
            "--warmup-sessions",
            str(args.warmup_sessions),
        ]
        for spec in args.variant:
            cmd += ["--variant", spec]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if done.returncode:
            out[name] = {"error": done.stderr.strip()[-800:]}
        else:
            out[name] = json.loads(done.stdout)
        if not args.json:
            print(f"  idle {LABELS[name]}: {out[name]}", flush=True)
    return out


# --- report ----------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(summary: dict[str, Any]) -> None:
    names = summary["proxies"]
    for note in summary["notes"]:
        print(note)
    r = summary.get("relay")
    if r is not None:
        print()
        print(
            f"relay, {r['sessions']} sessions per proxy each keeping one message in flight, "
            f"{r['rounds']} rounds, medians; CPU = the proxy's on-CPU time per echoed message"
        )
        head = f"{'size':>7} {'proxy':<11}{'msg/s':>10}{'us/msg':>9}{'user':>7}{'sys':>7}"
        print(head + f"{'op/nginx':>10}{'op/HAProxy':>11}")
        for size, row in r["sizes"].items():
            op = row.get("originpool", {}).get("cpu_us")
            for name in ["direct", *names]:
                if name not in row:
                    continue
                x = row[name]
                extra = ""
                if name in ("nginx", "haproxy") and op:
                    extra = f"{_ratio(op, x['cpu_us']):>10}" if name == "nginx" else ""
                    extra += f"{_ratio(op, x['cpu_us']):>21}" if name == "haproxy" else ""
                print(
                    f"{int(size):>7} {LABELS[name]:<11}{x['msg_per_s']:>10,.0f}{x['cpu_us']:>9.1f}"
                    f"{x['user_us']:>7.1f}{x['system_us']:>7.1f}{extra}"
                )
        print("  (direct: the client and origin alone, for scale; its us/msg is not measured)")
    m = summary.get("idle")
    if m is not None:
        print()
        print(
            f"idle sessions, one proxy at a time in a fresh namespace, E={m['egress']}, "
            f"R={m['range']}, {m['sessions']} opened"
        )
        print(f"{'proxy':<11}{'held':>7}{'KB/session':>12}{'sock KB':>9}  failures")
        op = m.get("originpool", {}).get("kb_per_session")
        for name in names:
            x = m.get(name, {})
            if "error" in x:
                print(f"{LABELS[name]:<11}  error: {x['error'][-200:]}")
                continue
            print(
                f"{LABELS[name]:<11}{x['sessions']:>7}{x['kb_per_session']:>12.2f}"
                f"{x['socket_mem_kb_per_session_all']:>9.2f}  {x['failures'] or 'none'}"
                f"  (op/this {_ratio(op, x['kb_per_session'])})"
            )
        print(
            "  KB/session: (VmRSS of the proxy's processes held - before) / held; sock KB: the "
            "namespace's TCP socket memory\n  per session (all sockets: client, proxy, origin), "
            "which RSS does not count"
        )
    load = ", ".join(f"{x:.2f}" for x in summary["loadavg_after"])
    print(f"load average after: {load}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies message counts")
    parser.add_argument("--relay-sessions", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=8000, help="idle sessions held")
    parser.add_argument("--range", type=int, default=2000, help="port range R, idle part")
    parser.add_argument("--warmup-sessions", type=int, default=300)
    parser.add_argument("--pure", action="store_true", help="also originpool, pure Python")
    parser.add_argument("--only", nargs="*", default=None, help="proxies to run")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="K=V[,K=V]",
        help="also originpool with this environment (an A/B in the same run), repeatable",
    )
    parser.add_argument("--skip-relay", action="store_true")
    parser.add_argument("--skip-idle", action="store_true")
    parser.add_argument("--json", nargs="?", const="-", default=None, help="JSON to a file or -")
    parser.add_argument("--relay-client", nargs=2, metavar=("ADDR", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--idle-one", metavar="PROXY", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for i, spec in enumerate(args.variant):
        name = f"originpool-v{i + 1}"
        VARIANTS[name] = dict(item.split("=", 1) for item in spec.split(","))
        LISTEN[name] = ("127.0.0.1", 8090 + i)
        ADMIN[name] = 9200 + 2 * i
        LABELS[name] = f"op v{i + 1}"
    if args.relay_client:
        host, _, port = args.relay_client[0].rpartition(":")
        ws_relay.run_loop(_relay_client((host, int(port)), int(args.relay_client[1])))
        return 0
    reason = netns.can_create()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    if not 1 <= args.sessions <= 9500 or not 1 <= args.relay_sessions <= 1000:
        parser.error("--sessions 1..9500, --relay-sessions 1..1000")
    if not 1 <= args.rounds <= 20 or not 0 < args.scale <= 20 or not 100 <= args.range <= 20000:
        parser.error("--rounds 1..20, --scale (0, 20], --range 100..20000")
    if args.idle_one:
        netns.unshare_process(port_range=(40000, 40000 + args.range - 1))
        tmp = Path(tempfile.mkdtemp(prefix="originpool-sbs-"))
        try:
            print(json.dumps(ws_relay.run_loop(idle_one(args, args.idle_one, tmp))))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return 0
    wanted = list(args.only or PROXIES) + (["originpool-pure"] if args.pure else [])
    wanted += list(VARIANTS)
    names, notes = available(wanted)
    summary: dict[str, Any] = {"proxies": names, "notes": notes, "variants": VARIANTS}
    if not args.skip_idle:
        summary["idle"] = idle(args, names)
    if not args.skip_relay:
        pid = os.fork()  # the relay part in a namespace of its own, this process stays out
        if pid == 0:
            code = 1
            try:
                netns.unshare_process(port_range=(20000, 60999))
                tmp = Path(tempfile.mkdtemp(prefix="originpool-sbs-"))
                try:
                    result = relay(args, names, tmp)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                Path(f"/tmp/originpool-sbs-{os.getppid()}.json").write_text(json.dumps(result))
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        path = Path(f"/tmp/originpool-sbs-{os.getpid()}.json")
        if status != 0 or not path.exists():
            raise SystemExit(f"relay part failed (status {status})")
        summary["relay"] = json.loads(path.read_text())
        path.unlink()
    summary["loadavg_after"] = os.getloadavg()
    if args.json:
        text = json.dumps(summary, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    if args.json != "-":
        report(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
