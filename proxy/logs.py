"""structlog set-up: JSON lines on stdout for machines, ``console`` for humans.

One access line per request and one per WebSocket session come from the data path, so the
JSON path is built for it: orjson renders the line (structlog's documented fast set-up:
``BytesLoggerFactory`` and an orjson serializer), and lines written during one turn of the
event loop leave in one write() at the end of that turn instead of one syscall each. An idle
proxy still writes a line within the turn that logged it; under load a write carries many.

``[log] access_file`` and ``error_file`` take the access lines (``access``,
``websocket_session``) and the other lines off stdout into files, nginx's ``access_log`` and
``error_log``. Files get the same per-turn writes as stdout: nothing is held past the turn
that logged it (nginx writes unbuffered by default; one write per turn is as safe and cheaper
under load), the held lines go out before a reopen and at exit, and each process opens with
O_APPEND, so the writes of several workers (whole lines, at most PIPE_BUF) never overwrite or
split each other. :func:`reopen` is SIGUSR1's job: logrotate renames the file and the next
lines land in a new one at the old path.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime
import logging
import os
import select
import sys
from typing import Any, BinaryIO, cast

import orjson
import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
LEVELS["error"] = logging.ERROR

# writes of at most PIPE_BUF bytes to a pipe are atomic: lines of several worker processes
# sharing one stdout pipe never interleave within a line
CHUNK = select.PIPE_BUF


class TurnBuffer:
    """A bytes sink (``write``/``flush``, as BytesLogger wants) that holds lines until the end
    of the current event-loop turn; outside a running loop every flush writes at once."""

    def __init__(self, fd: int, path: str | None = None) -> None:
        self._fd = fd
        self.path = path  # a log file's, for reopen(); None for stdout
        self._lines: list[bytes] = []
        self._scheduled = False
        # the access lines' timestamp and context, taken once per turn (see access())
        self.stamp: str | None = None
        self.context: dict[str, Any] = {}

    def write(self, data: bytes) -> None:
        self._lines.append(data)

    def flush(self) -> None:
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.drain()
            return
        self._scheduled = True
        loop.call_soon(self.drain)

    def drain(self) -> None:
        """Write every held line, whole lines per write, each write at most CHUNK bytes
        (a longer line goes alone)."""
        self._scheduled = False
        self.stamp = None
        lines, self._lines = self._lines, []
        batch: list[bytes] = []
        size = 0
        for line in lines:
            if batch and size + len(line) > CHUNK:
                self._write(b"".join(batch))
                batch, size = [], 0
            batch.append(line)
            size += len(line)
        if batch:
            self._write(b"".join(batch))

    def reopen(self) -> None:
        """The held lines to the file open now, then ``path`` opened anew on the same
        descriptor (dup2: no window without one). Raises OSError, the old file still in use:
        a reopen that fails loses nothing."""
        self.drain()
        if self.path is None:
            return
        fd = _open_append(self.path)
        try:
            os.dup2(fd, self._fd, inheritable=False)
        finally:
            os.close(fd)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:
                select.select([], [self._fd], [])
            except OSError:
                return  # stdout gone (reader exited): logging must not take the proxy down


class LogFileError(Exception):
    """A ``[log]`` file that cannot be opened for append: the key, the path, the errno."""

    def __init__(self, key: str, path: str, error: OSError) -> None:
        self.key, self.path, self.errno = key, path, error.errno
        self.reason = error.strerror or str(error)
        super().__init__(f"log.{key}: {path}: {self.reason}")


def _open_append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


_stdout: TurnBuffer | None = None
_files: dict[str, tuple[str, TurnBuffer]] = {}  # path -> (its [log] key, its buffer)
_access_out: TurnBuffer | None = None  # where the direct path writes (a file or stdout)
_access_json = False  # JSON format at info level: access lines take the direct path
_log = structlog.get_logger("originpool.proxy")
_access_log: Any = _log  # the access lines' structlog path: its own logger with access_file
_flush_at_exit = False
_UTC = datetime.UTC


def access(fields: dict[str, Any], event: str = "access") -> None:
    """One access line: the same JSON line structlog would render for
    ``log.info(event, **fields)`` (fields, then event, level, timestamp), built with one
    orjson call instead of the processor chain, because it runs once per request (``access``)
    or once per WebSocket session (``websocket_session``).
    Other formats and levels go through structlog as usual.

    The timestamp and the contextvars are read once per event-loop turn, for every access
    line of that turn, as nginx reads the clock once per loop iteration for its logs: under
    load a turn carries dozens of requests, and each line's own ``duration_ms`` stays exact.
    """
    out = _access_out
    if not _access_json or out is None:
        _access_log.info(event, **fields)
        return
    fields["event"] = event
    stamp = out.stamp
    if stamp is None:
        stamp = datetime.datetime.now(_UTC).isoformat().replace("+00:00", "Z")
        out.stamp = stamp
        out.context = structlog.contextvars.get_contextvars()
    for key, value in out.context.items():  # e.g. the worker
        fields.setdefault(key, value)
    fields["level"] = "info"
    fields["timestamp"] = stamp
    out.write(orjson.dumps(fields) + b"\n")
    out.flush()


def flush() -> None:
    """Write what is held now: before a worker's os._exit(), which skips atexit."""
    if _stdout is not None:
        _stdout.drain()
    for _key, sink in _files.values():
        sink.drain()


def reopen() -> list[LogFileError]:
    """Every log file opened anew at its path (SIGUSR1, after logrotate renamed it); the
    files that could not be, each still written where it was."""
    failed = []
    for path, (key, sink) in _files.items():
        try:
            sink.reopen()
        except OSError as e:
            failed.append(LogFileError(key, path, e))
    return failed


def open_files() -> list[str]:
    return list(_files)


def _file(key: str, path: str) -> TurnBuffer:
    """The buffer of the log file at ``path``, opened once (two keys may name one file)."""
    if path not in _files:
        try:
            fd = _open_append(path)
        except OSError as e:
            raise LogFileError(key, path, e) from None
        _files[path] = (key, TurnBuffer(fd, path))
    return _files[path][1]


def _encoded(_logger: Any, _method: str, line: str) -> bytes:
    return line.encode("utf-8", "backslashreplace")  # console lines to a bytes file


def _output(fmt: str, key: str, path: str | None) -> tuple[Any, list[Any]]:
    """(the logger factory, the renderers) for one destination: stdout or a file."""
    if fmt == "console":
        console = structlog.dev.ConsoleRenderer(colors=False)
        if path is None:
            return structlog.WriteLoggerFactory(sys.stdout), [console]
        return structlog.BytesLoggerFactory(_sink(_file(key, path))), [console, _encoded]
    renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
    sink = _file(key, path) if path else _stdout_buffer()
    return structlog.BytesLoggerFactory(_sink(sink)), [renderer]


def _sink(buffer: TurnBuffer) -> BinaryIO:
    """BytesLogger is typed for a file; it calls only ``write`` and ``flush``, which a
    TurnBuffer has."""
    return cast(BinaryIO, buffer)


def _stdout_buffer() -> TurnBuffer:
    global _stdout
    if _stdout is None:
        sys.stdout.flush()
        _stdout = TurnBuffer(sys.stdout.fileno())
    return _stdout


def configure(
    fmt: str = "json",
    level: str = "info",
    access_file: str | None = None,
    error_file: str | None = None,
) -> None:
    """structlog set up for this process; ``access_file``/``error_file`` move the access
    lines and the rest off stdout. Raises :class:`LogFileError` naming the key whose file
    cannot be opened for append."""
    global _access_out, _access_json, _access_log, _flush_at_exit
    _access_json = fmt == "json" and LEVELS.get(level, logging.INFO) <= logging.INFO
    base: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    wrapper = structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO))
    if not _flush_at_exit:
        _flush_at_exit = atexit.register(flush) is flush
    factory, renderers = _output(fmt, "error_file", error_file)
    structlog.configure(
        processors=[*base, *renderers],
        wrapper_class=wrapper,
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    _access_log = _log
    if access_file != error_file:  # access lines elsewhere: a logger of their own
        factory, renderers = _output(fmt, "access_file", access_file)
        _access_log = structlog.wrap_logger(
            factory(), processors=[*base, *renderers], wrapper_class=wrapper
        )
    _access_out = None
    if fmt == "json":
        _access_out = _file("access_file", access_file) if access_file else _stdout_buffer()
