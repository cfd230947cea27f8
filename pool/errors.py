"""The pool's connect errors, in one small hierarchy, each carrying the facts a log needs.

Why typed, and why here: the egress set decides "this IP left the host" against "this pair has
no port left" by the stage a connect failed at (both are EADDRNOTAVAIL), and the proxy's
``upstream_error`` line names the 4-tuple and errno of a failure. Attributes added onto a
bare ``OSError`` made both depend on ``getattr`` of names nothing declared; a class states
them, and its type checks. Every class stays an ``OSError`` with the kernel's errno, so
``except OSError`` and errno checks keep working unchanged.

=========================  =====================================================================
:class:`ConnectError`      one attempt failed: ``stage`` (bind, connect), ``local``, ``remote``,
                           ``errno``; built by :meth:`ConnectError.of` so that ECONNREFUSED is
                           still a ``ConnectionRefusedError``, ETIMEDOUT a ``TimeoutError``
:class:`EgressExhausted`   no egress IP could take a connection to a destination (full or gone)
:class:`EgressUnavailable` the same, and the only reason is that the IPs left the host
:class:`EgressLost`        an established connection whose source IP left the host
=========================  =====================================================================

No import from the rest of the pool: :mod:`pool.connectx` raises these, so this module sits
below it (:func:`format_address` lives here for that reason and is re-exported there).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Any, Literal, cast

Address = tuple[Any, ...]
"""``(ip, port)`` or, for IPv6, ``(ip, port, flowinfo, scope_id)``; ip is numeric."""

Destination = tuple[str, int]
Stage = Literal["bind", "connect"]

NOT_ON_HOST_TEXT = "egress IP not on this host"


def format_address(addr: Address) -> str:
    """``ip:port``, ``[v6]:port``; a zero port or wildcard shown as ``*``."""
    ip, port = str(addr[0]) or "*", addr[1] if addr[1] else "*"
    if ":" in ip:
        scope = f"%{addr[3]}" if len(addr) >= 4 and addr[3] else ""
        return f"[{ip}{scope}]:{port}"
    return f"{ip}:{port}"


def errno_name(code: int) -> str:
    """``ECONNREFUSED`` for 111: the name operators grep for, stable across libcs."""
    return errno.errorcode.get(code, str(code))


class UpstreamSocketError(OSError):
    """Base of the errors the pool raises about an upstream socket (all carry an errno): not
    :class:`pool.origin.PoolError`, which is an origin's own limit."""


class ConnectError(UpstreamSocketError):
    """One connect attempt refused by the kernel or the peer, at a known stage.

    ``stage`` is "bind" when the source address itself was refused (EADDRNOTAVAIL there
    means the IP is not on the host, not that ports ran out) and "connect" otherwise.
    ``local`` is the source the socket had or asked for (port 0 or a window text when the
    kernel had not chosen one; None when there was no source yet), ``remote`` the
    destination. Raise it through :meth:`of`, which keeps the builtin subclass the errno
    maps to (``OSError(ECONNREFUSED, ...)`` is a ``ConnectionRefusedError``).
    """

    stage: Stage
    local: Address | None
    remote: Address
    detail: str

    def __init__(
        self, code: int, stage: Stage, local: Address | None, remote: Address, detail: str = ""
    ) -> None:
        super().__init__(code, os.strerror(code))
        self.stage, self.local, self.remote, self.detail = stage, local, remote, detail

    @classmethod
    def of(
        cls,
        err: OSError | int,
        stage: Stage,
        local: Address | None,
        remote: Address,
        detail: str = "",
    ) -> ConnectError:
        """A ConnectError for ``err`` (an errno, or the OSError the kernel raised; one with
        no errno, a blocking connect's ``socket.timeout``, is ETIMEDOUT)."""
        if isinstance(err, int):
            code = err
        else:
            code = err.errno if err.errno is not None else errno.ETIMEDOUT
        return _typed(type(OSError(code, "")))(code, stage, local, remote, detail)

    @property
    def four_tuple(self) -> str:
        """``src:port->dst:port``, the form the ``upstream_error`` line shows."""
        local = format_address(self.local) if self.local is not None else "*:*"
        return f"{local}->{format_address(self.remote)}"

    @property
    def local_addr(self) -> Address | None:
        """The name the attribute had when it was set onto a bare OSError (kept for callers)."""
        return self.local

    @property
    def remote_addr(self) -> Address:
        """See :attr:`local_addr`."""
        return self.remote

    def __str__(self) -> str:
        code = self.errno if self.errno is not None else 0
        extra = f": {self.detail}" if self.detail else ""
        return (
            f"{self.stage} {self.four_tuple.replace('->', ' -> ')}: {errno_name(code)} "
            f"({self.strerror}){extra}"
        )


_TYPED: dict[type[OSError], type[ConnectError]] = {OSError: ConnectError}


def _typed(base: type[OSError]) -> type[ConnectError]:
    """ConnectError mixed with the builtin class its errno maps to, made once per class."""
    typed = _TYPED.get(base)
    if typed is None:
        made = type("ConnectError", (ConnectError, base), {"__module__": __name__})
        typed = _TYPED[base] = cast("type[ConnectError]", made)
    return typed


class EgressExhausted(UpstreamSocketError):
    """No egress IP could take a connection to this destination: every one is full or gone.

    An ``OSError`` with the kernel's errno (EADDRNOTAVAIL, or EADDRINUSE for bind-before-
    connect), so code that handles the kernel's refusal handles this too; ``attempts`` lists
    each egress tried with its errno, ``not_on_host`` the IPs found missing from the host
    (in this call, or still marked down and so skipped), and the message gives the kernel's
    words with each IP's reason.
    """

    def __init__(
        self,
        destination: Destination,
        attempts: Sequence[tuple[str, int]],
        not_on_host: Sequence[str] = (),
    ) -> None:
        gone = list(dict.fromkeys(not_on_host))
        tried = [
            f"{ip or 'default'}: {errno_name(code)} "
            f"({NOT_ON_HOST_TEXT if ip in gone else os.strerror(code)})"
            for ip, code in attempts
        ]
        tried_ips = {ip for ip, _code in attempts}
        tried += [f"{ip}: down ({NOT_ON_HOST_TEXT})" for ip in gone if ip not in tried_ips]
        codes = {code for _ip, code in attempts}
        # the kernel's own errno when every egress agrees (EADDRINUSE in bind mode)
        code = codes.pop() if len(codes) == 1 else errno.EADDRNOTAVAIL
        super().__init__(
            code,
            f"{os.strerror(code)}: {self._summary(destination)} (tried "
            f"{', '.join(tried) or 'none: no egress IP of this family'})",
        )
        self.destination = destination
        self.attempts = list(attempts)
        self.not_on_host = gone

    @staticmethod
    def _summary(destination: Destination) -> str:
        return f"no source port left for {format_address(destination)} on any egress IP"


class EgressUnavailable(EgressExhausted):
    """Every egress IP that could reach the destination is missing from this host.

    Not exhaustion, and said so: the message reads "egress IP not on this host". A subclass
    of :class:`EgressExhausted` because the proxy's answer is the same (503 with Retry-After:
    no source address could be used) and callers that already catch the parent, to try the
    origin's next address or to pick the status, stay right.
    """

    @staticmethod
    def _summary(destination: Destination) -> str:
        return f"{NOT_ON_HOST_TEXT}: no egress IP left to reach {format_address(destination)}"


class EgressLost(UpstreamSocketError, ConnectionAbortedError):
    """An established upstream connection whose source address the host no longer has.

    Replies to it can never be delivered, so the pool aborts it rather than let an exchange
    wait for a response that cannot come; the proxy may retry the request elsewhere. A
    ``ConnectionAbortedError`` (ECONNABORTED) naming the connection's 4-tuple and the reason.
    """

    def __init__(self, egress: str, local: Address, destination: Destination, why: str) -> None:
        super().__init__(
            errno.ECONNABORTED,
            f"egress IP {egress} gone ({why}): connection {format_address(local)} -> "
            f"{format_address(destination)} aborted",
        )
        self.egress = egress
        self.local = local
        self.destination = destination


__all__ = [
    "Address",
    "ConnectError",
    "Destination",
    "EgressExhausted",
    "EgressLost",
    "EgressUnavailable",
    "Stage",
    "UpstreamSocketError",
    "errno_name",
    "format_address",
]
