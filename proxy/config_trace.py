"""The reader's part for a route's ``[routes.headers]`` and the ``[tracing]`` table.

``[routes.headers]`` is compiled here, at load, by :mod:`proxy.header_rules`, so a rule that
names a header the proxy alone decides (Connection, Transfer-Encoding, Content-Length,
Host, ...) or an unknown ``$variable`` is a ``check-config`` error naming its key, and a
reload with one is rejected with the old rules kept.

A base class of :class:`~proxy.config_reader._Reader`, as :mod:`proxy.config_health` is.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from proxy.config_model import EXPORTERS, TracingSettings
from proxy.config_values import _boolean, _choice, _Invalid, _show, _string
from proxy.header_rules import KEYS, HeaderRules, RuleError, compile_rules

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import TypeVar

    Check = Callable[[Any], Any]
    T = TypeVar("T")

TRACING_KEYS = ("enabled", "exporter", "endpoint", "service_name", "sample_ratio")


def _ratio(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _Invalid(f"must be a number from 0 to 1, got {_show(value)}")
    if not 0 <= value <= 1:
        raise _Invalid(f"must be from 0 (none) to 1 (every new trace), got {value}")
    return float(value)


def _endpoint(value: Any) -> str:
    text = _string(value, "an http(s) URL")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Invalid(f"must be an http(s) URL like 'http://127.0.0.1:4318/v1/traces': {text!r}")
    return text


def _name(value: Any) -> str:
    text = _string(value, "a service name")
    if not text.strip():
        raise _Invalid("must not be empty")
    return text


class TraceKeys:
    """``route_headers`` and ``tracing``; the reader's ``problem``/``table``/``field``."""

    if TYPE_CHECKING:

        def problem(self, path: str, reason: str) -> None: ...

        def table(
            self, value: Any, path: str, known: Sequence[str]
        ) -> Mapping[str, Any] | None: ...

        def section(
            self, data: Mapping[str, Any], name: str, known: Sequence[str]
        ) -> Mapping[str, Any]: ...

        def field(
            self, table: Mapping[str, Any], path: str, key: str, check: Check, default: T
        ) -> T: ...

    def route_headers(self, route: Mapping[str, Any], path: str) -> HeaderRules | None:
        """The route's ``headers`` table compiled, None when absent or wrong (reported)."""
        if "headers" not in route:
            return None
        where = f"{path}.headers"
        table = self.table(route["headers"], where, KEYS)
        if table is None:
            return None
        known = {k: v for k, v in table.items() if k in KEYS}  # unknown ones: reported above
        try:
            return compile_rules(known)
        except RuleError as e:
            self.problem(f"{where}.{e.key}", e.reason)
            return None

    def tracing(self, data: Mapping[str, Any]) -> TracingSettings:
        table = self.section(data, "tracing", TRACING_KEYS)
        d = TracingSettings()
        enabled = self.field(table, "tracing", "enabled", _boolean, d.enabled)
        exporter = self.field(table, "tracing", "exporter", _choice(EXPORTERS), d.exporter)
        endpoint = self.field(table, "tracing", "endpoint", _endpoint, d.endpoint)
        name = self.field(table, "tracing", "service_name", _name, d.service_name)
        ratio = self.field(table, "tracing", "sample_ratio", _ratio, d.sample_ratio)
        if exporter != "none" and not enabled:
            self.problem(
                "tracing.exporter",
                f'"{exporter}" set while tracing.enabled is false: no span would be made; '
                "set enabled = true, or remove exporter",
            )
        if exporter == "otlp" and importlib.util.find_spec("opentelemetry") is None:
            self.problem(
                "tracing.exporter",
                "\"otlp\" needs the OpenTelemetry SDK: pip install 'originpool[otel]'",
            )
        return TracingSettings(enabled, exporter, endpoint, name, ratio)
