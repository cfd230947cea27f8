"""The config keys of the PROXY protocol and the per-address limits: read, defaulted, and
each mistake named by its key."""

from __future__ import annotations

import re

import pytest

from proxy.config import ConfigError, parse
from proxy.limits import LimitSettings

BASE = """
[[listen]]
address = "127.0.0.1:8080"
{listen}
[[routes]]
host = "*"
origins = ["http://127.0.0.1:9000"]
{route}
[limits]
{limits}
"""


def config(listen: str = "", route: str = "", limits: str = "") -> str:
    return BASE.format(listen=listen, route=route, limits=limits)


def test_defaults_are_off() -> None:
    c = parse(config())
    assert not c.listen[0].proxy_protocol
    assert c.routes[0].send_proxy_protocol is None
    assert c.limits.client_limits() == LimitSettings()
    assert not c.limits.client_limits().any


def test_every_key_read() -> None:
    c = parse(
        config(
            "proxy_protocol = true",
            'send_proxy_protocol = "v1"',
            "conn_per_ip = 8\nrate_per_ip = '30r/m'\nrate_burst = 5\n"
            "websocket_rate_per_ip = 2.5\nwebsocket_burst = 3\nmax_tracked_addresses = 5000",
        )
    )
    assert c.listen[0].proxy_protocol
    assert c.routes[0].send_proxy_protocol == "v1"
    assert c.limits.client_limits() == LimitSettings(8, 0.5, 5, 2.5, 3, 5000)
    assert parse(config(route="send_proxy_protocol = false")).routes[0].send_proxy_protocol is None


@pytest.mark.parametrize(
    ("text", "where", "says"),
    [
        (config("proxy_protocol = 'yes'"), "listen[0].proxy_protocol", "true or false"),
        (config(route="send_proxy_protocol = true"), "send_proxy_protocol", "'v2', 'v1'"),
        (config(route="send_proxy_protocol = 'v3'"), "send_proxy_protocol", "'v2', 'v1'"),
        (config(limits="conn_per_ip = 0"), "limits.conn_per_ip", ">= 1"),
        (config(limits="rate_per_ip = 0"), "limits.rate_per_ip", "> 0"),
        (config(limits="rate_per_ip = '10r/h'"), "limits.rate_per_ip", "10r/s"),
        (config(limits="rate_per_ip = true"), "limits.rate_per_ip", "requests per second"),
        (config(limits="rate_burst = 4"), "limits.rate_burst", "without rate_per_ip"),
        (config(limits="websocket_burst = 4"), "limits.websocket_burst", "without websocket"),
        (config(limits="max_tracked_addresses = 0"), "limits.max_tracked_addresses", ">= 1"),
        (config(limits="conn_per_addr = 1"), "limits.conn_per_addr", "conn_per_ip"),
    ],
)
def test_mistakes_named_by_key(text: str, where: str, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(text)
    assert where in str(e.value) and says in str(e.value)


def test_deploy_examples_parse_uncommented() -> None:
    """deploy/originpool.toml's commented keys of these features, uncommented, are valid and
    mean what their comments say."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "deploy" / "originpool.toml").read_text()

    def uncomment(after: str) -> str:
        """The commented TOML lines (a key or a table header, not prose) after ``after``."""
        block = text.split(after)[1].split("\n\n")[0]
        lines = [ln[2:] for ln in block.splitlines() if ln.startswith("# ")]
        return "\n".join(ln for ln in lines if re.match(r"[a-z_]+ = |\[\[", ln))

    listen = uncomment("# comes before the ClientHello.")
    assert "proxy_protocol = true" in listen
    limits = uncomment('max_connections = "auto"\n')
    route = [ln[2:] for ln in text.splitlines() if ln.startswith("# send_proxy_protocol")]
    doc = (
        listen
        + '\n[[routes]]\nhost = "a"\norigins = ["http://127.0.2.1:9000"]\n'
        + "\n".join(route)
        + "\n[limits]\n"
        + limits
    )
    c = parse(doc)
    assert c.listen[0].proxy_protocol and c.routes[0].send_proxy_protocol == "v2"
    assert c.limits.client_limits() == LimitSettings(100, 20.0, 40, 1.0, 10, 100_000)
