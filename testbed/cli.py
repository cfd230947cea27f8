"""``originpool testbed``'s command line: options, their checks, and which scenario runs.

Apart from :mod:`testbed.run` (the ramp's orchestrator) so that each module holds one
job: this one turns arguments into :class:`testbed.run.Options`, refuses nonsensical
combinations before anything starts (naming the option), and hands the run to the scenario's
class (:mod:`testbed.scenarios`), which knows its own defaults, checks, report and plot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testbed import procs
from testbed.procs import ChildFailed
from testbed.run import (
    MODES,
    ROUTE_HOST,
    SESSIONS_PER_PROCESS,
    Options,
    Ui,
    not_root,
)
from testbed.scenarios.base import Scenario


def _port_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    try:
        low, high = int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO-HI, e.g. 40000-40999") from None
    if not sep or not 1024 <= low <= high <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1024 <= LO <= HI <= 65535")
    return low, high


def _positive(kind: type) -> Any:
    def check(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: not a number") from None
        if value <= 0 and not (kind is float and value == 0):
            raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
        return value

    return check


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The testbed's options, shared by ``originpool testbed`` and ``python -m``."""
    d = Options()
    from testbed.scenario_options import scenarios

    registry = scenarios()
    parser.add_argument(
        "--scenario",
        choices=tuple(registry),
        default="ramp",
        help="; ".join(f"{name}: {cls.summary}" for name, cls in registry.items())
        + " (default ramp)",
    )
    parser.add_argument(
        "--mode",
        choices=(*MODES, "all"),
        default=None,
        help="the proxy's egress mode to measure (default: all three in turn for ramp, "
        "connectx for the other scenarios)",
    )
    parser.add_argument(
        "--egress", type=_positive(int), default=d.egress, help="egress IPs E (default %(default)s)"
    )
    parser.add_argument(
        "--origins", type=_positive(int), default=d.origins, help="origins K (default %(default)s)"
    )
    parser.add_argument(
        "--port-range",
        type=_port_range,
        default=None,
        metavar="LO-HI",
        help="the namespace's ephemeral range: R = HI - LO + 1 (default 40000-40999; "
        "rotate: 40000-42999, so that one origin can hold every session while another is out)",
    )
    parser.add_argument(
        "--sessions",
        type=_positive(int),
        default=None,
        help=f"ramp: attempts N per mode (default {d.sessions})",
    )
    parser.add_argument(
        "--hold",
        type=_positive(float),
        default=None,
        help=f"ramp: seconds every session is held (default {d.hold:g})",
    )
    parser.add_argument(
        "--workers",
        type=_positive(int),
        default=d.workers,
        help="proxy worker processes (default %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive(int),
        default=None,
        help=f"ramp: handshakes in flight per client process (default {d.concurrency})",
    )
    parser.add_argument(
        "--timeout",
        type=_positive(float),
        default=d.timeout,
        help="seconds per client step (default %(default)s)",
    )
    parser.add_argument(
        "--client-processes",
        type=_positive(int),
        default=None,
        metavar="P",
        help="load client processes (default: one per 15,000 sessions, the open-file cap)",
    )
    parser.add_argument("--json", dest="json_path", metavar="FILE", help="write the figures")
    parser.add_argument(
        "--records",
        dest="records_path",
        metavar="FILE",
        help="write every attempt as a JSON line: mode, start, outcome, handshake ms, held",
    )
    parser.add_argument("--plot", dest="plot_path", metavar="FILE", help="write a PNG plot")
    parser.add_argument(
        "--origin-cmd",
        metavar="CMD",
        help="start your origin instead of ours, once per origin: 'CMD {host} {port}'",
    )
    parser.add_argument(
        "--proxy-cmd",
        metavar="CMD",
        help="measure another proxy: it must listen on 127.0.0.1:8080, route Host "
        f"{ROUTE_HOST} to the origins 127.0.2.1..K:9000 and may use 127.0.1.1..E as sources",
    )
    parser.add_argument(
        "--rate",
        type=_positive(float),
        help="churn: sessions arriving per second (default: limit / lifetime, so the steady "
        "state is the physical limit); storm, faults, rotate: the ramp's pace (default 1000)",
    )
    parser.add_argument(
        "--lifetime",
        type=_positive(float),
        help="churn: mean session lifetime in seconds, exponential (default 30)",
    )
    parser.add_argument(
        "--duration",
        type=_positive(float),
        help="churn: seconds of arrivals (default 120); storm, rotate: seconds the clients "
        "have to come back after a restart or a drain, and for the ramp (default 60)",
    )
    parser.add_argument(
        "--mix",
        type=_mix,
        metavar="CLOSE:FIN:RST",
        help="churn: shares of client closes: WebSocket Close handshake, TCP FIN without a "
        "Close, RST (SO_LINGER 0) (default 1:1:1)",
    )
    parser.add_argument(
        "--target",
        type=float,
        help="storm, rotate: sessions to hold before the restart, as a share of the limit "
        "(default 0.9); faults: before the first fault (default 0.5)",
    )
    parser.add_argument(
        "--storm-origins",
        type=int,
        metavar="N",
        help="storm: restart only the first N origins (default: all)",
    )
    parser.add_argument(
        "--tw-reuse",
        type=int,
        choices=(0, 1, 2),
        help="net.ipv4.tcp_tw_reuse in the namespace for churn/storm (default 0: as on real "
        "egress IPs; the kernel's 2 reuses TIME_WAIT only on loopback, which is all the "
        "testbed has)",
    )
    parser.add_argument(
        "--reload-signal",
        metavar="SIG",
        help="faults with --proxy-cmd: that proxy's reload signal, sent with its config "
        "unchanged (nginx: HUP; HAProxy -W: USR2); without it the reload step is n/a",
    )
    parser.add_argument(
        "--stop-signal",
        metavar="SIG",
        help="faults with --proxy-cmd: that proxy's graceful stop (default TERM; nginx: QUIT; "
        "HAProxy -W: USR1)",
    )
    parser.add_argument(
        "--reload-hold",
        type=_positive(float),
        help="faults with --proxy-cmd, rotate with nginx: seconds measured after a reload "
        "before going on (default 15: old workers end what they still hold)",
    )
    parser.add_argument(
        "--drain-over",
        type=_positive(float),
        metavar="SECONDS",
        help="rotate: the window over which originpool's admin API drains each origin's "
        "sessions (default 60)",
    )
    parser.add_argument("--seed", type=int, default=1, help="churn/storm random seed")
    parser.add_argument(
        "--progress",
        choices=("rich", "json"),
        default="rich",
        help="a progress bar and tables, or JSON lines (for scripts and tests)",
    )


def _mix(text: str) -> tuple[float, float, float]:
    from testbed.wsload import parse_mix

    try:
        return parse_mix(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def options_from_args(args: argparse.Namespace) -> Options:
    d = Options()
    from testbed.scenario_options import scenarios

    scenario = getattr(args, "scenario", "ramp")
    cls = scenarios()[scenario]
    mode = args.mode or cls.default_mode
    return Options(
        modes=MODES if mode == "all" else (mode,),
        egress=args.egress,
        origins=args.origins,
        port_range=args.port_range or cls.port_range or d.port_range,
        sessions=d.sessions if args.sessions is None else args.sessions,
        hold=d.hold if args.hold is None else args.hold,
        workers=args.workers,
        concurrency=d.concurrency if args.concurrency is None else args.concurrency,
        timeout=args.timeout,
        json_path=args.json_path,
        plot_path=args.plot_path,
        records_path=args.records_path,
        origin_cmd=args.origin_cmd,
        proxy_cmd=args.proxy_cmd,
        progress=args.progress,
        client_processes=args.client_processes or 0,
        scenario=scenario,
        rate=getattr(args, "rate", None),
        lifetime=getattr(args, "lifetime", None),
        duration=getattr(args, "duration", None),
        target=getattr(args, "target", None),
        storm_origins=getattr(args, "storm_origins", None),
        mix=getattr(args, "mix", None),
        tw_reuse=getattr(args, "tw_reuse", None),
        seed=getattr(args, "seed", 1),
        reload_signal=getattr(args, "reload_signal", None),
        stop_signal=getattr(args, "stop_signal", None),
        reload_hold=getattr(args, "reload_hold", None),
        drain_over=getattr(args, "drain_over", None),
    )


def given_options(args: argparse.Namespace) -> set[str]:
    """The options the user typed (argparse leaves the others None)."""
    from testbed.scenario_options import only_for

    return {name for name in only_for() if getattr(args, name, None) is not None}


def validate(options: Options) -> str | None:
    """What the namespace's addressing cannot express, in one sentence."""
    if options.egress > 254 or options.origins > 254:
        return "--egress and --origins must be at most 254 (one 127.0.x.0/24 each)"
    shards = options.client_processes or math.ceil(options.sessions / SESSIONS_PER_PROCESS)
    if shards > 256:
        return "--sessions: at most 256 client processes (127.3.0.0/16)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="originpool testbed",
        description="The WebSocket origin scenario end to end, in a namespace of its own.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_args(args)


def missing_extra() -> str | None:
    """The ``testbed`` extra's packages this install lacks, said once before anything runs
    (the proxy itself is installed without them)."""
    import importlib.util

    def installed(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ImportError:  # a finder that refuses it says so by raising
            return False

    missing = [m for m in ("rich", "matplotlib") if not installed(m)]
    if not missing:
        return None
    return (
        f"{' and '.join(missing)} not installed: the testbed's display and plots need the "
        "extra, pip install 'originpool[testbed]'"
    )


def run_args(args: argparse.Namespace) -> int:
    from testbed import scenario_options

    options = options_from_args(args)
    problem = (
        missing_extra()
        or validate(options)
        or scenario_options.validate(options, given_options(args))
    )
    if problem:
        print(f"originpool testbed: {problem}", file=sys.stderr)
        return 2
    with contextlib.suppress(BrokenPipeError):
        return scenario_options.scenario_of(options).execute()
    return 1


def run_scenario(scenario: Scenario) -> int:
    """One scenario in its own namespace; figures, JSON and plot at the end.
    Exit 0, 1 (it could not run to its end: the reason is printed), 2, 130 as ``run``."""
    from testbed import scenario_report

    if not_root():
        return 2
    opts = scenario.options
    ui = Ui(opts.progress)
    restore = procs.install_interrupt_handlers()
    figures: dict[str, Any] | None = None
    code = 0
    try:
        ui.say(
            f"originpool testbed --scenario {opts.scenario}: physical limit = {opts.egress} "
            f"egress IPs x {opts.size:,} ports x {opts.origins} origins = {opts.limit:,}"
        )
        ui.say(scenario.intro())
        with tempfile.TemporaryDirectory(prefix="originpool-testbed-") as tmp:
            mode = "proxy-cmd" if opts.proxy_cmd else opts.modes[0]
            try:
                figures = scenario.run(mode, ui, Path(tmp))
            except (ChildFailed, RuntimeError, OSError) as e:
                ui.say(f"originpool testbed --scenario {opts.scenario}: {e}")
                ui.event("error", error=str(e))
                code = 1
        if figures is not None:
            ui.scenario_done(figures, scenario.report_rows(figures["detail"]), scenario.reconnects)
    except KeyboardInterrupt:
        ui.scenario_end()
        ui.say("originpool testbed: interrupted; every process it started has been ended")
        ui.event("interrupted")
        code = 130
    finally:
        restore()
    if figures is not None:
        doc = scenario_report.public_doc(figures["doc"])
        if opts.json_path:
            Path(opts.json_path).write_text(json.dumps(doc, indent=1) + "\n")
            ui.say(f"figures: {opts.json_path}")
        if opts.plot_path:
            scenario.plot(doc, opts.plot_path)
            ui.say(f"plot: {opts.plot_path}")
    return code
