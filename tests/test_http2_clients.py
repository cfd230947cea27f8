"""HTTP/2 through the proxy as real clients speak it (issue 21 §3): curl over TLS (ALPN) and
over cleartext (prior knowledge), nghttp, httpx with ``http2=True``, Debian's chromium loading a
page whose script opens a WebSocket back through the proxy, and an RFC 8441 WebSocket written
here with the ``h2`` library (extended CONNECT) and ``wsproto`` (the frames).

Each test asks the client which protocol it negotiated (curl's ``%{http_version}``, nghttp's
``The negotiated protocol``, httpx's ``http_version``, the browser's own ``nextHopProtocol``)
and reads the proxy's access line for what the proxy says it served. The HTTP/1.1 forms run
beside them: turning HTTP/2 on must not take HTTP/1.1 away from a client that asks for it.

One ``originpool serve`` per test, in a network namespace of the test's own: a TLS listener on
127.0.0.1:8443 and a cleartext one on 127.0.0.1:8080, both routing ``app.example`` to an origin
at 127.0.2.1:9000 that serves the page, ``/hello`` and a WebSocket echo at ``/ws``. The origin
is the ``websockets`` library (an independent implementation), so the only code under test is
the proxy's.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trustme
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.sync.server import ServerConnection, serve
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, TextMessage

from tests.test_serve import Proc

TLS_PORT, PLAIN_PORT = 8443, 8080
HOST = "app.example"
ORIGIN = ("127.0.2.1", 9000)
TIMEOUT = 30.0  # seconds: any one client run; a hang fails the test instead of the suite
HOLD = 60.0  # seconds: the origin holds the page's /wait at most this long

CONFIG = f"""
[[listen]]
address = "127.0.0.1:{TLS_PORT}"
tls_cert = "site.pem"
tls_key = "site.key"
[[listen]]
address = "127.0.0.1:{PLAIN_PORT}"
[admin]
address = "127.0.0.1:9090"
[[routes]]
host = "{HOST}"
origins = ["http://{ORIGIN[0]}:{ORIGIN[1]}"]
[timeouts]
drain = 2
[log]
format = "json"
"""

# The browser's page: it reports the protocol its own navigation used (nextHopProtocol: "h2"
# or "http/1.1") and what came back through a WebSocket to this page's host, into the DOM
# that --dump-dom prints. --dump-dom prints the DOM at the load event, and a WebSocket does not
# hold that back: the image /wait does, as the origin holds it until the page has written its
# result and said so with /done; so the DOM is dumped after the result, never before (the
# origin's hold is bounded: HOLD seconds).
PAGE = """<!doctype html>
<html><head><title>h2 through originpool</title></head>
<body><pre id="out">waiting</pre><img src="/wait" alt="">
<script>
const out = document.getElementById("out");
const nav = performance.getEntriesByType("navigation")[0];
const proto = nav ? nav.nextHopProtocol : "unknown";
const done = (text) => { out.textContent = text; fetch("/done"); };
const ws = new WebSocket("wss://" + location.host + "/ws");
ws.onopen = () => ws.send("TOKEN");
ws.onmessage = (e) => { done("protocol=" + proto + " echo=" + e.data); ws.close(); };
ws.onerror = () => done("protocol=" + proto + " websocket-error");
</script></body></html>
"""


def _binary(name: str, package: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        shutil.which(name) is None,
        reason=f"{name} is not installed (.ci/run installs it: apt-get install -y {package})",
    )


needs_curl = _binary("curl", "curl")
needs_nghttp = _binary("nghttp", "nghttp2-client")
needs_chromium = _binary("chromium", "chromium")


# -- the origin ---------------------------------------------------------------------------------


class Origin:
    """``/ws`` echoes WebSocket messages; ``/hello`` and ``/`` are plain HTTP answers (the
    page carries a token fresh per test, so a DOM showing it came through this run); ``/wait``
    is answered once ``/done`` came (the sync server runs each connection in a thread)."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.page = PAGE.replace("TOKEN", token).encode()
        self.paths: list[str] = []
        self.done = threading.Event()
        self.server = serve(self._echo, *ORIGIN, process_request=self._http)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _http(self, _conn: ServerConnection, request: Request) -> Response | None:
        self.paths.append(request.path)
        if request.path == "/ws":
            return None  # the WebSocket handshake goes on
        if request.path == "/done":
            self.done.set()
        if request.path == "/wait":
            self.done.wait(HOLD)
        body = b"hello\n" if request.path == "/hello" else self.page
        kind = "text/plain" if request.path == "/hello" else "text/html; charset=utf-8"
        headers = Headers(
            [("Content-Type", kind), ("Content-Length", str(len(body))), ("Connection", "close")]
        )
        return Response(200, "OK", headers, body)

    @staticmethod
    def _echo(conn: ServerConnection) -> None:
        with contextlib.suppress(Exception):  # the client closing is the end of the echo
            for message in conn:
                conn.send(message)

    def close(self) -> None:
        self.done.set()  # a /wait still held ends now
        self.server.shutdown()
        self.thread.join(10)


@dataclass
class Site:
    proc: Proc
    origin: Origin
    ca: trustme.CA
    dir: Path

    def access(self, path: str, count: int = 1) -> dict:
        """The count-th access line for ``path``: waits for one more access line at a time
        (bounded by Proc.wait_for's timeout) until it is there."""
        seen = 1
        while True:
            self.proc.wait_for("access", timeout=TIMEOUT, count=seen)
            mine = [ln for ln in self.proc.lines if ln.get("event") == "access"]
            mine = [ln for ln in mine if ln["path"] == path]
            if len(mine) >= count:
                return mine[count - 1]
            seen += 1


@pytest.fixture
def site(ns, tmp_path: Path) -> Iterator[Site]:
    ca = trustme.CA()
    leaf = ca.issue_cert(HOST)
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "site.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "site.key"))
    (tmp_path / "originpool.toml").write_text(CONFIG)
    origin = Origin(secrets.token_hex(8))
    proc = Proc(tmp_path / "originpool.toml")
    try:
        proc.wait_for("ready", timeout=TIMEOUT)
        yield Site(proc, origin, ca, tmp_path)
    finally:
        try:
            assert proc.stop() == 0
        finally:
            origin.close()


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """A client binary, bounded; its output is what the test reads."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)


# -- curl ----------------------------------------------------------------------------------------


def curl(site: Site, *args: str, tls: bool) -> tuple[str, str]:
    """(the protocol curl says it used, the body); curl's own exit code must be 0."""
    port = TLS_PORT if tls else PLAIN_PORT
    url = f"{'https' if tls else 'http'}://{HOST}:{port}/hello"
    out = site.dir / "curl-body"
    done = run(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            str(site.dir / "ca.pem"),
            "--resolve",
            f"{HOST}:{port}:127.0.0.1",
            "-o",
            str(out),
            "-w",
            "%{http_version} %{response_code}",
            *args,
            url,
        ]
    )
    assert done.returncode == 0, done.stderr
    version, status = done.stdout.split()
    assert status == "200", done.stdout
    return version, out.read_text()


@pytest.fixture
def cafile(site: Site) -> Site:
    site.ca.cert_pem.write_to_path(str(site.dir / "ca.pem"))
    return site


@needs_curl
@pytest.mark.parametrize("tls", [True, False], ids=["tls", "cleartext"])
def test_curl_http1_1_still_gets_http1_1(cafile: Site, tls: bool) -> None:
    version, body = curl(cafile, "--http1.1", tls=tls)
    assert (version, body) == ("1.1", "hello\n")
    line = cafile.access("/hello")
    assert (line["status"], line["host"], line["http_version"]) == (200, HOST, "1.1")


@needs_curl
def test_curl_http2_on_cleartext_asks_upgrade_and_gets_http1_1(cafile: Site) -> None:
    # curl --http2 on http:// sends "Upgrade: h2c"; the proxy has no h2c Upgrade (browsers
    # never send one; prior knowledge is the cleartext way in), so it answers in HTTP/1.1
    version, body = curl(cafile, "--http2", tls=False)
    assert (version, body) == ("1.1", "hello\n")
    assert cafile.access("/hello")["http_version"] == "1.1"


@needs_curl
def test_curl_http2_over_tls_negotiates_h2_by_alpn(cafile: Site) -> None:
    version, body = curl(cafile, "--http2", tls=True)
    assert (version, body) == ("2", "hello\n")
    line = cafile.access("/hello")
    assert (line["status"], line["host"], line["http_version"]) == (200, HOST, "2")


@needs_curl
def test_curl_http2_prior_knowledge_on_cleartext(cafile: Site) -> None:
    version, body = curl(cafile, "--http2-prior-knowledge", tls=False)
    assert (version, body) == ("2", "hello\n")
    line = cafile.access("/hello")
    assert (line["status"], line["host"], line["http_version"]) == (200, HOST, "2")


# -- nghttp --------------------------------------------------------------------------------------


@needs_nghttp
@pytest.mark.parametrize("tls", [True, False], ids=["tls", "h2c"])
def test_nghttp(site: Site, tls: bool) -> None:
    port = TLS_PORT if tls else PLAIN_PORT
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/hello"
    # -n: discard the body; -v: every frame; the name the route wants goes in :authority
    done = run(["nghttp", "-nv", "-t", "20", "-H", f":authority: {HOST}", url])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    if tls:
        assert "The negotiated protocol: h2" in done.stdout, done.stdout[-2000:]
    # nghttp opens its priority-tree streams first; the request's id varies with its version
    assert re.search(r"recv \(stream_id=\d+\) :status: 200", done.stdout), done.stdout[-2000:]
    assert "recv SETTINGS frame" in done.stdout
    line = site.access("/hello")
    assert (line["status"], line["host"], line["http_version"]) == (200, HOST, "2")


# -- httpx ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "h2c"])
def test_httpx_http2(site: Site, tls: bool) -> None:
    if tls:
        verify = ssl.create_default_context()
        site.ca.configure_trust(verify)
        client = httpx.Client(http2=True, verify=verify, timeout=TIMEOUT)
        url = f"https://127.0.0.1:{TLS_PORT}/hello"
    else:  # http1=False: prior knowledge, no Upgrade
        client = httpx.Client(http1=False, http2=True, timeout=TIMEOUT)
        url = f"http://127.0.0.1:{PLAIN_PORT}/hello"
    # the name resolves nowhere in this namespace: the address in the URL, the name as SNI
    # (verified against the certificate) and as Host, which httpx sends as :authority
    with client:
        responses = [
            client.get(url, headers={"Host": HOST}, extensions={"sni_hostname": HOST})
            for _ in range(3)
        ]
    assert [(r.http_version, r.status_code, r.text) for r in responses] == [
        ("HTTP/2", 200, "hello\n")
    ] * 3
    lines = [site.access("/hello", count=i + 1) for i in range(3)]
    assert {(ln["status"], ln["host"], ln["http_version"]) for ln in lines} == {(200, HOST, "2")}
    assert len({ln["request_id"] for ln in lines}) == 3  # one per stream


# -- chromium ------------------------------------------------------------------------------------

BROWSER_TIMEOUT = 120.0  # a cold start of chromium on a loaded 2-core VM takes a while


def chromium(site: Site, *extra: str) -> str:
    """The DOM of the page after its script ran, as headless chromium dumps it.

    No ``--virtual-time-budget``: with it, chromium ran out its budget before the echo came
    (a WebSocket is not a pending load, so virtual time does not wait for it), and with a held
    load to stop that, it deferred the page's WebSocket frames and fetches until the held
    load ended (seen here: the Close and /done leaving only at the origin's timeout). The held
    image of PAGE is the synchronisation instead: the load event, and so the dump, comes after
    the page has written what it got.

    Every name resolves to 127.0.0.1 (the proxy's TLS listener), the test CA is not in the
    browser's store (so certificate errors are ignored: what is tested is the protocol, not
    the PKI), QUIC is off (the proxy has no HTTP/3), and nothing else talks to the network.
    """
    argv = [
        "chromium",
        "--headless",
        "--no-sandbox",  # root in CI
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={site.dir / 'chromium-profile'}",
        "--ignore-certificate-errors",
        "--host-resolver-rules=MAP * 127.0.0.1",
        *extra,
        "--dump-dom",
        f"https://{HOST}:{TLS_PORT}/",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=BROWSER_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@needs_chromium
@pytest.mark.parametrize(
    ("flags", "protocol"),
    [
        pytest.param(("--disable-http2",), "http/1.1", id="http1.1"),
        pytest.param((), "h2", id="h2"),
    ],
)
def test_chromium_page_and_websocket_echo(site: Site, flags: tuple[str, ...], protocol: str):
    dom = chromium(site, *flags)
    assert f"protocol={protocol} echo={site.origin.token}" in dom, dom[-2000:]
    page = site.access("/")
    assert (page["status"], page["host"]) == (200, HOST)
    version = "2" if protocol == "h2" else "1.1"
    assert page["http_version"] == version
    # over h2 chromium opens its WebSocket on the page's connection (RFC 8441, as the proxy
    # offers SETTINGS_ENABLE_CONNECT_PROTOCOL), so that request is HTTP/2 too
    assert site.access("/ws")["http_version"] == version
    session = site.proc.wait_for("websocket_session", timeout=TIMEOUT)
    assert (session["host"], session["path"]) == (HOST, "/ws")
    assert site.origin.paths.count("/ws") == 1


# -- RFC 8441: a WebSocket on an HTTP/2 stream ---------------------------------------------------


class H2Client:
    """A blocking HTTP/2 client on one socket, the ``h2`` state machine driving it: enough
    to open an extended CONNECT stream and move DATA both ways, within flow control."""

    def __init__(self, site: Site, tls: bool) -> None:
        port = TLS_PORT if tls else PLAIN_PORT
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        if tls:
            ctx = ssl.create_default_context()
            site.ca.configure_trust(ctx)
            ctx.set_alpn_protocols(["h2"])
            sock = ctx.wrap_socket(sock, server_hostname=HOST)
            assert sock.selected_alpn_protocol() == "h2"
        self.sock = sock
        self.scheme = b"https" if tls else b"http"
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.data: list[bytes] = []  # every DATA payload received, in order (one stream)
        self.seen: list[h2.events.Event] = []
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.h2.data_to_send())

    def read(self) -> None:
        """One read; DATA kept and acknowledged, SETTINGS and PINGs acknowledged by h2."""
        data = self.sock.recv(65536)
        assert data, f"the proxy closed the connection; events: {self.seen[-5:]}"
        for event in self.h2.receive_data(data):
            self.seen.append(event)
            if isinstance(event, h2.events.DataReceived):
                self.data.append(event.data)
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
                raise AssertionError(f"ended early: {event}")
        self.flush()

    def until(self, kind: type) -> h2.events.Event:
        """Read until an event of ``kind`` has come (the first such one)."""
        while True:
            for event in self.seen:
                if isinstance(event, kind):
                    return event
            self.read()

    def send(self, stream_id: int, data: bytes) -> None:
        """DATA frames no larger than the peer allows, waiting for WINDOW_UPDATE as needed."""
        while data:
            room = min(
                self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size
            )
            if room == 0:
                self.read()
                continue
            self.h2.send_data(stream_id, data[:room])
            self.flush()
            data = data[room:]

    def close(self) -> None:
        self.sock.close()


def websocket_over_h2(site: Site, tls: bool, messages: list[str | bytes]) -> list[Event]:
    """Extended CONNECT (RFC 8441 §4), then WebSocket frames as the stream's DATA: each
    message sent and its echo read whole, then the Close handshake. What came back, whole."""
    client = H2Client(site, tls)
    try:
        client.until(h2.events.RemoteSettingsChanged)
        assert client.h2.remote_settings.enable_connect_protocol == 1  # RFC 8441 §3
        sid = client.h2.get_next_available_stream_id()
        client.h2.send_headers(
            sid,
            [
                (b":method", b"CONNECT"),
                (b":protocol", b"websocket"),
                (b":scheme", client.scheme),
                (b":path", b"/ws"),
                (b":authority", HOST.encode()),
                (b"sec-websocket-version", b"13"),
            ],
        )
        client.flush()
        response = client.until(h2.events.ResponseReceived)
        assert isinstance(response, h2.events.ResponseReceived)
        assert dict(response.headers or [])[b":status"] == b"200", response
        ws = Connection(ConnectionType.CLIENT)  # the handshake was the CONNECT: frames only
        whole: list[Event] = []
        parts: list[str | bytes] = []

        def take() -> bool:
            """Feed what arrived to wsproto, fragments joined into whole messages; False, so
            the loops above read it first and then test their condition."""
            while client.data:
                ws.receive_data(client.data.pop(0))
            for event in ws.events():
                if isinstance(event, TextMessage):
                    parts.append(event.data)
                    if event.message_finished:
                        whole.append(TextMessage(data="".join(str(p) for p in parts)))
                        parts.clear()
                elif isinstance(event, BytesMessage):
                    parts.append(event.data)
                    if event.message_finished:
                        whole.append(BytesMessage(data=b"".join(bytes(p) for p in parts)))
                        parts.clear()
                else:
                    whole.append(event)
            return False

        for i, message in enumerate(messages):
            if isinstance(message, str):
                client.send(sid, ws.send(TextMessage(data=message)))
            else:
                client.send(sid, ws.send(BytesMessage(data=message)))
            while take() or len(whole) <= i:
                client.read()
        client.send(sid, ws.send(CloseConnection(code=1000, reason="done")))
        while take() or not any(isinstance(e, CloseConnection) for e in whole):
            client.read()
        client.h2.end_stream(sid)
        client.flush()
        return whole
    finally:
        client.close()


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "h2c"])
def test_rfc8441_websocket_echo_over_an_h2_stream(site: Site, tls: bool) -> None:
    token = site.origin.token
    messages: list[str | bytes] = [f"text {token}", token.encode() * 5000, "last"]
    got = websocket_over_h2(site, tls, messages)
    echoed = [e.data for e in got if isinstance(e, TextMessage | BytesMessage)]
    assert echoed == messages
    close = [e for e in got if isinstance(e, CloseConnection)]
    assert [c.code for c in close] == [1000]
    session = site.proc.wait_for("websocket_session", timeout=TIMEOUT)
    assert (session["host"], session["path"]) == (HOST, "/ws")
    assert site.origin.paths == ["/ws"]  # an HTTP/1.1 Upgrade upstream, one
