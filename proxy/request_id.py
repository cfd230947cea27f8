"""Request ids: one per exchange, in the origin's ``X-Request-ID``, every log line of that
exchange, and the proxy's own error answers, so a user quoting the id of a 502 leads an
operator straight to the log line with the route, origin, egress IP, 4-tuple and errno
(which the client is never shown).

An id is 32 hex digits, as nginx's ``$request_id``: 16 of a random per-process prefix and a
16-digit counter. That is unique across workers and restarts without a syscall per request
(``os.urandom`` per request costs several times more than the counter). The prefix is drawn
again in every forked worker, so two workers never share one.

An incoming ``X-Request-ID`` is honoured only from a trusted proxy (the same
``trusted_proxies`` as X-Forwarded-For): anyone else could pick ids to collide with another
user's, or to forge a trail in the logs. It must look like an id (1 to 200 characters of
``A-Za-z0-9._:+/=-``: UUIDs, hex, base64); anything else is replaced, not forwarded.
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Final

_VALID: Final = re.compile(rb"[A-Za-z0-9._:+/=\-]{1,200}")

_prefix = b""
_counter = itertools.count(1)


def _reseed() -> None:
    global _prefix, _counter
    _prefix = os.urandom(8).hex().encode()
    _counter = itertools.count(1)


_reseed()
os.register_at_fork(after_in_child=_reseed)


def new() -> bytes:
    return _prefix + b"%016x" % next(_counter)


def accept(value: bytes) -> bytes:
    """``value`` when it is a well-formed id, else a new one."""
    return value if _VALID.fullmatch(value) else new()
