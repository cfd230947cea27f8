"""The pid file: written by ``serve`` at start, read by ``originpool reload`` and ``stop``.

So an operator signals the proxy by name, as ``nginx -s reload`` does, instead of
``kill -HUP $(pidof ...)``, which finds every worker too (a worker that gets SIGHUP reloads
alone, and the others keep the old config). The file holds the PID that takes the signals:
the master with ``workers > 1``, the only process otherwise.

Written atomically (a temporary file renamed over it), so a reader never sees half a PID,
and removed at a clean exit only if it still holds this process's PID: a second proxy
started with the same path owns it from then on. A file left by a killed proxy is stale;
:func:`running` tells that apart (the PID is gone, or now belongs to another program)
before anything is sent to it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from pathlib import Path


class PidFileError(Exception):
    """The pid file cannot be written or read, or names no running proxy.

    ``path`` and ``errno`` (None when the fault is the content, not the system) say where and
    why; ``str()`` is the one line to print.
    """

    def __init__(self, path: str, reason: str, code: int | None = None) -> None:
        self.path = path
        self.reason = reason
        self.errno = code
        super().__init__(f"pid file {path}: {reason}")


def write(path: str, pid: int | None = None) -> None:
    """Put ``pid`` (this process's by default) in ``path``, atomically."""
    pid = os.getpid() if pid is None else pid
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{pid}\n")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise PidFileError(path, f"cannot write: {e.strerror or e}", e.errno) from None


def remove(path: str, pid: int | None = None) -> None:
    """Delete ``path`` if it still names ``pid`` (this process's by default); else leave it."""
    pid = os.getpid() if pid is None else pid
    with contextlib.suppress(PidFileError, OSError):
        if read(path) == pid:
            os.unlink(path)


def read(path: str) -> int:
    """The PID in ``path``; :class:`PidFileError` if there is none (says what to check)."""
    try:
        text = Path(path).read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        raise PidFileError(
            path, "no such file: is the proxy running, with this [proxy] pid_file?", errno.ENOENT
        ) from None
    except OSError as e:
        raise PidFileError(path, f"cannot read: {e.strerror or e}", e.errno) from None
    word = text.strip()
    if not word.isdigit() or int(word) <= 1:
        shown = word if len(word) <= 20 else word[:17] + "..."
        raise PidFileError(path, f"does not hold a PID (it holds {shown!r})")
    return int(word)


def running(path: str) -> int:
    """The PID of the proxy ``path`` names, checked to be a live ``originpool serve``: a PID
    from a stale file may since have been given to another program, which must not get a
    signal meant for the proxy."""
    pid = read(path)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise PidFileError(
            path, f"stale: PID {pid} is not running (the proxy died without removing it)"
        ) from None
    except PermissionError:
        pass  # it exists; whether this user may signal it is for the signal to say
    if not _is_proxy(pid):
        raise PidFileError(
            path, f"stale: PID {pid} is running but is not originpool serve (a PID reused)"
        )
    return pid


def _is_proxy(pid: int) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc to ask: the PID is alive, which is all we can know
    named = any(a.endswith(b"originpool") or a == b"proxy.cli" for a in args)
    return named and b"serve" in args


def send(path: str, sig: signal.Signals) -> int:
    """Send ``sig`` to the proxy ``path`` names; its PID, or :class:`PidFileError`."""
    pid = running(path)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        raise PidFileError(path, f"stale: PID {pid} exited before {sig.name} reached it") from None
    except PermissionError as e:
        raise PidFileError(
            path, f"cannot send {sig.name} to PID {pid}: {e.strerror or e}", e.errno
        ) from None
    return pid
