"""Issue 12: ``originpool ports`` and ``/ports`` show the proxy's own (egress IP, origin) pairs
by default, idle ones included, and everything else only with ``--all`` / ``?all=1``.

First the pure pieces (no root), then real sockets in a private namespace: connections from
the proxy's egress IPs to its origins next to unrelated ones (a client straight to an
origin, an egress IP to some other listener, clients of the proxy's own listener), through
the CLI and through a running proxy's admin listener.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pool import census, kernel
from pool.egress import Egress
from pool.origin import Origin
from pool.sockdiag import TCP_LISTEN, TCP_TIME_WAIT
from proxy import cli
from tests.conftest import RANGE, Held, Listeners, R
from tests.http_origin import TestOrigin
from tests.test_census import ESTAB, TCP, UDP, connect_from, key_counts, sk

ROOT = Path(__file__).resolve().parent.parent
O1, O2 = "127.0.2.1:9000", "127.0.2.2:9000"
EGRESS = ["127.0.1.1", "127.0.1.2:40000-40063"]
WINDOW = 64
SYSCTLS = kernel.PortSysctls(RANGE[0], RANGE[1], frozenset())

CONFIG = """
[listen]
address = "127.0.0.1:8080"
[admin]
address = "127.0.0.1:9090"
[egress]
mode = "connectx"
addresses = {egress}
[[routes]]
host = "app.example"
origins = ["http://127.0.2.1:9000", "http://127.0.2.2:9000"]
[log]
format = "json"
"""


def write_config(tmp_path: Path, egress: list[str] = EGRESS) -> Path:
    path = tmp_path / "originpool.toml"
    path.write_text(CONFIG.format(egress=json.dumps(egress)))
    return path


def never(family: int, dst: str) -> str:
    raise AssertionError(f"asked the routing table for {dst} with egress IPs configured")


# --- the pure pieces ------------------------------------------------------------------------


def test_scope_is_every_egress_towards_every_origin_address_of_its_family():
    names = {"api.internal": ["127.0.3.1", "fd00::3"]}

    def resolve(host: str, port: int) -> list[str]:
        if host[0].isdigit():
            return [host]
        if host not in names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return names[host]

    egresses = [Egress("127.0.1.1"), Egress.parse(EGRESS[1]), Egress("fd00:0::1")]
    origins = [
        Origin.parse("http://127.0.2.1:9000"),
        Origin.parse("ws://127.0.2.1:9000"),  # same address: one pair, two origins
        Origin.parse("https://api.internal"),
        Origin.parse("http://gone.internal:80"),
    ]
    scope = census.proxy_scope(egresses, origins, resolve=resolve, source_for=never)
    assert {(p.src, p.dst): (p.egress, p.window, p.origins) for p in scope.pairs} == {
        ("127.0.1.1", O1): ("127.0.1.1", None, ("http://127.0.2.1:9000", "ws://127.0.2.1:9000")),
        ("127.0.1.2", O1): (EGRESS[1], (40000, 40063), ("http://127.0.2.1:9000", "ws://127.0.2.1:9000")),
        ("127.0.1.1", "127.0.3.1:443"): ("127.0.1.1", None, ("https://api.internal:443",)),
        ("127.0.1.2", "127.0.3.1:443"): (EGRESS[1], (40000, 40063), ("https://api.internal:443",)),
        ("fd00::1", "[fd00::3]:443"): ("fd00:0::1", None, ("https://api.internal:443",)),
    }  # fmt: skip
    assert scope.problems == (
        "http://gone.internal:80: does not resolve (Name or service not known); no pairs shown",
    )
    assert scope.describe() == (
        "pairs of the proxy's 3 egress IPs towards its 4 origins (3 addresses); "
        "--all for every pair in this namespace"
    )
    # bind mode ignores windows, as the pool does: the namespace's range is the ceiling
    bind = census.proxy_scope(egresses[:2], origins[:1], "bind", source_for=never)
    assert [p.window for p in bind.pairs] == [None, None]


def test_default_source_when_no_egress_ip_is_configured_or_the_mode_is_plain():
    routes = {"127.0.2.1": "127.0.0.1", "127.0.2.2": "127.0.0.9"}

    def source_for(family: int, dst: str) -> str:
        if dst not in routes:
            raise OSError(errno.ENETUNREACH, "Network is unreachable")
        return routes[dst]

    origins = [Origin.parse(f"http://{ip}:9000") for ip in (*routes, "10.9.9.9")]
    for egresses, mode, why in (
        ([], "connectx", "no egress IPs configured"),
        ([Egress("127.0.1.1")], "plain", "mode plain"),
    ):
        scope = census.proxy_scope(egresses, origins, mode, source_for=source_for)
        assert [(p.src, p.dst, p.egress) for p in scope.pairs] == [
            ("127.0.0.1", O1, "default"),
            ("127.0.0.9", O2, "default"),
        ]
        assert scope.default_source == why
        assert scope.describe().startswith(
            f"pairs of the proxy's default source address ({why}) towards its 3 origins;"
        )
        assert len(scope.problems) == 1 and "10.9.9.9:9000" in scope.problems[0]


def test_window_capacity_is_what_the_pool_can_use():
    sysctls = kernel.PortSysctls(40000, 40127, frozenset({40010, 40011, 50000}))
    assert census.window_capacity(None, sysctls) == 128 - 2
    assert census.window_capacity((40000, 40063), sysctls) == 64 - 2
    assert census.window_capacity((40100, 49999), sysctls) == 28  # clamped to the range
    assert census.window_capacity((50000, 50009), sysctls) == 10 - 1  # outside: bound whole


def test_select_lists_the_proxy_pairs_with_exact_counts_zeros_included_and_nothing_else():
    scope = census.proxy_scope(
        [Egress("127.0.1.1"), Egress.parse(EGRESS[1])],
        [Origin.parse(f"http://{o}") for o in (O1, O2)],
        source_for=never,
    )
    socks = [
        sk(TCP, TCP_LISTEN, "127.0.2.1", 9000),
        *(sk(TCP, ESTAB, "127.0.1.1", 40000 + i, "127.0.2.1", 9000) for i in range(5)),
        *(sk(TCP, TCP_TIME_WAIT, "127.0.1.1", 40010 + i, "127.0.2.1", 9000) for i in range(2)),
        *(sk(TCP, ESTAB, "127.0.1.2", 40020 + i, "127.0.2.2", 9000) for i in range(60)),
        # unrelated: curl straight to an origin, an egress IP elsewhere, UDP on a proxy pair
        *(sk(TCP, ESTAB, "127.0.0.1", 40100 + i, "127.0.2.1", 9000) for i in range(4)),
        sk(TCP, ESTAB, "127.0.1.1", 40110, "127.0.3.1", 7000),
        sk(UDP, ESTAB, "127.0.1.2", 40111, "127.0.2.1", 9000),
    ]
    pairs = census.select(census.tally(socks, SYSCTLS), scope, SYSCTLS)
    assert [(p.src, p.dst, p.established, p.time_wait, p.capacity, p.hot) for p in pairs] == [
        ("127.0.1.2", O2, 60, 0, WINDOW, True),  # fullest first: 60 of its 64-port window
        ("127.0.1.1", O1, 5, 2, R, False),
        ("127.0.1.1", O2, 0, 0, R, False),
        ("127.0.1.2", O1, 0, 0, WINDOW, False),
    ]
    doc = census.to_json(pairs, SYSCTLS, 0, scope)
    assert (doc["view"], doc["egress"], doc["default_source"]) == ("proxy", EGRESS, None)
    assert doc["origins"] == ["http://127.0.2.1:9000", "http://127.0.2.2:9000"]
    assert doc["pairs"][0]["egress"] == EGRESS[1]
    assert doc["pairs"][0]["origins"] == ["http://127.0.2.2:9000"]
    heading, *rest = census.render(pairs, SYSCTLS, None, scope).splitlines()
    assert heading == scope.describe()
    assert rest[1].split()[-1] == "ORIGIN"
    row = ["!", "tcp", "127.0.1.2", O2, "60", "0", "0", "64", "93.8", "http://127.0.2.2:9000"]
    assert rest[2].split() == row


def test_cli_without_any_config_says_it_shows_the_namespace_and_a_missing_one_fails(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    assert cli.main(["ports", "--proto", "tcp"]) == 0
    heading = capsys.readouterr().out.splitlines()[0]
    assert heading == (
        f"no proxy config at {tmp_path / 'absent.toml'} (--config FILE for the proxy's pairs): "
        "every pair in this namespace"
    )
    assert cli.main(["ports", "--json", "--proto", "tcp"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["view"] == "all" and doc["note"] == heading

    # named, or present at the default path: it must load
    assert cli.main(["ports", "--config", str(tmp_path / "typo.toml")]) == 2
    err = capsys.readouterr().err
    assert "typo.toml: cannot read" in err and "--all" in err
    (tmp_path / "absent.toml").write_text("[listen]\n")
    assert cli.main(["ports"]) == 2
    assert "routes: required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["ports", "--all", "--config", str(tmp_path / "x.toml")])


def test_cli_reads_the_pairs_from_a_config_whose_key_it_cannot_read(tmp_path, capsys):
    """The operator's account need not read the proxy's private key to see its ports."""
    path = write_config(tmp_path)
    text = path.read_text().replace(
        '"127.0.0.1:8080"', '"127.0.0.1:8443"\ntls_cert = "absent.pem"\ntls_key = "absent.key"'
    )
    path.write_text(text)
    assert cli.main(["check-config", str(path)]) == 2
    assert cli.main(["ports", "--config", str(path), "--json", "--min-util", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["view"], doc["egress"], doc["pairs"]) == ("proxy", EGRESS, [])


# --- real sockets in a namespace ------------------------------------------------------------


def ports_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``originpool ports`` as a child process, born in this thread's namespace."""
    proc = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "ports", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def established(doc: dict) -> dict[tuple[str, str], int]:
    return {(p["src"], p["dst"]): p["established"] for p in doc["pairs"] if p["proto"] == "tcp"}


def hold_unrelated(listeners: Listeners, held: Held) -> dict[tuple[str, str], int]:
    """Connections that are not the proxy's, each kind a way the old default misled."""
    listeners.add("127.0.3.1", 7000)
    listeners.add("127.0.0.1", 8081)  # stands in for the proxy's own public listener
    for _ in range(4):  # curl straight to an origin, from the default source
        held.new().connect(("127.0.2.1", 9000))
    for _ in range(2):  # an egress IP towards something that is no origin
        connect_from(held, "127.0.1.1", ("127.0.3.1", 7000))
    for _ in range(3):  # clients of the proxy's listener
        held.new().connect(("127.0.0.1", 8081))
    connect_from(held, "127.0.1.2", ("127.0.2.1", 9000), socket.SOCK_DGRAM)  # UDP, same pair
    return {
        ("127.0.0.1", O1): 4,
        ("127.0.1.1", "127.0.3.1:7000"): 2,
        ("127.0.0.1", "127.0.0.1:8081"): 3,
    }


def test_cli_default_is_the_proxy_pairs_and_all_is_the_namespace(ns, listeners, held, tmp_path):
    listeners.add("127.0.2.1", 9000)
    listeners.add("127.0.2.2", 9000)
    for src, dst, n in (("127.0.1.1", O1, 5), ("127.0.1.1", O2, 3), ("127.0.1.2", O1, 2)):
        host, port = dst.split(":")
        for _ in range(n):
            connect_from(held, src, (host, int(port)))
    unrelated = hold_unrelated(listeners, held)
    config = str(write_config(tmp_path))

    doc = json.loads(ports_cli("--config", config, "--json").stdout)
    assert doc["view"] == "proxy"
    assert {(p["src"], p["dst"]): (p["established"], p["capacity"]) for p in doc["pairs"]} == {
        ("127.0.1.1", O1): (5, R),
        ("127.0.1.1", O2): (3, R),
        ("127.0.1.2", O1): (2, WINDOW),
        ("127.0.1.2", O2): (0, WINDOW),  # idle, still listed: it is headroom
    }
    assert all(p["proto"] == "tcp" and p["time_wait"] == p["other"] == 0 for p in doc["pairs"])
    assert doc["range"]["capacity"] == R

    text = ports_cli("--config", config).stdout.splitlines()
    assert text[0] == (
        "pairs of the proxy's 2 egress IPs towards its 2 origins; "
        "--all for every pair in this namespace"
    )

    everything = json.loads(ports_cli("--all", "--json").stdout)
    assert everything["view"] == "all"
    seen = established(everything)
    assert {k: seen.get(k) for k in unrelated} == unrelated
    assert ("127.0.1.2", O2) not in seen  # the namespace view lists held pairs only
    assert seen[("127.0.1.1", O1)] == 5
    assert ("udp", "127.0.1.2", O1) in key_counts(census.take_census())
    assert ports_cli("--all").stdout.splitlines()[0] == census.ALL_HEADING


def test_cli_default_source_pairs_without_egress_ips(ns, listeners, held, tmp_path):
    listeners.add("127.0.2.1", 9000)
    listeners.add("127.0.2.2", 9000)
    for _ in range(3):  # what the proxy itself does with no egress IPs: a plain connect()
        held.new().connect(("127.0.2.2", 9000))
    for _ in range(2):  # not the proxy's: it never uses 127.0.1.1 in this config
        connect_from(held, "127.0.1.1", ("127.0.2.1", 9000))
    config = str(write_config(tmp_path, egress=[]))
    doc = json.loads(ports_cli("--config", config, "--json").stdout)
    assert (doc["view"], doc["egress"], doc["default_source"]) == (
        "proxy",
        ["default"],
        "no egress IPs configured",
    )
    assert established(doc) == {("127.0.0.1", O1): 0, ("127.0.0.1", O2): 3}
    assert {p["egress"] for p in doc["pairs"]} == {"default"}


# --- through a running proxy's admin listener -----------------------------------------------


async def test_admin_ports_is_the_proxy_pairs_and_all_1_the_namespace(
    origins, listeners, held, tmp_path
):
    from tests.test_serve import Proc

    proc = Proc(write_config(tmp_path))
    try:
        await _check_admin(proc, origins, listeners, held)
    finally:
        assert await _stop(proc) == 0


async def _stop(proc) -> int:
    return await asyncio.to_thread(proc.stop)


async def _check_admin(proc, origins: list[TestOrigin], listeners: Listeners, held: Held) -> None:
    await asyncio.to_thread(proc.wait_for, "ready")
    expected = {(src, dst): 0 for src in ("127.0.1.1", "127.0.1.2") for dst in (O1, O2)}
    for src, dst, n in (("127.0.1.1", O1, 4), ("127.0.1.2", O1, 1)):
        host, port = dst.split(":")
        for _ in range(n):
            connect_from(held, src, (host, int(port)))
        expected[(src, dst)] += n
    unrelated = hold_unrelated(listeners, held)
    async with httpx.AsyncClient(headers={"host": "app.example"}) as client:
        r = await client.get("http://127.0.0.1:8080/hello")  # the proxy's own connection
        assert r.status_code == 200
        # which pair it took, by what the origin saw (a kept-alive, idle pool connection)
        (peer,) = [(c.peer, o) for o in origins for c in o.connections if c.requests]
        (src, _port), origin = peer
        expected[(src, O1 if origin is origins[0] else O2)] += 1

        doc = (await client.get("http://127.0.0.1:9090/ports")).json()
        assert doc["view"] == "proxy"
        assert established(doc) == expected
        assert {p["dst"]: p["origins"] for p in doc["pairs"]} == {
            O1: ["http://127.0.2.1:9000"],
            O2: ["http://127.0.2.2:9000"],
        }
        capacities = {(p["src"], p["capacity"]) for p in doc["pairs"]}
        assert capacities == {("127.0.1.1", R), ("127.0.1.2", WINDOW)}

        everything = (await client.get("http://127.0.0.1:9090/ports?all=1")).json()
        assert everything["view"] == "all"
        seen = established(everything)
        assert {k: seen.get(k) for k in unrelated} == unrelated
        assert seen.get(("127.0.0.1", "127.0.0.1:8080"), 0) >= 1  # this client, to the proxy
        assert {k: v for k, v in seen.items() if k in expected} == {
            k: v for k, v in expected.items() if v
        }
        assert (await client.get("http://127.0.0.1:9090/ports?all=0")).json()["view"] == "proxy"
        bad = await client.get("http://127.0.0.1:9090/ports?all=maybe")
        assert bad.status_code == 400
