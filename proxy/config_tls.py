"""The reader's part for a listener's TLS keys: ``certificates``, ``certificate_dir``,
``min_version`` (``tls_cert``/``tls_key`` stay with the listener's other keys).

Apart from :mod:`proxy.config_reader` to keep that walk readable (it was past 600 lines).
A base class of :class:`~proxy.config_reader._Reader`, so these read like its other
methods (``self.field``, ``self.problem``) and this module never imports the reader.
Each pair is loaded here once, by the same :func:`proxy.tls.load_pair` that serves it, so
what ``check-config`` accepts is what ``serve`` can load.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from proxy.config_model import TLS_VERSIONS, Certificate
from proxy.config_values import _certificate_names, _choice, _Invalid, _show, _string
from proxy.tls import TLSError, find_pairs, load_pair

if TYPE_CHECKING:
    from collections.abc import Callable

    Check = Callable[[Any], Any]
    T = TypeVar("T")

CERTIFICATE_KEYS = ("cert", "key", "names")


def _key(path: str, key: str) -> str:
    return f"{path}.{key}"  # the keys here are bare words: no quoting needed


class TLSKeys:
    """The reader's methods for a listener's TLS keys; what they use of the reader
    (problems, tables, fields, files) is declared for type checkers only."""

    if TYPE_CHECKING:
        base_dir: Path

        def problem(self, path: str, reason: str) -> None: ...
        def table(
            self, value: Any, path: str, known: Sequence[str]
        ) -> Mapping[str, Any] | None: ...
        def field(
            self, table: Mapping[str, Any], path: str, key: str, check: Check, default: T
        ) -> T: ...
        def array(self, table: Mapping[str, Any], path: str, key: str) -> list[Any] | None: ...
        def file(self, what: str) -> Check: ...

    def directory(self, what: str) -> Check:
        """A path (relative to the config's directory) to a readable directory, absolute."""

        def check(value: Any) -> str:
            text = _string(value, f"the path of a directory of {what}")
            if not text or "\x00" in text:
                raise _Invalid(f"must be the path of a directory of {what}, got {_show(value)}")
            path = self.base_dir / text
            if not path.is_dir():
                raise _Invalid(f"{text!r}: no such directory")
            if not os.access(path, os.R_OK | os.X_OK):
                raise _Invalid(f"{text!r}: not readable by this user")
            return os.fspath(path.resolve())

        return check

    def listener_tls(
        self, table: Mapping[str, Any], path: str, default: bool
    ) -> tuple[tuple[Certificate, ...], str | None, str]:
        """A listener's ``certificates``, ``certificate_dir`` pairs and ``min_version``
        (:mod:`proxy.tls` serves them); ``default``: ``tls_cert`` is set."""
        pairs = [
            pair
            for i, item in enumerate(self.array(table, path, "certificates") or [])
            if (pair := self.certificate(item, f"{path}.certificates[{i}]")) is not None
        ]
        if table.get("certificates") == []:
            self.problem(
                _key(path, "certificates"), "empty: give {cert = ..., key = ...} or leave it out"
            )
        directory = self.field(
            table, path, "certificate_dir", self.directory("certificate pairs"), None
        )
        if directory is not None:
            found = self.certificate_dir(directory, _key(path, "certificate_dir"))
            if not found and not default and not pairs:
                self.problem(
                    _key(path, "certificate_dir"),
                    f"{directory}: no certificate found (NAME.pem with NAME.key, a NAME.pem "
                    "holding its key, or NAME/ with fullchain.pem + privkey.pem or tls.crt + "
                    "tls.key)",
                )
            pairs += found
        min_version = self.field(table, path, "min_version", _choice(TLS_VERSIONS), "TLSv1.2")
        if "min_version" in table and not (default or pairs or directory):
            self.problem(
                _key(path, "min_version"), "only for a TLS listener (tls_cert or certificates)"
            )
        return tuple(pairs), directory, min_version

    def certificate(self, item: Any, where: str) -> Certificate | None:
        """One ``{cert, key, names}`` of ``certificates``, loaded once to prove it serves;
        ``key`` left out: ``cert`` holds the key too (a combined PEM)."""
        table = self.table(item, where, CERTIFICATE_KEYS)
        if table is None:
            return None
        if "cert" not in table:
            self.problem(_key(where, "cert"), "required: the path of a PEM certificate chain")
        cert = self.field(table, where, "cert", self.file("a PEM certificate chain"), None)
        key = self.field(table, where, "key", self.file("a PEM private key"), cert)
        names = self.field(table, where, "names", _certificate_names, ())
        if cert is None or key is None:
            return None
        try:
            load_pair(cert, key)
        except TLSError as e:
            self.problem(where, str(e))
            return None
        return Certificate(cert, key, names, where)

    def certificate_dir(self, directory: str, where: str) -> list[Certificate]:
        """The pairs in ``directory`` (see :func:`proxy.tls.find_pairs`), each loaded once."""
        pairs, problems = find_pairs(directory)
        for problem in problems:
            self.problem(where, problem)
        out = []
        for name, cert, key in pairs:
            try:
                load_pair(cert, key)
            except TLSError as e:
                self.problem(where, f"{name}: {e}")
                continue
            out.append(Certificate(cert, key, (), f"{where} ({name})"))
        return out
