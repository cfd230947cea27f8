"""proxy/_frames.c under AddressSanitizer and UndefinedBehaviorSanitizer, and without leaks.

The frame tracker reads header bytes at offsets the stream itself decides (a 64-bit length,
a mask after it, a header split over any number of reads): the place for a read past a
buffer or a signed overflow. As tests/test_whole_sanitized.py does for the other twins, the
module is compiled again with ``-fsanitize=address,undefined``, a copy of the tree gets the
build, and tests/test_frames.py runs there with the sanitizer runtimes preloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tracemalloc
from pathlib import Path

import pytest

from proxy import websocket as ws

ROOT = Path(__file__).resolve().parent.parent


def _runtime(name: str) -> str | None:
    """The path gcc links ``name`` from, or None when it has none."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    out = subprocess.run([gcc, f"-print-file-name={name}"], capture_output=True, text=True)
    path = out.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def test_the_tracker_passes_its_tests_under_asan_and_ubsan(tmp_path: Path) -> None:
    asan, ubsan = _runtime("libasan.so"), _runtime("libubsan.so")
    if asan is None or ubsan is None:
        pytest.skip("gcc with libasan and libubsan is needed")
    tree = tmp_path / "tree"
    for part in ("proxy", "pool", "tests"):
        shutil.copytree(ROOT / part, tree / part, ignore=shutil.ignore_patterns("*.so"))
    shutil.copy(ROOT / "pyproject.toml", tree)
    include = sysconfig.get_paths()["include"]
    target = tree / "proxy" / f"_frames{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run(
        [
            "gcc", "-O1", "-g", "-fPIC", "-shared", "-fno-omit-frame-pointer",
            "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
            f"-I{include}", str(ROOT / "proxy" / "_frames.c"), "-o", str(target),
        ],
        check=True,
    )  # fmt: skip
    env = {
        **os.environ,
        "LD_PRELOAD": f"{asan} {ubsan}",
        "PYTHONMALLOC": "malloc",  # bytes objects from malloc, where ASan sees their bounds
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
        "UBSAN_OPTIONS": "print_stacktrace=1",
    }
    env.pop("ORIGINPOOL_NO_EXTENSIONS", None)
    check = "import proxy._frames as f; print(f.__file__)"
    where = subprocess.run(
        [sys.executable, "-c", check], cwd=tree, env=env, capture_output=True, text=True
    )
    assert where.returncode == 0, where.stderr[-3000:]
    assert where.stdout.strip() == str(target), "the sanitized build must be the one imported"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_frames.py"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = run.stderr
    for marker in ("ERROR: AddressSanitizer", "runtime error:"):
        if marker in report:
            report = report[report.index(marker) :]
            break
    assert run.returncode == 0, run.stdout[-3000:] + report[:3000]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-500:]


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

    run(1000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        run(20000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes kept"
