"""connect() latency as the source-port range fills: plain connect() against pool.connectx.

Why this exists: the kernel's own port search in ``connect()`` walks the range in parity order
and checks each candidate's 4-tuples, so once half the range is held toward one destination
every connect() scans thousands of ports (~35x slower, see ../shared/docs/ephemeral-ports.md).
The pool claims two things this benchmark checks with figures rather than asserts:

* on an empty range, connectx costs little more than a plain connect() (its Python and the
  extra setsockopt/bind are the whole overhead);
* near exhaustion, handing the kernel a port already known to be free (a one-port
  ``IP_LOCAL_PORT_RANGE`` window) keeps connect() flat, where the kernel's search does not.

How: the process moves into a private network namespace (host sysctls stay untouched) with a
shrunken range, opens one listener that never accepts (established connections wait in its
accept queue, so each held connection costs this process one fd), fills the range toward that
one destination from one source IP with plain ``connect()`` (which is what makes the kernel's
parity search slow), and at 0/50/90/99% held times ONE connect per sample for each variant,
interleaved round-robin so drift hits all alike. Every sample's socket is closed abortively
(RST, no TIME_WAIT) so the occupancy stays exactly at the level.

Interleaving has a price worth seeing: from 50% held, a plain connect() walks thousands of
ports' hash buckets and evicts the CPU caches, so whatever runs next (d included) pays cache
misses that have nothing to do with its own kernel work. So d is also sampled *alone* after
each interleaved pass ("d-alone"), which shows what it costs on its own at that occupancy.

Reading p99 on a small VM: samples that overlap a timer tick (every 4 ms here) cost ~60-150 µs
more, and ~1% of a 15 µs variant's samples do, so its p99 flips between its own cost and the
tick's from run to run; the JSON also has p95, which does not. Compare runs, not one figure.

Run as root::

    .venv/bin/python bench/connect_latency.py              # 16,000 ports, 2,000 samples
    .venv/bin/python bench/connect_latency.py --ports 2000 --samples 300   # seconds
    .venv/bin/python bench/connect_latency.py --json
"""

from __future__ import annotations

import argparse
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

# Run as a script (``python bench/connect_latency.py``), sys.path[0] is bench/, not the repo;
# the project is not necessarily installed into the venv, so make ``pool`` importable.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from pool import connectx, netns  # noqa: E402  (needs the sys.path line above)

SRC_IP = "127.0.0.1"
"""The source every variant uses: plain connect() to 127.0.2.1 gets it from the lo route, and
the connectx variants name it, so all compete for the same busy (source, destination) pair."""

DST = ("127.0.2.1", 9000)
LEVELS = (0.0, 0.5, 0.9, 0.99)
WINDOW = 64
"""Ports per random window of variant c: small enough that a stateless guess is cheap for the
kernel to search, big enough that a guess at 99% held usually still contains a free port."""

LISTEN_BACKLOG = 65535
"""Held connections *and* every reset sample stay counted in the accept queue of a listener
that never accepts (the RST moves the child to CLOSE but only accept() dequeues it); once the
queue is full SYNs are dropped and connect() stalls for a second, so the plan is budgeted."""

_ABORT = struct.pack("ii", 1, 0)
_local = (SRC_IP, 0)


def abort_close(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER on, 0 s): no TIME_WAIT, so the port is free again at once and
    the occupancy stays at the level being measured."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORT)
    finally:
        sock.close()


def new_socket() -> socket.socket:
    """A fresh blocking TCP socket; on loopback the handshake completes inside connect()."""
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


# --- what the benchmark knows about the range ------------------------------------------------


class PortRecord:
    """The ports of the range known free toward DST from SRC_IP: variant d's userspace state.

    A real pool keeps this per (source IP, destination) from the connections it opened and
    closed; here it is rebuilt from the held sockets' getsockname() after each fill. Kept as a
    list so a random pick and a removal are both O(1).
    """

    def __init__(self, low: int, high: int, held: set[int]) -> None:
        self.free = [p for p in range(low, high + 1) if p not in held]
        self.marked = 0

    def pick(self, rng: random.Random) -> tuple[int, int]:
        """A random free port and its slot (for :meth:`mark_held`)."""
        i = rng.randrange(len(self.free))
        return i, self.free[i]

    def mark_held(self, slot: int) -> None:
        """The kernel said the 4-tuple is taken after all: stop offering that port."""
        self.free[slot] = self.free[-1]
        self.free.pop()
        self.marked += 1


@dataclass
class Context:
    """Everything a sample needs, shared by all variants of one run."""

    low: int
    high: int
    rng: random.Random
    record: PortRecord
    max_retries: int


@dataclass
class Series:
    """One variant at one occupancy level: latencies of successful samples, and the rest."""

    ns: list[int] = field(default_factory=list)
    retries: list[int] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)

    def add_failure(self, err: OSError) -> None:
        """Count by errno name: which error a variant hits says more than that it failed."""
        name = errno.errorcode.get(err.errno or 0, str(err.errno))
        self.failures[name] = self.failures.get(name, 0) + 1


class SampleFailed(Exception):
    """A sample that ended without a connection: counted by errno, never timed, because a
    fast failure would otherwise pull the median down."""

    def __init__(self, err: OSError) -> None:
        super().__init__(str(err))
        self.err = err


# --- the variants: each returns (ns spent in the connect, retries) ----------------------------
# Socket creation and the abortive close stay outside the timed region; a retry's fresh socket
# is inside it, because a caller that retries pays for it. Choosing the port or window is
# inside too: it is part of what each technique costs per connection.

Sampler = Callable[[Context], tuple[int, int]]


def sample_plain(ctx: Context) -> tuple[int, int]:
    """(a) ``connect()`` on an unbound socket: the kernel's parity-ordered search."""
    s = new_socket()
    try:
        t0 = time.perf_counter_ns()
        s.connect(DST)
        t1 = time.perf_counter_ns()
    except OSError as e:
        raise SampleFailed(e) from None
    finally:
        abort_close(s)
    return t1 - t0, 0


def sample_no_port(ctx: Context) -> tuple[int, int]:
    """(b) connectx with an explicit source IP: IP_BIND_ADDRESS_NO_PORT, same kernel search."""
    s = new_socket()
    try:
        t0 = time.perf_counter_ns()
        connectx(s, _local, DST)
        t1 = time.perf_counter_ns()
    except OSError as e:
        raise SampleFailed(e) from None
    finally:
        abort_close(s)
    return t1 - t0, 0


def sample_random_window(ctx: Context) -> tuple[int, int]:
    """(c) a random 64-port IP_LOCAL_PORT_RANGE window; EADDRNOTAVAIL means "all 64 taken":
    try another window on a fresh socket (a failed connectx leaves its socket bound)."""
    last_start = ctx.high - WINDOW + 1
    s = new_socket()
    retries = 0
    try:
        t0 = time.perf_counter_ns()
        while True:
            w = ctx.rng.randint(ctx.low, last_start)
            try:
                connectx(s, _local, DST, port_range=(w, w + WINDOW - 1))
                break
            except OSError as e:
                if e.errno != errno.EADDRNOTAVAIL or retries >= ctx.max_retries:
                    raise
                retries += 1
                s.close()
                s = new_socket()
        t1 = time.perf_counter_ns()
    except OSError as e:
        raise SampleFailed(e) from None
    finally:
        abort_close(s)
    return t1 - t0, retries


def sample_recorded_port(ctx: Context) -> tuple[int, int]:
    """(d) a port the record says is free, as a one-port IP_LOCAL_PORT_RANGE window: the
    kernel checks one 4-tuple instead of searching, whatever the occupancy."""
    s = new_socket()
    retries = 0
    try:
        t0 = time.perf_counter_ns()
        while True:
            slot, port = ctx.record.pick(ctx.rng)
            try:
                connectx(s, _local, DST, port_range=(port, port))
                break
            except OSError as e:
                if e.errno != errno.EADDRNOTAVAIL or retries >= ctx.max_retries:
                    raise
                ctx.record.mark_held(slot)
                retries += 1
                s.close()
                s = new_socket()
        t1 = time.perf_counter_ns()
    except OSError as e:
        raise SampleFailed(e) from None
    finally:
        abort_close(s)
    return t1 - t0, retries


def sample_userspace(ctx: Context) -> tuple[int, int]:
    """(e) connectx's fallback for kernels without IP_LOCAL_PORT_RANGE, forced: it picks
    ports itself over the whole range, asking sock_diag about each candidate 4-tuple."""
    s = new_socket()
    try:
        t0 = time.perf_counter_ns()
        connectx(s, _local, DST, port_range=(ctx.low, ctx.high), userspace_ports=True)
        t1 = time.perf_counter_ns()
    except OSError as e:
        raise SampleFailed(e) from None
    finally:
        abort_close(s)
    return t1 - t0, 0


@dataclass(frozen=True)
class Variant:
    """One way of connecting: its table key, what it is, and how to take one sample."""

    key: str
    label: str
    sample: Sampler
    userspace: bool = False
    """Sampled ``--userspace-samples`` times instead of ``--samples``: it is slow near full."""


VARIANTS = (
    Variant("a", "plain connect()", sample_plain),
    Variant("b", "connectx NO_PORT", sample_no_port),
    Variant("c", "connectx random 64-port window", sample_random_window),
    Variant("d", "connectx 1-port window from record", sample_recorded_port),
    Variant("e", "connectx userspace fallback", sample_userspace, userspace=True),
)
ALONE = Variant("d-alone", "d, alone (not interleaved)", sample_recorded_port)
"""d sampled by itself after the interleaved pass: no neighbour has just flushed the caches."""
SAMPLERS = {v.key: v.sample for v in (*VARIANTS, ALONE)}


# --- running ----------------------------------------------------------------------------------


def percentile(sorted_ns: list[int], q: float) -> float | None:
    """Nearest-rank percentile in µs: no interpolation, so p99 is a latency that happened.
    None when there is no sample (all failed, or the time bound hit first)."""
    if not sorted_ns:
        return None
    rank = max(1, min(len(sorted_ns), -(-len(sorted_ns) * q // 100)))
    return sorted_ns[int(rank) - 1] / 1000.0


def plan_rounds(targets: dict[str, int]) -> list[list[str]]:
    """Which variants sample in each round: every variant spread evenly over the rounds, so
    one with fewer samples (e) is not bunched at the start of the level."""
    rounds = max(targets.values(), default=0)
    plan: list[list[str]] = [[] for _ in range(rounds)]
    for key, n in targets.items():
        for r in range(rounds):
            if (r + 1) * n // rounds > r * n // rounds:
                plan[r].append(key)
    return plan


def run_rounds(
    ctx: Context,
    targets: dict[str, int],
    deadline: float,
    results: dict[str, Series] | None,
) -> None:
    """Interleave samples, shuffling the order in each round so no variant always follows the
    same one; ``results=None`` is a warm-up (run, not kept)."""
    for keys in plan_rounds(targets):
        if time.monotonic() > deadline:
            return
        ctx.rng.shuffle(keys)
        for key in keys:
            try:
                spent, retries = SAMPLERS[key](ctx)
            except SampleFailed as f:
                if results is not None:
                    results[key].add_failure(f.err)
                continue
            if results is not None:
                results[key].ns.append(spent)
                results[key].retries.append(retries)


def fill_to(count: int, held: list[socket.socket]) -> float:
    """Hold ``count`` connections by plain connect(), the kernel's own search, so the ports
    taken (and the parity pattern the search leaves behind) are what a busy host has.
    Returns the seconds spent."""
    t0 = time.perf_counter()
    while len(held) < count:
        s = new_socket()
        try:
            s.connect(DST)
        except OSError:
            s.close()
            raise
        held.append(s)
    return time.perf_counter() - t0


def listener_queue(listener: socket.socket) -> tuple[int, int]:
    """(queued, max) of a listener from TCP_INFO (tcpi_unacked/tcpi_sacked mean that there)."""
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    queued, limit = struct.unpack_from("=II", info, 24)
    return queued, limit


def summarize(series: Series) -> dict[str, Any]:
    """Plain numbers only, so the same dict serves the table and ``--json``."""
    ns = sorted(series.ns)
    return {
        "median_us": percentile(ns, 50),
        "p95_us": percentile(ns, 95),
        "p99_us": percentile(ns, 99),
        "samples": len(ns),
        "mean_retries": sum(series.retries) / len(series.retries) if series.retries else 0.0,
        "max_retries": max(series.retries, default=0),
        "failures": dict(series.failures),
    }


def level_name(level: float) -> str:
    """``0.99`` -> ``"99%"``: the key results are stored under, as the table prints it."""
    return f"{level * 100:g}%"


@dataclass(frozen=True)
class Ratio:
    """One claim: ``stat`` of variant ``num`` at ``num_level`` over that of ``den``."""

    name: str
    stat: str
    num: str
    num_level: float
    den: str
    den_level: float
    at_most: float | None = None
    at_least: float | None = None
    supplementary: bool = False
    """Not one of the three targets: printed to explain them."""

    def target(self) -> str:
        """The bound as printed next to PASS/MISS."""
        return f"<= {self.at_most:g}" if self.at_most is not None else f">= {self.at_least:g}"

    def passes(self, value: float) -> bool:
        """A benchmark reports: PASS/MISS is printed, never asserted."""
        if self.at_most is not None:
            return value <= self.at_most
        return self.at_least is not None and value >= self.at_least


RATIOS = (
    Ratio(
        "overhead on empty range: median(b @0%) / median(a @0%)",
        "median_us",
        num="b",
        num_level=0.0,
        den="a",
        den_level=0.0,
        at_most=1.3,
    ),
    # Flatness is judged on d run back to back, as the pool runs it: once a pair is busy the
    # pool never lets the kernel scan the range, so nothing flushes the caches between its
    # connects. The interleaved figure (d after a 600 us range scan) is printed below it.
    Ratio(
        "flatness of d alone: p99 @99% / p99 @0%",
        "p99_us",
        num="d-alone",
        num_level=0.99,
        den="d-alone",
        den_level=0.0,
        at_most=1.5,
    ),
    Ratio(
        "speed-up at 99%: median(a @99%) / median(d @99%)",
        "median_us",
        num="a",
        num_level=0.99,
        den="d",
        den_level=0.99,
        at_least=10.0,
    ),
    Ratio(
        "flatness of d interleaved: p99(d @99%) / p99(d @0%)",
        "p99_us",
        num="d",
        num_level=0.99,
        den="d",
        den_level=0.0,
        at_most=1.5,
        supplementary=True,
    ),
    Ratio(
        "speed-up at 99%: median(a) / median(d alone)",
        "median_us",
        num="a",
        num_level=0.99,
        den="d-alone",
        den_level=0.99,
        at_least=10.0,
        supplementary=True,
    ),
)
"""Levels are fixed (LEVELS), so the names can say 0% and 99%."""


def compute_ratios(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The ratios whose variants were measured (``--variants`` may leave some out)."""
    out: list[dict[str, Any]] = []
    for r in RATIOS:
        try:
            top = results[r.num][level_name(r.num_level)][r.stat]
            bottom = results[r.den][level_name(r.den_level)][r.stat]
        except KeyError:
            continue
        if top is None or not bottom:
            continue
        value = top / bottom
        out.append(
            {
                "name": r.name,
                "value": value,
                "target": r.target(),
                "pass": r.passes(value),
                "supplementary": r.supplementary,
            }
        )
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Fill level by level and sample every variant at each; returns the figures."""
    low, high = args.low, args.low + args.ports - 1
    counts = [round(args.ports * level) for level in LEVELS]
    userspace_n = min(args.userspace_samples, args.samples)
    chosen = [v for v in VARIANTS if v.key in args.variants]
    targets = {v.key: userspace_n if v.userspace else args.samples for v in chosen}
    alone = {ALONE.key: args.alone_samples} if "d" in args.variants and args.alone_samples else {}
    warm = {k: max(1, n // 10) for k, n in targets.items()}
    level_warm = {k: max(1, n // 100) for k, n in (targets | alone).items()}
    planned = (
        counts[-1]
        + sum(warm.values())
        + len(LEVELS) * (sum((targets | alone).values()) + sum(level_warm.values()))
    )
    if planned > LISTEN_BACKLOG - 100:
        sys.exit(
            f"connect_latency: plan needs {planned} accept-queue slots (held + every sample), "
            f"the listener has {LISTEN_BACKLOG}: use fewer --samples or --ports"
        )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if counts[-1] + 64 > hard:
        sys.exit(f"connect_latency: {counts[-1]} held sockets exceed the {hard}-fd limit")
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    netns.unshare_process((low, high))
    listener = new_socket()
    listener.bind(DST)
    listener.listen(LISTEN_BACKLOG)

    ctx = Context(low, high, random.Random(args.seed), PortRecord(low, high, set()), 32)
    held: list[socket.socket] = []
    levels_out: list[dict[str, Any]] = []
    results: dict[str, dict[str, Any]] = {k: {} for k in targets | alone}

    # The first warm-up at 0% fills caches, lazy imports and connectx's sysctl cache.
    gc.collect()
    gc.disable()  # a collection over 16k held socket objects would land in some sample
    try:
        run_rounds(ctx, warm, time.monotonic() + args.max_seconds, None)
        for level, count in zip(LEVELS, counts, strict=True):
            fill_s = fill_to(count, held)
            ports = {s.getsockname()[1] for s in held}
            if len(ports) != len(held) or any(not low <= p <= high for p in ports):
                raise RuntimeError("held sockets do not map one-to-one onto the range")
            ctx.record = PortRecord(low, high, ports)
            run_rounds(ctx, {k: level_warm[k] for k in targets}, time.monotonic() + 5, None)
            series = {k: Series() for k in targets | alone}
            t0 = time.monotonic()
            run_rounds(ctx, targets, t0 + args.max_seconds, series)
            if alone:  # after the interleaved pass; its first samples warm the caches back up
                run_rounds(ctx, {k: level_warm[k] for k in alone}, time.monotonic() + 5, None)
                run_rounds(ctx, alone, time.monotonic() + args.max_seconds, series)
            name = level_name(level)
            for key, s in series.items():
                results[key][name] = summarize(s)
            levels_out.append(
                {
                    "level": name,
                    "held": len(held),
                    "fill_seconds": round(fill_s, 3),
                    "sample_seconds": round(time.monotonic() - t0, 3),
                    "record_marked": ctx.record.marked,
                }
            )
    finally:
        gc.enable()
    queued, limit = listener_queue(listener)

    ratios = compute_ratios(results)
    return {
        "config": {
            "kernel": platform.release(),
            "python": platform.python_version(),
            "port_range": [low, high],
            "ports": args.ports,
            "source": SRC_IP,
            "destination": f"{DST[0]}:{DST[1]}",
            "samples": args.samples,
            "userspace_samples": userspace_n,
            "alone_samples": args.alone_samples if alone else 0,
            "max_seconds_per_level": args.max_seconds,
            "seed": args.seed,
            "cpus": sorted(os.sched_getaffinity(0)),
            "listener_queue_end": [queued, limit],
            "listener_queue_planned": planned,
        },
        "variants": {v.key: v.label for v in chosen} | ({ALONE.key: ALONE.label} if alone else {}),
        "levels": levels_out,
        "results": results,
        "ratios": ratios,
    }


def _us(value: float | None) -> str:
    """A latency cell; "-" where a variant got no successful sample at that level."""
    return f"{value:8.1f}" if value is not None else f"{'-':>8}"


def print_report(out: dict[str, Any]) -> None:
    """The human form: one row per variant, median / p99 (µs) and sample count per level."""
    cfg = out["config"]
    lo, hi = cfg["port_range"]
    print(
        f"connect() latency, kernel {cfg['kernel']}, Python {cfg['python']}, "
        f"range {lo}-{hi} ({cfg['ports']} ports), {cfg['source']} -> {cfg['destination']}"
    )
    for lv in out["levels"]:
        print(
            f"  {lv['level']:>4} held: {lv['held']:>6} connections "
            f"(fill {lv['fill_seconds']:.2f} s, sampling {lv['sample_seconds']:.2f} s)"
        )
    print()
    names = [lv["level"] for lv in out["levels"]]
    head = f"{'variant':<44}" + "".join(f"{n + ' med/p99 µs (n)':>26}" for n in names)
    print(head)
    print("-" * len(head))
    for key, label in out["variants"].items():
        cells = []
        for n in names:
            r = out["results"][key][n]
            cells.append(f"{_us(r['median_us'])} /{_us(r['p99_us'])} ({r['samples']:>4})")
        print(f"{key + '.':<9}{label:<35}" + "".join(f"{c:>26}" for c in cells))
    print()
    print("retries per sample (mean / max) and failed samples:")
    for key in [k for k in ("c", "d", ALONE.key) if k in out["results"]]:
        parts = []
        for n in names:
            r = out["results"][key][n]
            parts.append(f"{n} {r['mean_retries']:.2f}/{r['max_retries']}")
        print(f"  {key + '.':<9}" + ", ".join(parts))
    failed = {
        f"{key} @{n}": r["failures"]
        for key, per in out["results"].items()
        for n, r in per.items()
        if r["failures"]
    }
    print(f"  failures: {failed or 'none'}")
    queued, limit = cfg["listener_queue_end"]
    print(
        f"  listener accept queue at the end: {queued} of {limit} "
        f"(planned at most {cfg['listener_queue_planned']}: held + every sample + warm-ups)"
    )
    print()
    for supplementary in (False, True):
        rows = [r for r in out["ratios"] if r["supplementary"] == supplementary]
        if supplementary and rows:
            print("supplementary (d interleaved after range scans that flush caches; not targets):")
        for r in rows:
            verdict = "PASS" if r["pass"] else "MISS"
            print(f"{r['name']:<58} = {r['value']:7.2f}   target {r['target']:<7} {verdict}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Defaults reproduce the documented figures; smaller ``--ports``/``--samples`` give a
    quick check (the 35x step needs a big range: the search cost grows with the range)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument("--ports", type=int, default=16000, help="size of the port range")
    p.add_argument("--low", type=int, default=40000, help="first port of the range")
    p.add_argument("--samples", type=int, default=2000, help="samples per variant and level")
    p.add_argument(
        "--userspace-samples",
        type=int,
        default=300,
        help="samples of variant e per level (capped at --samples): it is slow near full",
    )
    p.add_argument(
        "--alone-samples",
        type=int,
        default=1000,
        help="samples of d alone per level, after the interleaved pass (0: skip)",
    )
    p.add_argument("--max-seconds", type=float, default=60.0, help="sampling time bound per level")
    p.add_argument("--seed", type=int, default=1, help="seed for window and port choices")
    p.add_argument(
        "--variants",
        default="abcde",
        help="which variants to run (e.g. 'd' alone, to see it without the others' cache misses)",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    if args.ports < 2 * WINDOW or not 1024 <= args.low <= args.low + args.ports - 1 <= 65535:
        p.error(f"--ports must be >= {2 * WINDOW} and the range inside 1024-65535")
    if args.low <= DST[1] <= args.low + args.ports - 1:
        p.error(f"the range must not contain the listener's port {DST[1]}")
    if not set(args.variants) <= {v.key for v in VARIANTS} or not args.variants:
        p.error(f"--variants takes letters of {''.join(v.key for v in VARIANTS)}")
    if args.samples < 1 or args.userspace_samples < 1 or args.alone_samples < 0:
        p.error("--samples and --userspace-samples must be positive, --alone-samples >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Exit 2 when namespaces cannot be made here (not root, no ip(8)); figures never fail."""
    args = parse_args(argv)
    reason = netns.can_create()
    if reason:
        print(f"connect_latency: {reason}", file=sys.stderr)
        return 2
    out = run(args)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print_report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
