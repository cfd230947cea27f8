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
import os
import shutil
import subprocess
import sys
import sysconfig
import tracemalloc
from pathlib import Path

import pytest

from proxy import headers, whole

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("_whole", "_headers")


def _runtime(name: str) -> str | None:
    """The path gcc links ``name`` from, or None when it has none."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    out = subprocess.run([gcc, f"-print-file-name={name}"], capture_output=True, text=True)
    path = out.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def test_the_c_twins_pass_their_tests_under_asan_and_ubsan(tmp_path: Path) -> None:
    asan, ubsan = _runtime("libasan.so"), _runtime("libubsan.so")
    if asan is None or ubsan is None:
        pytest.skip("gcc with libasan and libubsan is needed")
    tree = tmp_path / "tree"
    for part in ("proxy", "pool", "tests"):
        shutil.copytree(ROOT / part, tree / part, ignore=shutil.ignore_patterns("*.so"))
    shutil.copy(ROOT / "pyproject.toml", tree)
    include = sysconfig.get_paths()["include"]
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    for name in MODULES:
        subprocess.run(
            [
                "gcc", "-O1", "-g", "-fPIC", "-shared", "-fno-omit-frame-pointer",
                "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                f"-I{include}", str(ROOT / "proxy" / f"{name}.c"),
                "-o", str(tree / "proxy" / f"{name}{suffix}"),
            ],
            check=True,
        )  # fmt: skip
    env = {
        **os.environ,
        "LD_PRELOAD": f"{asan} {ubsan}",
        "PYTHONMALLOC": "malloc",  # bytes objects from malloc, where ASan sees their bounds
        # CPython's own allocations are not leaks to report here; memory errors abort
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
        "UBSAN_OPTIONS": "print_stacktrace=1",
    }
    env.pop("ORIGINPOOL_NO_EXTENSIONS", None)
    check = "import proxy._whole as w, proxy._headers as h; print(w.__file__, h.__file__)"
    where = subprocess.run(
        [sys.executable, "-c", check], cwd=tree, env=env, capture_output=True, text=True
    )
    assert where.returncode == 0, where.stderr[-3000:]
    assert where.stdout.split() == [str(tree / "proxy" / f"{name}{suffix}") for name in MODULES], (
        "the sanitized builds must be the ones imported"
    )
    run = subprocess.run(
        # the C functions' tests; the build-switch test compiles its own copy, not these
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_whole.py",
            "-k",
            "not failed_compile",
        ],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = run.stderr
    for marker in ("ERROR: AddressSanitizer", "runtime error:"):
        if marker in report:  # the sanitizer's own report, not the crash traceback after it
            report = report[report.index(marker) :]
            break
    assert run.returncode == 0, run.stdout[-3000:] + report[:3000]


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

    run(1000)  # warm: caches, interned objects
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        run(20000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes kept after {20000 * len(calls)} calls"
