"""``originpool ports``: who holds the namespace's ephemeral ports, per (source IP, destination).

What an operator runs on "Cannot assign requested address": the limit that bites is per
(source IP, destination ip:port) -- the ``ip_local_port_range`` size, minus reserved ports --
not the machine-wide port count, so the census groups outgoing sockets by that pair and says
how close each pair is to its ceiling. It asks ``NETLINK_SOCK_DIAG`` (the same dumps ``ss``
uses), which needs no privilege in one's own namespace.

The core (:func:`tally`) is pure so it can be checked against made-up sockets and reused by
the proxy's admin endpoint; :func:`take_census` is the only part that talks to the kernel.

Which sockets count ("outgoing"):

* TCP listeners and unconnected sockets (UDP ``dport == 0``, a bound-only TCP socket) are not
  pairs: they hold no 4-tuple.
* When both ends of a connection live in the namespace, each connection appears twice. The
  server's half is the one whose local ``(ip, port)`` is a *listening* address: a TCP
  listener bound to that IP or to the family's wildcard. Such sockets are skipped, so a local
  origin does not show up as a second, reversed pair. For UDP the "listener" is an
  unconnected UDP socket bound to that address (the QUIC pattern: a server socket plus
  connected per-client sockets sharing its port). The rule errs when a listener has already
  closed (its accepted sockets then count as outgoing) and, for UDP, for the microseconds in
  which a sharing client socket is bound but not yet connected.
* IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``) are folded into IPv4: the kernel hashes
  such sockets by their IPv4 4-tuple, so they share the IPv4 pair's ports.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from pool import kernel, sockdiag

HOT = 0.8
PROTOS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
_NAMES = {v: k for k, v in PROTOS.items()}
_WILDCARD = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}
ESTABLISHED = 1  # also what a connected UDP socket reports


@dataclass(frozen=True, slots=True)
class Pair:
    """Outgoing sockets from one source IP to one destination, against that pair's ceiling.

    ``other`` holds the states that still own the 4-tuple without being ESTABLISHED or
    TIME_WAIT (SYN_SENT, FIN_WAIT*, CLOSE_WAIT, LAST_ACK, CLOSING): a port is just as gone
    while a connection is being opened or torn down.
    """

    proto: str
    src: str
    dst: str
    established: int
    time_wait: int
    other: int
    capacity: int
    utilisation: float

    @property
    def used(self) -> int:
        return self.established + self.time_wait + self.other

    @property
    def hot(self) -> bool:
        """Past this point connect() slows down sharply and failures are one burst away."""
        return self.utilisation > HOT


def _plain_ip(family: int, ip: str) -> tuple[int, str]:
    """Fold ``::ffff:a.b.c.d`` into IPv4, where the kernel accounts for it."""
    if family == socket.AF_INET6:
        mapped = ipaddress.IPv6Address(ip).ipv4_mapped
        if mapped is not None:
            return socket.AF_INET, str(mapped)
    return family, ip


def format_endpoint(family: int, ip: str, port: int) -> str:
    """``ip:port`` or ``[v6]:port``, as ``ss`` prints it (and as the JSON contract demands)."""
    return f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"


def _is_listening(s: sockdiag.DiagSocket) -> bool:
    """Sockets that make a local address a server address (see the module docstring)."""
    if s.protocol == socket.IPPROTO_TCP:
        return s.state == sockdiag.TCP_LISTEN
    return s.dport == 0 and s.sport != 0


def _accepted(s: sockdiag.DiagSocket, listening: set[tuple[int, int, str, int]]) -> bool:
    """The server's half of a local connection: its local address is a listening one."""
    wildcard = _WILDCARD.get(s.family, "")
    return any((s.protocol, s.family, ip, s.sport) in listening for ip in (s.src, wildcard))


def _utilisation(used: int, capacity: int) -> float:
    # A range wholly reserved leaves nothing to hand out: call any pair that exists full.
    return used / capacity if capacity > 0 else 1.0


def tally(sockets: Iterable[sockdiag.DiagSocket], sysctls: kernel.PortSysctls) -> list[Pair]:
    """Group outgoing sockets into pairs, fullest first.

    Every pair gets the same capacity because the kernel's per-destination ceiling is the
    namespace's range (minus reserved ports) for each source IP. It is the best case: ports
    held by explicit ``bind()`` elsewhere lower it for every IP, and a plain UDP ``connect()``
    cannot share ports at all (see :func:`udp_ports_in_use`).
    """
    sockets = list(sockets)
    listening = {(s.protocol, s.family, s.src, s.sport) for s in sockets if _is_listening(s)}
    counts: dict[tuple[str, str, int, str, int], list[int]] = {}
    for s in sockets:
        if s.dport == 0 or _is_listening(s) or _accepted(s, listening):
            continue
        _, src = _plain_ip(s.family, s.src)
        dst_family, dst = _plain_ip(s.family, s.dst)
        key = (_NAMES.get(s.protocol, str(s.protocol)), src, dst_family, dst, s.dport)
        c = counts.setdefault(key, [0, 0, 0])
        if s.state == ESTABLISHED:
            c[0] += 1
        elif s.protocol == socket.IPPROTO_TCP and s.state == sockdiag.TCP_TIME_WAIT:
            c[1] += 1
        else:
            c[2] += 1
    capacity = sysctls.size
    pairs = [
        Pair(
            proto=proto,
            src=src,
            dst=format_endpoint(dst_family, dst, dport),
            established=est,
            time_wait=tw,
            other=other,
            capacity=capacity,
            utilisation=_utilisation(est + tw + other, capacity),
        )
        for (proto, src, dst_family, dst, dport), (est, tw, other) in counts.items()
    ]
    pairs.sort(key=lambda p: (-p.utilisation, p.proto, p.src, p.dst))
    return pairs


def udp_ports_in_use(sockets: Iterable[sockdiag.DiagSocket], sysctls: kernel.PortSysctls) -> int:
    """Range ports held by any UDP socket: what a plain UDP ``connect()`` competes for.

    Its auto-bind wants a port no other UDP socket uses on any address, so UDP runs dry
    namespace-wide (EAGAIN) long before any one pair looks full. Counted across both families,
    which slightly overstates it for one family: an IPv4 connect() ignores ports held only by
    IPv6 sockets bound to a specific address.
    """
    return len(
        {
            s.sport
            for s in sockets
            if s.protocol == socket.IPPROTO_UDP
            and sysctls.low <= s.sport <= sysctls.high
            and s.sport not in sysctls.reserved
        }
    )


def dump_sockets(protos: Sequence[str] = ("tcp", "udp")) -> list[sockdiag.DiagSocket]:
    """Every TCP/UDP socket, IPv4 and IPv6, of the calling thread's namespace."""
    return [
        s
        for proto in protos
        for family in (socket.AF_INET, socket.AF_INET6)
        for s in sockdiag.dump(family, PROTOS[proto])
    ]


def take_census(
    protos: Sequence[str] = ("tcp", "udp"), sysctls: kernel.PortSysctls | None = None
) -> list[Pair]:
    """The pairs of the calling thread's namespace, now (sysctls read uncached: an operator
    may just have widened the range)."""
    return tally(dump_sockets(protos), sysctls or kernel.read_port_sysctls())


def pair_json(p: Pair) -> dict[str, Any]:
    return {
        "proto": p.proto,
        "src": p.src,
        "dst": p.dst,
        "established": p.established,
        "time_wait": p.time_wait,
        "other": p.other,
        "capacity": p.capacity,
        "utilisation": p.utilisation,
        "hot": p.hot,
    }


def to_json(
    pairs: Iterable[Pair],
    sysctls: kernel.PortSysctls | None = None,
    udp_in_use: int | None = None,
) -> dict[str, Any]:
    """The machine form. The ``pairs`` keys are a contract read by tools outside the project:
    add keys, never rename them."""
    out: dict[str, Any] = {"pairs": [pair_json(p) for p in pairs]}
    if sysctls is not None:
        out["range"] = {
            "low": sysctls.low,
            "high": sysctls.high,
            "reserved": sum(1 for p in sysctls.reserved if sysctls.low <= p <= sysctls.high),
            "capacity": sysctls.size,
        }
    if udp_in_use is not None:
        out["udp_ports_in_use"] = udp_in_use
    return out


def render(
    pairs: Sequence[Pair], sysctls: kernel.PortSysctls, udp_in_use: int | None = None
) -> str:
    """The human form: a summary line, then the table with hot pairs marked ``!``."""
    reserved = sum(1 for p in sysctls.reserved if sysctls.low <= p <= sysctls.high)
    lines = [
        f"port range {sysctls.low}-{sysctls.high}: {sysctls.high - sysctls.low + 1} ports, "
        f"{reserved} reserved -> capacity {sysctls.size} per (source IP, destination)"
    ]
    if udp_in_use is not None:
        lines.append(
            f"udp: {udp_in_use} of {sysctls.size} range ports held by UDP sockets "
            "(a plain UDP connect() needs a port no UDP socket uses)"
        )
    if not pairs:
        lines.append("no outgoing connections")
        return "\n".join(lines) + "\n"
    head = ("", "PROTO", "SRC", "DST", "ESTAB", "TIME_WAIT", "OTHER", "CAPACITY", "UTIL%")
    rows = [
        (
            "!" if p.hot else "",
            p.proto,
            p.src,
            p.dst,
            str(p.established),
            str(p.time_wait),
            str(p.other),
            str(p.capacity),
            f"{100 * p.utilisation:.1f}",
        )
        for p in pairs
    ]
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    for r in (head, *rows):
        cells = [
            c.ljust(w) if i < 4 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    if any(p.hot for p in pairs):
        lines.append(f"! = above {HOT:.0%} of capacity")
    return "\n".join(lines) + "\n"


def run(
    as_json: bool = False,
    proto: str = "all",
    min_util: float = 0.0,
    out: TextIO | None = None,
) -> int:
    """``originpool ports``: one snapshot, printed; always exit 0 (a census is not a check)."""
    out = out or sys.stdout
    protos = tuple(PROTOS) if proto == "all" else (proto,)
    sysctls = kernel.read_port_sysctls()
    sockets = dump_sockets(protos)
    pairs = [p for p in tally(sockets, sysctls) if p.utilisation >= min_util]
    udp = udp_ports_in_use(sockets, sysctls) if "udp" in protos else None
    if as_json:
        json.dump(to_json(pairs, sysctls, udp), out, indent=2)
        out.write("\n")
    else:
        out.write(render(pairs, sysctls, udp))
    return 0
