"""One health check of one origin: a TCP connect, or an HTTP/1.1 request whose status is
compared with the expected range.

The HTTP part is sans I/O (:class:`HTTPCheck`: the request's bytes out, the response's bytes
in, h11 on both sides), so its verdict on every kind of answer is tested without sockets.
:func:`probe` is the I/O: it connects through the pool's own egress set
(:meth:`pool.egress.EgressSet.connect`), the same source IPs, port windows and accounting
as the traffic, so a check is one more socket in the census from an egress IP and proves
the path traffic takes, not one from the host's default source. The connection is never
reused (a check must prove that a *new* connection works) and is closed with RST
(SO_LINGER 0, as HAProxy closes its checks): a check every 2 s per origin per worker would
otherwise leave ~30 TIME_WAIT entries per minute on the egress ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import h11

from pool.egress import EgressExhausted
from pool.errors import ConnectError
from pool.health_state import HealthCheck
from pool.origin import Origin, OriginPool
from pool.sockopt import reset_on_close

Result = Literal["pass", "connect", "timeout", "status", "protocol", "no_port", "error"]
RESULTS: tuple[Result, ...] = (
    "pass",
    "connect",
    "timeout",
    "status",
    "protocol",
    "no_port",
    "error",
)
USER_AGENT = b"originpool-health-check"
MAX_HEAD = 16384  # an answer whose head is larger than this is not worth reading further


_Done = Callable[..., "CheckResult"]  # probe()'s result builder, handed to its helpers


class ProbeError(Exception):
    """A check's answer that is no valid HTTP/1.1 response head."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check's outcome. ``result`` is the metric's label: ``pass``; ``connect`` (refused,
    unreachable), ``timeout``, ``status`` (outside ``expect_status``), ``protocol`` (no valid
    head); ``no_port`` (no egress port free: says nothing about the origin, not counted for
    or against it); ``error`` (the check itself failed unexpectedly: counted as a failure, so
    a bug shows as a down origin with its reason rather than as checks that silently
    stopped). ``four_tuple`` is the check connection's, when one was made."""

    result: Result
    detail: str
    seconds: float
    at: float  # wall clock, for the admin view
    status: int | None = None
    egress: str | None = None
    four_tuple: str | None = None

    @property
    def ok(self) -> bool:
        return self.result == "pass"

    @property
    def counts(self) -> bool:
        return self.result != "no_port"


class HTTPCheck:
    """The sans-I/O HTTP check: :meth:`request` once, then :meth:`feed` until it returns the
    status (None: more bytes needed); ``feed(b"")`` is the peer's EOF."""

    def __init__(self, spec: HealthCheck, origin: Origin) -> None:
        self.spec = spec
        self.origin = origin
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)

    def host(self) -> bytes:
        if self.spec.host:
            return self.spec.host.encode("idna")
        default = 443 if self.origin.tls else 80
        name = self.origin.host
        if ":" in name:
            name = f"[{name}]"
        if self.origin.port != default:
            name = f"{name}:{self.origin.port}"
        return name.encode("idna")

    def request(self) -> bytes:
        headers = [
            (b"host", self.host()),
            (b"user-agent", USER_AGENT),
            (b"connection", b"close"),
        ]
        method = self.spec.method.encode("ascii")
        head = self._conn.send(h11.Request(method=method, target=self.spec.path, headers=headers))
        end = self._conn.send(h11.EndOfMessage())
        return (head or b"") + (end or b"")

    def feed(self, data: bytes) -> int | None:
        """The final status once its head is in; 1xx heads are skipped."""
        self._conn.receive_data(data)
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as e:
                raise ProbeError(f"invalid response: {e}") from None
            if event is h11.NEED_DATA:
                if not data:
                    raise ProbeError("connection closed before a response head")
                return None
            if isinstance(event, h11.Response):
                return int(event.status_code)
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise ProbeError("connection closed before a response head")
            raise ProbeError(f"unexpected {type(event).__name__}")  # pragma: no cover

    def verdict(self, status: int) -> tuple[Result, str]:
        low, high = self.spec.expect_status
        if self.spec.expects(status):
            return "pass", f"HTTP {status}"
        return "status", f"HTTP {status}, expected {low}-{high}"


async def probe(
    pool: OriginPool, origin: Origin, spec: HealthCheck, ssl_context: ssl.SSLContext | None = None
) -> CheckResult:
    """One check within ``spec.timeout``, name resolution and TLS handshake included."""
    started = time.monotonic()
    at = time.time()
    where: dict[str, str] = {}

    def done(result: Result, detail: str, status: int | None = None) -> CheckResult:
        return CheckResult(
            result,
            detail,
            time.monotonic() - started,
            at,
            status,
            where.get("egress"),
            where.get("four_tuple"),
        )

    try:
        async with asyncio.timeout(spec.timeout):
            return await _exchange(pool, origin, spec, ssl_context, where, done)
    except TimeoutError:
        return done("timeout", f"no answer within {spec.timeout}s")
    except EgressExhausted as e:
        return done("no_port", str(e))
    except ProbeError as e:
        return done("protocol", str(e))
    except (OSError, ssl.SSLError) as e:
        if isinstance(e, ConnectError) and e.local is not None:  # where the SYN left from
            where.setdefault("egress", str(e.local[0]))
            where.setdefault("four_tuple", e.four_tuple)
        code = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
        return done("connect", f"{code}: {e.strerror or e}")
    except Exception as e:  # see CheckResult: the checker's loop must outlive its own bugs
        return done("error", f"{type(e).__name__}: {e}")


async def _exchange(
    pool: OriginPool,
    origin: Origin,
    spec: HealthCheck,
    ssl_context: ssl.SSLContext | None,
    where: dict[str, str],
    done: _Done,
) -> CheckResult:
    addresses = await pool.resolver.resolve(origin.host, origin.port)
    error: OSError | None = None
    for ip in addresses:
        try:
            sock, slot = await pool.egress.connect((ip, origin.port), timeout=spec.timeout)
        except OSError as e:  # EgressExhausted included: another address may have room
            error = e
            continue
        local = sock.getsockname()
        where["egress"] = str(local[0])
        where["four_tuple"] = f"{local[0]}:{local[1]}->{ip}:{origin.port}"
        with contextlib.suppress(OSError):
            reset_on_close(sock)  # RST on close: no TIME_WAIT on the egress port
        try:
            if spec.type == "tcp" and not origin.tls:
                return done("pass", "connected")
            return await _talk(sock, origin, spec, ssl_context, done)
        finally:
            sock.close()
            slot.release()
    assert error is not None
    raise error


async def _talk(
    sock: socket.socket,
    origin: Origin,
    spec: HealthCheck,
    ssl_context: ssl.SSLContext | None,
    done: _Done,
) -> CheckResult:
    """The TLS handshake (an origin whose TLS fails is down for ``tcp`` checks too: traffic
    could not reach it) and, for ``http``, the request and the response head."""
    tls = ssl_context if origin.tls else None
    reader, writer = await asyncio.open_connection(
        sock=sock.dup(), ssl=tls, server_hostname=origin.host if tls else None
    )
    try:
        if spec.type == "tcp":
            return done("pass", "connected, TLS handshake done")
        check = HTTPCheck(spec, origin)
        writer.write(check.request())
        while True:
            data = await reader.read(65536)
            status = check.feed(data)
            if status is not None:
                result, detail = check.verdict(status)
                return done(result, detail, status)
    finally:
        transport_sock = writer.get_extra_info("socket")
        if transport_sock is not None:
            with contextlib.suppress(OSError):
                reset_on_close(transport_sock)
        writer.transport.abort()
        with contextlib.suppress(Exception):
            await writer.wait_closed()  # the fd closed before its egress slot is released
