"""Hostile request heads: every input gets a status line or a clean close, never a hang or a
traceback, and the proxy keeps serving the next client."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_proxy_http import make_rig

token = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-!#$%&'*+.^_`|~",
    min_size=1,
    max_size=12,
)
nasty = st.binary(max_size=40)
header_name = st.one_of(
    token,
    st.sampled_from(["Host", "Content-Length", "Transfer-Encoding", "Connection", "Expect"]),
)
header_value = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["app.test", "chunked", "0", "5", "-1", "1e3", "100-continue", "close"]),
    nasty.map(lambda b: b.decode("latin-1")),
)
head = st.builds(
    lambda method, target, version, headers, body, glue: (
        f"{method} {target} {version}{glue}".encode("latin-1", "replace")
        + b"".join(
            n.encode("latin-1", "replace") + b": " + v.encode("latin-1", "replace") + glue.encode()
            for n, v in headers
        )
        + glue.encode()
        + body
    ),
    st.one_of(st.sampled_from(["GET", "POST", "HEAD", "PUT"]), token),
    st.one_of(
        st.sampled_from(["/", "/hello", "/echo", "*", "http://app.test/"]), st.text(max_size=20)
    ),
    st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 ", "http/1.1", ""]),
    st.lists(st.tuples(header_name, header_value), max_size=6),
    nasty,
    st.sampled_from(["\r\n", "\n", "\r\n", "\r"]),
)

STATUS = re.compile(rb"^HTTP/1\.1 (\d{3}) ")


@pytest.fixture
async def rig(ns):
    # each example is a new client connection: give clients a real range, not 128 ports
    ns.set_port_range(20000, 59999)
    r = await make_rig(serve=(("127.0.2.1", 9000),))
    yield r
    r.listener.close()
    await r.proxy.pool.close()
    for s in r.origins:
        await s.close()


async def test_fuzzed_request_heads(rig, caplog):
    caplog.set_level(logging.ERROR, logger="asyncio")
    loop = asyncio.get_running_loop()
    seen: dict[int, int] = {}

    async def one(raw: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(*rig.listener.address)
        writer.write(raw)
        writer.write_eof()
        try:
            return await asyncio.wait_for(reader.read(-1), 5)
        finally:
            writer.close()

    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(head)
    def check(raw: bytes) -> None:
        try:
            out = asyncio.run_coroutine_threadsafe(one(raw), loop).result(20)
        except TimeoutError:
            raise AssertionError(f"no answer and no close for {raw!r}") from None
        if out:
            m = STATUS.match(out)
            assert m, out[:80]
            status = int(m.group(1))
            assert status < 500 or status in (501, 502, 505), (raw, out[:80])
            seen[status] = seen.get(status, 0) + 1

    await asyncio.to_thread(check)
    good = await one(b"GET /hello HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
    assert good.startswith(b"HTTP/1.1 200 ")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert any(400 <= s < 500 for s in seen), seen
