"""Whole-message shortcuts of the fast codecs: the common request head, the common response
and the common outgoing request head, each decided in one call, and the response head.

Why a module of its own: these functions are the per-request work that no layer above can
drop, and they are pure (bytes in, fields or bytes out, no state), so they can sit beside a
compiled twin with the same behaviour, as aiohttp's and yarl's accelerators do. The C module
``proxy._whole`` implements the same functions; it is used when it was built and
:mod:`proxy.accel` allows it (``ORIGINPOOL_NO_EXTENSIONS`` unset), and this file is the
fallback, the reference and the spec. ``tests/test_whole.py`` holds the two to the same
results on random and hostile inputs, and the codecs' differential tests (which hold these
shortcuts to h11) run on both.

Each shortcut answers only the common case and returns None for anything else, errors
included: the codecs' general paths then decide with their full rules. So a shortcut can be
narrower than the general path, never different from it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from itertools import chain
from typing import Final

from proxy import accel
from proxy.http1 import WHOLE_FIELD, WHOLE_LINES, WHOLE_TOKEN, Headers, comma_items

# -- requests in (server side) ----------------------------------------------------------------

_WHOLE_HEAD: Final = re.compile(
    b"(" + WHOLE_TOKEN + rb") (/[\x21-\x7e]*+) HTTP/1\.([01])\r\n(" + WHOLE_LINES + rb")\r\n"
)
# names that make a request anything but simple: a body, a switch, an interim response
_NOT_WHOLE: Final = frozenset((b"content-length", b"transfer-encoding", b"upgrade", b"expect"))


def parse_request(data: bytes, max_line: int) -> tuple[bytes, bytes, bool, Headers, bool] | None:
    """A bodiless request head that is exactly ``data``: (method, target, HTTP/1.1?, headers,
    must close), or None.

    Narrowest h11 grammar: origin-form target, HTTP/1.0 or 1.1, header lines of token names
    and values of visible bytes, obs-text, SP and HTAB, CRLF line ends; exactly one Host; none
    of Content-Length, Transfer-Encoding, Upgrade, Expect; not CONNECT; the request line within
    ``max_line``. Names come lowercased, values without surrounding SP/HTAB, as h11 gives them.
    """
    m = _WHOLE_HEAD.fullmatch(data)
    if m is None:
        return None
    method, target, minor, block = m.groups()
    if method == b"CONNECT" or len(method) + len(target) + 11 > max_line:
        return None
    headers: Headers = []
    hosts = 0
    must_close = minor != b"1"
    for name, value in WHOLE_FIELD.findall(block):
        name = name.lower()
        value = value.rstrip(b" \t")
        if name in _NOT_WHOLE:
            return None
        if name == b"host":
            hosts += 1
        elif name == b"connection":
            must_close = must_close or b"close" in comma_items(value)
        headers.append((name, value))
    if hosts != 1:
        return None
    return method, target, minor == b"1", headers, must_close


# -- responses in (client side) ----------------------------------------------------------------

# h11's status line: the reason may be absent, empty, or any bytes but NUL/VT/FF/CR/LF
STATUS_LINE: Final = re.compile(rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: ([^\x00\n\r\x0b\x0c]*))?\r\n")
_WHOLE_BLOCK: Final = re.compile(WHOLE_LINES + rb"\r\n")
CONTENT_LENGTH: Final = re.compile(rb"[0-9]{1,20}")
FRAMING: Final = frozenset((b"content-length", b"transfer-encoding", b"connection"))


def parse_response(
    data: bytes, head_request: bool
) -> tuple[bytes, int, bytes, Headers, bool, int] | None:
    """A final response framed by one Content-Length (or bodiless: 204, 304, a HEAD's) that is
    exactly ``data``: (version, status, reason, headers, not reusable, body offset), or None.

    Not reusable: ``Connection: close`` or a version below 1.1. The header block must match
    h11's grammar in its narrowest form (as ``parse_request``), so llhttp and h11 would both
    read it to the same fields. Transfer-Encoding, a second or malformed Content-Length, a 1xx,
    a body longer or shorter than declared: None, for the general path.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    m = STATUS_LINE.match(data)
    if m is None or not _WHOLE_BLOCK.fullmatch(data, m.end(), end + 4):
        return None
    version, code, reason = m.groups()
    status = int(code)
    if status < 200:
        return None
    headers: Headers = []
    length = -1
    close = False
    for name, value in WHOLE_FIELD.findall(data, m.end(), end + 2):
        name = name.lower()
        value = value.rstrip(b" \t")
        if name in FRAMING:
            if name == b"connection":
                close = close or b"close" in comma_items(value)
            elif name == b"content-length" and length < 0 and CONTENT_LENGTH.fullmatch(value):
                length = int(value)
            else:
                return None  # chunked, a second Content-Length, a bad one
        headers.append((name, value))
    body_at = end + 4
    if status == 204 or status == 304 or head_request:
        if len(data) != body_at:
            return None
    elif length < 0 or len(data) - body_at != length:
        return None
    return version, status, reason or b"", headers, close or version < b"1.1", body_at


# -- requests out (client side) ----------------------------------------------------------------

TOKEN_CHARS: Final = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
TOKEN: Final = re.compile(TOKEN_CHARS)
TARGET: Final = re.compile(rb"[\x21-\x7e]+")
# h11's field-value: a visible byte at each end, SP/HTAB and controls but NUL/VT/FF/CR/LF inside
FIELD_VALUE: Final = rb"(?:[^\x00\s](?:[^\x00\n\r\x0b\x0c]*[^\x00\s])?)?"
# headers flattened to name LF value LF name LF value...: every name and value in one match
HEADERS: Final = re.compile(
    TOKEN_CHARS + b"\n" + FIELD_VALUE + b"(?:\n" + TOKEN_CHARS + b"\n" + FIELD_VALUE + b")*"
)
# names whose presence makes h11 reframe or refuse the request: the general path's job
SEND_FRAMING: Final = frozenset(
    (b"content-length", b"transfer-encoding", b"connection", b"upgrade")
)


def request_head(
    method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]]
) -> bytes | None:
    """A bodiless request head as h11 writes it (Host first, names as given), or None.

    Only for heads h11 sends unchanged and frames as bodiless: method a token, target
    visible bytes, names tokens, values h11's field-value, exactly one Host, and none of
    Content-Length, Transfer-Encoding, Connection, Upgrade. Anything else, and every head h11
    refuses, is None: the codec's general path writes it or raises its error.
    """
    lowered = [name.lower() for name, _ in headers]
    if not SEND_FRAMING.isdisjoint(lowered) or lowered.count(b"host") != 1:
        return None
    if not TOKEN.fullmatch(method) or not TARGET.fullmatch(target):
        return None
    flat = b"\n".join(chain.from_iterable(headers))
    if flat.count(b"\n") != 2 * len(headers) - 1 or not HEADERS.fullmatch(flat):
        return None
    host = lowered.index(b"host")
    if host:  # h11 writes Host first
        headers = [headers[host], *headers[:host], *headers[host + 1 :]]
    lines = b"\r\n".join(map(b": ".join, headers))
    return b"%s %s HTTP/1.1\r\n%s\r\n\r\n" % (method, target, lines)


# -- responses out (server side) ----------------------------------------------------------------


def response_head(status: int, reason: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The status line and header block, names and values as given: the codec has decided
    the framing headers, and h11 writes heads the same way.

    Unlike the shortcuts above it never returns None. The compiled twin takes only what the
    codecs pass, a bytes reason and ``(bytes, bytes)`` tuples, and raises TypeError for
    anything else.
    """
    block = b"".join([name + b": " + value + b"\r\n" for name, value in headers])
    return b"HTTP/1.1 %d %b\r\n%b\r\n" % (status, reason, block)


PURE: Final = {
    "parse_request": parse_request,
    "parse_response": parse_response,
    "request_head": request_head,
    "response_head": response_head,
}

if not accel.NO_EXTENSIONS:
    # not built (no compiler at install): the pure functions serve
    with contextlib.suppress(ImportError):
        from proxy._whole import (  # type: ignore[no-redef,import-not-found]
            parse_request,
            parse_response,
            request_head,
            response_head,
        )

COMPILED: Final = parse_request is not PURE["parse_request"]
