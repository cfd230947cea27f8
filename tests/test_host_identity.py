"""One name per request: the route chosen, the Host the origin receives and X-Forwarded-Host
all name the same host, for every way a request can name one (RFC 9112 §3.2, RFC 9110 §7.2).

Through the running proxy on both codecs, with raw bytes, and three origins so the origin that
answered tells which route was chosen: ``app.test``, ``*.wild.test`` and the catch-all ``*``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from pool.egress import EgressSet
from pool.origin import Origin, OriginPool, PoolLimits
from proxy.routing import Route, Router
from proxy.server import Listener, Proxy, Settings
from proxy.target import host_name, resolve
from tests.http_origin import TestOrigin

APP = ("127.0.2.1", 9000)
WILD = ("127.0.2.2", 9000)
ANY = ("127.0.2.3", 9000)
DEAD = ("127.0.2.4", 9000)  # nothing listens: connection refused
# the catch-all first: exact beats *.suffix beats *, whatever the order of the routes
ROUTES = {"*": ANY, "*.wild.test": WILD, "app.test": APP, "dead.test": DEAD}


@pytest.fixture(params=["httptools", "h11"])
def parser(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.param


class Rig:
    def __init__(self, proxy: Proxy, listener: Listener, origins: dict[tuple, TestOrigin]):
        self.proxy = proxy
        self.listener = listener
        self.origins = origins

    async def raw(self, data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(*self.listener.address)
        writer.write(data)
        out = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
        return out

    def answered(self) -> list[tuple[tuple, dict[bytes, bytes]]]:
        return [
            (addr, dict(o.last_headers))
            for addr, o in self.origins.items()
            if any(c.requests for c in o.connections)
        ]

    def reset(self) -> None:
        for o in self.origins.values():
            o.connections.clear()
            o.last_headers = []


async def _rig(parser: str, trusted: tuple[str, ...] = ()) -> Rig:
    origins = {}
    for addr in (APP, WILD, ANY):
        o = TestOrigin()
        await o.start(*addr)
        origins[addr] = o
    routes = [Route(h, "/", [(Origin("http", *a), 1)]) for h, a in ROUTES.items()]
    pool = OriginPool(EgressSet(["127.0.1.1"]), PoolLimits(max_idle=0))
    settings = Settings(
        http_parser=parser, trusted_proxies=[ipaddress.ip_network(t) for t in trusted]
    )
    proxy = Proxy(Router(routes), pool, settings)
    listener = Listener(proxy, ("127.0.0.1", 0))
    proxy.listeners.append(listener)
    listener.start()
    return Rig(proxy, listener, origins)


@pytest.fixture
async def rig(ns, parser):
    r = await _rig(parser)
    yield r
    r.listener.close()
    await r.proxy.pool.close()
    for o in r.origins.values():
        await o.close()


def req(line: bytes, *headers: bytes) -> bytes:
    return line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"Connection: close\r\n\r\n"


# (request, the origin that must answer, the host every name must normalise to)
NAMED = {
    "host": (req(b"GET /x HTTP/1.1", b"Host: app.test"), APP, "app.test"),
    "host-case": (req(b"GET /x HTTP/1.1", b"Host: APP.Test"), APP, "app.test"),
    "host-trailing-dot": (req(b"GET /x HTTP/1.1", b"Host: app.test."), APP, "app.test"),
    "host-port": (req(b"GET /x HTTP/1.1", b"Host: app.test:8080"), APP, "app.test"),
    "host-ows": (req(b"GET /x HTTP/1.1", b"Host:   app.test \t"), APP, "app.test"),
    "host-wild": (req(b"GET /x HTTP/1.1", b"Host: a.b.Wild.Test"), WILD, "a.b.wild.test"),
    "host-suffix-alone": (req(b"GET /x HTTP/1.1", b"Host: wild.test"), ANY, "wild.test"),
    "host-other": (req(b"GET /x HTTP/1.1", b"Host: other.example"), ANY, "other.example"),
    "host-ipv4": (req(b"GET /x HTTP/1.1", b"Host: 127.0.0.1:80"), ANY, "127.0.0.1"),
    "host-ipv6": (req(b"GET /x HTTP/1.1", b"Host: [::1]:8080"), ANY, "[::1]"),
    "host-ipv6-case": (req(b"GET /x HTTP/1.1", b"Host: [FE80::A]"), ANY, "[fe80::a]"),
    "absolute": (req(b"GET http://app.test/x HTTP/1.1", b"Host: app.test"), APP, "app.test"),
    "absolute-other-host": (
        req(b"GET http://app.test/x HTTP/1.1", b"Host: other.example"),
        APP,
        "app.test",
    ),
    "absolute-routes-target": (
        req(b"GET http://other.example/x HTTP/1.1", b"Host: app.test"),
        ANY,
        "other.example",
    ),
    "absolute-empty-host": (req(b"GET http://app.test/x HTTP/1.1", b"Host:"), APP, "app.test"),
    "absolute-space-host": (req(b"GET http://app.test/x HTTP/1.1", b"Host:    "), APP, "app.test"),
    "absolute-case-port-dot": (
        req(b"GET HTTP://App.Test.:80/x HTTP/1.1", b"Host: other.example"),
        APP,
        "app.test",
    ),
    "absolute-https": (req(b"GET https://x.wild.test/ HTTP/1.1", b"Host: a"), WILD, "x.wild.test"),
    "absolute-ipv6": (req(b"GET http://[::1]:81/x HTTP/1.1", b"Host: app.test"), ANY, "[::1]"),
    "absolute-no-path": (req(b"GET http://app.test HTTP/1.1", b"Host: a"), APP, "app.test"),
    "absolute-query": (req(b"GET http://app.test?q=1 HTTP/1.1", b"Host: a"), APP, "app.test"),
    "http10-host": (req(b"GET /x HTTP/1.0", b"Host: App.Test"), APP, "app.test"),
    "http10-absolute": (req(b"GET http://app.test/x HTTP/1.0"), APP, "app.test"),
}


@pytest.mark.parametrize("case", NAMED, ids=list(NAMED))
async def test_route_host_and_forwarded_host_name_the_same_host(rig, case):
    raw, origin, name = NAMED[case]
    out = await rig.raw(raw)
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]
    [(addr, headers)] = rig.answered()
    assert addr == origin  # the route chosen
    assert host_name(headers[b"host"]) == name  # the Host the origin received
    assert host_name(headers[b"x-forwarded-host"]) == name
    assert headers[b"x-forwarded-host"] == headers[b"host"]  # the client is not trusted
    target = rig.origins[origin].connections[0].requests[0]
    assert target.startswith("/"), target  # origin-form, always


async def test_absolute_form_path_and_query_reach_the_origin_in_origin_form(rig):
    out = await rig.raw(req(b"GET http://app.test?q=1 HTTP/1.1", b"Host: evil.example"))
    assert out.startswith(b"HTTP/1.1 200 ")
    assert rig.origins[APP].connections[0].requests == ["/?q=1"]
    assert dict(rig.origins[APP].last_headers)[b"host"] == b"app.test"


async def test_http10_without_host_reaches_only_the_catch_all_with_the_origins_name(rig):
    out = await rig.raw(b"GET /x HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ")
    [(addr, headers)] = rig.answered()
    assert addr == ANY and headers[b"host"] == b"127.0.2.3:9000"
    assert headers[b"x-forwarded-host"] == headers[b"host"]


BAD = {
    "empty-host": req(b"GET /x HTTP/1.1", b"Host:"),
    "space-host": req(b"GET /x HTTP/1.1", b"Host:   \t "),
    "inner-space": req(b"GET /x HTTP/1.1", b"Host: app .test"),
    "slash": req(b"GET /x HTTP/1.1", b"Host: app.test/x"),
    "userinfo-host": req(b"GET /x HTTP/1.1", b"Host: u@app.test"),
    "bad-port": req(b"GET /x HTTP/1.1", b"Host: app.test:80x"),
    "two-ports": req(b"GET /x HTTP/1.1", b"Host: app.test:80:80"),
    "port-only": req(b"GET /x HTTP/1.1", b"Host: :80"),
    "two-dots": req(b"GET /x HTTP/1.1", b"Host: app.test.."),
    "dot-only": req(b"GET /x HTTP/1.1", b"Host: ."),
    "bad-ipv6": req(b"GET /x HTTP/1.1", b"Host: [zz::1]"),
    "ipv6-zone": req(b"GET /x HTTP/1.1", b"Host: [fe80::1%25lo]"),
    "unbracketed-ipv6": req(b"GET /x HTTP/1.1", b"Host: ::1"),
    "backslash": req(b"GET /x HTTP/1.1", b"Host: app.test\\x"),
    "ftp-scheme": req(b"GET ftp://app.test/x HTTP/1.1", b"Host: app.test"),
    "ws-scheme": req(b"GET ws://app.test/x HTTP/1.1", b"Host: app.test"),
    "absolute-userinfo": req(b"GET http://u:p@app.test/x HTTP/1.1", b"Host: app.test"),
    "absolute-empty-host": req(b"GET http:///x HTTP/1.1", b"Host: app.test"),
    "absolute-bad-host": req(b"GET http://app_test!{}/x HTTP/1.1", b"Host: app.test"),
    "no-scheme-separator": req(b"GET http:app.test/x HTTP/1.1", b"Host: app.test"),
    "asterisk": req(b"GET * HTTP/1.1", b"Host: app.test"),
    "authority-form": req(b"GET app.test:80 HTTP/1.1", b"Host: app.test"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
async def test_a_request_naming_no_valid_host_is_400_without_upstream_contact(rig, case):
    out = await rig.raw(BAD[case])
    assert out.startswith(b"HTTP/1.1 400 "), out[:200]
    assert b"connection: close" in out.lower()
    assert rig.answered() == []


def test_resolve_agrees_with_the_name_it_forwards():
    """The class behind the end-to-end cases: whatever resolve() accepts, the name it routes
    by is the name of the authority it forwards, for both target forms."""
    hosts = [b"a", b"A.b.", b"[::1]", b"1.2.3.4:5", b"x-y.z:", b"%41b", b"[FE80::1]:0"]
    for host in hosts:
        for target in (b"/p", b"http://" + host + b"/p", b"HTTPS://" + host):
            t = resolve(target, [(b"host", b"other.example")], b"1.1")
            expected = host_name(host) if target[:1] != b"/" else "other.example"
            assert t.host == expected == host_name(t.authority)
            assert t.path.startswith(b"/")


# -- errors that leak nothing ---------------------------------------------------------------

INTERNAL = re.compile(rb"127\.0\.|errno|refused|\[Errno|EADDR|ECONN", re.IGNORECASE)


def _body(out: bytes) -> bytes:
    return out.split(b"\r\n\r\n", 1)[1]


async def test_upstream_failure_body_names_a_request_id_and_the_log_the_detail(rig):
    with capture_logs() as logs:
        out = await rig.raw(req(b"GET /x HTTP/1.1", b"Host: dead.test"))
    assert out.startswith(b"HTTP/1.1 502 ")
    body = _body(out)
    assert not INTERNAL.search(body), body
    rid = re.search(rb"request id: ([0-9a-f]{32})", body)
    assert rid, body
    assert f"x-request-id: {rid.group(1).decode()}".encode() in out.lower()
    [error] = [e for e in logs if e["event"] == "upstream_error"]
    [access] = [e for e in logs if e["event"] == "access"]
    assert error["request_id"] == access["request_id"] == rid.group(1).decode()
    assert error["errno"] == "ECONNREFUSED" and "127.0.2.4" in error["error"]
    # the access line names the origin and egress IP the upstream_error line names
    assert access["origin"] == error["origin"] == "http://127.0.2.4:9000"
    assert access["egress"] == error["egress"] == "127.0.1.1"
    assert access["status"] == 502 and access["bytes"] == len(body)


async def test_error_answers_count_their_body_bytes_in_the_access_line(rig):
    with capture_logs() as logs:
        out = await rig.raw(req(b"GET http://u@app.test/ HTTP/1.1", b"Host: app.test"))
    assert out.startswith(b"HTTP/1.1 400 ")
    [access] = [e for e in logs if e["event"] == "access"]
    assert access["status"] == 400 and access["bytes"] == len(_body(out)) > 0


async def test_no_route_is_421_counted_and_echoes_nothing(ns, parser):
    rig = await _rig(parser)
    rig.proxy.router = Router([Route("app.test", "/", [(Origin("http", *APP), 1)])])
    try:
        with capture_logs() as logs:
            out = await rig.raw(req(b"GET /x HTTP/1.1", b"Host: <script>.example"))
        assert out.startswith(b"HTTP/1.1 400 ")  # not even a host
        with capture_logs() as logs:
            out = await rig.raw(req(b"GET /x HTTP/1.1", b"Host: nowhere.example"))
        assert out.startswith(b"HTTP/1.1 421 ") and b"nowhere" not in _body(out)
        [access] = [e for e in logs if e["event"] == "access"]
        assert access["status"] == 421 and access["bytes"] == len(_body(out)) > 0
    finally:
        rig.listener.close()
        await rig.proxy.pool.close()
        for o in rig.origins.values():
            await o.close()


async def test_request_id_from_an_untrusted_client_is_replaced(rig):
    out = await rig.raw(req(b"GET /x HTTP/1.1", b"Host: app.test", b"X-Request-ID: mine-123"))
    assert out.startswith(b"HTTP/1.1 200 ")
    rid = dict(rig.origins[APP].last_headers)[b"x-request-id"]
    assert rid != b"mine-123" and re.fullmatch(rb"[0-9a-f]{32}", rid)


async def test_request_ids_are_unique_per_request(rig):
    seen = set()
    for _ in range(20):
        await rig.raw(req(b"GET /x HTTP/1.1", b"Host: app.test"))
        seen.add(dict(rig.origins[APP].last_headers)[b"x-request-id"])
    assert len(seen) == 20


@pytest.mark.parametrize(
    ("sent", "kept"),
    [(b"mine-123", True), (b"0f" * 16, True), (b"a b", False), (b"x" * 201, False)],
    ids=["token", "hex", "space", "too-long"],
)
async def test_request_id_from_a_trusted_proxy_is_kept_when_well_formed(ns, parser, sent, kept):
    rig = await _rig(parser, trusted=("127.0.0.1/32",))
    try:
        with capture_logs() as logs:
            out = await rig.raw(
                req(b"GET /x HTTP/1.1", b"Host: app.test", b"X-Request-ID: " + sent)
            )
        assert out.startswith(b"HTTP/1.1 200 ")
        got = dict(rig.origins[APP].last_headers)[b"x-request-id"]
        assert (got == sent) is kept
        [access] = [e for e in logs if e["event"] == "access"]
        assert access["request_id"] == got.decode()
    finally:
        rig.listener.close()
        await rig.proxy.pool.close()
        for o in rig.origins.values():
            await o.close()


@pytest.mark.parametrize("status", [503, 504])
async def test_503_and_504_bodies_leak_nothing(ns, parser, status):
    settings_kw = {"upstream_response_timeout": 0.2} if status == 504 else {}
    origin = TestOrigin()
    await origin.start(*APP)
    egress = "127.0.1.1:40000-40000" if status == 503 else "127.0.1.1"
    pool = OriginPool(EgressSet([egress]), PoolLimits(max_idle=0))
    route = Route("app.test", "/", [(Origin("http", *APP), 1)])
    proxy = Proxy(Router([route]), pool, Settings(http_parser=parser, **settings_kw))
    listener = Listener(proxy, ("127.0.0.1", 0))
    listener.start()
    rig = Rig(proxy, listener, {APP: origin})
    held = []
    if status == 503:
        held.append(socket.create_connection(APP, source_address=("127.0.1.1", 40000)))
    try:
        with capture_logs() as logs:
            target = b"/slow" if status == 504 else b"/x"
            out = await rig.raw(req(b"GET " + target + b" HTTP/1.1", b"Host: app.test"))
        assert out.startswith(b"HTTP/1.1 %d " % status), out[:200]
        body = _body(out)
        assert not INTERNAL.search(body), body
        rid = re.search(rb"request id: ([0-9a-f]{32})", body).group(1).decode()
        [error] = [e for e in logs if e["event"] == "upstream_error"]
        [access] = [e for e in logs if e["event"] == "access"]
        assert error["request_id"] == access["request_id"] == rid
        assert access["origin"] == error["origin"] == "http://127.0.2.1:9000"
        assert access["egress"] == error["egress"]
    finally:
        for s in held:
            s.close()
        listener.close()
        await pool.close()
        await origin.close()
