"""The admin listener's ``/origins`` endpoints: every origin's state, drain and undrain.

``GET /origins``
    JSON, one object per origin: ``state`` (active, draining, down), ``by``, ``reason``,
    ``sessions``, ``requests_in_flight``, ``last_check`` (the health checks'), the admission
    settings. On the admin port (worker 0) counts are the whole proxy's, each sibling's
    ``/origins?scope=worker`` summed in, as ``/metrics`` is (:mod:`proxy.metrics_sum`); an
    origin whose state differs between workers (a health verdict) gets ``state_by_worker``;
    when a sibling does not answer, the list comes as ``{"origins": [...],
    "workers_missing": {index: reason}}`` so the gap is not silent.
``POST /origins/drain?origin=URL&over=SECONDS``
    ``202 {"origin", "sessions", "over_s"}``: from now on the origin takes no new request
    or session, and its sessions are ended over the window (:mod:`proxy.drain`). ``over``
    defaults to ``[websocket] drain_over``.
``POST /origins/undrain?origin=URL``
    ``200 {"origin", "state"}``.

These are the admin listener's first endpoints that change what the proxy does, so: they
exist only on the admin listener (the client listeners route by Host to origins and never
reach this code); they take POST only (a link followed or a prefetch cannot drain); and
with ``[admin] token`` set every call needs ``Authorization: Bearer <token>``, compared in
constant time (``hmac.compare_digest``), else 401.

With N workers the call must reach every worker, since each has its own sessions and its
own routing: worker 0 (the admin port) applies it, then makes the same call with
``scope=worker`` on each sibling's admin port (the port + i, found as
:func:`proxy.metrics_sum.siblings` finds them), all at once. A sibling that does not answer
makes the answer 502 naming it: the drain is then partial, and the call may be repeated
(draining a draining origin starts its window again).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from pool.origin_state import OriginStates
from proxy.drain import Drainer

Headers = Sequence[tuple[bytes, bytes]]
# status, content type, body, extra headers
Answer = tuple[int, str, str, list[tuple[bytes, bytes]]]
PATHS = ("/origins", "/origins/drain", "/origins/undrain")
CALL_TIMEOUT = 5.0  # seconds for all siblings together
MAX_OVER = 24 * 3600.0  # a drain longer than a day is a typo (ms for s), not a plan


def _json(status: int, value: object, extra: list[tuple[bytes, bytes]] | None = None) -> Answer:
    return (status, "application/json", json.dumps(value) + "\n", extra or [])


def parse_over(text: str) -> float:
    """``30``, ``30s``, ``1.5``: seconds >= 0; raises ValueError naming the problem."""
    raw = text.strip().removesuffix("s")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"over must be seconds (30 or 30s), not {text!r}") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_OVER:
        raise ValueError(f"over must be between 0 and {MAX_OVER:g} seconds, not {text!r}")
    return value


class OriginsAdmin:
    """One worker's ``/origins`` endpoints; ``peers`` are set on worker 0 only."""

    def __init__(
        self,
        states: OriginStates,
        drainer: Drainer,
        token: str | None = None,
        drain_over: float = 30.0,
        peers: Sequence[tuple[int, tuple[str, int]]] = (),
    ) -> None:
        self.states = states
        self.drainer = drainer
        self.token = token
        self.drain_over = drain_over
        self.peers = list(peers)

    def authorized(self, headers: Headers) -> bool:
        if self.token is None:
            return True
        wanted = b"Bearer " + self.token.encode()
        for name, value in headers:
            if name.lower() == b"authorization":
                return hmac.compare_digest(value.strip(), wanted)
        return False

    async def answer(
        self, path: str, method: bytes, headers: Headers, query: dict[str, list[str]]
    ) -> Answer:
        scope = query.get("scope", ["proxy"])[-1]
        if scope not in ("proxy", "worker"):
            return _json(400, {"error": f"scope must be proxy or worker, not {scope!r}"})
        fan_out = scope == "proxy" and bool(self.peers)
        if path == "/origins":
            if method not in (b"GET", b"HEAD"):
                return _json(405, {"error": "GET only"}, [(b"allow", b"GET, HEAD")])
            return await self._view(fan_out, headers)
        if method != b"POST":
            return _json(405, {"error": "POST only: it changes state"}, [(b"allow", b"POST")])
        if not self.authorized(headers):
            return _json(
                401,
                {"error": "Authorization: Bearer <[admin] token> required"},
                [(b"www-authenticate", b'Bearer realm="originpool admin"')],
            )
        url = query.get("origin", [""])[-1]
        origin = self.states.find(url)
        if origin is None:
            known = [str(o) for o in self.states.origins()]
            return _json(404, {"error": f"no route names origin {url!r}", "origins": known})
        if path == "/origins/drain":
            try:
                over = parse_over(query["over"][-1]) if "over" in query else self.drain_over
            except ValueError as e:
                return _json(400, {"error": str(e)})
            drain = self.drainer.drain(origin, over)
            body: dict[str, Any] = {
                "origin": str(origin),
                "sessions": drain.sessions,
                "over_s": over,
            }
            status = 202
        else:
            self.drainer.undrain(origin)
            body = {"origin": str(origin), "state": self.states.state(origin).value}
            status = 200
        if fan_out:
            target = f"{path}?origin={quote(url, safe='')}&scope=worker"
            if path == "/origins/drain":
                target += f"&over={over}"
            answers, missing = await self._call_all("POST", target, headers)
            if path == "/origins/drain":
                body["sessions"] += sum(int(a.get("sessions", 0)) for a in answers.values())
            if missing:
                body["workers_missing"] = missing
                status = 502
        return _json(status, body)

    async def _view(self, fan_out: bool, headers: Headers) -> Answer:
        mine = self.states.view()
        if not fan_out:
            return _json(200, mine)
        answers, missing = await self._call_all("GET", "/origins?scope=worker", headers)
        by_origin = {entry["origin"]: entry for entry in mine}
        for index, theirs in answers.items():
            for entry in theirs if isinstance(theirs, list) else []:
                own = by_origin.get(entry.get("origin"))
                if own is None:
                    continue
                own["sessions"] += entry.get("sessions", 0)
                own["requests_in_flight"] += entry.get("requests_in_flight", 0)
                if entry.get("state") != own["state"]:  # a health verdict one worker has
                    own.setdefault("state_by_worker", {"0": own["state"]})[str(index)] = entry[
                        "state"
                    ]
        view: Any = mine
        if missing:
            view = {"origins": mine, "workers_missing": missing}
        return _json(200, view)

    async def _call_all(
        self, method: str, target: str, headers: Headers
    ) -> tuple[dict[int, Any], dict[str, str]]:
        auth = next((v for n, v in headers if n.lower() == b"authorization"), None)

        async def one(address: tuple[str, int]) -> Any:
            return await asyncio.wait_for(call(address, method, target, auth), CALL_TIMEOUT)

        results = await asyncio.gather(*(one(a) for _i, a in self.peers), return_exceptions=True)
        answers: dict[int, Any] = {}
        missing: dict[str, str] = {}
        for (index, _address), result in zip(self.peers, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, OSError | ValueError | TimeoutError | EOFError):
                    raise result
                missing[str(index)] = f"{type(result).__name__}: {result}"
            else:
                answers[index] = result
        return answers, missing


async def call(
    address: tuple[str, int], method: str, target: str, auth: bytes | None = None
) -> Any:
    """One admin call to ``address`` over a fresh connection: its JSON answer, or ValueError
    naming the status when it is not 2xx (OSError when it cannot be reached)."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        head = f"{method} {target} HTTP/1.1\r\nHost: originpool-admin\r\nConnection: close\r\n"
        head += "Content-Length: 0\r\n"
        if auth is not None:
            head += f"Authorization: {auth.decode('latin-1')}\r\n"
        writer.write((head + "\r\n").encode("latin-1"))
        data = await reader.read(-1)
    finally:
        writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    parts = status_line.split(b" ")
    _head, sep, body = rest.partition(b"\r\n\r\n")
    if len(parts) < 2 or not sep:
        raise ValueError(f"answered {data[:60]!r}")
    if not parts[1].startswith(b"2"):
        raise ValueError(f"answered {parts[1].decode()}: {body[:200].decode('utf-8', 'replace')}")
    return json.loads(body)


def admin_target(admin: tuple[str, int]) -> tuple[str, int]:
    """Where a shell on this host reaches the admin listener: a wildcard means loopback."""
    host, port = admin
    return ({"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host), port)


def command(
    admin: tuple[str, int], token: str | None, action: str, origin: str, over: float | None
) -> tuple[int, str]:
    """``originpool drain|undrain``: the admin call, and (exit code, line to print)."""
    target = f"/origins/{action}?origin={quote(origin, safe='')}"
    if over is not None:
        target += f"&over={over:g}"
    auth = f"Bearer {token}".encode() if token is not None else None
    where = admin_target(admin)
    try:
        answer = asyncio.run(asyncio.wait_for(call(where, "POST", target, auth), CALL_TIMEOUT * 2))
    except (OSError, TimeoutError) as e:
        return 1, f"originpool {action}: admin {where[0]}:{where[1]} unreachable: {e}"
    except ValueError as e:
        return 1, f"originpool {action}: {e}".rstrip()
    if action == "drain":
        return 0, (
            f"originpool drain: {answer['origin']} draining, its {answer['sessions']} sessions "
            f"ending over {answer['over_s']:g}s"
        )
    return 0, f"originpool undrain: {answer['origin']} {answer['state']}"
