"""proxy.http2_hpack: the memo must never change a byte of what HPACK says.

Why: HPACK is stateful per connection; a block served from memory in the wrong table state
would desynchronise the peer's table (every later header wrong) or hand the proxy another
request's fields. So each coder is run beside plain hpack over long random sequences (fields
repeated, new values inserted and evicting, table resizes) and must agree with it byte for
byte and field for field, while actually serving repeats from memory.
"""

from __future__ import annotations

import random

import pytest
from hpack import Decoder, Encoder, NeverIndexedHeaderTuple
from hpack.exceptions import OversizedHeaderListError

from proxy.http2_hpack import MemoDecoder, MemoEncoder

POOL = [
    [(b":status", b"200"), (b"server", b"nginx"), (b"content-type", b"text/plain")],
    [(b":status", b"404"), (b"content-length", b"13"), (b"via", b"1.1 originpool")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"), (b":path", b"/")],
    [(b":method", b"GET"), (b":path", b"/api"), (b"accept", b"*/*"), (b"x-big", b"v" * 900)],
]


def blocks(seed: int, count: int = 3000) -> list[list[tuple[bytes, bytes]]]:
    """Mostly repeats of a few lists (the memo's case), some with a fresh value (an
    insertion, evictions once the 4 KiB table is full)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        fields = list(rng.choice(POOL))
        if rng.random() < 0.2:
            fields.append((b"x-request-id", b"%032x" % rng.getrandbits(128)))
        if rng.random() < 0.05:
            fields.append((b"date", b"second %d" % i))
        out.append(fields)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_encoder_agrees_with_hpack_byte_for_byte(seed: int) -> None:
    plain, memo, peer = Encoder(), MemoEncoder(), Decoder()
    rng = random.Random(seed)
    for fields in blocks(seed):
        if rng.random() < 0.01:  # the peer's SETTINGS_HEADER_TABLE_SIZE
            size = rng.choice((0, 256, 4096))
            plain.header_table_size = memo.header_table_size = size
        got = memo.encode(fields)
        assert got == plain.encode(fields)
        assert peer.decode(got, raw=True) == fields
    assert memo.memo  # it did remember


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_the_decoder_agrees_with_hpack_field_for_field(seed: int) -> None:
    peer, plain, memo = Encoder(), Decoder(), MemoDecoder()
    rng = random.Random(seed)
    for fields in blocks(seed):
        if rng.random() < 0.01:
            peer.header_table_size = rng.choice((0, 256, 4096))
        data = peer.encode(fields)
        got = memo.decode(data, raw=True)
        assert got == plain.decode(data, raw=True) == fields
        got.append((b"x", b"y"))  # the caller's list is its own: the memo's is untouched
    assert memo.memo


def test_repeats_are_served_from_memory() -> None:
    fields = POOL[0]
    enc, dec = MemoEncoder(), MemoDecoder()
    first = enc.encode(fields)  # inserts: not kept
    second = enc.encode(fields)  # all indexed: kept
    assert first != second and dec.decode(first, raw=True) == fields
    calls = 0
    original = Encoder.encode

    def counted(self: Encoder, headers: object, huffman: bool = True) -> bytes:
        nonlocal calls
        calls += 1
        return original(self, headers, huffman)  # type: ignore[arg-type]

    Encoder.encode = counted  # type: ignore[method-assign]
    try:
        assert enc.encode(fields) == second and enc.encode(list(fields)) == second
    finally:
        Encoder.encode = original  # type: ignore[method-assign]
    assert calls == 0
    assert dec.decode(second, raw=True) == fields and second in dec.memo


def test_sensitive_fields_take_hpacks_own_path() -> None:
    fields = [(b":status", b"200"), NeverIndexedHeaderTuple(b"set-cookie", b"s=1")]
    enc, plain = MemoEncoder(), Encoder()
    for _ in range(3):
        assert enc.encode(fields) == plain.encode(fields)
    assert not enc.memo


def test_a_lowered_header_list_limit_applies_to_remembered_blocks() -> None:
    dec = MemoDecoder()
    dec.decode(Encoder().encode([(b"x-a", b"v" * 200)]), raw=True)  # inserts: not kept
    indexed = b"\xbe"  # index 62: the entry just inserted
    assert dec.decode(indexed, raw=True) == [(b"x-a", b"v" * 200)]
    assert indexed in dec.memo
    dec.max_header_list_size = 100
    with pytest.raises(OversizedHeaderListError):
        dec.decode(indexed, raw=True)
