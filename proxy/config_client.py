"""The config's checks for what is known of a client: the PROXY protocol keys (a listener's
``proxy_protocol``, a route's ``send_proxy_protocol``) and the ``[limits]`` per address.

Apart from :mod:`proxy.config_reader` so the walk stays readable (it is near 600 lines);
the reader merges :data:`CLIENT_LIMIT_FIELDS` into its ``[limits]`` table and asks
:func:`limit_problems` for what only the keys together can say.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

from proxy.config_values import _integer, _Invalid, _is_number, _show
from proxy.limits import DEFAULT_MAX_TRACKED

SendProxy = Literal["v1", "v2"]
SEND_PROXY_CHOICES = ("v1", "v2")

# nginx writes rates as "10r/s" or "30r/m": accepted beside a plain number per second
_NGINX_RATE = re.compile(r"(\d+(?:\.\d+)?)r/([sm])")


def _rate(value: Any) -> float:
    """Requests a second: a number > 0, or nginx's ``"10r/s"`` / ``"600r/m"``."""
    wanted = "must be requests per second > 0 (a number, or nginx's '10r/s' / '600r/m')"
    if isinstance(value, str):
        m = _NGINX_RATE.fullmatch(value.strip())
        if m is None:
            raise _Invalid(f"{wanted}, got {_show(value)}")
        rate = float(m.group(1)) / (60.0 if m.group(2) == "m" else 1.0)
    elif _is_number(value):
        rate = float(value)
    else:
        raise _Invalid(f"{wanted}, got {_show(value)}")
    if not rate > 0 or rate > 1e9:
        raise _Invalid(f"{wanted}, got {_show(value)}")
    return rate


def send_proxy(value: Any) -> SendProxy | None:
    """A route's ``send_proxy_protocol``: ``"v2"`` (HAProxy's ``send-proxy-v2``), ``"v1"``
    (``send-proxy``), or false."""
    if value is False:
        return None
    if value in SEND_PROXY_CHOICES and isinstance(value, str):
        return value  # type: ignore[return-value]
    raise _Invalid(f"must be 'v2', 'v1' or false, got {_show(value)}")


_whole = _integer(1, unit="a whole number")
CLIENT_LIMIT_FIELDS: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "conn_per_ip": (_integer(1, unit="a number of connections"), None),
    "rate_per_ip": (_rate, None),
    "rate_burst": (_integer(1, unit="a number of requests"), None),
    "websocket_rate_per_ip": (_rate, None),
    "websocket_burst": (_integer(1, unit="a number of handshakes"), None),
    "max_tracked_addresses": (_integer(1, unit="a number of addresses"), DEFAULT_MAX_TRACKED),
}


def limit_problems(table: Any) -> list[tuple[str, str]]:
    """(key, reason) for a burst set without its rate: it would be silently ignored.
    ``table``: ``[limits]`` as decoded (anything else was reported by the reader already)."""
    out: list[tuple[str, str]] = []
    if not isinstance(table, Mapping):
        return out
    for burst, rate in (
        ("rate_burst", "rate_per_ip"),
        ("websocket_burst", "websocket_rate_per_ip"),
    ):
        if burst in table and rate not in table:
            out.append((burst, f"set without {rate}, which it is the burst of: set both"))
    return out
