"""Between ``accept()`` and the HTTP (or TLS) protocol: the PROXY protocol header of a
listener with ``proxy_protocol = true``, and ``conn_per_ip``, both before any protocol
object exists.

The header is read off the bare socket by peeking: every byte of a header not yet whole is
header (see :func:`proxy.proxy_protocol.parse`), so those are consumed as they come, and
once it is whole exactly its length is taken, leaving what follows (an HTTP head, a TLS
ClientHello) in the kernel for the transport made afterwards. That is why a TLS listener
can take the header too: the TLS layer is wrapped only after it. No task per connection:
a reader callback, a deadline timer, then the listener's own start.

A connection refused here (a peer not in ``trusted_proxies``, a malformed header, none
within ``[timeouts] header``, an address over ``conn_per_ip``) is reset (RST, as HAProxy's
``tcp-request connection reject``; no TIME_WAIT kept for a flood), counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog

from pool.sockopt import reset_on_close
from proxy import headers as hdrs
from proxy.limits import ClientLimits
from proxy.proxy_protocol import (
    NeedData,
    ProxyHeader,
    ProxyProtocolError,
    build_v1,
    build_v2,
    parse,
)

__all__ = ["Gate", "HeaderRead", "Owner", "preamble"]

log = structlog.get_logger("originpool.proxy")

Address = tuple[str, int]
PEEK = 4096  # a larger v2 header (long TLVs) is consumed over several reads
# originpool_proxy_protocol_refused_total{reason}: the parser's reasons and these
REASONS = (
    "untrusted",
    "timeout",
    "eof",
    "reset",
    "signature",
    "version",
    "command",
    "family",
    "address",
    "length",
    "tlv",
    "too_long",
)


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        reset_on_close(sock)
    sock.close()


def _peer(addr: object) -> Address:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return (str(addr[0]), int(addr[1]))
    return ("", 0)  # a Unix socket: nothing to trust or count by


class HeaderRead:
    """One connection's header, read from the bare socket; ``done`` gets the socket and the
    header, or the connection is refused through ``refuse`` (which closes it)."""

    __slots__ = ("_timer", "buf", "done", "loop", "peer", "refuse", "sock")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        peer: Address,
        done: Callable[[HeaderRead, ProxyHeader], None],
        refuse: Callable[[HeaderRead, str, str], None],
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.peer = peer
        self.done = done
        self.refuse = refuse
        self.buf = b""
        self._timer: asyncio.TimerHandle | None = None

    def start(self, timeout: float) -> None:
        self.loop.add_reader(self.sock.fileno(), self._readable)
        self._timer = self.loop.call_later(timeout, self._timed_out)

    def stop(self) -> None:
        """Leave the socket alone from now on (its reader and deadline removed)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.sock.fileno())

    def _timed_out(self) -> None:
        self._timer = None
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
        self.refuse(
            self, "timeout", f"no whole header within the header timeout ({self.buf!r:.40})"
        )

    def _readable(self) -> None:
        sock = self.sock
        try:
            data = sock.recv(PEEK, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.stop()
            self.refuse(self, "reset", errno.errorcode.get(e.errno or 0, str(e)))
            return
        if not data:
            self.stop()
            self.refuse(self, "eof", f"closed after {len(self.buf)} bytes of a header")
            return
        try:
            result = parse(self.buf + data)
        except ProxyProtocolError as e:
            self.stop()
            self.refuse(self, e.reason, e.detail)
            return
        if isinstance(result, NeedData):
            self.buf += sock.recv(len(data))  # all of it is header: consume, read on
            return
        want = result.length - len(self.buf)
        taken = sock.recv(want)  # peeked, so all there: exactly the header, nothing after
        self.stop()
        if len(taken) != want:  # cannot happen on a stream socket; refuse rather than guess
            self.refuse(self, "length", f"took {len(taken)} of {want} peeked bytes")
            return
        self.done(self, result)


class _Settings(Protocol):
    @property
    def trusted_proxies(self) -> Sequence[hdrs.Network]: ...
    @property
    def header_timeout(self) -> float: ...


class Owner(Protocol):
    """What the gate reads of the worker at each connection (so a reload applies at once):
    :class:`proxy.server.Proxy` is one."""

    @property
    def settings(self) -> _Settings: ...
    @property
    def limits(self) -> ClientLimits | None: ...


Start = Callable[[socket.socket, ProxyHeader | None, bytes | None], None]


class Gate:
    """One listener's admission. ``start(sock, header, key)`` is called for each connection
    let through: ``header`` the PROXY header read (None without one), ``key`` the address
    counted against ``conn_per_ip`` (None when no limit counted it), which the connection
    must hand back to :meth:`ClientLimits.close` when it ends."""

    __slots__ = ("owner", "pending", "refused", "start")

    def __init__(self, start: Start, owner: Owner) -> None:
        self.start = start
        self.owner = owner
        self.pending: set[HeaderRead] = set()
        self.refused: dict[str, int] = dict.fromkeys(REASONS, 0)

    def admit(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        addr: object,
        proxy_protocol: bool,
    ) -> None:
        peer = _peer(addr)
        if not proxy_protocol:
            self._open(sock, peer, None)
            return
        settings = self.owner.settings
        if not hdrs.is_trusted(peer[0], settings.trusted_proxies):
            self._refuse_peer(sock, peer, "untrusted", "not in [proxy] trusted_proxies")
            return
        read = HeaderRead(loop, sock, peer, self._header, self._refuse)
        self.pending.add(read)
        read.start(settings.header_timeout)

    def _header(self, read: HeaderRead, header: ProxyHeader) -> None:
        self.pending.discard(read)
        self._open(read.sock, read.peer, header)

    def _refuse(self, read: HeaderRead, reason: str, detail: str) -> None:
        self.pending.discard(read)
        self._refuse_peer(read.sock, read.peer, reason, detail)

    def _refuse_peer(self, sock: socket.socket, peer: Address, reason: str, detail: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        log.warning(
            "proxy_protocol_refused", peer=f"{peer[0]}:{peer[1]}", reason=reason, detail=detail
        )
        _reset(sock)

    def _open(self, sock: socket.socket, peer: Address, header: ProxyHeader | None) -> None:
        limits = self.owner.limits
        key = None
        if limits is not None:
            client = header.source if header is not None and header.source else peer
            key = client[0].encode()  # as the connection's client_ip spells it
            if not limits.open(key):
                log.info("client_limited", kind="conn", client=client[0], peer=_show(peer))
                _reset(sock)
                return
        self.start(sock, header, key)

    def close(self) -> None:
        """Shutdown: the headers still awaited are not waited for."""
        for read in list(self.pending):
            read.stop()
            read.sock.close()
        self.pending.clear()


def _show(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


def preamble(version: str, peer: Address, local: Address | None, transport: object) -> bytes:
    """The PROXY header a route's origin gets (``send_proxy_protocol``): the client's address
    and the one it connected to, as HAProxy's ``send-proxy-v2`` writes them. ``local`` is the
    destination a PROXY header in front said; without one, the client socket's own address
    (``transport``'s sockname, read only on such a route)."""
    if local is None:
        get = getattr(transport, "get_extra_info", None)
        name = get("sockname") if get is not None else None
        local = (str(name[0]), int(name[1])) if isinstance(name, tuple) else None
    if not peer[0] or local is None:
        return build_v2(None, None) if version == "v2" else build_v1(None, None)
    return build_v2(peer, local) if version == "v2" else build_v1(peer, local)
