"""HPACK with a memory: a header block that leaves the dynamic table as it found it is coded
once per table state, not once per request.

Why: hpack is pure Python, a loop of table searches and integer codings per field, ~17% of
the proxy's own time per HTTP/2 request (``bench/proxy_cycle.py --http2 --profile``). HPACK
is stateful per connection (RFC 7541 §2.3), so a block's bytes are a function of the field
list *and* the dynamic table; but once a client's or the proxy's fields are in the table, the
same request (h2load's, a poller's, a gRPC client's) or the same response head (an origin's
``server``, ``content-type``, ``via``) codes to the same indexed bytes and touches nothing. So
each coder keeps a few results keyed by their input, with the table state they were made in,
and reuses one only in that same state and only if making it changed nothing:

- the state is the newest entry (by identity: every insertion makes a new tuple, and the
  entry is held here so its identity is not reused), the number of entries and the table's
  maximum size; an insertion, an eviction with it, a clear or a resize each change it;
- a block whose coding inserted (or resized) is never kept: coding it again would differ;
- the encoder never serves from memory while a table size update is pending (it has to go
  out first) nor for fields marked sensitive (hpack's ``HeaderTuple`` kinds);
- at most ``ENTRIES`` results of at most ``BLOCK_BYTES`` each are kept per connection.

Decoding limits hold for a result served from memory: the same bytes in the same state
decode to the same list, of the same size checked when it was first decoded.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hpack import Decoder, Encoder
from hpack.table import HeaderTable

ENTRIES = 16
BLOCK_BYTES = 512  # encoded block size kept (a few dozen bytes once indexed)


def _state(table: HeaderTable) -> tuple[object, int, int]:
    entries = table.dynamic_entries
    return (entries[0] if entries else None, len(entries), table.maxsize)


def _same(a: tuple[object, int, int], b: tuple[object, int, int]) -> bool:
    return a[0] is b[0] and a[1] == b[1] and a[2] == b[2]


class MemoEncoder(Encoder):
    """hpack's encoder, remembering blocks that were all indexed (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.memo: dict[tuple[Any, ...], tuple[tuple[object, int, int], bytes]] = {}

    def encode(self, headers: Iterable[Any], huffman: bool = True) -> bytes:
        table = self.header_table
        key = tuple(headers) if huffman else None
        if key is not None:
            got = self.memo.get(key)
            if got is not None and not table.resized and _same(got[0], _state(table)):
                return got[1]
            if any(type(h) is not tuple for h in key):  # sensitive fields: hpack's own path
                key = None
        before = None if table.resized else _state(table)
        out = super().encode(key if key is not None else headers, huffman)
        if key is not None and before is not None and len(out) <= BLOCK_BYTES:
            now = _state(table)
            if _same(before, now):
                if len(self.memo) >= ENTRIES:
                    self.memo.clear()
                self.memo[key] = (now, out)
        return out


class MemoDecoder(Decoder):
    """hpack's decoder, remembering blocks whose decoding left the table as it was."""

    def __init__(self, max_header_list_size: int = 2**16) -> None:
        super().__init__(max_header_list_size)
        self.memo: dict[bytes, tuple[tuple[object, int, int], int, list[Any]]] = {}

    def decode(self, data: bytes, raw: bool = False) -> list[Any]:
        table = self.header_table
        key = bytes(data) if raw and len(data) <= BLOCK_BYTES else None
        if key is not None:
            got = self.memo.get(key)
            if (
                got is not None
                and got[1] == self.max_header_list_size  # checked against this limit
                and _same(got[0], _state(table))
            ):
                return list(got[2])  # a list of its own: h2's event holds it
        before = _state(table)
        headers = list(super().decode(data, raw))
        if key is not None:
            now = _state(table)
            if _same(before, now):
                if len(self.memo) >= ENTRIES:
                    self.memo.clear()
                self.memo[key] = (now, self.max_header_list_size, headers)
                return list(headers)
        return headers
