"""The proxy's configuration: one TOML file, checked completely before anything starts.

Why it is built this way:

* **Every problem at once.** An operator fixing a config should not play whack-a-mole, one
  restart per typo, so validation never stops at the first mistake: it collects one message
  per problem, each ``"<file>: <key.path>: <reason>"``, and :class:`ConfigError` carries them
  all. ``originpool check-config FILE`` prints them and exits 2; nothing starts.
* **No silent defaults.** Unknown keys anywhere are errors (with a "did you mean" from
  :mod:`difflib`): a misspelt ``max_idel`` that quietly fell back to the default would be
  found only in production. Egress addresses with ``mode = "plain"``, which would ignore
  them, are refused the same way; windows in ``bind`` are accepted (comparing modes
  changes one line). What this host says (egress IPs not assigned here) is asked of the
  ``[egress]`` section even when the rest has problems, and told with them.
* **Failures that would only surface at startup or at the first request surface here**:
  certificate/key pairs and CA bundles are loaded, listener addresses that would collide on
  bind are reported, origins the egress addresses cannot reach are reported.
* **Strict types.** TOML has distinct integers, floats and booleans; ``true`` is not ``1``
  and ``"5"`` is not ``5``. A value of the wrong type is reported, never coerced.
* **Frozen dataclasses** out: the running proxy cannot mutate its config by accident, and
  the pool layer gets its own types (:class:`~pool.origin.PoolLimits`,
  :class:`~pool.origin.TLSConfig`, :class:`~pool.egress.EgressSet`) from one place.

Relative file paths (``tls_cert``, ``tls_key``, ``ca_file``) are relative to the config
file's directory, so the answer of ``check-config`` does not depend on the directory the
proxy happens to be started from.

The work is split by job, one module each, and this module is the one to import: it
holds the entry points and :class:`ConfigError` and re-exports the rest. The types are in
:mod:`proxy.config_model`, the walk over the document in :mod:`proxy.config_reader`, the
checks of single values in :mod:`proxy.config_values` and what this host says about a
valid config in :mod:`proxy.config_host`.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from proxy.config_drain import admin_warnings
from proxy.config_host import EgressPresence, HostReport, log_file_problems
from proxy.config_model import (
    _POOL_DEFAULTS,
    BALANCES,
    DEFAULT_ADMIN,
    DEFAULT_PID_FILE,
    DEFAULT_TRUSTED_PROXIES,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_WORKERS,
    Address,
    Balance,
    Config,
    EgressConfig,
    Limits,
    Listener,
    LogFormat,
    LogLevel,
    LogSettings,
    Network,
    PoolSettings,
    ProxySettings,
    Route,
    RouteOrigin,
    TCPKeepAliveSettings,
    Timeouts,
    UpstreamTLS,
    _count_of,
)
from proxy.config_reader import (
    ADMIN_KEYS,
    EGRESS_KEYS,
    HTTP_PARSERS,
    KEEPALIVE_FIELDS,
    LIMIT_FIELDS,
    LISTEN_KEYS,
    LOG_FIELDS,
    ORIGIN_KEYS,
    POOL_FIELDS,
    PROXY_KEYS,
    ROUTE_KEYS,
    TIMEOUT_FIELDS,
    TOP_KEYS,
    UPSTREAM_TLS_KEYS,
    Check,
    _collide,
    _family,
    _fmt,
    _key,
    _password_refused,
    _Reader,
)
from proxy.config_values import (
    _auto,
    _boolean,
    _check_hostname,
    _choice,
    _integer,
    _Invalid,
    _is_number,
    _origin_url,
    _path_prefix,
    _route_host,
    _seconds,
    _show,
    _string,
    _zero_is_none,
    parse_address,
)
from proxy.tls import certificate_warnings

# the public names, and the private ones of the modules split off from this one: every name
# that was importable from here before the split still is
__all__ = [
    "ADMIN_KEYS",
    "BALANCES",
    "DEFAULT_ADMIN",
    "DEFAULT_PID_FILE",
    "DEFAULT_TRUSTED_PROXIES",
    "EGRESS_KEYS",
    "HTTP_PARSERS",
    "KEEPALIVE_FIELDS",
    "LIMIT_FIELDS",
    "LISTEN_KEYS",
    "LOG_FIELDS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_WORKERS",
    "ORIGIN_KEYS",
    "POOL_FIELDS",
    "PROXY_KEYS",
    "ROUTE_KEYS",
    "TIMEOUT_FIELDS",
    "TOP_KEYS",
    "UPSTREAM_TLS_KEYS",
    "_POOL_DEFAULTS",
    "Address",
    "Balance",
    "Check",
    "Config",
    "ConfigError",
    "EgressConfig",
    "EgressPresence",
    "HostReport",
    "Limits",
    "Listener",
    "LogFormat",
    "LogLevel",
    "LogSettings",
    "Network",
    "PoolSettings",
    "ProxySettings",
    "Route",
    "RouteOrigin",
    "TCPKeepAliveSettings",
    "Timeouts",
    "UpstreamTLS",
    "_Invalid",
    "_Reader",
    "_auto",
    "_boolean",
    "_check_hostname",
    "_choice",
    "_collide",
    "_count_of",
    "_family",
    "_fmt",
    "_integer",
    "_is_number",
    "_key",
    "_origin_url",
    "_password_refused",
    "_path_prefix",
    "_route_host",
    "_seconds",
    "_show",
    "_string",
    "_zero_is_none",
    "from_dict",
    "load",
    "load_on_host",
    "parse",
    "parse_address",
    "pid_file_of",
]


class ConfigError(ValueError):
    """The config is invalid; ``problems`` holds one ``"<file>: <key.path>: <reason>"`` each.

    A ``ValueError`` so generic callers can treat it as bad input; ``str()`` is the problems,
    one per line, ready to print.
    """

    def __init__(self, problems: Sequence[str], egress: EgressConfig | None = None) -> None:
        self.problems: list[str] = list(problems)
        # the [egress] section, when it was read although the document failed: what
        # load_on_host still asks the host about, so every problem comes out in one run
        self.egress = egress
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


# -- entry points ----------------------------------------------------------------------------


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate the file at ``path``; raises :class:`ConfigError` (never OSError)."""
    return parse(_read_text(path), os.fspath(path), base_dir=Path(path).resolve().parent)


def _read_text(path: str | os.PathLike[str]) -> str:
    source = os.fspath(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError([f"{source}: cannot read: {e.strerror or e}"]) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError([f"{source}: line {line}: not UTF-8 text, as TOML requires"]) from None


def pid_file_of(path: str | os.PathLike[str]) -> str:
    """The ``[proxy] pid_file`` of the config at ``path`` (the default when unset), reading
    nothing else: ``originpool stop`` must work while the rest of the file is being edited
    and does not yet validate. :class:`ConfigError` if the file or that key is unusable."""
    source = os.fspath(path)
    text = _read_text(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{source}: {_syntax_problem(str(e), text)}"]) from None
    reader = _Reader(source, Path(path).resolve().parent)
    table = data.get("proxy")
    table = table if isinstance(table, Mapping) else {}
    found = reader.field(table, "proxy", "pid_file", reader.new_file("the pid file"), None)
    if reader.problems:
        raise ConfigError(reader.problems)
    return found or DEFAULT_PID_FILE


def load_on_host(path: str | os.PathLike[str]) -> tuple[Config, tuple[str, ...]]:
    """:func:`load`, then what this host says about it (:class:`EgressPresence`): what
    ``check-config`` and ``serve`` use. Returns the config and its warnings; raises
    :class:`ConfigError` with the host's errors when there are any."""
    try:
        config = load(path)
    except ConfigError as e:
        if e.egress is None:
            raise
        # the document's problems and the host's in one answer (issue 18): fixing a typo
        # must not reveal a missing address only on the next run
        found = EgressPresence().check_egress(e.egress, os.fspath(path))
        raise ConfigError(_by_address(e.problems + list(found.errors))) from None
    report = EgressPresence().check(config)
    errors = report.errors + log_file_problems(config)
    if errors:
        raise ConfigError(errors)
    # certificates that load but will fail clients (names, expiry): the clock is the host's
    return config, (
        report.warnings
        + certificate_warnings(config.listen, config.source)
        + tuple(admin_warnings(config))
    )


_ADDRESS_KEY = re.compile(r": egress\.addresses\[(\d+)\]: ")


def _by_address(problems: list[str]) -> list[str]:
    """The problems with those about ``egress.addresses[i]`` put in ``i`` order among the
    places they hold, so the document's and the host's answers about one array read as one."""
    at = [(i, m) for i, p in enumerate(problems) if (m := _ADDRESS_KEY.search(p)) is not None]
    ordered = sorted((int(m[1]), i) for i, m in at)
    out = list(problems)
    for (slot, _m), (_index, source) in zip(at, ordered, strict=True):
        out[slot] = problems[source]
    return out


def parse(
    text: str, source: str = "<string>", *, base_dir: str | os.PathLike[str] | None = None
) -> Config:
    """Validate TOML ``text``; ``source`` names it in messages, ``base_dir`` anchors paths."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{source}: {_syntax_problem(str(e), text)}"]) from None
    return from_dict(data, source, base_dir=base_dir)


def from_dict(
    data: Mapping[str, Any],
    source: str = "<string>",
    *,
    base_dir: str | os.PathLike[str] | None = None,
) -> Config:
    """Validate an already-decoded document (what :func:`tomllib.loads` returns)."""
    reader = _Reader(source, Path(base_dir) if base_dir is not None else Path.cwd())
    config = reader.read(data)
    if reader.problems or config is None:
        raise ConfigError(reader.problems or [f"{source}: invalid"], reader.egress_read)
    return config


_AT = re.compile(
    r"^(?P<msg>.*?)\s*\(at (?:line (?P<line>\d+), column (?P<col>\d+)|end of document)\)$"
)


def _syntax_problem(message: str, text: str = "") -> str:
    """tomllib's "Invalid value (at line 3, column 9)" as "line 3, column 9: invalid TOML: ...".

    Two mistakes get tomllib's words replaced, because they name no key and no fix: a
    table declared both as ``[x]`` and ``[[x]]`` ("Cannot overwrite a value" or "Cannot
    declare ('x',) twice", depending on the order) and a ``[x]`` table written twice.
    """
    m = _AT.match(message)
    if m is None:
        return f"invalid TOML: {message}"
    if m["line"] is None:
        return f"end of document: invalid TOML: {m['msg']}"
    explained = _TableHeaders(text).explain(int(m["line"]))
    if explained is not None:
        return explained
    return f"line {m['line']}, column {m['col']}: invalid TOML: {m['msg']}"


_HEADER = re.compile(r"\s*(?P<open>\[\[?)\s*(?P<key>[^\[\]#]+?)\s*(?P<close>\]\]?)\s*(?:#.*)?")
_QUOTED_PART = re.compile(r'"([A-Za-z0-9_-]+)"|\'([A-Za-z0-9_-]+)\'')
# the form each top-level array of tables must take, in the words of the fix
_ARRAY_FIX = {"listen": "every listener", "routes": "every route"}


class _TableHeaders:
    """The table headers of a TOML text, to name the key behind a header tomllib refused.

    Only consulted after tomllib failed, and only for the lines before the failing one, so
    a header-like line inside a multi-line string can at worst give a less exact message.
    """

    def __init__(self, text: str) -> None:
        self.headers: list[tuple[int, str, bool]] = []  # (line, key, is array of tables)
        self.keys: list[tuple[int, str]] = []  # (line, full key path) of "key = value" lines
        table = ""
        for number, line in enumerate(text.splitlines(), 1):
            m = _HEADER.fullmatch(line)
            if m is not None and len(m["open"]) == len(m["close"]):
                table = _dotted(m["key"])
                array = len(m["open"]) == 2
                self.headers.append((number, table, array))
                if array:  # keys below it belong to its newest element, as in problems
                    table += f"[{sum(1 for _n, k, a in self.headers if k == table and a) - 1}]"
                continue
            k = _KEY_LINE.match(line)
            if k is not None:
                self.keys.append(
                    (number, _key(table, _dotted(k["key"])) if table else _dotted(k["key"]))
                )

    def explain(self, line: int) -> str | None:
        here = next(((k, arr) for n, k, arr in self.headers if n == line), None)
        if here is None:
            return self._key_twice(line)
        key, array = here
        earlier = [(n, arr) for n, k, arr in self.headers if n < line and k == key]
        if not earlier:
            return None
        if any(arr != array for _n, arr in earlier):
            table_line = next(n for n, arr in [*earlier, (line, array)] if not arr)
            array_line = next(n for n, arr in [*earlier, (line, array)] if arr)
            if key in _ARRAY_FIX:
                fix = f"use [[{key}]] for {_ARRAY_FIX[key]}"
            else:
                fix = f"[{key}] is a single table: write [{key}] once"
            return (
                f"{key}: mixes a [{key}] table (line {table_line}) and [[{key}]] "
                f"array-of-tables (line {array_line}); {fix}"
            )
        if not array:
            return (
                f"{key}: [{key}] appears twice (lines {earlier[0][0]} and {line}); "
                f"put all its keys under one [{key}]"
            )
        return None

    def _key_twice(self, line: int) -> str | None:
        here = next((k for n, k in self.keys if n == line), None)
        first = next((n for n, k in self.keys if k == here and n < line), None)
        if here is None or first is None:
            return None
        return f"{here}: set twice (lines {first} and {line}); keep one"


_KEY_LINE = re.compile(r"\s*(?P<key>[A-Za-z0-9_-]+(?:\s*\.\s*[A-Za-z0-9_-]+)*)\s*=")


def _dotted(key: str) -> str:
    """A TOML key as one dotted path: spaces around dots and quotes of bare-able parts go."""
    return ".".join(
        _QUOTED_PART.sub(lambda q: q[1] or q[2], part.strip()) for part in key.split(".")
    )
