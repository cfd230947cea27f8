"""The testbed's processes and its network namespace: everything it starts, it ends.

Why it is built this way:

* **A named namespace** (``ip netns add originpool-testbed-<pid>-<mode>``) rather than an
  anonymous ``unshare``: an operator can see it with ``ip netns list`` while a run is going
  and a test can check that it is gone afterwards. The runner's main thread ``setns``-es into
  it, so the children it starts are born inside and its own sockets (admin scrapes, the
  census) see what they see; the host's sysctls are never written.
* **Children are ended by PID, never by name**, SIGTERM first, SIGKILL after a bounded wait,
  and any process a child started (worker processes) is found through ``/proc`` and ended
  the same way. Each child gets a session of its own, so a Ctrl-C at the terminal reaches
  only the runner, which then ends them in order instead of racing them.
* **Log lines are read from the pipe's fd directly**, for every child at once with
  ``select``: a buffered ``readline()`` can hold the very line being waited for while
  ``select`` reports nothing more to read, and a proxy whose stdout pipe is left unread
  would block on its next log line and stall the measurement.
* **Interrupts are deferred across critical sections** (starting a child and recording its
  PID, entering and leaving the namespace), so a SIGINT can never leave a process or a
  namespace that the cleanup does not know about.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from pool import kernel

_libc = ctypes.CDLL(None, use_errno=True)

# -- interrupts ------------------------------------------------------------------------------

_critical = 0
_pending: int | None = None


def _on_signal(signum: int, _frame: Any) -> None:
    global _pending
    if _critical:
        _pending = signum
        return
    raise KeyboardInterrupt(signal.Signals(signum).name)


def install_interrupt_handlers() -> Callable[[], None]:
    """SIGINT and SIGTERM become KeyboardInterrupt, deferred inside :func:`critical`.

    Returns a function that puts the previous handlers back.
    """
    old = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    return restore


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """No KeyboardInterrupt inside; one that arrived meanwhile is raised on the way out."""
    global _critical, _pending
    _critical += 1
    try:
        yield
    finally:
        _critical -= 1
        if not _critical and _pending is not None:
            signum, _pending = _pending, None
            raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Cleanup that must run to its end: interrupts meanwhile are dropped, not deferred."""
    global _critical, _pending
    _critical += 1
    try:
        yield
    finally:
        _critical -= 1
        _pending = None


# -- the namespace ---------------------------------------------------------------------------


def _setns(fd: int) -> None:
    if _libc.setns(fd, kernel.CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")
    kernel.forget()


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def ip_in_current(*args: str) -> None:
    """``ip ARGS`` in the calling thread's namespace (the testbed's, once entered): a child
    is born in the namespace of the thread that forks it."""
    _ip(*args)


def namespace_exists(name: str) -> bool:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return any(line.split()[0] == name for line in out.stdout.splitlines() if line.split())


class Space:
    """A named network namespace the calling thread is inside between enter() and leave()."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._home: int | None = None
        self.created = False

    def enter(self, port_range: tuple[int, int], somaxconn: int = 65535) -> None:
        with critical():
            _ip("netns", "add", self.name)
            self.created = True
            self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            target = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
            finally:
                os.close(target)
        _ip("link", "set", "lo", "up")
        self.sysctl("net.ipv4.ip_local_port_range", f"{port_range[0]} {port_range[1]}")
        self.sysctl("net.core.somaxconn", str(somaxconn))
        # a ramp of thousands of connects must not meet SYN cookies or a full SYN queue
        self.sysctl("net.ipv4.tcp_max_syn_backlog", str(somaxconn))

    def ip(self, *args: str) -> None:
        """``ip ARGS`` inside this namespace (only valid while inside it)."""
        assert self._home is not None, "not inside the namespace"
        _ip(*args)

    def sysctl(self, name: str, value: str) -> None:
        """Write a sysctl of *this* namespace (only valid while inside it)."""
        assert self._home is not None, "not inside the namespace"
        with open("/proc/sys/" + name.replace(".", "/"), "w") as f:
            f.write(value)
        kernel.forget()

    def leave(self) -> None:
        """Back to the namespace we came from, then delete ours (the kernel frees it once its
        last process is gone)."""
        with shielded():
            if self._home is not None:
                _setns(self._home)
                os.close(self._home)
                self._home = None
            if self.created:
                subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)
                self.created = False


# -- children --------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children of all its threads, recursively)."""
    out: list[int] = []
    todo = [pid]
    for _ in range(100000):  # bounded: a process tree is never this big
        if not todo:
            break
        current = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                text = Path(f"/proc/{current}/task/{tid}/children").read_text()
            except OSError:
                continue
            for word in text.split():
                out.append(int(word))
                todo.append(int(word))
    return out


def rss_bytes(pids: Sequence[int]) -> int:
    """VmRSS summed over ``pids`` (a proxy and its workers), from /proc/PID/status."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError):
            continue
    return total


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class Child:
    """One process the testbed started: its PID, its JSON lines, its stderr in a file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        workdir: Path,
        env: dict[str, str] | None = None,
        stdin: bool = False,
        skip: bytes | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.stderr_path = workdir / f"{name}.stderr"
        self._stderr: IO[bytes] = open(self.stderr_path, "wb")  # noqa: SIM115 (closed in end())
        self.skip = skip  # lines containing this are not parsed: a proxy's access lines
        self.lines: list[dict[str, Any]] = []
        self.raw_lines = 0
        self._buf = b""
        self.eof = False
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        self.family: set[int] = {self.pid}  # itself and every descendant ever seen

    def fileno(self) -> int:
        assert self.popen.stdout is not None
        return self.popen.stdout.fileno()

    def read(self) -> list[dict[str, Any]]:
        """Whatever is in the pipe now, as parsed lines (non-JSON lines are dropped)."""
        try:
            chunk = os.read(self.fileno(), 1 << 20)
        except BlockingIOError:
            return []
        if not chunk:
            self.eof = True
            chunk = b"\n"
        self._buf += chunk
        *complete, self._buf = self._buf.split(b"\n")
        out: list[dict[str, Any]] = []
        for raw in complete:
            self.raw_lines += bool(raw)
            if not raw.startswith(b"{") or (self.skip is not None and self.skip in raw):
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict):
                self.lines.append(line)
                out.append(line)
        return out

    def send(self, text: str) -> None:
        """A control line on the child's stdin (the load clients wait for these)."""
        if self.popen.stdin is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(BrokenPipeError, OSError):
            self.popen.stdin.write(text.encode() + b"\n")
            self.popen.stdin.flush()

    def stderr_tail(self, limit: int = 2000) -> str:
        with contextlib.suppress(OSError):
            self._stderr.flush()
            return self.stderr_path.read_text(errors="replace")[-limit:].strip()
        return ""

    def note_family(self) -> None:
        """Remember the processes this child started, while it is still there to ask."""
        if self.popen.poll() is None:
            self.family.update(descendants(self.pid))

    def signal(self, signum: int) -> None:
        """Signal this child by its PID, if it is still ours to signal."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def close_pipes(self) -> None:
        for pipe in (self.popen.stdin, self.popen.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._stderr.close()


class Children:
    """Every child of one run, and one ``select`` over all their stdout pipes."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.all: list[Child] = []

    def start(
        self, name: str, argv: Sequence[str], stdin: bool = False, skip: bytes | None = None
    ) -> Child:
        with critical():  # the PID is recorded before any interrupt can be raised
            child = Child(name, argv, self.workdir, self.env, stdin, skip)
            self.all.append(child)
        return child

    def pump(
        self, timeout: float, only: Sequence[Child] | None = None
    ) -> list[tuple[Child, dict[str, Any]]]:
        """Wait up to ``timeout`` for output from any child; every line read, in order."""
        open_ = [c for c in (only if only is not None else self.all) if not c.eof]
        if not open_:
            return []
        ready, _, _ = select.select(open_, [], [], max(0.0, timeout))
        out: list[tuple[Child, dict[str, Any]]] = []
        for child in ready:
            out.extend((child, line) for line in child.read())
        return out

    def wait_for(
        self,
        child: Child,
        event: str,
        timeout: float,
        on_line: Callable[[Child, dict[str, Any]], None] | None = None,
        count: int = 1,
    ) -> list[dict[str, Any]]:
        """Read every child's lines until ``child`` has written ``event`` ``count`` times (a
        proxy's workers each say ``ready``); raise, with its own words, if it cannot."""

        def found() -> list[dict[str, Any]]:
            return [line for line in child.lines if line.get("event") == event]

        end = time.monotonic() + timeout
        while len(found()) < count and time.monotonic() < end and not child.eof:
            for who, line in self.pump(end - time.monotonic()):
                if on_line is not None:
                    on_line(who, line)
        lines = found()
        if len(lines) >= count:
            return lines[:count]
        code = child.popen.poll()
        status = "still running" if code is None else f"exited with {code}"
        seen = [line.get("event") for line in child.lines][-5:]
        raise ChildFailed(
            f"{child.name} wrote {len(lines)} of {count} {event!r} lines within {timeout:g} s "
            f"({status}; last events {seen}); stderr: {child.stderr_tail() or '(empty)'}"
        )

    def end_all(self, grace: float = 10.0) -> list[int]:
        """End every child by PID: SIGTERM to all, a bounded wait (still reading their pipes,
        so none blocks on a full one instead of exiting), SIGKILL to what is left, then the
        same for any process they started. Returns every PID involved."""
        with shielded():
            for child in self.all:
                child.note_family()
                if child.popen.stdin is not None:
                    with contextlib.suppress(OSError):
                        child.popen.stdin.close()
                child.signal(signal.SIGTERM)
            end = time.monotonic() + grace
            while time.monotonic() < end:
                if all(c.popen.poll() is not None for c in self.all):
                    break
                self.pump(min(0.1, max(0.0, end - time.monotonic())))
            pids: list[int] = []
            for child in self.all:
                child.signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.popen.wait(timeout=grace)
                for pid in sorted(child.family - {child.pid}):
                    if alive(pid):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                child.close_pipes()
                pids.extend(sorted(child.family))
            return pids


class ChildFailed(RuntimeError):
    """A child did not become ready, or died: the message carries its own words."""
