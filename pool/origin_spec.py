"""What an origin is and how the pool reaches it: the origin's name, the per-origin limits,
TLS settings and the resolver that turns its host into destinations.

Apart from :mod:`pool.origin`, which keeps the connections, so that each module has one
job; ``pool.origin`` re-exports these names, where callers have always found them.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import structlog

log = structlog.get_logger("originpool.origin")

DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go: the scheme decides TLS, the host decides SNI and the Host header."""

    scheme: str
    host: str
    port: int
    # a dict key several times per proxied request: hashed once, not per lookup
    _hash: int = field(init=False, repr=False, compare=False, default=0)
    _text: str = field(init=False, repr=False, compare=False, default="")  # for every log line

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.scheme, self.host, self.port)))
        host = f"[{self.host}]" if ":" in self.host else self.host
        object.__setattr__(self, "_text", f"{self.scheme}://{host}:{self.port}")

    def __hash__(self) -> int:
        return self._hash

    @classmethod
    def parse(cls, url: str) -> Origin:
        """``http://host:port`` (also https, ws, wss); raises ValueError naming the problem."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ValueError(f"{url!r}: scheme must be http, https, ws or wss")
        if not parts.hostname:
            raise ValueError(f"{url!r}: no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"{url!r}: an origin has no path, query or fragment")
        try:
            port = parts.port or DEFAULT_PORTS[scheme]
        except ValueError:
            raise ValueError(f"{url!r}: bad port") from None
        return cls(scheme, parts.hostname, port)

    @property
    def tls(self) -> bool:
        return self.scheme in ("https", "wss")

    def __str__(self) -> str:
        return self._text


@dataclass(frozen=True)
class PoolLimits:
    """Per-origin limits; defaults follow nginx (keepalive_requests 1000, 60 s idle)."""

    max_connections: int = 512  # checked out + connecting, HTTP use
    max_idle: int = 64
    idle_timeout: float = 60.0
    max_lifetime: float | None = None
    max_requests: int = 1000
    queue_size: int = 1024
    queue_timeout: float = 5.0
    connect_timeout: float = 5.0


@dataclass(frozen=True)
class TLSConfig:
    """Verification on by default; ``verify=False`` only when configured, and logged."""

    verify: bool = True
    ca_file: str | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        ctx.set_alpn_protocols(["http/1.1"])
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            log.warning("tls_verify_disabled", reason="configured: verify = false")
        return ctx


Resolve = Callable[[str, int], Awaitable[list[str]]]


class Resolver:
    """Hostname -> addresses, cached for ``ttl`` seconds; never blocks the loop."""

    def __init__(
        self,
        ttl: float = 30.0,
        lookup: Resolve | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self._lookup = lookup or _getaddrinfo
        self._clock = clock
        self._cache: dict[tuple[str, int], tuple[float, list[str]]] = {}

    async def resolve(self, host: str, port: int) -> list[str]:
        if _is_numeric(host):
            return [host]
        key = (host, port)
        hit = self._cache.get(key)
        now = self._clock()
        if hit is not None and now < hit[0]:
            return hit[1]
        addresses = await self._lookup(host, port)
        if not addresses:
            raise OSError(errno.EHOSTUNREACH, f"{host}: resolved to no addresses")
        self._cache[key] = (now + self.ttl, addresses)
        return addresses


async def _getaddrinfo(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[str, None] = {}
    for _family, _type, _proto, _canon, addr in infos:
        seen.setdefault(str(addr[0]), None)
    return list(seen)


def _is_numeric(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            continue
    return False
