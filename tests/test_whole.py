"""``proxy._whole`` (C) against ``proxy.whole`` (pure Python): the same result for every input.

The pure functions are the spec; the codecs' differential tests hold them (and, through
``whole_impl``, the compiled ones) to h11. Here the two implementations meet directly on the
inputs those tests generate (valid, mutated and hostile heads and responses, requests to
write) and on bytes with every class boundary the C code draws: token and non-token bytes,
SP/HTAB, CR and LF alone, NUL, VT, FF, DEL, obs-text, commas and case in Connection.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy import whole
from tests.test_http1_client_differential import exchange, hostile, mutated
from tests.test_http1_differential import hostile_head, mutated_request, simple_request

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])

try:
    from proxy import _whole
except ImportError:  # the test below says why this is a failure where a compiler exists
    _whole = None

needs_c = pytest.mark.skipif(_whole is None, reason="proxy._whole is not built")

# the bytes where the grammar changes: any mutation of a head built from them hits an edge
EDGES = b'aZ09-!|~:;, \t\r\n\x00\x0b\x0c\x7f\x80\xff/?#"()'


def test_the_install_command_builds_the_accelerator() -> None:
    """``pip install -e .`` (the README's commands) compiles ``proxy._whole`` here: gcc and the
    Python headers are on every machine of this kind. Without it every request pays the pure
    functions' cost (bench/setup_cost.py --ab-pure shows how much)."""
    assert _whole is not None, "proxy._whole is missing: pip install -e . did not compile it"
    import proxy._headers  # noqa: F401  (the same for the header rewrite's twin)

    from proxy import headers

    assert (whole.COMPILED and headers.COMPILED) or os.environ.get("ORIGINPOOL_NO_EXTENSIONS")


def test_the_switch_selects_the_pure_functions() -> None:
    code = (
        "from proxy import headers, whole;"
        "print(whole.COMPILED, whole.parse_request.__module__, headers.COMPILED)"
    )
    env = {**os.environ, "ORIGINPOOL_NO_EXTENSIONS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "proxy.whole", "False"]


def same(name: str, *args: object) -> object:
    pure = whole.PURE[name](*args)
    compiled = getattr(_whole, name)(*args)
    assert compiled == pure, (name, args, compiled, pure)
    # the same types too: bytes, not bytearray; bool, not int
    assert repr(compiled) == repr(pure), (name, args)
    return pure


def mutate(data: bytes, draw_ops: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, at, byte in draw_ops:
        at = at % (len(out) + 1)
        if kind == 0:
            out[at:at] = bytes([EDGES[byte % len(EDGES)]])
        elif kind == 1 and at < len(out):
            out[at] = EDGES[byte % len(EDGES)]
        elif at < len(out):
            del out[at]
    return bytes(out)


ops = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 400), st.integers(0, 255)), max_size=4)

REQUEST = (
    b"GET /a/b?c=d HTTP/1.1\r\nHost: app.example\r\nUser-Agent: curl/8.5\r\n"
    b"Connection: keep-alive, Close\r\nX-Empty:\r\nX-Pad: \t v \t\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 5\r\nConnection: keep-alive\r\n\r\nhello"
)


@needs_c
@SETTINGS
@given(
    st.one_of(simple_request(), mutated_request(), hostile_head, st.just(REQUEST)),
    ops,
    st.sampled_from([8, 20, 40, 8192]),
)
@example(REQUEST, [], 8192)
@example(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", [], 26)
@example(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", [], 14)
@example(b"CONNECT / HTTP/1.1\r\nHost: a\r\n\r\n", [], 8192)
def test_parse_request_agrees(raw: bytes, edits: list[tuple[int, int, int]], max_line: int) -> None:
    same("parse_request", raw, max_line)
    same("parse_request", mutate(raw, edits), max_line)


@needs_c
@SETTINGS
@given(st.one_of(exchange(), mutated(), hostile()), ops, st.booleans())
def test_parse_response_agrees(ex: object, edits: list[tuple[int, int, int]], head: bool) -> None:
    response = ex.response  # type: ignore[attr-defined]
    same("parse_response", response, head)
    same("parse_response", mutate(response, edits), head)


@needs_c
@pytest.mark.parametrize(
    "raw",
    [
        RESPONSE,
        RESPONSE.replace(b"HTTP/1.1", b"HTTP/1.0"),
        RESPONSE.replace(b"HTTP/1.1", b"HTTP/2.0"),
        RESPONSE.replace(b" OK", b""),
        RESPONSE.replace(b" OK", b" "),
        RESPONSE.replace(b" OK", b" \x01weird\x80"),
        RESPONSE.replace(b"Content-Length: 5", b"Content-Length: 05"),
        RESPONSE.replace(b"Content-Length: 5", b"Content-Length: 5 \t"),
        RESPONSE.replace(b"Content-Length: 5", b"Content-Length: 5, 5"),
        RESPONSE.replace(b"Content-Length: 5", b"Content-Length: +5"),
        RESPONSE.replace(b"Content-Length: 5", b"Content-Length: 99999999999999999999"),
        RESPONSE.replace(b"Content-Length: 5", b"Content-Length: 999999999999999999999"),
        RESPONSE.replace(b"Content-Length: 5", b"Content-Length: 18446744073709551616"),
        RESPONSE.replace(b"Content-Length: 5", b"Content-Length: 9223372036854775807"),
        RESPONSE.replace(b"Content-Length: 5", b"Content-Length: 5\r\nContent-Length: 5"),
        RESPONSE.replace(
            b"Content-Length: 5", b"Content-Length: 99999999999999999999\r\nContent-Length: 5"
        ),
        RESPONSE.replace(
            b"Content-Length: 5", b"Content-Length: 5\r\nContent-Length: 99999999999999999999"
        ),
        RESPONSE.replace(b"Content-Length: 5", b"Transfer-Encoding: chunked"),
        RESPONSE.replace(b"keep-alive", b"CLOSE"),
        RESPONSE.replace(b"keep-alive", b"x,\tclose\t,y"),
        RESPONSE.replace(b"keep-alive", b"closed"),
        RESPONSE.replace(b"200 OK", b"204 No Content").replace(b"hello", b""),
        RESPONSE.replace(b"200 OK", b"304 Not Modified").replace(b"hello", b""),
        RESPONSE.replace(b"200 OK", b"199 Odd"),
        RESPONSE.replace(b"200 OK", b"000 Zero"),
        RESPONSE[: RESPONSE.find(b"\r\n\r\n") + 4],
        RESPONSE + b"x",
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200\r\n\r\n",
        b"HTTP/1.1 200\r\n",
        b"HTTP/1.1 20",
        b"",
    ],
)
@pytest.mark.parametrize("head", [False, True])
def test_parse_response_edges(raw: bytes, head: bool) -> None:
    same("parse_response", raw, head)
    end = raw.find(b"\r\n\r\n")
    if end >= 0:  # the head alone: what a HEAD, 204 or 304 gets
        same("parse_response", raw[: end + 4], head)


VALUES = [b"", b"a", b"app.example", b"a b", b" a", b"a ", b"\ta", b"a\t", b"a\x01b", b"\x80"]
header = st.tuples(
    st.one_of(
        *[st.sampled_from([b"Host", b"HOST", b"host", b"Connection", b"Upgrade", b"X-A"])] * 4,
        st.binary(max_size=6),
        st.lists(st.sampled_from(EDGES), min_size=1, max_size=6).map(bytes),
    ),
    st.one_of(
        *[st.sampled_from(VALUES)] * 4,
        st.binary(max_size=8),
        st.lists(st.sampled_from(EDGES), max_size=8).map(bytes),
    ),
)


@needs_c
@SETTINGS
@given(
    st.one_of(
        *[st.sampled_from([b"GET", b"HEAD", b"CONNECT", b"", b"G T"])] * 4, st.binary(max_size=5)
    ),
    st.one_of(*[st.sampled_from([b"/", b"*", b"/a b", b"", b"/\x7f"])] * 4, st.binary(max_size=6)),
    st.lists(header, max_size=5).flatmap(lambda hs: st.sampled_from([hs, [(b"Host", b"a"), *hs]])),
    st.integers(0, 5),
)
def test_request_head_agrees(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], rotate: int
) -> None:
    if headers:
        rotate %= len(headers)
        headers = headers[rotate:] + headers[:rotate]
    same("request_head", method, target, headers)
    same("request_head", method, target, tuple(headers))


@needs_c
def test_request_head_leaves_odd_types_to_the_general_path() -> None:
    """Where the pure function raises on what it was never meant to get, C answers None and
    the codec's general path raises the same error as before."""
    assert _whole.request_head(b"GET", b"/", [[b"Host", b"a"]]) is None
    assert _whole.request_head("GET", b"/", [(b"Host", b"a")]) is None
    assert _whole.request_head(b"GET", b"/", iter([(b"Host", b"a")])) is None
    assert _whole.parse_request(bytearray(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), 99) is None


def every_byte_everywhere(template: bytes) -> list[bytes]:
    """The template with each position replaced by each of the 256 bytes, and with each byte
    inserted at each position: every class boundary the parsers draw, at every place."""
    out = []
    for at in range(len(template) + 1):
        for b in range(256):
            one = bytes([b])
            out.append(template[:at] + one + template[at:])
            if at < len(template):
                out.append(template[:at] + one + template[at + 1 :])
    return out


@needs_c
@pytest.mark.parametrize(
    "template",
    [
        b"GET /a?b HTTP/1.1\r\nHost: h\r\nConnection: x, close\r\nX:\t v \r\n\r\n",
        b"GET / HTTP/1.0\r\nhost:h\r\n\r\n",
    ],
)
def test_parse_request_every_byte(template: bytes) -> None:
    for raw in every_byte_everywhere(template):
        same("parse_request", raw, 8192)


@needs_c
@pytest.mark.parametrize(
    "template",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: x, close\r\nX:\t v \r\n\r\nhi",
        b"HTTP/1.0 204 \r\nContent-Length: 99999999999999999999\r\n\r\n",
    ],
)
@pytest.mark.parametrize("head", [False, True])
def test_parse_response_every_byte(template: bytes, head: bool) -> None:
    for raw in every_byte_everywhere(template):
        same("parse_response", raw, head)


@needs_c
def test_request_head_every_byte() -> None:
    """Each of method, target, a name and a value (first, middle, last byte) takes each byte."""
    method, target = b"GET", b"/a"
    headers = [(b"X-A", b"v w"), (b"Host", b"h")]
    for b in range(256):
        one = bytes([b])
        for m in (one + method, method + one, method[:1] + one + method[1:]):
            same("request_head", m, target, headers)
        for t in (one + target, target + one, target[:1] + one + target[1:]):
            same("request_head", method, t, headers)
        for field in range(2):
            for part in range(2):
                text = headers[field][part]
                for changed in (one + text, text + one, text[:1] + one + text[1:], one):
                    pair = list(headers[field])
                    pair[part] = changed
                    hs = list(headers)
                    hs[field] = (pair[0], pair[1])
                    same("request_head", method, target, hs)


status_codes = st.one_of(st.sampled_from([100, 101, 200, 204, 304, 404, 502]), st.integers(0, 999))
pairs = st.lists(st.tuples(st.binary(max_size=8), st.binary(max_size=12)), max_size=6)


@needs_c
@SETTINGS
@given(status_codes, st.binary(max_size=20), pairs)
def test_response_head_agrees(
    status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    same("response_head", status, reason, headers)
    same("response_head", status, reason, tuple(headers))


@needs_c
def test_response_head_takes_only_bytes_pairs() -> None:
    with pytest.raises(TypeError):
        _whole.response_head(200, b"OK", [[b"a", b"b"]])
    with pytest.raises(TypeError):
        _whole.response_head(200, "OK", [])
    with pytest.raises(TypeError):
        _whole.response_head(200, b"OK", [(b"a", "b")])


# proxy.headers.to_client: the names it treats specially, in and out of case, and others
RESPONSE_NAMES = [
    b"via", b"Via", b"connection", b"Connection", b"keep-alive", b"proxy-connection",
    b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"server", b"x-a", b"X-A", b"content-length", b"",
]  # fmt: skip
CONNECTION_VALUES = [
    b"keep-alive", b"close", b"x-a", b"X-A, server", b" , ,x-a ,", b"upgrade", b"", b",",
    b"\tX-a\t", b"content-length,via", b"server\x0b",
]  # fmt: skip


def header_lists(names: list[bytes]) -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    """Mostly the names a rewrite treats specially and Connection-like values, some noise."""
    return st.lists(
        st.tuples(
            st.one_of(*[st.sampled_from(names)] * 4, st.binary(max_size=4)),
            st.one_of(*[st.sampled_from(CONNECTION_VALUES)] * 3, st.binary(max_size=8)),
        ),
        max_size=8,
    )


response_headers = header_lists(RESPONSE_NAMES)


@needs_c
@SETTINGS
@given(response_headers, st.booleans())
@example([(b"connection", b"X-A, Server"), (b"x-a", b"1"), (b"server", b"s")], False)
@example([(b"via", b"1.0 a"), (b"te", b"x"), (b"Via", b"b"), (b"via", b"")], True)
def test_to_client_agrees(hs: list[tuple[bytes, bytes]], websocket: bool) -> None:
    from proxy import _headers, headers

    for given_headers in (hs, tuple(hs)):
        pure = headers.PURE["to_client"](given_headers, websocket)
        assert _headers.to_client(given_headers, websocket) == pure, hs
        assert _headers.to_client(given_headers, websocket=websocket) == pure, hs
        if not websocket:
            assert _headers.to_client(given_headers) == pure, hs


@needs_c
def test_to_client_takes_only_bytes_pairs() -> None:
    from proxy import _headers

    for bad in ([[b"a", b"b"]], [(b"a", "b")], [("a", b"b")], [(b"a",)], None):
        with pytest.raises(TypeError):
            _headers.to_client(bad)
    with pytest.raises(TypeError):
        _headers.to_client([], websockets=True)


def _forwarded(trusted: bool) -> dict[str, object]:
    return {
        "client_ip": b"192.0.2.7",
        "scheme": b"https",
        "trusted_peer": trusted,
        "host": b"app.example",
        "request_id": b"0123456789abcdef0123456789abcdef",
    }


REQUEST_NAMES = [
    *RESPONSE_NAMES, b"host", b"Host", b"expect", b"x-request-id", b"x-forwarded-for",
    b"x-forwarded-proto", b"x-forwarded-host", b"X-Forwarded-For", b"cookie",
]  # fmt: skip
request_headers = header_lists(REQUEST_NAMES)


@needs_c
@SETTINGS
@given(request_headers, st.booleans(), st.booleans())
@example(
    [(b"connection", b"Cookie, host"), (b"cookie", b"a"), (b"x-forwarded-proto", b""),
     (b"x-forwarded-proto", b"http"), (b"x-forwarded-for", b"10.0.0.1"), (b"host", b"evil")],
    True, False,
)  # fmt: skip
@example([(b"x-forwarded-host", b"a"), (b"x-forwarded-for", b"b"), (b"via", b"c")], False, True)
@example([(b"x-forwarded-proto", b"a"), (b"x-forwarded-proto", b"b")], True, False)
@example([(b"x-forwarded-host", b"a"), (b"x-forwarded-host", b"b")], True, False)
def test_to_origin_agrees(hs: list[tuple[bytes, bytes]], trusted: bool, websocket: bool) -> None:
    from proxy import _headers, headers

    kw = _forwarded(trusted)
    for given_headers in (hs, tuple(hs)):
        pure = headers.PURE["to_origin"](given_headers, websocket=websocket, **kw)
        assert _headers.to_origin(given_headers, websocket=websocket, **kw) == pure, hs
        if not websocket:
            assert _headers.to_origin(given_headers, **kw) == pure, hs


@needs_c
def test_to_origin_takes_only_bytes_and_its_keywords() -> None:
    from proxy import _headers

    kw = _forwarded(False)
    for bad in ([[b"a", b"b"]], [(b"a", "b")], None):
        with pytest.raises(TypeError):
            _headers.to_origin(bad, **kw)
    with pytest.raises(TypeError):
        _headers.to_origin([], **{**kw, "client_ip": "192.0.2.7"})
    with pytest.raises(TypeError):
        _headers.to_origin([], **kw, websockets=True)
    with pytest.raises(TypeError):
        _headers.to_origin([], **{k: v for k, v in kw.items() if k != "host"})
    with pytest.raises(TypeError):
        _headers.to_origin([], b"positional", **kw)


@pytest.mark.parametrize("required", [False, True])
def test_a_failed_compile_is_an_error_only_when_required(tmp_path: Path, required: bool) -> None:
    """Optional by default (no compiler: the pure twins serve); with
    ORIGINPOOL_REQUIRE_EXTENSIONS=1, as the container build sets it, the build fails instead
    of shipping the slower fallback. The compiler here is /bin/false: every compile fails."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path)
    (tmp_path / "proxy").mkdir()
    for source in (ROOT / "proxy").glob("_*.[ch]"):
        shutil.copy(source, tmp_path / "proxy")
    env = {**os.environ, "CC": "/bin/false", "LDSHARED": "/bin/false"}
    env.pop("ORIGINPOOL_REQUIRE_EXTENSIONS", None)
    if required:
        env["ORIGINPOOL_REQUIRE_EXTENSIONS"] = "1"
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (build.returncode != 0) == required, build.stdout + build.stderr
    assert not list((tmp_path / "proxy").glob("*.so"))
