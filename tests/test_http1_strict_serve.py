"""The two holes the h11 path had (an HTTP/2.0 request line proxied, a bare LF taken as a line
end in the head), through the running proxy on both codecs with raw bytes: what the client gets
and that the origin sees nothing. The codec-level agreement, every form, is in
tests/test_http1_differential.py; this pins what a client of ``serve`` sees."""

from __future__ import annotations

import asyncio

import pytest

from tests.test_edge_requests import GOOD, Rig, responses

# the fixtures, re-exported to this module (``x as x``) so pytest finds them here too
from tests.test_edge_requests import parser as parser
from tests.test_edge_requests import rig as rig

pytestmark = pytest.mark.usefixtures("whole_impl")


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"HTTP/3.0"])
@pytest.mark.parametrize("pipelined", [False, True], ids=["first", "after-a-good-one"])
async def test_a_version_but_1_0_and_1_1_is_505_on_both_codecs(
    rig: Rig, version: bytes, pipelined: bool
) -> None:
    bad = b"GET /hello " + version + b"\r\nHost: app.test\r\n\r\n"
    out = await rig.raw(GOOD + bad if pipelined else bad)
    want = [b"200", b"505"] if pipelined else [b"505"]
    assert responses(out) == want, out
    assert rig.requests_seen() == len(want) - 1  # the 505'd request never reached the origin


@pytest.mark.parametrize(
    "bad",
    [
        b"GET /hello HTTP/1.1\nHost: app.test\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nHost: app.test\nX: 1\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nHost: app.test\r\nX: 1\n\r\n",
        b"GET /hello HTTP/1.1\r\nHost: app.test\r\n\n",
        b"GET /hello HTTP/1.1\nHost: app.test\nX: 1\n\n",
    ],
    ids=["after-request-line", "between-fields", "after-last-field", "empty-line", "all"],
)
async def test_a_bare_lf_in_the_head_is_400_on_both_codecs(rig: Rig, bad: bytes) -> None:
    reader, writer = await rig.open()
    writer.write(bad)
    # no wait for a CRLFCRLF that never comes: the answer is at once, not the header timeout's
    out = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    assert responses(out) == [b"400"], out
    assert rig.requests_seen() == 0
