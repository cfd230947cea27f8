"""Pure pieces: no namespace, no root."""

from __future__ import annotations

import socket
import struct

import pytest

from pool import kernel
from pool.connectx import candidate_ports, format_address, is_wildcard


def test_reserved_ports_syntax():
    assert kernel.parse_port_list("") == frozenset()
    assert kernel.parse_port_list("1000-1002, 2000\n") == {1000, 1001, 1002, 2000}


def test_port_range_packs_as_unsigned_u32():
    assert struct.unpack("=I", kernel.pack_port_range(40000, 65535))[0] == 40000 | 65535 << 16
    with pytest.raises(ValueError):
        kernel.pack_port_range(5, 4)


def test_candidates_cover_the_window_once_from_a_random_start():
    starts = set()
    for _ in range(50):
        ports = list(candidate_ports(100, 131))
        assert sorted(ports) == list(range(100, 132))
        starts.add(ports[0])
    assert len(starts) > 5


@pytest.mark.parametrize(
    ("family", "ip", "wild"),
    [
        (socket.AF_INET, "0.0.0.0", True),
        (socket.AF_INET, "", True),
        (socket.AF_INET, "127.0.0.1", False),
        (socket.AF_INET6, "::", True),
        (socket.AF_INET6, "0:0::0", True),
        (socket.AF_INET6, "::1", False),
    ],
)
def test_wildcard_in_any_spelling(family, ip, wild):
    assert is_wildcard(family, ip) is wild


def test_addresses_print_like_ss():
    assert format_address(("127.0.0.1", 80)) == "127.0.0.1:80"
    assert format_address(("::1", 0)) == "[::1]:*"
    assert format_address(("fe80::1", 53, 0, 3)) == "[fe80::1%3]:53"
