"""Malformed requests at the edges of a connection's life, through the running proxy on both
codecs, with raw bytes: what the client gets, what the origin sees (nothing, for a request
already known to be bad), and what the access line records (the status the client got)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from pool.egress import EgressSet
from pool.origin import Origin, OriginPool, PoolLimits
from proxy.routing import Route, Router
from proxy.server import Listener, Proxy, Settings
from tests.http_origin import TestOrigin

ORIGIN = ("127.0.2.1", 9000)

# on the compiled shortcuts and header rewrite, and again on the pure ones
pytestmark = pytest.mark.usefixtures("whole_impl")


@pytest.fixture(params=["httptools", "h11"])
def parser(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.param


class Rig:
    def __init__(self, proxy: Proxy, listener: Listener, origin: TestOrigin) -> None:
        self.proxy = proxy
        self.listener = listener
        self.origin = origin

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(*self.listener.address)

    async def raw(self, data: bytes) -> bytes:
        reader, writer = await self.open()
        writer.write(data)
        out = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
        return out

    def requests_seen(self) -> int:
        return sum(len(c.requests) for c in self.origin.connections)


@pytest.fixture
async def rig(ns, parser):
    origin = TestOrigin()
    await origin.start(*ORIGIN)
    route = Route("app.test", "/", [(Origin("http", *ORIGIN), 1)])
    pool = OriginPool(EgressSet(["127.0.1.1"]), PoolLimits())
    proxy = Proxy(Router([route]), pool, Settings(http_parser=parser))
    listener = Listener(proxy, ("127.0.0.1", 0))
    proxy.listeners.append(listener)
    listener.start()
    yield Rig(proxy, listener, origin)
    listener.close()
    await pool.close()
    await origin.close()


GOOD = b"GET /hello HTTP/1.1\r\nHost: app.test\r\n\r\n"


def responses(out: bytes) -> list[bytes]:
    """Status codes of every response in ``out``, in order (the bodies here hold none)."""
    return re.findall(rb"HTTP/1\.1 (\d{3}) ", out)


@pytest.mark.parametrize(
    "bad",
    [
        b"GET /\x00 HTTP/1.1\r\nHost: app.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: app.test\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"\r\r\rGET / HTTP/1.1\r\nHost: app.test\r\n\r\n",
        b"GARBAGE\r\n\r\n",
    ],
    ids=["nul-target", "space-in-name", "no-host", "bare-cr-prefix", "garbage"],
)
@pytest.mark.parametrize("pipelined", [False, True], ids=["after-response", "pipelined"])
async def test_a_malformed_request_after_a_good_one_gets_its_400(rig, bad, pipelined):
    reader, writer = await rig.open()
    if pipelined:
        writer.write(GOOD + bad)
    else:
        writer.write(GOOD)
        head = await asyncio.wait_for(reader.readuntil(b"hello 1"), 10)
        assert head.startswith(b"HTTP/1.1 200 ")
        writer.write(bad)
    out = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    got = responses(out)
    if pipelined:
        assert got[0] == b"200", out
        got = got[1:]
    assert got == [b"400"], out
    assert rig.requests_seen() == 1


@pytest.mark.parametrize("prefix", [b"\r\n", b"\r\n\r\n"], ids=["one-crlf", "two-crlf"])
async def test_empty_lines_before_a_request_line_are_skipped(rig, prefix):
    out = await rig.raw(
        prefix + b"GET /hello HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.1 200 "), out[:100]


@pytest.mark.parametrize(
    "prefix",
    [b"\r", b"\r\r\r", b"\n", b"\r\r\n", b" \r\n"],
    ids=["cr", "crs", "lf", "cr-crlf", "sp"],
)
async def test_anything_but_crlf_before_the_request_line_is_400(rig, prefix):
    out = await rig.raw(prefix + b"GET /hello HTTP/1.1\r\nHost: app.test\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 "), out[:100]
    assert rig.requests_seen() == 0


LEADING_ZEROS = b"0" * 29 + b"79"  # 0x79 = 121


async def test_chunk_size_with_leading_zeros_is_accepted(rig):
    body = bytes(range(121))
    out = await rig.raw(
        b"POST /echo HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n" + LEADING_ZEROS + b"\r\n" + body + b"\r\n"
        b"0000\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]
    assert out.endswith(body)


BAD_BODIES = {
    "overflow": b"10000000000000000\r\n",  # 2^64
    "overflow-zeros": b"000" + b"f" * 17 + b"\r\n",
    "not-hex": b"zz\r\n",
    "bad-terminator": b"3\r\nabcXY",
}


@pytest.mark.parametrize("case", BAD_BODIES, ids=list(BAD_BODIES))
async def test_a_body_known_bad_on_arrival_never_reaches_an_origin(rig, case):
    with capture_logs() as logs:
        out = await rig.raw(
            b"POST /echo HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            + BAD_BODIES[case]
        )
    assert out.startswith(b"HTTP/1.1 400 "), out[:200]
    assert rig.origin.connections == []  # not even a connection was opened
    [access] = [e for e in logs if e["event"] == "access"]
    assert access["status"] == 400 and access["bytes"] == len(out.split(b"\r\n\r\n", 1)[1])


async def test_a_body_gone_bad_after_it_went_upstream_is_400_in_the_access_line(rig):
    reader, writer = await rig.open()
    with capture_logs() as logs:
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n"
        )
        await writer.drain()
        async with asyncio.timeout(10):
            while rig.origin.connections == []:  # accepted: the head is on its way upstream
                await asyncio.sleep(0.01)
        writer.write(b"zz\r\n")
        out = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    assert out.startswith(b"HTTP/1.1 400 "), out[:200]
    [access] = [e for e in logs if e["event"] == "access"]
    assert access["status"] == 400


async def test_a_bare_lf_in_an_unfinished_head_is_400_at_once(rig):
    reader, writer = await rig.open()
    writer.write(b"GET /hello HTTP/1.1\r\nHost: app.test\r\nX: y\n\r\n")  # no CRLFCRLF ever
    out = await asyncio.wait_for(reader.read(-1), 3)  # well before the 10 s header timeout
    writer.close()
    assert out.startswith(b"HTTP/1.1 400 "), out[:100]
    assert rig.requests_seen() == 0


async def test_bytes_after_a_request_that_closes_are_never_read_as_a_request(rig):
    """RFC 9112 6.1: HTTP/1.0 with Transfer-Encoding is answered, then the connection
    closes; what followed it in the same packet is neither forwarded nor answered, and the
    request before it keeps its own response."""
    out = await rig.raw(
        b"POST /echo HTTP/1.0\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\nGET /hello HTTP/1.1\r\nHost: app.test\r\n\r\n"
    )
    assert responses(out) == [b"200"], out
    assert out.endswith(b"abc")
    assert rig.requests_seen() == 1


async def test_an_oversized_pipelined_head_waits_for_the_response_before_it(rig):
    big = b"GET /hello HTTP/1.1\r\nHost: app.test\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
    with capture_logs() as logs:
        out = await rig.raw(GOOD + big)
    assert responses(out) == [b"200", b"431"], out[:300]
    # the refusal gets its access line too (tests/test_refusals_seen.py), after the 200's
    assert [e["status"] for e in logs if e["event"] == "access"] == [200, 431]
    assert rig.requests_seen() == 1
