"""What h2 leaves to its user of HTTP/2's abuse cases: counting, per connection.

Why: h2 answers every PING and SETTINGS and accepts any number of streams opened and reset,
because a sans-I/O library cannot know what is too many for its user. A proxy that starts
an exchange (route, pool, maybe a connect) per stream pays for each, so:

- rapid reset (CVE-2023-44487): streams the client resets are counted; past
  ``RESET_LIMIT`` in ``WINDOW`` seconds the connection ends with GOAWAY ENHANCE_YOUR_CALM
  (and a stream whose HEADERS and RST_STREAM came in one read never starts: see
  :meth:`proxy.http2.H2Connection._handle`);
- PING and SETTINGS floods: each answer is a frame the client makes the proxy write; past
  ``PING_LIMIT`` / ``SETTINGS_LIMIT`` per window, ENHANCE_YOUR_CALM;
- CONTINUATION floods (CVE-2024-27316): a header block still being received is bounded in
  bytes (h2 bounds it only in frames: 64 of up to 16 MB each), at four times
  ``max_header_bytes``, or 64 KiB if that is more.
"""

from __future__ import annotations

import time

import h2.connection
import h2.events

WINDOW = 10.0  # seconds
RESET_LIMIT = 200  # streams reset by the client per window (browsers cancel a few)
PING_LIMIT = 50
SETTINGS_LIMIT = 50


class Guard:
    """The counters of one connection."""

    __slots__ = ("block_limit", "pings", "resets", "settings", "since")

    def __init__(self, max_header_bytes: int) -> None:
        self.block_limit = max(4 * max_header_bytes, 65536)
        self.since = time.monotonic()
        self.resets = self.pings = self.settings = 0

    def count(self, events: list[h2.events.Event]) -> str | None:
        """What the client overdid in this batch of events, if anything."""
        now = time.monotonic()
        if now - self.since > WINDOW:
            self.since = now
            self.resets = self.pings = self.settings = 0
        for event in events:
            if isinstance(event, h2.events.StreamReset) and event.remote_reset:
                self.resets += 1
            elif isinstance(event, h2.events.PingReceived):
                self.pings += 1
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self.settings += 1
        if self.resets > RESET_LIMIT:
            return f"{self.resets} streams reset within {WINDOW:g} s (rapid reset)"
        if self.pings > PING_LIMIT:
            return f"{self.pings} PINGs within {WINDOW:g} s"
        if self.settings > SETTINGS_LIMIT:
            return f"{self.settings} SETTINGS within {WINDOW:g} s"
        return None

    def header_backlog(self, conn: h2.connection.H2Connection) -> str | None:
        """A header block in progress larger than the bound (CONTINUATION flood)."""
        frames = getattr(conn.incoming_buffer, "_headers_buffer", ())
        if not frames:
            return None
        size = sum(len(getattr(f, "data", b"")) for f in frames)
        if size > self.block_limit:
            return f"a header block past {self.block_limit} bytes (CONTINUATION flood)"
        return None
