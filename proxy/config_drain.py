"""The reader's part for draining and admission: an origin's ``max_session_rate`` and
``slow_start``, ``[websocket] drain_over``, ``[admin] token``; and the check-config warning
for an admin listener anyone on the network can reach without a token.

``drain_over`` defaults to 30 s: the window a reload's drain (an origin left a route) spreads
its sessions' closes over. 30 s is ``[timeouts] drain``'s default and Kubernetes' default
``terminationGracePeriodSeconds``, so an origin drained as its pod stops has its sessions
moved before the kubelet's SIGKILL; at the issue's 7,200 sessions it is 240 reconnections
a second spread over the other origins, against the storm's thousands in its first second.

A base class of :class:`~proxy.config_reader._Reader`, as :mod:`proxy.config_tls` is.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pool.origin import Origin
from proxy.config_values import _Invalid, _is_number, _seconds, _show, _string

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    from proxy.config_model import Config

    Check = Callable[[Any], Any]
    T = TypeVar("T")

DRAIN_OVER = 30.0
WEBSOCKET_KEYS = ("drain_over",)
ADMISSION_KEYS = ("max_session_rate", "slow_start")
MAX_RATE = 1_000_000.0  # new sessions a second: more is a typo, not an origin


def _rate(value: Any) -> float:
    """Sessions a second, > 0 (a fraction is fine: 0.5 is one every two seconds)."""
    if not _is_number(value) or not (0 < value <= MAX_RATE):
        raise _Invalid(
            f"must be new sessions per second, > 0 (leave it out for none), got {_show(value)}"
        )
    return float(value)


def _token(value: Any) -> str:
    text = _string(value, "a bearer token")
    if not text or any(c <= " " or c == "\x7f" for c in text):
        raise _Invalid("must be a non-empty token without spaces or control characters")
    return text


class DrainKeys:
    """The reader's methods for these keys (what they use of the reader is declared for
    type checkers only)."""

    if TYPE_CHECKING:

        def problem(self, path: str, reason: str) -> None: ...
        def section(
            self, data: Mapping[str, Any], name: str, known: Sequence[str]
        ) -> Mapping[str, Any]: ...
        def field(
            self, table: Mapping[str, Any], path: str, key: str, check: Check, default: T
        ) -> T: ...

    def admission(self, item: Mapping[str, Any], path: str) -> tuple[float, float]:
        """An origin table's ``(max_session_rate, slow_start)``, 0 for each left out."""
        rate = self.field(item, path, "max_session_rate", _rate, 0.0)
        slow = self.field(item, path, "slow_start", _seconds("off"), None) or 0.0
        if slow and not rate and "max_session_rate" not in item:
            self.problem(
                f"{path}.slow_start",
                "ramps max_session_rate up after the origin is back: set max_session_rate too",
            )
        return rate, slow

    def admission_conflicts(
        self, entries: Sequence[tuple[str, Origin, tuple[float, float]]]
    ) -> None:
        """One origin, one admission: two routes naming it with different ones is an error."""
        seen: dict[Origin, tuple[str, tuple[float, float]]] = {}
        for path, origin, value in entries:
            first = seen.setdefault(origin, (path, value))
            if first[1] != value and value != (0.0, 0.0) and first[1] != (0.0, 0.0):
                self.problem(
                    path,
                    f"{origin}'s max_session_rate/slow_start differ from {first[0]}'s: "
                    "an origin has one admission, whatever routes name it",
                )

    def drain_over(self, data: Mapping[str, Any]) -> float:
        table = self.section(data, "websocket", WEBSOCKET_KEYS)
        over = self.field(table, "websocket", "drain_over", _seconds("now"), DRAIN_OVER)
        return DRAIN_OVER if over is None else over

    def admin_token(self, table: Mapping[str, Any]) -> str | None:
        return self.field(table, "admin", "token", _token, None)


def admin_warnings(config: Config) -> list[str]:
    """check-config's warning for an admin listener off loopback with no token: its drain
    endpoints change what the proxy does, for anyone who can reach the port."""
    host, port = config.admin
    if config.admin_token is not None:
        return []
    try:
        loopback = ipaddress.ip_address(host or "0.0.0.0").is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return []
    return [
        f"{config.source}: admin.address: {host}:{port} is not loopback and [admin] token is "
        "not set: anyone who reaches it can drain origins (set token, or bind 127.0.0.1)"
    ]
