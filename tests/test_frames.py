"""The compiled frame trackers (proxy/_frames.c) against their Python twins (proxy.websocket).

The Python classes are the spec: every stream, cut anywhere, must leave both twins in the
same state after every chunk (at a boundary or not, lost or not, a Close seen, its code).
Streams are built from frames a relay sees (every opcode, 7-, 16- and 64-bit lengths,
masked or not, Close frames with and without a code) and from hostile bytes (random, HTTP
read as frames, a control frame that breaks the rules), then cut at random places.
"""

from __future__ import annotations

import itertools
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import websocket as ws

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("FrameTracker", "ClientFrames", "OriginFrames")

try:  # the module itself, whatever ORIGINPOOL_NO_EXTENSIONS says: the twins are compared
    from proxy import _frames
except ImportError:  # not built (no compiler at install)
    _frames = None

needs_c = pytest.mark.skipif(_frames is None, reason="proxy._frames is not built")


def frame(b0: int, payload: bytes, mask: bytes | None, length_form: int = 0) -> bytes:
    """One frame with first byte ``b0``; ``length_form`` 0 picks the shortest length field,
    16 or 64 forces a longer one (legal, and a tracker must read it too)."""
    n = len(payload)
    bit = 0x80 if mask is not None else 0
    if length_form == 64 or n > 0xFFFF:
        head = bytes([b0, bit | 127]) + struct.pack("!Q", n)
    elif length_form == 16 or n > 125:
        head = bytes([b0, bit | 126]) + struct.pack("!H", n)
    else:
        head = bytes([b0, bit | n])
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["data", "close", "control", "raw"]))
    mask = draw(st.one_of(st.none(), st.binary(min_size=4, max_size=4)))
    if kind == "raw":
        return draw(st.binary(max_size=40))
    if kind == "close":
        code = draw(st.sampled_from([b"", b"\x03\xe8", b"\x0f\xa1reason", b"\x03"]))
        return frame(draw(st.sampled_from([0x88, 0x08])), code, mask)
    if kind == "control":
        size = draw(st.sampled_from([0, 5, 125, 126]))
        return frame(draw(st.sampled_from([0x89, 0x8A, 0x09, 0x8B])), b"p" * size, mask)
    b0 = draw(st.sampled_from([0x81, 0x82, 0x80, 0x01, 0x02, 0x00, 0x83, 0xC1]))
    size = draw(st.sampled_from([0, 1, 64, 125, 126, 4096, 70000]))
    form = draw(st.sampled_from([0, 0, 16, 64]))
    return frame(b0, b"d" * size, mask, form)


def cuts(data: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({p % (len(data) + 1) for p in points})
    edges = [0, *marks, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def state(t: object) -> tuple[object, ...]:
    return (
        t.at_boundary,  # type: ignore[attr-defined]
        t.lost,  # type: ignore[attr-defined]
        t.closed,  # type: ignore[attr-defined]
        t.close_code,  # type: ignore[attr-defined]
        t.masked,  # type: ignore[attr-defined]
    )


def same_states(name: str, chunks: list[bytes]) -> None:
    pure, compiled = ws.PURE[name](), getattr(_frames, name)()
    assert state(compiled) == state(pure)
    for i, chunk in enumerate(chunks):
        assert pure.feed(chunk) is None and compiled.feed(chunk) is None
        assert state(compiled) == state(pure), (name, i, chunks)


@needs_c
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=st.lists(frames(), max_size=8),
    points=st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=12),
    name=st.sampled_from(NAMES),
)
def test_the_twins_agree_on_any_stream_cut_anywhere(
    stream: list[bytes], points: list[int], name: str
) -> None:
    data = b"".join(stream)
    same_states(name, cuts(data, points))


@needs_c
@pytest.mark.parametrize("name", NAMES)
def test_every_byte_at_a_time(name: str) -> None:
    """The slowest path: one byte per feed, through every header form and a Close."""
    mask = b"\x01\x02\x03\x04"
    client = name == "ClientFrames"
    m = mask if client or name == "FrameTracker" else None
    data = (
        frame(0x82, b"x" * 64, m)
        + frame(0x81, b"y" * 300, m, 16)
        + frame(0x82, b"z" * 10, m, 64)
        + frame(0x89, b"ping", m)
        + frame(0x88, b"\x0f\xa0bye", m)
        + frame(0x82, b"after", m)
    )
    same_states(name, [data[i : i + 1] for i in range(len(data))])
    t = getattr(_frames, name)()
    t.feed(data)
    assert t.closed and t.close_code == 4000 and t.at_boundary and not t.lost


@needs_c
def test_hostile_streams_lose_the_same_way() -> None:
    for name in NAMES:
        for data in (
            b"HTTP/1.1 200 OK\r\n\r\n",
            b"\x08\x02\x03\xe8",  # a Close without FIN
            b"\x88\x7e\x00\x7e" + b"\x03\xe8" + b"x" * 124,  # a 126-byte control frame
            b"\x88\x01\x03",  # a 1-byte Close
            os.urandom(512),
        ):
            same_states(name, [data])


@needs_c
def test_other_buffers_and_bad_arguments() -> None:
    t = _frames.ClientFrames()
    t.feed(bytearray(frame(0x82, b"ab", b"kkkk")))
    t.feed(memoryview(frame(0x88, b"\x03\xe9", b"kkkk")))
    assert t.closed and t.close_code == 1001
    with pytest.raises(TypeError):
        t.feed("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _frames.OriginFrames(1)


@needs_c
def test_a_compiled_tracker_is_smaller() -> None:
    """What an idle session pins: two trackers each."""
    assert sys.getsizeof(_frames.ClientFrames()) < sys.getsizeof(ws.PURE["ClientFrames"]())


def test_the_compiled_trackers_serve_when_built() -> None:
    expected = _frames is not None and not os.environ.get("ORIGINPOOL_NO_EXTENSIONS")
    assert expected is ws.COMPILED


def test_the_switch_selects_the_pure_trackers() -> None:
    code = "from proxy import websocket as w; print(w.COMPILED, w.ClientFrames.__module__)"
    env = {**os.environ, "ORIGINPOOL_NO_EXTENSIONS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "proxy.websocket"]
