"""One lazy timer per connection: the deadline a connection waits on (head, body, response,
idle), re-armed many times per request for the price of a float assignment."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

_NEVER = 0.0


class Timer:
    """At most one pending callback: a connection waits for one thing at a time (head, body,
    response, idle), so arming replaces whatever was armed.

    Lazy, as nginx's timers are in effect: arming and disarming only set a deadline and a
    callback, and a loop timer is scheduled only when none is pending at or before the new
    deadline. A keep-alive connection arms and disarms several times per request; with
    ``call_later``/``cancel`` each time that was a heap push and a cancelled handle per arm.
    The pending loop timer, when it fires early, sleeps again until the current deadline.
    """

    __slots__ = ("_at", "_callback", "_deadline", "_handle", "_loop")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self._at = _NEVER  # when the pending loop timer fires
        self._deadline = _NEVER
        self._callback: Callable[[], None] | None = None

    @classmethod
    def spent(cls) -> Timer:
        """A timer never to be armed, made without a loop: one shared stand-in for the
        timers of connections that wait for nothing any more (a WebSocket tunnel's HTTP
        deadlines); ``disarm`` and ``stop`` on it do nothing."""
        timer = cls.__new__(cls)
        timer._loop = None  # type: ignore[assignment]
        timer._handle = None
        timer._at = timer._deadline = _NEVER
        timer._callback = None
        return timer

    def arm(self, seconds: float, callback: Callable[[], None]) -> None:
        if seconds <= 0:
            self._callback = None
            return
        deadline = self._loop.time() + seconds
        self._deadline = deadline
        self._callback = callback
        if self._handle is not None:
            if self._at <= deadline:
                return  # it fires first and sleeps again until the deadline
            self._handle.cancel()
        self._at = deadline
        self._handle = self._loop.call_at(deadline, self._fire)

    def disarm(self) -> None:
        self._callback = None  # the pending loop timer, if any, fires into nothing

    def stop(self) -> None:
        """Disarm and drop the pending loop timer now: for a connection that will wait for
        nothing for a long time (a WebSocket tunnel), where a loop timer left to run out
        would hold memory per session for up to a minute."""
        self._callback = None
        self._at = self._deadline = _NEVER  # one shared float, not two per session
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        callback = self._callback
        if callback is None:
            return
        if self._loop.time() < self._deadline:
            self._at = self._deadline
            self._handle = self._loop.call_at(self._deadline, self._fire)
            return
        self._callback = None
        callback()
