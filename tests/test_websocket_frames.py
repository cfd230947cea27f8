"""The frame-boundary tracker against frames wsproto builds (no network)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from wsproto.frame_protocol import CloseReason, FrameProtocol, Opcode

from proxy.websocket import FrameTracker, close_frame, is_upgrade


def frames(client: bool, messages: list[bytes], close: int | None) -> list[bytes]:
    proto = FrameProtocol(client=client, extensions=[])
    out = [proto.send_data(m, fin=True) for m in messages]
    if close is not None:
        out.append(proto.close(code=close, reason="bye"))
    return out


@given(
    client=st.booleans(),
    messages=st.lists(st.binary(max_size=70_000), max_size=5),
    close=st.sampled_from([None, 1000, 1001, 1011]),
    cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=20),
)
def test_tracker_follows_boundaries_however_the_bytes_are_split(client, messages, close, cuts):
    chunks = frames(client, messages, close)
    stream = b"".join(chunks)
    tracker = FrameTracker()
    boundaries = set()
    total = 0
    for c in chunks:
        total += len(c)
        boundaries.add(total)
    pos = 0
    for cut in [*cuts, len(stream)]:
        piece = stream[pos : pos + cut]
        tracker.feed(piece)
        pos += len(piece)
        assert tracker.at_boundary == (pos in boundaries or pos == 0)
        if pos >= len(stream):
            break
    tracker.feed(stream[pos:])
    assert tracker.at_boundary
    assert tracker.closed == (close is not None)
    if close is not None:
        assert tracker.close_code == close


def test_close_frames_are_masked_toward_the_origin_only():
    to_client = close_frame(CloseReason.INTERNAL_ERROR, "origin failed", to_origin=False)
    to_origin = close_frame(CloseReason.GOING_AWAY, "bye", to_origin=True)
    assert to_client[0] == 0x80 | Opcode.CLOSE and not to_client[1] & 0x80
    assert to_origin[1] & 0x80
    t = FrameTracker()
    t.feed(to_origin)
    assert t.closed and t.close_code == 1001


def test_upgrade_detection():
    h = [(b"upgrade", b"websocket"), (b"connection", b"keep-alive, Upgrade")]
    assert is_upgrade(h)  # any method: check_request refuses a POST (400), never relayed
    assert not is_upgrade([(b"upgrade", b"websockets"), (b"connection", b"upgrade")])
    assert not is_upgrade([(b"upgrade", b"websocket")])
