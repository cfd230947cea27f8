"""The C twins under AddressSanitizer and UndefinedBehaviorSanitizer, and without leaks.

Hand-written C that parses bytes from the network is where a proxy gets its memory bugs:
an off-by-one past a buffer, a reference dropped twice or never. The differential tests
only see results; these see the memory. The modules are compiled again with
``-fsanitize=address,undefined`` (undefined behaviour aborts), a copy of the tree gets those
builds, and ``tests/test_whole.py`` runs there with the sanitizer runtime preloaded: every
input it generates (hostile heads, every byte at every position) goes through the
instrumented code. Skipped where gcc or its sanitizer runtimes are missing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from proxy import headers, whole
from tests.sanitized import run_under_sanitizers, traced_growth

MODULES = ("_whole", "_headers")


def test_the_c_twins_pass_their_tests_under_asan_and_ubsan(tmp_path: Path) -> None:
    # the C functions' tests; the build-switch test compiles its own copy, not these
    run_under_sanitizers(tmp_path, MODULES, ["tests/test_whole.py", "-k", "not failed_compile"])


CASES = [
    ("parse_request", (b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", 8192)),
    ("parse_request", (b"GET /a HTTP/1.1\r\nHost: h\r\nExpect: x\r\n\r\n", 8192)),  # None
    ("parse_response", (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: y\r\n\r\nhi", False)),
    ("parse_response", (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", False)),
    ("request_head", (b"GET", b"/", [(b"X", b"1"), (b"Host", b"h")])),
    ("request_head", (b"GET", b"/", [(b"Host", b"h"), (b"Upgrade", b"x")])),  # None
    ("response_head", (200, b"OK", [(b"a", b"b"), (b"c", b"d")])),
]


@pytest.mark.skipif(not (whole.COMPILED and headers.COMPILED), reason="the C twins are not built")
def test_the_c_twins_leak_nothing() -> None:
    """20,000 calls of each function, results dropped: a reference kept too many (or a
    buffer never freed) shows as traced memory that keeps growing."""
    from proxy import _headers, _whole

    calls = [(getattr(_whole, name), args) for name, args in CASES]
    hs = [(b"connection", b"x-a, keep-alive"), (b"x-a", b"1"), (b"via", b"1.0 a"), (b"s", b"v")]
    calls.append((lambda: _headers.to_client(hs, True), ()))
    calls.append(
        (
            lambda: _headers.to_origin(
                hs, client_ip=b"1.2.3.4", scheme=b"http", trusted_peer=True, host=b"h",
                request_id=b"r", websocket=True,
            ),
            (),
        )
    )  # fmt: skip
    calls.append((lambda: _headers.to_client([("str", b"v")]), ()))  # the TypeError path

    def run(rounds: int) -> None:
        for fn, args in calls:
            for _ in range(rounds):
                with contextlib.suppress(TypeError):
                    fn(*args)

    grown = traced_growth(run)
    assert grown < 64 * 1024, f"{grown} bytes kept after {20000 * len(calls)} calls"
