"""The scenario load client as a process: ``python -m testbed.wsload`` (one per shard).

``python -m testbed.wsload --load churn|reconnect|count ...`` writes JSON lines on stdout:
``started``, ``progress`` (four a second: live sessions and cumulative counters), ``step``
(the acknowledgement of a ``step NAME`` line on stdin), ``load_done`` / ``ramp_done``,
``settled`` (storm: nothing waits to reconnect), ``opened`` / ``echoed`` (faults: the answer
to ``open TAG N HOST`` and ``echo TAG``), then after ``check`` on stdin the ``result``;
``close`` or EOF ends it. The orchestrator waits on these lines, never on a clock.

The sessions, their modes and why they are counted as they are: :mod:`testbed.scenario_client`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from testbed.scenario_client import (
    CLOSE_KINDS,
    LOADS,
    NO_CLOSE,
    LoadOptions,
    ScenarioClient,
    Slot,
    Step,
)
from testbed.wsclient import parse_sources, parse_window
from testbed.wsorigin import parse_address


def parse_mix(text: str) -> tuple[float, float, float]:
    """``close:fin:rst`` shares, e.g. ``1:1:1`` or ``0.5:0.3:0.2`` (normalised)."""
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"{text!r}: expected CLOSE:FIN:RST shares, e.g. 1:1:1")
    try:
        shares = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{text!r}: shares must be numbers") from None
    total = sum(shares)
    if any(s < 0 or math.isnan(s) for s in shares) or not total > 0:
        raise ValueError(f"{text!r}: shares must be >= 0 and not all 0")
    a, b, c = (s / total for s in shares)
    return a, b, c


def _emit_line(report: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(report, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def _main(options: LoadOptions) -> int:
    client = ScenarioClient(options, _emit_line)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    _emit_line({"event": "started", "pid": os.getpid()})
    ticker = loop.create_task(client.ticker())
    load: asyncio.Task[None] | None = None
    try:
        for _ in range(10**6):  # bounded: the orchestrator sends a handful of lines
            line = (await reader.readline()).decode().strip()
            if not line or line == "close":
                break
            command, _, arg = line.partition(" ")
            if command == "start":
                load = loop.create_task(
                    client.churn() if options.load == "churn" else client.ramp()
                )
            elif command == "step":
                client.mark(arg)
            elif command == "open":  # faults: open TAG COUNT HOST
                tag, count, host = arg.split()
                client._spawn(client.open_batch(tag, int(count), host))
            elif command == "echo":  # faults: echo TAG
                client._spawn(client.echo_all(arg))
            elif command == "check":
                if load is not None and not load.done():
                    load.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await load
                await client.check()
    finally:
        ticker.cancel()
        client.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.wsload",
        description="Scenario load: churning sessions, or sessions that reconnect after a storm.",
    )
    parser.add_argument("--connect", required=True, metavar="IP:PORT", help="the proxy")
    parser.add_argument("--host", required=True, help="Host header (the proxy's route)")
    parser.add_argument("--sources", required=True, help="client source IPs: A-B or a,b,c")
    parser.add_argument("--ports", help="LO-HI: pick client ports from this window")
    parser.add_argument(
        "--load",
        choices=tuple(LOADS),
        required=True,
        help="; ".join(f"{name}: {what}" for name, what in LOADS.items()),
    )
    parser.add_argument("--rate", type=float, required=True, help="per second")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--lifetime", type=float, default=30.0)
    parser.add_argument("--mix", default="1:1:1", help="close:fin:rst shares")
    parser.add_argument("--sessions", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--give-up", type=float, default=120.0)
    parser.add_argument("--drain-step", default="stop", help="faults: the proxy's stop step")
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = LoadOptions(
            connect=parse_address(args.connect),
            host=args.host,
            sources=parse_sources(args.sources),
            ports=parse_window(args.ports) if args.ports else None,
            load=args.load,
            rate=args.rate,
            duration=args.duration,
            lifetime=args.lifetime,
            mix=parse_mix(args.mix),
            sessions=args.sessions,
            seed=args.seed,
            timeout=args.timeout,
            give_up=args.give_up,
            drain_step=args.drain_step,
        )
    except ValueError as e:
        parser.error(str(e))
    if not options.rate > 0:
        parser.error("--rate must be positive")
    runner: Callable[..., int]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return int(runner(_main(options)))


# the client's names, found here too (they lived in this module)
__all__ = [
    "CLOSE_KINDS",
    "LOADS",
    "NO_CLOSE",
    "LoadOptions",
    "ScenarioClient",
    "Slot",
    "Step",
    "build_parser",
    "parse_mix",
    "run",
]


if __name__ == "__main__":
    sys.exit(run())
