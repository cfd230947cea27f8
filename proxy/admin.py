"""The admin listener: /healthz, /readyz, /metrics (Prometheus text), /ports (census JSON).

Separate from the data path on purpose: probes and scrapes keep answering while the proxy is
saturated, and nothing here can be reached from the public listener.

``/ports`` shows the proxy's own pairs -- its live egress set towards every address of the
origins its live routes name, idle pairs included -- because an operator asking this
endpoint wants the proxy's headroom, not the namespace's other traffic. ``/ports?all=1`` is
the namespace-wide census (the only view before issue 12). Either way the counts are the
namespace's sockets from those addresses, so every worker answers the same for the whole
proxy. See :mod:`pool.census` for the JSON keys.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

import structlog

from pool import metrics as pool_metrics
from proxy import binding, health, http1, metrics_sum
from proxy.admin_origins import PATHS as ORIGINS_PATHS
from proxy.admin_origins import OriginsAdmin
from proxy.server import LATENCY_BUCKETS, Proxy

log = structlog.get_logger("originpool.admin")


PROXY_HELP = {
    "originpool_requests_total": "Requests answered, by route and status.",
    "originpool_bytes_relayed_total": "Body bytes relayed, by direction.",
    "originpool_downstream_connections": "Client connections open.",
    "originpool_downstream_connections_total": "Client connections accepted.",
    "originpool_http2_connections_total": "Client connections that spoke HTTP/2 (h2 or h2c).",
    "originpool_websocket_sessions_active": "WebSocket sessions being relayed.",
    "originpool_websocket_sessions_total": "WebSocket sessions relayed since start.",
    "originpool_draining": "1 while the worker drains (SIGTERM).",
    "originpool_limited_total": "Clients refused by a per-address limit, by kind (conn: reset "
    "at accept; rate, websocket: 429).",
    "originpool_proxy_protocol_refused_total": "Connections reset for their PROXY protocol "
    "header (or its absence, or an untrusted sender), by reason.",
    "originpool_origin_draining": "1 while the origin drains (admin drain or reload).",
    "originpool_drained_sessions_total": "WebSocket sessions a drain ended (Close 1012).",
}


def proxy_samples(proxy: Proxy) -> list[pool_metrics.Sample]:
    """The data path's counters and gauges, as the pool's own samples are."""
    Sample = pool_metrics.Sample
    st = proxy.stats
    out = [
        Sample("originpool_requests_total", (("route", route), ("status", str(status))), n, True)
        for (route, status), n in sorted(st.requests.items())
    ]
    out += [
        Sample("originpool_bytes_relayed_total", (("direction", "to_origin"),), st.bytes_in, True),
        Sample("originpool_bytes_relayed_total", (("direction", "to_client"),), st.bytes_out, True),
        Sample("originpool_downstream_connections", (), st.connections),
        Sample("originpool_downstream_connections_total", (), st.connections_total, True),
        Sample("originpool_http2_connections_total", (), st.http2_connections_total, True),
        Sample("originpool_websocket_sessions_active", (), st.ws_active),
        Sample("originpool_websocket_sessions_total", (), st.ws_total, True),
        Sample("originpool_draining", (), int(proxy.draining)),
    ]
    return out + client_samples(proxy)


def client_samples(proxy: Proxy) -> list[pool_metrics.Sample]:
    """The per-address limits' refusals (every kind, 0 included, once a limit is set) and
    the PROXY protocol's (every reason, once a listener takes the header)."""
    Sample = pool_metrics.Sample
    out = []
    if proxy.limits is not None:
        for kind, n in proxy.limits.limited.items():
            out.append(Sample("originpool_limited_total", (("kind", kind),), n, True))
    gates = [listener.gate for listener in proxy.listeners if listener.proxy_protocol]
    if gates:
        for reason in gates[0].refused:
            n = sum(gate.refused.get(reason, 0) for gate in gates)
            label = (("reason", reason),)
            out.append(Sample("originpool_proxy_protocol_refused_total", label, n, True))
    return out


def origin_samples(proxy: Proxy) -> list[pool_metrics.Sample]:
    """Per origin: draining (1/0) and the sessions drains ended (issue 20)."""
    states = proxy.router.states
    if states is None:
        return []
    Sample = pool_metrics.Sample
    out = []
    for origin in states.origins():
        entry = states.entry(origin)
        label = (("origin", str(origin)),)
        out.append(Sample("originpool_origin_draining", label, int(entry.drained)))
        out.append(Sample("originpool_drained_sessions_total", label, entry.drained_sessions, True))
    return out


def render_metrics(proxy: Proxy, checker: health.HealthChecker | None = None) -> str:
    """The pool's samples plus the data path's, in one exposition; the latency histogram is
    written here because the sample renderer knows counters and gauges only."""
    samples = pool_metrics.collect(proxy.pool.egress, proxy.pool) + proxy_samples(proxy)
    samples += origin_samples(proxy)
    if checker is not None:  # originpool_origin_up{route,origin}, the checks' counts
        routes = [(r.name, [o for o, _w in r.origins]) for r in proxy.router.routes]
        samples += checker.samples(routes)
    text = pool_metrics.render_prometheus(samples, {**PROXY_HELP, **health.HELP})
    st = proxy.stats
    name = "originpool_request_duration_seconds"
    lines = [
        f"# HELP {name} Time from request head to response end.",
        f"# TYPE {name} histogram",
    ]
    total = 0
    for bound, n in zip(LATENCY_BUCKETS, st.latency, strict=False):
        total += n
        lines.append(f'{name}_bucket{{le="{bound}"}} {total}')
    total += st.latency[-1]
    lines += [
        f'{name}_bucket{{le="+Inf"}} {total}',
        f"{name}_sum {st.latency_sum}",
        f"{name}_count {total}",
    ]
    return text + "\n".join(lines) + "\n"


_YES, _NO = ("1", "true", "yes", ""), ("0", "false", "no")
Answer = tuple[int, str, str]
Handler = Callable[[dict[str, list[str]]], Answer | Awaitable[Answer]]


def ports_json(proxy: Proxy, everything: bool = False) -> str:
    """The census of the proxy's pairs, from the worker's *current* egress set and routes
    (SIGHUP may have changed both), or of the whole namespace with ``everything``."""
    from pool import census

    scope = None
    if not everything:
        origins = (origin for route in proxy.router.routes for origin, _weight in route.origins)
        egress = proxy.pool.egress
        scope = census.proxy_scope(egress.egresses, origins, egress.mode)
    return json.dumps(census.to_json(*census.survey(scope), scope=scope))


def _ports(proxy: Proxy, query: dict[str, list[str]]) -> tuple[int, str, str]:
    value = query.get("all", ["0"])[-1].lower()
    if value not in _YES + _NO:
        return (400, "text/plain", f"all must be 1 or 0, not {value!r}\n")
    return (200, "application/json", ports_json(proxy, everything=value in _YES))


class Admin:
    """A small HTTP/1.1 server on asyncio streams (not the relay path: simplicity wins)."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.routes: dict[str, Handler] = {
            "/healthz": lambda _q: (200, "text/plain", "ok\n"),
            "/readyz": lambda _q: self._ready(),
            "/metrics": self._metrics,
            "/ports": lambda q: _ports(self.proxy, q),
        }
        # a census of 10,000 sockets takes ~60 ms, and origin names resolve with blocking
        # getaddrinfo: off the loop that relays traffic
        self.threaded = {"/ports"}
        self.server: asyncio.base_events.Server | None = None
        # (index, admin address) of the sibling workers whose /metrics this one sums: set on
        # worker 0 only (see proxy.metrics_sum), empty everywhere else
        self.peers: list[tuple[int, tuple[str, int]]] = []
        # /origins, drain, undrain (proxy.admin_origins): set by the worker
        self.origins: OriginsAdmin | None = None
        self.health: health.HealthChecker | None = None  # set by the worker (proxy.worker)

    async def _metrics(self, query: dict[str, list[str]]) -> Answer:
        """The whole proxy's metrics on worker 0 (its siblings' summed in), this worker's
        own with ``?scope=worker`` and on every other worker."""
        ctype = "text/plain; version=0.0.4"
        scope = query.get("scope", ["proxy"])[-1]
        if scope not in ("proxy", "worker"):
            return (400, "text/plain", f"scope must be proxy or worker, not {scope!r}\n")
        own = render_metrics(self.proxy, self.health)
        if scope == "worker" or not self.peers:
            return (200, ctype, own)
        others, missing = await metrics_sum.scrape(self.peers)
        body = await asyncio.to_thread(metrics_sum.total, own, others, missing)
        for index, reason in sorted(missing.items()):
            log.warning("metrics_worker_missing", worker=index, error=reason)
        return (200, ctype, body)

    def _ready(self) -> tuple[int, str, str]:
        if self.proxy.draining:
            return (503, "text/plain", "draining\n")
        return (200, "text/plain", "ready\n")

    async def start(self, where: tuple[str, int] | socket.socket) -> None:
        """``where``: the socket :mod:`proxy.binding` bound before the workers forked, or an
        address to bind here (a failure is a BindError naming ``admin``)."""
        if not isinstance(where, socket.socket):
            where = binding.listening_socket("admin", where)
        self.server = await asyncio.start_server(self._serve, sock=where)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        http = http1.ServerSide()
        try:
            while True:
                event = http.next_event()
                if event is http1.NEED_DATA:
                    data = await asyncio.wait_for(reader.read(65536), 30)
                    http.feed(data)
                    if not data:
                        return
                    continue
                if isinstance(event, http1.RequestHead):
                    path, _, raw_query = event.target.decode("latin-1").partition("?")
                    query = parse_qs(raw_query, keep_blank_values=True)
                    handler = self.routes.get(path)
                    extra: list[tuple[bytes, bytes]] = []
                    if path in ORIGINS_PATHS and self.origins is not None:
                        status, ctype, body, extra = await self.origins.answer(
                            path, event.method, event.headers, query
                        )
                    elif handler is None:
                        status, ctype, body = 404, "text/plain", "not found\n"
                    else:
                        try:
                            if path in self.threaded:
                                answer = await asyncio.to_thread(handler, query)
                            else:
                                answer = handler(query)
                            if inspect.isawaitable(answer):
                                answer = await answer
                            status, ctype, body = answer
                        except Exception as e:  # an admin page must not kill the listener
                            log.exception("admin_error", path=path)
                            status, ctype, body = 500, "text/plain", f"{e}\n"
                    data = body.encode()
                    if event.method == b"HEAD":
                        data = b""
                    writer.write(
                        http.response_head(
                            status,
                            [
                                (b"content-type", ctype.encode()),
                                (b"content-length", str(len(body.encode())).encode()),
                                *extra,
                            ],
                        )
                        + http.body(data)
                        + http.end()
                    )
                    await writer.drain()
                elif isinstance(event, http1.End):
                    if not http.keep_alive:
                        return
                    http.start_next()
                elif event is http1.CLOSED or event is http1.PAUSED:
                    return
        except http1.ProtocolError as e:
            writer.write(http.error_response(e.status, e.reason))
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
