"""``[routes.headers]``: header rules and strip_prefix, compiled at load and applied by a
real ``originpool serve`` between a raw client and a real origin; names the proxy alone
decides refused by ``check-config`` naming the key."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.header_rules import FORBIDDEN, KEYS, HeaderRules, RuleError, compile_rules
from tests.test_serve import Proc

ROOT = Path(__file__).resolve().parent.parent


class Facts:
    request_id = b"0123abcd"
    host = "app.example"


# -- compiled rules, no I/O -------------------------------------------------------------------


def test_remove_then_set_then_add_in_that_order_variables_expanded():
    rules = compile_rules(
        {
            "request_remove": ["X-Secret"],
            "request_set": {"X-Env": "prod", "User-Agent": "edge for $remote_addr"},
            "request_add": {"X-Req": "${request_id}@$host", "X-Env": "extra"},
        }
    )
    assert rules is not None
    headers = [
        (b"host", b"app.example"),
        (b"x-secret", b"s"),
        (b"user-agent", b"curl"),
        (b"x-env", b"client's"),
        (b"x-secret", b"again"),
    ]
    rules.to_origin(headers, b"192.0.2.7", Facts())
    assert headers == [
        (b"host", b"app.example"),
        (b"x-env", b"prod"),
        (b"user-agent", b"edge for 192.0.2.7"),
        (b"x-req", b"0123abcd@app.example"),
        (b"x-env", b"extra"),
    ]


def test_a_route_without_rules_compiles_to_none():
    assert compile_rules({}) is None
    assert compile_rules({"request_set": {}, "response_remove": []}) is None


@pytest.mark.parametrize(
    ("prefix", "path", "target"),
    [
        ("/api", "/api/items?x=1", "/items?x=1"),
        ("/api", "/api", "/"),
        ("/api", "/api?x=1", "/?x=1"),
        ("/api", "/apix/y", "/apix/y"),  # another segment: not under /api
        ("/api", "/other", "/other"),
        ("/api/", "/api/v1", "/v1"),
        ("/api/v1", "/api/v1/users/7", "/users/7"),
    ],
)
def test_strip_prefix_at_a_segment_boundary(prefix, path, target):
    rules = compile_rules({"strip_prefix": prefix})
    assert isinstance(rules, HeaderRules)
    assert rules.target(path) == target


@pytest.mark.parametrize("name", sorted(n.decode() for n in FORBIDDEN))
def test_every_framing_and_hop_by_hop_name_is_refused(name):
    for key in ("request_set", "request_add", "response_set", "response_add"):
        with pytest.raises(RuleError) as e:
            compile_rules({key: {name.title(): "x"}})
        assert e.value.key == f"{key}.{name.title()}"
    with pytest.raises(RuleError) as e:
        compile_rules({"response_remove": ["ok", name]})
    assert e.value.key == "response_remove[1]"


@pytest.mark.parametrize(
    ("table", "key", "words"),
    [
        ({"request_set": {"X-A": "$uri"}}, "request_set.X-A", "unknown variable $uri"),
        ({"request_set": {"X-A": "a\r\nb"}}, "request_set.X-A", "CR, LF"),
        ({"request_set": {"X A": "v"}}, "request_set.X A", "not a header field name"),
        ({"request_set": {"X-A": 1}}, "request_set.X-A", "must be a string"),
        ({"request_remove": "X-A"}, "request_remove", "must be an array"),
        ({"strip_prefix": "api"}, "strip_prefix", "path prefix"),
        ({"request_sett": {}}, "request_sett", "unknown key"),
    ],
)
def test_bad_rules_name_their_key(table, key, words):
    with pytest.raises(RuleError) as e:
        compile_rules(table)
    assert e.value.key == key and words in e.value.reason


# -- check-config -----------------------------------------------------------------------------

BASE = """
[listen]
address = "127.0.0.1:8080"
[admin]
address = "127.0.0.1:9090"
[egress]
addresses = ["127.0.1.1"]
[[routes]]
host = "app.example"
origins = ["http://127.0.2.1:9000"]
"""


def test_check_config_refuses_a_rule_naming_transfer_encoding(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(
        BASE + '[routes.headers]\nrequest_set = {"X-Ok" = "1", "Transfer-Encoding" = "chunked"}\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stdout
    assert f"{path}: routes[0].headers.request_set.Transfer-Encoding: " in proc.stderr
    assert "the proxy's to decide" in proc.stderr


# -- a real serve, a real origin ------------------------------------------------------------

RULES = """
[routes.headers]
request_remove = ["X-Secret"]
request_set = {"X-Env" = "prod", "User-Agent" = "edge for $remote_addr"}
request_add = {"X-Req" = "$request_id for $host"}
response_set = {"X-Frame-Options" = "DENY"}
response_add = {"X-Served-By" = "${host}-edge"}
response_remove = ["Via"]
strip_prefix = "/api"
"""


async def fetch(request: bytes) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", 8080)
    writer.write(request)
    raw = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split(b" ")[1]), fields, body


def fields_of(headers: list[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        out.setdefault(name.lower(), []).append(value)
    return out


async def test_serve_applies_rules_both_ways_and_strips_the_prefix(origins, tmp_path):
    path = tmp_path / "originpool.toml"
    path.write_text(BASE + RULES + f'[proxy]\npid_file = "{tmp_path}/p.pid"\n')
    proc = Proc(path)
    try:
        await asyncio.to_thread(proc.wait_for, "ready")
        status, got, body = await fetch(
            b"GET /api/items?x=1 HTTP/1.1\r\nHost: app.example\r\nUser-Agent: curl/8\r\n"
            b"X-Secret: s3cret\r\nX-Env: client\r\nConnection: close\r\n\r\n"
        )
        assert status == 200 and body == b"hello 1"
        assert origins[0].connections[-1].requests == ["/items?x=1"]
        seen = fields_of(origins[0].last_headers)
        assert b"x-secret" not in seen
        assert seen[b"x-env"] == [b"prod"]
        assert seen[b"user-agent"] == [b"edge for 127.0.0.1"]
        assert seen[b"x-req"] == [seen[b"x-request-id"][0] + b" for app.example"]
        assert seen[b"host"] == [b"app.example"]  # the proxy's own fields untouched
        assert got[b"x-frame-options"] == [b"DENY"]
        assert got[b"x-served-by"] == [b"app.example-edge"]
        assert b"via" not in got
        line = await asyncio.to_thread(proc.wait_for, "access")
        assert line["path"] == "/api/items?x=1"  # the access line keeps what the client asked
    finally:
        code = await asyncio.to_thread(proc.stop)
    assert code == 0


def commented_block(header: str) -> str:
    """deploy/originpool.toml's commented ``header`` table, uncommented (keys, not prose)."""
    text = (ROOT / "deploy" / "originpool.toml").read_text()
    block = []
    for line in text[text.index(f"# {header}") :].splitlines():
        if not line.startswith("#"):
            break
        stripped = line[2:]
        if stripped.startswith("[") or re.match(r"[a-z_]+ = ", stripped):
            block.append(stripped)
    return "\n".join(block) + "\n"


def test_the_deploy_example_block_parses_uncommented():
    from proxy.config import parse

    block = commented_block("[routes.headers]")
    config = parse(BASE + block)
    rules = config.routes[0].headers
    assert rules is not None and rules.strip_prefix == "/api"
    keys = {line.split("=")[0].strip() for line in block.splitlines()[1:]}
    assert keys == set(KEYS)  # every key shown, none misspelt


async def test_a_reload_applies_new_rules_and_a_bad_one_keeps_them(origins, tmp_path):
    import os
    import signal

    path = tmp_path / "originpool.toml"
    pid = f'[proxy]\npid_file = "{tmp_path}/p.pid"\n'
    path.write_text(BASE + '[routes.headers]\nrequest_set = {"X-Env" = "one"}\n' + pid)
    proc = Proc(path)
    get = b"GET / HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n"
    try:
        await asyncio.to_thread(proc.wait_for, "ready")
        assert (await fetch(get))[0] == 200
        assert fields_of(origins[0].last_headers)[b"x-env"] == [b"one"]
        path.write_text(BASE + '[routes.headers]\nrequest_set = {"X-Env" = "two"}\n' + pid)
        os.kill(proc.p.pid, signal.SIGHUP)
        await asyncio.to_thread(proc.wait_for, "reloaded")
        assert (await fetch(get))[0] == 200
        assert fields_of(origins[0].last_headers)[b"x-env"] == [b"two"]
        path.write_text(BASE + '[routes.headers]\nrequest_set = {"Connection" = "x"}\n' + pid)
        os.kill(proc.p.pid, signal.SIGHUP)
        rejected = await asyncio.to_thread(proc.wait_for, "reload_rejected")
        assert any("routes[0].headers.request_set.Connection" in p for p in rejected["problems"])
        assert (await fetch(get))[0] == 200
        assert fields_of(origins[0].last_headers)[b"x-env"] == [b"two"]  # the old rules kept
    finally:
        code = await asyncio.to_thread(proc.stop)
    assert code == 0
