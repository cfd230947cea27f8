"""The scenario load client's sessions, their modes and their exact accounting.

Modes (``LOADS``): sessions that come and go (churn), that come back (storm: reconnect), or
that are held while faults happen around them (faults: count, batches and echoes on
command). The process around it, its stdin commands and its JSON lines on stdout, is
:mod:`testbed.wsload`.

Why it is built this way:

* **Every logical session ends in exactly one bucket**, decided by what this process saw,
  never inferred: *held* (it lived until the client itself closed it at the end of its
  lifetime, or it answered the final echo), *refused* (its first handshake failed: the HTTP
  status or errno name is the key), or *lost* (it was dropped by the other side and did not
  come back, or its final echo did not arrive). So ``held + refused + lost == attempted``
  in every shard and in their sum.
* **Steps are marked by the orchestrator, acknowledged by the client** (``step NAME`` in,
  ``{"event": "step"}`` out), so a failure or a drop is attributed to the step in which
  this process saw it, and the orchestrator starts a disruption only after every shard has
  acknowledged: the log line is the synchronisation, not a sleep.
* **Churn is open-loop**: arrivals are a Poisson process at ``--rate``, lifetimes are
  exponential with mean ``--lifetime`` (so ``rate x lifetime`` live sessions in steady
  state, Little's law), whatever the proxy answers. A closed loop would slow down exactly
  when the proxy does and hide it. The in-flight handshakes are capped (``client_busy``
  counts an arrival the client itself could not start) so a stalled proxy cannot make the
  client run away.
* **Closes are mixed in known shares and counted**: a WebSocket Close handshake (the peer
  answers, the origin ends up closing first), a TCP FIN without a Close frame, and an RST
  (``SO_LINGER`` 0). Which side closes first decides which side's 4-tuple sits in
  TIME_WAIT; the orchestrator measures that in the kernel, this client only says what it did.
* **Storm reconnects as real WebSocket clients do**: exponential backoff with full jitter
  (a uniform wait in ``[0, min(cap, base x 2^attempt)]``), each dropped session on its own,
  giving up after ``--give-up`` seconds. The Close code the client saw when its session was
  dropped is counted (``none``: the connection ended without a Close frame).
* **Bounded**: arrivals stop at ``--duration``, at most ``3 x rate x duration + 100``
  attempts; every step of a handshake within ``--timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from wsproto.events import CloseConnection
from wsproto.utilities import LocalProtocolError

from testbed.wsclient import OK, ClientOptions, LoadClient, Session
from testbed.wsorigin import Address

CLOSE_KINDS = ("close", "fin", "rst")
# what a client process does; each scenario names one (ScenarioRun.client_load)
LOADS = {
    "churn": "Poisson arrivals living an exponential lifetime; a dropped session is lost",
    "reconnect": "a ramp to --sessions; a dropped session reconnects with jittered backoff",
    "count": "a ramp, then batches and echoes on command; a dropped session is counted lost "
    "(a Close 1001 in the --drain-step is held)",
}
NO_CLOSE = "none"  # the session ended without a Close frame from the proxy


@dataclass
class LoadOptions:
    """What one scenario client process does; the orchestrator builds one per shard."""

    connect: Address
    host: str
    sources: Sequence[str]
    load: str  # churn | reconnect | count (LOADS)
    rate: float  # churn: arrivals per second; storm: the ramp's pace
    ports: tuple[int, int] | None = None
    path: str = "/"
    duration: float = 60.0  # churn: arrivals stop after this
    lifetime: float = 30.0  # churn: mean of the exponential lifetime
    mix: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    sessions: int = 0  # storm: logical sessions to open
    seed: int = 1
    timeout: float = 10.0
    max_in_flight: int = 1000
    backoff_base: float = 0.2
    backoff_cap: float = 5.0
    give_up: float = 120.0
    progress_interval: float = 0.25
    drain_step: str = "stop"  # faults: a Close 1001 in this step is the proxy's drain


@dataclass
class Step:
    """What this process saw during one step the orchestrator marked."""

    name: str
    started: float
    live_before: int
    failures: Counter[str] = field(default_factory=Counter)
    drops: int = 0
    close_codes: Counter[str] = field(default_factory=Counter)
    back: list[float] = field(default_factory=list)  # when dropped sessions were back
    lost: int = 0
    drained: int = 0  # faults: ended by the proxy's drain with Close 1001 (held, not lost)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "started": round(self.started, 6),
            "live_before": self.live_before,
            "failures": dict(self.failures),
            "drops": self.drops,
            "close_codes": dict(self.close_codes),
            "back": [round(t, 6) for t in self.back],
            "lost": self.lost,
            "drained": self.drained,
        }


@dataclass
class Slot:
    """One logical session: its current connection, and the step its last drop is counted in."""

    index: int
    session: Session | None = None
    closing: str | None = None  # churn: the kind of close this client started
    timer: asyncio.TimerHandle | None = None
    dropped_in: Step | None = None


class ScenarioClient:
    """One shard's sessions and their exact accounting (see the module docstring)."""

    def __init__(self, options: LoadOptions, emit: Callable[[dict[str, Any]], None]) -> None:
        self.options = options
        self.emit = emit
        self.rng = random.Random(options.seed)
        self.connector = LoadClient(
            ClientOptions(
                connect=options.connect,
                host=options.host,
                sources=options.sources,
                sessions=0,
                ports=options.ports,
                path=options.path,
                timeout=options.timeout,
            )
        )
        self.live: dict[Session, Slot] = {}
        self.attempted = 0
        self.held = 0  # lived their lifetime (churn) or answered the final echo
        self.refused: Counter[str] = Counter()
        self.lost: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()  # every handshake failure, reconnects too
        self.closes: Counter[str] = Counter()
        self.close_codes: Counter[str] = Counter()
        self.drops = 0
        self.drained = 0
        self.in_flight = 0
        self.pending: dict[int, asyncio.Task[None]] = {}  # storm: slots reconnecting
        self.step = Step("start", time.monotonic(), 0)
        self.steps: list[Step] = [self.step]
        self.tasks: set[asyncio.Task[Any]] = set()
        self._index = 0
        self._stopping = False

    # -- counters ----------------------------------------------------------------------------

    def counts(self) -> dict[str, Any]:
        return {
            "t": round(time.monotonic(), 6),
            "step": self.step.name,
            "live": len(self.live),
            "attempted": self.attempted,
            "held": self.held,
            "refused": sum(self.refused.values()),
            "lost": sum(self.lost.values()),
            "failed": sum(self.failures.values()),
            "failures": dict(self.failures),
            "closes": dict(self.closes),
            "close_codes": dict(self.close_codes),
            "drops": self.drops,
            "drained": self.drained,
            "pending": len(self.pending),
            "in_flight": self.in_flight,
        }

    def progress(self) -> None:
        self.emit({"event": "progress", **self.counts()})

    async def ticker(self) -> None:
        for _ in range(10**7):  # bounded; cancelled when the process ends
            await asyncio.sleep(self.options.progress_interval)  # a report rate, not a wait
            self.progress()

    def mark(self, name: str) -> None:
        """A new step: from now on failures and drops count in it."""
        self.step = Step(name, time.monotonic(), len(self.live))
        self.steps.append(self.step)
        self.emit({"event": "step", "name": name, **self.counts()})

    def _fail(self, outcome: str) -> None:
        self.failures[outcome] += 1
        self.step.failures[outcome] += 1

    # -- one handshake -----------------------------------------------------------------------

    async def open(self, host: str | None = None) -> tuple[str, Session | None]:
        """Connect, upgrade, echo: ``("ok", session)`` or ``(outcome, None)``."""
        opts = self.options
        host = host or opts.host
        index = self._index
        self._index += 1
        session: Session | None = None
        self.in_flight += 1
        try:
            session = await self.connector._connect(index)
            outcome = await asyncio.wait_for(session.start(host, opts.path), opts.timeout)
            if outcome == OK:
                text = f"hello {index}"
                echo = await asyncio.wait_for(session.send_text(text), opts.timeout)
                outcome = OK if echo == text else ("closed" if echo == "closed" else "bad_echo")
        except OSError as e:
            outcome = errno.errorcode.get(e.errno or 0, type(e).__name__)
        except TimeoutError:
            outcome = "timeout"
        except asyncio.CancelledError:
            if session is not None:
                session.abort()
            raise
        finally:
            self.in_flight -= 1
        if outcome == OK and session is not None and not session.closed:
            return OK, session
        if session is not None:
            session.abort()
        return ("closed" if outcome == OK else outcome), None

    def _hold(self, slot: Slot, session: Session) -> None:
        slot.session = session
        self.live[session] = slot
        session.on_end = self._ended

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- churn -------------------------------------------------------------------------------

    async def churn(self) -> None:
        """Poisson arrivals for ``duration`` seconds; then wait for the handshakes in flight."""
        opts = self.options
        start = time.monotonic()
        end = start + opts.duration
        next_t = start
        for _ in range(int(3 * opts.rate * opts.duration) + 100):
            next_t += self.rng.expovariate(opts.rate)
            if next_t >= end:
                break
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            if self.in_flight >= opts.max_in_flight:
                self.attempted += 1
                self.refused["client_busy"] += 1
                self._fail("client_busy")
                continue
            self._spawn(self._churn_one())
        await self._settle_handshakes()
        self.emit({"event": "load_done", **self.counts()})

    async def _settle_handshakes(self) -> None:
        if self.tasks:
            _, late = await asyncio.wait(set(self.tasks), timeout=3 * self.options.timeout + 5)
            for task in late:  # bounded: each step has its own timeout, so this is rare
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=5)

    async def _churn_one(self) -> None:
        self.attempted += 1
        try:
            outcome, session = await self.open()
        except asyncio.CancelledError:
            self.refused["cancelled"] += 1
            raise
        if session is None:
            self.refused[outcome] += 1
            self._fail(outcome)
            return
        slot = Slot(self.attempted)
        self._hold(slot, session)
        lifetime = self.rng.expovariate(1.0 / self.options.lifetime)
        kind = self.rng.choices(CLOSE_KINDS, weights=self.options.mix)[0]
        loop = asyncio.get_running_loop()
        slot.timer = loop.call_later(lifetime, self._close, session, kind)

    def _close(self, session: Session, kind: str) -> None:
        """The end of a churn session's lifetime: it was held, whatever the close does."""
        slot = self.live.pop(session, None)
        if slot is None:
            return
        slot.closing = kind
        session.on_end = None
        self.held += 1
        self.closes[kind] += 1
        transport = session.transport
        if transport is None:
            return
        if kind == "close":
            conn = session.conn
            try:
                data = conn.send(CloseConnection(code=1000)) if conn is not None else b""
            except LocalProtocolError:
                data = b""
            transport.write(data)
            # the peer's Close ends it (Session closes on it); an unanswered one is aborted
            asyncio.get_running_loop().call_later(self.options.timeout, session.abort)
        elif kind == "fin":
            transport.close()
        else:
            sock = transport.get_extra_info("socket")
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()

    # -- storm -------------------------------------------------------------------------------

    async def ramp(self) -> None:
        """``sessions`` logical sessions at ``rate`` per second, a bounded number in flight."""
        opts = self.options
        start = time.monotonic()
        gate = asyncio.Semaphore(max(1, min(opts.max_in_flight, 256)))

        async def one(index: int) -> None:
            async with gate:
                outcome, session = await self.open()
            if session is None:
                self.refused[outcome] += 1
                self._fail(outcome)
                return
            self._hold(Slot(index), session)

        for i in range(opts.sessions):
            await asyncio.sleep(max(0.0, start + i / opts.rate - time.monotonic()))
            self.attempted += 1
            self._spawn(one(i))
        await self._settle_handshakes()
        self.emit({"event": "ramp_done", **self.counts(), "seconds": time.monotonic() - start})

    def _ended(self, session: Session) -> None:
        """The other side ended a session this client still wanted."""
        if self._stopping:
            return  # the final check counts it
        slot = self.live.pop(session, None)
        if slot is None:
            return
        code = NO_CLOSE if session.close_code is None else str(session.close_code)
        self.close_codes[code] += 1
        self.step.close_codes[code] += 1
        self.drops += 1
        self.step.drops += 1
        if slot.timer is not None:
            slot.timer.cancel()
        if self.options.load == "count":
            if code == "1001" and self.step.name == self.options.drain_step:
                # the proxy was told to stop and said so: the session lived to the end
                self.drained += 1
                self.step.drained += 1
                self.held += 1
            else:
                self.lost[f"dropped_{code}"] += 1
                self.step.lost += 1
            return
        if self.options.load == "churn":
            self.lost["dropped"] += 1
            self.step.lost += 1
            return
        slot.session = None
        slot.dropped_in = self.step
        self.pending[slot.index] = self._spawn(self._reconnect(slot, time.monotonic()))

    async def _reconnect(self, slot: Slot, dropped: float) -> None:
        opts = self.options
        try:
            for attempt in range(64):  # bounded by give_up long before this
                ceiling = min(opts.backoff_cap, opts.backoff_base * 2**attempt)
                wait = self.rng.uniform(0, ceiling)
                if time.monotonic() + wait - dropped > opts.give_up:
                    break
                await asyncio.sleep(wait)  # the backoff itself, what is being measured
                outcome, session = await self.open()
                if session is not None:
                    if slot.dropped_in is not None:
                        slot.dropped_in.back.append(time.monotonic())
                    self._hold(slot, session)
                    return
                self._fail(outcome)
            self._give_up(slot, "gave_up")
        except asyncio.CancelledError:
            self._give_up(slot, "not_back_at_check")
            raise
        finally:
            self.pending.pop(slot.index, None)
            if not self.pending:
                self.emit({"event": "settled", **self.counts()})

    def _give_up(self, slot: Slot, reason: str) -> None:
        self.lost[reason] += 1
        if slot.dropped_in is not None:
            slot.dropped_in.lost += 1

    # -- faults: batches of new sessions, echoes on the held ones -----------------------------

    async def open_batch(self, tag: str, count: int, host: str) -> None:
        """``count`` new sessions naming ``host``, held on success; one ``opened`` line when
        every one has an outcome, so the orchestrator waits on it instead of on a clock."""
        gate = asyncio.Semaphore(64)
        outcomes: Counter[str] = Counter()

        async def one() -> None:
            async with gate:
                outcome, session = await self.open(host)
            outcomes[outcome] += 1
            if session is None:
                self.refused[outcome] += 1
                self._fail(outcome)
                return
            self._hold(Slot(self.attempted), session)

        self.attempted += count
        await asyncio.gather(*(one() for _ in range(count)))
        self.emit({"event": "opened", "tag": tag, "outcomes": dict(outcomes), **self.counts()})

    async def echo_all(self, tag: str) -> None:
        """An echo on every held session; one that does not answer within ``timeout`` is
        lost in the current step (and aborted, so it cannot be counted twice)."""
        sessions = list(self.live)
        texts = [f"check {tag} {i}" for i in range(len(sessions))]
        waiters = [s.send_text(t) for s, t in zip(sessions, texts, strict=True)]
        done: set[asyncio.Future[str]] = set()
        if waiters:
            done, _ = await asyncio.wait(waiters, timeout=self.options.timeout)
        failed = 0
        for session, waiter, text in zip(sessions, waiters, texts, strict=True):
            if waiter in done and waiter.result() == text:
                continue
            if waiter not in done:
                waiter.cancel()
            slot = self.live.pop(session, None)
            if slot is None:
                continue  # ended meanwhile: _ended counted it already
            session.on_end = None
            session.abort()
            failed += 1
            self.lost["echo"] += 1
            self.step.lost += 1
        self.emit(
            {"event": "echoed", "tag": tag, "echo_ok": len(sessions) - failed,
             "echo_failed": failed, **self.counts()}
        )  # fmt: skip

    # -- the end -----------------------------------------------------------------------------

    async def check(self) -> None:
        """Sessions still waiting to reconnect are lost; the live ones must echo."""
        for index, task in list(self.pending.items()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.pending.pop(index, None)
        late = list(self.tasks)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=5)
        self._stopping = True
        for slot in self.live.values():
            if slot.timer is not None:  # a lifetime ending now would count it twice
                slot.timer.cancel()
        sessions = list(self.live)
        texts = [f"final {i}" for i in range(len(sessions))]
        waiters = [s.send_text(t) for s, t in zip(sessions, texts, strict=True)]
        done: set[asyncio.Future[str]] = set()
        if waiters:
            done, _ = await asyncio.wait(waiters, timeout=self.options.timeout)
        for session, waiter, text in zip(sessions, waiters, texts, strict=True):
            if waiter in done and waiter.result() == text:
                self.held += 1
            else:
                if waiter not in done:
                    waiter.cancel()
                self._give_up(self.live[session], "final_echo")
        self.emit(self.result())

    def result(self) -> dict[str, Any]:
        return {
            "event": "result",
            "pid": os.getpid(),
            **self.counts(),
            "refused_by": dict(self.refused),
            "lost_by": dict(self.lost),
            "steps": [s.as_dict() for s in self.steps],
        }

    def close(self) -> None:
        self._stopping = True
        for session in list(self.live):
            session.abort()
        self.live.clear()
