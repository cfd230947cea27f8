"""The PROXY protocol parser and builders, without sockets: every split of a valid header
reads the same, every malformed one is refused with its reason, and what we send parses."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.proxy_protocol import (
    NEED_DATA,
    V1_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    _spelling,
    build_v1,
    build_v2,
    parse,
)

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
port = st.integers(0, 65535)


def v2(cmd: int, fam: int, block: bytes, version: int = 2) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", version << 4 | cmd, fam, len(block)) + block


def refused(data: bytes) -> str:
    with pytest.raises(ProxyProtocolError) as e:
        parse(data)
    return e.value.reason


# -- v1 --------------------------------------------------------------------------------------


def test_v1_tcp4_and_the_bytes_after_it_are_left() -> None:
    data = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET / HTTP/1.1\r\n"
    header = parse(data)
    assert header == ProxyHeader(1, "proxy", ("192.0.2.1", 56324), ("198.51.100.2", 443), 45)
    assert isinstance(header, ProxyHeader)
    assert data[header.length :] == b"GET / HTTP/1.1\r\n"


def test_v1_tcp6_and_unknown() -> None:
    header = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n")
    assert isinstance(header, ProxyHeader)
    assert header.source == ("2001:db8::1", 1)
    assert header.destination == ("2001:db8::2", 65535)
    unknown = parse(b"PROXY UNKNOWN ffff:f...f:ffff 1.2.3.4 65535 65535\r\nrest")
    assert isinstance(unknown, ProxyHeader)
    assert (unknown.source, unknown.destination, unknown.length) == (None, None, 51)
    assert parse(b"PROXY UNKNOWN\r\n") == ProxyHeader(1, "proxy", None, None, 15)


def test_v1_worst_case_is_107_bytes_and_one_more_is_refused() -> None:
    worst = b"PROXY UNKNOWN " + b"f" * (V1_MAX - 16) + b"\r\n"
    assert len(worst) == V1_MAX
    assert isinstance(parse(worst), ProxyHeader)
    assert parse(worst[:-1]) is NEED_DATA
    assert refused(b"PROXY UNKNOWN " + b"f" * (V1_MAX - 15) + b"\r\n") == "too_long"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "family"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "family"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "family"),  # two spaces: an empty field
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "family"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "address"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "address"),
        (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "address"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "address"),  # octal or decimal? neither
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "signature"),
        (b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "signature"),
        (b"PROXY TCP4 1.2.3.\xc4 5.6.7.8 1 2\r\n", "signature"),
        (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "signature"),
        (b"GET / HTTP/1.1\r\n\r\n", "signature"),
        (b"\x16\x03\x01\x02\x00", "signature"),  # a TLS ClientHello with no header before it
    ],
)
def test_v1_malformed(line: bytes, reason: str) -> None:
    assert refused(line) == reason


# -- v2 --------------------------------------------------------------------------------------


def test_v2_inet_with_tlvs_skipped_and_kept() -> None:
    block = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack("!HH", 56324, 443)
    tlvs = b"\x04\x00\x03abc" + b"\xea\x00\x01\x01"  # NOOP, AWS's VPC endpoint type
    data = v2(1, 0x11, block + tlvs) + b"\x16\x03\x01"
    header = parse(data)
    assert isinstance(header, ProxyHeader)
    assert header.source == ("192.0.2.1", 56324)
    assert header.destination == ("198.51.100.2", 443)
    assert header.tlvs == ((0x04, b"abc"), (0xEA, b"\x01"))
    assert data[header.length :] == b"\x16\x03\x01"


def test_v2_local_unspec_and_unix_use_the_socket_endpoints() -> None:
    local = parse(v2(0, 0x11, bytes(12)))  # LOCAL ignores even a full address block
    assert local == ProxyHeader(2, "local", None, None, 28)
    assert parse(v2(1, 0x00, b"")) == ProxyHeader(2, "proxy", None, None, 16)
    unix = parse(v2(1, 0x31, bytes(216)))
    assert isinstance(unix, ProxyHeader) and unix.source is None
    udp = parse(v2(1, 0x12, bytes(12)))  # a datagram's addresses say nothing of this stream
    assert isinstance(udp, ProxyHeader) and udp.source is None


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (v2(1, 0x11, bytes(12), version=1), "version"),
        (v2(1, 0x11, bytes(12), version=3), "version"),
        (V2_SIGNATURE + b"\x11", "version"),  # refused before the length is even read
        (v2(2, 0x11, bytes(12)), "command"),
        (v2(0xF, 0x11, bytes(12)), "command"),
        (v2(1, 0x41, bytes(12)), "family"),
        (v2(1, 0x13, bytes(12)), "family"),
        (v2(1, 0x11, bytes(11)), "length"),
        (v2(1, 0x21, bytes(35)), "length"),
        (v2(0, 0x31, bytes(215)), "length"),
        (v2(1, 0x11, bytes(12) + b"\x01\x00"), "tlv"),
        (v2(1, 0x11, bytes(12) + b"\x01\x00\x05abcd"), "tlv"),
        (b"\r\n\r\n\x00\r\nQUIX\n" + bytes(8), "signature"),
    ],
)
def test_v2_malformed(data: bytes, reason: str) -> None:
    assert refused(data) == reason


def test_v2_length_bound() -> None:
    data = v2(1, 0x11, bytes(12) + b"\x04" + struct.pack("!H", 2000) + bytes(2000))
    assert isinstance(parse(data), ProxyHeader)
    with pytest.raises(ProxyProtocolError) as e:
        parse(data[:16], max_v2=1024)  # refused from the length alone, before the body came
    assert e.value.reason == "too_long"


def test_empty_and_prefixes_need_data() -> None:
    assert parse(b"") is NEED_DATA
    assert parse(b"PRO") is NEED_DATA
    assert parse(V2_SIGNATURE[:5]) is NEED_DATA
    assert parse(v2(1, 0x21, bytes(36))[:40]) is NEED_DATA


# -- builders and properties -----------------------------------------------------------------

pairs = st.one_of(
    st.tuples(st.tuples(ipv4, port), st.tuples(ipv4, port)),
    st.tuples(st.tuples(ipv6, port), st.tuples(ipv6, port)),
)


@given(pairs, st.binary(max_size=64), st.integers(1, 200))
@example(((("127.0.0.1", 1), ("127.0.0.2", 2))), b"GET / HTTP/1.1\r\n", 1)
@settings(max_examples=300, deadline=None)
def test_every_split_of_a_built_header_parses_the_same(
    ends: tuple[tuple[str, int], tuple[str, int]], after: bytes, step: int
) -> None:
    """Fed in pieces (as reads arrive), a header is NEED_DATA until whole, then the same
    header whatever follows it; each prefix is all header, so a reader may consume it."""
    src, dst = ends
    for build in (build_v1, build_v2):
        want = tuple((_spelling(ipaddress.ip_address(a).packed), p) for a, p in (src, dst))
        wire = build(src, dst)
        for cut in range(0, len(wire), step):
            assert parse(wire[:cut]) is NEED_DATA
        header = parse(wire + after)
        assert isinstance(header, ProxyHeader)
        assert (header.source, header.destination, header.length) == (*want, len(wire))


@given(st.binary(max_size=300))
@settings(max_examples=2000, deadline=None)
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    """Anything: a header whose length fits what was given, NEED_DATA for a prefix, or the
    typed error; nothing else escapes."""
    try:
        result = parse(data)
    except ProxyProtocolError as e:
        assert e.reason in {
            "signature",
            "version",
            "command",
            "family",
            "address",
            "length",
            "tlv",
            "too_long",
        }
        return
    if isinstance(result, ProxyHeader):
        assert 0 < result.length <= len(data)
    else:
        assert len(data) < V1_MAX or data.startswith(V2_SIGNATURE)


@given(st.binary(min_size=4, max_size=40))
@settings(max_examples=500, deadline=None)
def test_v2_fuzz_after_the_signature(tail: bytes) -> None:
    """The signature right, the rest random: the hypothesis search lands in the v2 checks."""
    data = V2_SIGNATURE + b"\x21" + tail
    try:
        result = parse(data)
    except ProxyProtocolError:
        return
    if isinstance(result, ProxyHeader):
        assert result.length <= len(data)


def test_mixed_families_are_written_as_mapped_ipv6() -> None:
    header = parse(build_v2(("192.0.2.1", 5), ("2001:db8::1", 443)))
    assert isinstance(header, ProxyHeader)
    assert header.source == ("192.0.2.1", 5)  # the client's own spelling again
    assert header.destination == ("2001:db8::1", 443)
    assert build_v1(("192.0.2.1", 5), ("::1", 443)).startswith(b"PROXY TCP6 ::ffff:192.0.2.1 ")


def test_builders_without_a_client_say_local_or_unknown() -> None:
    assert parse(build_v2(None, None)) == ProxyHeader(2, "local", None, None, 16)
    assert build_v1(None, ("127.0.0.1", 1)) == b"PROXY UNKNOWN\r\n"
    with_tlv = parse(build_v2(("10.0.0.1", 1), ("10.0.0.2", 2), ((0x05, b"id"),)))
    assert isinstance(with_tlv, ProxyHeader) and with_tlv.tlvs == ((0x05, b"id"),)
