"""The pool's counters and gauges in one snapshot, for the proxy's /metrics and admin API.

Kept apart from the exporter so the names and meanings live next to the code that counts
them; the proxy only renders. Every value is read at call time: nothing here caches.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pool.egress import EgressSet
from pool.origin import OriginPool


@dataclass(frozen=True)
class Sample:
    """One metric value: name, labels, value, and whether it only ever goes up."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float
    counter: bool = False


HELP = {
    "originpool_connect_attempts_total": "Upstream connects tried, by egress IP.",
    "originpool_connect_failures_total": "Upstream connects failed, by egress IP and errno.",
    "originpool_egress_exhausted_total": "Connects refused because every egress IP was full.",
    "originpool_egress_unavailable_total": (
        "Connects refused because no usable egress IP is on this host (not exhaustion)."
    ),
    "originpool_egress_failover_total": (
        "Connects that moved on from an egress IP, by egress IP and reason: not_on_host (the "
        "IP is not assigned in this namespace) or no_port (its ports to that destination "
        "are all held)."
    ),
    "originpool_egress_live_connections": "Upstream connections held, by egress IP.",
    "originpool_egress_down": (
        "1 while an egress IP is down: not on the host (from the kernel's address "
        "announcements: 1 until the address is back), or in its backoff after a failed connect."
    ),
    "originpool_pair_utilisation_max": "Fullest (egress IP, destination) pair, 0..1.",
    "originpool_origin_active_connections": "Checked-out upstream connections, by origin.",
    "originpool_origin_idle_connections": "Idle keep-alive upstream connections, by origin.",
    "originpool_origin_leased_connections": "Long-lived (WebSocket) upstream leases, by origin.",
    "originpool_origin_waiting_requests": "Requests queued for a connection, by origin.",
}


def collect(egress: EgressSet, pool: OriginPool | None = None) -> list[Sample]:
    """Everything an operator needs to see ports running out before clients do."""
    out: list[Sample] = []
    m = egress.metrics
    for ip, n in sorted(m.attempts.items()):
        out.append(Sample("originpool_connect_attempts_total", (("egress", ip),), n, True))
    for (ip, code), n in sorted(m.failures.items()):
        labels: tuple[tuple[str, str], ...] = (("egress", ip), ("errno", code))
        out.append(Sample("originpool_connect_failures_total", labels, n, True))
    out.append(Sample("originpool_egress_exhausted_total", (), m.exhausted, True))
    out.append(Sample("originpool_egress_unavailable_total", (), m.unavailable, True))
    for (ip, reason), n in sorted(m.failover.items()):
        labels = (("egress", ip), ("reason", reason))
        out.append(Sample("originpool_egress_failover_total", labels, n, True))
    for ip, n in sorted(egress.live_by_egress().items()):
        out.append(Sample("originpool_egress_live_connections", (("egress", ip),), n))
    for e in egress.egresses:
        down = 1.0 if egress.is_down(e) else 0.0
        out.append(Sample("originpool_egress_down", (("egress", str(e)),), down))
    pairs = egress.utilisation()
    out.append(
        Sample("originpool_pair_utilisation_max", (), pairs[0].utilisation if pairs else 0.0)
    )
    if pool is not None:
        for s in pool.stats():
            labels = (("origin", s.origin),)
            out.append(Sample("originpool_origin_active_connections", labels, s.active))
            out.append(Sample("originpool_origin_idle_connections", labels, s.idle))
            out.append(Sample("originpool_origin_leased_connections", labels, s.leased))
            out.append(Sample("originpool_origin_waiting_requests", labels, s.waiting))
    return out


def render_prometheus(samples: list[Sample], help_text: Mapping[str, str] | None = None) -> str:
    """Prometheus text exposition format 0.0.4; ``help_text`` adds HELP lines for other
    layers' metric names."""
    helps = {**HELP, **(help_text or {})}
    lines: list[str] = []
    seen: set[str] = set()
    for s in samples:
        if s.name not in seen:
            seen.add(s.name)
            lines.append(f"# HELP {s.name} {helps.get(s.name, s.name)}")
            lines.append(f"# TYPE {s.name} {'counter' if s.counter else 'gauge'}")
        labels = ",".join(f'{k}="{_escape(v)}"' for k, v in s.labels)
        value = int(s.value) if float(s.value).is_integer() else s.value
        lines.append(f"{s.name}{{{labels}}} {value}" if labels else f"{s.name} {value}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
