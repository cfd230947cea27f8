"""Request ids: well formed, unique within a worker and across forked workers, and a
client's own id accepted only when it looks like one."""

from __future__ import annotations

import os
import re

import pytest

from proxy import request_id


def test_ids_are_32_hex_digits_and_unique():
    ids = [request_id.new() for _ in range(10_000)]
    assert all(re.fullmatch(rb"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_worker_draws_its_own_prefix():
    """Workers are forked from one master: without a new prefix after fork, worker 1's
    first id would be worker 2's first id too."""
    parent = request_id.new()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id, then gone
        os.write(w, request_id.new())
        os._exit(0)
    os.close(w)
    child = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    assert len(child) == 32 and child[:16] != parent[:16]


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        (b"0f" * 16, True),
        (b"123e4567-e89b-12d3-a456-426614174000", True),
        (b"abc+/=._:-", True),
        (b"x" * 200, True),
        (b"x" * 201, False),
        (b"", False),
        (b"a b", False),
        (b"a\tb", False),
        (b'a"b', False),
        (b"a\xffb", False),
    ],
)
def test_a_clients_id_is_kept_only_when_it_looks_like_one(value, kept):
    got = request_id.accept(value)
    assert (got == value) is kept
    if not kept:
        assert re.fullmatch(rb"[0-9a-f]{32}", got)
