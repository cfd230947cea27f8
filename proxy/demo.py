"""``originpool demo``: the ceiling that is not real, shown in a throwaway namespace.

Until the testbed lands this is the main job: it fills a small port range three ways
(plain connect, bind-before-connect, connectx) from 2 egress IPs to 2 destinations and
prints how many connections each got and how the kernel refused the next one.
"""

from __future__ import annotations

import os
import resource
import socket
import sys
from collections.abc import Callable

from pool import connectx, netns

EGRESS = ["127.0.1.1", "127.0.1.2"]
DESTS = [("127.0.2.1", 9000), ("127.0.2.2", 9000)]
FIRST_PORT = 40000  # the namespace's range starts here, so it can hold 25,536 ports at most
RESERVE_FILES = 64  # listeners, the interpreter's own files


def ports_problem(ports: int, nofile: int | None = None) -> str | None:
    """Why ``--ports`` cannot run, or None. Checked before the namespace is made: the
    kernel answers a range past 65535 with a bare EINVAL from a /proc write, and a range
    whose connections need more files than this process may open ends in EMFILE, which
    the table would show as if the kernel's ports had run out."""
    top = 65535 - FIRST_PORT + 1
    if not 1 <= ports <= top:
        return f"--ports must be 1..{top:,} (the range starts at {FIRST_PORT}), got {ports}"
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    held = len(EGRESS) * len(DESTS) * ports  # connectx's fill: every pair gets the range
    if held + RESERVE_FILES > nofile:
        most = (nofile - RESERVE_FILES) // (len(EGRESS) * len(DESTS))
        return (
            f"--ports {ports:,} needs {held:,} open sockets + {RESERVE_FILES} and this process "
            f"may open {nofile:,} (RLIMIT_NOFILE): at most --ports {most:,} here"
        )
    return None


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
    reason = ports_problem(ports) or netns.can_create()
    if reason:
        print(f"originpool demo: {reason}", file=sys.stderr)
        return 2
    netns.unshare_process((FIRST_PORT, FIRST_PORT + ports - 1))
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
