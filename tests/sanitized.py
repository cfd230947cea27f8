"""Run a test file of the tree against C twins rebuilt under AddressSanitizer and UBSan.

Shared by tests/test_whole_sanitized.py and tests/test_frames_sanitized.py: each names its
modules and the test file that exercises them; the copy of the tree, the instrumented
build, the check that the instrumented build is the one imported, and the reading of the
sanitizer's own report are the same for every twin.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _runtime(name: str) -> str | None:
    """The path gcc links ``name`` from, or None when it has none."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    out = subprocess.run([gcc, f"-print-file-name={name}"], capture_output=True, text=True)
    path = out.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def run_under_sanitizers(tmp_path: Path, modules: Sequence[str], pytest_args: Sequence[str]) -> str:
    """Build ``proxy/<module>.c`` for each module with ``-fsanitize=address,undefined`` into a
    copy of the tree, check those builds are the ones imported, run ``pytest_args`` there
    with the runtimes preloaded and fail with the sanitizer's report; returns pytest's stdout.
    Skips where gcc or its sanitizer runtimes are missing."""
    asan, ubsan = _runtime("libasan.so"), _runtime("libubsan.so")
    if asan is None or ubsan is None:
        pytest.skip("gcc with libasan and libubsan is needed")
    tree = tmp_path / "tree"
    for part in ("proxy", "pool", "tests"):
        shutil.copytree(ROOT / part, tree / part, ignore=shutil.ignore_patterns("*.so"))
    shutil.copy(ROOT / "pyproject.toml", tree)
    include = sysconfig.get_paths()["include"]
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    built = [tree / "proxy" / f"{name}{suffix}" for name in modules]
    for name, target in zip(modules, built, strict=True):
        subprocess.run(
            [
                "gcc", "-O1", "-g", "-fPIC", "-shared", "-fno-omit-frame-pointer",
                "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                f"-I{include}", str(ROOT / "proxy" / f"{name}.c"), "-o", str(target),
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
    check = "import importlib as i; print(*(i.import_module('proxy.' + m).__file__ for m in %r))"
    where = subprocess.run(
        [sys.executable, "-c", check % (tuple(modules),)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.returncode == 0, where.stderr[-3000:]
    assert where.stdout.split() == [str(p) for p in built], (
        "the sanitized builds must be the ones imported"
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
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
    return run.stdout


def traced_growth(run: Callable[[int], None], rounds: int = 20000) -> int:
    """Bytes of traced memory kept after ``run(rounds)``, once warmed by ``run(1000)``
    (caches, interned objects): a reference kept too many, or a buffer never freed, grows."""
    run(1000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        run(rounds)
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
