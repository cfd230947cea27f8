"""Which origin serves a request: host (exact, then the longest ``*.suffix``, then the
catch-all ``*``), then the longest path prefix, then the route's balancing among its origins.

The host compared is :attr:`proxy.target.Target.host`, the one name the request is also
forwarded with. ``*`` is nginx's ``default_server`` and HAProxy's ``default_backend``: it
takes any Host no other route takes, so fronting one origin needs no list of every spelling
of its name. An exact name wins over a suffix, a suffix over ``*``, whatever their order in
the config; within a host, the longest path prefix wins.

Pure logic, no I/O: the server asks ``match`` once per request and ``pick`` once per
attempt, excluding origins that already failed this request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pool.origin import Origin
from pool.origin_state import AdmissionRefused, OriginStates
from proxy.header_rules import HeaderRules

BALANCES = ("round_robin", "least_conn")


@dataclass(eq=False)
class Route:
    host: str  # lowercase; exact, "*.suffix", or "*" (the catch-all)
    path_prefix: str
    origins: Sequence[tuple[Origin, int]]  # (origin, weight)
    balance: str = "round_robin"
    name: str = ""
    # the worker's origin states: an origin that does not admit (draining, down) is skipped
    states: OriginStates | None = None
    send_proxy: str | None = None  # "v2"/"v1": send_proxy_protocol (proxy.proxy_accept.preamble)
    headers: HeaderRules | None = None  # [routes.headers] (proxy.header_rules); None: none
    _current: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}")
        self._current = [0] * len(self.origins)
        if not self.name:
            self.name = f"{self.host}{self.path_prefix}"

    def pick(
        self, exclude: Iterable[Origin] = (), active: Callable[[Origin], int] | None = None
    ) -> Origin | None:
        """The next origin, or None when every origin is excluded or does not admit (the
        caller answers 503 at once: no connect is tried to a draining or down origin).

        round_robin is nginx's smooth weighted round robin (spreads a 5:1:1 weighting as
        a a b a c a a, not a a a a a b c); least_conn divides live connections by weight.
        """
        states = self.states
        if len(self.origins) == 1:  # the common route: nothing to balance
            origin = self.origins[0][0]
            if origin in exclude or (states is not None and not states.admits(origin)):
                return None
            return origin
        skip = set(exclude)
        admits = states.admits if states is not None else _always
        candidates = [i for i, (o, _w) in enumerate(self.origins) if o not in skip and admits(o)]
        if not candidates:
            return None
        if self.balance == "least_conn" and active is not None:
            best = min(
                candidates,
                key=lambda i: (active(self.origins[i][0]) / self.origins[i][1], -self._current[i]),
            )
            self._advance(candidates, best)
            return self.origins[best][0]
        total = sum(self.origins[i][1] for i in candidates)
        for i in candidates:
            self._current[i] += self.origins[i][1]
        best = max(candidates, key=lambda i: self._current[i])
        self._current[best] -= total
        return self.origins[best][0]

    def _advance(self, candidates: list[int], chosen: int) -> None:
        for i in candidates:
            self._current[i] += 1
        self._current[chosen] = 0


def _always(_origin: Origin) -> bool:
    return True


class Router:
    def __init__(self, routes: Iterable[Route], states: OriginStates | None = None) -> None:
        """``states``: the worker's origin states, given to every route (kept across reloads
        by the caller, so a drained origin stays drained in the new routes)."""
        self.routes = list(routes)
        self.states = states
        if states is not None:
            for r in self.routes:
                r.states = states
        self._exact: dict[str, list[Route]] = {}
        self._wild: list[tuple[str, list[Route]]] = []
        self._any: list[Route] = []
        wild: dict[str, list[Route]] = {}
        for r in self.routes:
            if r.host == "*":
                self._any.append(r)
            elif r.host.startswith("*."):
                wild.setdefault(r.host[1:], []).append(r)  # ".example"
            else:
                self._exact.setdefault(r.host, []).append(r)
        for group in (*self._exact.values(), *wild.values(), self._any):
            group.sort(key=lambda r: len(r.path_prefix), reverse=True)
        self._wild = sorted(wild.items(), key=lambda kv: len(kv[0]), reverse=True)

    def match(self, host: str, path: str) -> Route | None:
        for route in self._exact.get(host, ()):
            if path.startswith(route.path_prefix):
                return route
        for suffix, group in self._wild:
            if host.endswith(suffix) and len(host) > len(suffix):
                for route in group:
                    if path.startswith(route.path_prefix):
                        return route
        for route in self._any:
            if path.startswith(route.path_prefix):
                return route
        return None


# the answer when no origin of the route admits (every one draining or down): at once, no
# connect tried, and a Retry-After so clients do not retry in a tight loop
NO_ORIGIN = "no origin of this route is taking requests now; retry shortly"
Refusal = tuple[int, str, list[tuple[bytes, bytes]]]


def session_refusal(route: Route, origin: Origin) -> Refusal | None:
    """None when a new WebSocket session may go to ``origin``, else the 503 to answer its
    handshake with (over ``max_session_rate``: see :mod:`pool.origin_state`), whose
    jittered ``Retry-After`` spreads the refused clients' next tries."""
    if route.states is None:
        return None
    try:
        route.states.admit_session(origin)
    except AdmissionRefused as e:
        return (
            503,
            "the origin takes new sessions at a limited rate; retry after the time given",
            [(b"retry-after", str(e.retry_after).encode())],
        )
    return None
