"""The server side's TLS: one SSLContext per certificate, the one the client's SNI names.

Why it is built this way:

* **One context per certificate, picked in ``sni_callback``** (nginx's ``ssl_certificate``
  per ``server_name``, HAProxy's ``crt <dir>``). The listener hands every accepted socket one
  front context, :class:`SNIContext`; its callback swaps the connection onto the context
  of the certificate covering the name (exact name first, then ``*.parent``, one label
  deep as RFC 6125 says), or the default one (the first certificate) for no SNI or an
  unknown name. The pick is a dict look-up per handshake, nothing per request.
* **Renewal without a restart.** The front context never changes (the listener keeps it,
  and OpenSSL copies the version limits from it into each connection); the table it picks
  from is replaced whole on SIGHUP by :meth:`SNIContext.reload`, so handshakes from then
  on see the renewed files while established connections keep the certificate they got.
  A set that fails to load changes nothing: the old table stays, and the error names the
  file.
* **Modern defaults**: TLS 1.2 and up (``min_version = "TLSv1.3"`` to go further) and
  Mozilla's "intermediate" TLS 1.2 cipher list; TLS 1.3's suites are OpenSSL's, which
  are all strong.
* **Names from the certificate.** A certificate without declared ``names`` serves the DNS
  names of its subjectAltName (its CN when it has none), read with ``cryptography``, so a
  directory of certbot or cert-manager output needs no list kept in step with it.

:func:`certificate_warnings` is what ``check-config`` (through
:func:`proxy.config.load_on_host`) says of certificates that load but will fail clients:
declared names they do not cover, expiry within :data:`RENEW_WITHIN`, names that two
certificates claim.
"""

from __future__ import annotations

import datetime
import os
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from proxy.config_model import Certificate, Listener

log = structlog.get_logger("originpool")

MIN_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
# https://ssl-config.mozilla.org/ "intermediate" (guidelines 5.7): TLS 1.2's AEAD suites
# with forward secrecy; TLS 1.3's suites are not set by this list
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)
RENEW_WITHIN = datetime.timedelta(days=14)  # certbot renews at 30 days left, cert-manager at 1/3
CERT_SUFFIXES = (".pem", ".crt", ".cer")
KEY_SUFFIX = ".key"
# a directory entry that is a directory holds one of these pairs: certbot's live/NAME/ and
# a Kubernetes TLS secret (cert-manager's output) mounted as a volume
DIR_PAIRS = (("fullchain.pem", "privkey.pem"), ("tls.crt", "tls.key"))


class TLSError(Exception):
    """A certificate or key that cannot be served; ``path`` is the file, ``reason`` why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def _no_password() -> bytes:
    """An encrypted key cannot be unlocked without a prompt: refuse it, never block."""
    return b""


def new_context(min_version: str = "TLSv1.2") -> ssl.SSLContext:
    """A server context with this module's defaults and no certificate yet."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _configure(ctx, min_version)
    return ctx


def alpn_protocols(spec: Listener) -> list[str]:
    """What the listener offers by ALPN: ``h2`` first unless ``http2 = false``."""
    return ["h2", "http/1.1"] if getattr(spec, "http2", True) else ["http/1.1"]


def _configure(ctx: ssl.SSLContext, min_version: str) -> None:
    ctx.minimum_version = MIN_VERSIONS[min_version]
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])


def load_pair(cert: str, key: str, ctx: ssl.SSLContext | None = None) -> ssl.SSLContext:
    """``ctx`` (a new default one if None) serving this pair; :class:`TLSError` naming the
    file otherwise. ``key`` may be ``cert`` itself: a combined PEM, as HAProxy reads."""
    ctx = ctx if ctx is not None else new_context()
    try:
        ctx.load_cert_chain(cert, None if key == cert else key, password=_no_password)
    except ssl.SSLError as e:  # an OSError too: first
        raise TLSError(cert, _load_reason(cert, key, e)) from None
    except OSError as e:
        raise TLSError(cert, e.strerror or str(e)) from None
    return ctx


def _load_reason(cert: str, key: str, e: ssl.SSLError) -> str:
    what = f"with key {key}" if key != cert else "as a combined PEM (certificate and key)"
    return (
        f"cannot load {what}: not PEM, not a matching pair, no key or an encrypted key "
        f"({e.reason or e})"
    )


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What a certificate says of itself: its leaf's names, subject, serial and expiry."""

    names: tuple[str, ...]
    subject: str
    serial: int
    not_after: datetime.datetime


def read_certificate(path: str) -> CertInfo:
    """The first certificate in ``path`` (the leaf of a chain); :class:`TLSError` if none.
    ``cryptography`` is imported here, not with the module: a config without TLS (and
    ``originpool --help``) does not pay for its import (0.2 s cold, measured here)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        with open(path, "rb") as f:
            data = f.read()
        leaf = x509.load_pem_x509_certificate(data)
    except OSError as e:
        raise TLSError(path, e.strerror or str(e)) from None
    except ValueError as e:
        raise TLSError(path, f"not a PEM certificate: {e}") from None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return CertInfo(
        names=tuple(dict.fromkeys(_fold(n) for n in names)),
        subject=leaf.subject.rfc4514_string(),
        serial=leaf.serial_number,
        not_after=leaf.not_valid_after_utc,
    )


def _fold(name: str) -> str:
    """How names are compared: lower-case, no trailing dot (SNI carries A-labels)."""
    return name.strip().lower().rstrip(".")


def covers(pattern: str, name: str) -> bool:
    """RFC 6125 §6.4.3 as browsers apply it: ``*.parent`` stands for exactly one label."""
    if pattern == name:
        return True
    if not pattern.startswith("*."):
        return False
    label, dot, parent = name.partition(".")
    return bool(label and dot and parent == pattern[2:])


# -- a directory of certificates -------------------------------------------------------------


def find_pairs(directory: str) -> tuple[list[tuple[str, str, str]], list[str]]:
    """``certificate_dir``'s pairs in name order as (name, cert, key), and one problem per
    entry that looks like a certificate but cannot be paired.

    Read as the tools that write them lay them out: ``NAME.pem`` (or ``.crt``) with
    ``NAME.key``, or ``NAME.pem`` holding the key too (HAProxy's ``crt <dir>``); a
    subdirectory ``NAME/`` with ``fullchain.pem`` and ``privkey.pem`` (certbot's
    ``/etc/letsencrypt/live``) or ``tls.crt`` and ``tls.key`` (a Kubernetes TLS secret).
    Names starting with '.' are skipped: a mounted secret's ``..data`` links are not pairs.
    """
    pairs: list[tuple[str, str, str]] = []
    problems: list[str] = []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as e:
        return [], [f"{directory}: {e.strerror or e}"]
    names = {e.name for e in entries}
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = os.path.join(directory, entry.name)
        if entry.is_dir():
            for cert_name, key_name in DIR_PAIRS:
                cert, key = os.path.join(path, cert_name), os.path.join(path, key_name)
                if os.path.isfile(cert) and os.path.isfile(key):
                    pairs.append((entry.name, cert, key))
                    break
            continue
        stem, suffix = os.path.splitext(entry.name)
        if suffix not in CERT_SUFFIXES or not entry.is_file():
            continue
        if stem + KEY_SUFFIX in names:
            pairs.append((stem, path, os.path.join(directory, stem + KEY_SUFFIX)))
        elif _holds_key(path):
            pairs.append((stem, path, path))
        else:
            problems.append(
                f"{entry.name}: no {stem}{KEY_SUFFIX} beside it and no private key in it"
            )
    return pairs, problems


def _holds_key(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return b"PRIVATE KEY-----" in f.read(1 << 20)
    except OSError:
        return False


# -- the table a listener picks from -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Survey:
    """What a listener's certificates say of themselves, no key loaded: each pair with its
    certificate's names, which pair each name goes to (the first to claim it), and the
    later claims that lose."""

    infos: tuple[tuple[Certificate, CertInfo], ...]
    owner: dict[str, int]  # name (or "*.parent") -> index in infos
    shadowed: tuple[str, ...]  # "name: where serves it, not where"

    @classmethod
    def of(cls, spec: Listener) -> Survey:
        infos: list[tuple[Certificate, CertInfo]] = []
        owner: dict[str, int] = {}
        shadowed: list[str] = []
        for i, pair in enumerate(spec.pairs):
            info = read_certificate(pair.cert)
            infos.append((pair, info))
            for name in pair.names or info.names:
                if name in owner:
                    first = infos[owner[name]][0].where
                    shadowed.append(f"{name}: {first} serves it, not {pair.where}")
                else:
                    owner[name] = i
        return cls(tuple(infos), owner, tuple(shadowed))


@dataclass(slots=True)
class CertificateSet:
    """A listener's certificates, loaded: the default and the context for each name."""

    default: ssl.SSLContext
    exact: dict[str, ssl.SSLContext] = field(default_factory=dict)
    wildcard: dict[str, ssl.SSLContext] = field(default_factory=dict)  # parent -> context

    @classmethod
    def load(cls, spec: Listener) -> CertificateSet:
        """Every pair of ``spec`` loaded, or :class:`TLSError` for the first that fails."""
        pairs = spec.pairs
        if not pairs:
            raise TLSError(f"{spec.address[0]}:{spec.address[1]}", "no certificate to serve")
        contexts = [load_pair(p.cert, p.key, new_context(spec.min_version)) for p in pairs]
        for ctx in contexts:  # the SNI-picked context's ALPN list is the one OpenSSL uses
            ctx.set_alpn_protocols(alpn_protocols(spec))
        found = cls(default=contexts[0])
        for name, i in Survey.of(spec).owner.items():
            if name.startswith("*."):
                found.wildcard[name[2:]] = contexts[i]
            elif "*" not in name:  # "f*.example" and the like: no client matches them
                found.exact[name] = contexts[i]
        return found

    def pick(self, server_name: str | None) -> ssl.SSLContext:
        """The context for this SNI: the exact name, else ``*.parent``, else the default."""
        if server_name is None:
            return self.default
        name = server_name.lower().rstrip(".")
        ctx = self.exact.get(name)
        if ctx is not None:
            return ctx
        _label, _dot, parent = name.partition(".")
        return self.wildcard.get(parent, self.default)


class SNIContext(ssl.SSLContext):
    """The context a TLS listener accepts with: the default certificate, and an
    ``sni_callback`` that moves each handshake to the context its SNI names.

    An ``ssl.SSLContext`` itself so the listener needs nothing new; the set it picks from
    is an attribute replaced whole (one store, atomic for the event loop's thread).
    """

    certificates: CertificateSet

    @classmethod
    def build(cls, spec: Listener) -> SNIContext:
        """The listener's context; :class:`TLSError` naming the file that cannot be served."""
        found = CertificateSet.load(spec)
        ctx = cls(ssl.PROTOCOL_TLS_SERVER)
        _configure(ctx, spec.min_version)
        ctx.set_alpn_protocols(alpn_protocols(spec))
        # its own certificate is not served: the callback moves every handshake, one without
        # SNI included (OpenSSL 3.0 works without it, measured); kept in case one is not
        default = spec.pairs[0]
        load_pair(default.cert, default.key, ctx)
        ctx.certificates = found
        ctx.sni_callback = ctx._choose
        return ctx

    def reload(self, spec: Listener) -> None:
        """Re-read every file of ``spec`` for the handshakes from now on; on
        :class:`TLSError` nothing changes (the old certificates keep serving). The version
        floor is set here too: OpenSSL copies it from this context into each connection."""
        found = CertificateSet.load(spec)
        self.minimum_version = MIN_VERSIONS[spec.min_version]
        self.certificates = found

    def _choose(self, conn: Any, server_name: str | None, _front: ssl.SSLContext) -> None:
        chosen = self.certificates.pick(server_name)
        if chosen is not self:
            conn.context = chosen


def server_context(spec: Listener) -> SNIContext | None:
    """What a listener accepts with: None for plain HTTP."""
    return SNIContext.build(spec) if spec.tls else None


def renew(ctx: ssl.SSLContext | None, spec: Listener) -> bool:
    """SIGHUP's part for one listener: its certificates re-read from ``spec``'s files.
    False (and one log line naming the file and why) when the old ones are kept."""
    where = f"{spec.address[0]}:{spec.address[1]}"
    if not isinstance(ctx, SNIContext) or not spec.tls:
        if (ctx is not None) != spec.tls:
            log.warning(
                "reload_kept_tls",
                listen=where,
                why="TLS on a listener is set at start: restart to turn it on or off",
            )
        return False
    try:
        ctx.reload(spec)
    except TLSError as e:
        log.error("tls_reload_rejected", listen=where, file=e.path, error=e.reason)
        return False
    return True


# -- what check-config says ---------------------------------------------------------------------


def certificate_warnings(
    listeners: Sequence[Listener], source: str, now: datetime.datetime | None = None
) -> tuple[str, ...]:
    """Certificates that load but will fail clients, one warning each: a declared name the
    certificate does not cover, expiry within :data:`RENEW_WITHIN` (or past), a name two
    certificates claim (the first serves it). Files that do not load are the reader's
    errors, so they are skipped here. Reads the certificates only: no key is loaded."""
    now = now or datetime.datetime.now(datetime.UTC)
    out: list[str] = []
    for spec in listeners:
        try:
            found = Survey.of(spec)
        except TLSError:
            continue
        for i, (pair, info) in enumerate(found.infos):
            warned = _warn(pair, info, now, default=i == 0)
            out.extend(f"{source}: {pair.where}: warning: {w}" for w in warned)
        out.extend(f"{source}: {spec.path}: warning: {s}" for s in found.shadowed)
    return tuple(out)


def _warn(
    pair: Certificate, info: CertInfo, now: datetime.datetime, default: bool
) -> Iterable[str]:
    missing = [n for n in pair.names if not any(covers(p, n) for p in info.names)]
    if missing:
        has = ", ".join(info.names) or "no DNS name"
        yield (
            f"{pair.cert} does not cover {', '.join(missing)} (it names {has}): "
            "clients that check it will refuse those names"
        )
    left = info.not_after - now
    day = info.not_after.strftime("%Y-%m-%d %H:%M UTC")
    if left <= datetime.timedelta(0):
        yield f"{pair.cert} expired on {day}: clients refuse it; renew it"
    elif left <= RENEW_WITHIN:
        yield f"{pair.cert} expires on {day}, in {left.days} days: renew it"
    if not pair.names and not info.names and not default:
        yield f"{pair.cert} names no DNS name: it can only serve as the default"
