"""Which host a request names, and the one spelling of it that routing and the origin share.

A proxy that routes by one name and forwards another is a request-routing bypass: route by
the absolute-form target ``http://a.example/`` while the origin reads ``Host: b.example`` and
the origin's virtual hosting, its caches and its access rules all act on a name the proxy
never checked. So this module decides the name once, and the server uses the same
:class:`Target` for the route, the ``Host`` the origin gets and ``X-Forwarded-Host``.

The rules, by the RFC sections they come from:

- origin-form (``/path?query``, RFC 9112 §3.2.1): the name is the Host header. A Host that
  is present but empty or whitespace, or is not ``uri-host [ ":" port ]`` (RFC 9110 §7.2,
  RFC 3986 §3.2.2), is a 400. HTTP/1.0 may omit Host; such a request can only reach the
  catch-all route, and the origin gets the origin's own authority, as nginx's proxy_host.
- absolute-form (``http://host[:port]/path``, RFC 9112 §3.2.2): the received Host is
  ignored, whatever it holds, and replaced by the target's authority. Only ``http`` and
  ``https`` are accepted (any other scheme is a 400: this is a reverse proxy for HTTP, and
  ``ftp://`` or ``javascript:`` names nothing it could serve); userinfo (``user@``) is a 400
  (RFC 9110 §4.2.4: deprecated, and a known way to disguise the real host); an empty host
  is a 400 (RFC 9110 §4.2.1).
- the name is compared lowercase, without its port and without one trailing dot
  (``App.Example.:8080`` routes as ``app.example``); the bytes forwarded are the authority as
  the client spelled it, so the origin sees what the client sent.

Pure functions, no I/O: parsed once per request from the head the codec produced.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from proxy.http1 import ProtocolError

# RFC 3986 §3.2.2 reg-name (unreserved / pct-encoded / sub-delims), or an IP-literal, then an
# optional port (*DIGIT). IPv4 addresses are reg-names by this grammar. Possessive: linear.
_AUTHORITY: Final = re.compile(
    rb"(\[[0-9A-Fa-f:.]++\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*+)(?::[0-9]*+)?"
)
_ABSOLUTE: Final = re.compile(rb"([A-Za-z][A-Za-z0-9+\-.]*+)://([^/?#]*+)(.*)", re.DOTALL)
_SCHEMES: Final = frozenset((b"http", b"https"))


@dataclass(slots=True)
class Target:
    host: str  # what routes match: lowercase, no port, no trailing dot; "" when none was named
    authority: bytes  # what the origin gets as Host (and X-Forwarded-Host); b"" when none
    path: bytes  # origin-form: what the origin gets as the request target


# Host header -> (routing name, error): clients send the same few values again and again and
# this runs once per request. Bounded in entries and key length (a DNS name is at most 253
# bytes, a port 6 more, an IPv6 literal less).
_HOSTS: dict[bytes, str | None] = {}
_HOSTS_MAX = 4096


def host_name(authority: bytes) -> str | None:
    """The routing name of ``uri-host [":" port]``, or None when it is not one (or empty)."""
    name = _HOSTS.get(authority, "")
    if name != "":
        return name
    name = _parse_authority(authority)
    if len(authority) <= 262:
        if len(_HOSTS) >= _HOSTS_MAX:
            _HOSTS.clear()
        _HOSTS[authority] = name
    return name


def _parse_authority(authority: bytes) -> str | None:
    m = _AUTHORITY.fullmatch(authority)
    if m is None:
        return None
    host = m.group(1)
    if host.startswith(b"["):
        try:
            ipaddress.IPv6Address(host[1:-1].decode("ascii"))
        except ValueError:
            return None  # IPvFuture or garbage between brackets: names nothing routable
        return host.decode("ascii").lower()
    if host.endswith(b"."):
        host = host[:-1]  # one trailing dot: the same (fully qualified) name
    if not host or host.endswith(b"."):
        return None
    return host.decode("ascii").lower()


def resolve(target: bytes, headers: Sequence[tuple[bytes, bytes]], http_version: bytes) -> Target:
    """The host a request names, by the rules of the module docstring; ProtocolError(400)
    when it names none validly."""
    if target[:1] == b"/":
        host = None
        for name, value in headers:
            if name == b"host":
                host = value
                break
        if host is None:
            if http_version == b"1.1":  # the codecs refuse this first; kept for the h11 path
                raise ProtocolError(400, "HTTP/1.1 needs a Host header")
            return Target("", b"", target)
        routed = host_name(host)
        if routed is None:
            raise ProtocolError(400, "Host is not a valid host[:port]")
        return Target(routed, host, target)
    m = _ABSOLUTE.fullmatch(target)
    if m is None:
        raise ProtocolError(400, "request target must be origin-form or absolute-form")
    scheme, authority, rest = m.groups()
    if scheme.lower() not in _SCHEMES:
        raise ProtocolError(400, "only http and https targets are proxied")
    if b"@" in authority:
        raise ProtocolError(400, "userinfo in the request target is refused")
    routed = host_name(authority)
    if not routed:
        raise ProtocolError(400, "request target has no valid host")
    if rest[:1] == b"#":
        rest = b""  # a fragment is never sent (RFC 9110 §4.2.5)
    if rest[:1] != b"/":
        rest = b"/" + rest  # "http://a" and "http://a?q" have the path "/"
    return Target(routed, authority, rest)
