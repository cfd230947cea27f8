"""The release as an operator installs it (issue 18): ``python -m build`` makes the sdist and
the wheel from a clean copy of the tree, a fresh venv installs the wheel, and from a
directory that is not the checkout the installed ``originpool`` prints its version, checks
the shipped sample config, serves a request with its compiled accelerator and runs a small
testbed. An editable install cannot show any of it: it reads the checkout, so a module or a
data file missing from the wheel, or a C twin not compiled into it, would pass every other
test.

pip needs the package index for the dependencies. Where it cannot reach it (a laptop
offline), the build and install tests skip and say why; CI reaches it, so there they run.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from pathlib import Path

import httpx
import pytest

import pool
from pool import netns

# the first test to need the wheel pays for the build and for pip fetching every dependency
# (numpy and matplotlib among them) over the CI's network: more than the suite's 300 s may go
pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VERSION = PROJECT["version"]
# the C twins setup.py compiles: every proxy/_*.c must be in the sdist and built into the wheel
C_TWINS = sorted(p.stem for p in (ROOT / "proxy").glob("_*.c"))
# the top-level packages a release ships: every one in the tree but these, which only a
# checkout uses, so a package added to the tree and not to pyproject.toml's list fails here
DEV_ONLY = {"tests", "bench"}
SHIPPED = sorted(
    p.name for p in ROOT.iterdir() if (p / "__init__.py").exists() and p.name not in DEV_ONLY
)
# what a checkout holds that a release build must never see: a stale egg-info's SOURCES.txt
# feeds the sdist, and an in-place .so would hide a wheel that failed to compile its own
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.so",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
)

SERVE_CONFIG = """
[listen]
address = "127.0.0.1:8080"
[admin]
address = "127.0.0.1:9090"
[egress]
mode = "connectx"
addresses = ["127.0.1.1", "127.0.1.2"]
[[routes]]
host = "app.example"
path_prefix = "/"
origins = ["http://127.0.2.1:9000", "http://127.0.2.2:9000"]
[timeouts]
drain = 5
[log]
format = "json"
"""


def _run(cmd: list[str], timeout: float, **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def _output(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"


def _operator_env() -> dict[str, str]:
    """The environment of a shell that never saw the checkout: nothing on PYTHONPATH, no user
    site-packages, so only the venv's own packages can be imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


# -- what the release carries, without building it -------------------------------------------


def test_license_changelog_and_versions_agree() -> None:
    """One version everywhere an operator or pip reads it, and the licence text the metadata
    names."""
    assert PROJECT["license"] == "MIT"
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License\n")
    assert "Copyright (c) 2026 The originpool authors" in license_text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in license_text
    assert pool.__version__ == VERSION
    changelog = (ROOT / "CHANGELOG.md").read_text()
    entries = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?$", changelog, re.M)
    assert entries[0] == ("Unreleased", ""), "Keep a Changelog: Unreleased comes first"
    assert entries[1][0] == VERSION, f"the newest release in CHANGELOG.md is not {VERSION}"
    assert entries[1][1], "a released entry carries its date"


def test_version_from_a_checkout_without_metadata_says_so(monkeypatch, capsys) -> None:
    """``python -m proxy.cli`` from a checkout nobody installed has no metadata to read."""
    import importlib.metadata

    from proxy import cli

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"originpool {VERSION} (not installed)\n"


# -- build and install -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sdist and wheel, built as a release is: ``python -m build`` (isolated: it fetches
    setuptools itself) on a copy of the tree without the checkout's build debris, a failed
    compile an error rather than a wheel of pure-Python twins."""
    top = tmp_path_factory.mktemp("release")
    probe = _run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(top / "probe"), "h11"],
        timeout=180,
    )
    if probe.returncode != 0:
        pytest.skip(f"pip cannot reach the package index (it must, in CI):\n{_output(probe)}")
    source = top / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    out = top / "dist"
    built = _run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(source)],
        timeout=600,
        env={**os.environ, "ORIGINPOOL_REQUIRE_EXTENSIONS": "1"},  # as README builds a release
    )
    assert built.returncode == 0, _output(built)
    return out


def _pip_install(venv: Path, requirement: str) -> None:
    installed = _run(
        [str(venv / "bin" / "pip"), "install", requirement], timeout=600, env=_operator_env()
    )
    assert installed.returncode == 0, _output(installed)


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed, as ``pip install dist/originpool-*.whl``: what
    an operator who only runs the proxy installs."""
    path = tmp_path_factory.mktemp("venv") / "venv"
    made = _run([sys.executable, "-m", "venv", str(path)], timeout=120)
    assert made.returncode == 0, _output(made)
    (wheel,) = dist.glob("originpool-*.whl")
    _pip_install(path, str(wheel))
    return path


@pytest.fixture(scope="module")
def testbed_venv(venv: Path, dist: Path) -> Path:
    """The same venv with the wheel's ``testbed`` extra added (rich and matplotlib), as
    ``pip install 'dist/originpool-*.whl[testbed]'``: the proxy alone does not need them."""
    (wheel,) = dist.glob("originpool-*.whl")
    _pip_install(venv, f"{wheel}[testbed]")
    return venv


def test_sdist_carries_the_sources_the_tests_and_the_deploy_files(dist: Path) -> None:
    (sdist,) = dist.glob("originpool-*.tar.gz")
    top = f"originpool-{VERSION}/"
    with tarfile.open(sdist) as tar:
        names = {n.removeprefix(top) for n in tar.getnames()}
    needed = {
        "pyproject.toml",
        "setup.py",
        "MANIFEST.in",
        "README.md",
        "LICENSE",
        "CHANGELOG.md",
        "proxy/_http_tokens.h",
        "deploy/originpool.toml",
        *(f"proxy/{name}.c" for name in C_TWINS),
        *(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("*.py")),
    }
    assert needed <= names, sorted(needed - names)
    assert not [n for n in names if n.endswith((".so", ".pyc"))]


def test_wheel_carries_the_compiled_twins_and_every_module(dist: Path) -> None:
    (wheel,) = dist.glob("originpool-*.whl")
    assert re.fullmatch(
        rf"originpool-{re.escape(VERSION)}-cp3\d+-cp3\d+-linux_\w+\.whl", wheel.name
    )
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(f"originpool-{VERSION}.dist-info/METADATA").decode()
    for name in C_TWINS:
        assert [n for n in names if re.fullmatch(rf"proxy/{name}\.cpython-\S+\.so", n)], name
    assert not [n for n in names if n.endswith((".c", ".h"))], "sources belong in the sdist"
    assert {"pool", "proxy"} <= set(SHIPPED)
    modules = {str(p.relative_to(ROOT)) for d in SHIPPED for p in (ROOT / d).rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert f"originpool-{VERSION}.dist-info/licenses/LICENSE" in names
    assert "License-Expression: MIT" in metadata.splitlines()
    assert f"Version: {VERSION}" in metadata.splitlines()


# -- the installed release, run from elsewhere -----------------------------------------------


def test_installed_version_comes_from_the_package_metadata(venv: Path, tmp_path: Path) -> None:
    env, python = _operator_env(), str(venv / "bin" / "python")
    where = _run(
        [
            python,
            "-c",
            f"import {', '.join(SHIPPED)}\nfor m in [{', '.join(SHIPPED)}]: print(m.__file__)",
        ],
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert where.returncode == 0, _output(where)
    paths = where.stdout.split()
    assert len(paths) == len(SHIPPED), _output(where)
    for path in paths:
        assert Path(path).is_relative_to(venv), f"imported from the checkout: {path}"
    shown = _run([str(venv / "bin" / "originpool"), "--version"], 60, cwd=tmp_path, env=env)
    assert shown.returncode == 0, _output(shown)
    metadata = _run(
        [python, "-c", "import importlib.metadata as m; print(m.version('originpool'))"],
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert metadata.stdout.strip() == VERSION
    assert shown.stdout == f"originpool {VERSION}\n"


def _wait_for_line(log: Path, proc: subprocess.Popen, event: str, timeout: float = 30) -> dict:
    """The first JSON log line with this event, read from the file the proxy writes."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for raw in log.read_text().splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if line.get("event") == event:
                return line
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no {event!r} line (exit {proc.poll()}):\n{log.read_text()[-4000:]}")


async def test_installed_proxy_serves_with_the_compiled_accelerator(venv, origins, tmp_path):
    """check-config on the shipped sample and on its own config, then ``serve``: a request
    reaches an origin through it, and SIGTERM (by PID) ends it with exit 0."""
    env, originpool = _operator_env(), str(venv / "bin" / "originpool")
    shipped = str(ROOT / "deploy" / "originpool.toml")
    sample = _run([originpool, "check-config", shipped], 60, cwd=tmp_path, env=env)
    assert sample.returncode == 0, _output(sample)
    config = tmp_path / "originpool.toml"
    config.write_text(SERVE_CONFIG)
    checked = _run([originpool, "check-config", str(config)], 60, cwd=tmp_path, env=env)
    assert checked.returncode == 0 and ": ok (" in checked.stdout, _output(checked)
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [originpool, "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=env,
        )
    try:
        ready = await asyncio.to_thread(_wait_for_line, log, proc, "ready")
        assert ready["accelerator"] == "compiled", ready
        async with httpx.AsyncClient(headers={"host": "app.example"}) as client:
            r = await client.get("http://127.0.0.1:8080/hello")
        assert r.status_code == 200 and r.text.startswith("hello"), r
        assert any(s.connections for s in origins)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            code = await asyncio.to_thread(proc.wait, 20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise
    assert code == 0, log.read_text()[-4000:]


def test_installed_testbed_runs_from_an_unrelated_directory(
    testbed_venv: Path, tmp_path: Path
) -> None:
    """The smallest ramp that still reaches the wall: E=2, K=2, R=100, so connectx holds 400
    of 450 attempts and refuses the rest with the kernel's EADDRNOTAVAIL; its plot too, so
    the dependencies the wheel declares are the ones the testbed needs."""
    reason = netns.can_create()
    if reason:
        pytest.skip(reason)
    figures, plot = tmp_path / "testbed.json", tmp_path / "testbed.png"
    run = _run(
        [
            str(testbed_venv / "bin" / "originpool"),
            "testbed",
            *("--mode", "connectx", "--egress", "2", "--origins", "2"),
            *("--port-range", "40000-40099", "--sessions", "450", "--hold", "1"),
            *("--progress", "json", "--json", str(figures), "--plot", str(plot)),
        ],
        timeout=120,
        cwd=tmp_path,
        env=_operator_env(),
    )
    assert run.returncode == 0, _output(run)
    (connectx,) = json.loads(figures.read_text())["runs"]
    assert (connectx["limit"], connectx["attempted"]) == (400, 450)
    assert connectx["held"] >= 0.995 * 400 and connectx["lost"] == 0
    assert connectx["failures_before_limit"] == 0
    assert "EADDRNOTAVAIL" in connectx["first_error"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # matplotlib came with the extra
