"""``[routes.health_check]`` and an origin's ``health_check``: every key read, checked and
named in check-config's messages (proxy.config_health)."""

from __future__ import annotations

import re

import pytest

from pool.health_state import HealthCheck
from pool.origin import Origin
from proxy.config import ConfigError, parse

BASE = """
[[listen]]
address = "127.0.0.1:8080"

[[routes]]
host = "a.test"
origins = ["http://127.0.2.1:9000", {url = "http://127.0.2.2:9000", health_check = {rise = 5}}]
"""

O1 = Origin.parse("http://127.0.2.1:9000")
O2 = Origin.parse("http://127.0.2.2:9000")


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value.problems


def test_no_table_means_no_check_except_an_origin_that_asks():
    config = parse(BASE)
    assert config.health_checks == {O2: HealthCheck(rise=5)}


def test_route_table_applies_to_every_origin_and_an_origin_overrides_its_keys():
    config = parse(
        BASE
        + """
[routes.health_check]
type = "http"
interval = 0.5
timeout = 0.25
fall = 2
method = "head"
path = "/healthz?full=1"
expect_status = "200-299"
host = "status.a.test"
passive_fails = 3
"""
    )
    route = HealthCheck(
        type="http",
        interval=0.5,
        timeout=0.25,
        rise=2,
        fall=2,
        method="HEAD",
        path="/healthz?full=1",
        expect_status=(200, 299),
        host="status.a.test",
        passive_fails=3,
    )
    checks = config.health_checks
    assert checks[O1] == route
    assert checks[O2] == HealthCheck(**{**_fields(route), "rise": 5})


def _fields(spec: HealthCheck) -> dict:
    return {name: getattr(spec, name) for name in spec.__dataclass_fields__}


@pytest.mark.parametrize(
    ("table", "key", "words"),
    [
        ('type = "udp"', "type", "'http', 'tcp'"),
        ("interval = 0", "interval", "positive"),
        ('interval = "2s"', "interval", "seconds"),
        ("rise = 0", "rise", "from 1 to 1000"),
        ("fall = 1.5", "fall", "integer"),
        ('type = "http"\nmethod = "POST"', "method", "safe"),
        ('type = "http"\nmethod = "GE T"', "method", "HTTP method"),
        ('type = "http"\npath = "healthz"', "path", "start with '/'"),
        ('type = "http"\nexpect_status = "200-99"', "expect_status", "range"),
        ('type = "http"\nexpect_status = 700', "expect_status", "100-599"),
        ('type = "http"\nhost = "a b"', "host", ""),
        ("passive_fails = -1", "passive_fails", "from 0 to 1000 (0 = off)"),
        ('path = "/healthz"', "path", 'only for type = "http"'),
        ("interval = 1\ntimeout = 2", "timeout", "longer than interval"),
        ("intervall = 1", "intervall", "did you mean 'interval'"),
    ],
)
def test_each_bad_key_is_named(table, key, words):
    found = problems(BASE + "[routes.health_check]\n" + table + "\n")
    assert any(f"routes[0].health_check.{key}:" in p and words in p for p in found), found


def test_an_origin_checked_differently_by_two_routes_is_refused_naming_both():
    found = problems(
        BASE
        + """
[[routes]]
host = "b.test"
origins = ["http://127.0.2.1:9000"]
health_check = {type = "tcp", fall = 9}
"""
    )
    assert any(
        "routes[1].origins[0].health_check" in p and "routes[0].origins[0]" in p for p in found
    ), found


def test_the_same_check_in_two_routes_is_one_check():
    text = """
[[listen]]
address = "127.0.0.1:8080"
[[routes]]
host = "a.test"
origins = ["http://127.0.2.1:9000"]
health_check = {interval = 3}
[[routes]]
host = "b.test"
origins = ["http://127.0.2.1:9000"]
health_check = {interval = 3}
"""
    assert parse(text).health_checks == {O1: HealthCheck(interval=3)}


def test_the_deploy_example_block_parses_uncommented():
    """deploy/originpool.toml's commented health_check block, uncommented, is a valid table
    whose every key is read (none left at its default by a typo)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "deploy" / "originpool.toml").read_text()
    start = text.index("# [routes.health_check]")
    block = []
    for line in text[start:].splitlines():
        if not line.startswith("#"):
            break
        stripped = line[2:]
        if stripped.startswith("[") or re.match(r"[a-z_]+ = ", stripped):
            block.append(stripped)
    table = "\n".join(block)
    config = parse(BASE + table + "\n")
    spec = config.health_checks[O1]
    keys = [line.split("=")[0].strip() for line in block[1:]]
    assert sorted(keys) == sorted(spec.__dataclass_fields__)
    assert spec == HealthCheck(type="http", path="/healthz", host="app.example", passive_fails=5)
