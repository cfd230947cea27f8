"""deploy/: every file a user installs is checked here, because packaging rots silently.

Nothing in deploy/ runs in the other tests, so a renamed admin path, a drain timeout raised
past the unit's stop timeout or a template that no longer validates would only be found on
someone's production host. What can run here runs (check-config on every config, the
Kubernetes renderer, the egress script, ``systemd-analyze verify``, the HEALTHCHECK command);
what cannot (no container engine, no cluster) is parsed and held to the facts it depends on.

The central claim of deploy/kubernetes, that replicas with disjoint windows on one egress IP
never collide and together reach the whole range, is shown with two real processes in a
128-port namespace.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import RANGE, R

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
RENDER = K8S / "render-config.py"
TEMPLATE = K8S / "originpool.toml.tmpl"
UNIT = DEPLOY / "systemd" / "originpool.service"
SYSCTL = DEPLOY / "sysctl.d" / "60-originpool.conf"
DOCKERFILE = DEPLOY / "Dockerfile"
EGRESS_SH = DEPLOY / "egress-ips.sh"
EXAMPLE = DEPLOY / "originpool.toml"

try:
    import yaml  # optional: structural manifest checks when PyYAML happens to be installed
except ImportError:
    yaml = None


def env() -> dict[str, str]:
    """Subprocesses import this checkout, whether or not the package is installed."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("timeout", 60)
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env(), **kwargs)


def check_config(path: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "proxy.cli", "check-config", str(path)])


def load_render() -> ModuleType:
    """render-config.py has a hyphen (it is a command in the image), so import it by path."""
    spec = importlib.util.spec_from_file_location("render_config", RENDER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kustomize_literals() -> dict[str, str]:
    """``- NAME=value`` lines of kustomization.yaml's configMapGenerator literals."""
    text = (K8S / "kustomization.yaml").read_text()
    return dict(re.findall(r"^\s*-\s*(ORIGINPOOL_[A-Z_]+)=(\S*)\s*$", text, re.M))


def example_drain() -> float:
    return float(tomllib.loads(EXAMPLE.read_text())["timeouts"]["drain"])


# -- configs ----------------------------------------------------------------------------------


def test_check_config_accepts_every_toml_in_deploy() -> None:
    found = sorted(DEPLOY.rglob("*.toml"))
    assert EXAMPLE in found
    for path in found:
        proc = check_config(path)
        assert proc.returncode == 0, f"{path}: {proc.stderr}"
        assert ": ok (" in proc.stdout


@pytest.mark.parametrize(
    ("lo", "hi", "slices"),
    [(32768, 60999, 4), (1024, 65535, 4), (40000, 40127, 2), (40000, 40127, 3), (1024, 1030, 7)],
)
def test_slices_are_disjoint_contiguous_and_cover_the_range(lo: int, hi: int, slices: int) -> None:
    render = load_render()
    windows = [render.slice_window((lo, hi), slices, k) for k in range(slices)]
    assert windows[0][0] == lo and windows[-1][1] == hi
    for (_a_lo, a_hi), (b_lo, _b_hi) in itertools.pairwise(windows):
        assert b_lo == a_hi + 1  # no gap, no overlap
    sizes = [w_hi - w_lo + 1 for w_lo, w_hi in windows]
    assert sum(sizes) == hi - lo + 1
    assert max(sizes) - min(sizes) <= 1


def test_render_refuses_what_would_overlap(tmp_path: Path) -> None:
    render = load_render()
    with pytest.raises(render.RenderError, match="ordinal 4 has no slice"):
        render.slice_window((32768, 60999), 4, 4)
    with pytest.raises(render.RenderError, match="ip_unprivileged_port_start"):
        render.parse_range("80-1000")
    with pytest.raises(render.RenderError, match="unknown placeholder"):
        render.render(
            "x = ${windwo}", ordinal=0, slices=1, port_range=(1024, 2047), egress_ips=["1.2.3.4"]
        )
    assert render.ordinal_of("originpool-12") == 12
    # a bare $ in a TOML comment is left alone; only ${name} is a placeholder
    out = render.render(
        "# costs $5\nw = '${window}'",
        ordinal=1,
        slices=2,
        port_range=(1024, 2047),
        egress_ips=["::"],
    )
    assert out == "# costs $5\nw = '1536-2047'"

    # an egress address written by hand would carry no window: refused by the command
    bad = tmp_path / "bad.tmpl"
    bad.write_text(
        TEMPLATE.read_text().replace(
            "addresses = ${egress_addresses}", 'addresses = ["198.51.100.9", "198.51.100.10:1-2"]'
        )
    )
    flags = "--ordinal 0 --slices 4 --port-range 32768-60999 --egress-ips 198.51.100.10"
    proc = run(
        [sys.executable, str(RENDER), f"--template={bad}", *flags.split(), "--no-live-check"]
    )
    assert proc.returncode == 2
    assert "does not carry this replica's window" in proc.stderr


def render_replica(tmp_path: Path, ordinal: int, lit: dict[str, str], *extra: str) -> Path:
    """What the init container does, with the pod's environment from the manifests."""
    out = tmp_path / f"originpool-{ordinal}" / "originpool.toml"
    proc = subprocess.run(
        [sys.executable, str(RENDER), f"--template={TEMPLATE}", f"--out={out}", *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**env(), **lit, "POD_NAME": f"originpool-{ordinal}", "POD_IP": "10.0.0.5"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # nothing left unvalidated
    return out


def test_rendered_replica_configs_are_valid_and_disjoint(ns, tmp_path: Path) -> None:
    from proxy.config import load

    lit = kustomize_literals()
    slices = int(lit["ORIGINPOOL_SLICES"])
    lo, hi = (int(x) for x in lit["ORIGINPOOL_PORT_RANGE"].split("-"))
    ips = set(lit["ORIGINPOOL_EGRESS_IPS"].split(","))
    for ip in ips:  # check-config refuses egress IPs the host lacks: be the node that has them
        ns.ip("addr", "add", f"{ip}/32", "dev", "lo")
    replicas = int(
        re.search(r"^\s*replicas:\s*(\d+)", (K8S / "statefulset.yaml").read_text(), re.M)[1]
    )
    assert 1 <= replicas <= slices, "a replica without a slice refuses to start"

    windows: list[tuple[int, int]] = []
    for ordinal in range(slices):
        path = render_replica(tmp_path, ordinal, lit, "--no-live-check")
        proc = check_config(path)
        assert proc.returncode == 0, proc.stderr
        config = load(path)
        assert config.admin == ("10.0.0.5", 9090)
        assert {e.ip for e in config.egress.addresses} == ips  # every replica: the same IPs
        own = {e.window for e in config.egress.addresses}
        assert len(own) == 1, "one window per replica, on every egress IP"
        windows.append(own.pop())
    ports = [p for w_lo, w_hi in windows for p in range(w_lo, w_hi + 1)]
    assert len(ports) == len(set(ports)), f"windows overlap: {windows}"
    assert set(ports) == set(range(lo, hi + 1)), "replicas x slice = range"


def test_render_checks_the_live_port_range(ns, tmp_path: Path) -> None:
    """Under hostNetwork the init container sees the node's range; a window outside it would
    be ignored by the kernel (the whole range used), so the replica must not start."""
    lit = {"ORIGINPOOL_SLICES": "2", "ORIGINPOOL_EGRESS_IPS": "127.0.1.1"}
    inside = {**lit, "ORIGINPOOL_PORT_RANGE": f"{RANGE[0]}-{RANGE[1]}"}
    path = render_replica(tmp_path, 1, inside)
    assert '"127.0.1.1:40064-40127"' in path.read_text()

    outside = {**lit, "ORIGINPOOL_PORT_RANGE": "30000-30127"}
    proc = subprocess.run(
        [sys.executable, str(RENDER), f"--template={TEMPLATE}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**env(), **outside, "POD_NAME": "originpool-0", "POD_IP": "10.0.0.5"},
    )
    assert proc.returncode == 2
    assert "not inside this node's ip_local_port_range 40000-40127" in proc.stderr


# -- two replicas on one egress IP ------------------------------------------------------------

CHILD = r"""
import asyncio, errno, json, socket, sys
from pool.connectx import connectx
from pool.egress import EgressExhausted, EgressSet

spec, dst_ip, dst_port, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

async def main() -> None:
    egress = EgressSet([spec])
    held, ports, exhausted = [], [], None
    while len(held) < limit:  # bounded: a window that leaked would show as > 64, not hang
        try:
            sock, slot = await egress.connect((dst_ip, dst_port), timeout=5)
        except EgressExhausted as e:
            exhausted = str(e)
            break
        held.append((sock, slot))
        ports.append(sock.getsockname()[1])
    # the pool's count says full; ask the kernel too, through the same window
    lo, hi = egress.egresses[0].window
    probe = socket.socket()
    try:
        connectx(probe, (egress.egresses[0].ip, 0), (dst_ip, dst_port), port_range=(lo, hi))
        kernel_full = False
    except OSError as e:
        kernel_full = e.errno == errno.EADDRNOTAVAIL
    finally:
        probe.close()
    report = {"ports": ports, "exhausted": exhausted, "kernel_full": kernel_full}
    print("REPORT " + json.dumps(report), flush=True)  # log lines share stdout
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

asyncio.run(main())
"""


def read_report(proc: subprocess.Popen, deadline: float) -> dict:
    """The child's ``REPORT {json}`` line (its log lines share stdout), or fail at the
    deadline: a stuck child must fail the test, not hang the run."""
    fd = proc.stdout.fileno()
    buf = b""
    while True:
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.startswith(b"REPORT "):
                return json.loads(line[len(b"REPORT ") :])
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(0.0, left))
        if not ready:
            raise AssertionError(f"child {proc.pid}: no report within the time limit")
        chunk = os.read(fd, 65536)
        if not chunk:
            err = proc.stderr.read().decode() if proc.poll() is not None else ""
            raise AssertionError(f"child {proc.pid} closed stdout: {err}")
        buf += chunk


def test_two_processes_with_disjoint_windows_share_one_egress_ip(ns, listeners) -> None:
    dst = listeners.add("127.0.2.1", 9000)  # never accepts: every connection stays open
    half = R // 2
    windows = [(RANGE[0], RANGE[0] + half - 1), (RANGE[0] + half, RANGE[1])]
    children: list[subprocess.Popen] = []
    try:
        for lo, hi in windows:  # both start at once: they connect concurrently
            children.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        CHILD,
                        f"127.0.1.1:{lo}-{hi}",
                        dst[0],
                        str(dst[1]),
                        str(4 * R),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=ROOT,
                    env=env(),
                )
            )
        deadline = time.monotonic() + 60
        reports = [read_report(child, deadline) for child in children]

        seen: set[int] = set()
        for (lo, hi), report in zip(windows, reports, strict=True):
            ports = report["ports"]
            assert len(ports) == half, report
            assert all(lo <= p <= hi for p in ports), f"port outside {lo}-{hi}: {ports}"
            assert len(set(ports)) == half
            assert report["exhausted"] and report["kernel_full"], report
            assert not seen & set(ports), "the two processes collided"
            seen |= set(ports)
        assert seen == set(range(RANGE[0], RANGE[1] + 1)), "together: the full range"

        # while both hold their sockets, `originpool ports` sees one pair, full
        census = run([sys.executable, "-m", "proxy.cli", "ports", "--json", "--proto", "tcp"])
        assert census.returncode == 0, census.stderr
        pairs = [
            p
            for p in json.loads(census.stdout)["pairs"]
            if p["src"] == "127.0.1.1" and p["dst"] == "127.0.2.1:9000"
        ]
        assert len(pairs) == 1 and pairs[0]["established"] == R and pairs[0]["capacity"] == R

        for child in children:
            child.stdin.write(b"\n")
            child.stdin.flush()
        for child in children:
            assert child.wait(timeout=20) == 0, child.stderr.read().decode()
    finally:
        for child in children:  # only our own children, by their PIDs
            if child.poll() is None:
                child.kill()
                child.wait(timeout=10)


# -- sysctl -----------------------------------------------------------------------------------


def sysctl_settings() -> list[tuple[str, str, bool, list[str]]]:
    """(key, value, optional, comment lines just above) for every setting in the file."""
    out: list[tuple[str, str, bool, list[str]]] = []
    comments: list[str] = []
    for line in SYSCTL.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith(("#", ";")):
            comments.append(stripped)
        elif not stripped:
            comments = []
        else:
            key, _, value = stripped.partition("=")
            optional = key.startswith("-")
            out.append((key.strip().lstrip("-"), value.strip(), optional, comments))
            comments = []
    return out


def test_sysctl_file_is_commented_and_consistent() -> None:
    settings = sysctl_settings()
    keys = {key for key, *_ in settings}
    assert {
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_tw_reuse",
    } <= keys
    text = SYSCTL.read_text()
    assert "fs.file-max" in text and "fs.nr_open" in text
    for key, _value, optional, comments in settings:
        assert len(comments) >= 2, f"{key}: say why, in a comment right above it"
        proc_path = Path("/proc/sys") / key.replace(".", "/")
        assert optional or proc_path.exists(), f"{key}: unknown here; prefix with '-' if optional"

    values = {key: value for key, value, *_ in settings}
    lo, hi = (int(x) for x in values["net.ipv4.ip_local_port_range"].split())
    assert 1024 <= lo < hi <= 65535  # below ip_unprivileged_port_start the write fails
    assert values["net.ipv4.tcp_tw_reuse"] == "1"

    from pool.kernel import parse_port_list

    reserved = parse_port_list(values["net.ipv4.ip_local_reserved_ports"])
    example = tomllib.loads(EXAMPLE.read_text())
    listen = example["listen"] if isinstance(example["listen"], list) else [example["listen"]]
    own = {int(item["address"].rsplit(":", 1)[1]) for item in listen}
    own.add(int(example["admin"]["address"].rsplit(":", 1)[1]))
    assert own <= reserved, "the proxy's own listeners must be reserved"

    # the Kubernetes slicing must lie inside the range this file sets
    k_lo, k_hi = (int(x) for x in kustomize_literals()["ORIGINPOOL_PORT_RANGE"].split("-"))
    assert lo <= k_lo <= k_hi <= hi


def test_sysctl_values_are_accepted_by_the_kernel(ns) -> None:
    """Write every per-namespace net.* setting into a fresh namespace: none is refused."""
    written = 0
    for key, value, optional, _comments in sysctl_settings():
        path = Path("/proc/sys") / key.replace(".", "/")
        if not key.startswith(("net.ipv4.", "net.core.")) or (optional and not path.exists()):
            continue
        ns.set_sysctl(key, value)
        assert path.read_text().split() == value.replace(",", " ").split() or key.endswith(
            "reserved_ports"
        )
        written += 1
    assert written >= 4
    # and the whole file as the boot-time loader applies it (in this namespace: a child is
    # born in the test thread's namespace, and /proc/sys/net is per namespace)
    loader = Path("/lib/systemd/systemd-sysctl")
    if loader.exists():
        proc = subprocess.run(
            [str(loader), str(SYSCTL)], capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == 0 and not proc.stdout + proc.stderr, proc.stderr
        assert Path("/proc/sys/net/ipv4/tcp_tw_reuse").read_text().strip() == "1"


# -- systemd ----------------------------------------------------------------------------------


def unit_directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|min)?", value)
    assert match, value
    return float(match[1]) * (60 if match[2] == "min" else 1)


def test_systemd_unit_directives() -> None:
    d = unit_directives()
    one = {k: v[-1] for k, v in d.items()}
    assert one["Type"] == "notify"  # READY=1 from the app (tests/test_sdnotify.py)
    assert one["NotifyAccess"] == "main"  # the master speaks for its workers
    assert "ExecStartPost" not in d  # no polling of /readyz: the app says when it is ready
    assert one["KillSignal"] == "SIGTERM"
    assert seconds(one["TimeoutStopSec"]) > example_drain()
    assert any("kill -HUP $MAINPID" in v for v in d["ExecReload"])
    assert one["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert one["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert set(one["RestrictAddressFamilies"].split()) == {
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
        "AF_UNIX",
    }
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables"):
        assert one[key] == "yes", key
    assert one["ProtectSystem"] == "strict"
    assert int(one["LimitNOFILE"]) >= 65536
    # ProcSubset=pid would hide /proc/sys, where the pool reads the port range
    assert "ProcSubset" not in one
    assert any("check-config" in v for v in d["ExecStartPre"])


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed: unit checked by directives only")
    # verify insists that every Exec*= binary exists: stand-ins for the ones not installed
    text = UNIT.read_text()
    for path in sorted(set(re.findall(r"^Exec\w+=[-@:+!]*(/\S+)", text, re.M))):
        if not os.access(path, os.X_OK):
            stub = tmp_path / "bin" / path.strip("/").replace("/", "_")
            stub.parent.mkdir(exist_ok=True)
            stub.write_text("#!/bin/sh\n")
            stub.chmod(0o755)
            text = text.replace(path, str(stub))
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    proc = subprocess.run(
        [exe, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    # warnings (an unknown key, a value it cannot parse) exit 0: any output counts
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), (
        proc.stdout + proc.stderr
    )


# -- Dockerfile -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        pending += " " + stripped
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def test_dockerfile_key_instructions() -> None:
    steps = dockerfile_instructions()
    kinds = [k for k, _ in steps]
    froms = [a for k, a in steps if k == "FROM"]
    assert froms and all("slim" in a for a in froms)
    assert "ADD" not in kinds, "COPY only: ADD fetches URLs and unpacks archives"
    user = [a for k, a in steps if k == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")
    exposed = {p for k, a in steps if k == "EXPOSE" for p in a.split()}
    assert {"8080/tcp", "9090/tcp"} <= exposed
    (health,) = [a for k, a in steps if k == "HEALTHCHECK"]
    assert "/healthz" in health and "curl" not in health and "urllib" in health
    (cmd,) = [a for k, a in steps if k == "CMD"]
    assert "/etc/originpool/originpool.toml" in cmd
    assert ("STOPSIGNAL", "SIGTERM") in steps
    # the build stage compiles the accelerator and fails rather than ship without it
    first, second = [i for i, k in enumerate(kinds) if k == "FROM"][:2]
    build = steps[first:second]
    assert any(k == "RUN" and "gcc" in a and "libc6-dev" in a for k, a in build)
    assert any(k == "RUN" and "ORIGINPOOL_REQUIRE_EXTENSIONS=1 pip wheel" in a for k, a in build)

    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for k, a in steps:
        if k != "COPY" or "--from" in a:
            continue
        *sources, _dest = [w for w in a.split() if not w.startswith("--")]
        for src in sources:
            assert not re.search(r"\.(pem|key|crt|p12)$|\.env$|secret", src), src
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert f"!{src.rstrip('/')}" in {i.rstrip("/") for i in ignore}, (
                f"COPY {src}: excluded from the build context by Dockerfile.dockerignore"
            )


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_dockerfile_healthcheck_command_works() -> None:
    """Run the HEALTHCHECK's own command against a listener that answers /healthz."""
    (health,) = [a for k, a in dockerfile_instructions() if k == "HEALTHCHECK"]
    argv = json.loads(health.split("CMD", 1)[1])
    assert argv[0] == "python"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        admin = f"127.0.0.1:{server.server_address[1]}"
        ok = subprocess.run(
            [sys.executable, *argv[1:]], env={**env(), "ORIGINPOOL_ADMIN": admin}, timeout=30
        )
        assert ok.returncode == 0
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:  # a port nobody listens on: unhealthy
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    bad = subprocess.run(
        [sys.executable, *argv[1:]],
        env={**env(), "ORIGINPOOL_ADMIN": dead},
        capture_output=True,
        timeout=30,
    )
    assert bad.returncode != 0


# -- Kubernetes manifests ---------------------------------------------------------------------


def manifests_text() -> str:
    return "\n".join(
        (K8S / f).read_text() for f in ("statefulset.yaml", "service.yaml", "pdb.yaml")
    )


def test_kubernetes_manifests_text() -> None:
    """Parser-free checks, so they run where PyYAML is not installed."""
    for path in K8S.glob("*.yaml"):
        text = path.read_text()
        assert "\t" not in text, f"{path.name}: tabs are not YAML indentation"
    text = manifests_text()
    for kind in ("StatefulSet", "Service", "PodDisruptionBudget"):
        assert re.search(rf"^kind: {kind}$", text, re.M), kind
    for needle in (
        "hostNetwork: true",
        "dnsPolicy: ClusterFirstWithHostNet",
        "path: /readyz",
        "path: /healthz",
        "preStop:",
        'prometheus.io/scrape: "true"',
        'prometheus.io/port: "9090"',
        "fieldPath: metadata.name",
        'command: ["originpool-render-config"]',
        "podManagementPolicy: Parallel",
    ):
        assert needle in text, needle
    grace = int(re.search(r"terminationGracePeriodSeconds: (\d+)", text)[1])
    pre_stop = int(re.search(r'command: \["sleep", "(\d+)"\]', text)[1])
    drain = tomllib.loads(
        load_render().render(
            TEMPLATE.read_text(), ordinal=0, slices=1, port_range=(1024, 65535), egress_ips=["::"]
        )
    )["timeouts"]["drain"]
    assert grace > pre_stop + drain, "SIGKILL must not cut the drain"
    kustomization = (K8S / "kustomization.yaml").read_text()
    for resource in re.findall(r"^  - (\S+\.yaml)$", kustomization, re.M):
        assert (K8S / resource).exists(), resource
    assert "- originpool.toml.tmpl" in kustomization


def test_kubernetes_manifests_structure() -> None:
    if yaml is None:
        pytest.skip("PyYAML is not installed: the parser-free checks above cover the manifests")
    docs = [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    sts = by_kind["StatefulSet"]
    pod = sts["spec"]["template"]
    spec = pod["spec"]
    assert spec["hostNetwork"] is True
    assert pod["metadata"]["labels"].items() >= sts["spec"]["selector"]["matchLabels"].items()
    (main,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"http": 8080, "admin": 9090}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["admin"])
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    (init,) = spec["initContainers"]
    assert {v["name"] for v in init["volumeMounts"]} >= {"config", "template"}
    pdb = by_kind["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    services = [d for d in docs if d["kind"] == "Service"]
    assert any(
        s["spec"].get("clusterIP") == "None" and s["metadata"]["name"] == sts["spec"]["serviceName"]
        for s in services
    )
    assert any(p["targetPort"] == "admin" for s in services for p in s["spec"]["ports"])


def test_kustomize_build() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: kustomization checked by text only")
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # generated ConfigMaps get hashed names, and the StatefulSet must refer to those
    names = re.findall(r"^  name: (originpool-(?:template|slicing)-[a-z0-9]+)$", out, re.M)
    assert len(names) == 2, names
    for name in names:
        assert out.count(name) >= 2, f"{name} is generated but not referenced"
    assert "image: originpool:" in out


# -- egress IPs -------------------------------------------------------------------------------


def test_egress_ips_script(ns) -> None:
    def sh(*args: str) -> subprocess.CompletedProcess:
        return run(["bash", str(EGRESS_SH), *args], timeout=30)

    added = sh("add", "lo", "198.51.100.10", "2001:db8::10")
    assert added.returncode == 0, added.stderr
    assert sh("add", "lo", "198.51.100.10").returncode == 0  # idempotent
    checked = sh("check", "198.51.100.10", "2001:db8::10")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("ok ") == 2
    missing = sh("check", "198.51.100.10", "198.51.100.99")
    assert missing.returncode == 1 and "MISSING   198.51.100.99" in missing.stdout
    assert sh("del", "lo", "198.51.100.10", "2001:db8::10").returncode == 0
    assert sh("check", "198.51.100.10").returncode == 1

    for kind, needle in (
        ("networkd", "Address=198.51.100.10/32"),
        ("netplan", '- "198.51.100.10/32"'),
        ("ifupdown", "address 198.51.100.10/32"),
    ):
        snippet = sh("persist", kind, "eth0", "198.51.100.10", "2001:db8::10")
        assert snippet.returncode == 0 and needle in snippet.stdout, snippet.stdout
    assert "dad-attempts 0" in sh("persist", "ifupdown", "eth0", "2001:db8::10").stdout
    assert sh("persist", "nmcli", "eth0", "1.2.3.4").returncode == 64


# -- the pieces together ----------------------------------------------------------------------


def test_rendered_config_serves_reports_ready_and_drains(ns, tmp_path: Path) -> None:
    """A replica as the init container renders it, started as the manifests and the unit
    start it: it tells systemd READY=1 and from then on the probes' paths answer, and
    SIGTERM (Kubernetes, systemd, docker stop) ends it with status 0."""
    lit = {
        "ORIGINPOOL_SLICES": "2",
        "ORIGINPOOL_PORT_RANGE": f"{RANGE[0]}-{RANGE[1]}",
        "ORIGINPOOL_EGRESS_IPS": "127.0.1.1",
    }
    out = tmp_path / "originpool-1" / "originpool.toml"
    proc = subprocess.run(
        [sys.executable, str(RENDER), f"--template={TEMPLATE}", f"--out={out}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**env(), **lit, "POD_NAME": "originpool-1", "POD_IP": "127.0.0.1"},
    )
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "serve.log").open("w")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # what systemd listens on
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)  # a bound on a stuck start, not a wait: recv returns on arrival
    server = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(out)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**env(), "NOTIFY_SOCKET": str(tmp_path / "notify")},
    )
    try:
        assert b"READY=1" in notify.recv(4096).split(b"\n")
        # ready means ready: the probes answer at once, no retrying
        assert wait_http("http://127.0.0.1:9090/readyz", 0) == 200
        assert wait_http("http://127.0.0.1:9090/healthz", 0) == 200
        os.kill(server.pid, signal.SIGTERM)
        assert server.wait(timeout=40) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if server.poll() is None:  # our own child only
            server.kill()
            server.wait(timeout=10)
        log.close()
        notify.close()


def wait_http(url: str, seconds: float) -> int:
    """Poll until the URL answers 200 (what a readiness probe does), bounded in time."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
