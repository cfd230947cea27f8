"""HTTP/2 requests/s and CPU per request: nginx, HAProxy and originpool in the same run.

Why this exists: issue 21 sets "originpool >= 0.5x nginx's requests/s per worker over h2".
As in ``bench/http_rps.py`` (HTTP/1.1, issue 4), only the ratio against nginx on the same
machine in the same run means something: absolute figures move with the VM and its
neighbours. Each proxy has one worker (nginx ``worker_processes 1``, HAProxy ``nbthread 1``,
originpool ``workers = 1``), all three in front of the same fast HTTP/1.1 origin, each over
TLS (ALPN ``h2``) and over cleartext (h2c, prior knowledge), the load from h2load (Debian's
``nghttp2-client``) with ``-c 10 -m 10``: ten connections, ten streams in flight on each. A
third mode, ``h1``, is HTTP/1.1 over the same TLS listeners from the same client (``--h1``, one
request in flight per connection): what each proxy's HTTP/2 layer costs over its HTTP/1.1.

What runs, inside a private network namespace (``pool.netns.unshare_process``):

* **origin** on 127.0.2.1:9000: ``bench/http_rps.py``'s, nginx ``return 200`` of 13 bytes
  (its Python origin when nginx is missing: then there is no nginx proxy either);
* **nginx** 1 worker: ``listen ... ssl http2`` and ``listen ... http2`` (nginx 1.22's syntax;
  ``http2 on`` from 1.25.1), ``upstream { keepalive 64; }``, access log on, as http_rps.py;
* **HAProxy** ``nbthread 1``: ``bind ... ssl crt ... alpn h2,http/1.1`` and ``bind ... proto
  h2``, ``option httplog`` to a file, HAProxy's default server-side connection reuse;
* **originpool** ``workers = 1``: a TLS ``[[listen]]`` and a cleartext one (HTTP/2 by the
  connection preface), access log on, as deployed.

Rounds are interleaved (nginx TLS, HAProxy TLS, originpool TLS, nginx h2c, ...), so a
neighbour's burst lands on all of them alike; figures are medians over the rounds. CPU per
request is the on-CPU time of each proxy's process tree (all threads, /proc schedstat, the
helper of ``bench/setup_cost.py``) over the run divided by the requests h2load completed: the
figure a neighbour's load disturbs least. h2load takes about a core of the two itself, as wrk
does in http_rps.py; the origin takes part of the other.

The HTTP/1.1 figures are ``bench/http_rps.py``'s own; run it beside this one to see them
unchanged (README "HTTP/2" has both).

Run as root::

    .venv/bin/python bench/h2_rps.py                       # 3 rounds of 10 s
    .venv/bin/python bench/h2_rps.py --duration 2 --rounds 1 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Run as a script, sys.path[0] is bench/, not the repo; make the project importable.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench import http_rps, setup_cost  # noqa: E402  (needs the sys.path line above)
from bench.http_rps import Children  # noqa: E402
from pool import netns  # noqa: E402

PROXIES = ("nginx", "haproxy", "originpool")
MODES = ("tls", "h2c", "h1")  # h1: HTTP/1.1 over the same TLS listener, for the h2 layer's cost
H2_MODES = ("tls", "h2c")
LABELS = {
    "nginx": "nginx 1 worker",
    "haproxy": "HAProxy nbthread 1",
    "originpool": "originpool 1 worker",
}
# (proxy, mode) -> where it listens; none of http_rps.py's or setup_cost.py's ports
LISTEN = {
    ("nginx", "tls"): ("127.0.0.1", 8443),
    ("nginx", "h2c"): ("127.0.0.1", 8444),
    ("haproxy", "tls"): ("127.0.0.1", 8445),
    ("haproxy", "h2c"): ("127.0.0.1", 8446),
    ("originpool", "tls"): ("127.0.0.1", 8447),
    ("originpool", "h2c"): ("127.0.0.1", 8448),
}
ADMIN = 9090
TARGET_RATIO = 0.5  # originpool / nginx requests/s over h2, one worker each (issue 21)


# --- h2load ------------------------------------------------------------------------------------


@dataclass
class H2loadRun:
    """One h2load run's figures, parsed from its report."""

    rps: float
    done: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_2xx: int
    protocol: str  # "h2", "h2c", "http/1.1" ("" when nothing was negotiated)

    @property
    def clean(self) -> bool:
        """Every request done and answered 2xx over HTTP/2: anything else measured
        something else (a refusal, or HTTP/1.1 after a failed ALPN)."""
        return (
            self.done > 0
            and self.failed == 0
            and self.errored == 0
            and self.timeout == 0
            and self.succeeded == self.done
            # h2load counts the status of a response that lands as a timed run ends in
            # "status codes" but not in "done": one more 2xx than done is seen
            and self.status_2xx >= self.done
            # each run offers one protocol (--npn-list=h2, or --h1), so this is the one asked
            and self.protocol in ("h2", "h2c", "http/1.1")
        )


def parse_h2load(out: str) -> H2loadRun:
    """The figures of an h2load report; ValueError when its summary lines are missing."""
    rps = re.search(r"^finished in [\d.]+\w*, ([\d.]+) req/s", out, re.M)
    req = re.search(
        r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        out,
        re.M,
    )
    codes = re.search(r"^status codes: (\d+) 2xx", out, re.M)
    proto = re.search(r"^Application protocol: (\S+)", out, re.M)
    if not (rps and req and codes):
        raise ValueError(f"unexpected h2load output:\n{out[-3000:]}")
    return H2loadRun(
        rps=float(rps.group(1)),
        done=int(req.group(3)),
        succeeded=int(req.group(4)),
        failed=int(req.group(5)),
        errored=int(req.group(6)),
        timeout=int(req.group(7)),
        status_2xx=int(codes.group(1)),
        protocol=proto.group(1) if proto else "",
    )


def run_h2load(
    address: tuple[str, int], mode: str, duration: int, clients: int, streams: int
) -> H2loadRun:
    """h2load for ``duration`` seconds (bounded by it plus slack), one thread, the route's
    name as :authority. HTTP/2 modes offer h2 only (no HTTP/1.1 fallback: a proxy without h2
    fails there); ``h1`` is HTTP/1.1 over TLS, one request at a time per connection (h2load's
    -m would pipeline, which browsers do not)."""
    scheme = "http" if mode == "h2c" else "https"
    protocol = ["--h1", "-m1"] if mode == "h1" else ["--npn-list=h2", f"-m{streams}"]
    cmd = [
        "h2load",
        "-t1",
        f"-c{clients}",
        *protocol,
        f"-D{duration}",
        "-H",
        f":authority: {http_rps.HOST}",
        f"{scheme}://{address[0]}:{address[1]}/",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
    return parse_h2load(proc.stdout)


# --- the proxies --------------------------------------------------------------------------------


def nginx_version() -> tuple[int, ...]:
    """nginx -v prints ``nginx version: nginx/1.22.1`` on stderr."""
    done = subprocess.run(["nginx", "-v"], capture_output=True, text=True, timeout=10)
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", done.stderr)
    if m is None:
        raise RuntimeError(f"nginx -v: {done.stderr.strip()}")
    return tuple(int(g) for g in m.groups())


NGINX_H2 = """
    access_log {tmp}/nginx-access.log;
    upstream origin {{
        server {origin_ip}:{origin_port};
        keepalive 64;
    }}
    server {{
        listen {tls_ip}:{tls_port} ssl{http2_flag};
        listen {h2c_ip}:{h2c_port}{http2_flag};
{http2_on}
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""


def start_nginx(children: Children, tmp: Path, cert: Path, key: Path) -> int:
    """nginx as an h2 proxy on both its listeners; its master's PID (the worker is its child)."""
    new_syntax = nginx_version() >= (1, 25, 1)  # "listen ... http2" deprecated from there
    body = NGINX_H2.format(
        tmp=tmp,
        origin_ip=http_rps.ORIGIN[0],
        origin_port=http_rps.ORIGIN[1],
        tls_ip=LISTEN["nginx", "tls"][0],
        tls_port=LISTEN["nginx", "tls"][1],
        h2c_ip=LISTEN["nginx", "h2c"][0],
        h2c_port=LISTEN["nginx", "h2c"][1],
        http2_flag="" if new_syntax else " http2",
        http2_on="        http2 on;" if new_syntax else "",
        cert=cert,
        key=key,
    )
    conf = tmp / "nginx.conf"
    conf.write_text(http_rps.nginx_conf(tmp, "nginx", body))
    with open(tmp / "nginx-stderr.log", "wb") as err:
        proc = children.start(
            ["nginx", "-c", str(conf), "-e", str(tmp / "nginx-error.log"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    for mode in H2_MODES:
        setup_cost.wait_listening(LISTEN["nginx", mode], proc, "nginx")
    return proc.pid


HAPROXY_H2 = """
global
    nbthread 1
    maxconn 9700
    log stdout format raw local0
defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind {tls_ip}:{tls_port} ssl crt {pem} alpn h2,http/1.1
    bind {h2c_ip}:{h2c_port} proto h2
    default_backend be
backend be
    server o0 {origin_ip}:{origin_port}
"""


def start_haproxy(children: Children, tmp: Path, pem: Path) -> int:
    """HAProxy in the foreground (``-db``), its log lines to a file as nginx's access log."""
    conf = tmp / "haproxy.cfg"
    conf.write_text(
        HAPROXY_H2.format(
            tls_ip=LISTEN["haproxy", "tls"][0],
            tls_port=LISTEN["haproxy", "tls"][1],
            h2c_ip=LISTEN["haproxy", "h2c"][0],
            h2c_port=LISTEN["haproxy", "h2c"][1],
            pem=pem,
            origin_ip=http_rps.ORIGIN[0],
            origin_port=http_rps.ORIGIN[1],
        )
    )
    check = subprocess.run(
        ["haproxy", "-c", "-q", "-f", str(conf)], capture_output=True, text=True, timeout=30
    )
    if check.returncode:
        raise RuntimeError(f"haproxy -c {conf}: {check.stderr.strip() or check.stdout.strip()}")
    with open(tmp / "haproxy-access.log", "wb") as out, open(tmp / "haproxy-stderr.log", "wb") as e:
        proc = children.start(["haproxy", "-db", "-f", str(conf)], stdout=out, stderr=e)
    try:
        for mode in H2_MODES:
            setup_cost.wait_listening(LISTEN["haproxy", mode], proc, "haproxy")
    except RuntimeError as e:
        raise RuntimeError(
            f"{e}; stderr: {(tmp / 'haproxy-stderr.log').read_text()[-1500:]}"
        ) from None
    return proc.pid


ORIGINPOOL_H2 = """
[[listen]]
address = "{tls_ip}:{tls_port}"
tls_cert = "{cert}"
tls_key = "{key}"
[[listen]]
address = "{h2c_ip}:{h2c_port}"
[admin]
address = "127.0.0.1:{admin}"
[egress]
mode = "connectx"
addresses = ["127.0.1.1"]
[[routes]]
host = "{host}"
origins = ["http://{origin_ip}:{origin_port}"]
[proxy]
workers = 1
[log]
format = "json"
level = "info"
"""


def start_originpool(children: Children, tmp: Path, cert: Path, key: Path) -> int:
    path = tmp / "originpool.toml"
    path.write_text(
        ORIGINPOOL_H2.format(
            tls_ip=LISTEN["originpool", "tls"][0],
            tls_port=LISTEN["originpool", "tls"][1],
            h2c_ip=LISTEN["originpool", "h2c"][0],
            h2c_port=LISTEN["originpool", "h2c"][1],
            cert=cert,
            key=key,
            admin=ADMIN,
            host=http_rps.HOST,
            origin_ip=http_rps.ORIGIN[0],
            origin_port=http_rps.ORIGIN[1],
        )
    )
    proc, _ = http_rps.serve_proxy(children, path, 1)
    return proc.pid


def write_certificate(tmp: Path) -> tuple[Path, Path, Path]:
    """A certificate for the route's name and 127.0.0.1 (h2load sends no SNI to an IP):
    (chain PEM, key PEM, both in one file as HAProxy's ``crt`` wants)."""
    import trustme  # the test extra; only this bench needs it at run time

    ca = trustme.CA()
    leaf = ca.issue_cert(http_rps.HOST, "127.0.0.1")
    cert, key, both = tmp / "site.pem", tmp / "site.key", tmp / "site-combined.pem"
    cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    both.write_bytes(key.read_bytes() + cert.read_bytes())
    return cert, key, both


# --- the benchmark ------------------------------------------------------------------------------


@dataclass
class Target:
    proxy: str
    mode: str
    pid: int
    runs: list[H2loadRun] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # per request, the proxy's tree

    @property
    def address(self) -> tuple[str, int]:
        return LISTEN[self.proxy, "tls" if self.mode == "h1" else self.mode]

    def median_rps(self) -> float:
        return statistics.median(r.rps for r in self.runs)


def available(skip: Sequence[str]) -> tuple[list[str], list[str]]:
    """The proxies measured, and a note for each one left out (a missing package is a skip)."""
    names, notes = [], []
    for name in PROXIES:
        if name in skip:
            notes.append(f"{name}: skipped (--no-{name})")
        elif name != "originpool" and shutil.which(name) is None:
            pkg = "nginx-light" if name == "nginx" else name
            notes.append(f"{name}: not installed, skipped (apt-get install -y {pkg})")
        else:
            names.append(name)
    return names, notes


def run(args: argparse.Namespace) -> dict[str, Any]:
    skip = [n for n in PROXIES if getattr(args, f"no_{n}")]
    names, notes = available(skip)
    netns.unshare_process(port_range=(20000, 60999))
    tmp = Path(tempfile.mkdtemp(prefix="originpool-h2rps-"))
    children = Children()
    targets: list[Target] = []
    try:
        cert, key, both = write_certificate(tmp)
        if shutil.which("nginx") is not None:
            body = http_rps.BODY.decode().replace("\n", "\\n")
            conf = http_rps.NGINX_ORIGIN.format(
                ip=http_rps.ORIGIN[0], port=http_rps.ORIGIN[1], body=body
            )
            http_rps.start_nginx(children, tmp, "origin", conf, http_rps.ORIGIN)
            origin_kind = "nginx 1 worker, return 200"
        else:
            http_rps.start_python_origin(children)
            origin_kind = "python (uvloop) fixed response; install nginx for a faster origin"
        for name in names:
            if name == "nginx":
                pid = start_nginx(children, tmp, cert, key)
            elif name == "haproxy":
                pid = start_haproxy(children, tmp, both)
            else:
                pid = start_originpool(children, tmp, cert, key)
            targets += [Target(name, mode, pid) for mode in MODES]
        order = sorted(targets, key=lambda t: (MODES.index(t.mode), PROXIES.index(t.proxy)))
        for t in order:  # warm-up: upstream keep-alive filled, code paths hot
            run_h2load(t.address, t.mode, args.warmup, args.clients, args.streams)
        for r in range(args.rounds):
            for t in order:
                with setup_cost.cpu_meter(t.pid) as cpu:
                    result = run_h2load(
                        t.address, t.mode, args.duration, args.clients, args.streams
                    )
                t.runs.append(result)
                t.cpu_us.append(cpu["total"] / max(result.done, 1) * 1e6)
                if not args.json:
                    flag = "" if result.clean else f"  NOT CLEAN {result}"
                    print(
                        f"  round {r + 1} {LABELS[t.proxy]:<20} {t.mode:<4}"
                        f" {result.rps:>10,.0f} req/s  {t.cpu_us[-1]:6.1f} us CPU/req{flag}",
                        flush=True,
                    )
    finally:
        children.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return summarise(args, targets, origin_kind, notes)


def summarise(
    args: argparse.Namespace, targets: list[Target], origin_kind: str, notes: list[str]
) -> dict[str, Any]:
    by = {(t.proxy, t.mode): t for t in targets}
    rows: dict[str, dict[str, Any]] = {}
    for t in targets:
        row: dict[str, Any] = {
            "proxy": t.proxy,
            "mode": t.mode,
            "rps_median": round(t.median_rps(), 1),
            "cpu_us_per_request_median": round(statistics.median(t.cpu_us), 1),
            "all_clean": all(r.clean for r in t.runs),
            "protocol": sorted({r.protocol for r in t.runs}),
            "runs": [asdict(r) for r in t.runs],
        }
        nginx = by.get(("nginx", t.mode))
        if nginx is not None and nginx.median_rps() > 0:
            row["rps_vs_nginx"] = round(t.median_rps() / nginx.median_rps(), 3)
        rows[f"{t.proxy}/{t.mode}"] = row
    summary: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "loadavg_after": os.getloadavg(),
        },
        "h2load": {
            "clients": args.clients,
            "streams": args.streams,
            "duration_s": args.duration,
            "rounds": args.rounds,
        },
        "origin": origin_kind,
        "notes": notes,
        "targets": rows,
    }
    checks = []
    for mode in H2_MODES:
        row = rows.get(f"originpool/{mode}")
        if row is not None and "rps_vs_nginx" in row:
            ratio = row["rps_vs_nginx"] if row["all_clean"] else 0.0
            checks.append({"mode": mode, "ratio": ratio, "pass": ratio >= TARGET_RATIO})
    if checks:
        summary["target"] = {
            "what": f"originpool 1 worker >= {TARGET_RATIO}x nginx 1 worker over h2",
            "checks": checks,
        }
    return summary


def report(summary: dict[str, Any]) -> None:
    h = summary["h2load"]
    print()
    print(
        f"h2load -t1 -c{h['clients']} -m{h['streams']} -D{h['duration_s']}, "
        f"{h['rounds']} interleaved rounds, medians; origin: {summary['origin']}"
    )
    print(f"{'proxy':<22}{'mode':<6}{'req/s':>12}{'CPU us/req':>12}{'vs nginx':>10}  protocol")
    for row in summary["targets"].values():
        ratio = row.get("rps_vs_nginx")
        flag = "" if row["all_clean"] else "  (not clean: failures or no h2)"
        print(
            f"{LABELS[row['proxy']]:<22}{row['mode']:<6}{row['rps_median']:>12,.0f}"
            f"{row['cpu_us_per_request_median']:>12.1f}"
            f"{'' if ratio is None else f'{ratio:.3f}':>10}  {','.join(row['protocol'])}{flag}"
        )
    for note in summary["notes"]:
        print(f"note: {note}")
    target = summary.get("target")
    if target is None:
        print("target: not measured (nginx or originpool missing)")
    else:
        for c in target["checks"]:
            label = "PASS" if c["pass"] else "MISS"
            print(f"{label}: {target['what']} ({c['mode']}): {c['ratio']:.3f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per h2load run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per target")
    parser.add_argument("--clients", type=int, default=10, help="h2load -c (connections)")
    parser.add_argument("--streams", type=int, default=10, help="h2load -m (streams each)")
    for name in PROXIES:
        parser.add_argument(f"--no-{name}", action="store_true", help=f"leave {name} out")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args(argv)
    if shutil.which("h2load") is None:
        print("h2load is not installed: apt-get install -y nghttp2-client", file=sys.stderr)
        return 2
    reason = netns.can_create()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    bounds = (
        1 <= args.rounds <= 100,
        1 <= args.duration <= 600,
        1 <= args.warmup <= 60,
        1 <= args.clients <= 1000,
        1 <= args.streams <= 1000,
    )
    if not all(bounds):
        parser.error(
            "--rounds in 1..100, --duration in 1..600, --warmup in 1..60, "
            "--clients and --streams in 1..1000"
        )
    summary = run(args)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        report(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
