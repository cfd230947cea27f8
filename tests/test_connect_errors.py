"""Connect failures are typed: a ConnectError carrying stage, 4-tuple and errno, in every mode.

Why: the egress set tells "this IP left the host" (bind stage) from "no port left" (connect
stage) by these fields, and the ``upstream_error`` line is how an operator finds which
source and destination failed. Real sockets in a namespace of the test's own: a refused
port, an address the namespace lacks, an accept queue that drops SYNs.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket

import httpx
import pytest
from structlog.testing import capture_logs

from pool.connectors import MODES, Mode, legacy_connect
from pool.connectx import connectx
from pool.egress import EgressSet, EgressUnavailable
from pool.errors import ConnectError, UpstreamSocketError
from pool.origin import Origin, OriginPool
from proxy.routing import Route, Router
from proxy.server import Listener, Proxy, Settings

SRC = "127.0.1.1"
CLOSED = ("127.0.2.9", 9999)  # nothing listens here: the kernel answers RST
ABSENT = "10.255.0.1"  # not in the namespace: bind() refuses it
PORT = re.compile(r"127\.0\.1\.1:(\d+) -> 127\.0\.2\.9:9999: ECONNREFUSED")


@pytest.mark.parametrize("mode", MODES)
async def test_refused_connect_is_typed_with_its_4_tuple_in_every_mode(ns, mode: Mode) -> None:
    egress = EgressSet([SRC], mode)
    with pytest.raises(ConnectError) as refused:
        await egress.connect(CLOSED, timeout=5)
    e = refused.value
    assert isinstance(e, ConnectionRefusedError)  # the errno's builtin class is kept
    assert (e.stage, e.errno, e.remote) == ("connect", errno.ECONNREFUSED, CLOSED)
    assert e.local is not None and e.local[1] != 0  # the port the SYN left from
    if mode != "plain":  # plain: the kernel's source for the route, not the egress IP
        assert e.local[0] == SRC
        match = PORT.search(str(e))
        assert match is not None and int(match.group(1)) == e.local[1], str(e)
    assert "\n" not in str(e)
    assert sum(egress.live_by_egress().values()) == 0  # the failure gave its count back


def test_absent_source_fails_at_bind_in_connectx_and_bind_modes(ns) -> None:
    with socket.socket() as s, pytest.raises(ConnectError) as nope:
        connectx(s, (ABSENT, 0), CLOSED)
    assert (nope.value.stage, nope.value.errno) == ("bind", errno.EADDRNOTAVAIL)
    assert nope.value.local == (ABSENT, 0) and nope.value.remote == CLOSED
    assert "bind 10.255.0.1:* -> 127.0.2.9:9999: EADDRNOTAVAIL" in str(nope.value)


async def test_legacy_bind_of_an_absent_source_is_bind_stage(ns) -> None:
    with socket.socket() as s, pytest.raises(ConnectError) as nope:
        s.setblocking(False)
        await legacy_connect(s, ABSENT, CLOSED)
    assert (nope.value.stage, nope.value.errno) == ("bind", errno.EADDRNOTAVAIL)
    assert nope.value.local == (ABSENT, 0)


@pytest.mark.parametrize("mode", ["connectx", "bind"])
async def test_every_egress_absent_is_egress_unavailable_in_the_same_hierarchy(
    ns, mode: Mode
) -> None:
    egress = EgressSet([ABSENT], mode)
    with pytest.raises(EgressUnavailable) as gone:
        await egress.connect(CLOSED, timeout=5)
    assert isinstance(gone.value, UpstreamSocketError) and gone.value.errno == errno.EADDRNOTAVAIL
    assert egress.is_down(egress.egresses[0])


async def test_a_connect_past_its_timeout_is_a_typed_timeout(ns) -> None:
    """A listener whose accept queue is full drops SYNs: the connect hangs until the
    pool's timeout, which must come out as ETIMEDOUT, a TimeoutError, with the 4-tuple."""
    full = socket.socket()
    full.bind(("127.0.2.1", 9000))
    full.listen(0)
    queued = []
    try:
        for _ in range(4):  # backlog 0 admits one; the rest wait in SYN retries
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.2.1", 9000))
            queued.append(c)
        with pytest.raises(ConnectError) as slow:
            await EgressSet([SRC]).connect(("127.0.2.1", 9000), timeout=0.3)
    finally:
        for c in queued:
            c.close()
        full.close()
    e = slow.value
    assert isinstance(e, TimeoutError) and (e.errno, e.stage) == (errno.ETIMEDOUT, "connect")
    assert e.remote == ("127.0.2.1", 9000) and "after 0.3s" in str(e)


async def test_the_upstream_error_line_carries_stage_4_tuple_and_errno(ns) -> None:
    route = Route("app.test", "/", [(Origin("http", *CLOSED), 1)], "round_robin")
    pool = OriginPool(EgressSet([SRC]))
    settings = Settings(trusted_proxies=[ipaddress.ip_network("127.0.0.9/32")])
    proxy = Proxy(Router([route]), pool, settings)
    listener = Listener(proxy, ("127.0.0.1", 0))
    proxy.listeners.append(listener)
    listener.start()
    url = f"http://{listener.address[0]}:{listener.address[1]}"
    try:
        with capture_logs() as logs:
            async with httpx.AsyncClient(base_url=url, headers={"host": "app.test"}) as client:
                r = await client.get("/x")
        assert r.status_code == 502
        [line] = [e for e in logs if e["event"] == "upstream_error"]
        assert line["stage"] == "connect" and line["errno"] == "ECONNREFUSED"
        assert line["egress"] == SRC and line["destination"] == "127.0.2.9:9999"
        match = re.fullmatch(r"127\.0\.1\.1:(\d+)->127\.0\.2\.9:9999", line["four_tuple"])
        assert match is not None and int(match.group(1)) > 0, line["four_tuple"]
    finally:
        listener.close()
        await pool.close()
