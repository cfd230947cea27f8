#!/usr/bin/env python3
"""Render one replica's originpool config: its own slice of the ephemeral port range.

Why this exists: replicas that use the *same* egress IPs must not hand out the same source
ports, or their connections to one destination collide (across hosts sharing an IP) and
none of them can tell how much of the range is really theirs. ``IP_LOCAL_PORT_RANGE``
windows solve it without any coordination at run time, if each replica gets a disjoint
window. A StatefulSet gives every pod a stable ordinal, so the window is a pure function of
(ordinal, slices, range) and survives restarts and rescheduling:

    slice k of S over LO-HI: sizes differ by at most one, slices are contiguous, in order,
    disjoint, and their union is exactly LO-HI (replicas x slice = range when S = replicas).

The init container runs this before ``originpool serve``; it refuses (exit 2) rather than
render something that would overlap another replica:

* ordinal >= slices (a replica without a slice of its own would reuse someone else's);
* a template egress address written by hand instead of through ``${egress_addresses}``
  (it would carry no window, or a window that is not this replica's);
* a window outside the live ``ip_local_port_range`` (the kernel silently ignores such a
  window and uses the whole range: exactly the overlap this prevents);
* a rendered config that ``originpool check-config`` would reject (when ``proxy.config`` is
  importable, as it is in the image).

Template placeholders are ``${name}`` only (a bare ``$`` stays as it is, ``$${`` is a
literal ``${``), and an unknown one is an error rather than an empty string:

``${egress_addresses}``  a TOML array, every egress IP with this replica's window
``${window}``            ``LO-HI`` of this replica; ``${window_lo}``, ``${window_hi}``
``${ordinal}``, ``${slices}``, ``${pod_name}``, ``${pod_ip}``

Settings come from flags or, for the container, the environment: ``POD_NAME`` (ordinal is
its last ``-N``), ``POD_IP``, ``ORIGINPOOL_SLICES``, ``ORIGINPOOL_PORT_RANGE`` (``LO-HI``),
``ORIGINPOOL_EGRESS_IPS`` (comma or space separated) and/or ``ORIGINPOOL_EGRESS_IPS_FILE``
(one IP per line, ``#`` comments: a node-local list where each node has its own IPs).
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from string import Template
from types import ModuleType

LIVE_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
UNPRIVILEGED_PORT_START = 1024  # the range's low end may not go below this (EINVAL)


class BracedTemplate(Template):
    """``${name}`` only: TOML comments may mention ``$HOME`` without breaking the render."""

    pattern = r"""
    \$(?:
      (?P<escaped>\$)(?=\{) |
      \{(?P<braced>[_a-z][_a-z0-9]*)\} |
      (?P<named>(?!)) |
      (?P<invalid>\{)
    )
    """


class RenderError(ValueError):
    """A reason not to start this replica; printed as is, exit status 2."""


def parse_range(text: str) -> tuple[int, int]:
    """``"LO-HI"`` (or ``"LO HI"``, the sysctl's own spelling) -> ``(lo, hi)``."""
    parts = re.split(r"[\s-]+", text.strip())
    try:
        lo, hi = (int(p) for p in parts)
    except ValueError:
        raise RenderError(f"port range must be LO-HI, got {text!r}") from None
    if not UNPRIVILEGED_PORT_START <= lo <= hi <= 65535:
        raise RenderError(
            f"port range {lo}-{hi} must satisfy {UNPRIVILEGED_PORT_START} <= LO <= HI <= 65535 "
            "(the kernel refuses an ephemeral range below ip_unprivileged_port_start)"
        )
    return lo, hi


def slice_window(port_range: tuple[int, int], slices: int, index: int) -> tuple[int, int]:
    """Slice ``index`` of ``slices`` contiguous, disjoint windows covering ``port_range``.

    The first ``size % slices`` slices get one port more, so no port of the range is left
    out and no two slices differ by more than one port.
    """
    lo, hi = port_range
    size = hi - lo + 1
    if slices < 1:
        raise RenderError(f"slices must be >= 1, got {slices}")
    if slices > size:
        raise RenderError(f"{slices} slices of a {size}-port range would leave some empty")
    if not 0 <= index < slices:
        raise RenderError(
            f"ordinal {index} has no slice: only {slices} slices (0-{slices - 1}); raise "
            "ORIGINPOOL_SLICES (every replica restarts with a smaller window) before adding "
            "replicas, or two of them would share ports"
        )
    base, extra = divmod(size, slices)
    start = lo + index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0) - 1


def ordinal_of(pod_name: str) -> int:
    """A StatefulSet pod is ``<name>-<ordinal>``; the pod *name*, not the host name, which
    under ``hostNetwork`` is the node's."""
    match = re.fullmatch(r".*-([0-9]+)", pod_name)
    if not match:
        raise RenderError(f"pod name {pod_name!r} does not end in -<ordinal>")
    return int(match.group(1))


def read_ip_list(text: str) -> list[str]:
    """IPs separated by commas, spaces or lines; ``#`` starts a comment."""
    out: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        out += [item for item in re.split(r"[\s,]+", line) if item]
    return out


def egress_addresses(ips: Sequence[str], window: tuple[int, int]) -> str:
    """The TOML array for ``[egress] addresses``, each IP carrying this replica's window."""
    items: list[str] = []
    seen: set[str] = set()
    for text in ips:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            raise RenderError(f"egress IP {text!r} is not a numeric IPv4 or IPv6 address") from None
        if str(ip) in seen:
            continue  # the node file and the ConfigMap may both list it
        seen.add(str(ip))
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        items.append(f'"{host}:{window[0]}-{window[1]}"')
    if not items:
        raise RenderError(
            "no egress IPs: set ORIGINPOOL_EGRESS_IPS (or ORIGINPOOL_EGRESS_IPS_FILE); for the "
            "node's default source address with a window use 0.0.0.0 (or ::)"
        )
    return "[" + ", ".join(items) + "]"


def live_range() -> tuple[int, int] | None:
    """This network namespace's ``ip_local_port_range`` (the node's, under hostNetwork)."""
    try:
        low, high = LIVE_RANGE.read_text().split()
    except OSError:
        return None
    return int(low), int(high)


def render(
    template: str,
    *,
    ordinal: int,
    slices: int,
    port_range: tuple[int, int],
    egress_ips: Sequence[str],
    pod_name: str = "",
    pod_ip: str = "127.0.0.1",
) -> str:
    """The replica's config text; raises :class:`RenderError` instead of a risky config."""
    window = slice_window(port_range, slices, ordinal)
    values = {
        "egress_addresses": egress_addresses(egress_ips, window),
        "window": f"{window[0]}-{window[1]}",
        "window_lo": str(window[0]),
        "window_hi": str(window[1]),
        "ordinal": str(ordinal),
        "slices": str(slices),
        "pod_name": pod_name,
        "pod_ip": pod_ip,
    }
    try:
        return BracedTemplate(template).substitute(values)
    except KeyError as e:
        raise RenderError(
            f"unknown placeholder ${{{e.args[0]}}} (known: {', '.join(sorted(values))})"
        ) from None
    except ValueError as e:
        raise RenderError(f"template: {e} (placeholders are ${{name}}, lower case)") from None


def check(
    text: str,
    source: str,
    window: tuple[int, int],
    live: tuple[int, int] | None,
    base_dir: Path | None = None,
) -> list[str]:
    """Validate as ``originpool check-config`` does, then the slicing-specific rules.

    Returns notes for stderr (what could not be checked); raises on anything wrong.
    """
    if live is not None and not (live[0] <= window[0] and window[1] <= live[1]):
        raise RenderError(
            f"window {window[0]}-{window[1]} is not inside this node's ip_local_port_range "
            f"{live[0]}-{live[1]}: the kernel clamps a window to the range and ignores one "
            "wholly outside it (then the whole range is used, overlapping other replicas); "
            "make ORIGINPOOL_PORT_RANGE lie inside the node's sysctl"
        )
    cfg = _config_module()
    if cfg is None:
        return [f"{source}: not validated: the originpool package is not importable here"]
    try:
        parsed = cfg.parse(text, source, base_dir=base_dir)
    except cfg.ConfigError as e:
        raise RenderError(str(e)) from None
    for i, egress in enumerate(parsed.egress.addresses):
        if egress.window != window:
            raise RenderError(
                f"{source}: egress.addresses[{i}] = {str(egress)!r} does not carry this "
                f"replica's window {window[0]}-{window[1]}: write addresses = "
                "${egress_addresses} in the template, or replicas will share ports"
            )
    return []


def _config_module() -> ModuleType | None:
    """``proxy.config`` from the installed package (the image) or from this checkout."""
    try:
        return importlib.import_module("proxy.config")
    except ImportError:
        pass
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / "proxy" / "config.py").is_file():
        return None
    sys.path.insert(0, str(checkout))
    try:
        return importlib.import_module("proxy.config")
    except ImportError:
        return None


def write_atomically(path: Path, text: str) -> None:
    """A reader (``serve``, or a SIGHUP reload) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--template", required=True, type=Path, help="config template (TOML)")
    p.add_argument("--out", type=Path, help="where to write; default: stdout")
    p.add_argument("--pod-name", default=env("POD_NAME", ""), help="default: $POD_NAME")
    p.add_argument("--ordinal", type=int, help="default: the last -N of --pod-name")
    p.add_argument("--pod-ip", default=env("POD_IP", "127.0.0.1"), help="default: $POD_IP")
    p.add_argument("--slices", type=int, default=int(env("ORIGINPOOL_SLICES", "0") or 0))
    p.add_argument("--port-range", default=env("ORIGINPOOL_PORT_RANGE", ""), help="LO-HI")
    p.add_argument("--egress-ips", default=env("ORIGINPOOL_EGRESS_IPS", ""))
    p.add_argument("--egress-ips-file", default=env("ORIGINPOOL_EGRESS_IPS_FILE", ""))
    p.add_argument(
        "--no-live-check",
        action="store_true",
        help="do not compare the window with this namespace's ip_local_port_range "
        "(for rendering somewhere other than the node the replica runs on)",
    )
    p.add_argument("--print-slices", action="store_true", help="print every slice and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not args.port_range:
            raise RenderError(
                "--port-range (or ORIGINPOOL_PORT_RANGE) is required, e.g. 32768-60999"
            )
        port_range = parse_range(args.port_range)
        if args.slices < 1:
            raise RenderError("--slices (or ORIGINPOOL_SLICES) must be >= 1")
        if args.print_slices:
            for k in range(args.slices):
                lo, hi = slice_window(port_range, args.slices, k)
                print(f"ordinal {k}: {lo}-{hi} ({hi - lo + 1} ports per egress IP and destination)")
            return 0
        ordinal = args.ordinal if args.ordinal is not None else ordinal_of(args.pod_name)
        ips = read_ip_list(args.egress_ips)
        if args.egress_ips_file:
            ips += read_ip_list(Path(args.egress_ips_file).read_text())
        text = render(
            args.template.read_text(),
            ordinal=ordinal,
            slices=args.slices,
            port_range=port_range,
            egress_ips=ips,
            pod_name=args.pod_name,
            pod_ip=args.pod_ip,
        )
        window = slice_window(port_range, args.slices, ordinal)
        target = args.out or args.template
        live = None if args.no_live_check else live_range()
        for note in check(text, str(target), window, live, target.resolve().parent):
            print(f"render-config: {note}", file=sys.stderr)
    except (RenderError, OSError) as e:
        print(f"render-config: {e}", file=sys.stderr)
        return 2
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_atomically(args.out, text)
        print(f"{args.out}: ordinal {ordinal} of {args.slices}, window {window[0]}-{window[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
