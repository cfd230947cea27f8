"""``originpool demo``: the ceiling that is not real, shown in a throwaway namespace.

Until the testbed lands this is the main job: it fills a small port range three ways
(plain connect, bind-before-connect, connectx) from 2 egress IPs to 2 destinations and
prints how many connections each got and how the kernel refused the next one.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable

from pool import connectx, netns

EGRESS = ["127.0.1.1", "127.0.1.2"]
DESTS = [("127.0.2.1", 9000), ("127.0.2.2", 9000)]


def _fill_pair(
    how: Callable[[socket.socket, str, tuple[str, int]], None],
    src: str,
    dst: tuple[str, int],
    held: list[socket.socket],
    limit: int,
) -> str:
    """Connect src -> dst until the kernel refuses; return its words."""
    for _ in range(limit):
        s = socket.socket()
        try:
            how(s, src, dst)
        except OSError as e:
            s.close()
            return f"[Errno {e.errno}] {os.strerror(e.errno or 0)}"
        held.append(s)
    return "(limit reached)"


def _release(held: list[socket.socket]) -> None:
    for s in held:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        s.close()
    held.clear()


def run(ports: int = 200) -> int:
    """Run the three fills and print the table; needs root for the namespace."""
    reason = netns.can_create()
    if reason:
        print(f"originpool demo: {reason}", file=sys.stderr)
        return 2
    netns.unshare_process((40000, 40000 + ports - 1))
    listeners = []
    for dst in DESTS:
        ls = socket.socket()
        ls.bind(dst)
        ls.listen(65535)
        listeners.append(ls)
    limit = 2 * ports

    def plain(s: socket.socket, src: str, dst: tuple[str, int]) -> None:
        s.connect(dst)

    def bind_first(s: socket.socket, src: str, dst: tuple[str, int]) -> None:
        s.bind((src, 0))
        s.connect(dst)

    def improved(s: socket.socket, src: str, dst: tuple[str, int]) -> None:
        connectx(s, (src, 0), dst)

    print(f"namespace range: {ports} ports; egress IPs {EGRESS}; destinations {DESTS}")
    print(f"physical limit: {len(EGRESS)} x {ports} x {len(DESTS)} = {len(EGRESS) * ports * 2}")
    print(f"{'technique':<22}{'held':>8}  next attempt")
    for name, how in (
        ("plain connect", plain),
        ("bind-before-connect", bind_first),
        ("connectx", improved),
    ):
        held: list[socket.socket] = []
        last = ""
        for src in EGRESS:
            for dst in DESTS:
                last = _fill_pair(how, src, dst, held, limit)
        print(f"{name:<22}{len(held):>8}  {last}")
        _release(held)
    for ls in listeners:
        ls.close()
    return 0
