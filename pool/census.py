"""``originpool ports``: who holds the ephemeral ports, per (source IP, destination).

What an operator runs on "Cannot assign requested address": the limit that bites is per
(source IP, destination ip:port) -- the ``ip_local_port_range`` size, minus reserved ports --
not the machine-wide port count, so the census groups outgoing sockets by that pair and says
how close each pair is to its ceiling. It asks ``NETLINK_SOCK_DIAG`` (the same dumps ``ss``
uses), which needs no privilege in one's own namespace.

The core (:func:`tally`) is pure so it can be checked against made-up sockets and reused by
the proxy's admin endpoint; :func:`take_census` is the only part that talks to the kernel.

Two views (issue 12). By default ``originpool ports`` and the admin ``/ports`` show the
*proxy's own* pairs: each of its egress IPs (or, with none configured or in ``plain`` mode,
the source address the kernel's routing table would pick) towards each address of each
configured origin -- a :class:`Scope`. Those pairs are listed even with no connection at all,
because the operator asks "how much headroom has each (egress IP, origin) left", and a
namespace-wide census answered with whatever else the host was doing (curl's connections,
clients of the proxy's own listener) and hid the idle pairs. ``--all`` (``/ports?all=1``)
is the namespace-wide census for everything else. The proxy's view selects by address, not
by process: another program's connections from an egress IP to an origin eat the same ports,
so they count against that pair, as they should.

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from pool import kernel, route, sockdiag

if TYPE_CHECKING:  # the census runs without the proxy's dependencies (uid nobody, bare python)
    from pool.egress import Egress
    from pool.origin import Origin

HOT = 0.8
PROTOS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
_NAMES = {v: k for k, v in PROTOS.items()}
_WILDCARD: dict[int, str] = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}
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
    # the proxy's view only: which configured egress and origins this pair serves
    egress: str | None = None
    origins: tuple[str, ...] = field(default=())

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


# --- the proxy's own pairs (the default view) ---------------------------------------------

Resolve = Callable[[str, int], list[str]]
SourceFor = Callable[[int, str], str]
Window = tuple[int, int]
ALL_HEADING = (
    "every pair in this namespace (--all); without --all, only the proxy's own "
    "(egress IP, origin) pairs"
)


@dataclass(frozen=True, slots=True)
class ScopePair:
    """One (source IP, origin address) pair the proxy may open connections on."""

    src: str
    dst: str
    egress: str  # as configured ("127.0.1.2:40000-40063"), or "default"
    window: Window | None  # connectx's port window: then the pair's ceiling is the window's
    origins: tuple[str, ...]  # the origin URLs reaching this address (several may share one)


@dataclass(frozen=True, slots=True)
class Scope:
    """What "the proxy's pairs" means for one config, built per census from the config the
    caller holds (the CLI's file; the running worker's live egress set and routes)."""

    egresses: tuple[str, ...]
    default_source: str | None  # why the kernel's default source is used, or None
    origins: tuple[str, ...]
    addresses: int  # distinct origin addresses the origins resolved to
    pairs: tuple[ScopePair, ...]
    problems: tuple[str, ...]

    def describe(self) -> str:
        """The heading that says which set is shown, so nobody mistakes it for the other."""
        if self.default_source is not None:
            sources = f"default source address ({self.default_source})"
        else:
            sources = _count_of(len(self.egresses), "egress IP")
        towards = _count_of(len(self.origins), "origin")
        if self.addresses != len(self.origins):
            towards += f" ({_count_of(self.addresses, 'address', 'addresses')})"
        return (
            f"pairs of the proxy's {sources} towards its {towards}; "
            "--all for every pair in this namespace"
        )


def _count_of(n: int, noun: str, plural: str = "") -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"


def _normal(ip: str) -> tuple[int, str]:
    """An address as the kernel prints it (so config spellings match sock_diag's)."""
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    return _plain_ip(family, str(address))


def resolve_host(host: str, port: int) -> list[str]:
    """Every address getaddrinfo gives for an origin: the proxy may connect to any of them."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def proxy_scope(
    egresses: Sequence[Egress],
    origins: Iterable[Origin],
    mode: str = "connectx",
    *,
    resolve: Resolve = resolve_host,
    source_for: SourceFor = route.source_for,
) -> Scope:
    """The proxy's pairs: every egress towards every address of every origin.

    Follows :class:`~pool.egress.EgressSet`'s rules, so the census shows the pairs the pool
    really uses: ``plain`` mode, no egress IPs, or an egress without an IP mean the kernel's
    default source, asked of the routing table per destination (as connect() would choose,
    allocating no port); an egress IP serves only destinations of its own family; only
    connectx honours port windows. Hostname origins resolve now. What does not resolve, or
    has no route, lands in ``problems`` instead of raising: the other pairs still matter.
    """
    default_reason: str | None = None
    if mode == "plain":
        default_reason = "mode plain"
    elif not egresses or all(not e.ip for e in egresses):
        default_reason = "no egress IPs configured"
    sources: list[tuple[str, Window | None, str]]
    if mode == "plain" or not egresses:
        sources = [("", None, "default")]
    else:
        sources = [(e.ip, e.window if mode == "connectx" else None, str(e)) for e in egresses]
    origin_list = list(dict.fromkeys(origins))
    found: dict[tuple[str, str], tuple[str, Window | None, list[str]]] = {}
    problems: list[str] = []
    addresses: set[str] = set()
    for origin in origin_list:
        try:
            ips = resolve(origin.host, origin.port)
        except OSError as e:
            problems.append(f"{origin}: does not resolve ({e.strerror or e}); no pairs shown")
            continue
        for raw in ips:
            family, ip = _normal(raw)
            dst = format_endpoint(family, ip, origin.port)
            addresses.add(dst)
            for egress_ip, window, label in sources:
                if egress_ip:
                    src_family, src = _normal(egress_ip)
                    if src_family != family:
                        continue
                else:
                    try:
                        src = _normal(source_for(family, ip))[1]
                    except OSError as e:
                        problems.append(f"{origin} ({dst}): no default source address ({e})")
                        continue
                entry = found.setdefault((src, dst), (label, window, []))
                if str(origin) not in entry[2]:
                    entry[2].append(str(origin))
    return Scope(
        egresses=tuple(label for _ip, _w, label in sources),
        default_source=default_reason,
        origins=tuple(str(o) for o in origin_list),
        addresses=len(addresses),
        pairs=tuple(
            ScopePair(src, dst, label, window, tuple(names))
            for (src, dst), (label, window, names) in found.items()
        ),
        problems=tuple(problems),
    )


def window_capacity(window: Window | None, sysctls: kernel.PortSysctls) -> int:
    """A pair's ceiling as :meth:`EgressSet.capacity` counts it: the window clamped to the
    range (one wholly outside it is bound from userspace, so it counts whole), minus reserved
    ports; no window is the namespace's range."""
    if window is None:
        return sysctls.size
    lo, hi = max(window[0], sysctls.low), min(window[1], sysctls.high)
    if lo > hi:
        lo, hi = window
    return hi - lo + 1 - sum(1 for p in sysctls.reserved if lo <= p <= hi)


def select(pairs: Iterable[Pair], scope: Scope, sysctls: kernel.PortSysctls) -> list[Pair]:
    """The scope's pairs, each with its counts from the census or zeros (an idle pair is
    headroom the operator wants to see), fullest first. TCP only: the proxy opens nothing
    else towards its origins."""
    counted = {(p.src, p.dst): p for p in pairs if p.proto == "tcp"}
    out = []
    for sp in scope.pairs:
        seen = counted.get((sp.src, sp.dst))
        est, tw, other = (seen.established, seen.time_wait, seen.other) if seen else (0, 0, 0)
        capacity = window_capacity(sp.window, sysctls)
        out.append(
            Pair(
                proto="tcp",
                src=sp.src,
                dst=sp.dst,
                established=est,
                time_wait=tw,
                other=other,
                capacity=capacity,
                utilisation=_utilisation(est + tw + other, capacity),
                egress=sp.egress,
                origins=sp.origins,
            )
        )
    out.sort(key=lambda p: (-p.utilisation, p.proto, p.src, p.dst))
    return out


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


def survey(
    scope: Scope | None, protos: Sequence[str] = tuple(PROTOS), min_util: float = 0.0
) -> tuple[list[Pair], kernel.PortSysctls, int | None]:
    """One snapshot for the CLI and ``/ports`` alike: the proxy's pairs when ``scope`` is
    given, every pair of the namespace when it is None; then the range and the UDP count."""
    sysctls = kernel.read_port_sysctls()
    sockets = dump_sockets(protos)
    pairs = tally(sockets, sysctls)
    if scope is not None:
        pairs = select(pairs, scope, sysctls) if "tcp" in protos else []
    pairs = [p for p in pairs if p.utilisation >= min_util]
    udp = udp_ports_in_use(sockets, sysctls) if "udp" in protos else None
    return pairs, sysctls, udp


def pair_json(p: Pair) -> dict[str, Any]:
    out: dict[str, Any] = {
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
    if p.egress is not None:  # added keys, only in the proxy's view: the --all shape is unchanged
        out["egress"] = p.egress
        out["origins"] = list(p.origins)
    return out


def to_json(
    pairs: Iterable[Pair],
    sysctls: kernel.PortSysctls | None = None,
    udp_in_use: int | None = None,
    scope: Scope | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    """The machine form. The ``pairs`` keys are a contract read by tools outside the project:
    add keys, never rename them. ``view`` says which set ``pairs`` is: ``"proxy"`` (the
    default of ``originpool ports`` and ``/ports``: the proxy's own pairs, idle ones
    included, with the egress and origins they came from) or ``"all"`` (``--all``,
    ``?all=1``: every outgoing pair of the namespace, the only view before issue 12); ``note``
    says why, when the CLI fell back to ``"all"`` for want of a config."""
    out: dict[str, Any] = {"view": "all" if scope is None else "proxy"}
    if note is not None:
        out["note"] = note
    out["pairs"] = [pair_json(p) for p in pairs]
    if scope is not None:
        out["egress"] = list(scope.egresses)
        out["default_source"] = scope.default_source
        out["origins"] = list(scope.origins)
        out["problems"] = list(scope.problems)
        out["summary"] = scope.describe()
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
    pairs: Sequence[Pair],
    sysctls: kernel.PortSysctls,
    udp_in_use: int | None = None,
    scope: Scope | None = None,
    note: str | None = None,
) -> str:
    """The human form: which set is shown, a summary line, then the table with hot pairs
    marked ``!`` (and, in the proxy's view, the origins each address belongs to)."""
    reserved = sum(1 for p in sysctls.reserved if sysctls.low <= p <= sysctls.high)
    lines = [(note or ALL_HEADING) if scope is None else scope.describe()]
    lines += [f"warning: {problem}" for problem in (scope.problems if scope else ())]
    lines.append(
        f"port range {sysctls.low}-{sysctls.high}: {sysctls.high - sysctls.low + 1} ports, "
        f"{reserved} reserved -> capacity {sysctls.size} per (source IP, destination)"
    )
    if udp_in_use is not None:
        lines.append(
            f"udp: {udp_in_use} of {sysctls.size} range ports held by UDP sockets "
            "(a plain UDP connect() needs a port no UDP socket uses)"
        )
    if not pairs:
        lines.append("no outgoing connections" if scope is None else "no pairs of the proxy's")
        return "\n".join(lines) + "\n"
    head: tuple[str, ...] = ("", "PROTO", "SRC", "DST", "ESTAB", "TIME_WAIT", "OTHER")
    head += ("CAPACITY", "UTIL%") + (("ORIGIN",) if scope is not None else ())
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
            *((" ".join(p.origins),) if scope is not None else ()),
        )
        for p in pairs
    ]
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    for r in (head, *rows):
        cells = [
            c.ljust(w) if i < 4 or i > 8 else c.rjust(w)
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
    scope: Scope | None = None,
    note: str | None = None,
) -> int:
    """``originpool ports``: one snapshot, printed; always exit 0 (a census is not a check).

    ``scope`` is the proxy's pairs (the command's default, built from its config by the CLI);
    None is ``--all``, every outgoing pair of the namespace; ``note`` replaces its heading.
    """
    out = out or sys.stdout
    protos = tuple(PROTOS) if proto == "all" else (proto,)
    pairs, sysctls, udp = survey(scope, protos, min_util)
    if as_json:
        json.dump(to_json(pairs, sysctls, udp, scope, note), out, indent=2)
        out.write("\n")
    else:
        out.write(render(pairs, sysctls, udp, scope, note))
    return 0
