"""The testbed's load client: WebSocket sessions through a proxy, opened, verified and held.

``python -m testbed.wsclient --connect 127.0.0.1:8080 --host testbed.example
--sources 127.3.0.1-127.3.0.16 --sessions 12000`` writes JSON lines on stdout: ``started``,
``progress`` (a few per second), ``failure`` (the first one, as soon as it happens),
``ramp_done``, then after the hold ``result`` (every attempt's outcome and latency), so the
orchestrator can shard a big run over several processes and merge what they saw.

Why it is built this way:

* **The client must never be the bottleneck, nor the thing that runs out of ports.** Each
  session comes from the next source IP of a list (round robin). By default the port is the
  kernel's choice with ``IP_BIND_ADDRESS_NO_PORT``, so every source IP gets the whole range
  to the proxy's address. With ``--ports LO-HI`` the client picks ports itself from a window
  outside the namespace's ephemeral range (``SO_REUSEADDR`` + explicit bind): needed when
  the proxy under test binds before connecting, because a port held by an explicit
  ``bind()`` is removed from ``connect()``'s automatic choice on *every* local IP, so a
  bind-mode proxy that fills the range would starve the clients too and the testbed would
  measure itself.
* **Sessions are opened one at a time, or ``--concurrency`` at a time**, and each records
  the handshake latency (upgrade request written -> 101 read: the span in which the proxy
  makes its upstream connection) and how many sessions this client held at that moment, so
  latency can be read against utilisation.
* **Failures say what the client saw**: the HTTP status of a refused upgrade (``"503"``),
  the errno name of a socket error (``"ECONNRESET"``), ``"timeout"``, ``"closed"``.
* **Held is not alive**: ``held`` counts sessions verified once, at open; ``alive`` those not
  ended since (each ended one counted by the peer's Close code, or ``none`` for a bare FIN or
  RST), and the final check's ``verified`` those that answered at the end, the only ones a
  run may call held.
* **Held sessions cost little**: a Protocol with ``__slots__`` and wsproto's frame state;
  the handshake object is dropped once the 101 is in.
* **Bounded**: at most ``--sessions`` attempts, within ``--deadline`` seconds, each step
  within ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import json
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.handshake import H11Handshake
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from testbed.wsorigin import Address, parse_address

IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h
CLIENT_PORT_CLASH = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL})

OK = "ok"


def parse_sources(text: str) -> list[str]:
    """``127.3.0.1-127.3.0.16`` (a range), ``a,b,c`` (a list), or a mix of both."""
    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        first, sep, last = part.partition("-")
        if not sep:
            out.append(str(ipaddress.ip_address(first)))
            continue
        lo, hi = ipaddress.ip_address(first), ipaddress.ip_address(last)
        if hi < lo or int(hi) - int(lo) > 65535:
            raise ValueError(f"{part!r}: an address range from low to high, at most 65,536")
        out.extend(str(lo + i) for i in range(int(hi) - int(lo) + 1))
    if not out:
        raise ValueError("no source address")
    return out


def parse_window(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if not sep or not lo.isdigit() or not hi.isdigit() or not 0 < int(lo) <= int(hi) < 65536:
        raise ValueError(f"{text!r}: expected LO-HI, 1 <= LO <= HI <= 65535")
    return int(lo), int(hi)


class Session(asyncio.Protocol):
    """One WebSocket session; ``waiter`` is resolved with what the peer did next.

    The waiter's result is a string: ``"ok"`` (101 / the echo arrived), an HTTP status
    (``"503"``), ``"closed"`` or ``"protocol_error"``, so one await covers every outcome.
    """

    __slots__ = (
        "close_code",
        "closed",
        "conn",
        "error",
        "handshake",
        "message",
        "on_end",
        "transport",
        "waiter",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.handshake: H11Handshake | None = H11Handshake(ConnectionType.CLIENT)
        self.conn: Connection | None = None
        self.waiter: asyncio.Future[str] | None = None
        self.message: str | None = None  # text being received (an echo may come in pieces)
        self.closed = False
        # the peer's Close code, if it sent one: what a client learns of why it was dropped
        self.close_code: int | None = None
        self.error: str | None = None  # why this side aborted it, if it did
        # called once the connection is gone: the scenario clients count and reconnect there
        self.on_end: Callable[[Session], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self._resolve("closed")
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end(self)

    def _resolve(self, outcome: str) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(outcome)

    def expect(self) -> asyncio.Future[str]:
        self.waiter = asyncio.get_running_loop().create_future()
        return self.waiter

    def start(self, host: str, target: str) -> asyncio.Future[str]:
        assert self.transport is not None and self.handshake is not None
        waiter = self.expect()
        self.transport.write(self.handshake.send(Request(host=host, target=target)))
        return waiter

    def send_text(self, text: str) -> asyncio.Future[str]:
        waiter = self.expect()
        if self.conn is None or self.transport is None or self.closed:
            self._resolve("closed")
            return waiter
        try:
            self.transport.write(self.conn.send(TextMessage(data=text)))
        except LocalProtocolError:
            self._resolve("closed")
        return waiter

    def data_received(self, data: bytes) -> None:
        try:
            if self.handshake is not None:
                self._handshake_data(data)
            elif self.conn is not None:
                self._frames(data)
        except (RemoteProtocolError, LocalProtocolError):
            self.error = "protocol_error"
            self._resolve("protocol_error")
            self.abort()

    def _handshake_data(self, data: bytes) -> None:
        assert self.handshake is not None
        self.handshake.receive_data(data)
        for event in self.handshake.events():
            if isinstance(event, AcceptConnection):
                self.conn = self.handshake.connection
                self.handshake = None
                self._resolve(OK)
                if self.conn is not None:
                    self._frames(b"")  # frames that came with the 101
                return
            if isinstance(event, RejectConnection):
                self._resolve(str(event.status_code))
                self.handshake = None
                self.abort()
                return

    def _frames(self, data: bytes) -> None:
        conn = self.conn
        assert conn is not None
        if data:
            conn.receive_data(data)
        out = b""
        for event in conn.events():
            if isinstance(event, TextMessage):
                self.message = (self.message or "") + event.data
                if event.message_finished:
                    text, self.message = self.message, None
                    self._resolve(text)
            elif isinstance(event, BytesMessage):
                pass  # the testbed only sends text
            elif isinstance(event, Ping):
                out += conn.send(event.response())
            elif isinstance(event, CloseConnection):
                if self.close_code is None:
                    self.close_code = int(event.code)
                if conn.state is ConnectionState.REMOTE_CLOSING:
                    out += conn.send(event.response())
                self.closed = True
                if self.transport is not None:
                    self.transport.write(out)
                    self.transport.close()
                self._resolve("closed")
                return
        if out and self.transport is not None:
            self.transport.write(out)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


@dataclass
class ClientOptions:
    """What one client process does; the orchestrator builds one per shard."""

    connect: Address
    host: str
    sources: Sequence[str]
    sessions: int
    ports: tuple[int, int] | None = None  # explicit client ports (see the module docstring)
    path: str = "/"
    concurrency: int = 1
    timeout: float = 10.0  # per step: connect, handshake, echo
    deadline: float = 600.0  # seconds for the whole ramp
    progress_interval: float = 0.25
    limit: int = 0  # the physical limit, when known: utilisation = held / limit


@dataclass
class Attempt:
    """One session attempt: when, what happened, how long the handshake took, how full.

    Times are ``time.monotonic()``: one clock for every process on the host, so shards'
    attempts can be put on one time line.
    """

    started: float
    finished: float
    outcome: str
    handshake_ms: float | None
    held_before: int  # this process's held sessions when the attempt started

    def as_list(self) -> list[Any]:
        ms = None if self.handshake_ms is None else round(self.handshake_ms, 4)
        return [
            round(self.started, 6),
            round(self.finished, 6),
            self.outcome,
            ms,
            self.held_before,
        ]


@dataclass
class LoadClient:
    """Opens, verifies and holds sessions; ``emit`` receives every report as a dict."""

    options: ClientOptions
    emit: Callable[[dict[str, Any]], None] = lambda _report: None
    held: list[Session] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    first_failure: dict[str, Any] | None = None
    ramp_seconds: float = 0.0
    # held sessions that have ended since (the peer's Close code, or "none": a bare FIN/RST):
    # "held" counts sessions verified once, "alive" the ones not known to have ended since
    ended: Counter[str] = field(default_factory=Counter)
    _next: int = 0
    _port_next: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        lo = self.options.ports[0] if self.options.ports else 0
        self._port_next = [lo] * len(self.options.sources)

    # -- ramp ---------------------------------------------------------------------------------

    async def ramp(self) -> None:
        """Attempt ``sessions`` sessions with ``concurrency`` in flight, within the deadline."""
        opts = self.options
        started = time.monotonic()
        end = started + opts.deadline
        ticker = asyncio.get_running_loop().create_task(self._tick())
        try:
            workers = [self._worker(end) for _ in range(max(1, opts.concurrency))]
            await asyncio.gather(*workers)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        self.ramp_seconds = time.monotonic() - started
        self._progress()
        self.emit(
            {
                "event": "ramp_done",
                **self.counts(),
                "seconds": round(self.ramp_seconds, 3),
            }
        )

    async def _worker(self, end: float) -> None:
        while self._next < self.options.sessions and time.monotonic() < end:
            index = self._next
            self._next += 1
            await self.attempt(index)

    async def _tick(self) -> None:
        for _ in range(int(self.options.deadline / self.options.progress_interval) + 2):
            await asyncio.sleep(self.options.progress_interval)  # a report rate, not a wait
            self._progress()

    def _progress(self) -> None:
        self.emit({"event": "progress", **self.counts()})

    def counts(self) -> dict[str, Any]:
        limit = self.options.limit
        alive = len(self.held) - sum(self.ended.values())
        return {
            "attempted": len(self.attempts),
            "held": len(self.held),
            "alive": alive,
            "ended": dict(self.ended),
            "utilisation": round(alive / limit, 4) if limit else None,
            "failed": sum(self.failures.values()),
            "failures": dict(self.failures),
        }

    def _source(self, index: int) -> tuple[str, int]:
        """Round robin over source IPs; in window mode the next port of that IP's window."""
        opts = self.options
        slot = index % len(opts.sources)
        if opts.ports is None:
            return opts.sources[slot], 0
        lo, hi = opts.ports
        port = self._port_next[slot]
        self._port_next[slot] = port + 1 if port < hi else lo
        return opts.sources[slot], port

    async def attempt(self, index: int) -> str:
        """One session: connect, upgrade, echo; held on success. Returns the outcome."""
        opts = self.options
        held_before = len(self.held)
        started = time.monotonic()
        session: Session | None = None
        handshake_ms: float | None = None
        try:
            session = await self._connect(index)
            sent = time.monotonic()
            outcome = await asyncio.wait_for(session.start(opts.host, opts.path), opts.timeout)
            if outcome == OK:
                handshake_ms = (time.monotonic() - sent) * 1000
                text = f"hello {index}"
                echo = await asyncio.wait_for(session.send_text(text), opts.timeout)
                outcome = OK if echo == text else ("closed" if echo == "closed" else "bad_echo")
        except OSError as e:
            outcome = errno.errorcode.get(e.errno or 0, type(e).__name__)
        except TimeoutError:
            outcome = "timeout"
        if outcome == OK and session is not None:
            self.held.append(session)
            session.on_end = self._ended
        else:
            if session is not None:
                session.abort()
            self.failures[outcome] += 1
            if self.first_failure is None:
                held = len(self.held)
                self.first_failure = {
                    "index": index,
                    "outcome": outcome,
                    "held": held,
                    "utilisation": round(held / opts.limit, 4) if opts.limit else None,
                    "started": round(started, 6),
                }
                self.emit({"event": "failure", **self.first_failure})
        finished = time.monotonic()
        self.attempts.append(Attempt(started, finished, outcome, handshake_ms, held_before))
        return outcome

    def _ended(self, session: Session) -> None:
        """A held session's connection is gone: by the peer's Close (its code) or without."""
        self.ended[_how_ended(session)] += 1

    async def _connect(self, index: int) -> Session:
        loop = asyncio.get_running_loop()
        opts = self.options
        last: OSError | None = None
        # in window mode a port of ours may still be taken (a TIME_WAIT the kernel would not
        # give over): the next port of the window, a few times, before calling it a failure
        for _ in range(8 if opts.ports else 1):
            source = self._source(index)
            family = socket.AF_INET6 if ":" in source[0] else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                if opts.ports is None:
                    sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                else:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setblocking(False)
                sock.bind(source)
                await asyncio.wait_for(loop.sock_connect(sock, opts.connect), opts.timeout)
            except OSError as e:
                sock.close()
                if opts.ports is None or e.errno not in CLIENT_PORT_CLASH:
                    raise
                last = e
                continue
            except BaseException:
                sock.close()
                raise
            _, session = await loop.create_connection(Session, sock=sock)
            return session
        assert last is not None
        raise last

    # -- hold and check ----------------------------------------------------------------------

    async def check(self, batch: int = 1000) -> dict[str, Any]:
        """A final echo on every held session: the ones that do not answer were lost.

        ``verified`` is what answered: the sessions alive at the end, the only ones a run may
        call held. ``lost_close_codes`` says who ended the lost ones: a Close code is the
        peer's word (1001: the proxy going away, 1011: the origin failed), ``none`` a bare
        FIN or RST.
        """
        lost: Counter[str] = Counter()
        codes: Counter[str] = Counter()
        for first in range(0, len(self.held), batch):
            chunk = self.held[first : first + batch]
            texts = [f"final {first + i}" for i in range(len(chunk))]
            waiters = [s.send_text(t) for s, t in zip(chunk, texts, strict=True)]
            _, pending = await asyncio.wait(waiters, timeout=self.options.timeout)
            for waiter, text in zip(waiters, texts, strict=True):
                if waiter in pending:
                    waiter.cancel()
                    lost["timeout"] += 1
                elif waiter.result() != text:
                    lost[waiter.result() if waiter.result() == "closed" else "bad_echo"] += 1
            for session, waiter, text in zip(chunk, waiters, texts, strict=True):
                if waiter.cancelled() or waiter.result() != text:
                    codes[_how_ended(session)] += 1
        n_lost = sum(lost.values())
        return {
            "lost": n_lost,
            "lost_reasons": dict(lost),
            "lost_close_codes": dict(codes),
            "verified": len(self.held) - n_lost,
        }

    def result(self, checked: dict[str, Any]) -> dict[str, Any]:
        return {
            "event": "result",
            "pid": os.getpid(),
            **self.counts(),
            **checked,
            "ramp_seconds": round(self.ramp_seconds, 3),
            "first_failure": self.first_failure,
            "records": [a.as_list() for a in self.attempts],
        }

    def close(self) -> None:
        for session in self.held:
            session.abort()
        self.held.clear()


def _how_ended(session: Session) -> str:
    """The peer's Close code, this side's own reason (``protocol_error``: bytes that were not
    WebSocket frames), or ``none``: a bare FIN or RST, or no answer at all."""
    if session.close_code is not None:
        return str(session.close_code)
    return session.error or "none"


def _emit_line(report: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(report, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _main(options: ClientOptions, hold: float, control: bool) -> int:
    client = LoadClient(options, _emit_line)
    _emit_line({"event": "started", "pid": os.getpid()})
    commands = await _stdin_lines() if control else None
    await client.ramp()
    if commands is not None:
        # the orchestrator says when: it samples the proxy while every shard holds
        line = await asyncio.wait_for(commands.readline(), hold + 3600)
        if line.strip() != b"check":
            client.close()
            return 0
    else:
        await asyncio.sleep(hold)  # the hold itself, not a synchronisation
    checked = await client.check()
    _emit_line(client.result(checked))
    if commands is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(commands.readline(), 3600)  # "close" or EOF
    client.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.wsclient",
        description="Open WebSocket sessions through a proxy, verify each, hold them.",
    )
    parser.add_argument("--connect", required=True, metavar="IP:PORT", help="the proxy")
    parser.add_argument("--host", required=True, help="Host header (the proxy's route)")
    parser.add_argument("--path", default="/")
    parser.add_argument("--sources", required=True, help="client source IPs: A-B or a,b,c")
    parser.add_argument("--ports", help="LO-HI: pick client ports from this window")
    parser.add_argument("--sessions", type=int, required=True, help="attempts")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--limit", type=int, default=0, help="physical limit (for utilisation)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per step")
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds for the ramp")
    parser.add_argument("--hold", type=float, default=0.0, help="seconds to hold (no --control)")
    parser.add_argument(
        "--control",
        action="store_true",
        help="after the ramp wait for 'check' on stdin, then for 'close' or EOF",
    )
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = ClientOptions(
            connect=parse_address(args.connect),
            host=args.host,
            path=args.path,
            sources=parse_sources(args.sources),
            ports=parse_window(args.ports) if args.ports else None,
            sessions=args.sessions,
            concurrency=args.concurrency,
            limit=args.limit,
            timeout=args.timeout,
            deadline=args.deadline,
        )
    except ValueError as e:
        parser.error(str(e))
    runner: Callable[..., int]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return int(runner(_main(options, args.hold, args.control)))


if __name__ == "__main__":
    sys.exit(run())
