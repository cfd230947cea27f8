"""mypy is part of the test command: the annotations and the ``# type: ignore[code]`` comments
in proxy/ and pool/ are checked, so a wrong annotation or a stale ignore turns CI red.

The configuration is pyproject.toml's ``[tool.mypy]`` (files, ``warn_unused_ignores``, codes
required on every ignore, the modules left out and why). The second test runs that same
configuration on a small module with known faults, so a configuration that stopped checking
(a files list that matched nothing, a flag dropped) fails here too instead of passing empty.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[test]')")


def mypy(*args: str, cache: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """mypy as CI runs it; the cache in the test's own directory, so runs of several
    checkouts or helpers never share (or write into the tree) a .mypy_cache."""
    cmd = [sys.executable, "-m", "mypy", "--cache-dir", str(cache), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=240)


def test_mypy_proxy_and_pool_clean(tmp_path: Path) -> None:
    done = mypy("--config-file", str(ROOT / "pyproject.toml"), cache=tmp_path / "cache")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found" in done.stdout, done.stdout


def test_the_configuration_reports_wrong_types_and_stale_or_bare_ignores(tmp_path: Path) -> None:
    # the same [tool.mypy] table, its files list pointed at one faulty module
    bad = tmp_path / "faulty.py"
    bad.write_text(
        "def f(x: int) -> str:\n"
        "    return x\n"  # return-value
        "y: int = 1  # type: ignore[assignment]\n"  # unused: nothing to ignore
        "z: str = 1  # type: ignore\n"  # no code
    )
    config = (ROOT / "pyproject.toml").read_text()
    config = config.replace('files = ["proxy", "pool"]', f'files = ["{bad}"]', 1)
    assert str(bad) in config, "pyproject.toml's [tool.mypy] files line changed; update here"
    (tmp_path / "pyproject.toml").write_text(config)
    done = mypy(
        "--config-file", str(tmp_path / "pyproject.toml"), cache=tmp_path / "cache", cwd=tmp_path
    )
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert "faulty.py:2: error" in out and "[return-value]" in out, out
    assert 'faulty.py:3: error: Unused "type: ignore" comment' in out, out
    assert "faulty.py:4: error" in out and "[ignore-without-code]" in out, out
