"""The listening sockets: accept, hand each connection to a client protocol, and stop
accepting at ``max_connections`` without closing the socket."""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from typing import TYPE_CHECKING, Any

import structlog

from pool.sockopt import KeepAlive, detect_dead_peer, spread_keepalive_probes
from proxy import binding
from proxy.proxy_accept import Gate
from proxy.proxy_protocol import ProxyHeader
from proxy.upstream_errors import errno_name

if TYPE_CHECKING:
    from proxy.server import Proxy

log = structlog.get_logger("originpool.proxy")


class Listener:
    """A listening socket with its own accept loop, so accepting can pause at the limit.

    asyncio's Server cannot stop accepting without closing the socket; with our own reader
    on the listening fd, reaching ``max_connections`` just removes the reader (new clients
    wait in the kernel's backlog) and the first close adds it back.
    """

    def __init__(
        self,
        proxy: Proxy,
        where: tuple[str, int] | socket.socket,
        ssl_context: ssl.SSLContext | None = None,
        what: str = "listen",
        proxy_protocol: bool = False,
        http2: bool = True,
    ) -> None:
        """``where``: a socket :mod:`proxy.binding` bound before the workers forked (what
        ``serve`` passes), or an address to bind here (tests; a failure is a BindError).
        ``proxy_protocol``: each connection starts with a PROXY header (:mod:`proxy.proxy_accept`
        reads it before TLS or HTTP see a byte)."""
        self.proxy = proxy
        self.proxy_protocol = proxy_protocol  # a reload may change it: read per connection
        self.gate = Gate(self._start, proxy)
        self.ssl = ssl_context
        # HTTP/2 next to HTTP/1.1, chosen per connection (proxy.choose): by ALPN on TLS
        self.http2 = http2  # ALPN h2 is offered by the context (proxy.tls.alpn_protocols)
        self.scheme = b"https" if ssl_context is not None else b"http"
        if isinstance(where, socket.socket):
            self.sock = where
        else:
            self.sock = binding.listening_socket(what, where)
        # set once here, inherited by every accepted socket (the kernel clones the listener's
        # options into each connection): five setsockopt calls fewer per connection
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.set_keepalive(proxy.settings.tcp_keepalive)
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()
        self._accepting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def set_keepalive(self, keepalive: KeepAlive | None) -> None:
        """Keepalive for the connections accepted from now on (they inherit it); a reload
        calls this again, so a changed or removed ``[tcp_keepalive]`` reaches new clients."""
        self.keepalive = keepalive  # each accepted socket draws its own probe times from it
        if keepalive is None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
        else:
            detect_dead_peer(self.sock, keepalive)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._resume()

    def _resume(self) -> None:
        if not self._accepting and self._loop is not None and self.sock.fileno() >= 0:
            self._loop.add_reader(self.sock.fileno(), self._accept_ready)
            self._accepting = True

    def _pause(self) -> None:
        if self._accepting and self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._accepting = False

    def _accept_ready(self) -> None:
        assert self._loop is not None
        for _ in range(64):
            busy = len(self.proxy.clients) + len(self._tasks) + len(self.gate.pending)
            if busy >= self.proxy.settings.max_connections:
                self._pause()
                return
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    log.error("accept_failed", errno=errno_name(e), error=str(e))
                    self._pause()
                    self._loop.call_later(0.1, self._resume)
                    return
                raise
            conn.setblocking(False)
            spread_keepalive_probes(conn, self.keepalive)
            if self.proxy_protocol or self.proxy.limits is not None:
                self.gate.admit(self._loop, conn, _addr, self.proxy_protocol)
                continue
            task = self._loop.create_task(
                self._loop.connect_accepted_socket(self._protocol, conn, ssl=self.ssl)
            )
            self._tasks.add(task)
            task.add_done_callback(self._accepted)

    def _start(self, conn: socket.socket, header: ProxyHeader | None, key: bytes | None) -> None:
        """A connection the gate let through: its PROXY header, and the address it counts
        against ``conn_per_ip`` (given back here if no client protocol ever took it on: a
        TLS handshake that failed)."""
        assert self._loop is not None
        made: list[asyncio.Protocol] = []

        def protocol() -> asyncio.Protocol:
            made.append(self.proxy.protocol(self.scheme, header, key, self.http2))
            return made[0]

        def accepted(task: asyncio.Task[Any]) -> None:
            self._accepted(task)
            limits = self.proxy.limits
            unclaimed = not made or getattr(made[0], "transport", None) is None
            if key is not None and limits is not None and unclaimed and task.exception():
                limits.close(key)

        task = self._loop.create_task(
            self._loop.connect_accepted_socket(protocol, conn, ssl=self.ssl)
        )
        self._tasks.add(task)
        task.add_done_callback(accepted)

    def _protocol(self) -> asyncio.Protocol:
        return self.proxy.protocol(self.scheme, http2=self.http2)

    def _accepted(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("accept_handshake_failed", error=str(task.exception()))

    def connection_closed(self) -> None:
        room = len(self.proxy.clients) < self.proxy.settings.max_connections
        if room and not self._accepting and not self.proxy.draining:
            self._resume()

    def close(self) -> None:
        self._pause()
        self.gate.close()
        self.sock.close()
