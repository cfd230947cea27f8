"""The proxy's configuration: one TOML file, checked completely before anything starts.

Why it is built this way:

* **Every problem at once.** An operator fixing a config should not play whack-a-mole, one
  restart per typo, so validation never stops at the first mistake: it collects one message
  per problem, each ``"<file>: <key.path>: <reason>"``, and :class:`ConfigError` carries them
  all. ``originpool check-config FILE`` prints them and exits 2; nothing starts.
* **No silent defaults.** Unknown keys anywhere are errors (with a "did you mean" from
  :mod:`difflib`): a misspelt ``max_idel`` that quietly fell back to the default would be
  found only in production. (Settings a demonstration mode ignores, egress addresses in
  ``plain`` and windows in ``bind``, are accepted: comparing modes changes one line.)
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
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import math
import os
import re
import ssl
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from pool.connectx import is_local_address
from pool.egress import MODES, Egress, EgressSet, Mode
from pool.origin import Origin, PoolLimits, TLSConfig
from pool.sockopt import KeepAlive

T = TypeVar("T")
Address = tuple[str, int]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Balance = Literal["round_robin", "least_conn"]
LogFormat = Literal["json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]

BALANCES: tuple[Balance, ...] = ("round_robin", "least_conn")
LOG_FORMATS: tuple[LogFormat, ...] = ("json", "console")
LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")
DEFAULT_ADMIN = "127.0.0.1:9090"
DEFAULT_TRUSTED_PROXIES = ("127.0.0.1/32", "::1/128")
MAX_WORKERS = 1024  # more than this is a typo (an extra digit), not a machine

_POOL_DEFAULTS = PoolLimits()


class ConfigError(ValueError):
    """The config is invalid; ``problems`` holds one ``"<file>: <key.path>: <reason>"`` each.

    A ``ValueError`` so generic callers can treat it as bad input; ``str()`` is the problems,
    one per line, ready to print.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


# -- the parsed config -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Listener:
    """One downstream socket; TLS when both certificate and key are given (absolute paths)."""

    address: Address
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True, slots=True)
class EgressConfig:
    """Source addresses for upstream connections; empty means the kernel's default source.

    ``allow_unassigned``: an address this host does not have at start is a warning, not an
    error, for IPs that are added after the proxy starts (the pool keeps it down until then).
    """

    mode: Mode = "connectx"
    addresses: tuple[Egress, ...] = ()
    allow_unassigned: bool = False


@dataclass(frozen=True, slots=True)
class RouteOrigin:
    """An origin of a route and its share of the route's traffic."""

    origin: Origin
    weight: int = 1


@dataclass(frozen=True, slots=True)
class Route:
    """Requests whose Host is ``host`` (or under ``*.suffix``, or any for ``*``) and whose
    path starts with the prefix.

    ``host`` is lower-case without a trailing dot, because Host headers are matched
    case-insensitively and ``example.`` names the same host as ``example``.
    """

    host: str
    path_prefix: str
    origins: tuple[RouteOrigin, ...]
    balance: Balance = "round_robin"

    @property
    def wildcard(self) -> bool:
        return self.host.startswith("*")


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """``[pool]``: limits applied to each origin (see :class:`~pool.origin.PoolLimits`)."""

    max_connections: int = _POOL_DEFAULTS.max_connections
    max_idle: int = _POOL_DEFAULTS.max_idle
    idle_timeout: float = _POOL_DEFAULTS.idle_timeout
    max_lifetime: float | None = _POOL_DEFAULTS.max_lifetime
    max_requests: int = _POOL_DEFAULTS.max_requests
    queue_size: int = _POOL_DEFAULTS.queue_size
    queue_timeout: float = _POOL_DEFAULTS.queue_timeout


@dataclass(frozen=True, slots=True)
class Timeouts:
    """``[timeouts]`` in seconds; ``websocket_idle`` None means no idle limit."""

    connect: float = 5.0  # upstream TCP (and TLS handshake) connect
    header: float = 10.0  # whole request head: slowloris gets 408
    body_idle: float = 60.0  # no request body bytes for this long: 408
    upstream_response: float = 60.0  # origin's response head: 504
    drain: float = 30.0  # on shutdown, in-flight exchanges get this long
    websocket_idle: float | None = None


@dataclass(frozen=True, slots=True)
class TCPKeepAliveSettings:
    """``[tcp_keepalive]`` on client and origin sockets: a peer gone without FIN or RST is
    found after idle + interval x probes seconds (2 min by default); ``idle`` None is off."""

    idle: int | None = 60
    interval: int = 10
    probes: int = 6

    def to_keepalive(self) -> KeepAlive | None:
        return None if self.idle is None else KeepAlive(self.idle, self.interval, self.probes)


@dataclass(frozen=True, slots=True)
class Limits:
    """``[limits]`` on downstream requests; ``max_body_bytes`` None means unlimited."""

    max_header_bytes: int = 16384  # 431
    max_request_line: int = 8192  # 414
    max_body_bytes: int | None = None  # 413
    # downstream connections per worker, all listeners; None ("auto"): as many as the
    # worker's RLIMIT_NOFILE allows at two sockets each (proxy.app.FileBudget)
    max_connections: int | None = None


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """``[proxy]``: worker processes, whose X-Forwarded-For to believe, the HTTP/1.1 parser."""

    workers: int = 1
    http_parser: str = "httptools"  # "h11": the strictness bar itself, ~4x slower per request
    trusted_proxies: tuple[Network, ...] = tuple(
        ipaddress.ip_network(n, strict=False) for n in DEFAULT_TRUSTED_PROXIES
    )

    def trusts(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self.trusted_proxies)


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    """``[upstream_tls]``: verification of origins' certificates, on unless configured off."""

    verify: bool = True
    ca_file: str | None = None


@dataclass(frozen=True, slots=True)
class LogSettings:
    """``[log]``: JSON for machines by default, console for people at a terminal."""

    format: LogFormat = "json"
    level: LogLevel = "info"


@dataclass(frozen=True, slots=True)
class Config:
    """A complete, valid configuration; built only by :func:`load` / :func:`parse`."""

    listen: tuple[Listener, ...]
    routes: tuple[Route, ...]
    admin: Address = ("127.0.0.1", 9090)
    egress: EgressConfig = field(default_factory=EgressConfig)
    pool: PoolSettings = field(default_factory=PoolSettings)
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    upstream_tls: UpstreamTLS = field(default_factory=UpstreamTLS)
    log: LogSettings = field(default_factory=LogSettings)
    tcp_keepalive: TCPKeepAliveSettings = field(default_factory=TCPKeepAliveSettings)
    source: str = "<string>"

    @property
    def origins(self) -> tuple[Origin, ...]:
        """Distinct origins over all routes, in order of first mention: one pool each."""
        seen: dict[Origin, None] = {}
        for route in self.routes:
            for ro in route.origins:
                seen.setdefault(ro.origin, None)
        return tuple(seen)

    def to_pool_limits(self) -> PoolLimits:
        p = self.pool
        return PoolLimits(
            max_connections=p.max_connections,
            max_idle=p.max_idle,
            idle_timeout=p.idle_timeout,
            max_lifetime=p.max_lifetime,
            max_requests=p.max_requests,
            queue_size=p.queue_size,
            queue_timeout=p.queue_timeout,
            connect_timeout=self.timeouts.connect,
        )

    def to_tls_config(self) -> TLSConfig:
        return TLSConfig(verify=self.upstream_tls.verify, ca_file=self.upstream_tls.ca_file)

    def to_egress_set(self, worker: int = 0) -> EgressSet:
        """Worker ``worker`` of ``proxy.workers``: each prefers its own slice of the ports."""
        share = (worker, max(1, self.proxy.workers))
        return EgressSet(self.egress.addresses, self.egress.mode, share=share)

    def summary(self) -> str:
        """One line for ``check-config`` and the startup log."""
        return ", ".join(
            [
                _count_of(len(self.listen), "listener"),
                _count_of(len(self.routes), "route"),
                _count_of(len(self.origins), "origin"),
                _count_of(len(self.egress.addresses), "egress IP"),
                f"mode {self.egress.mode}",
            ]
        )


def _count_of(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# -- entry points ----------------------------------------------------------------------------


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate the file at ``path``; raises :class:`ConfigError` (never OSError)."""
    source = os.fspath(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError([f"{source}: cannot read: {e.strerror or e}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError([f"{source}: line {line}: not UTF-8 text, as TOML requires"]) from None
    return parse(text, source, base_dir=Path(path).resolve().parent)


def load_on_host(path: str | os.PathLike[str]) -> tuple[Config, tuple[str, ...]]:
    """:func:`load`, then what this host says about it (:class:`EgressPresence`): what
    ``check-config`` and ``serve`` use. Returns the config and its warnings; raises
    :class:`ConfigError` with the host's errors when there are any."""
    config = load(path)
    report = EgressPresence().check(config)
    if report.errors:
        raise ConfigError(report.errors)
    return config, report.warnings


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
        raise ConfigError(reader.problems or [f"{source}: invalid"])
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


# -- what this host says about a valid config -----------------------------------------------


@dataclass(frozen=True, slots=True)
class HostReport:
    """Problems a config has on this host only: errors stop ``serve``, warnings are told."""

    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


class EgressPresence:
    """Egress IPs the host does not have, found before the first connect needs them.

    Apart from :func:`parse` on purpose: parsing says whether a config is right anywhere,
    this says whether it fits the namespace it runs in, so a config rendered or reviewed on
    another machine (deploy/kubernetes renders on the node, ``originpool ports`` reads the
    config to label pairs) is not refused for IPs that only the target host has.

    An unassigned IP is an error by default: a typo in an address would otherwise only show
    as a smaller capacity than planned. ``[egress] allow_unassigned = true`` turns it into a
    warning for IPs that arrive after the proxy (a failover address, a cloud secondary IP
    attached later): the pool keeps them down and takes them up once they are there.
    Presence is asked with :func:`~pool.connectx.is_local_address` (why a bind: see there).
    """

    def __init__(self, is_local: Callable[[str], bool] = is_local_address) -> None:
        self._is_local = is_local

    def check(self, config: Config) -> HostReport:
        egress = config.egress
        if egress.mode == "plain":
            return HostReport()  # the addresses are not used at all
        errors: list[str] = []
        warnings: list[str] = []
        for i, address in enumerate(egress.addresses):
            try:
                present = self._is_local(address.ip)
                reason = f"{address.ip} is not assigned to any interface in this namespace"
            except OSError as e:
                present = False
                reason = f"{address.ip} cannot be used here: {e.strerror or e}"
            if present:
                continue
            where = f"{config.source}: egress.addresses[{i}]"
            if egress.allow_unassigned:
                warnings.append(
                    f"{where}: warning: {reason}; allow_unassigned = true: the pool keeps it "
                    "down and uses it once it is added"
                )
            else:
                errors.append(
                    f"{where}: {reason} (add it, see deploy/egress-ips.md; or set [egress] "
                    "allow_unassigned = true if it is added after the proxy starts)"
                )
        return HostReport(tuple(errors), tuple(warnings))


# -- value checks: each returns the parsed value or raises _Invalid(reason) -----------------


class _Invalid(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _show(value: Any) -> str:
    """A value as the reader wrote it (TOML spelling for booleans), cut short if long."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, datetime.date | datetime.time):
        return f"a date/time ({value.isoformat()})"
    text = repr(value)
    return text if len(text) <= 60 else text[:56] + "...'"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _seconds(zero: Literal["invalid", "off", "now"] = "invalid") -> Callable[[Any], float | None]:
    """Seconds as an int or float; ``zero`` says what 0 means (refused, off -> None, or 0)."""
    if zero == "invalid":
        wanted = "must be a positive number of seconds"
    elif zero == "off":
        wanted = "must be a number of seconds >= 0 (0 = off)"
    else:
        wanted = "must be a number of seconds >= 0"

    def check(value: Any) -> float | None:
        if not _is_number(value) or (isinstance(value, float) and not math.isfinite(value)):
            raise _Invalid(f"{wanted}, got {_show(value)}")
        if value < 0 or (value == 0 and zero == "invalid"):
            raise _Invalid(f"{wanted}, got {_show(value)}")
        if value == 0 and zero == "off":
            return None
        return float(value)

    return check


def _integer(
    minimum: int, maximum: int | None = None, *, unit: str = "an integer", zero: str = ""
) -> Callable[[Any], int]:
    """Whole numbers only: ``1.5`` and ``true`` are mistakes, not 1."""
    wanted = f"must be {unit} >= {minimum}"
    if maximum is not None:
        wanted = f"must be {unit} from {minimum} to {maximum}"
    if zero:
        wanted += f" ({zero})"

    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Invalid(f"{wanted}, got {_show(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            raise _Invalid(f"{wanted}, got {_show(value)}")
        return value

    return check


def _auto(check: Callable[[Any], int]) -> Callable[[Any], int | None]:
    """``"auto"`` (None: derived at start from what the process gets) or what ``check`` takes."""

    def wrapped(value: Any) -> int | None:
        if value == "auto":
            return None
        try:
            return check(value)
        except _Invalid as e:
            reason = e.reason.replace(", got", " or 'auto', got", 1)
            raise _Invalid(reason) from None

    return wrapped


def _zero_is_none(check: Callable[[Any], int]) -> Callable[[Any], int | None]:
    def wrapped(value: Any) -> int | None:
        return check(value) or None

    return wrapped


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, got {_show(value)}")
    return value


def _choice(options: Sequence[T]) -> Callable[[Any], T]:
    shown = ", ".join(repr(o) for o in options)

    def check(value: Any) -> T:
        if value in options and isinstance(value, str):
            return value  # type: ignore[return-value]
        reason = f"must be one of {shown}; got {_show(value)}"
        if isinstance(value, str):
            near = difflib.get_close_matches(value.lower(), [str(o) for o in options], n=1)
            if near:
                reason += f" (did you mean {near[0]!r}?)"
        raise _Invalid(reason)

    return check


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string ({what}), got {_show(value)}")
    return value


_PORT = re.compile(r"[0-9]{1,5}")


def parse_address(value: Any) -> Address:
    """``"IP:PORT"`` or ``"[IPv6]:PORT"`` -> ``(ip, port)``; numeric IPs only.

    Numeric because a listener bound to whatever a name resolved to at startup is a
    surprise waiting to happen; ``0.0.0.0`` / ``[::]`` mean every address.
    """
    text = _string(value, "'IP:PORT' or '[IPv6]:PORT'")
    example = "e.g. '127.0.0.1:8080' or '[::1]:8080'"
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise _Invalid(f"{text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if not rest.startswith(":"):
            raise _Invalid(f"{text!r}: expected ':PORT' after ']', {example}")
        port_text = rest[1:]
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid(f"{text!r}: {host!r} is not a numeric IPv6 address") from None
    else:
        if ":" not in text:
            raise _Invalid(f"{text!r}: missing ':PORT', {example}")
        if text.count(":") > 1:
            raise _Invalid(f"{text!r}: an IPv6 address needs brackets, e.g. '[::1]:8080'")
        host, port_text = text.split(":")
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError:
            raise _Invalid(
                f"{text!r}: host must be a numeric IP address (0.0.0.0 for all), got {host!r}"
            ) from None
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise _Invalid(f"{text!r}: port must be 1..65535, got {port_text!r}")
    return (str(ip), int(port_text))


_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


def _check_hostname(name: str) -> str:
    """Lower-case, IDNA-encoded, no trailing dot; letters, digits, '-' and '_' per label.

    '_' is allowed because container and service-discovery names use it and resolvers
    accept it, even though RFC 952 does not.
    """
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise _Invalid("must not be empty")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise _Invalid(f"{name!r} is not a valid internationalised host name") from None
    if len(name) > 253:
        raise _Invalid(f"host name is {len(name)} characters long; at most 253")
    for label in name.split("."):
        if not _LABEL.fullmatch(label):
            if not label:
                raise _Invalid(f"{name!r} has an empty label ('..' or a leading '.')")
            raise _Invalid(
                f"{name!r}: label {label!r} must be 1-63 of a-z, 0-9, '-' and '_', "
                "not starting or ending with '-'"
            )
    return name


def _route_host(value: Any) -> str:
    """An exact name, ``*.suffix``, or ``*`` alone: the catch-all for every other host.

    The catch-all is opt-in by that one spelling: without it an unknown Host gets 421, so the
    proxy is never an open relay by accident. ``*`` anywhere else is refused.
    """
    text = _string(value, "a host name like 'app.example', '*.example' or '*'")
    if not text:
        raise _Invalid(
            "must not be empty: an exact host like 'app.example', '*.example', or '*' for any"
        )
    if text == "*":
        return text
    wildcard = text.startswith("*.")
    name = text[2:] if wildcard else text
    if "*" in name:
        raise _Invalid(
            f"{text!r}: '*' is only allowed alone (every host) or as '*.' at the start, "
            "as in '*.example'"
        )
    if ":" in name or "/" in name:
        raise _Invalid(
            f"{text!r}: just the host name, no port, scheme or path (routes match the Host "
            "header's name on every listener)"
        )
    try:
        name = _check_hostname(name)
    except _Invalid as e:
        raise _Invalid(e.reason if name else f"{text!r}: nothing after '*.'") from None
    return f"*.{name}" if wildcard else name


_BAD_PATH = re.compile(r"[\x00-\x20\x7f?#]")


def _path_prefix(value: Any) -> str:
    text = _string(value, "a path starting with '/'")
    if not text.startswith("/"):
        raise _Invalid(f"must start with '/', got {text!r}")
    bad = _BAD_PATH.search(text)
    if bad:
        raise _Invalid(
            f"{text!r}: {bad.group()!r} cannot appear in a path prefix (whitespace, control "
            "characters, '?' and '#' are not part of a request path)"
        )
    return text


def _origin_url(value: Any) -> Origin:
    """:meth:`Origin.parse` plus what it lets through: port 0, credentials, odd host chars."""
    url = _string(value, "a URL like 'http://127.0.2.1:9000'")
    try:
        origin = Origin.parse(url)
        parts = urlsplit(url)
        explicit_port = parts.port
    except ValueError as e:
        raise _Invalid(str(e)) from None
    if explicit_port == 0:
        raise _Invalid(f"{url!r}: port must be 1..65535, got 0")
    if parts.username is not None or parts.password is not None:
        raise _Invalid(f"{url!r}: no user or password in an origin URL (they would be ignored)")
    host = origin.host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if "%" in host or ":" in host:
            raise _Invalid(f"{url!r}: {host!r} is not a valid address") from None
        try:
            _check_hostname(host)
        except _Invalid as e:
            raise _Invalid(f"{url!r}: {e.reason}") from None
    return origin


# -- the reader: walks the document, collects problems ---------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key(path: str, key: object) -> str:
    text = str(key)
    if not _BARE_KEY.fullmatch(text):
        text = '"' + text.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
    return f"{path}.{text}" if path else text


Check = Callable[[Any], Any]

TOP_KEYS = (
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
)
LISTEN_KEYS = ("address", "tls_cert", "tls_key")
ADMIN_KEYS = ("address",)
EGRESS_KEYS = ("mode", "addresses", "allow_unassigned")
ROUTE_KEYS = ("host", "path_prefix", "origins", "balance")
ORIGIN_KEYS = ("url", "weight")

_d = _POOL_DEFAULTS
POOL_FIELDS: dict[str, tuple[Check, Any]] = {
    "max_connections": (_integer(1), _d.max_connections),
    "max_idle": (_integer(0, zero="0 = keep none idle"), _d.max_idle),
    "idle_timeout": (_seconds(), _d.idle_timeout),
    "max_lifetime": (_seconds("off"), _d.max_lifetime),
    "max_requests": (_integer(1), _d.max_requests),
    "queue_size": (_integer(0, zero="0 = refuse at once when all are busy"), _d.queue_size),
    "queue_timeout": (_seconds(), _d.queue_timeout),
}
TIMEOUT_FIELDS: dict[str, tuple[Check, Any]] = {
    "connect": (_seconds(), 5.0),
    "header": (_seconds(), 10.0),
    "body_idle": (_seconds(), 60.0),
    "upstream_response": (_seconds(), 60.0),
    "drain": (_seconds("now"), 30.0),
    "websocket_idle": (_seconds("off"), None),
}
LIMIT_FIELDS: dict[str, tuple[Check, Any]] = {
    "max_header_bytes": (_integer(1, unit="a number of bytes"), 16384),
    "max_request_line": (_integer(1, unit="a number of bytes"), 8192),
    "max_body_bytes": (
        _zero_is_none(_integer(0, unit="a number of bytes", zero="0 = unlimited")),
        None,
    ),
    "max_connections": (_auto(_integer(1)), None),
}
# the kernel's limits: TCP_KEEPIDLE and TCP_KEEPINTVL up to 32767 s, TCP_KEEPCNT up to 127
KEEPALIVE_FIELDS: dict[str, tuple[Check, Any]] = {
    "idle": (
        _zero_is_none(_integer(0, 32767, unit="a number of seconds", zero="0 = off")),
        60,
    ),
    "interval": (_integer(1, 32767, unit="a number of seconds"), 10),
    "probes": (_integer(1, 127), 6),
}
LOG_FIELDS: dict[str, tuple[Check, Any]] = {
    "format": (_choice(LOG_FORMATS), "json"),
    "level": (_choice(LOG_LEVELS), "info"),
}
PROXY_KEYS = ("workers", "trusted_proxies", "http_parser")
HTTP_PARSERS = ("httptools", "h11")
UPSTREAM_TLS_KEYS = ("verify", "ca_file")


def _password_refused() -> bytes:
    """An encrypted key cannot be unlocked at startup without a prompt: refuse, don't block."""
    return b""


class _Reader:
    """One pass over a decoded document; ``problems`` in the order found."""

    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir
        self.problems: list[str] = []

    def problem(self, path: str, reason: str) -> None:
        self.problems.append(f"{self.source}: {path}: {reason}")

    # -- structure ------------------------------------------------------------------------

    def table(self, value: Any, path: str, known: Sequence[str]) -> Mapping[str, Any] | None:
        """``value`` if it is a table, with every key not in ``known`` reported."""
        if not isinstance(value, Mapping):
            self.problem(path, f"must be a table, got {_show(value)}")
            return None
        for key in value:
            if str(key) in known:
                continue
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"known keys: {', '.join(known)}"
            self.problem(_key(path, key), f"unknown key; {hint}")
        return value

    def section(
        self, data: Mapping[str, Any], name: str, known: Sequence[str]
    ) -> Mapping[str, Any]:
        """An optional top-level table: ``{}`` when absent (or wrong, once reported)."""
        if name not in data:
            return {}
        return self.table(data[name], name, known) or {}

    def field(self, table: Mapping[str, Any], path: str, key: str, check: Check, default: T) -> T:
        if key not in table:
            return default
        try:
            return check(table[key])  # type: ignore[no-any-return]
        except _Invalid as e:
            self.problem(_key(path, key), e.reason)
            return default

    def fields(
        self, data: Mapping[str, Any], name: str, spec: Mapping[str, tuple[Check, Any]]
    ) -> dict[str, Any]:
        table = self.section(data, name, tuple(spec))
        return {k: self.field(table, name, k, check, d) for k, (check, d) in spec.items()}

    def array(self, table: Mapping[str, Any], path: str, key: str) -> list[Any] | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, list):
            self.problem(_key(path, key), f"must be an array, got {_show(value)}")
            return None
        return value

    def file(self, what: str) -> Check:
        """A path (relative to the config's directory) to a readable regular file."""

        def check(value: Any) -> str:
            text = _string(value, f"the path of {what}")
            if not text or "\x00" in text:
                raise _Invalid(f"must be the path of {what}, got {_show(value)}")
            path = self.base_dir / text
            try:
                if not path.exists():
                    raise _Invalid(f"{text!r}: no such file")
                if not path.is_file():
                    raise _Invalid(f"{text!r}: not a regular file")
                if not os.access(path, os.R_OK):
                    raise _Invalid(f"{text!r}: not readable by this user")
            except (OSError, ValueError) as e:  # name too long, undecodable, ...
                raise _Invalid(f"{text!r}: {getattr(e, 'strerror', None) or e}") from None
            return os.fspath(path.resolve())

        return check

    # -- the document ---------------------------------------------------------------------

    def read(self, data: Mapping[str, Any]) -> Config | None:
        if self.table(data, "", TOP_KEYS) is None:
            return None
        listen = self.listeners(data)
        admin = self.admin(data, listen)
        egress = self.egress(data)
        routes = self.routes(data, egress)
        pool = PoolSettings(**self.fields(data, "pool", POOL_FIELDS))
        timeouts = Timeouts(**self.fields(data, "timeouts", TIMEOUT_FIELDS))
        limits = Limits(**self.fields(data, "limits", LIMIT_FIELDS))
        proxy = self.proxy(data)
        upstream_tls = self.upstream_tls(data)
        log = LogSettings(**self.fields(data, "log", LOG_FIELDS))
        keepalive = TCPKeepAliveSettings(**self.fields(data, "tcp_keepalive", KEEPALIVE_FIELDS))
        if self.problems:
            return None
        return Config(
            listen=tuple(listener for _path, listener in listen),
            routes=tuple(routes),
            admin=admin,
            egress=egress,
            pool=pool,
            timeouts=timeouts,
            limits=limits,
            proxy=proxy,
            upstream_tls=upstream_tls,
            log=log,
            tcp_keepalive=keepalive,
            source=self.source,
        )

    def listeners(self, data: Mapping[str, Any]) -> list[tuple[str, Listener]]:
        value = data.get("listen")
        if value is None:
            self.problem("listen", "required: a [listen] table with address = 'IP:PORT'")
            return []
        if isinstance(value, Mapping):
            items = [("listen", value)]
        elif isinstance(value, list):
            items = [(f"listen[{i}]", item) for i, item in enumerate(value)]
            if not items:
                self.problem("listen", "at least one listener is required")
        else:
            self.problem(
                "listen",
                f"must be a table [listen] or an array of tables [[listen]], got {_show(value)}",
            )
            return []
        out: list[tuple[str, Listener]] = []
        for path, item in items:
            table = self.table(item, path, LISTEN_KEYS)
            if table is None:
                continue
            if "address" not in table:
                self.problem(_key(path, "address"), "required, e.g. '127.0.0.1:8080'")
            address = self.field(table, path, "address", parse_address, None)
            cert = self.field(table, path, "tls_cert", self.file("a PEM certificate chain"), None)
            key = self.field(table, path, "tls_key", self.file("a PEM private key"), None)
            for present, missing in (("tls_cert", "tls_key"), ("tls_key", "tls_cert")):
                if present in table and missing not in table:
                    self.problem(
                        _key(path, missing), f"required when {present} is set (TLS needs both)"
                    )
            if cert and key:
                try:
                    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                    ctx.load_cert_chain(cert, key, password=_password_refused)
                except (ssl.SSLError, OSError) as e:
                    self.problem(
                        _key(path, "tls_cert"),
                        f"cannot load this certificate with tls_key (not PEM, not a matching "
                        f"pair, or an encrypted key): {e}",
                    )
            if address is not None:
                out.append((path, Listener(address, cert, key)))
        self._collisions(out)
        return out

    def _collisions(self, listeners: Sequence[tuple[str, Listener]]) -> None:
        for i, (path, listener) in enumerate(listeners):
            for other_path, other in listeners[:i]:
                if _collide(listener.address, other.address):
                    self.problem(
                        _key(path, "address"),
                        f"{_fmt(listener.address)} collides with {other_path}.address "
                        f"({_fmt(other.address)}): both cannot bind",
                    )
                    break

    def admin(self, data: Mapping[str, Any], listen: Sequence[tuple[str, Listener]]) -> Address:
        table = self.section(data, "admin", ADMIN_KEYS)
        default = parse_address(DEFAULT_ADMIN)
        address: Address = self.field(table, "admin", "address", parse_address, default)
        for path, listener in listen:
            if _collide(address, listener.address):
                self.problem(
                    "admin.address",
                    f"{_fmt(address)} collides with {path}.address ({_fmt(listener.address)}): "
                    "the admin endpoint needs a port of its own",
                )
                break
        return address

    def egress(self, data: Mapping[str, Any]) -> EgressConfig:
        table = self.section(data, "egress", EGRESS_KEYS)
        mode: Mode = self.field(table, "egress", "mode", _choice(MODES), "connectx")
        items = self.array(table, "egress", "addresses") or []
        parsed: list[Egress] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            path = f"egress.addresses[{i}]"
            if not isinstance(item, str):
                self.problem(
                    path,
                    f"must be a string like '127.0.1.1' or '127.0.1.1:40000-40499', "
                    f"got {_show(item)}",
                )
                continue
            try:
                egress = Egress.parse(item)
            except (ValueError, OSError) as e:
                self.problem(path, str(e))
                continue
            try:
                ip = str(ipaddress.ip_address(egress.ip))
            except ValueError:
                ip = egress.ip
            if ip in seen:
                self.problem(
                    path,
                    f"duplicate IP {ip} (also egress.addresses[{seen[ip]}]): one entry per IP; "
                    "a port window slices one IP's range between hosts, not within one",
                )
                continue
            seen[ip] = i
            parsed.append(egress)
        allow = self.field(table, "egress", "allow_unassigned", _boolean, False)
        # 'plain' ignores the addresses and 'bind' the windows: accepted on purpose, so a
        # side-by-side run (the testbed) changes the mode line and nothing else
        return EgressConfig(mode, tuple(parsed), allow)

    def routes(self, data: Mapping[str, Any], egress: EgressConfig) -> list[Route]:
        value = data.get("routes")
        if value is None:
            self.problem("routes", "required: at least one [[routes]] table with host and origins")
            return []
        if isinstance(value, Mapping):
            self.problem("routes", "must be an array of tables: write [[routes]], not [routes]")
            return []
        if not isinstance(value, list):
            self.problem("routes", f"must be an array of tables [[routes]], got {_show(value)}")
            return []
        if not value:
            self.problem("routes", "at least one route is required")
        families = {4 if ":" not in e.ip else 6 for e in egress.addresses}
        out: list[Route] = []
        seen: dict[tuple[str, str], str] = {}
        for i, item in enumerate(value):
            path = f"routes[{i}]"
            table = self.table(item, path, ROUTE_KEYS)
            if table is None:
                continue
            if "host" not in table:
                self.problem(_key(path, "host"), "required: 'app.example', '*.example' or '*'")
            host = self.field(table, path, "host", _route_host, None)
            prefix = self.field(table, path, "path_prefix", _path_prefix, "/")
            balance = self.field(table, path, "balance", _choice(BALANCES), "round_robin")
            origins = self.route_origins(table, path, families)
            if host is None or origins is None:
                continue
            if (host, prefix) in seen:
                self.problem(
                    path,
                    f"same host and path_prefix as {seen[host, prefix]} ({host!r}, {prefix!r}): "
                    "the second could never match",
                )
                continue
            seen[host, prefix] = path
            out.append(Route(host, prefix, origins, balance))
        return out

    def route_origins(
        self, table: Mapping[str, Any], path: str, families: set[int]
    ) -> tuple[RouteOrigin, ...] | None:
        key = _key(path, "origins")
        if "origins" not in table:
            self.problem(key, "required: a non-empty array of origin URLs")
            return None
        items = self.array(table, path, "origins")
        if items is None:
            return None
        if not items:
            self.problem(key, "must not be empty: requests would have nowhere to go")
            return None
        out: list[RouteOrigin] = []
        seen: dict[Origin, str] = {}
        ok = True
        for j, item in enumerate(items):
            item_path = f"{key}[{j}]"
            entry = self.route_origin(item, item_path)
            if entry is None:
                ok = False
                continue
            origin = entry.origin
            if origin in seen:
                self.problem(
                    item_path,
                    f"same origin as {seen[origin]} ({origin}): raise its weight instead",
                )
                ok = False
                continue
            seen[origin] = item_path
            family = _family(origin.host)
            if families and family is not None and family not in families:
                self.problem(
                    item_path,
                    f"{origin} is IPv{family} but no egress address is: "
                    "no source address can reach it",
                )
                ok = False
                continue
            out.append(entry)
        return tuple(out) if ok else None

    def route_origin(self, item: Any, path: str) -> RouteOrigin | None:
        if isinstance(item, Mapping):
            before = len(self.problems)
            self.table(item, path, ORIGIN_KEYS)
            if "url" not in item:
                self.problem(_key(path, "url"), "required, e.g. 'http://127.0.2.1:9000'")
            origin = self.field(item, path, "url", _origin_url, None)
            weight = self.field(item, path, "weight", _integer(1, unit="an integer weight"), 1)
            if origin is None or len(self.problems) > before:
                return None
            return RouteOrigin(origin, weight)
        if not isinstance(item, str):
            self.problem(
                path,
                f"must be a URL string or a table {{url = '...', weight = N}}, got {_show(item)}",
            )
            return None
        try:
            return RouteOrigin(_origin_url(item))
        except _Invalid as e:
            self.problem(path, e.reason)
            return None

    def proxy(self, data: Mapping[str, Any]) -> ProxySettings:
        table = self.section(data, "proxy", PROXY_KEYS)
        workers = self.field(table, "proxy", "workers", _integer(1, MAX_WORKERS), 1)
        parser = self.field(table, "proxy", "http_parser", _choice(HTTP_PARSERS), "httptools")
        networks = list(ProxySettings().trusted_proxies)
        items = self.array(table, "proxy", "trusted_proxies")
        if items is not None:
            networks = []
            for i, item in enumerate(items):
                path = f"proxy.trusted_proxies[{i}]"
                if not isinstance(item, str):
                    self.problem(
                        path, f"must be a CIDR string like '10.0.0.0/8', got {_show(item)}"
                    )
                    continue
                try:
                    networks.append(ipaddress.ip_network(item.strip(), strict=False))
                except ValueError as e:
                    self.problem(path, str(e))
        return ProxySettings(workers=workers, trusted_proxies=tuple(networks), http_parser=parser)

    def upstream_tls(self, data: Mapping[str, Any]) -> UpstreamTLS:
        table = self.section(data, "upstream_tls", UPSTREAM_TLS_KEYS)
        verify = self.field(table, "upstream_tls", "verify", _boolean, True)
        ca_file = self.field(table, "upstream_tls", "ca_file", self.file("a PEM CA bundle"), None)
        if ca_file is not None:
            try:
                ssl.create_default_context(cafile=ca_file)
            except (ssl.SSLError, OSError, ValueError) as e:
                self.problem("upstream_tls.ca_file", f"cannot load as a PEM CA bundle: {e}")
        return UpstreamTLS(verify=verify, ca_file=ca_file)


def _family(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None  # a name: its addresses are only known when it resolves


def _collide(a: Address, b: Address) -> bool:
    """Same port and the same IP, or one is the wildcard of the other's family."""
    if a[1] != b[1]:
        return False
    ia, ib = ipaddress.ip_address(a[0].split("%")[0]), ipaddress.ip_address(b[0].split("%")[0])
    if ia.version != ib.version:
        return False
    return a[0] == b[0] or ia.is_unspecified or ib.is_unspecified


def _fmt(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
