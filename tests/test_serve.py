"""``originpool serve`` as a real subprocess in a namespace: curl and httpx as clients, the
admin endpoints, a bad config's messages, SIGHUP reload and SIGTERM drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx

CONFIG = """
[listen]
address = "127.0.0.1:8080"
[admin]
address = "127.0.0.1:9090"
[egress]
mode = "connectx"
addresses = ["127.0.1.1", "127.0.1.2:40000-40063"]
[[routes]]
host = "app.example"
path_prefix = "/"
origins = ["http://127.0.2.1:9000", "http://127.0.2.2:9000"]
balance = "{balance}"
[timeouts]
drain = 5
[log]
format = "json"
"""


class Proc:
    """The proxy process; a thread reads its JSON log lines as they come (a full pipe would
    block the proxy's event loop), and tests wait on those lines: the only synchronisation."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[dict] = []
        self._seen = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        fd = self.p.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            *complete, buf = buf.split(b"\n")
            parsed = []
            for raw in complete:
                try:
                    parsed.append(json.loads(raw))
                except ValueError:
                    continue
            with self._seen:
                self.lines += parsed
                self._seen.notify_all()
        with self._seen:
            self._eof = True
            self._seen.notify_all()

    def wait_for(self, event: str, timeout: float = 20, count: int = 1) -> dict:
        """The count-th log line with this event (waits for it, bounded by timeout)."""
        end = time.monotonic() + timeout
        with self._seen:
            while True:
                found = [ln for ln in self.lines if ln.get("event") == event]
                if len(found) >= count:
                    return found[count - 1]
                left = end - time.monotonic()
                if self._eof or left <= 0:
                    break
                self._seen.wait(left)
        stderr = self.p.stderr.read().decode() if self.p.poll() is not None else ""
        seen = [line.get("event") for line in self.lines][-10:]
        raise AssertionError(f"no {event!r} log line (last: {seen}); stderr: {stderr}")

    def stop(self) -> int:
        """SIGTERM, and the exit code; a proxy that does not drain in 20 s is killed (its
        workers too, by PID) so a failing test leaves nothing running."""
        if self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGTERM)
        try:
            code = self.p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            workers = {ln.get("pid") for ln in self.lines if isinstance(ln.get("pid"), int)}
            for pid in workers - {self.p.pid}:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.p.kill()
            self.p.wait(10)
            raise
        finally:
            self._reader.join(10)
        return code


def write_config(tmp_path: Path, balance: str = "round_robin") -> Path:
    path = tmp_path / "originpool.toml"
    path.write_text(CONFIG.replace("{balance}", balance))
    return path


async def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True)


async def test_serve_proxies_with_curl_and_httpx_and_exits_0_on_sigterm(origins, tmp_path):
    proc = Proc(write_config(tmp_path))
    try:
        ready = await asyncio.to_thread(proc.wait_for, "ready")
        assert ready["accelerator"] == "compiled"  # pip install -e . built it
        if shutil.which("curl"):
            out = await run(
                ["curl", "-sS", "-H", "Host: app.example", "http://127.0.0.1:8080/hello"]
            )
            assert out.returncode == 0 and out.stdout.startswith("hello"), out
        async with httpx.AsyncClient(headers={"host": "app.example"}) as client:
            for _ in range(10):
                r = await client.get("http://127.0.0.1:8080/hello")
                assert r.status_code == 200
            assert (await client.get("http://127.0.0.1:9090/healthz")).text == "ok\n"
            assert (await client.get("http://127.0.0.1:9090/readyz")).status_code == 200
            metrics = (await client.get("http://127.0.0.1:9090/metrics")).text
            assert 'originpool_requests_total{route="app.example/",status="200"}' in metrics
            assert "originpool_egress_live_connections" in metrics
            ports = (await client.get("http://127.0.0.1:9090/ports")).json()
            assert any(p["dst"] in ("127.0.2.1:9000", "127.0.2.2:9000") for p in ports["pairs"])
        # both origins served (round robin), each over kept-alive connections
        assert all(s.connections for s in origins)
        access = await asyncio.to_thread(proc.wait_for, "access")
        assert {"method", "host", "path", "status", "bytes", "duration_ms", "egress"} <= set(access)
    finally:
        code = await asyncio.to_thread(proc.stop)
    assert code == 0
    assert any(line.get("event") == "stopped" for line in proc.lines)


async def test_sighup_applies_new_routes_to_new_requests(origins, tmp_path):
    path = write_config(tmp_path)
    proc = Proc(path)
    try:
        await asyncio.to_thread(proc.wait_for, "ready")
        async with httpx.AsyncClient() as client:
            r = await client.get("http://127.0.0.1:8080/hello", headers={"host": "new.example"})
            assert r.status_code == 421
            path.write_text(
                path.read_text()
                + textwrap.dedent(
                    """
                    [[routes]]
                    host = "new.example"
                    origins = ["http://127.0.2.2:9000"]
                    """
                )
            )
            os.kill(proc.p.pid, signal.SIGHUP)
            await asyncio.to_thread(proc.wait_for, "reloaded")
            r = await client.get("http://127.0.0.1:8080/hello", headers={"host": "new.example"})
            assert r.status_code == 200
    finally:
        assert await asyncio.to_thread(proc.stop) == 0


async def test_bad_config_names_every_problem_and_starts_nothing(ns, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(CONFIG.replace("{balance}", "fastest").replace('"127.0.1.1"', '"not-an-ip"'))
    out = await run([sys.executable, "-m", "proxy.cli", "serve", "--config", str(path)])
    assert out.returncode == 2
    assert "egress.addresses[0]" in out.stderr and "routes[0].balance" in out.stderr
    assert out.stdout == ""


CATCH_ALL = """
[listen]
address = "127.0.0.1:8080"
[admin]
address = "127.0.0.1:9090"
[egress]
addresses = ["127.0.1.1"]
[[routes]]
host = "*"
origins = ["http://127.0.2.2:9000"]
[[routes]]
host = "app.example"
origins = ["http://127.0.2.1:9000"]
[[routes]]
host = "down.example"
origins = ["http://127.0.2.3:9000"]
[timeouts]
drain = 5
[log]
format = "json"
"""


async def test_a_users_catch_all_config_routes_and_forwards_one_name(origins, tmp_path):
    """The config a user writes to front one origin, through `serve`: exact beats `*`
    whatever the order, absolute-form is routed and forwarded by its authority, and a 502
    tells the client a request id and nothing of the proxy's addresses."""
    path = tmp_path / "catch-all.toml"
    path.write_text(CATCH_ALL)
    proc = Proc(path)
    app, other = origins

    async def raw(data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", 8080)
        writer.write(data)
        out = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
        return out

    try:
        await asyncio.to_thread(proc.wait_for, "ready")
        out = await raw(b"GET /a HTTP/1.1\r\nHost: App.Example.:8080\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200 ") and dict(app.last_headers)[b"host"] == (
            b"App.Example.:8080"
        )
        out = await raw(b"GET /b HTTP/1.1\r\nHost: 10.1.2.3\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200 ") and dict(other.last_headers)[b"host"] == (
            b"10.1.2.3"
        )
        out = await raw(
            b"GET http://app.example/c HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
        )
        seen = dict(app.last_headers)
        assert out.startswith(b"HTTP/1.1 200 ") and seen[b"host"] == b"app.example"
        assert seen[b"x-forwarded-host"] == b"app.example"
        out = await raw(b"GET /d HTTP/1.1\r\nHost: down.example\r\nConnection: close\r\n\r\n")
        head, body = out.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 502 ") and b"127.0." not in body, out
        rid = next(
            line.split(b": ", 1)[1]
            for line in head.split(b"\r\n")
            if line.startswith(b"x-request-id")
        )
        assert rid in body
        error = await asyncio.to_thread(proc.wait_for, "upstream_error")
        assert error["request_id"] == rid.decode() and error["errno"] == "ECONNREFUSED"
    finally:
        assert await asyncio.to_thread(proc.stop) == 0
