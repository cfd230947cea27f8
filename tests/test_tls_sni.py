"""TLS certificates chosen by SNI (proxy.tls): several pairs per listener, the one covering
the client's name served, the first for no or an unknown name; renewed files served after
SIGHUP, a broken one refused with the old kept; TLS 1.2+; check-config's warnings.

The handshakes are OpenSSL's own client, ``openssl s_client -servername``, against a real
``originpool serve`` in a network namespace of the test's own.
"""

from __future__ import annotations

import datetime
import http.server
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import structlog.testing
import trustme
from cryptography import x509

from proxy import config as cfg
from proxy import tls
from proxy.config_model import Certificate
from tests.test_serve import Proc

ROOT = Path(__file__).resolve().parent.parent
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl binary")
PORT = 8443

CONFIG = """
[[listen]]
address = "127.0.0.1:{port}"
tls_cert = "default.pem"
tls_key = "default.key"
certificates = [
    {{ cert = "a.pem", key = "a.key" }},
    {{ cert = "wild.pem", key = "wild.key" }},
    {{ cert = "both.pem", names = ["b.example"] }},
]
certificate_dir = "certs"
min_version = "{min_version}"
[admin]
address = "127.0.0.1:9090"
[proxy]
pid_file = "originpool.pid"
workers = {workers}
[[routes]]
host = "app.example"
origins = ["http://127.0.2.1:9000"]
[timeouts]
drain = 5
[log]
format = "json"
"""


def write_pair(ca: trustme.CA, base: Path, *names: str, **kw: object) -> trustme.LeafCert:
    """``base``.pem (chain) and ``base``.key for a certificate of ``names``."""
    leaf = ca.issue_cert(*names, **kw)  # type: ignore[arg-type]
    base.parent.mkdir(parents=True, exist_ok=True)
    leaf.cert_chain_pems[0].write_to_path(str(base.with_suffix(".pem")))
    for extra in leaf.cert_chain_pems[1:]:
        extra.write_to_path(str(base.with_suffix(".pem")), append=True)
    leaf.private_key_pem.write_to_path(str(base.with_suffix(".key")))
    return leaf


def serial_of(leaf: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


@pytest.fixture
def site(tmp_path: Path) -> dict[str, object]:
    """Certificates for every way a listener gets them, and the config naming them."""
    ca = trustme.CA()
    leaves = {
        "default": write_pair(ca, tmp_path / "default", "default.example"),
        "a": write_pair(ca, tmp_path / "a", "a.example"),
        "wild": write_pair(ca, tmp_path / "wild", "*.wild.example"),
        "c": write_pair(ca, tmp_path / "certs" / "c", "c.example"),  # NAME.pem + NAME.key
    }
    both = write_pair(ca, tmp_path / "both", "b.example")  # a combined PEM
    (tmp_path / "both.pem").write_bytes(
        (tmp_path / "both.pem").read_bytes() + (tmp_path / "both.key").read_bytes()
    )
    (tmp_path / "both.key").unlink()
    leaves["b"] = both
    certbot = tmp_path / "certs" / "d.example"  # certbot's live/NAME/ layout
    leaves["d"] = write_pair(ca, certbot / "cert", "d.example")
    (certbot / "cert.pem").rename(certbot / "fullchain.pem")
    (certbot / "cert.key").rename(certbot / "privkey.pem")
    (tmp_path / "certs" / "README").write_text("certbot leaves one of these\n")
    return {"ca": ca, "dir": tmp_path, "leaves": leaves}


def write_config(directory: Path, min_version: str = "TLSv1.2", workers: int = 1) -> Path:
    path = directory / "originpool.toml"
    path.write_text(CONFIG.format(port=PORT, min_version=min_version, workers=workers))
    return path


def s_client(
    name: str | None, *extra: str, port: int = PORT
) -> tuple[subprocess.CompletedProcess[str], x509.Certificate | None]:
    """One handshake by OpenSSL's client (SNI ``name``, or none), and the certificate the
    server sent; stdin closed, so it ends after the handshake."""
    assert OPENSSL is not None
    sni = ["-servername", name] if name is not None else ["-noservername"]
    argv = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", *sni, *extra]
    done = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20
    )
    pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", done.stdout, re.S)
    cert = x509.load_pem_x509_certificate(pem.group().encode()) if pem else None
    return done, cert


def names_of(cert: x509.Certificate | None) -> list[str]:
    assert cert is not None, "no certificate in s_client's output"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return san.value.get_values_for_type(x509.DNSName)


# -- the pick -----------------------------------------------------------------------------------


def test_pick_exact_then_one_label_wildcard_then_default(site) -> None:
    d = site["dir"]
    spec = cfg.load(write_config(d)).listen[0]
    found = tls.CertificateSet.load(spec)
    # one context per certificate (which one serves what: s_client's test below)
    names = ("a.example", "x.wild.example", "b.example", "c.example", "d.example", None)
    assert len({id(found.pick(name)) for name in names}) == len(names)
    assert found.pick("default.example") is found.default
    assert found.pick("A.Example.") is found.pick("a.example")  # SNI is case-blind
    assert found.pick("y.wild.example") is found.pick("x.wild.example")
    for unknown in ("x.y.wild.example", "wild.example", "other.example"):
        assert found.pick(unknown) is found.default  # '*' stands for one label only
    survey = tls.Survey.of(spec)
    assert survey.owner["*.wild.example"] == 2 and survey.owner["d.example"] == 5
    assert [info.names for _pair, info in survey.infos][:3] == [
        ("default.example",),
        ("a.example",),
        ("*.wild.example",),
    ]


def test_config_reads_every_source_in_order(site) -> None:
    d = site["dir"]
    spec = cfg.load(write_config(d)).listen[0]
    assert spec.tls and spec.min_version == "TLSv1.2"
    assert [p.where for p in spec.pairs] == [
        "listen[0].tls_cert",
        "listen[0].certificates[0]",
        "listen[0].certificates[1]",
        "listen[0].certificates[2]",
        "listen[0].certificate_dir (c)",
        "listen[0].certificate_dir (d.example)",
    ]
    assert spec.pairs[3] == Certificate(
        str(d / "both.pem"), str(d / "both.pem"), ("b.example",), "listen[0].certificates[2]"
    )
    assert spec.pairs[5].cert == str(d / "certs" / "d.example" / "fullchain.pem")


def problems(text: str, base: Path) -> list[str]:
    with pytest.raises(cfg.ConfigError) as e:
        cfg.parse(text, "t.toml", base_dir=base)
    return e.value.problems


def test_config_problems_name_the_certificate(site) -> None:
    d = site["dir"]
    head = '[[listen]]\naddress = "127.0.0.1:8443"\n'
    tail = '[[routes]]\nhost = "a"\norigins = ["http://127.0.2.1:9000"]\n'

    def listen(body: str) -> list[str]:
        return problems(head + body + "\n" + tail, d)

    found = listen(
        'certificates = [{cert = "a.pem", key = "a.key"}, {cert = "a.pem", key = "wild.key"}]'
    )
    assert len(found) == 1
    assert found[0].startswith(f"t.toml: listen[0].certificates[1]: {d / 'a.pem'}: cannot load")
    assert "wild.key" in found[0]
    assert listen('certificates = [{cert = "a.pem"}]')[0].startswith(
        f"t.toml: listen[0].certificates[0]: {d / 'a.pem'}: cannot load as a combined PEM"
    )
    assert listen('certificates = [{key = "a.key"}]') == [
        "t.toml: listen[0].certificates[0].cert: required: the path of a PEM certificate chain"
    ]
    assert listen('certificates = [{cert = "a.pem", key = "a.key", names = ["*"]}]') == [
        "t.toml: listen[0].certificates[0].names: '*': '*' only as the whole first label, as "
        "in '*.example' (the certificate for no or an unknown name is the first one)"
    ]
    assert listen('certificates = [{cert = "a.pem", key = "a.key", nmes = ["x"]}]') == [
        "t.toml: listen[0].certificates[0].nmes: unknown key; did you mean 'names'?"
    ]
    assert listen("certificates = []") == [
        "t.toml: listen[0].certificates: empty: give {cert = ..., key = ...} or leave it out"
    ]
    assert listen('min_version = "TLSv1.3"') == [
        "t.toml: listen[0].min_version: only for a TLS listener (tls_cert or certificates)"
    ]
    bad = listen('tls_cert = "a.pem"\ntls_key = "a.key"\nmin_version = "TLSv1.1"')
    assert bad == [
        "t.toml: listen[0].min_version: must be one of 'TLSv1.2', 'TLSv1.3'; got 'TLSv1.1'"
    ]
    (d / "empty").mkdir()
    assert listen('certificate_dir = "empty"')[0].startswith(
        f"t.toml: listen[0].certificate_dir: {d / 'empty'}: no certificate found"
    )
    (d / "certs" / "lonely.crt").write_bytes((d / "a.pem").read_bytes())
    assert listen('certificate_dir = "certs"') == [
        "t.toml: listen[0].certificate_dir: lonely.crt: no lonely.key beside it and no "
        "private key in it"
    ]


def test_check_config_warns_of_names_not_covered_and_expiry(site) -> None:
    d, ca = site["dir"], site["ca"]
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=10)
    write_pair(ca, d / "soon", "soon.example", not_after=soon)
    (d / "t.toml").write_text(
        '[[listen]]\naddress = "127.0.0.1:8443"\ntls_cert = "default.pem"\n'
        'tls_key = "default.key"\ncertificates = [\n'
        '  {cert = "a.pem", key = "a.key", names = ["a.example", "www.a.example"]},\n'
        '  {cert = "soon.pem", key = "soon.key"},\n'
        '  {cert = "wild.pem", key = "wild.key", names = ["x.wild.example", "a.example"]},\n]\n'
        '[[routes]]\nhost = "a"\norigins = ["http://127.0.2.1:9000"]\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "check-config", str(d / "t.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    warnings = done.stderr.splitlines()
    day = soon.strftime("%Y-%m-%d")
    assert warnings[0] == (
        f"{d / 't.toml'}: listen[0].certificates[0]: warning: {d / 'a.pem'} does not cover "
        "www.a.example (it names a.example): clients that check it will refuse those names"
    )
    assert warnings[1].startswith(
        f"{d / 't.toml'}: listen[0].certificates[1]: warning: {d / 'soon.pem'} expires on {day}"
    )
    assert warnings[1].endswith("in 9 days: renew it")
    assert warnings[2] == (
        f"{d / 't.toml'}: listen[0].certificates[2]: warning: {d / 'wild.pem'} does not cover "
        "a.example (it names *.wild.example): clients that check it will refuse those names"
    )
    assert warnings[3] == (
        f"{d / 't.toml'}: listen[0]: warning: a.example: listen[0].certificates[0] serves it, "
        "not listen[0].certificates[2]"
    )
    assert len(warnings) == 4


def test_a_failed_renewal_keeps_the_old_set(site) -> None:
    """The race the reader cannot see: a file broken between check and load."""
    d = site["dir"]
    spec = cfg.load(write_config(d)).listen[0]
    ctx = tls.server_context(spec)
    assert isinstance(ctx, tls.SNIContext)
    before = ctx.certificates
    stricter = cfg.load(write_config(d, "TLSv1.3")).listen[0]
    (d / "a.key").write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
    with structlog.testing.capture_logs() as logged:
        assert tls.renew(ctx, stricter) is False
    assert ctx.certificates is before and ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert [(e["event"], e["file"]) for e in logged] == [("tls_reload_rejected", str(d / "a.pem"))]
    assert "cannot load with key" in logged[0]["error"]
    write_pair(site["ca"], d / "a", "a.example")  # fixed: the next reload takes it all
    assert tls.renew(ctx, stricter) is True
    assert ctx.certificates is not before and ctx.minimum_version == ssl.TLSVersion.TLSv1_3


# -- a real serve, OpenSSL's client ---------------------------------------------------------------


@needs_openssl
def test_serve_picks_by_sni_and_refuses_old_protocols(ns, site) -> None:
    d, leaves = site["dir"], site["leaves"]
    proc = Proc(write_config(d))
    try:
        proc.wait_for("ready")
        for name, leaf in [
            ("a.example", "a"),
            ("x.wild.example", "wild"),
            ("b.example", "b"),
            ("c.example", "c"),
            ("d.example", "d"),
            ("unknown.example", "default"),
            ("x.y.wild.example", "default"),
            (None, "default"),
        ]:
            done, cert = s_client(name)
            assert done.returncode == 0, done.stderr
            assert cert is not None and cert.serial_number == serial_of(leaves[leaf]), name
        assert names_of(s_client("a.example")[1]) == ["a.example"]
        site["ca"].cert_pem.write_to_path(str(d / "ca.pem"))
        for name in ("a.example", "x.wild.example", "b.example", "d.example"):
            strict = ("-CAfile", str(d / "ca.pem"), "-verify_hostname", name)
            done, _cert = s_client(name, *strict, "-verify_return_error")
            assert done.returncode == 0 and "Verify return code: 0 (ok)" in done.stdout, name
        for flag, version in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
            done, _cert = s_client("a.example", flag)
            assert done.returncode == 0 and f"New, {version}, Cipher" in done.stdout, done
        # the client offers TLS 1.1 (SECLEVEL=0 lets OpenSSL 3's client do so): the server says no
        done, cert = s_client("a.example", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
        assert done.returncode != 0 and cert is None
        assert "no protocols available" not in done.stderr  # refused by the server:
        refused = proc.wait_for("accept_handshake_failed")
        assert "UNSUPPORTED_PROTOCOL" in refused["error"], refused
    finally:
        assert proc.stop() == 0


@needs_openssl
def test_min_version_tls13_refuses_tls12(ns, site) -> None:
    proc = Proc(write_config(site["dir"], "TLSv1.3"))
    try:
        proc.wait_for("ready")
        done, cert = s_client("a.example", "-tls1_2")
        assert done.returncode != 0 and cert is None
        refused = proc.wait_for("accept_handshake_failed")
        assert "UNSUPPORTED_PROTOCOL" in refused["error"], refused
        done, cert = s_client("a.example", "-tls1_3")
        assert done.returncode == 0 and cert is not None
    finally:
        assert proc.stop() == 0


class Hello(http.server.BaseHTTPRequestHandler):
    """The origin: "hello" on every GET, keep-alive (HTTP/1.1 with a length)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def origin(ns) -> Iterator[None]:
    """An origin at 127.0.2.1:9000 in the test's namespace (bound here, on this thread)."""
    server = http.server.ThreadingHTTPServer(("127.0.2.1", 9000), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield
    server.shutdown()
    server.server_close()
    thread.join(10)


def request_over(conn: ssl.SSLSocket) -> bytes:
    """One request on an open TLS connection, and the response: the connection works."""
    conn.sendall(b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
    got = b""
    while not got.endswith(b"hello"):
        chunk = conn.recv(4096)
        assert chunk, f"connection closed after {got!r}"
        got += chunk
    return got.split(b"\r\n", 1)[0] + b" " + got[-5:]


OK = b"HTTP/1.1 200 OK hello"


@needs_openssl
def test_sighup_serves_renewed_files_and_keeps_old_on_broken(ns, origin, site) -> None:
    d, ca, leaves = site["dir"], site["ca"], site["leaves"]
    proc = Proc(write_config(d))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    try:
        proc.wait_for("ready")
        raw = socket.create_connection(("127.0.0.1", PORT), timeout=10)
        before = client.wrap_socket(raw, server_hostname="a.example")  # opened before renewal
        assert request_over(before) == OK
        old = serial_of(leaves["a"])
        assert s_client("a.example")[1].serial_number == old  # type: ignore[union-attr]

        renewed = write_pair(ca, d / "a", "a.example")  # certbot's renewal: same paths
        renewed_dir = write_pair(ca, d / "certs" / "c", "c.example")
        proc.p.send_signal(signal.SIGHUP)
        proc.wait_for("reloaded")
        assert s_client("a.example")[1].serial_number == serial_of(renewed)  # type: ignore[union-attr]
        assert s_client("c.example")[1].serial_number == serial_of(renewed_dir)  # type: ignore[union-attr]
        assert request_over(before) == OK  # still served
        assert int(before.getpeercert()["serialNumber"], 16) == old  # type: ignore[index]

        (d / "a.pem").write_text(
            "-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n"
        )
        proc.p.send_signal(signal.SIGHUP)
        rejected = proc.wait_for("reload_rejected")
        assert len(rejected["problems"]) == 1 and str(d / "a.pem") in rejected["problems"][0]
        assert rejected["problems"][0].startswith(
            f"{d / 'originpool.toml'}: listen[0].certificates[0]:"
        )
        assert s_client("a.example")[1].serial_number == serial_of(renewed)  # type: ignore[union-attr]
        assert request_over(before) == OK
        before.close()
    finally:
        assert proc.stop() == 0
    assert [ln["event"] for ln in proc.lines].count("reload_rejected") == 1


def test_kubernetes_secret_and_certbot_layouts(tmp_path: Path) -> None:
    """A TLS secret mounted as a volume: tls.crt and tls.key are links through ``..data``
    (swapped atomically on update), which is skipped; certbot's live/NAME/ and its README."""
    ca = trustme.CA()
    mount = tmp_path / "secret"
    write_pair(ca, mount / "..2026_12_07" / "tls", "k8s.example")
    (mount / "..2026_12_07" / "tls.pem").rename(mount / "..2026_12_07" / "tls.crt")
    (mount / "..data").symlink_to("..2026_12_07")
    for name in ("tls.crt", "tls.key"):
        (mount / name).symlink_to(f"..data/{name}")
    assert tls.find_pairs(str(mount)) == (
        [("tls", str(mount / "tls.crt"), str(mount / "tls.key"))],
        [],
    )
    live = tmp_path / "live"
    write_pair(ca, live / "site.example" / "fullchain", "site.example")
    (live / "site.example" / "fullchain.key").rename(live / "site.example" / "privkey.pem")
    (live / "README").write_text("This directory contains your keys and certificates.\n")
    (live / "empty").mkdir()  # not a pair: skipped
    site = live / "site.example"
    assert tls.find_pairs(str(live)) == (
        [("site.example", str(site / "fullchain.pem"), str(site / "privkey.pem"))],
        [],
    )


def test_the_deploy_example_block_is_valid(site) -> None:
    """deploy/originpool.toml's commented SNI listener, uncommented with real files."""
    d = site["dir"]
    text = (ROOT / "deploy" / "originpool.toml").read_text()
    block = text.split("# or does not cover a name given in names.\n")[1].split("\n\n")[0]
    doc = "\n".join(line[2:] if line.startswith("# ") else line for line in block.splitlines())
    doc = doc.replace("/etc/originpool/tls/example.com", str(d / "a"))
    doc = doc.replace("/etc/originpool/tls/legacy.pem", str(d / "both.pem"))
    doc = doc.replace("/etc/letsencrypt/live", str(d / "certs"))
    route = '[[routes]]\nhost = "a"\norigins = ["http://127.0.2.1:9000"]\n'
    spec = cfg.parse(doc + "\n" + route, "example.toml").listen[0]
    assert [p.where for p in spec.pairs] == [
        "listen[0].certificates[0]",
        "listen[0].certificates[1]",
        "listen[0].certificate_dir (c)",
        "listen[0].certificate_dir (d.example)",
    ]
    assert spec.pairs[1].names == ("old.example.com",) and spec.min_version == "TLSv1.2"


@needs_openssl
def test_every_worker_serves_the_renewal(ns, site) -> None:
    """workers = 2: the master forwards SIGHUP, each worker re-reads the files, and every
    handshake after both reloaded (the kernel spreads them over both) sees the new serial."""
    d, ca = site["dir"], site["ca"]
    proc = Proc(write_config(d, workers=2))
    try:
        proc.wait_for("ready", count=2)
        renewed = write_pair(ca, d / "a", "a.example")
        proc.p.send_signal(signal.SIGHUP)
        proc.wait_for("reloaded", count=2)
        served = {s_client("a.example")[1].serial_number for _ in range(12)}  # type: ignore[union-attr]
        assert served == {serial_of(renewed)}
        assert len({ln["pid"] for ln in proc.lines if ln.get("event") == "reloaded"}) == 2
    finally:
        assert proc.stop() == 0


def test_ports_reads_a_config_whose_certificates_it_cannot_read(tmp_path: Path) -> None:
    """``originpool ports`` needs no key: the SNI keys are left out as tls_cert is."""
    from proxy.cli import _config_for_ports

    path = tmp_path / "t.toml"
    path.write_text(
        '[[listen]]\naddress = "127.0.0.1:8443"\nmin_version = "TLSv1.3"\n'
        'certificates = [{cert = "absent.pem", key = "absent.key"}]\n'
        'certificate_dir = "absent"\n'
        '[[routes]]\nhost = "a"\norigins = ["http://127.0.2.1:9000"]\n'
    )
    with pytest.raises(cfg.ConfigError):
        cfg.load(path)
    assert _config_for_ports(str(path)).listen[0].address == ("127.0.0.1", 8443)
