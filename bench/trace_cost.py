"""What header rules and tracing cost per request, and what they cost when off.

Why: issue 19 asks that tracing cost nothing when off, and that the per-request cost with
every feature off stays where it was. This runs ``bench/proxy_cycle.py``'s cycle (the real
Downstream and Exchange over in-memory transports, the default codec) in fresh processes,
interleaved round by round so that the machine's drift falls on every variant alike, and
timed in the process's own CPU time (``time.process_time``), not the wall clock, which
other work on a shared machine inflates:

- ``base``: another checkout (``--base DIR``, e.g. a ``git worktree`` of the commit before
  the feature), everything off;
- ``off``: this tree, everything off (no ``[routes.headers]``, no ``[tracing]``);
- ``rules``: this tree, one route with three request rules (one with ``$request_id``),
  one response rule and ``strip_prefix``;
- ``trace``: this tree, ``[tracing] enabled`` (a new trace per request: os.urandom, the
  traceparent to the origin, the trace id in the access line), no exporter.

    .venv/bin/python bench/trace_cost.py --base /tmp/base        # best of 7 x 20,000

On 2 shared cores, best of 9 x 20,000 (base: the commit before the feature, which other
work has moved on from since, so ``off`` against it carries that work too): base 26.15,
off 26.70, rules 30.48, trace 30.56 us per request. Off against the same tree with the
feature's request-path lines taken out: 25.71 against 25.48 (README "Traces").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# run in the child with the tree's root first on sys.path; prints µs per request
CHILD = """
import asyncio, sys
sys.path.insert(0, {root!r})
variant = {variant!r}
from bench import proxy_cycle
from proxy import logs
if variant == "trace":
    from proxy.observe import Tracer
    from proxy.server import Proxy
    init = Proxy.__init__
    def traced(self, *a, **k):
        init(self, *a, **k)
        self.tracer = Tracer(1.0, None)
    Proxy.__init__ = traced
if variant == "rules":
    from proxy.header_rules import compile_rules
    from proxy.routing import Route
    post = Route.__post_init__
    rules = compile_rules({{
        "request_set": {{"X-Env": "prod", "X-Req": "$request_id"}},
        "request_remove": ["User-Agent"],
        "response_set": {{"X-Frame-Options": "DENY"}},
        "strip_prefix": "/api",
    }})
    def with_rules(self):
        post(self)
        self.headers = rules
    Route.__post_init__ = with_rules
import os
null = os.open(os.devnull, os.O_WRONLY)
os.dup2(null, 1)
logs.configure("json", "info")
import time
asyncio.run(proxy_cycle.cycle("httptools", 2000))  # warm-up
cpu = time.process_time()
asyncio.run(proxy_cycle.cycle("httptools", {count}))
os.write(2, b"%.3f" % ((time.process_time() - cpu) / {count} * 1e6))
"""


def once(root: Path, variant: str, count: int) -> float:
    code = CHILD.format(root=str(root), variant=variant, count=count)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    return float(done.stderr.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, help="a checkout without the feature")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--count", type=int, default=20_000)
    args = parser.parse_args()
    variants: list[tuple[str, Path, str]] = []
    if args.base is not None:
        variants.append(("base", args.base.resolve(), "off"))
    variants += [("off", ROOT, "off"), ("rules", ROOT, "rules"), ("trace", ROOT, "trace")]
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, root, variant in variants:
            us = once(root, variant, args.count)
            best[name] = min(best.get(name, us), us)
    ref = best.get("base", best["off"])
    for name, _root, _variant in variants:
        print(f"{name:6} {best[name]:7.2f} us/request  ({best[name] / ref - 1:+.1%} vs base)")


if __name__ == "__main__":
    main()
