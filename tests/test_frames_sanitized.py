"""proxy/_frames.c under AddressSanitizer and UndefinedBehaviorSanitizer, and without leaks.

The frame tracker reads header bytes at offsets the stream itself decides (a 64-bit length,
a mask after it, a header split over any number of reads): the place for a read past a
buffer or a signed overflow. As tests/test_whole_sanitized.py does for the other twins, the
module is compiled again with ``-fsanitize=address,undefined``, a copy of the tree gets the
build, and tests/test_frames.py runs there with the sanitizer runtimes preloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import websocket as ws
from tests.sanitized import run_under_sanitizers, traced_growth


def test_the_tracker_passes_its_tests_under_asan_and_ubsan(tmp_path: Path) -> None:
    out = run_under_sanitizers(tmp_path, ["_frames"], ["tests/test_frames.py"])
    assert " passed" in out and "skipped" not in out, out[-500:]


@pytest.mark.skipif(not ws.COMPILED, reason="proxy._frames is not built")
def test_the_tracker_leaks_nothing() -> None:
    """Trackers made, fed and dropped 20,000 times: memory kept shows as traced growth."""
    close = b"\x88\x82abcd" + bytes(c ^ m for c, m in zip(b"\x03\xe8", b"ab", strict=True))
    data = b"\x82\x7e\x01\x00abcd" + b"x" * 256 + close

    def run(rounds: int) -> None:
        for _ in range(rounds):
            t = ws.ClientFrames()
            t.feed(data)
            t.feed(bytearray(data))
            _ = (t.at_boundary, t.lost, t.closed, t.close_code, t.masked)

    grown = traced_growth(run)
    assert grown < 64 * 1024, f"{grown} bytes kept"
