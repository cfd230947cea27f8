"""What the proxy's HTTP/2 responses cost on the wire, frame by frame.

Why: every frame is a pass through h2's state machine and hyperframe on the proxy and on
the client; a response whose body is all in hand ends with END_STREAM on its last DATA
frame, not with an empty DATA frame more (README, "HTTP/2": what paid).
"""

from __future__ import annotations

import pytest
from hyperframe.frame import DataFrame, HeadersFrame

from tests.test_http2 import Rig, close_rig, make_rig
from tests.test_http2_hardening import Raw


@pytest.fixture
async def rig(ns):  # type: ignore[no-untyped-def]
    r = await make_rig()
    yield r
    await close_rig(r)


async def test_a_whole_response_ends_on_its_last_data_frame(rig: Rig) -> None:
    raw = await Raw.open(rig.port)
    raw.send(raw.headers(1, "/hello"), raw.headers(3, "/hello"))

    def done(r: Raw) -> bool:
        ends = [f for f in r.frames if f.stream_id in (1, 3) and "END_STREAM" in f.flags]
        return len(ends) == 2

    await raw.until(done)
    for sid in (1, 3):
        frames = [f for f in raw.frames if f.stream_id == sid]
        assert [type(f) for f in frames] == [HeadersFrame, DataFrame], frames
        assert frames[1].data and "END_STREAM" in frames[1].flags
    raw.close()
