"""connect() latency *through the pool* as one (egress, destination) pair fills: 0% to 99%.

Why this exists: the requirement is "keep connect() latency flat up to 99% utilisation",
measured as p99 at 0% and at 99% *through the pool* -- not the raw syscalls, which
bench/connect_latency.py covers. The pool's claim is that once a pair is busy
(``busy_threshold``, half full) :class:`pool.egress.EgressSet` hands the kernel one port it
knows is free (a one-port ``IP_LOCAL_PORT_RANGE`` window from its free-port record), so the
kernel checks one 4-tuple instead of running its parity-ordered search over a nearly full
range (~35x slower at half full, see ../shared/docs/ephemeral-ports.md). Everything the pool
adds in Python (candidate ordering, capacity lookups, the record, connectx's steps, the
event loop round trip) is inside the timed region, because a caller pays for all of it.

Variants, each in its own fresh fill (fresh listener, empty range) so none inherits another's
held ports or accept-queue entries:

* ``pool``     -- ``EgressSet(["127.0.0.1"])``: the record is used once the pair is busy;
* ``baseline`` -- ``EgressSet(["127.0.0.1"], busy_threshold=2.0)``: the same Python path but
  the record is never used, so every connect runs the kernel's own search;
* ``plain``    -- reference: ``loop.sock_connect`` on an unbound non-blocking socket (socket
  creation included, as ``egress.connect`` creates its socket inside the await too). Note
  that uvloop's ``sock_connect`` resolves even a numeric address in libuv's thread pool
  (it calls ``getaddrinfo`` without a socket type, missing its numeric fast path); the pool's
  connectx goes through ``loop.sock_connect`` too, so both carry that cost under uvloop.

How: the process moves into a private network namespace (host sysctls stay untouched) with an
N-port range, listens on 127.0.2.1:9000 with a 65535 backlog and never accepts (held
connections wait in the accept queue, so each costs this process one fd), fills the pair
through the variant itself, sequentially, to 0/50/90/99% of N and, at each level, times M
single connects. The M samples are split over ``--rounds`` rounds (default 4), each round a
fresh fill of every variant in turn, so a few seconds of neighbours' load fall on all levels
and variants alike instead of on whichever level was being sampled then. Each sample's
socket is closed abortively (RST: no TIME_WAIT) and its slot released at once, so utilisation
stays exactly at the level. The pool builds its free-port record once per fill, when the pair
first crosses the threshold: that one-off cost is reported on its own line (which connect
paid it, and a direct timing of the build), not hidden in the table.

Reading the figures on a shared 2-core machine: wall-clock p99 is what the requirement asks
for, but other processes' load lands in it (a time slice is milliseconds, a connect ~0.1 ms).
So each level also reports the on-CPU p99 (this thread's CPU time around the same await) and
how many samples saw an involuntary context switch, and the run records the load average:
a wall-clock tail without an on-CPU tail is the neighbours, not the pool. Run under uvloop
when importable (the proxy's loop), else asyncio; the loop is named in the output.

Run as root::

    .venv/bin/python bench/pool_latency.py                           # 9,000 ports, 1,000 samples
    .venv/bin/python bench/pool_latency.py --ports 2000 --samples 200   # seconds
    .venv/bin/python bench/pool_latency.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import json
import os
import platform
import random
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script, sys.path[0] is bench/, not the repo; the project is not necessarily
# installed into the venv, so make ``pool`` importable.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from pool import kernel, netns  # noqa: E402  (needs the sys.path line above)
from pool.egress import EgressSet, FreePorts  # noqa: E402

SRC_IP = "127.0.0.1"
"""The one egress IP; plain connect() to 127.0.2.1 gets the same source from the lo route, so
every variant fills the same (source, destination) pair."""

DST = ("127.0.2.1", 9000)
LEVELS = (0.0, 0.5, 0.9, 0.99)
LISTEN_BACKLOG = 65535
"""Held connections *and* every reset sample stay in the accept queue of a listener that never
accepts (the RST moves the child to CLOSE, only accept() dequeues it); a full queue drops SYNs
and connect() stalls for a second. Hence one fresh listener per variant, and a budget check."""

_ABORT = struct.pack("ii", 1, 0)


def abort_close(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER on, 0 s): no TIME_WAIT, so the port is free again at once and
    the utilisation stays at the level being measured."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORT)
    finally:
        sock.close()


def percentile(sorted_ns: list[int], q: float) -> float | None:
    """Nearest-rank percentile in µs: no interpolation, so p99 is a latency that happened."""
    if not sorted_ns:
        return None
    rank = max(1, min(len(sorted_ns), -(-len(sorted_ns) * q // 100)))
    return sorted_ns[int(rank) - 1] / 1000.0


def level_name(level: float) -> str:
    return f"{level * 100:g}%"


# --- the variants ----------------------------------------------------------------------------


@dataclass
class Variant:
    """One way of getting a connected socket, and (for pool variants) its EgressSet."""

    key: str
    label: str
    egress: EgressSet | None = None
    round: int = 0

    async def open(self) -> tuple[socket.socket, Callable[[], None]]:
        """A connected socket and the callable that gives its count back."""
        if self.egress is not None:
            sock, slot = await self.egress.connect(DST)
            return sock, slot.release
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, DST)
        except BaseException:
            sock.close()
            raise
        return sock, _nothing

    def record_size(self) -> int | None:
        """Ports in the pair's free-port record, None while it has none (or for plain).

        Reads EgressSet internals (``_pairs``, ``Pair.free``) only to *see* when the one-off
        record build happens; degrades to None if those names change.
        """
        if self.egress is None:
            return None
        for (_e, dst), pair in getattr(self.egress, "_pairs", {}).items():
            if dst == DST:
                free = getattr(pair, "free", None)
                return None if free is None else len(free)
        return None


def _nothing() -> None:
    """plain connect() has no count to give back."""


def make_variants(keys: str, round_no: int) -> list[Variant]:
    """Fresh EgressSets: a variant must not inherit another's (or its last round's) state."""
    all_: dict[str, Callable[[], Variant]] = {
        "pool": lambda: Variant("pool", "pool: EgressSet (record when busy)", EgressSet([SRC_IP])),
        "baseline": lambda: Variant(
            "baseline",
            "baseline: EgressSet busy_threshold=2",
            EgressSet([SRC_IP], busy_threshold=2.0),
        ),
        "plain": lambda: Variant("plain", "plain: loop.sock_connect, unbound"),
    }
    made = [all_[k]() for k in keys.split(",")]
    for v in made:
        v.round = round_no
    return made


# --- measuring -------------------------------------------------------------------------------


@dataclass
class Series:
    """One variant at one level: latencies of successful samples, and what else happened.

    Besides wall time, each sample's on-CPU time (this thread, user + kernel, which includes
    the loopback handshake run in softirq on our CPU) and whether the scheduler preempted us
    during it: on 2 shared cores a wall-clock tail with no matching on-CPU tail is other
    processes' load, not the pool's work.
    """

    ns: list[int] = field(default_factory=list)
    cpu_ns: list[int] = field(default_factory=list)
    preempted: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    gc_runs: int = 0
    seconds: float = 0.0

    def merge(self, other: Series) -> None:
        """Add one round's samples: a level's figures are taken over all rounds together."""
        self.ns += other.ns
        self.cpu_ns += other.cpu_ns
        self.preempted += other.preempted
        for name, n in other.failures.items():
            self.failures[name] = self.failures.get(name, 0) + n
        self.gc_runs += other.gc_runs
        self.seconds += other.seconds

    def summary(self) -> dict[str, Any]:
        ns, cpu = sorted(self.ns), sorted(self.cpu_ns)
        return {
            "median_us": percentile(ns, 50),
            "p99_us": percentile(ns, 99),
            "max_us": ns[-1] / 1000.0 if ns else None,
            "samples": len(ns),
            "cpu_median_us": percentile(cpu, 50),
            "cpu_p99_us": percentile(cpu, 99),
            "preempted": self.preempted,
            "failures": dict(self.failures),
            "gc_runs": self.gc_runs,
            "seconds": round(self.seconds, 3),
        }


class GcCounter:
    """Counts collections while sampling: a full collection over ~9k held sockets, slots and
    finalizers would be a pause in some sample, and the reader should know if one happened."""

    def __init__(self) -> None:
        self.runs = 0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.runs += 1

    def close(self) -> None:
        gc.callbacks.remove(self._on_gc)


@dataclass
class Event:
    """A connect that built the free-port record (a one-off per busy spell of the pair)."""

    variant: str
    round: int
    where: str  # "fill", "warm-up" or "sample"
    level: str
    index: int
    latency_us: float
    record_ports: int


async def fill_to(
    variant: Variant,
    count: int,
    held: list[tuple[socket.socket, Callable[[], None]]],
    deadline: float,
    level: str,
    events: list[Event],
) -> dict[str, Any]:
    """Hold ``count`` connections opened by the variant itself, sequentially, so the ports taken
    (and the pool's own accounting) are what that variant would have on a busy host."""
    t0 = time.perf_counter()
    worst_ns, started = 0, len(held)
    error: str | None = None
    gcc = GcCounter()
    while len(held) < count:
        if time.perf_counter() > deadline:
            error = f"fill time bound hit at {len(held)} of {count}"
            break
        before = variant.record_size()
        s0 = time.perf_counter_ns()
        try:
            held.append(await variant.open())
        except OSError as e:
            error = f"{errno.errorcode.get(e.errno or 0, e.errno)} at {len(held)}: {e}"
            break
        spent = time.perf_counter_ns() - s0
        worst_ns = max(worst_ns, spent)
        after = variant.record_size()
        if before is None and after is not None:
            events.append(
                Event(variant.key, variant.round, "fill", level, len(held) - 1, spent / 1e3, after)
            )
    gcc.close()
    return {
        "held": len(held),
        "opened": len(held) - started,
        "seconds": round(time.perf_counter() - t0, 3),
        "max_us": worst_ns / 1000.0,
        "gc_runs": gcc.runs,
        "error": error,
    }


async def sample(
    variant: Variant,
    n: int,
    deadline: float,
    series: Series | None,
    level: str,
    where: str,
    events: list[Event],
) -> None:
    """Time ``n`` single connects (bounded by ``deadline``): perf_counter_ns around the await
    only; the abortive close and the release happen right after, outside the timed region."""
    t0 = time.perf_counter()
    for i in range(n):
        if time.perf_counter() > deadline:
            break
        before = variant.record_size()
        switches = resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw
        c0 = time.thread_time_ns()
        s0 = time.perf_counter_ns()
        try:
            sock, release = await variant.open()
        except OSError as e:
            if series is not None:
                name = errno.errorcode.get(e.errno or 0, str(e.errno))
                series.failures[name] = series.failures.get(name, 0) + 1
            continue
        spent = time.perf_counter_ns() - s0
        cpu = time.thread_time_ns() - c0
        switched = resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw != switches
        after = variant.record_size()
        abort_close(sock)
        release()
        if before is None and after is not None:
            events.append(Event(variant.key, variant.round, where, level, i, spent / 1e3, after))
        if series is not None:
            series.ns.append(spent)
            series.cpu_ns.append(cpu)
            series.preempted += switched
    if series is not None:
        series.seconds = time.perf_counter() - t0


TCP_SOCKS_PER_SLAB = 13
"""Objects per slab of the kernel's "TCP" cache here (2368-byte socks, order-3 slabs):
/proc/slabinfo. Only used to size the margin of :class:`SlabRoom`."""


class SlabRoom:
    """Free slots in the kernel's TCP socket slab, made before a level's samples, so that the
    child socket each sample leaves in the never-accepting listener's queue fills a slot that
    already exists instead of needing a new slab.

    Why: every sample leaves one child socket behind (the RST moves it to CLOSE, only
    accept() would free it), so the TCP cache grows by one slab (8 pages) every 13 samples.
    On this VM a page the host has not backed yet (never touched, or handed back by free-page
    reporting) costs ~10 µs at first touch, so roughly one sample in 13 took ~85 µs more --
    at every level, for every variant, but only when the allocator happened to hand out such
    pages: a p99 artefact of the benchmark's listener and the VM, not of the pool (ad-hoc
    check: the tail vanished when the children were accepted and closed). Holding every
    other one of 2n fresh sockets leaves n free slots in partially used slabs, which SLUB
    fills before it allocates a new slab. ``--no-slab-room`` turns this off to see it.
    Costs n file descriptors while the level is sampled; the sockets are unbound (no port).
    """

    def __init__(self, slots: int) -> None:
        made = [
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            for _ in range(2 * (slots + TCP_SOCKS_PER_SLAB))
        ]
        for s in made[::2]:
            s.close()
        self._kept = made[1::2]

    def __len__(self) -> int:
        return len(self._kept)

    def close(self) -> None:
        for s in self._kept:
            s.close()
        self._kept.clear()


def tcp_sockets() -> int:
    """TCP sockets in this namespace (/proc/net/tcp follows the process's netns): a variant
    must start from an empty range, with nothing left over from the previous one."""
    with open("/proc/net/tcp") as f:
        return sum(1 for _ in f) - 1


def listener_queue(listener: socket.socket) -> tuple[int, int]:
    """(queued, max) of a listener from TCP_INFO (tcpi_unacked/tcpi_sacked mean that there)."""
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    queued, limit = struct.unpack_from("=II", info, 24)
    return queued, limit


def new_listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(DST)
    s.listen(LISTEN_BACKLOG)
    return s


async def run_variant(
    variant: Variant,
    samples: int,
    args: argparse.Namespace,
    counts: list[int],
    events: list[Event],
) -> dict[str, Any]:
    """One round of one variant: fresh listener, fill level by level and take ``samples`` at
    each; then empty the range again (abortive closes, listener closed with its queue)."""
    listener = new_listener()
    start_sockets = tcp_sockets()
    held: list[tuple[socket.socket, Callable[[], None]]] = []
    levels: dict[str, Series] = {}
    fills: dict[str, Any] = {}
    warm_n = max(1, samples // 100)
    gcc = GcCounter()
    try:
        # first use: lazy imports, route and sysctl caches, the loop's first epoll registration
        await sample(variant, warm_n, time.perf_counter() + 5, None, "0%", "warm-up", events)
        for level, count in zip(LEVELS, counts, strict=True):
            name = level_name(level)
            fills[name] = await fill_to(
                variant, count, held, time.perf_counter() + args.fill_seconds, name, events
            )
            if fills[name]["error"]:
                break
            gc.collect()  # not in the samples: a collection owed by the fill
            room = SlabRoom(warm_n + samples) if args.slab_room else None
            try:
                await sample(
                    variant, warm_n, time.perf_counter() + 5, None, name, "warm-up", events
                )
                series = Series()
                runs0 = gcc.runs
                await sample(
                    variant,
                    samples,
                    time.perf_counter() + args.max_seconds / args.rounds,
                    series,
                    name,
                    "sample",
                    events,
                )
                series.gc_runs = gcc.runs - runs0
            finally:
                if room is not None:
                    room.close()
            levels[name] = series
    finally:
        gcc.close()
        queue = listener_queue(listener)
        for sock, release in held:
            abort_close(sock)
            release()
        held.clear()
        listener.close()
    return {
        "levels": levels,
        "fills": fills,
        "tcp_sockets_at_start": start_sockets,
        "listener_queue_end": list(queue),
    }


def time_record_build(low: int, high: int, held_count: int) -> dict[str, float]:
    """The record build as EgressSet._open does it at the threshold (every port of the range
    not held and not reserved), timed directly, µs: the first build (fresh memory for the list
    and index, as in the pool) and the median of 5 more."""
    rng = random.Random(1)
    held = set(rng.sample(range(low, high + 1), held_count))
    reserved = kernel.port_sysctls().reserved
    times = []
    for _ in range(6):
        t0 = time.perf_counter_ns()
        FreePorts(p for p in range(low, high + 1) if p not in held and p not in reserved)
        times.append(time.perf_counter_ns() - t0)
    return {"first_us": times[0] / 1000.0, "median_us": sorted(times[1:])[2] / 1000.0}


# --- verdicts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ratio:
    """One claim: ``stat`` of ``num`` at ``num_level`` over that of ``den`` at ``den_level``."""

    name: str
    stat: str
    num: tuple[str, str]
    den: tuple[str, str]
    at_most: float | None = None
    at_least: float | None = None

    def target(self) -> str | None:
        if self.at_most is not None:
            return f"<= {self.at_most:g}"
        return f">= {self.at_least:g}" if self.at_least is not None else None

    def passes(self, value: float) -> bool | None:
        """None for an informational ratio (no target)."""
        if self.at_most is not None:
            return value <= self.at_most
        return value >= self.at_least if self.at_least is not None else None


RATIOS = (
    Ratio(
        "pool flatness: p99(pool @99%) / p99(pool @0%)",
        "p99_us",
        ("pool", "99%"),
        ("pool", "0%"),
        at_most=1.5,
    ),
    # The requirement sets no figure here: >= 10 is what bench/connect_latency.py asks of the
    # raw one-port window against plain connect() at 99%, kept so the two can be compared.
    Ratio(
        "pool speed-up: median(baseline @99%) / median(pool @99%)",
        "median_us",
        ("baseline", "99%"),
        ("pool", "99%"),
        at_least=10.0,
    ),
    # Informational, no target: what the pool's Python path costs on an idle range, and the
    # flatness ratio on on-CPU time (immune to other processes' preemption on shared cores).
    Ratio(
        "info: pool cost at idle: median(pool @0%) / median(plain @0%)",
        "median_us",
        ("pool", "0%"),
        ("plain", "0%"),
    ),
    Ratio(
        "info: pool on-CPU flatness: cpu p99 @99% / cpu p99 @0%",
        "cpu_p99_us",
        ("pool", "99%"),
        ("pool", "0%"),
    ),
)


def compute_ratios(variants: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for r in RATIOS:
        try:
            top = variants[r.num[0]]["levels"][r.num[1]][r.stat]
            bottom = variants[r.den[0]]["levels"][r.den[1]][r.stat]
        except KeyError:
            continue
        if top is None or not bottom:
            continue
        value = top / bottom
        out.append({"name": r.name, "value": value, "target": r.target(), "pass": r.passes(value)})
    return out


# --- running ---------------------------------------------------------------------------------


def pick_loop(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    """uvloop when importable (what the proxy runs under), else asyncio's default loop."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return uvloop.new_event_loop, f"uvloop {uvloop.__version__}"
    return asyncio.new_event_loop, "asyncio (default selector loop)"


def round_samples(total: int, rounds: int) -> list[int]:
    """``total`` samples split as evenly as possible over the rounds."""
    return [total * (r + 1) // rounds - total * r // rounds for r in range(rounds)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every round runs every variant once, in order, each in its own fill; the rounds exist
    so that a few seconds of neighbours' load land on every level and variant alike rather
    than on whichever level happened to be sampled then."""
    low, high = args.low, args.low + args.ports - 1
    counts = [round(args.ports * level) for level in LEVELS]
    per_round = round_samples(args.samples, args.rounds)
    most = max(per_round)
    warm_n = max(1, most // 100)
    planned = counts[-1] + warm_n * (len(LEVELS) + 1) + most * len(LEVELS)
    if planned > LISTEN_BACKLOG - 100:
        sys.exit(
            f"pool_latency: a round needs {planned} accept-queue slots (held + every sample), "
            f"the listener has {LISTEN_BACKLOG}: use fewer --samples or --ports, or more --rounds"
        )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = (warm_n + most + TCP_SOCKS_PER_SLAB) if args.slab_room else 0
    if counts[-1] + room + 64 > hard:
        sys.exit(
            f"pool_latency: {counts[-1]} held sockets + {room} for the slab room exceed the "
            f"{hard}-fd limit: use fewer --ports or --samples (or --no-slab-room)"
        )
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    netns.unshare_process((low, high))
    loop_factory, loop_name = pick_loop(args.loop)
    events: list[Event] = []
    keys = args.variants.split(",")
    labels: dict[str, str] = {}
    series: dict[str, dict[str, Series]] = {k: {} for k in keys}
    rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    load_start = os.getloadavg()
    t0 = time.perf_counter()

    async def main() -> None:
        for r, n in enumerate(per_round):
            if n == 0:
                continue
            for variant in make_variants(args.variants, r):
                labels[variant.key] = variant.label
                got = await run_variant(variant, n, args, counts, events)
                for name, one in got.pop("levels").items():
                    series[variant.key].setdefault(name, Series()).merge(one)
                rounds[variant.key].append(got)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())

    variants = {
        k: {
            "label": labels[k],
            "levels": {name: one.summary() for name, one in series[k].items()},
            "rounds": rounds[k],
        }
        for k in keys
    }
    return {
        "config": {
            "kernel": platform.release(),
            "python": platform.python_version(),
            "loop": loop_name,
            "port_range": [low, high],
            "ports": args.ports,
            "held_per_level": dict(zip(map(level_name, LEVELS), counts, strict=True)),
            "source": SRC_IP,
            "destination": f"{DST[0]}:{DST[1]}",
            "samples": args.samples,
            "rounds": args.rounds,
            "samples_per_round": per_round,
            "warm_up_per_level": warm_n,
            "max_seconds_per_level": args.max_seconds,
            "fill_seconds_bound": args.fill_seconds,
            "slab_room": args.slab_room,
            "cpus": len(os.sched_getaffinity(0)),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "seconds": round(time.perf_counter() - t0, 1),
        },
        "variants": variants,
        "record_builds": [e.__dict__ for e in events],
        "record_build_direct_us": time_record_build(low, high, counts[1]),
        "ratios": compute_ratios(variants),
    }


def _us(value: float | None) -> str:
    return f"{value:8.1f}" if value is not None else f"{'-':>8}"


def print_report(out: dict[str, Any]) -> None:
    """The human form: variant x level, median / p99 (µs) and samples; then the verdicts."""
    cfg = out["config"]
    lo, hi = cfg["port_range"]
    print(
        f"connect() latency through the pool: kernel {cfg['kernel']}, Python {cfg['python']}, "
        f"loop {cfg['loop']}"
    )
    print(
        f"range {lo}-{hi} ({cfg['ports']} ports), {cfg['source']} -> {cfg['destination']}, "
        f"held per level {cfg['held_per_level']}"
    )
    print(
        f"{cfg['samples']} samples per variant and level in {cfg['rounds']} rounds "
        f"{cfg['samples_per_round']}, each round a fresh fill of every variant; "
        f"{cfg['cpus']} cpus, load {cfg['loadavg_start'][0]} -> {cfg['loadavg_end'][0]}, "
        f"{cfg['seconds']} s"
    )
    print()
    names = [level_name(x) for x in LEVELS]
    head = f"{'variant':<38}" + "".join(f"{n + ' med/p99 µs (n)':>26}" for n in names)
    print(head)
    print("-" * len(head))
    for v in out["variants"].values():
        cells = []
        for n in names:
            r = v["levels"].get(n)
            if r is None:
                cells.append(f"{'not reached':>24}")
                continue
            cells.append(f"{_us(r['median_us'])} /{_us(r['p99_us'])} ({r['samples']:>4})")
        print(f"{v['label']:<38}" + "".join(f"{c:>26}" for c in cells))
    print()
    print(
        "per level: max µs | on-CPU p99 µs | samples with an involuntary context switch;\n"
        "fills to each level, over the rounds: mean seconds / slowest connect µs / gc runs"
    )
    for key, v in out["variants"].items():
        parts = ", ".join(
            f"{n} {_us(r['max_us']).strip()}|{_us(r['cpu_p99_us']).strip()}|{r['preempted']}"
            for n, r in v["levels"].items()
        )
        fills = []
        for n in names:
            per = [rd["fills"][n] for rd in v["rounds"] if n in rd["fills"]]
            per = [f for f in per if f["opened"]]
            if not per:
                continue
            errors = sorted({f["error"] for f in per if f["error"]})
            fills.append(
                f"{n} {sum(f['seconds'] for f in per) / len(per):.2f}/"
                f"{max(f['max_us'] for f in per):.0f}/{sum(f['gc_runs'] for f in per)}"
                + (f" ({'; '.join(errors)})" if errors else "")
            )
        print(f"  {key:<9} {parts}")
        print(f"  {'':<9} fills: {', '.join(fills)}")
    failed = {
        f"{k} @{n}": r["failures"]
        for k, v in out["variants"].items()
        for n, r in v["levels"].items()
        if r["failures"]
    }
    gcs = {
        f"{k} @{n}": r["gc_runs"]
        for k, v in out["variants"].items()
        for n, r in v["levels"].items()
        if r["gc_runs"]
    }
    print(f"  failed samples: {failed or 'none'}; gc collections while sampling: {gcs or 'none'}")
    starts = {
        k: max(rd["tcp_sockets_at_start"] for rd in v["rounds"]) for k, v in out["variants"].items()
    }
    queues = {
        k: max(rd["listener_queue_end"][0] for rd in v["rounds"])
        for k, v in out["variants"].items()
    }
    print(f"  most tcp sockets at a round's start (listener only = 1): {starts}")
    print(f"  fullest accept queue at a round's end (of {LISTEN_BACKLOG}): {queues}")
    print(f"  slab room for the samples' child sockets: {'on' if cfg['slab_room'] else 'off'}")
    print()
    print("one-off: the free-port record is built when the pair first crosses the threshold")
    for e in out["record_builds"]:
        print(
            f"  {e['variant']} round {e['round'] + 1}: built in {e['where']} at {e['level']} "
            f"(connect #{e['index']}): "
            f"that connect took {e['latency_us']:.1f} µs, record holds {e['record_ports']} ports"
        )
    if not out["record_builds"]:
        print("  (no build seen)")
    direct = out["record_build_direct_us"]
    print(
        f"  the build alone, timed directly over this range at 50% held: first "
        f"{direct['first_us']:.1f} µs, then {direct['median_us']:.1f} µs (median of 5)"
    )
    print()
    for r in out["ratios"]:
        if r["pass"] is None:
            print(f"{r['name']:<62} = {r['value']:7.2f}")
            continue
        verdict = "PASS" if r["pass"] else "MISS"
        print(f"{r['name']:<62} = {r['value']:7.2f}   target {r['target']:<7} {verdict}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument("--ports", type=int, default=9000, help="size of the port range")
    p.add_argument("--low", type=int, default=40000, help="first port of the range")
    p.add_argument("--samples", type=int, default=1000, help="samples per variant and level")
    p.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="fresh fills per variant; the samples are split over them (drift hits all alike)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=30.0,
        help="sampling time bound per level, over all rounds",
    )
    p.add_argument("--fill-seconds", type=float, default=120.0, help="time bound per fill step")
    p.add_argument(
        "--variants",
        default="pool,baseline,plain",
        help="comma-separated, in run order, from pool, baseline, plain",
    )
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    p.add_argument(
        "--no-slab-room",
        dest="slab_room",
        action="store_false",
        help="do not pre-make TCP slab slots for the samples' child sockets (see SlabRoom)",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    high = args.low + args.ports - 1
    if args.ports < 100 or not 1024 <= args.low <= high <= 65535:
        p.error("--ports must be >= 100 and the range inside 1024-65535")
    if args.low <= DST[1] <= high:
        p.error(f"the range must not contain the listener's port {DST[1]}")
    keys = args.variants.split(",")
    if not keys or not set(keys) <= {"pool", "baseline", "plain"} or len(set(keys)) != len(keys):
        p.error("--variants takes distinct names from pool, baseline, plain")
    if min(args.samples, args.rounds) < 1 or args.max_seconds <= 0 or args.fill_seconds <= 0:
        p.error("--samples, --rounds, --max-seconds and --fill-seconds must be positive")
    args.rounds = min(args.rounds, args.samples)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = netns.can_create()
    if reason:
        print(f"pool_latency: {reason}", file=sys.stderr)
        return 2
    out = run(args)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print_report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
