"""One ``/metrics`` for the whole proxy: worker 0 scrapes its siblings and sums (issue 18).

With ``workers = N`` every worker counts only its own traffic and serves it on the admin
port + its index, so Prometheus needed N targets and a dashboard that forgot one showed a
fraction of the traffic. Worker 0's ``/metrics`` on the admin port is now the sum: it fetches
``/metrics?scope=worker`` from the admin port + i of each sibling over loopback, all at once
and bounded by :data:`SCRAPE_TIMEOUT`, and adds them to its own. The per-worker ports stay,
for debugging one worker.

Why scrape the text rather than share counters in shared memory: each worker's counters
live in plain Python objects on its own event loop, and the exposition is already what
every worker serves; summing texts needs no locking, no new state in the data path, and is
correct by construction for every metric added later. What "sum" means, per family:

* counters, histogram buckets, ``_sum`` and ``_count``: summed over identical label sets,
  which is exact (every worker renders its labels with the same code, in the same order);
* gauges: summed too (connections, sessions, idle and leased upstream connections add up
  across workers), except those in :data:`PER_WORKER`, where a sum means nothing (the
  fullest pair's utilisation, a 0/1 flag): those keep one sample per worker, labelled
  ``worker``.

A sibling that does not answer in time (being restarted, say) is left out, logged, and
counted in ``originpool_metrics_workers{state="missing"}``: the scrape still answers, and
the missing share is visible rather than silent. Its counters reappear when it does, as
after any restart (Prometheus's ``rate()`` handles that as a counter reset).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

SCRAPE_TIMEOUT = 2.0  # seconds for all siblings together; Prometheus's default timeout is 10 s
MAX_BODY = 32 * 1024 * 1024  # a sibling's exposition larger than this is refused, not buffered
PER_WORKER = frozenset(
    {
        "originpool_pair_utilisation_max",
        "originpool_egress_down",
        "originpool_draining",
        "originpool_origin_up",  # each worker's own verdict (proxy.health)
        "originpool_origin_draining",  # each worker drains its own sessions (proxy.drain)
    }
)
WORKERS_HELP = "Workers whose metrics are in this sum (summed) and those that did not answer."

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
_LABELS = re.compile(r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"(?:,|$)')


class ExpositionError(ValueError):
    """A line of a worker's exposition that is not the text format; ``line`` is its number."""

    def __init__(self, line: int, text: str, reason: str) -> None:
        self.line = line
        self.text = text
        super().__init__(f"line {line}: {reason}: {text[:80]!r}")


@dataclass
class Family:
    """One metric family: its HELP and TYPE, and its samples keyed by (name, label text)."""

    name: str
    help: str = ""
    type: str = "untyped"
    samples: dict[tuple[str, str], float] = field(default_factory=dict)


def parse(text: str) -> dict[str, Family]:
    """The families of a Prometheus text exposition (0.0.4), in the order they came.

    Label text is kept as written: the workers' expositions come from one renderer, so equal
    label sets are equal strings, and keeping the text keeps its escaping exact.
    """
    families: dict[str, Family] = {}
    current: Family | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                current = families.setdefault(parts[2], Family(parts[2]))
                value = parts[3] if len(parts) == 4 else ""
                if parts[1] == "HELP":
                    current.help = value
                else:
                    current.type = value
            continue
        m = _SAMPLE.fullmatch(line)
        if m is None:
            raise ExpositionError(number, line, "not a sample line")
        name, labels, raw = m[1], m[2] or "", m[3]
        if labels and _LABELS.sub("", labels):
            raise ExpositionError(number, line, "malformed labels")
        try:
            amount = float(raw)
        except ValueError:
            raise ExpositionError(number, line, "value is not a number") from None
        if current is None or not name.startswith(current.name):
            current = families.setdefault(name, Family(name))  # a sample with no TYPE line
        key = (name, labels)
        current.samples[key] = current.samples.get(key, 0.0) + amount
    return families


def merge(parsed: Sequence[tuple[int, dict[str, Family]]]) -> dict[str, Family]:
    """``(worker index, its parsed exposition)`` pairs summed into one set of families (see
    the module's docstring: :data:`PER_WORKER` gauges are labelled ``worker`` instead)."""
    out: dict[str, Family] = {}
    for worker, families in parsed:
        for name, family in families.items():
            into = out.setdefault(name, Family(name, family.help, family.type))
            for (sample, labels), value in family.samples.items():
                if name in PER_WORKER:
                    labels = f'worker="{worker}"' + ("," + labels if labels else "")
                key = (sample, labels)
                into.samples[key] = into.samples.get(key, 0.0) + value
    return out


def render(families: Iterable[Family]) -> str:
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {family.help}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for (name, labels), value in family.samples.items():
            shown = int(value) if value.is_integer() else value
            lines.append(f"{name}{{{labels}}} {shown}" if labels else f"{name} {shown}")
    return "\n".join(lines) + "\n"


def workers_family(summed: int, missing: int) -> Family:
    family = Family("originpool_metrics_workers", WORKERS_HELP, "gauge")
    family.samples[("originpool_metrics_workers", 'state="summed"')] = float(summed)
    family.samples[("originpool_metrics_workers", 'state="missing"')] = float(missing)
    return family


def siblings(admin: tuple[str, int], workers: int) -> list[tuple[int, tuple[str, int]]]:
    """``(index, address)`` of workers 1..N-1's admin listeners, as worker i binds them (the
    admin port + i), reached over loopback when the admin address is a wildcard. None when
    the admin port is 0 (each worker then has a port the kernel chose: nothing to find)."""
    host, port = admin
    if not port:
        return []
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return [(i, (host, port + i)) for i in range(1, workers)]


async def fetch(address: tuple[str, int], path: str = "/metrics?scope=worker") -> str:
    """One GET over a fresh connection, read to the end (the admin listener closes after a
    ``Connection: close`` request); raises OSError or ValueError with the reason."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: originpool-worker\r\nConnection: close\r\n\r\n".encode()
        )
        buf = bytearray()
        while chunk := await reader.read(65536):
            buf += chunk
            if len(buf) > MAX_BODY + 65536:
                raise ValueError(f"answer larger than {MAX_BODY} bytes")
    finally:
        writer.close()
    data = bytes(buf)
    head, sep, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split(b" ")
    if not sep or len(status) < 2 or status[1] != b"200":
        raise ValueError(f"answered {head[:60]!r}")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and int(value) != len(body):
            raise ValueError(f"answer cut short: {len(body)} of {int(value)} bytes")
    return body.decode("utf-8")


async def scrape(
    peers: Sequence[tuple[int, tuple[str, int]]], timeout: float = SCRAPE_TIMEOUT
) -> tuple[list[tuple[int, str]], dict[int, str]]:
    """Every sibling's exposition at once, within ``timeout`` altogether: ``(index, text)``
    of those that answered, and ``{index: reason}`` of those that did not."""

    async def one(address: tuple[str, int]) -> str:
        return await asyncio.wait_for(fetch(address), timeout)

    results = await asyncio.gather(*(one(a) for _i, a in peers), return_exceptions=True)
    texts: list[tuple[int, str]] = []
    missing: dict[int, str] = {}
    for (index, _address), result in zip(peers, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, OSError | ValueError | TimeoutError | EOFError):
                raise result
            missing[index] = f"{type(result).__name__}: {result}"
        else:
            texts.append((index, result))
    return texts, missing


def total(own: str, others: Sequence[tuple[int, str]], missing: dict[int, str]) -> str:
    """Worker 0's exposition and its siblings' summed into the proxy's; a sibling whose text
    does not parse joins ``missing`` (updated in place). CPU only, ~1 ms per worker of a few
    hundred lines: the admin listener runs it off the event loop that relays traffic."""
    parsed = [(0, parse(own))]
    for index, text in others:
        try:
            parsed.append((index, parse(text)))
        except ExpositionError as e:
            missing[index] = f"ExpositionError: {e}"
    families = merge(parsed)
    families["originpool_metrics_workers"] = workers_family(len(parsed), len(missing))
    return render(families.values())
