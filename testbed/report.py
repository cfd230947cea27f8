"""What the testbed's figures mean: merged attempts, utilisation bands, tables, JSON, plot.

Kept apart from the orchestrator so the arithmetic can be tested without a namespace, and
so the JSON keys (read by tools outside the project: add keys, never rename them) live in
one place.
"""

from __future__ import annotations

import bisect
import errno
import json
import os
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

OK = "ok"
BANDS: tuple[tuple[str, float, float], ...] = (
    ("0-50%", 0.0, 0.5),
    ("50-90%", 0.5, 0.9),
    ("90-100%", 0.9, 1.0 + 1e-9),
)
_LIVE = re.compile(r'^originpool_egress_live_connections\{egress="([^"]*)"\}\s+(\d+)', re.M)


@dataclass
class Merged:
    """Every shard's attempts on one time line, in start order, with run-wide held counts.

    ``held_before``: sessions held (verified by their echo) when the attempt started, what
    its handshake latency is read against. ``held_at_end``: sessions that were held or
    being opened (and went on to succeed) when the attempt's outcome arrived: what a
    failure is read against, since with several handshakes in flight an earlier session
    may already own its upstream connection while its echo is still on the way.
    """

    started: list[float] = field(default_factory=list)
    outcome: list[str] = field(default_factory=list)
    handshake_ms: list[float | None] = field(default_factory=list)
    held_before: list[int] = field(default_factory=list)
    held_at_end: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.outcome)


def merge(shards: Sequence[Sequence[Sequence[Any]]]) -> Merged:
    """Attempts ``[started, finished, outcome, handshake_ms, held_before]`` of all shards.

    Run-wide counts come from the successes' start and finish times (one monotonic clock
    for every process), so one shard or several are read the same way.
    """
    rows = sorted((tuple(r) for shard in shards for r in shard), key=lambda r: r[0])
    ok_done = sorted(float(r[1]) for r in rows if r[2] == OK)
    ok_started = sorted(float(r[0]) for r in rows if r[2] == OK)
    out = Merged()
    for started, finished, outcome, ms, _held in rows:
        out.started.append(float(started))
        out.outcome.append(str(outcome))
        out.handshake_ms.append(None if ms is None else float(ms))
        out.held_before.append(bisect.bisect_left(ok_done, float(started)))
        opened = bisect.bisect_left(ok_started, float(finished))
        out.held_at_end.append(opened - (outcome == OK))  # itself excluded
    return out


def append_records(path: str, mode: str, merged: Merged) -> None:
    """Every attempt of a run as JSON lines, for whoever wants more than the figures."""
    with open(path, "a") as f:
        for i in range(len(merged)):
            row = {
                "mode": mode,
                "attempt": i + 1,
                "started": merged.started[i],
                "outcome": merged.outcome[i],
                "handshake_ms": merged.handshake_ms[i],
                "held_before": merged.held_before[i],
                "held_at_end": merged.held_at_end[i],
            }
            f.write(json.dumps(row) + "\n")


def held_curve(merged: Merged) -> list[int]:
    """Sessions held after each attempt, in attempt order: the plot's line."""
    out: list[int] = []
    held = 0
    for outcome in merged.outcome:
        held += outcome == OK
        out.append(held)
    return out


def latency_bands(merged: Merged, limit: int) -> dict[str, float | None]:
    """Median handshake latency (ms) per utilisation band, utilisation = held / limit."""
    buckets: dict[str, list[float]] = {name: [] for name, _, _ in BANDS}
    for outcome, ms, held in zip(
        merged.outcome, merged.handshake_ms, merged.held_before, strict=True
    ):
        if outcome != OK or ms is None or limit <= 0:
            continue
        u = held / limit
        for name, lo, hi in BANDS:
            if lo <= u < hi:
                buckets[name].append(ms)
                break
    return {name: (round(statistics.median(v), 4) if v else None) for name, v in buckets.items()}


def latency_deciles(merged: Merged, limit: int) -> list[float | None]:
    """Median handshake latency (ms) per tenth of the limit: the plot's latency line."""
    buckets: list[list[float]] = [[] for _ in range(10)]
    rows = zip(merged.outcome, merged.handshake_ms, merged.held_before, strict=True)
    for outcome, ms, held in rows:
        if outcome != OK or ms is None or limit <= 0:
            continue
        buckets[min(9, int(10 * held / limit))].append(ms)
    return [round(statistics.median(b), 4) if b else None for b in buckets]


def band_counts(merged: Merged, limit: int) -> dict[str, int]:
    counts: dict[str, int] = {name: 0 for name, _, _ in BANDS}
    for outcome, held in zip(merged.outcome, merged.held_before, strict=True):
        if outcome != OK or limit <= 0:
            continue
        u = held / limit
        for name, lo, hi in BANDS:
            if lo <= u < hi:
                counts[name] += 1
                break
    return counts


def latency_ratio(bands: dict[str, float | None]) -> float | None:
    """90-100% band over 0-50% band: 1.0 is flat; the target for connectx is <= 1.1."""
    low, high = bands.get("0-50%"), bands.get("90-100%")
    if not low or high is None:
        return None
    return round(high / low, 3)


def first_client_failure(merged: Merged, limit: int) -> dict[str, Any] | None:
    for i, outcome in enumerate(merged.outcome):
        if outcome != OK:
            held = merged.held_at_end[i]
            return {
                "attempt": i + 1,
                "outcome": outcome,
                "held": held,
                "utilisation": round(held / limit, 4) if limit else None,
            }
    return None


def describe_outcome(outcome: str) -> str:
    """``"503"`` -> ``"HTTP 503"``; errno names and ``timeout`` stay as they are."""
    return f"HTTP {outcome}" if outcome.isdigit() else outcome


_TRIED = re.compile(r"(\S+?): (E[A-Z]+)")


def kernel_words(name: str) -> str:
    """``EADDRNOTAVAIL`` -> ``Cannot assign requested address``: the kernel's own words."""
    code = getattr(errno, name, None)
    return os.strerror(code) if isinstance(code, int) else name


def describe_proxy_error(line: dict[str, Any] | None) -> str:
    """The proxy's ``upstream_error`` line in one phrase: what the kernel said, and where.

    When every egress IP was tried (``... (tried 127.0.1.2: EADDRINUSE, ...)``), the errno
    that matters is the one each IP got (EADDRINUSE from bind, EADDRNOTAVAIL from connect),
    not the summary's; both the errno name and the kernel's words are given, since the
    proxy's message may carry only the name.
    """
    if not line:
        return "-"
    text = str(line.get("error", ""))
    names: list[str] = []
    tried = text.rpartition("(tried ")[2]
    for _where, name in _TRIED.findall(tried) if "(tried " in text else []:
        if name not in names:
            names.append(name)
    if not names:
        names = [str(line.get("errno", "?"))]
    said = ", ".join(f'{n} "{kernel_words(n)}"' for n in names)
    egress = line.get("egress")
    if isinstance(egress, list):
        egress = ", ".join(str(e) for e in egress)
    where = " -> ".join(str(x) for x in (egress, line.get("destination")) if x)
    return f"{said} ({where})" if where else said


def parse_live_per_egress(metrics: str) -> dict[str, int]:
    """``originpool_egress_live_connections{egress="..."} N`` lines of /metrics."""
    return {m[1] or "default": int(m[2]) for m in _LIVE.finditer(metrics)}


def per_egress_from_census(pairs: Iterable[Any], destinations: set[str]) -> dict[str, int]:
    """Established connections by source IP to the origins, from the kernel's census."""
    out: Counter[str] = Counter()
    for p in pairs:
        if p.proto == "tcp" and p.dst in destinations and p.established:
            out[p.src] += p.established
    return dict(sorted(out.items()))


def build_run(
    *,
    mode: str,
    egress: int,
    origins: int,
    port_range: tuple[int, int],
    merged: Merged,
    held: int,
    lost: int,
    lost_reasons: dict[str, int],
    first_proxy_error: dict[str, Any] | None,
    proxy_errors: dict[str, int],
    per_egress: dict[str, int],
    per_egress_metrics: dict[str, int] | None,
    rss_before: int | None,
    rss_held: int | None,
    ramp_seconds: float,
    hold_seconds: float,
    workers: int,
    concurrency: int,
    client_processes: int,
    lost_close_codes: dict[str, int] | None = None,
    per_egress_end: dict[str, int] | None = None,
    proxy_session_ends: dict[str, int] | None = None,
    proxy_worker_deaths: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One run's figures under the keys the issue promises (and a few more).

    ``held`` in: the sessions the clients opened and verified once (an echo at open).
    ``held`` out: what :func:`held_at_end` makes of it, the sessions still alive and
    verified by the final echo, never more than the kernel's census at the end shows.
    """
    size = port_range[1] - port_range[0] + 1
    limit = egress * size * origins
    opened = held
    held, unbacked = held_at_end(opened, lost, per_egress_end)
    failures = Counter(o for o in merged.outcome if o != OK)
    first = first_client_failure(merged, limit)
    bands = latency_bands(merged, limit)
    first_error = "-"
    if first is not None:
        first_error = describe_outcome(first["outcome"])
        if first_proxy_error:
            first_error += f"; proxy: {describe_proxy_error(first_proxy_error)}"
    rss_per = None
    if rss_before is not None and rss_held is not None and opened - lost:
        rss_per = round((rss_held - rss_before) / (opened - lost))
    return {
        "mode": mode,
        "egress": egress,
        "origins": origins,
        "port_range_size": size,
        "port_range": f"{port_range[0]}-{port_range[1]}",
        "limit": limit,
        "attempted": len(merged),
        "held": held,
        "held_pct": round(100 * held / limit, 2) if limit else None,
        "held_means": HELD_MEANS,
        "opened": opened,
        "verified_at_end": opened - lost,
        "unbacked": unbacked,
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "lost": lost,
        "lost_reasons": lost_reasons,
        "lost_close_codes": lost_close_codes or {},
        "proxy_session_ends": proxy_session_ends or {},
        "proxy_worker_deaths": proxy_worker_deaths or [],
        "first_error": first_error,
        "first_failure_client": first,
        "first_failure_proxy": first_proxy_error,
        "proxy_errors": proxy_errors,
        # read against held_at_end, as the first failure is: with several clients, sessions
        # still finishing their echo already held their upstream connection
        "failures_before_limit": sum(
            1
            for o, h in zip(merged.outcome, merged.held_at_end, strict=True)
            if o != OK and h < limit
        ),
        "per_egress": per_egress,
        "per_egress_metrics": per_egress_metrics,
        "per_egress_at_end": per_egress_end,
        "proxy_rss_bytes_per_session": rss_per,
        "proxy_rss_before_bytes": rss_before,
        "proxy_rss_held_bytes": rss_held,
        "ramp_seconds": round(ramp_seconds, 3),
        "hold_seconds": hold_seconds,
        "handshake_median_ms": bands,
        "handshake_sessions_per_band": band_counts(merged, limit),
        "handshake_median_ms_by_decile": latency_deciles(merged, limit),
        "handshake_ratio_90_100_vs_0_50": latency_ratio(bands),
        "workers": workers,
        "concurrency": concurrency,
        "client_processes": client_processes,
        "curve": _thin(held_curve(merged)),
    }


HELD_MEANS = (
    "sessions alive at the end: answered the final echo, and no more than the kernel's "
    "census of upstream connections at the end shows"
)


def held_at_end(
    opened: int, lost: int, census_end: dict[str, int] | None
) -> tuple[int, int | None]:
    """(held, unbacked): the sessions that answered the final echo, capped by the census.

    A session that answered has an upstream connection behind it, so the census can only
    show fewer when something else answered for the origin: those are ``unbacked`` and not
    held. No census (None): the echo's word alone, and ``unbacked`` unknown.
    """
    verified = max(0, opened - lost)
    if census_end is None:
        return verified, None
    upstream = sum(census_end.values())
    return min(verified, upstream), max(0, verified - upstream)


def _thin(curve: list[int], points: int = 400) -> list[list[int]]:
    """``[attempted, held]`` points for the plot: every step where held changed pace, at most
    ``points`` of them plus the ends, so the JSON stays small at 100,000 attempts."""
    if not curve:
        return []
    step = max(1, len(curve) // points)
    out = [[i + 1, curve[i]] for i in range(0, len(curve), step)]
    if out[-1][0] != len(curve):
        out.append([len(curve), curve[-1]])
    return out


# -- rendering -------------------------------------------------------------------------------


def _n(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} ms"


def _size(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1 << 20:
        return f"{value / (1 << 20):.1f} MiB"
    return f"{value / 1024:.1f} KiB"


def table_rows(run: dict[str, Any]) -> list[tuple[str, str]]:
    """A run as (figure, value) rows, in the order a reader asks the questions."""
    if run.get("error"):
        return [("error", str(run["error"]))]
    limit = run["limit"]
    rows = [
        (
            "physical limit E x R x K",
            f"{run['egress']} x {run['port_range_size']:,} x {run['origins']} = {limit:,}",
        ),
        (
            "sessions held",
            f"{run['held']:,} ({run['held_pct']:.1f}% of the limit): alive at the end, each "
            "answered the final echo"
            + (
                f", census {sum(run['per_egress_at_end'].values()):,} upstream"
                if run.get("per_egress_at_end") is not None
                else ""
            ),
        ),
        ("attempted / failed", f"{run['attempted']:,} / {run['failed']:,}" + _failures(run)),
    ]
    first = run.get("first_failure_client")
    if first:
        util = first["utilisation"]
        rows.append(
            (
                "first failure (client)",
                f"{describe_outcome(first['outcome'])} at attempt {first['attempt']:,}, "
                f"{first['held']:,} held ({100 * util:.1f}% of the limit)",
            )
        )
    else:
        rows.append(("first failure (client)", "none"))
    rows.append(("first failure (proxy log)", describe_proxy_error(run.get("first_failure_proxy"))))
    per = run.get("per_egress") or {}
    if per:
        values = list(per.values())
        rows.append(
            (
                "sessions per egress IP",
                f"min {min(values):,} / max {max(values):,} over {len(values)} IP"
                + ("s" if len(values) != 1 else "")
                + f" ({', '.join(f'{k}: {v:,}' for k, v in per.items())})",
            )
        )
    rows.append(
        (
            "proxy RSS per held session",
            f"{_size(run['proxy_rss_bytes_per_session'])} "
            f"({_size(run['proxy_rss_before_bytes'])} -> {_size(run['proxy_rss_held_bytes'])})",
        )
    )
    rate = run["attempted"] / run["ramp_seconds"] if run["ramp_seconds"] else 0
    rows.append(("ramp time", f"{run['ramp_seconds']:.1f} s ({rate:,.0f} attempts/s)"))
    opened = run.get("opened", run["held"])
    rows.append(
        (
            "lost after opening",
            f"{run['lost']:,} of {opened:,} opened (hold {run['hold_seconds']:g} s)"
            + _lost_detail(run),
        )
    )
    if run.get("unbacked"):
        rows.append(
            (
                "answered without an upstream",
                f"{run['unbacked']:,}: more echoes than the kernel's census of upstream "
                "connections; not counted held",
            )
        )
    bands = run["handshake_median_ms"]
    ratio = run["handshake_ratio_90_100_vs_0_50"]
    rows.append(
        (
            "handshake median by utilisation",
            "  ".join(f"{name}: {_ms(ms)}" for name, ms in bands.items())
            + (f"  (90-100 / 0-50 = {ratio:.2f})" if ratio is not None else ""),
        )
    )
    return rows


def _lost_detail(run: dict[str, Any]) -> str:
    """Who ended the lost sessions: the client's Close codes, the proxy's session lines."""
    parts: list[str] = []
    codes = run.get("lost_close_codes") or {}
    if codes:
        parts.append(
            "client saw "
            + ", ".join(
                f"{'no Close frame' if k == 'none' else 'Close ' + k}: {v:,}"
                for k, v in sorted(codes.items(), key=lambda kv: -kv[1])
            )
        )
    ends = run.get("proxy_session_ends") or {}
    if ends:
        top = sorted(ends.items(), key=lambda kv: -kv[1])[:4]
        parts.append("proxy says closed by " + ", ".join(f"{k}: {v:,}" for k, v in top))
    deaths = run.get("proxy_worker_deaths") or []
    if deaths:
        parts.append(f"{len(deaths)} proxy worker(s) died")
    return f" ({'; '.join(parts)})" if parts else ""


def _failures(run: dict[str, Any]) -> str:
    if not run["failures"]:
        return ""
    parts = sorted(run["failures"].items(), key=lambda kv: -kv[1])
    return " (" + ", ".join(f"{describe_outcome(k)}: {v:,}" for k, v in parts) + ")"


def render_table(run: dict[str, Any]) -> Any:
    """A rich Table for one mode."""
    from rich.table import Table

    title = f"mode {run['mode']}"
    table = Table(title=title, title_justify="left", show_header=False, expand=False)
    table.add_column("figure", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    for name, value in table_rows(run):
        table.add_row(name, value)
    return table


def render_summary(runs: Sequence[dict[str, Any]]) -> Any:
    """All modes side by side: the one table to read if you read only one."""
    from rich.table import Table

    table = Table(title="summary", title_justify="left")
    for col in ("mode", "limit", "held", "% of limit", "first failure (client)", "lost"):
        table.add_column(col, justify="right" if col not in ("mode",) else "left")
    for run in runs:
        if run.get("error"):
            table.add_row(run["mode"], "-", "-", "-", "error", "-")
            continue
        first = run.get("first_failure_client")
        where = (
            f"{describe_outcome(first['outcome'])} at {100 * first['utilisation']:.1f}%"
            if first
            else "none"
        )
        table.add_row(
            run["mode"],
            f"{run['limit']:,}",
            f"{run['held']:,}",
            f"{run['held_pct']:.1f}%",
            where,
            f"{run['lost']:,}",
        )
    return table


def plot(runs: Sequence[dict[str, Any]], path: str) -> None:
    """Sessions held against sessions attempted, one line per mode, the limit drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in runs if not r.get("error") and r.get("curve")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), width_ratios=(3, 2))
    limits: set[int] = set()
    for i, run in enumerate(good):
        xs = [p[0] for p in run["curve"]]
        ys = [p[1] for p in run["curve"]]
        # later lines thinner: where two modes hold the same, both stay visible
        width = max(1.5, 2 * (len(good) - i))
        label = f"{run['mode']}: {run['held']:,} held at the end (alive, echo verified)"
        left.plot(xs, ys, label=label, linewidth=width)
        limits.add(run["limit"])
    for limit in sorted(limits):
        left.axhline(limit, color="black", linestyle="--", linewidth=1)
        left.annotate(
            f"physical limit E x R x K = {limit:,}",
            (0, limit),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=9,
        )
    left.set_xlabel("sessions attempted")
    left.set_ylabel("sessions opened (echo verified at open)")
    left.set_title("WebSocket sessions held through the proxy")
    left.set_ylim(bottom=0, top=max(limits, default=1) * 1.12)
    left.grid(alpha=0.3)
    left.legend(loc="lower right")
    for run in good:
        deciles = run.get("handshake_median_ms_by_decile") or []
        points = [(10 * i + 5, ms) for i, ms in enumerate(deciles) if ms is not None]
        if not points:
            continue
        ratio = run.get("handshake_ratio_90_100_vs_0_50")
        label = run["mode"] + (f" (90-100% / 0-50%: {ratio:.2f})" if ratio else "")
        right.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    for edge in (50, 90):
        right.axvline(edge, color="grey", linestyle=":", linewidth=1)
    right.set_xlim(0, 100)
    right.set_ylim(bottom=0)
    right.set_xlabel("sessions held, % of the physical limit")
    right.set_ylabel("median handshake (ms)")
    right.set_title("handshake latency by utilisation")
    right.grid(alpha=0.3)
    right.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
