"""What a scenario's figures mean: steps from the clients' own counts, the table, the plot.

Kept apart from the orchestrator so the arithmetic (recovery times, the JSON shape) can be
tested without a namespace. The JSON shape is a contract: every key is always present,
``null`` where a figure does not apply (recovery times outside a disruption), never absent.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

DOC_KEYS = (
    "scenario",
    "proxy",
    "limit",
    "steps",
    "timeline",
    "close_codes",
    "proxy_peak_rss_bytes",
    "proxy_cpu_seconds",
    "evidence",  # faults, rotate: per step, what the proxy and the kernel showed; else null
    # per origin, [t, new sessions per second] for every half second with any, as the origin
    # counted them (null in the ramp)
    "new_sessions",
)
STEP_KEYS = (
    "name",
    "t_start",
    "t_end",
    "sessions_before",
    "sessions_after",
    "lost",
    "failures",
    "recovered_50_s",
    "recovered_99_s",
    "recovered_100_s",
    "drops",
    "close_codes",
    # per origin, the most new sessions it saw in one half second of the step, per second
    "peak_new_sessions_per_s",
)
TIMELINE_KEYS = ("t", "live", "failures", "time_wait", "other_states")


def recovery_times(
    drops: int, back: Sequence[float], t_start: float
) -> tuple[float | None, float | None, float | None]:
    """Seconds from ``t_start`` until 50%, 99% and 100% of the dropped sessions were back.

    ``back`` holds the moments (one clock for every process) at which a dropped session was
    re-established; a share never reached is ``None``. With nothing dropped every share is
    back at once (0.0). Monotonic by construction: a larger share needs a later moment.
    """
    if drops <= 0:
        return 0.0, 0.0, 0.0
    ordered = sorted(back)
    out: list[float | None] = []
    for share in (0.5, 0.99, 1.0):
        need = max(1, math.ceil(share * drops - 1e-9))
        reached = len(ordered) >= need
        out.append(round(max(0.0, ordered[need - 1] - t_start), 3) if reached else None)
    return out[0], out[1], out[2]


def step_figures(record: Any, client_steps: Sequence[dict[str, Any]], t0: float) -> dict[str, Any]:
    """One step of the JSON, merged over the client shards' own counts of it."""
    failures: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    drops = 0
    lost = 0
    back: list[float] = []
    for s in client_steps:
        failures.update(s.get("failures") or {})
        codes.update(s.get("close_codes") or {})
        drops += int(s.get("drops", 0))
        lost += int(s.get("lost", 0))
        back.extend(float(t) for t in s.get("back") or [])
    r50 = r99 = r100 = None
    if record.disruption:
        r50, r99, r100 = recovery_times(drops, back, t0 + record.t_start)
    return {
        "name": record.name,
        "t_start": record.t_start,
        "t_end": record.t_end,
        "sessions_before": record.sessions_before,
        "sessions_after": record.sessions_after,
        "lost": lost,
        "failures": dict(sorted(failures.items(), key=lambda kv: -kv[1])),
        "recovered_50_s": r50,
        "recovered_99_s": r99,
        "recovered_100_s": r100,
        "drops": drops,
        "close_codes": dict(sorted(codes.items())),
        "peak_new_sessions_per_s": None,  # the orchestrator's, from the origins' counts
    }


def ramp_doc(runs: Sequence[dict[str, Any]], limit: int, custom: bool) -> dict[str, Any]:
    """The ramp in the scenario document's shape: one step per egress mode, the modes'
    timelines on one time line; no origin goes away, so no close codes (null)."""
    good = [r for r in runs if not r.get("error")]
    steps = [
        {
            "name": r["mode"],
            "t_start": r.get("t_start"),
            "t_end": r.get("t_end"),
            "sessions_before": 0,
            "sessions_after": r["held"],
            "lost": r["lost"],
            "failures": r["failures"],
            "recovered_50_s": None,
            "recovered_99_s": None,
            "recovered_100_s": None,
            "drops": None,
            "close_codes": None,
            "peak_new_sessions_per_s": None,  # the ramp's origins do not count their opens
        }
        for r in good
    ]
    rss = [r["proxy_rss_held_bytes"] for r in good if r.get("proxy_rss_held_bytes")]
    cpu = [r["proxy_cpu_seconds"] for r in good if r.get("proxy_cpu_seconds") is not None]
    return {
        "scenario": "ramp",
        "proxy": "custom" if custom else "originpool",
        "limit": limit,
        "steps": steps,
        "timeline": [row for r in good for row in r.get("timeline") or []],
        "close_codes": None,
        "proxy_peak_rss_bytes": max(rss) if rss else None,
        "proxy_cpu_seconds": round(sum(cpu), 3) if cpu else None,
        "evidence": None,
        "new_sessions": None,
    }


def public_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """The ``--json`` document: exactly the promised keys, in order (extras stay inside)."""
    out = {k: doc.get(k) for k in DOC_KEYS}
    out["steps"] = [{k: s.get(k) for k in STEP_KEYS} for s in doc.get("steps") or []]
    out["timeline"] = [{k: row.get(k) for k in TIMELINE_KEYS} for row in doc.get("timeline") or []]
    return out


# -- rendering -------------------------------------------------------------------------------


def _n(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def _counts(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "n/a"
    if not counts:
        return "0"
    parts = sorted(counts.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{_status(k)}: {v:,}" for k, v in parts)


def _status(key: str) -> str:
    return f"HTTP {key}" if key.isdigit() and len(key) == 3 else key


def _size(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / (1 << 20):.1f} MiB"


def step_rows(doc: dict[str, Any], reconnects: bool = True) -> list[list[str]]:
    """One row per step; ``reconnects``: the scenario's clients come back after a drop, so
    recovery times mean something even outside a disruption."""
    rows = []
    for s in doc["steps"]:
        disruption = s.get("recovered_50_s") is not None or s.get("recovered_100_s") is not None
        recovered = (
            f"{_s(s['recovered_50_s'])} / {_s(s['recovered_99_s'])} / {_s(s['recovered_100_s'])}"
            if disruption or (s.get("drops") and reconnects)
            else "n/a"  # faults: a dropped session is not reconnected, it is counted
        )
        rows.append(
            [
                s["name"],
                f"{s['t_start']:.1f}-{(s['t_end'] or 0):.1f} s",
                _n(s["sessions_before"]),
                _n(s["sessions_after"]),
                _n(s.get("drops")),
                "n/a" if s["lost"] is None else _n(s["lost"]),
                _counts(s["failures"]),
                recovered,
            ]
        )
    return rows


def summary_rows(doc: dict[str, Any], detail: dict[str, Any]) -> list[tuple[str, str]]:
    limit = doc["limit"]
    rows = [
        ("proxy", f"{doc['proxy']} ({detail['mode']})"),
        ("physical limit E x R x K", f"{limit:,}"),
        (
            "sessions: attempted = held + refused + lost",
            f"{detail['attempted']:,} = {detail['held']:,} + {detail['refused']:,} + "
            f"{detail['lost']:,}"
            + (
                ""
                if detail["attempted"] == detail["held"] + detail["refused"] + detail["lost"]
                else "  (DOES NOT ADD UP)"
            ),
        ),
        ("refused by", _counts(detail["refused_by"])),
        ("lost by", _counts(detail["lost_by"])),
        (
            "peak live sessions",
            f"{detail['peak_live']:,} ({100 * detail['peak_live'] / limit:.1f}% of the limit)",
        ),
        (
            "peak TIME_WAIT, proxy -> origins",
            f"{detail['peak_time_wait']:,} ({100 * detail['peak_time_wait'] / limit:.1f}% of the "
            f"limit); origin side: {detail['peak_origin_time_wait']:,}; tcp_tw_reuse "
            f"{detail['tw_reuse']} in the namespace",
        ),
    ]
    if detail.get("closes"):
        rows.append(("client closes (close / fin / rst)", _counts(detail["closes"])))
    rows.append(("close codes clients saw", _counts(doc["close_codes"])))
    rows.append(
        (
            "proxy peak RSS / CPU",
            f"{_size(doc['proxy_peak_rss_bytes'])} / {doc['proxy_cpu_seconds']:.1f} s",
        )
    )
    return rows


def render(
    doc: dict[str, Any],
    detail: dict[str, Any],
    rows: Sequence[tuple[str, str]] = (),
    reconnects: bool = True,
) -> list[Any]:
    """Rich tables: the steps, then the figures a reader asks for (``rows``: the scenario's
    own, :meth:`testbed.scenarios.base.Scenario.report_rows`)."""
    from rich.table import Table

    steps = Table(title=f"scenario {doc['scenario']}: steps", title_justify="left")
    for col in (
        "step",
        "time",
        "before",
        "after",
        "dropped",
        "lost",
        "handshake failures",
        "back 50% / 99% / 100%",
    ):
        steps.add_column(col, justify="left" if col in ("step", "handshake failures") else "right")
    for row in step_rows(doc, reconnects):
        steps.add_row(*row)
    summary = Table(show_header=False, title=f"scenario {doc['scenario']}", title_justify="left")
    summary.add_column("figure", style="bold", no_wrap=True)
    summary.add_column("value", overflow="fold")
    for name, value in [*summary_rows(doc, detail), *rows]:
        summary.add_row(name, value)
    out: list[Any] = [steps, summary]
    if doc.get("evidence"):
        evidence = Table(
            show_header=False, title="what the proxy and the kernel showed", title_justify="left"
        )
        evidence.add_column("step", style="bold", no_wrap=True)
        evidence.add_column("evidence", overflow="fold")
        for name, ev in doc["evidence"].items():
            evidence.add_row(name, evidence_text(ev))
        out.append(evidence)
    return out


def evidence_text(ev: dict[str, Any]) -> str:
    """One step's evidence as ``key: value`` pairs, nested dicts inline."""
    import json

    return "; ".join(f"{k}: {json.dumps(v, separators=(',', ':'))}" for k, v in ev.items())


def plot(doc: dict[str, Any], path: str, opens: bool = False) -> None:
    """Live sessions, TIME_WAIT and failures per second over time, steps marked; with
    ``opens``, below them the new sessions per second each origin saw (rotate, where that
    rate is the point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = doc["timeline"]
    ts = [row["t"] for row in timeline]
    if opens:
        fig, (ax, below) = plt.subplots(
            2, 1, figsize=(11, 7.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]}
        )
        series = doc.get("new_sessions") or {}
        moments = [p[0] for points in series.values() for p in points]
        first = min(moments, default=0.0)
        count = round((max(moments, default=0.0) - first) / 0.5) + 1
        xs = [first + 0.5 * i for i in range(count)]
        for origin, points in series.items():
            # the half seconds without a new session are not in the document: zero here
            per_bucket = {round((t - first) / 0.5): rate for t, rate in points}
            ys = [per_bucket.get(i, 0.0) for i in range(count)]
            below.step(xs, ys, where="post", label=origin)
        below.set_ylabel("new sessions / s at the origin\n(per 0.5 s)")
        below.set_ylim(bottom=0)
        below.grid(alpha=0.3)
        below.legend(loc="upper right", fontsize=8)
        for step in doc["steps"]:
            below.axvline(step["t_start"], color="grey", linestyle=":", linewidth=1)
    else:
        fig, ax = plt.subplots(figsize=(11, 4.8))
    ax.plot(ts, [row["live"] for row in timeline], label="live sessions", linewidth=2)
    ax.plot(ts, [row["time_wait"] for row in timeline], label="proxy upstream TIME_WAIT")
    ax.plot(
        ts,
        [row["other_states"] for row in timeline],
        label="other non-established upstream",
        linewidth=1,
    )
    limit = doc["limit"]
    ax.axhline(limit, color="black", linestyle="--", linewidth=1)
    ax.annotate(
        f"physical limit E x R x K = {limit:,}",
        (0, limit),
        textcoords="offset points",
        xytext=(4, 4),
        fontsize=9,
    )
    right = ax.twinx()
    right.bar(
        ts,
        [sum(row["failures"].values()) for row in timeline],
        width=0.8,
        color="tab:red",
        alpha=0.4,
        label="handshake failures / s",
    )
    right.set_ylabel("handshake failures per second")
    right.set_ylim(bottom=0)
    for i, step in enumerate(doc["steps"]):
        ax.axvline(step["t_start"], color="grey", linestyle=":", linewidth=1)
        ax.annotate(
            step["name"],
            (step["t_start"], limit * (1.08 - 0.04 * (i % 2))),  # close steps: names apart
            textcoords="offset points",
            xytext=(3, 0),
            fontsize=9,
        )
    ax.set_xlabel("seconds")
    ax.set_ylabel("sessions / sockets")
    ax.set_ylim(bottom=0, top=limit * 1.15)
    ax.set_title(f"scenario {doc['scenario']} ({doc['proxy']})")
    ax.grid(alpha=0.3)
    lines, labels = ax.get_legend_handles_labels()
    bars, bar_labels = right.get_legend_handles_labels()
    ax.legend(lines + bars, labels + bar_labels, loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
