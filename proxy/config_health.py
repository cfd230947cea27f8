"""The reader's part for health checks: ``[routes.health_check]`` and an origin's
``health_check`` table, in the keys HAProxy and nginx Plus users reach for.

=================  ========================================  ===============================
key                HAProxy                                   nginx Plus ``health_check``
=================  ========================================  ===============================
``type``           ``check`` (tcp) / ``option httpchk``      ``type=http`` (default) / tcp
``interval``       ``inter``                                 ``interval``
``timeout``        ``timeout check``                         (``proxy_connect_timeout``...)
``rise``/``fall``  ``rise``/``fall``                         ``passes``/``fails``
``method``         ``http-check send meth``                  (a ``match`` block)
``path``           ``http-check send uri``                   ``uri``
``expect_status``  ``http-check expect status``              ``match { status 200-399; }``
``host``           ``http-check send hdr Host``              (the ``proxy_set_header Host``)
``passive_fails``  ``observe layer7`` + ``error-limit``      ``max_fails`` (passive)
=================  ========================================  ===============================

An origin's table is read over its route's (HAProxy's ``default-server`` then ``server``):
keys it leaves out are the route's. One origin has one check, whatever routes name it, so
two routes that check the same origin differently are an error naming both.

A base class of :class:`~proxy.config_reader._Reader`, as :mod:`proxy.config_tls` is.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pool.health_state import CHECK_TYPES, HealthCheck
from pool.origin import Origin
from proxy.config_values import (
    _check_hostname,
    _choice,
    _integer,
    _Invalid,
    _seconds,
    _show,
    _string,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    Check = Callable[[Any], Any]
    T = TypeVar("T")

HEALTH_KEYS = (
    "type",
    "interval",
    "timeout",
    "rise",
    "fall",
    "method",
    "path",
    "expect_status",
    "host",
    "passive_fails",
)
HTTP_ONLY = ("method", "path", "expect_status", "host")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 5.6.2


def _method(value: Any) -> str:
    text = _string(value, "an HTTP method such as 'GET' or 'HEAD'")
    if not _TOKEN.fullmatch(text):
        raise _Invalid(f"must be an HTTP method such as 'GET' or 'HEAD', got {text!r}")
    if text.upper() in ("CONNECT", "POST", "PUT", "PATCH", "DELETE"):
        raise _Invalid(f"{text!r} changes or tunnels: a check must be safe (GET, HEAD, OPTIONS)")
    return text.upper()


def _check_path(value: Any) -> str:
    text = _string(value, "a request target starting with '/'")
    if not text.startswith("/") or any(c <= " " or c == "\x7f" for c in text):
        raise _Invalid(f"must start with '/' and hold no spaces or control bytes, got {text!r}")
    return text


def _status_range(value: Any) -> tuple[int, int]:
    """``200``, ``"200"`` or ``"200-399"`` (HAProxy's ``http-check expect status``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str) and re.fullmatch(r"\s*\d{3}\s*(-\s*\d{3}\s*)?", value):
        low_text, _, high_text = value.partition("-")
        low = int(low_text)
        high = int(high_text) if high_text else low
    else:
        raise _Invalid(f"must be a status or a range like '200-399', got {_show(value)}")
    if not (100 <= low <= high <= 599):
        raise _Invalid(f"must be within 100-599, low first, got {_show(value)}")
    return (low, high)


def _host(value: Any) -> str:
    text = _string(value, "a host name for the check's Host header")
    name, colon, port = text.rpartition(":")
    if colon and port.isdigit() and not name.endswith("]") and ":" not in name:
        return f"{_check_hostname(name)}:{int(port)}"
    if text.startswith("["):
        raise _Invalid(f"give an IPv6 origin's Host as the origin's own (leave host out): {text!r}")
    return _check_hostname(text)


_d = HealthCheck()
FIELDS: dict[str, tuple[Check, Any]] = {
    "type": (_choice(CHECK_TYPES), _d.type),
    "interval": (_seconds(), _d.interval),
    "timeout": (_seconds(), _d.timeout),
    "rise": (_integer(1, 1000), _d.rise),
    "fall": (_integer(1, 1000), _d.fall),
    "method": (_method, _d.method),
    "path": (_check_path, _d.path),
    "expect_status": (_status_range, _d.expect_status),
    "host": (_host, _d.host),
    "passive_fails": (_integer(0, 1000, zero="0 = off"), _d.passive_fails),
}


class HealthKeys:
    """The reader's methods for health check tables (what they use of the reader is
    declared for type checkers only)."""

    if TYPE_CHECKING:

        def problem(self, path: str, reason: str) -> None: ...
        def table(
            self, value: Any, path: str, known: Sequence[str]
        ) -> Mapping[str, Any] | None: ...
        def field(
            self, table: Mapping[str, Any], path: str, key: str, check: Check, default: T
        ) -> T: ...

    def health_check(
        self, owner: Mapping[str, Any], path: str, base: HealthCheck | None = None
    ) -> HealthCheck | None:
        """``owner``'s ``health_check`` table over ``base`` (its route's), or ``base``."""
        if "health_check" not in owner:
            return base
        key = f"{path}.health_check"
        table = self.table(owner["health_check"], key, HEALTH_KEYS)
        if table is None:
            return base
        start = base or HealthCheck()
        values = {
            name: self.field(table, key, name, check, getattr(start, name))
            for name, (check, _default) in FIELDS.items()
        }
        spec = dataclasses.replace(start, **values)
        if spec.type == "tcp":
            for name in HTTP_ONLY:
                if name in table:
                    self.problem(
                        f"{key}.{name}",
                        f'only for type = "http" (this check is type = "{spec.type}": a '
                        'TCP connect, no request): set type = "http" or remove it',
                    )
        if ("timeout" in table or "interval" in table) and spec.timeout > spec.interval:
            self.problem(
                f"{key}.timeout",
                f"{spec.timeout:g}s is longer than interval ({spec.interval:g}s): a check would "
                "still run when the next is due",
            )
        return spec

    def health_conflicts(
        self, checks: Sequence[tuple[str, Origin, HealthCheck | None]]
    ) -> dict[Origin, HealthCheck]:
        """One check per origin: ``checks`` is (key path, origin, its check) for every origin
        of every route; two different checks of one origin are a problem naming both."""
        out: dict[Origin, HealthCheck] = {}
        where: dict[Origin, tuple[str, HealthCheck | None]] = {}
        for path, origin, spec in checks:
            if origin not in where:
                where[origin] = (path, spec)
                if spec is not None:
                    out[origin] = spec
                continue
            first_path, first = where[origin]
            if first != spec:
                self.problem(
                    f"{path}.health_check",
                    f"{origin} is also in {first_path}, checked differently there: an "
                    "origin has one health check, give both the same table",
                )
        return out
