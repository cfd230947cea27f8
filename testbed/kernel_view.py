"""The kernel's view of the namespace: socket states by leg and side, and a process's CPU.

Its own module because the ramp and every scenario sample the same way, from the kernel and
/proc rather than from the proxy, so that any proxy under ``--proxy-cmd`` is measured alike.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pool import sockdiag

_NOT_OPEN = sockdiag.ALL_STATES & ~(1 << 1) & ~(1 << sockdiag.TCP_LISTEN)


@dataclass
class KernelSample:
    """Non-established TCP sockets of the namespace, by which side of which leg holds them."""

    time_wait: int = 0  # proxy -> origin sockets in TIME_WAIT (the proxy closed first)
    other: int = 0  # proxy -> origin sockets in SYN_SENT, FIN_WAIT*, CLOSE_WAIT, LAST_ACK...
    origin_time_wait: int = 0  # the origin's half of those connections (it closed first)
    client_time_wait: int = 0  # client -> proxy sockets (the client closed first)
    proxy_client_time_wait: int = 0  # the proxy's half towards clients (it closed first)
    time_wait_by_source: Counter[str] = field(default_factory=Counter)


def kernel_sample(origins: set[tuple[str, int]], listen: tuple[str, int]) -> KernelSample:
    """One sock_diag dump of the states that are not ESTABLISHED or LISTEN: cheap even with
    tens of thousands of held sessions, since those are filtered out in the kernel."""
    out = KernelSample()
    for s in sockdiag.dump(socket.AF_INET, socket.IPPROTO_TCP, _NOT_OPEN):
        tw = s.state == sockdiag.TCP_TIME_WAIT
        if (s.dst, s.dport) in origins:
            if tw:
                out.time_wait += 1
                out.time_wait_by_source[s.src] += 1
            else:
                out.other += 1
        elif (s.src, s.sport) in origins:
            out.origin_time_wait += tw
        elif (s.dst, s.dport) == listen:
            out.client_time_wait += tw
        elif (s.src, s.sport) == listen:
            out.proxy_client_time_wait += tw
    return out


def established_to(addresses: set[tuple[str, int]]) -> int:
    """Upstream connections to these origins now: the sessions an origin restart must drop."""
    states = 1 << 1
    return sum(
        1
        for s in sockdiag.dump(socket.AF_INET, socket.IPPROTO_TCP, states)
        if (s.dst, s.dport) in addresses
    )


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of live processes, from /proc/PID/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / tick


def vars_of(sample: KernelSample) -> dict[str, Any]:
    return {
        "time_wait": sample.time_wait,
        "other_states": sample.other,
        "origin_time_wait": sample.origin_time_wait,
        "client_time_wait": sample.client_time_wait,
        "proxy_client_time_wait": sample.proxy_client_time_wait,
    }
