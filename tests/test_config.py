"""proxy.config: every problem at once, each naming its key path; no tracebacks, ever.

No root and no network: only parsing, files in tmp_path and the CLI in a subprocess.
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pool.egress import Egress
from pool.origin import Origin, PoolLimits, TLSConfig
from proxy.app import build_router
from proxy.config import (
    Config,
    ConfigError,
    EgressConfig,
    EgressPresence,
    HostReport,
    from_dict,
    load,
    parse,
)
from proxy.target import host_name

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "originpool.toml"

EXAMPLE = """
[listen]
address = "127.0.0.1:8080"
[admin]
address = "127.0.0.1:9090"
[egress]
mode = "connectx"
addresses = ["127.0.1.1", "127.0.1.2:40000-40499"]
[[routes]]
host = "app.example"
path_prefix = "/"
origins = ["http://127.0.2.1:9000", "http://127.0.2.2:9000"]
balance = "round_robin"
"""

MINIMAL = """
[listen]
address = "127.0.0.1:8080"
[[routes]]
host = "app.example"
origins = ["http://127.0.2.1:9000"]
"""


def problems(text: str, **kw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, "t.toml", **kw)
    return info.value.problems


def paths(text: str, **kw) -> list[str]:
    """The key path of each problem ("t.toml: <path>: <reason>")."""
    return [p.split(": ", 2)[1] for p in problems(text, **kw)]


def only(text: str, **kw) -> str:
    found = problems(text, **kw)
    assert len(found) == 1, found
    return found[0]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


# -- valid configs ---------------------------------------------------------------------------


def test_example_shape_parses():
    config = parse(EXAMPLE)
    assert isinstance(config, Config)
    assert [listener.address for listener in config.listen] == [("127.0.0.1", 8080)]
    assert config.admin == ("127.0.0.1", 9090)
    assert config.egress.mode == "connectx"
    assert config.egress.addresses == (
        Egress("127.0.1.1"),
        Egress("127.0.1.2", (40000, 40499)),
    )
    (route,) = config.routes
    assert (route.host, route.path_prefix, route.balance) == ("app.example", "/", "round_robin")
    assert [(o.origin, o.weight) for o in route.origins] == [
        (Origin("http", "127.0.2.1", 9000), 1),
        (Origin("http", "127.0.2.2", 9000), 1),
    ]
    assert config.summary() == "1 listener, 1 route, 2 origins, 2 egress IPs, mode connectx"


def test_defaults():
    config = parse(MINIMAL)
    assert config.admin == ("127.0.0.1", 9090)
    assert config.egress.mode == "connectx" and config.egress.addresses == ()
    assert config.routes[0].path_prefix == "/" and config.routes[0].balance == "round_robin"
    assert config.to_pool_limits() == PoolLimits()
    assert config.to_tls_config() == TLSConfig(verify=True, ca_file=None)
    t = config.timeouts
    assert (t.connect, t.header, t.body_idle, t.upstream_response, t.drain) == (5, 10, 60, 60, 30)
    assert t.websocket_idle is None
    lim = config.limits
    assert (lim.max_header_bytes, lim.max_request_line) == (16384, 8192)
    assert lim.max_body_bytes is None
    assert lim.max_connections is None  # "auto": what the worker's RLIMIT_NOFILE carries
    assert config.proxy.workers == 1
    assert config.proxy.trusted_proxies == (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.proxy.trusts("127.0.0.1") and not config.proxy.trusts("10.0.0.1")
    assert (config.log.format, config.log.level) == ("json", "info")
    assert config.to_egress_set().mode == "connectx"


def test_every_section_set():
    config = parse(
        MINIMAL
        + """
[pool]
max_connections = 10
max_idle = 0
idle_timeout = 1.5
max_lifetime = 300
max_requests = 7
queue_size = 0
queue_timeout = 2
[timeouts]
connect = 1
header = 2
body_idle = 3
upstream_response = 4
drain = 0
websocket_idle = 600
[limits]
max_header_bytes = 1000
max_request_line = 500
max_body_bytes = 1048576
max_connections = 3
[proxy]
workers = 4
trusted_proxies = ["10.1.2.3/8", "fd00::/8"]
[upstream_tls]
verify = false
[log]
format = "console"
level = "debug"
"""
    )
    assert config.to_pool_limits() == PoolLimits(
        max_connections=10,
        max_idle=0,
        idle_timeout=1.5,
        max_lifetime=300.0,
        max_requests=7,
        queue_size=0,
        queue_timeout=2.0,
        connect_timeout=1.0,
    )
    assert config.timeouts.drain == 0 and config.timeouts.websocket_idle == 600
    assert config.limits.max_body_bytes == 1048576
    assert config.proxy.workers == 4
    # strict=False: host bits are allowed and dropped, as operators write them
    assert config.proxy.trusted_proxies[0] == ipaddress.ip_network("10.0.0.0/8")
    assert config.to_tls_config() == TLSConfig(verify=False)
    assert (config.log.format, config.log.level) == ("console", "debug")


def test_zero_means_off():
    config = parse(
        MINIMAL + "[pool]\nmax_lifetime = 0\n[timeouts]\nwebsocket_idle = 0.0\n"
        "[limits]\nmax_body_bytes = 0\n"
    )
    assert config.pool.max_lifetime is None
    assert config.timeouts.websocket_idle is None
    assert config.limits.max_body_bytes is None


def test_listen_array_ipv6_and_weighted_origins():
    config = parse(
        """
[[listen]]
address = "127.0.0.1:8080"
[[listen]]
address = "[::1]:8080"
[[listen]]
address = "[0:0::1]:8081"
[egress]
addresses = ["fd00::1", "[fd00::2]:40000-40100"]
[[routes]]
host = "App.Example."
origins = [{url = "http://[::1]:9000", weight = 3}, {url = "wss://ws.example"}]
balance = "least_conn"
[[routes]]
host = "*.Tenants.Example"
path_prefix = "/api/"
origins = ["https://api.example:8443"]
"""
    )
    assert [listener.address for listener in config.listen] == [
        ("127.0.0.1", 8080),
        ("::1", 8080),
        ("::1", 8081),
    ]
    first, second = config.routes
    assert first.host == "app.example" and first.balance == "least_conn"
    assert [(str(o.origin), o.weight) for o in first.origins] == [
        ("http://[::1]:9000", 3),
        ("wss://ws.example:443", 1),
    ]
    assert second.host == "*.tenants.example" and second.wildcard
    api = "/api/x"
    assert routed(config, b"a.tenants.example", api) == "*.tenants.example"
    assert routed(config, b"A.b.Tenants.example", api) == "*.tenants.example"
    assert routed(config, b"tenants.example", api) != "*.tenants.example"
    assert config.summary() == "3 listeners, 2 routes, 3 origins, 2 egress IPs, mode connectx"


def test_deploy_example_is_valid():
    config = load(DEPLOY)
    assert config.routes and config.listen
    text = DEPLOY.read_text()
    for address in ("127.0.0.1:8080", "127.0.1.1"):
        assert address in text
    # every section appears in the example, and every key in it is commented
    data = tomllib.loads(text)
    assert set(data) == {
        "listen",
        "admin",
        "egress",
        "routes",
        "pool",
        "timeouts",
        "limits",
        "proxy",
        "upstream_tls",
        "log",
        "tcp_keepalive",
    }


def test_cli_accepts_deploy_example():
    proc = run_cli("check-config", str(DEPLOY))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        f"{DEPLOY}: ok (1 listener, 3 routes, 6 origins, 4 egress IPs, mode connectx)"
    )
    assert proc.stderr == ""


# -- every problem at once -------------------------------------------------------------------


def test_several_mistakes_each_named_by_key_path():
    found = problems(
        """
[listen]
address = "127.0.0.1:99999"
[egress]
addresses = ["example.com", "127.0.1.2"]
[pool]
max_idle = -3
[limits]
max_body_bytes = "1M"
[[routes]]
host = "app.example"
origins = ["http://127.0.2.1:9000", "gopher://127.0.2.2:70"]
"""
    )
    assert [p.split(": ", 2)[1] for p in found] == [
        "listen.address",
        "egress.addresses[0]",
        "routes[0].origins[1]",
        "pool.max_idle",
        "limits.max_body_bytes",
    ]
    assert all(p.startswith("t.toml: ") for p in found)
    reasons = dict(p.split(": ", 2)[1:] for p in found)
    assert "port must be 1..65535" in reasons["listen.address"]
    assert "not a numeric IPv4 or IPv6 address" in reasons["egress.addresses[0]"]  # from Egress
    assert "scheme must be http, https, ws or wss" in reasons["routes[0].origins[1]"]
    assert reasons["pool.max_idle"] == "must be an integer >= 0 (0 = keep none idle), got -3"
    assert reasons["limits.max_body_bytes"] == (
        "must be a number of bytes >= 0 (0 = unlimited), got '1M'"
    )


def test_config_error_str_is_one_problem_per_line():
    with pytest.raises(ConfigError) as info:
        parse("[listen]\naddress = 1\n", "x.toml")
    err = info.value
    assert str(err).splitlines() == err.problems
    assert err.problems == [
        "x.toml: listen.address: must be a string ('IP:PORT' or '[IPv6]:PORT'), got 1",
        "x.toml: routes: required: at least one [[routes]] table with host and origins",
    ]


@pytest.mark.parametrize(
    ("extra", "path", "reason"),
    [
        ("[pool]\nmax_idel = 3\n", "pool.max_idel", "unknown key; did you mean 'max_idle'?"),
        ("[timeout]\nconnect = 3\n", "timeout", "unknown key; did you mean 'timeouts'?"),
        ("[log]\nlevl = 'info'\n", "log.levl", "unknown key; did you mean 'level'?"),
        ("[admin]\nadress = '127.0.0.1:1'\n", "admin.adress", "did you mean 'address'?"),
        ("[upstream_tls]\nverfy = true\n", "upstream_tls.verfy", "did you mean 'verify'?"),
        ("[proxy]\nzzz = 1\n", "proxy.zzz", "known keys: workers, trusted_proxies"),
        ('[proxy]\n"a b" = 1\n', 'proxy."a b"', "unknown key"),
    ],
)
def test_unknown_keys_are_errors_with_suggestions(extra, path, reason):
    problem = only(MINIMAL + extra)
    assert problem.startswith(f"t.toml: {path}: ")
    assert reason in problem


def test_unknown_keys_in_routes_listen_and_origin_tables():
    text = """
[listen]
address = "127.0.0.1:8080"
tls_crt = "x"
[[routes]]
host = "app.example"
path_prefx = "/api"
origins = [{url = "http://127.0.2.1:9000", wieght = 2}]
"""
    found = problems(text)
    assert found == [
        "t.toml: listen.tls_crt: unknown key; did you mean 'tls_cert'?",
        "t.toml: routes[0].path_prefx: unknown key; did you mean 'path_prefix'?",
        "t.toml: routes[0].origins[0].wieght: unknown key; did you mean 'weight'?",
    ]


def test_toml_syntax_error_is_one_problem_with_line_and_column():
    problem = only('[listen]\naddress = "127.0.0.1:8080"\n[[routes]]\nhost = app.example\n')
    assert problem == "t.toml: line 4, column 8: invalid TOML: Invalid value"


def test_toml_duplicate_table():
    problem = only("[pool]\nmax_idle = 1\n[pool]\nmax_idle = 2\n")
    assert problem == (
        "t.toml: pool: [pool] appears twice (lines 1 and 3); put all its keys under one [pool]"
    )


LISTEN_REST = MINIMAL.split("\n", 3)[3]  # MINIMAL without its [listen] table


@pytest.mark.parametrize(
    ("text", "lines"),
    [
        (
            '[listen]\naddress = "127.0.0.1:8080"\n[[listen]]\naddress = "127.0.0.1:8081"\n',
            (1, 3),
        ),
        (
            '[[listen]]\naddress = "127.0.0.1:8080"\n[listen]\naddress = "127.0.0.1:8081"\n',
            (3, 1),
        ),
        ('[ listen ] # one\naddress = "127.0.0.1:8080"\n[[ "listen" ]]\n', (1, 3)),
    ],
)
def test_mixed_listen_table_and_array_is_named_with_the_fix(text, lines):
    """tomllib says "Cannot overwrite a value" or "Cannot declare ('listen',) twice",
    depending on the order: neither names the key or the fix."""
    problem = only(text + LISTEN_REST)
    assert problem == (
        f"t.toml: listen: mixes a [listen] table (line {lines[0]}) and [[listen]] "
        f"array-of-tables (line {lines[1]}); use [[listen]] for every listener"
    )


def test_other_toml_errors_name_file_line_and_reason():
    text = MINIMAL + "[[routes]]\nhost = 'b.example'\n[routes]\n"
    assert only(text).startswith("t.toml: routes: mixes a [routes] table (line 9) and")
    assert only(text).endswith("; use [[routes]] for every route")
    assert only(MINIMAL + "[pool]\nmax_idle = 1\n[[pool]]\n") == (
        "t.toml: pool: mixes a [pool] table (line 7) and [[pool]] array-of-tables (line 9); "
        "[pool] is a single table: write [pool] once"
    )
    assert only(MINIMAL + "[pool]\nmax_idle = 1\nmax_idle = 2\n") == (
        "t.toml: pool.max_idle: set twice (lines 8 and 9); keep one"
    )
    second = MINIMAL.replace("[[routes]]\n", "[[routes]]\nhost = 'b.example'\n", 1)
    assert only(second) == "t.toml: routes[0].host: set twice (lines 5 and 6); keep one"
    # anything else keeps tomllib's reason, with the line and column
    assert (
        only("[listen]\naddress = \n") == "t.toml: line 2, column 11: invalid TOML: Invalid value"
    )


def test_cli_names_a_mixed_listen_with_the_file(tmp_path):
    path = tmp_path / "mixed.toml"
    path.write_text('[listen]\naddress = "127.0.0.1:8080"\n[[listen]]\n' + LISTEN_REST)
    proc = run_cli("check-config", str(path))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        f"{path}: listen: mixes a [listen] table (line 1) and [[listen]] array-of-tables "
        "(line 3); use [[listen]] for every listener\n"
    )


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("pool.idle_timeout", '"abc"', "must be a positive number of seconds, got 'abc'"),
        ("pool.idle_timeout", "true", "must be a positive number of seconds, got true"),
        ("pool.idle_timeout", "0", "must be a positive number of seconds, got 0"),
        ("pool.idle_timeout", "-1.5", "must be a positive number of seconds, got -1.5"),
        ("pool.idle_timeout", "nan", "must be a positive number of seconds, got nan"),
        ("pool.idle_timeout", "inf", "must be a positive number of seconds, got inf"),
        ("pool.max_lifetime", "-1", "must be a number of seconds >= 0 (0 = off), got -1"),
        ("pool.max_connections", "0", "must be an integer >= 1, got 0"),
        ("pool.max_connections", "true", "must be an integer >= 1, got true"),
        ("pool.max_connections", "2.0", "must be an integer >= 1, got 2.0"),
        ("pool.max_connections", '"10"', "must be an integer >= 1, got '10'"),
        ("pool.max_requests", "[1]", "must be an integer >= 1, got an array"),
        ("pool.queue_size", "-1", "must be an integer >= 0"),
        ("timeouts.header", "false", "must be a positive number of seconds, got false"),
        ("timeouts.drain", "-1", "must be a number of seconds >= 0, got -1"),
        ("timeouts.websocket_idle", '"off"', "(0 = off), got 'off'"),
        ("timeouts.connect", "1979-05-27", "got a date/time (1979-05-27)"),
        ("limits.max_header_bytes", "0", "must be a number of bytes >= 1, got 0"),
        ("limits.max_request_line", "{a = 1}", "got a table"),
        ("limits.max_connections", "false", "must be an integer >= 1 or 'auto', got false"),
        ("limits.max_connections", '"atuo"', "must be an integer >= 1 or 'auto', got 'atuo'"),
        ("egress.allow_unassigned", '"yes"', "must be true or false, got 'yes'"),
        ("tcp_keepalive.idle", "-1", "(0 = off), got -1"),
        ("tcp_keepalive.idle", "40000", "got 40000"),
        ("tcp_keepalive.interval", "0", "must be a number of seconds from 1 to 32767, got 0"),
        ("tcp_keepalive.probes", "128", "got 128"),
        ("proxy.workers", "0", "must be an integer from 1 to 1024, got 0"),
        ("proxy.workers", "100000", "must be an integer from 1 to 1024, got 100000"),
        ("proxy.trusted_proxies", '"10.0.0.0/8"', "must be an array, got '10.0.0.0/8'"),
        ("upstream_tls.verify", '"yes"', "must be true or false, got 'yes'"),
        ("upstream_tls.verify", "1", "must be true or false, got 1"),
        ("log.format", '"jsn"', "must be one of 'json', 'console'; got 'jsn' (did you mean"),
        ("log.level", '"verbose"', "must be one of 'debug', 'info', 'warning', 'error'"),
        ("egress.mode", '"connect"', "(did you mean 'connectx'?)"),
        ("egress.addresses", '"127.0.1.1"', "must be an array, got '127.0.1.1'"),
        ("admin.address", '"127.0.0.1"', "missing ':PORT'"),
    ],
)
def test_bad_values_are_rejected_with_reasons(key, value, reason):
    section, name = key.split(".")
    problem = only(f"{MINIMAL}[{section}]\n{name} = {value}\n")
    assert problem.startswith(f"t.toml: {key}: "), problem
    assert reason in problem, problem


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("localhost:8080", "host must be a numeric IP address"),
        ("127.0.0.1", "missing ':PORT'"),
        ("127.0.0.1:0", "port must be 1..65535, got '0'"),
        ("127.0.0.1:http", "port must be 1..65535, got 'http'"),
        ("127.0.0.1:+80", "port must be 1..65535"),
        ("::1:8080", "an IPv6 address needs brackets"),
        ("[::1]8080", "expected ':PORT' after ']'"),
        ("[::1:8080", "missing ']'"),
        ("[127.0.0.1]:8080", "not a numeric IPv6 address"),
        ("127.0.0.256:80", "host must be a numeric IP address"),
    ],
)
def test_bad_listen_addresses(address, reason):
    text = MINIMAL.replace('"127.0.0.1:8080"', repr(address))
    problem = only(text)
    assert problem.startswith("t.toml: listen.address: ") and reason in problem


def test_listen_shapes():
    assert paths("listen = 8080\n" + MINIMAL.split("\n", 3)[3]) == ["listen"]
    assert paths("listen = []\n" + MINIMAL.split("\n", 3)[3]) == ["listen"]
    assert paths("[[listen]]\n[[listen]]\naddress = 'x'\n" + MINIMAL.split("\n", 3)[3]) == [
        "listen[0].address",
        "listen[1].address",
    ]
    text = "[[routes]]\nhost = 'a.example'\norigins = ['http://127.0.2.1']\n"
    assert only(text) == "t.toml: listen: required: a [listen] table with address = 'IP:PORT'"


def test_address_collisions():
    text = """
[[listen]]
address = "127.0.0.1:8080"
[[listen]]
address = "0.0.0.0:8080"
[[listen]]
address = "[::]:8080"
[admin]
address = "127.0.0.1:8080"
[[routes]]
host = "a.example"
origins = ["http://127.0.2.1"]
"""
    found = problems(text)
    assert [p.split(": ", 2)[1] for p in found] == ["listen[1].address", "admin.address"]
    assert "collides with listen[0].address (127.0.0.1:8080)" in found[0]


# -- routes ----------------------------------------------------------------------------------


def routed(config: Config, host: bytes, path: str = "/") -> str | None:
    """The route host the proxy's own matcher (proxy.routing, fed by proxy.target as every
    request is) picks for ``host``: the config is checked against the matcher that runs."""
    name = host_name(host)
    route = build_router(config).match(name, path) if name is not None else None
    return route.host if route is not None else None


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("", "must not be empty"),
        ("app example", "label 'app example'"),
        ("app..example", "empty label"),
        ("-app.example", "not starting or ending with '-'"),
        ("app.example:8080", "no port"),
        ("http://app.example", "no port, scheme or path"),
        ("a.*.example", "'*' is only allowed alone (every host) or as '*.' at the start"),
        ("**", "'*' is only allowed"),
        ("*example", "'*' is only allowed"),
        ("*.*.example", "'*' is only allowed"),
        ("* ", "'*' is only allowed"),
        ("*:80", "'*' is only allowed"),
        ("*.", "nothing after '*.'"),
        ("app!.example", "label 'app!'"),
        ("a" * 64 + ".example", "1-63"),
    ],
)
def test_bad_route_hosts(host, reason):
    text = MINIMAL.replace('"app.example"', repr(host))
    problem = only(text)
    assert problem.startswith("t.toml: routes[0].host: ") and reason in problem, problem


def test_catch_all_route_host_is_accepted():
    text = MINIMAL + '[[routes]]\nhost = "*"\norigins = ["http://127.0.2.9:9000"]\n'
    config = parse(text)
    exact, catch_all = config.routes
    assert catch_all.host == "*" and catch_all.wildcard
    assert routed(config, b"anything.example") == routed(config, b"Other.") == "*"
    assert routed(config, b"app.example") == exact.host == "app.example"
    # one catch-all per path prefix, as for any host
    twice = text + '[[routes]]\nhost = "*"\norigins = ["http://127.0.2.8:9000"]\n'
    assert only(twice).startswith("t.toml: routes[2]: same host and path_prefix as routes[1]")


def test_route_host_is_normalised():
    config = parse(MINIMAL.replace('"app.example"', '"APP.Example."'))
    assert config.routes[0].host == "app.example"
    config = parse(MINIMAL.replace('"app.example"', '"bücher.example"'))
    assert config.routes[0].host == "xn--bcher-kva.example"


@pytest.mark.parametrize(
    ("prefix", "reason"),
    [
        ("api", "must start with '/', got 'api'"),
        ("", "must start with '/'"),
        ("/a b", "' ' cannot appear"),
        ("/a?x", "'?' cannot appear"),
    ],
)
def test_bad_path_prefix(prefix, reason):
    text = MINIMAL + ""
    text = text.replace('host = "app.example"', f'host = "app.example"\npath_prefix = {prefix!r}')
    problem = only(text)
    assert problem.startswith("t.toml: routes[0].path_prefix: ") and reason in problem


@pytest.mark.parametrize(
    ("origins", "path", "reason"),
    [
        ("[]", "routes[0].origins", "must not be empty"),
        ('"http://127.0.2.1"', "routes[0].origins", "must be an array"),
        ("[1]", "routes[0].origins[0]", "must be a URL string or a table"),
        ('["127.0.2.1:9000"]', "routes[0].origins[0]", "scheme must be"),
        ('["http://127.0.2.1:9000/api"]', "routes[0].origins[0]", "no path, query or fragment"),
        ('["http://127.0.2.1:0"]', "routes[0].origins[0]", "port must be 1..65535, got 0"),
        ('["http://127.0.2.1:70000"]', "routes[0].origins[0]", "bad port"),
        ('["http://u:p@127.0.2.1"]', "routes[0].origins[0]", "no user or password"),
        ('["http://a b"]', "routes[0].origins[0]", "label 'a b'"),
        ('["http://[::1"]', "routes[0].origins[0]", "Invalid IPv6 URL"),
        ("[{weight = 2}]", "routes[0].origins[0].url", "required"),
        ('[{url = "http://h", weight = 0}]', "routes[0].origins[0].weight", ">= 1, got 0"),
        ('[{url = "http://h", weight = true}]', "routes[0].origins[0].weight", "got true"),
        ('[{url = "http://h", weight = 1.5}]', "routes[0].origins[0].weight", "got 1.5"),
        ("[{url = 5}]", "routes[0].origins[0].url", "must be a string"),
        (
            '["http://127.0.2.1:80", "HTTP://127.0.2.1/"]',
            "routes[0].origins[1]",
            "same origin as routes[0].origins[0] (http://127.0.2.1:80): raise its weight",
        ),
    ],
)
def test_bad_origins(origins, path, reason):
    text = MINIMAL.replace('["http://127.0.2.1:9000"]', origins)
    problem = only(text)
    assert problem.startswith(f"t.toml: {path}: "), problem
    assert reason in problem, problem


def test_route_shape_errors():
    assert paths("[listen]\naddress = '127.0.0.1:1'\n[routes]\nhost = 'a'\n") == ["routes"]
    assert paths("routes = []\n[listen]\naddress = '127.0.0.1:1'\n") == ["routes"]
    assert paths("routes = [1]\n[listen]\naddress = '127.0.0.1:1'\n") == ["routes[0]"]
    assert paths("[listen]\naddress = '127.0.0.1:1'\n[[routes]]\n") == [
        "routes[0].host",
        "routes[0].origins",
    ]
    problem = only(MINIMAL.replace("[[routes]]", "[[routes]]\nbalance = 'random'"))
    assert "routes[0].balance: must be one of 'round_robin', 'least_conn'" in problem


def test_duplicate_routes():
    text = MINIMAL + '[[routes]]\nhost = "APP.example"\npath_prefix = "/"\norigins = ["http://h"]\n'
    assert only(text) == (
        "t.toml: routes[1]: same host and path_prefix as routes[0] ('app.example', '/'): "
        "the second could never match"
    )
    # a different prefix on the same host is fine
    parse(MINIMAL + '[[routes]]\nhost = "app.example"\npath_prefix = "/a"\norigins = ["http://h"]')


# -- egress ----------------------------------------------------------------------------------


def test_duplicate_egress_ips():
    text = MINIMAL + '[egress]\naddresses = ["127.0.1.1", "127.0.1.1:40000-40100", "fd00::1", '
    text += '"[fd00:0::1]:1-2", 5]\n'
    found = problems(text)
    assert [p.split(": ", 2)[1] for p in found] == [
        "egress.addresses[1]",
        "egress.addresses[3]",
        "egress.addresses[4]",
    ]
    assert "duplicate IP 127.0.1.1 (also egress.addresses[0])" in found[0]
    assert "duplicate IP fd00::1 (also egress.addresses[2])" in found[1]
    assert "must be a string" in found[2]


def test_plain_mode_with_addresses_is_refused_naming_both_keys():
    """plain would silently ignore the addresses (issue 18): one of the two is a mistake."""
    problem = only(MINIMAL + '[egress]\nmode = "plain"\naddresses = ["127.0.1.1"]\n')
    assert problem.startswith('t.toml: egress.addresses: set while egress.mode = "plain"')
    assert "remove egress.addresses, or set egress.mode" in problem
    assert parse(MINIMAL + '[egress]\nmode = "plain"\naddresses = []\n').egress.mode == "plain"


def test_bind_windows_are_accepted():
    """Comparing modes side by side changes the mode line only (the testbed does)."""
    bind = parse(MINIMAL + '[egress]\nmode = "bind"\naddresses = ["127.0.1.1:4000-4100"]\n')
    assert bind.egress.addresses[0].window == (4000, 4100)
    assert parse(MINIMAL + '[egress]\nmode = "bind"\naddresses = ["127.0.1.1"]\n')
    assert parse(MINIMAL + '[egress]\nmode = "plain"\n').egress.mode == "plain"


def test_origin_unreachable_from_every_egress_family():
    text = MINIMAL.replace("http://127.0.2.1:9000", "http://[fd00::9]:9000")
    text += '[egress]\naddresses = ["127.0.1.1"]\n'
    problem = only(text)
    assert problem.startswith("t.toml: routes[0].origins[0]: http://[fd00::9]:9000 is IPv6")
    # names resolve later: no verdict; and no egress addresses means the kernel's source
    parse(MINIMAL.replace("127.0.2.1", "origin.example") + '[egress]\naddresses = ["fd00::1"]')
    parse(MINIMAL.replace("http://127.0.2.1:9000", "http://[fd00::9]:9000"))


def test_trusted_proxies():
    text = MINIMAL + '[proxy]\ntrusted_proxies = ["10.0.0.0/8", "10.0.0.300/8", 3, "::/0"]\n'
    found = problems(text)
    assert [p.split(": ", 2)[1] for p in found] == [
        "proxy.trusted_proxies[1]",
        "proxy.trusted_proxies[2]",
    ]
    assert "does not appear to be an IPv4 or IPv6 network" in found[0]
    assert parse(MINIMAL + "[proxy]\ntrusted_proxies = []\n").proxy.trusted_proxies == ()


# -- files: TLS certificates and CA bundles ------------------------------------------------


@pytest.fixture
def tls_files(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("app.example")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    other = ca.issue_cert("other.example")
    other.private_key_pem.write_to_path(str(tmp_path / "other-key.pem"))
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    return tmp_path


def test_tls_listener_and_ca_file_relative_to_config(tls_files):
    path = tls_files / "originpool.toml"
    path.write_text(
        MINIMAL.replace(
            'address = "127.0.0.1:8080"',
            'address = "127.0.0.1:8443"\ntls_cert = "cert.pem"\ntls_key = "key.pem"',
        )
        + '[upstream_tls]\nca_file = "ca.pem"\n'
    )
    config = load(path)
    (listener,) = config.listen
    assert listener.tls and listener.tls_cert == str(tls_files / "cert.pem")
    assert listener.tls_key == str(tls_files / "key.pem")
    assert config.to_tls_config() == TLSConfig(verify=True, ca_file=str(tls_files / "ca.pem"))
    config.to_tls_config().context()  # the pool can build its SSL context from it


def test_tls_problems(tls_files):
    def listen(extra: str) -> list[str]:
        text = MINIMAL.replace('address = "127.0.0.1:8080"', f'address = "127.0.0.1:1"\n{extra}')
        return problems(text, base_dir=tls_files)

    assert listen('tls_cert = "cert.pem"') == [
        "t.toml: listen.tls_key: required when tls_cert is set (TLS needs both)"
    ]
    assert listen('tls_key = "key.pem"') == [
        "t.toml: listen.tls_cert: required when tls_key is set (TLS needs both)"
    ]
    found = listen('tls_cert = "missing.pem"\ntls_key = "key.pem"')
    assert found == ["t.toml: listen.tls_cert: 'missing.pem': no such file"]
    found = listen('tls_cert = "cert.pem"\ntls_key = "other-key.pem"')
    assert len(found) == 1 and found[0].startswith("t.toml: listen.tls_cert: cannot load")
    found = listen('tls_cert = "."\ntls_key = "key.pem"')
    assert found == ["t.toml: listen.tls_cert: '.': not a regular file"]
    found = problems(MINIMAL + '[upstream_tls]\nca_file = "garbage.pem"\n', base_dir=tls_files)
    assert len(found) == 1
    assert found[0].startswith("t.toml: upstream_tls.ca_file: cannot load as a PEM CA bundle")


# -- what this host has: EgressPresence with a stand-in for the kernel's answer ----------------
# (the kernel's own answer, in namespaces: tests/test_egress_presence.py)

THREE = MINIMAL + '[egress]\naddresses = ["127.0.1.1", "127.0.1.2:40000-40099", "10.99.99.99"]\n'


def presence(text: str, absent: set[str]) -> HostReport:
    return EgressPresence(lambda ip: ip not in absent).check(parse(text, "t.toml"))


def test_unassigned_egress_ip_is_an_error_naming_its_key():
    report = presence(THREE, {"10.99.99.99", "127.0.1.2"})
    assert report.warnings == ()
    assert [p.split(" (add it")[0] for p in report.errors] == [
        "t.toml: egress.addresses[1]: 127.0.1.2 is not assigned to any interface in this namespace",
        "t.toml: egress.addresses[2]: 10.99.99.99 is not assigned to any interface in this "
        "namespace",
    ]
    assert "allow_unassigned = true" in report.errors[0]
    assert presence(THREE, set()) == HostReport()


def test_allow_unassigned_turns_it_into_a_warning():
    text = THREE.replace("[egress]\n", "[egress]\nallow_unassigned = true\n")
    assert parse(text).egress.allow_unassigned and not parse(THREE).egress.allow_unassigned
    report = presence(text, {"10.99.99.99"})
    assert report.errors == ()
    assert report.warnings == (
        "t.toml: egress.addresses[2]: warning: 10.99.99.99 is not assigned to any interface "
        "in this namespace; allow_unassigned = true: the pool keeps it down and uses it once "
        "it is added",
    )


def test_presence_is_not_asked_in_plain_mode_and_errors_are_problems():
    egress = parse(THREE).egress
    plain = EgressConfig("plain", egress.addresses, egress.allow_unassigned)
    assert EgressPresence(lambda ip: False).check_egress(plain, "t.toml") == HostReport()

    def broken(ip: str) -> bool:
        raise OSError(97, "Address family not supported by protocol")

    v6 = MINIMAL.replace("127.0.2.1", "[fd00::9]") + '[egress]\naddresses = ["fd00::1"]'
    report = EgressPresence(broken).check(parse(v6))
    assert report.errors[0].startswith(
        "<string>: egress.addresses[0]: fd00::1 cannot be used here: Address family not "
        "supported by protocol"
    )


# -- load and the CLI ------------------------------------------------------------------------


def test_load_problems_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"[log]\n# caf\xe9\n")
    with pytest.raises(ConfigError, match="line 2: not UTF-8"):
        load(bad)


def test_cli_rejects_with_every_problem_on_stderr(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        MINIMAL.replace("127.0.0.1:8080", "127.0.0.1:0") + "[pool]\nmax_idel = 1\nmax_idle = -1\n"
    )
    proc = run_cli("check-config", str(path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"{path}: listen.address: '127.0.0.1:0': port must be 1..65535, got '0'",
        f"{path}: pool.max_idel: unknown key; did you mean 'max_idle'?",
        f"{path}: pool.max_idle: must be an integer >= 0 (0 = keep none idle), got -1",
    ]
    assert "Traceback" not in proc.stderr


def test_cli_syntax_error_and_missing_file(tmp_path):
    path = tmp_path / "syntax.toml"
    path.write_text("[listen\n")
    proc = run_cli("check-config", str(path))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"{path}: line 1, column 8: invalid TOML: ")
    proc = run_cli("check-config", str(tmp_path / "nope.toml"))
    assert proc.returncode == 2 and "cannot read" in proc.stderr and "Traceback" not in proc.stderr


# -- property: garbage anywhere gives ConfigError, never a traceback -------------------------

BASE: dict = tomllib.loads(
    EXAMPLE
    + """
[pool]
max_connections = 1
max_idle = 1
idle_timeout = 1
max_lifetime = 1
max_requests = 1
queue_size = 1
queue_timeout = 1
[timeouts]
connect = 1
header = 1
body_idle = 1
upstream_response = 1
drain = 1
websocket_idle = 1
[limits]
max_header_bytes = 1
max_request_line = 1
max_body_bytes = 1
max_connections = 1
[proxy]
workers = 1
trusted_proxies = ["127.0.0.1/32"]
[upstream_tls]
verify = true
ca_file = "ca.pem"
[log]
format = "json"
level = "info"
"""
)
BASE["listen"]["tls_cert"] = "cert.pem"
BASE["listen"]["tls_key"] = "key.pem"
BASE["routes"][0]["origins"].append({"url": "http://127.0.2.3:9000", "weight": 2})


def _key_paths(node: object, prefix: tuple = ()) -> list[tuple]:
    """Every key and array element of the base document, as a path of keys and indexes."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _key_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _key_paths(v, (*prefix, i))
    return out


KEY_PATHS = _key_paths(BASE)

NEAR_MISSES = [
    "",
    " ",
    "0",
    "-1",
    "*",
    "*.",
    "/",
    "[",
    "[::1]",
    "[::1]:",
    "127.0.0.1:",
    ":80",
    "127.0.1.1:1-0",
    "127.0.1.1:-",
    "fe80::1%eth0",
    "[fe80::1%lo]:80",
    "http://",
    "http://[::1",
    "http://h:0",
    "http://h:99999",
    "ws://xn--",
    "http://h%00",
    "http://\x00",
    "/dev/null",
    "..",
    "\x00",
    "~nobody/x",
    "a" * 5000,
    "9" * 5000,
    "127.0.1.1:" + "9" * 5000 + "-1",
]

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.text(max_size=40),
    st.sampled_from(NEAR_MISSES),
    st.datetimes(),
    st.dates(),
    st.times(),
)
garbage = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=10) | st.sampled_from(["url", "weight"]), inner, max_size=4
        )
    ),
    max_leaves=10,
)


def _set(doc: dict, path: tuple, value: object) -> None:
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


def _valid_or_config_error(doc: dict, base_dir: Path) -> None:
    try:
        from_dict(doc, "g.toml", base_dir=base_dir)
    except ConfigError as e:
        assert e.problems, "a ConfigError always names at least one problem"
        for problem in e.problems:
            assert problem.startswith("g.toml: ") and "\n" not in problem, problem


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("app.example")
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    return d


def test_property_base_is_valid(tls_dir):
    """The documents below start valid, so each problem comes from the garbage put in."""
    config = from_dict(BASE, "g.toml", base_dir=tls_dir)
    assert config.listen[0].tls and config.upstream_tls.ca_file == str(tls_dir / "ca.pem")
    assert len(KEY_PATHS) > 40


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_garbage_values_only_raise_config_error(tls_dir, data):
    doc = copy.deepcopy(BASE)
    for path in data.draw(st.lists(st.sampled_from(KEY_PATHS), min_size=1, max_size=3)):
        value = data.draw(garbage)
        with contextlib.suppress(KeyError, IndexError, TypeError):
            _set(doc, path, value)  # fails when an earlier replacement removed a parent
    _valid_or_config_error(doc, tls_dir)


@settings(max_examples=200, deadline=None)
@given(
    section=st.sampled_from(sorted(BASE)),
    key=st.text(min_size=1, max_size=12),
    value=garbage,
)
def test_property_garbage_keys_only_raise_config_error(tls_dir, section, key, value):
    doc = copy.deepcopy(BASE)
    target = doc[section][0] if isinstance(doc[section], list) else doc[section]
    target[key] = value
    _valid_or_config_error(doc, tls_dir)


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(0, 3), st.text(max_size=3)), max_size=4
    )
)
def test_property_mangled_text_only_raises_config_error(edits):
    text = DEPLOY.read_text()
    for pos, cut, insert in edits:
        i = pos % (len(text) + 1)
        text = text[:i] + insert + text[i + cut :]
    try:
        parse(text, "m.toml")
    except ConfigError as e:
        assert e.problems and all(p.startswith("m.toml: ") for p in e.problems)
