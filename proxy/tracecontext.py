"""W3C Trace Context (https://www.w3.org/TR/trace-context/): the ``traceparent`` and
``tracestate`` an origin gets, and the trace id every log line of the request names.

``traceparent`` is ``version-traceid-parentid-flags``: version 2 lower-case hex digits (``ff``
invalid), trace id 32 and parent id 16 lower-case hex digits, neither all zeros, flags 2
hex digits. Version ``00`` is exactly 55 characters; a later version may carry more after a
``-`` at position 55, and its first four fields are read as version 00's (the spec's rule
for forward compatibility). Anything else, or more than one ``traceparent`` field, is
invalid, and an invalid one is treated as absent.

The proxy is a hop of the trace: it keeps the trace id and flags of a trusted peer's
traceparent (``trusted_proxies``, as for X-Forwarded-For and X-Request-ID: anyone else could
join their requests to another user's trace or pick ids that collide), makes a span id of its
own, and sends that as the origin's parent id, so the origin's span is the child of the
proxy's. ``tracestate`` goes along only with a traceparent that was kept: the spec ties the
two together, and a vendor's state from an untrusted peer is as forgeable as its trace id.
From anyone else, or when absent or invalid, a new trace starts, sampled with
``sample_ratio``.

Ids come from ``os.urandom`` (one 24-byte read gives a new trace id and span id): the spec
asks for random trace ids, and this runs only when ``[tracing] enabled`` is set.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from proxy.headers import Headers

_HEX: Final = re.compile(rb"[0-9a-f]+")
_ZERO_TRACE: Final = b"0" * 32
_ZERO_SPAN: Final = b"0" * 16
SAMPLED: Final = 0x01
MAX_STATE: Final = 512  # the spec's floor for what a vendor must pass on; longer is dropped


@dataclass(frozen=True, slots=True)
class Parent:
    """A valid incoming traceparent's fields."""

    trace_id: bytes
    parent_id: bytes
    flags: int


def parse(value: bytes) -> Parent | None:
    """The traceparent's fields, or None when it is not a valid one (see the module)."""
    if len(value) < 55 or value[2:3] != b"-" or value[35:36] != b"-" or value[52:53] != b"-":
        return None
    version = value[:2]
    if not _HEX.fullmatch(version) or version == b"ff":
        return None
    if version == b"00" and len(value) != 55:
        return None
    if len(value) > 55 and value[55:56] != b"-":
        return None
    trace_id, parent_id, flags = value[3:35], value[36:52], value[53:55]
    if not (_HEX.fullmatch(trace_id) and _HEX.fullmatch(parent_id) and _HEX.fullmatch(flags)):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return Parent(trace_id, parent_id, int(flags, 16))


class Trace:
    """This request's place in a trace: ``span_id`` is the proxy's own span (the origin's
    parent), ``parent_id`` the caller's span when the trace was kept, else None.

    A plain slotted class, not a frozen dataclass: one is made per traced request, and a
    frozen dataclass's ``__init__`` costs several times more."""

    __slots__ = ("connected", "flags", "head", "parent_id", "span_id", "state", "trace_id")

    def __init__(
        self,
        trace_id: bytes,
        span_id: bytes,
        parent_id: bytes | None,
        flags: int,
        state: bytes | None = None,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.flags = flags
        self.state = state
        # monotonic times of the origin connection's attach and of the first response head
        # (proxy.observe's hooks), 0.0 until then: the exported span's events
        self.connected = 0.0
        self.head = 0.0

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def traceparent(self) -> bytes:
        return b"00-%s-%s-%02x" % (self.trace_id, self.span_id, self.flags)


def _new_span() -> bytes:
    while True:
        span = os.urandom(8).hex().encode()
        if span != _ZERO_SPAN:
            return span


def begin(headers: Sequence[tuple[bytes, bytes]], trusted: bool, sample_ratio: float) -> Trace:
    """The request's trace: the caller's, kept when ``trusted`` and valid, else a new one."""
    if trusted:
        found: list[bytes] = []
        state: list[bytes] = []
        for name, value in headers:
            if name == b"traceparent":
                found.append(value)
            elif name == b"tracestate":
                state.append(value.strip())
        parent = parse(found[0].strip()) if len(found) == 1 else None
        if parent is not None:
            joined = b",".join(s for s in state if s) or None
            if joined is not None and len(joined) > MAX_STATE:
                joined = None
            return Trace(parent.trace_id, _new_span(), parent.parent_id, parent.flags, joined)
    while True:
        ids = os.urandom(24).hex().encode()
        trace_id, span_id = ids[:32], ids[32:]
        if trace_id != _ZERO_TRACE and span_id != _ZERO_SPAN:
            break
    sampled = sample_ratio >= 1.0 or (sample_ratio > 0.0 and random.random() < sample_ratio)
    return Trace(trace_id, span_id, None, SAMPLED if sampled else 0)


def inject(headers: Headers, trace: Trace) -> None:
    """The origin's ``traceparent`` (and ``tracestate`` when kept) in place of the client's."""
    headers[:] = [item for item in headers if item[0] not in _TRACE_FIELDS]
    headers.append((b"traceparent", trace.traceparent()))
    if trace.state is not None:
        headers.append((b"tracestate", trace.state))


_TRACE_FIELDS: Final = frozenset((b"traceparent", b"tracestate"))
