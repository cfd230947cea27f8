"""Per-route header rules and path prefix stripping, compiled once at config load.

What nginx users write as ``proxy_set_header``, ``add_header``, ``proxy_hide_header`` and
``proxy_pass http://b/`` (a URI that replaces the location's prefix), and HAProxy users as
``http-request set-header``/``add-header``/``del-header``, ``http-response ...`` and
``replace-path``, is one table per route (``[routes.headers]``) here. Each rule set is a
short list of operations on the header list that :mod:`proxy.headers` already built, so the
C twin of ``to_origin``/``to_client`` stays as it is and a route without rules pays nothing.

Order within one direction: ``*_remove``, then ``*_set`` (every field of that name replaced
by one), then ``*_add`` (appended; nginx's ``add_header`` and HAProxy's ``add-header``).

Values may name ``$request_id``, ``$remote_addr`` and ``$host`` (nginx's variable names),
expanded per request; any other ``$name`` is a config error, so a typo is not sent verbatim.

Names the proxy alone decides are refused at load, naming the key (RFC 9110 §7.6.1 and
RFC 9112 §6): the connection-specific fields (Connection, Keep-Alive, Proxy-Connection, TE,
Trailer, Upgrade, Transfer-Encoding) and Content-Length describe this hop's framing, and a
rule that set them would desynchronise the two ends of a connection (request smuggling).
Proxy-Authenticate and Proxy-Authorization are refused with them: :mod:`proxy.headers`
treats them as this hop's. Host is refused as well, although RFC 9110 does not call it
hop-by-hop: the origin gets the very name the request was routed by (:mod:`proxy.target`),
and X-Forwarded-Host repeats it; a rule that changed one without the other would make the
origin see a different site than the one the route chose.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.headers import HOP_BY_HOP, Headers

# the hop's own: framing and connection management (see the module docstring)
FORBIDDEN = HOP_BY_HOP | {b"content-length", b"host"}
VARIABLES = ("request_id", "remote_addr", "host")
DIRECTIONS = ("request", "response")
OPERATIONS = ("set", "add", "remove")
# the keys of [routes.headers]: request_set, request_add, ..., response_remove, strip_prefix
KEYS = (*tuple(f"{d}_{op}" for d in DIRECTIONS for op in OPERATIONS), "strip_prefix")

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2 field-name
_VARIABLE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class RuleError(ValueError):
    """A rule that cannot be compiled: ``key`` is its path under the route's ``headers``
    table (``request_set.Connection``), ``reason`` says why."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class Facts(Protocol):
    """What a value's variables are taken from: the exchange (request id, client, host)."""

    @property
    def request_id(self) -> bytes: ...

    @property
    def host(self) -> str: ...


# a compiled value: literal bytes, or a variable's index in VARIABLES
Part = bytes | int


@dataclass(frozen=True, slots=True)
class _Value:
    parts: tuple[Part, ...]

    @property
    def literal(self) -> bytes | None:
        if len(self.parts) == 1 and isinstance(self.parts[0], bytes):
            return self.parts[0]
        return None if self.parts else b""


def _template(value: _Value) -> bytes | int | tuple[Part, ...]:
    literal = value.literal
    if literal is not None:
        return literal
    if len(value.parts) == 1:
        return value.parts[0]
    return value.parts


def _part(part: Part, values: tuple[bytes, bytes, bytes]) -> bytes:
    return part if isinstance(part, bytes) else values[part]


@dataclass(frozen=True, slots=True)
class _Side:
    """One direction's rules: names to drop, then fields to append (set and add alike).
    ``fields`` holds each appended field whole when no value names a variable (one
    ``extend`` per request), else ``(name, value)`` with the value's parts still to expand."""

    drop: frozenset[bytes]
    fields: tuple[tuple[bytes, bytes], ...]
    templates: tuple[tuple[bytes, bytes | int | tuple[Part, ...]], ...]

    def apply(self, headers: Headers, client_ip: bytes, facts: Facts) -> None:
        drop = self.drop
        if drop:
            headers[:] = [item for item in headers if item[0] not in drop]
        if self.fields:
            headers += self.fields
            return
        if not self.templates:
            return
        values = (facts.request_id, client_ip, facts.host.encode("latin-1"))
        for name, value in self.templates:
            if isinstance(value, bytes):
                headers.append((name, value))
            elif isinstance(value, int):  # the whole value is one variable
                headers.append((name, values[value]))
            else:
                headers.append((name, b"".join([_part(p, values) for p in value])))


@dataclass(frozen=True, slots=True)
class HeaderRules:
    """A route's compiled ``[routes.headers]``; None on a route without one."""

    request: _Side | None
    response: _Side | None
    strip_prefix: str | None

    def target(self, path: str) -> str:
        """The request target the origin gets: ``strip_prefix`` taken off at a segment
        boundary (``/api`` strips ``/api`` and ``/api/x``, not ``/apix``), never leaving
        less than ``/``; the query is kept."""
        prefix = self.strip_prefix
        if not prefix or not path.startswith(prefix):
            return path
        rest = path[len(prefix) :]
        if prefix.endswith("/"):
            return "/" + rest
        if not rest or rest[0] in "?#":
            return "/" + rest
        if rest[0] != "/":
            return path  # /apix: another segment, not under /api
        return rest

    def to_origin(self, headers: Headers, client_ip: bytes, facts: Facts) -> None:
        if self.request is not None:
            self.request.apply(headers, client_ip, facts)

    def to_client(self, headers: Headers, client_ip: bytes, facts: Facts) -> None:
        if self.response is not None:
            self.response.apply(headers, client_ip, facts)


def compile_rules(table: Mapping[str, Any]) -> HeaderRules | None:
    """``[routes.headers]`` compiled; None when it asks for nothing. Raises
    :class:`RuleError` for the first bad key (the reader collects each key's own)."""
    for key in table:
        if key not in KEYS:
            raise RuleError(str(key), f"unknown key; known keys: {', '.join(KEYS)}")
    sides = [_side(table, direction) for direction in DIRECTIONS]
    prefix = table.get("strip_prefix")
    if prefix is not None:
        prefix = _prefix(prefix)
    if sides == [None, None] and prefix is None:
        return None
    return HeaderRules(sides[0], sides[1], prefix)


def _side(table: Mapping[str, Any], direction: str) -> _Side | None:
    drop: set[bytes] = set()
    append: list[tuple[bytes, _Value]] = []
    removed = table.get(f"{direction}_remove")
    if removed is not None:
        key = f"{direction}_remove"
        if not isinstance(removed, list):
            raise RuleError(key, f"must be an array of header names, got {removed!r}")
        for i, name in enumerate(removed):
            drop.add(_name(name, f"{key}[{i}]"))
    for op in ("set", "add"):
        key = f"{direction}_{op}"
        fields = table.get(key)
        if fields is None:
            continue
        if not isinstance(fields, Mapping):
            raise RuleError(key, f'must be a table of name = "value", got {fields!r}')
        for name, value in fields.items():
            where = f"{key}.{name}"
            lower = _name(name, where)
            if op == "set":
                drop.add(lower)
            append.append((lower, _value(value, where)))
    if not drop and not append:
        return None
    literals = [(name, v.literal) for name, v in append]
    if all(value is not None for _, value in literals):
        fields = tuple((name, value) for name, value in literals if value is not None)
        return _Side(frozenset(drop), fields, ())
    templates = tuple((name, _template(v)) for name, v in append)
    return _Side(frozenset(drop), (), templates)


def _name(name: object, where: str) -> bytes:
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        raise RuleError(where, f"not a header field name (RFC 9110 token): {name!r}")
    lower = name.lower().encode("ascii")
    if lower in FORBIDDEN:
        raise RuleError(
            where,
            f"{name} is the proxy's to decide (framing or this hop's connection, "
            "RFC 9110 §7.6.1; Host is the routed name): a rule may not name it",
        )
    return lower


def _value(value: object, where: str) -> _Value:
    if not isinstance(value, str):
        raise RuleError(where, f"must be a string, got {value!r}")
    if any(c in value for c in "\r\n\x00"):
        raise RuleError(where, "CR, LF and NUL are not allowed in a header value")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise RuleError(where, "must be Latin-1 text (a header value is bytes)") from None
    parts: list[Part] = []
    at = 0
    for m in _VARIABLE.finditer(value):
        name = m.group(1) or m.group(2)
        if name not in VARIABLES:
            known = ", ".join("$" + v for v in VARIABLES)
            raise RuleError(where, f"unknown variable ${name}; known: {known}")
        if m.start() > at:
            parts.append(value[at : m.start()].encode("latin-1"))
        parts.append(VARIABLES.index(name))
        at = m.end()
    if at < len(value) or not parts:
        parts.append(value[at:].encode("latin-1"))
    return _Value(tuple(parts))


def _prefix(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or value == "/":
        raise RuleError("strip_prefix", f"must be a path prefix like '/api', got {value!r}")
    if any(c in value for c in "?# \t\r\n\x00"):
        raise RuleError("strip_prefix", f"a path only (no query, spaces): {value!r}")
    return value
