"""Random sequences of connectx/close never yield a duplicate 4-tuple and never fail while a
free port exists: the model below knows which ports each (source, destination) pair holds and
says, before each call, whether it must succeed."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pool import connectx, sockdiag
from tests.conftest import Listeners, abort

SMALL = {"port_range": (40000, 40015)}
RANGE = range(40000, 40016)
SOURCES = ["0.0.0.0", "127.0.1.1", "127.0.1.2"]
DESTS = [("127.0.2.1", 9000), ("127.0.2.2", 9000)]
WINDOWS = [None, (40000, 40003), (40002, 40005), (40012, 40015)]
DEFAULT_SOURCE = "127.0.0.1"  # what the route gives for 127.0.2.x in the namespace

open_op = st.tuples(
    st.just("open"),
    st.sampled_from(["tcp", "udp"]),
    st.sampled_from(SOURCES),
    st.sampled_from(DESTS),
    st.sampled_from(WINDOWS),
    st.booleans(),
    st.integers(min_value=1, max_value=6),  # a burst of the same choice reaches exhaustion
)
close_op = st.tuples(st.just("close"), st.integers(min_value=0, max_value=10_000))
operations = st.lists(st.one_of(open_op, open_op, open_op, close_op), min_size=10, max_size=200)


@dataclass
class Live:
    sock: socket.socket
    proto: str
    src: str
    port: int
    dst: tuple[str, int]
    bound_explicitly: bool  # TCP userspace choice binds the port itself


@dataclass
class Model:
    live: list[Live] = field(default_factory=list)

    def used(self, proto: str, src: str, dst: tuple[str, int]) -> set[int]:
        return {c.port for c in self.live if (c.proto, c.src, c.dst) == (proto, src, dst)}

    def free_port_exists(
        self, proto: str, src: str, dst: tuple[str, int], window, userspace: bool
    ) -> bool:
        ports = set(range(window[0], window[1] + 1)) if window else set(RANGE)
        ports -= self.used(proto, src, dst)
        if proto == "tcp" and not userspace:
            # the kernel's own choice skips ports held by an explicit bind, on every IP
            ports -= {c.port for c in self.live if c.proto == "tcp" and c.bound_explicitly}
        return bool(ports)


@pytest.mark.parametrize("ns", [SMALL], indirect=True)
def test_random_connectx_close_sequences(ns):
    listeners = Listeners()
    for dst in DESTS:
        listeners.add(*dst)
    try:
        run_sequences()
    finally:
        listeners.close()


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(operations)
def run_sequences(ops) -> None:
    model = Model()
    try:
        for op in ops:
            if op[0] == "close":
                if model.live:
                    abort(model.live.pop(op[1] % len(model.live)).sock)
                continue
            for _ in range(op[6]):
                _open(model, *op[1:6])
        census = [
            (d.src, d.sport, d.dst, d.dport)
            for d in sockdiag.dump(socket.AF_INET, socket.IPPROTO_UDP)
            if d.dport
        ]
        assert len(census) == len(set(census))
        assert len(census) == sum(1 for c in model.live if c.proto == "udp")
    finally:
        for c in model.live:
            abort(c.sock)


def _open(
    model: Model, proto: str, src: str, dst: tuple[str, int], window, userspace: bool
) -> None:
    userspace = userspace and window is not None and proto == "tcp"
    real_src = DEFAULT_SOURCE if src == "0.0.0.0" else src
    expect = model.free_port_exists(proto, real_src, dst, window, userspace)
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET, kind)
    try:
        connectx(s, (src, 0), dst, port_range=window, userspace_ports=userspace)
        got = s.getsockname()
    except OSError as e:
        s.close()
        assert e.errno in (errno.EADDRNOTAVAIL, errno.EAGAIN), e
        assert not expect, f"{proto} {real_src}->{dst} {window} failed with a free port: {e}"
        return
    assert expect, f"{proto} {real_src}->{dst} {window} succeeded on a full model"
    assert got[0] == real_src
    if window:
        assert window[0] <= got[1] <= window[1]
    assert got[1] not in model.used(proto, real_src, dst), "duplicate 4-tuple"
    model.live.append(Live(s, proto, real_src, got[1], dst, userspace))
