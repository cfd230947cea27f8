"""The testbed's packages are an extra (``originpool[testbed]``): the proxy imports and serves
without rich and matplotlib, and ``originpool testbed`` without them says what to install.

Both are blocked the way a machine without them looks to Python: a ``sitecustomize`` on
PYTHONPATH puts a meta path finder in front that refuses them, in the test's processes and
in every process they start (the proxy's workers included).
"""

from __future__ import annotations

import asyncio
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx

import pool
import proxy
from tests.test_serve import Proc, write_config

ROOT = Path(__file__).resolve().parent.parent
BLOCKED = ("rich", "matplotlib")

SITECUSTOMIZE = textwrap.dedent(
    """
    import importlib.abc
    import sys

    BLOCKED = {blocked!r}


    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
            return None


    sys.meta_path.insert(0, Blocker())
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    """
).format(blocked=BLOCKED)


def blocked_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(site), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path}


def every_module() -> list[str]:
    names = []
    for package in (proxy, pool):
        prefix = package.__name__ + "."
        names += [m.name for m in pkgutil.walk_packages(package.__path__, prefix)]
    return sorted(names)


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
        timeout=120,
    )


def test_the_block_works(tmp_path):
    """Without this the other tests would prove nothing: the packages are installed here."""
    env = blocked_env(tmp_path)
    for name in BLOCKED:
        done = run_python(f"import {name}", env)
        assert done.returncode != 0 and "blocked by the test" in done.stderr, done.stderr
    assert run_python("import rich, matplotlib", {}).returncode == 0


def test_every_proxy_and_pool_module_imports_without_the_testbed_extra(tmp_path):
    modules = every_module()
    assert "proxy.cli" in modules and "pool.connectx" in modules
    code = textwrap.dedent(
        f"""
        import importlib, sys
        for name in {modules!r}:
            importlib.import_module(name)
        import proxy.cli
        proxy.cli.build_parser()  # the testbed subcommand's options, without the extra
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
        assert not leaked, leaked
        print("ok", len({modules!r}))
        """
    )
    done = run_python(code, blocked_env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok ")


def test_originpool_testbed_without_the_extra_names_it(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "testbed", "--scenario", "storm"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **blocked_env(tmp_path)},
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "originpool[testbed]" in done.stderr
    assert done.stdout == ""  # nothing started


async def test_the_proxy_serves_without_the_testbed_extra(origins, tmp_path):
    proc = Proc(write_config(tmp_path), env=blocked_env(tmp_path))
    try:
        await asyncio.to_thread(proc.wait_for, "ready")
        async with httpx.AsyncClient(headers={"host": "app.example"}) as client:
            for _ in range(4):
                r = await client.get("http://127.0.0.1:8080/hello")
                assert r.status_code == 200
    finally:
        code = await asyncio.to_thread(proc.stop)
    assert code == 0


def test_the_packages_are_in_the_testbed_extra_and_the_test_extra_not_the_core():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {r.split(">")[0].split("=")[0].split(";")[0].strip() for r in requirements}

    extras = project["optional-dependencies"]
    assert set(BLOCKED) <= names(extras["testbed"])
    assert names(extras["testbed"]) <= names(extras["test"])  # the README's test command
    assert not set(BLOCKED) & names(project["dependencies"])


def test_without_the_testbed_package_the_proxy_cli_works_and_testbed_says_why(tmp_path):
    """An install that left testbed/ out (or a venv made before it moved there): every other
    command still parses and runs; ``originpool testbed`` names what to install."""
    env = blocked_env(tmp_path)
    site = tmp_path / "site" / "sitecustomize.py"
    site.write_text(site.read_text().replace(repr(BLOCKED), repr((*BLOCKED, "testbed"))))
    check = run_python("import proxy.cli; proxy.cli.build_parser(); import testbed", env)
    assert "No module named 'testbed'" in check.stderr  # the block holds
    assert "build_parser" not in check.stderr  # and the parser was built before it
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "testbed"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "originpool[testbed]" in done.stderr, done.stderr
    version = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "--version"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=60,
    )  # fmt: skip
    assert version.returncode == 0 and version.stdout.startswith("originpool "), version.stderr
