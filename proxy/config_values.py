"""Checks of single config values: each returns the parsed value or raises ``_Invalid(reason)``.

Apart from the reader because a value's check needs nothing of the document around it:
the reader puts the key path in front of the reason, these say only what is wrong with the
value (strict types, ``true`` is not ``1``), so each can be read and changed on its own.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from pool.origin import Origin
from proxy.config_model import Address

T = TypeVar("T")


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


def _certificate_names(value: Any) -> tuple[str, ...]:
    """``names`` of a certificate: exact host names or ``*.parent`` (one label, RFC 6125).

    No ``*`` alone: the name-less fallback is the default certificate (the first), and a
    certificate is never chosen for a name it was not given.
    """
    if not isinstance(value, list) or not value:
        raise _Invalid(f"must be a non-empty array of host names, got {_show(value)}")
    out: list[str] = []
    for item in value:
        text = _string(item, "a host name like 'app.example' or '*.example'")
        wildcard = text.startswith("*.")
        name = text[2:] if wildcard else text
        if "*" in name:
            raise _Invalid(
                f"{text!r}: '*' only as the whole first label, as in '*.example' "
                "(the certificate for no or an unknown name is the first one)"
            )
        try:
            name = _check_hostname(name)
        except _Invalid as e:
            raise _Invalid(f"{text!r}: {e.reason}") from None
        out.append(f"*.{name}" if wildcard else name)
    return tuple(dict.fromkeys(out))
