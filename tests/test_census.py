"""``originpool ports``: the census against made-up sockets (no root), then against ``ss`` on a
namespace full of real ones, in-process and through the CLI."""

from __future__ import annotations

import io
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool import census, kernel
from pool.sockdiag import TCP_LISTEN, TCP_TIME_WAIT, DiagSocket
from proxy import cli
from tests.conftest import RANGE, Held, Listeners, R

ROOT = Path(__file__).resolve().parent.parent
TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP
ESTAB, SYN_SENT, CLOSE = 1, 2, 7
SYSCTLS = kernel.PortSysctls(40000, 40127, frozenset())
PAIR_KEYS = {"proto", "src", "dst", "established", "time_wait", "capacity", "utilisation"}
IP_BIND_ADDRESS_NO_PORT = 24

_cookies = iter(range(1, 1 << 30))


def sk(proto: int, state: int, src: str, sport: int, dst: str = "0.0.0.0", dport: int = 0):
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    if family == socket.AF_INET6 and dst == "0.0.0.0":
        dst = "::"
    return DiagSocket(family, proto, state, src, sport, dst, dport, next(_cookies), 0, 0)


def key_counts(pairs) -> dict[tuple[str, str, str], tuple[int, int, int]]:
    return {(p.proto, p.src, p.dst): (p.established, p.time_wait, p.other) for p in pairs}


# --- the pure core: no kernel -------------------------------------------------------------


def test_grouping_skips_listeners_server_halves_and_unconnected_sockets():
    socks = [
        # A TCP origin in the same namespace, and the server halves of its connections.
        sk(TCP, TCP_LISTEN, "127.0.2.1", 9000),
        sk(TCP, ESTAB, "127.0.2.1", 9000, "127.0.1.1", 40001),
        sk(TCP, 3, "127.0.2.1", 9000, "127.0.1.1", 40005),  # SYN_RECV request socket
        # The client halves: established, TIME_WAIT, and still opening.
        *(sk(TCP, ESTAB, "127.0.1.1", 40001 + i, "127.0.2.1", 9000) for i in range(3)),
        *(sk(TCP, TCP_TIME_WAIT, "127.0.1.1", 40010 + i, "127.0.2.1", 9000) for i in range(2)),
        sk(TCP, SYN_SENT, "127.0.1.1", 40020, "127.0.2.1", 9000),
        # A dual-stack wildcard listener: its IPv4 peers arrive as v4-mapped IPv6 sockets.
        sk(TCP, TCP_LISTEN, "::", 9001),
        sk(TCP, ESTAB, "::ffff:127.0.2.1", 9001, "::ffff:127.0.1.1", 40030),
        sk(TCP, ESTAB, "::ffff:127.0.1.1", 40030, "::ffff:127.0.2.1", 9001),
        sk(TCP, ESTAB, "127.0.1.1", 40031, "127.0.2.1", 9001),
        # IPv6 proper, to a remote origin (no listener here).
        sk(TCP, ESTAB, "fd00::1", 40040, "fd00::2", 443),
        # Bound but never connected: holds a port, not a pair.
        sk(TCP, CLOSE, "127.0.1.1", 40050),
        # UDP: a server socket, a connected per-client socket sharing its port, two clients.
        sk(UDP, CLOSE, "127.0.2.1", 53),
        sk(UDP, ESTAB, "127.0.2.1", 53, "127.0.1.1", 40060),
        sk(UDP, ESTAB, "127.0.1.1", 40060, "127.0.2.1", 53),
        sk(UDP, ESTAB, "127.0.1.1", 40061, "127.0.2.1", 53),
        sk(UDP, CLOSE, "0.0.0.0", 40070),  # an unconnected client socket
    ]
    pairs = census.tally(socks, SYSCTLS)
    assert key_counts(pairs) == {
        ("tcp", "127.0.1.1", "127.0.2.1:9000"): (3, 2, 1),
        ("tcp", "127.0.1.1", "127.0.2.1:9001"): (2, 0, 0),
        ("tcp", "fd00::1", "[fd00::2]:443"): (1, 0, 0),
        ("udp", "127.0.1.1", "127.0.2.1:53"): (2, 0, 0),
    }
    assert pairs[0].dst == "127.0.2.1:9000"  # fullest first
    assert {p.capacity for p in pairs} == {R}
    assert pairs[0].utilisation == 6 / R


def test_capacity_counts_only_reserved_ports_inside_the_range_and_flags_above_80_percent():
    sysctls = kernel.PortSysctls(40000, 40009, frozenset({39999, 40000, 40001}))
    socks = [sk(TCP, ESTAB, "127.0.1.1", 40002 + i, "127.0.2.1", 80) for i in range(6)]
    socks += [sk(TCP, ESTAB, "127.0.1.2", 40002 + i, "127.0.2.1", 80) for i in range(7)]
    socks += [sk(UDP, ESTAB, "127.0.1.1", 40002 + i, "127.0.2.1", 53) for i in range(2)]
    pairs = census.tally(socks, sysctls)
    assert [(p.src, p.proto, p.capacity, p.utilisation, p.hot) for p in pairs] == [
        ("127.0.1.2", "tcp", 8, 7 / 8, True),
        ("127.0.1.1", "tcp", 8, 6 / 8, False),
        ("127.0.1.1", "udp", 8, 2 / 8, False),
    ]
    assert census.udp_ports_in_use(socks, sysctls) == 2
    assert census.tally(socks, kernel.PortSysctls(40000, 40000, frozenset({40000})))[
        0
    ].utilisation == pytest.approx(1.0)


def test_json_keeps_the_contract_keys():
    socks = [sk(TCP, ESTAB, "::1", 40000 + i, "::1", 9000) for i in range(3)]
    socks.append(sk(TCP, TCP_TIME_WAIT, "127.0.0.1", 40100, "127.0.2.1", 7000))
    doc = census.to_json(census.tally(socks, SYSCTLS), SYSCTLS, 0)
    assert json.loads(json.dumps(doc)) == doc
    assert doc["range"] == {"low": 40000, "high": 40127, "reserved": 0, "capacity": R}
    first, second = doc["pairs"]
    assert set(first) >= PAIR_KEYS
    assert first == {
        "proto": "tcp",
        "src": "::1",
        "dst": "[::1]:9000",
        "established": 3,
        "time_wait": 0,
        "other": 0,
        "capacity": R,
        "utilisation": 3 / R,
        "hot": False,
    }
    assert (second["dst"], second["time_wait"]) == ("127.0.2.1:7000", 1)
    assert census.to_json([]) == {"view": "all", "pairs": []}


def test_table_marks_hot_pairs_and_says_what_the_capacity_is():
    sysctls = kernel.PortSysctls(40000, 40009, frozenset({40009}))
    socks = [sk(TCP, ESTAB, "127.0.1.1", 40000 + i, "127.0.2.1", 80) for i in range(8)]
    socks.append(sk(TCP, ESTAB, "fd00::1", 40000, "fd00::2", 443))
    text = census.render(census.tally(socks, sysctls), sysctls)
    heading, *lines = text.splitlines()
    assert heading == census.ALL_HEADING
    assert lines[0] == (
        "port range 40000-40009: 10 ports, 1 reserved -> capacity 9 per (source IP, destination)"
    )
    assert lines[1].split() == [
        "PROTO", "SRC", "DST", "ESTAB", "TIME_WAIT", "OTHER", "CAPACITY", "UTIL%"
    ]  # fmt: skip
    assert lines[2].split() == ["!", "tcp", "127.0.1.1", "127.0.2.1:80", "8", "0", "0", "9", "88.9"]
    assert lines[3].split() == ["tcp", "fd00::1", "[fd00::2]:443", "1", "0", "0", "9", "11.1"]
    assert lines[-1].startswith("! = above 80%")
    assert census.render([], sysctls).splitlines()[-1] == "no outgoing connections"


ENDPOINT = st.tuples(st.sampled_from(["127.0.1.1", "127.0.1.2", "fd00::1"]), st.integers(1, 3))


@settings(deadline=None)  # a loaded CI box must not turn timing into a failure
@given(st.lists(st.tuples(ENDPOINT, st.integers(40000, 40127), st.sampled_from([1, 2, 6]))))
def test_every_client_socket_is_counted_once_and_pairs_come_fullest_first(conns):
    socks = []
    for (src, n), sport, state in conns:
        dst = "fd00::2" if ":" in src else "127.0.2.1"
        socks.append(sk(TCP, state, src, sport, dst, 9000 + n))
    pairs = census.tally(socks, SYSCTLS)
    assert sum(p.used for p in pairs) == len(socks)
    assert [p.utilisation for p in pairs] == sorted((p.utilisation for p in pairs), reverse=True)
    assert len({(p.proto, p.src, p.dst) for p in pairs}) == len(pairs)


def test_cli_ports_all_runs_without_a_namespace(capsys):
    """Whatever this host holds, the command answers in the contract's shape and exits 0."""
    assert cli.main(["ports", "--all", "--json", "--proto", "tcp"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["view"] == "all"
    assert all(set(p) >= PAIR_KEYS and p["proto"] == "tcp" for p in doc["pairs"])
    assert "udp_ports_in_use" not in doc
    assert cli.main(["ports", "--all", "--min-util", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "no outgoing connections"


# --- against the kernel and ss, in a namespace ---------------------------------------------


def _split(endpoint: str) -> tuple[str, str]:
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]").split("%")[0]
    mapped = ipaddress.ip_address(host).ipv4_mapped if ":" in host else None
    return (str(mapped) if mapped else host), port


def ss_pairs(
    env: dict[str, str] | None = None,
) -> dict[tuple[str, str, str], tuple[int, int, int]]:
    """The same census, computed from ``ss`` output by the documented rule."""
    rows = []
    for proto in ("tcp", "udp"):
        out = subprocess.run(
            ["ss", f"-{proto[0]}anH"], capture_output=True, text=True, check=True, env=env
        ).stdout
        for line in out.splitlines():
            state, _rq, _sq, local, peer = line.split()[:5]
            rows.append((proto, state, local, peer))
    listening = {
        (proto, *_split(local))
        for proto, state, local, peer in rows
        if state == "LISTEN" or (proto == "udp" and peer.endswith(":*"))
    }
    counts: dict[tuple[str, str, str], Counter[str]] = {}
    for proto, state, local, peer in rows:
        if state == "LISTEN" or peer.endswith(":*"):
            continue
        src, sport = _split(local)
        if {(proto, ip, sport) for ip in (src, "*", "0.0.0.0", "::")} & listening:
            continue
        dhost, dport = _split(peer)
        dst = f"[{dhost}]:{dport}" if ":" in dhost else f"{dhost}:{dport}"
        counts.setdefault((proto, src, dst), Counter())[state] += 1
    return {
        k: (c["ESTAB"], c["TIME-WAIT"], sum(c.values()) - c["ESTAB"] - c["TIME-WAIT"])
        for k, c in counts.items()
    }


def connect_from(held: Held, src: str, dst: tuple[str, int], kind: int = socket.SOCK_STREAM):
    """Pick the source IP without bind-before-connect's global port lock."""
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    s = held.new(family, kind)
    if kind == socket.SOCK_STREAM:
        s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    s.bind((src, 0))
    s.connect(dst)
    return s


def time_waits(src: str, dst: tuple[str, int], n: int) -> None:
    """Connections the client closes first, gracefully: the client's 4-tuple lingers."""
    server = socket.socket()
    server.bind(dst)
    server.listen(n)
    try:
        for _ in range(n):
            c = socket.socket()
            c.bind((src, 0))
            c.connect(dst)
            accepted, _ = server.accept()
            c.close()
            accepted.recv(1)  # the client's FIN
            accepted.close()
    finally:
        server.close()


def wait_for(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def cli_json(*args: str, env: dict[str, str] | None = None, python: Sequence[str] = ()):
    proc = subprocess.run(
        [*(python or [sys.executable]), "-m", "proxy.cli", "ports", "--json", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def pairs_of(doc) -> dict[tuple[str, str, str], tuple[int, int, int]]:
    return {
        (p["proto"], p["src"], p["dst"]): (p["established"], p["time_wait"], p["other"])
        for p in doc["pairs"]
    }


V6 = {"addresses": ["fd00::1/128"]}
EXPECTED = {
    ("tcp", "127.0.1.1", "127.0.2.1:9000"): (30, 0, 0),
    ("tcp", "127.0.1.2", "127.0.2.1:9000"): (20, 0, 0),
    ("tcp", "fd00::1", "[::1]:9000"): (5, 0, 0),
    ("tcp", "127.0.1.1", "127.0.2.2:9001"): (0, 4, 0),
    ("udp", "127.0.1.1", "127.0.2.1:9053"): (6, 0, 0),
    ("udp", "fd00::1", "[::1]:9053"): (1, 0, 0),
}


def populate(listeners: Listeners, held: Held) -> None:
    listeners.add("127.0.2.1", 9000)
    listeners.add("::1", 9000)
    for _ in range(30):
        connect_from(held, "127.0.1.1", ("127.0.2.1", 9000))
    for _ in range(20):
        connect_from(held, "127.0.1.2", ("127.0.2.1", 9000))
    for _ in range(5):
        connect_from(held, "fd00::1", ("::1", 9000))
    time_waits("127.0.1.1", ("127.0.2.2", 9001), 4)
    udp_server = held.new(kind=socket.SOCK_DGRAM)
    udp_server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    udp_server.bind(("127.0.2.1", 9053))
    clients = [
        connect_from(held, "127.0.1.1", ("127.0.2.1", 9053), socket.SOCK_DGRAM) for _ in range(6)
    ]
    # The QUIC pattern: a connected per-client server socket sharing the server's port.
    per_client = held.new(kind=socket.SOCK_DGRAM)
    per_client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    per_client.bind(("127.0.2.1", 9053))
    per_client.connect(clients[0].getsockname())
    held.new(socket.AF_INET6, socket.SOCK_DGRAM).bind(("::1", 9053))
    connect_from(held, "fd00::1", ("::1", 9053), socket.SOCK_DGRAM)
    # Closing handshakes may finish in softirq a moment later (FIN_WAIT2, LAST_ACK): settle.
    assert wait_for(lambda: ss_pairs() == EXPECTED), ss_pairs()


@pytest.mark.parametrize("ns", [V6], indirect=True)
def test_census_matches_ss_in_process_and_through_the_cli(ns, listeners, held):
    populate(listeners, held)
    seen = ss_pairs()
    pairs = census.take_census()
    assert key_counts(pairs) == seen
    assert {p.capacity for p in pairs} == {R}

    # A child forked from this thread is born in its namespace: the CLI sees the same sockets.
    child_ns = subprocess.run(
        [sys.executable, "-c", "import os; print(os.readlink('/proc/self/ns/net'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert child_ns == f"net:[{os.stat(f'/run/netns/{ns.name}').st_ino}]"
    doc = cli_json("--all")
    assert pairs_of(doc) == seen
    assert doc["range"] == {"low": RANGE[0], "high": RANGE[1], "reserved": 0, "capacity": R}
    client_ports = {
        s.getsockname()[1]
        for s in held.socks
        if s.type == socket.SOCK_DGRAM and RANGE[0] <= s.getsockname()[1] <= RANGE[1]
    }
    assert doc["udp_ports_in_use"] == len(client_ports) > 0


def test_a_pair_past_80_percent_is_flagged_and_listed_first(ns, listeners, held):
    ns.set_reserved_ports("40120-40127")
    capacity = R - 8
    listeners.add("127.0.2.1", 9000)
    listeners.add("127.0.2.2", 9000)
    for _ in range(10):
        connect_from(held, "127.0.1.1", ("127.0.2.1", 9000))
    full = int(capacity * 0.85) + 1
    for _ in range(full):
        connect_from(held, "127.0.1.3", ("127.0.2.2", 9000))

    first, second = census.take_census()
    assert (first.src, first.dst, first.established, first.capacity) == (
        "127.0.1.3",
        "127.0.2.2:9000",
        full,
        capacity,
    )
    assert first.hot and first.utilisation == full / capacity
    assert (second.established, second.hot) == (10, False)

    out = io.StringIO()
    assert census.run(out=out) == 0
    heading, *rows = out.getvalue().splitlines()
    assert heading == census.ALL_HEADING
    assert rows[0].endswith(f"8 reserved -> capacity {capacity} per (source IP, destination)")
    assert rows[3].split()[:4] == ["!", "tcp", "127.0.1.3", "127.0.2.2:9000"]
    assert not rows[4].startswith("!")
    hot_only = cli_json("--all", "--min-util", "0.8")
    assert [(p["src"], p["hot"]) for p in hot_only["pairs"]] == [("127.0.1.3", True)]
    assert cli_json("--all", "--proto", "udp")["pairs"] == []


def _unprivileged_python() -> list[str] | None:
    """A Python that uid nobody can run (the venv's lives under /root), with no capabilities."""
    setpriv, python = shutil.which("setpriv"), shutil.which("python3", path="/usr/bin:/bin")
    if not setpriv or not python:
        return None
    cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", python]
    probe = subprocess.run([*cmd, "-c", "import pool.census"], cwd=ROOT, capture_output=True)
    return cmd if probe.returncode == 0 else None


def test_needs_no_root_in_its_own_namespace(ns, listeners, held):
    listeners.add("127.0.2.1", 9000)
    for _ in range(3):
        connect_from(held, "127.0.1.1", ("127.0.2.1", 9000))
    cmd = _unprivileged_python()
    if cmd is None:
        pytest.skip("no interpreter that uid 65534 can run this project with")
    env = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [*cmd, "-c", "import os; print(os.getuid())"], capture_output=True, text=True, env=env
    )
    assert proc.stdout.strip() == "65534"
    assert pairs_of(cli_json("--all", env=env, python=cmd)) == {
        ("tcp", "127.0.1.1", "127.0.2.1:9000"): (3, 0, 0)
    }
