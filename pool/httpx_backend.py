"""httpx / httpcore on top of the egress set: one client past one source IP's port range.

httpx normally lets the kernel pick the source address of every origin connection, so one
client is capped at one IP's ``ip_local_port_range`` per destination. Here httpcore's
network layer is replaced: every TCP connection comes from :meth:`EgressSet.connect`
(connectx, capacity-aware egress choice, failover), and closing the stream gives the
egress slot back, so the egress accounting stays exact while httpcore pools and reuses
connections as usual.

Use::

    egress = EgressSet(["192.0.2.10", "192.0.2.11"])
    async with httpx.AsyncClient(transport=egress_transport(egress)) as client:
        ...

or, for httpcore directly, ``httpcore.AsyncConnectionPool(network_backend=
EgressNetworkBackend(egress))``.

The streams are asyncio only (the egress set is): under trio, use httpcore's own backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, cast

import httpcore
import httpx
from httpcore._utils import is_socket_readable

from pool.connectx import format_address
from pool.egress import EgressSet, Slot

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``(host, port) -> numeric IPs`` in the order to try them."""

_ErrorMap = dict[type[BaseException], type[Exception]]

# TimeoutError is an OSError: it must be looked up first.
_CONNECT_ERRORS: _ErrorMap = {TimeoutError: httpcore.ConnectTimeout, OSError: httpcore.ConnectError}
_READ_ERRORS: _ErrorMap = {TimeoutError: httpcore.ReadTimeout, OSError: httpcore.ReadError}
_WRITE_ERRORS: _ErrorMap = {TimeoutError: httpcore.WriteTimeout, OSError: httpcore.WriteError}

DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)
"""httpx's own defaults; past one IP's range you want ``max_connections`` larger (or None)."""

# Receive buffering per connection before the socket stops being read, so a slow consumer
# of one streaming response holds the origin back with TCP flow control, not our memory.
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024


@contextlib.contextmanager
def _mapped(errors: _ErrorMap) -> Iterator[None]:
    """httpcore's mapping, keeping the original message (it names both addresses)."""
    try:
        yield
    except Exception as exc:
        for source, target in errors.items():
            if isinstance(exc, source):
                raise target(str(exc)) from exc
        raise


class _Protocol(asyncio.Protocol):
    """Receive buffer and connection state a stream can ask about without reading.

    ``asyncio.StreamReader`` would do for reading, but httpcore must learn whether an idle
    connection was closed by the origin (``is_readable``) and asyncio consumes the FIN
    eagerly, so the socket itself no longer looks readable; this protocol keeps that fact.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False  # no more data will arrive (FIN, or the connection is gone)
        self.error: BaseException | None = None
        self.lost = asyncio.get_running_loop().create_future()
        self._paused_reading = False
        self._paused_writing = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None

    # -- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # no isinstance check: uvloop's transports do not derive from asyncio.Transport
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake(self._read_waiter)
        if len(self.buffer) > _HIGH_WATER and self.transport and not self._paused_reading:
            self._paused_reading = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        # HTTP/1.1 has nothing to send after the origin's FIN: close our side as well.
        self.eof = True
        self._wake(self._read_waiter)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake(self._read_waiter)
        self._wake(self._drain_waiter)
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._wake(self._drain_waiter)

    # -- what the stream awaits -----------------------------------------------------------

    async def read(self, max_bytes: int) -> bytes:
        while not self.buffer and not self.eof:
            self._read_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        if not self.buffer:
            if self.error is not None:
                raise self.error
            return b""
        data = bytes(self.buffer[:max_bytes])
        del self.buffer[:max_bytes]
        if self._paused_reading and len(self.buffer) <= _LOW_WATER and self.transport:
            self._paused_reading = False
            self.transport.resume_reading()
        return data

    async def drain(self) -> None:
        while self._paused_writing and not self.lost.done():
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
        if self.lost.done():
            raise self.error or ConnectionResetError(errno.ECONNRESET, "connection lost")

    @property
    def readable(self) -> bool:
        return bool(self.buffer) or self.eof

    @staticmethod
    def _wake(waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class EgressStream(httpcore.AsyncNetworkStream):
    """One origin connection; closing it (once or many times) gives its egress slot back.

    ``start_tls`` upgrades this same object in place, so whichever reference httpcore ends
    up closing, the slot is released exactly once.
    """

    def __init__(
        self,
        transport: asyncio.Transport,
        protocol: _Protocol,
        sock: socket.socket,
        slot: Slot,
        close_timeout: float,
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self._sock = sock
        self._slot = slot
        self._close_timeout = close_timeout

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _mapped(_READ_ERRORS):
            async with asyncio.timeout(timeout):
                return await self._protocol.read(max_bytes)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        with _mapped(_WRITE_ERRORS):
            if self._transport.is_closing():
                # asyncio would drop the bytes silently; httpcore must see a failed write
                raise self._protocol.error or BrokenPipeError(errno.EPIPE, "connection closed")
            self._transport.write(buffer)
            async with asyncio.timeout(timeout):
                await self._protocol.drain()

    async def aclose(self) -> None:
        """Close, waiting (bounded) for the socket to really go before the slot returns.

        The slot is the egress set's count of live 4-tuples: released early, a new connect
        could be handed a port whose socket still exists. Past ``close_timeout`` (an origin
        that stops reading, or never answers TLS close_notify) the connection is aborted.
        """
        try:
            if not self._protocol.lost.done():
                self._transport.close()
                try:
                    async with asyncio.timeout(self._close_timeout):
                        await asyncio.shield(self._protocol.lost)
                except TimeoutError:
                    self._transport.abort()
        finally:
            if not self._protocol.lost.done():
                self._transport.abort()  # cancelled while closing: do not leave it open
            self._slot.release()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            with _mapped(_CONNECT_ERRORS):  # ssl.SSLError is an OSError: ConnectError
                async with asyncio.timeout(timeout):
                    tls = await loop.start_tls(
                        self._transport,
                        self._protocol,
                        ssl_context,
                        server_side=False,
                        server_hostname=server_hostname,
                    )
                if tls is None:
                    raise httpcore.ConnectError("TLS: the event loop returned no transport")
        except BaseException:
            # httpcore drops a stream whose start_tls failed without closing it
            await self.aclose()
            raise
        self._transport = tls
        self._protocol.transport = tls
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        if info == "socket":
            return self._sock
        if info == "is_readable":
            # the protocol knows of a FIN asyncio already read; the socket, of one it has not
            return self._protocol.readable or is_socket_readable(self._sock)
        if info == "egress_slot":
            return self._slot
        return None


class EgressNetworkBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network layer, connecting through an :class:`EgressSet`.

    ``resolver`` replaces ``getaddrinfo`` (service discovery, pinned origins, tests). Only
    addresses of a family some egress IP serves are tried: an IPv6 answer with IPv4-only
    egresses would otherwise fail as "exhausted". ``local_address`` is refused: choosing
    the source is what the egress set is for.
    """

    def __init__(
        self,
        egress: EgressSet,
        resolver: Resolver | None = None,
        *,
        close_timeout: float = 1.0,
    ) -> None:
        self.egress = egress
        self._resolver = resolver or _getaddrinfo
        self._close_timeout = close_timeout

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if local_address is not None:
            raise httpcore.ConnectError(
                f"local_address={local_address!r}: the egress set chooses source addresses"
            )
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        with _mapped(_CONNECT_ERRORS):
            async with asyncio.timeout_at(deadline):
                ips = await self._resolve(host, port)
            sock, slot = await self._connect_any(host, ips, port, deadline)
            try:
                transport, protocol = await loop.create_connection(_Protocol, sock=sock)
            except BaseException:
                sock.close()
                slot.release()
                raise
            stream = EgressStream(transport, protocol, sock, slot, self._close_timeout)
            try:
                # after the transport exists: asyncio sets TCP_NODELAY itself, and the
                # caller's options must win over ours
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for option in socket_options or ():
                    sock.setsockopt(*option)
            except OSError:
                await stream.aclose()  # the transport owns the socket now
                raise
        return stream

    async def _resolve(self, host: str, port: int) -> list[str]:
        try:
            found = [str(ipaddress.ip_address(host))]
        except ValueError:
            found = list(dict.fromkeys(await self._resolver(host, port)))
        served = {e.family for e in self.egress.egresses}
        usable = [ip for ip in found if None in served or _family(ip) in served]
        if not usable:
            egresses = ", ".join(str(e) for e in self.egress.egresses)
            raise OSError(
                errno.EAFNOSUPPORT,
                f"{host} is {', '.join(found) or 'no address'}: "
                f"no egress IP of that family (egress: {egresses})",
            )
        return usable

    async def _connect_any(
        self, host: str, ips: list[str], port: int, deadline: float | None
    ) -> tuple[socket.socket, Slot]:
        """Each address in turn within one deadline, like ``create_connection``."""
        loop = asyncio.get_running_loop()
        errors: list[OSError] = []
        for ip in ips:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                errors.append(TimeoutError(errno.ETIMEDOUT, f"connect to {host}: timed out"))
                break
            try:
                return await self.egress.connect((ip, port), timeout=remaining)
            except OSError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        kind = TimeoutError if all(isinstance(e, TimeoutError) for e in errors) else OSError
        code = errors[-1].errno or errno.EHOSTUNREACH
        detail = "; ".join(
            f"{format_address((ip, port))}: {e}" for ip, e in zip(ips, errors, strict=False)
        )
        raise kind(code, f"every address of {host} failed: {detail}")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.UnsupportedProtocol(
            f"unix socket {path!r}: egress IPs apply to TCP only; use httpcore's own backend"
        )

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def _getaddrinfo(host: str, port: int) -> list[str]:
    """The system resolver, off the event loop (it runs in the loop's executor)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


class EgressTransport(httpx.AsyncHTTPTransport):
    """``httpx.AsyncHTTPTransport`` whose connection pool connects through the egress set.

    httpx has no ``network_backend`` argument, so after httpx's own ``__init__`` (its
    argument handling, and any state later httpx versions add) the httpcore pool is rebuilt
    with the same settings plus :class:`EgressNetworkBackend`. ``_pool`` is the one private
    name relied on; it is what every method of the parent uses. The SSL context is built
    once and handed to both, so ``cert=`` warnings and certificate loading happen once.

    ``proxy``, ``uds`` and ``local_address`` are refused: each would bypass the egress
    choice or make it count connections to something other than the origin.
    """

    def __init__(
        self,
        egress: EgressSet,
        *,
        verify: ssl.SSLContext | str | bool = True,
        cert: Any = None,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = DEFAULT_LIMITS,
        retries: int = 0,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
        resolver: Resolver | None = None,
        close_timeout: float = 1.0,
        **unsupported: Any,
    ) -> None:
        unknown = set(unsupported) - {"proxy", "uds", "local_address"}
        if unknown:
            raise TypeError(f"egress transport: unexpected arguments {sorted(unknown)}")
        refused = sorted(k for k, v in unsupported.items() if v is not None)
        if refused:
            raise ValueError(
                f"egress transport: {', '.join(refused)} not supported "
                "(the egress set chooses source addresses for direct TCP connections)"
            )
        ssl_context = httpx.create_ssl_context(verify=verify, cert=cert, trust_env=trust_env)
        options = list(socket_options) if socket_options is not None else None
        super().__init__(
            verify=ssl_context,
            trust_env=trust_env,
            http1=http1,
            http2=http2,
            limits=limits,
            retries=retries,
            socket_options=options,
        )
        self.backend = EgressNetworkBackend(egress, resolver, close_timeout=close_timeout)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=http1,
            http2=http2,
            retries=retries,
            socket_options=options,
            network_backend=self.backend,
        )


def egress_transport(egress: EgressSet, **kwargs: Any) -> EgressTransport:
    """For ``httpx.AsyncClient(transport=...)``; keyword arguments as for httpx's transport."""
    return EgressTransport(egress, **kwargs)


__all__ = [
    "EgressNetworkBackend",
    "EgressStream",
    "EgressTransport",
    "Resolver",
    "egress_transport",
]
