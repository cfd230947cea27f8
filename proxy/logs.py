"""structlog set-up: JSON lines on stdout for machines, ``console`` for humans.

One access line per request and one per WebSocket session come from the data path, so the
JSON path is built for it: orjson renders the line (structlog's documented fast set-up:
``BytesLoggerFactory`` and an orjson serializer), and lines written during one turn of the
event loop leave in one write() at the end of that turn instead of one syscall each. An idle
proxy still writes a line within the turn that logged it; under load a write carries many.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime
import logging
import os
import select
import sys
from typing import Any

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

    def __init__(self, fd: int) -> None:
        self._fd = fd
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

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:
                select.select([], [self._fd], [])
            except OSError:
                return  # stdout gone (reader exited): logging must not take the proxy down


_stdout: TurnBuffer | None = None
_access_json = False  # JSON format at info level: access lines take the direct path
_log = structlog.get_logger("originpool.proxy")
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
    out = _stdout
    if not _access_json or out is None:
        _log.info(event, **fields)
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


def configure(fmt: str = "json", level: str = "info") -> None:
    global _stdout, _access_json
    _access_json = fmt == "json" and LEVELS.get(level, logging.INFO) <= logging.INFO
    base: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    wrapper = structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO))
    if fmt == "console":
        structlog.configure(
            processors=[*base, structlog.dev.ConsoleRenderer(colors=False)],
            wrapper_class=wrapper,
            logger_factory=structlog.WriteLoggerFactory(sys.stdout),
            cache_logger_on_first_use=True,
        )
        return
    if _stdout is None:
        sys.stdout.flush()
        _stdout = TurnBuffer(sys.stdout.fileno())
        atexit.register(flush)
    structlog.configure(
        processors=[*base, structlog.processors.JSONRenderer(serializer=orjson.dumps)],
        wrapper_class=wrapper,
        logger_factory=structlog.BytesLoggerFactory(_stdout),
        cache_logger_on_first_use=True,
    )
