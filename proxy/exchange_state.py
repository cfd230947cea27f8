"""An exchange's progress as two named state machines, h11's ``_state.py`` in small.

Why: the exchange used to keep eight booleans (ready, in_body, request_done, finished,
response_started...), whose legal combinations lived only in the reader's head; a retry, an
error answer while the body streams, or a 101 had to set several of them in the right order.
Here each side has named states and a table of the transitions allowed; anything else raises
:class:`StateError`, naming the state and the event, instead of leaving a silent mix.

The request side is the request's way to the origin; the response side the response's way
to the client. They move independently (an origin may answer before the body is sent), as
h11's client and server states do.
"""

from __future__ import annotations


class State:
    """A named state of one side; ``on`` maps the events allowed in it to the next state.

    Plain objects, not ``enum.Enum`` members: an Enum member hashes and compares through
    Python-level methods, which on the per-request path cost more than the rest of the state
    machine together; these hash by identity, in C.
    """

    __slots__ = ("name", "on", "side")

    def __init__(self, side: str, name: str) -> None:
        self.side = side
        self.name = name
        self.on: dict[str, State] = {}

    def __repr__(self) -> str:
        return f"<{self.side} {self.name}>"

    def after(self, event: str) -> State:
        """The state ``event`` leads to; :class:`StateError` when the table has no such step."""
        try:
            return self.on[event]
        except KeyError:
            raise StateError(self, event) from None


class StateError(RuntimeError):
    """A transition the tables do not allow: a bug in the proxy, never the peer's doing."""

    def __init__(self, state: State, event: str) -> None:
        super().__init__(f"{state.side}: no transition from {state.name} on {event!r}")
        self.state = state
        self.event = event


# -- the request toward the origin --------------------------------------------------------------
CONNECTING = State("request", "connecting")  # no origin connection: the body waits in the parser
BODY = State("request", "body")  # the head went to the origin; body pieces follow as they come
SENT = State("request", "sent")  # the whole request went to the origin
RESENDING = State("request", "resending")  # the whole request was read; a retry sends it again

# -- the response toward the client -------------------------------------------------------------
WAITING = State("response", "waiting")  # nothing sent to the client yet
STREAMING = State("response", "streaming")  # the head went to the client; body pieces follow
COMPLETE = State("response", "complete")  # the last byte went: the exchange is over
ANSWERED = State("response", "answered")  # the proxy's own answer went instead (an error)
ABORTED = State("response", "aborted")  # cut short (reset), or the client vanished
SWITCHED = State("response", "switched")  # a 101: a WebSocket tunnel took both connections

# the response states in which the exchange is over (what ``finished`` used to say)
OVER = frozenset((COMPLETE, ANSWERED, ABORTED, SWITCHED))

TRANSITIONS: tuple[tuple[State, str, State], ...] = (
    (CONNECTING, "attach", BODY),
    (BODY, "end", SENT),
    (BODY, "retry", CONNECTING),  # no body byte went yet (see Exchange._may_retry)
    (SENT, "retry", RESENDING),
    (RESENDING, "attach", SENT),  # head and end again, at once
    (WAITING, "head", STREAMING),
    (WAITING, "whole", COMPLETE),
    (WAITING, "answer", ANSWERED),
    (WAITING, "gone", ABORTED),
    (WAITING, "switch", SWITCHED),
    (STREAMING, "end", COMPLETE),
    (STREAMING, "abort", ABORTED),
    (STREAMING, "gone", ABORTED),
)
for _state, _event, _next in TRANSITIONS:
    _state.on[_event] = _next
