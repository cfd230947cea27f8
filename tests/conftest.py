"""Shared fixtures: every test that exhausts ports does it in a namespace of its own."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from pool import netns
from proxy import headers, whole
from tests.http_origin import TestOrigin

MODULES = (whole, headers)  # the modules with compiled twins, each with PURE and COMPILED
RANGE = (40000, 40127)  # 128 ports: exhaustion in milliseconds, still a real search
R = RANGE[1] - RANGE[0] + 1


@pytest.fixture(scope="module", params=["compiled", "pure"])
def whole_impl(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a module's tests once on the compiled twins (``proxy._whole``, ``proxy._headers``)
    and once on the pure functions: the accelerator and its fallback must pass the same tests.
    Module scope, so hypothesis tests can use it; callers look the functions up on
    ``proxy.whole`` and ``proxy.headers`` per call.
    """
    saved = {(module, name): getattr(module, name) for module in MODULES for name in module.PURE}
    if request.param == "compiled" and not (whole.COMPILED and headers.COMPILED):
        pytest.skip("the accelerator is not built (or ORIGINPOOL_NO_EXTENSIONS is set)")
    if request.param == "pure":
        for module in MODULES:
            for name, fn in module.PURE.items():
                setattr(module, name, fn)
    try:
        yield request.param
    finally:
        for (module, name), fn in saved.items():
            setattr(module, name, fn)


@pytest.fixture
def ns(request: pytest.FixtureRequest) -> Iterator[netns.Namespace]:
    """Run the test inside a fresh network namespace with ``lo`` up and a 128-port range.

    Parametrise indirectly with a dict to change it: ``{"port_range": (lo, hi),
    "addresses": ["127.0.1.1/32", ...]}``. The host namespace is never touched.
    """
    reason = netns.can_create()
    if reason:
        pytest.skip(reason)
    params = getattr(request, "param", None) or {}
    with netns.namespace(
        port_range=params.get("port_range", RANGE), addresses=params.get("addresses", ())
    ) as space:
        yield space


class Listeners:
    """Listeners that never accept: each holds up to somaxconn established connections."""

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []

    def add(self, ip: str, port: int = 9000, backlog: int = 65535) -> tuple[str, int]:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, port))
        s.listen(backlog)
        self.socks.append(s)
        return (ip, port)

    def close(self) -> None:
        for s in self.socks:
            s.close()


@pytest.fixture
def listeners() -> Iterator[Listeners]:
    holder = Listeners()
    yield holder
    holder.close()


class Held:
    """Sockets a test holds open; closed abortively (no TIME_WAIT) at the end."""

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []

    def new(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        s = socket.socket(family, kind)
        self.socks.append(s)
        return s

    def close(self) -> None:
        for s in self.socks:
            abort(s)
        self.socks.clear()


def abort(s: socket.socket) -> None:
    """Close without TIME_WAIT (SO_LINGER 0), so a closed 4-tuple is free again at once."""
    if s.type == socket.SOCK_STREAM and s.fileno() >= 0:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    s.close()


@pytest.fixture
def held() -> Iterator[Held]:
    h = Held()
    yield h
    h.close()


@pytest.fixture
async def origins(ns: netns.Namespace) -> AsyncIterator[list[TestOrigin]]:
    """Two real HTTP origins, 127.0.2.1:9000 and 127.0.2.2:9000, in the test's namespace."""
    servers = []
    for host in ("127.0.2.1", "127.0.2.2"):
        s = TestOrigin()
        await s.start(host, 9000)
        servers.append(s)
    yield servers
    for s in servers:
        await s.close()
