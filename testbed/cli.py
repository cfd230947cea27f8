"""``originpool testbed``'s command line: options, their checks, and which scenario runs.

Apart from :mod:`proxy.testbed.run` (the ramp's orchestrator) so that each module holds one
job: this one turns arguments into :class:`proxy.testbed.run.Options`, refuses nonsensical
combinations before anything starts (naming the option), and runs the ramp or a scenario
(:mod:`proxy.testbed.scenarios`, :mod:`proxy.testbed.faults`) with its figures, JSON and plot.
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

from proxy.testbed import procs
from proxy.testbed.procs import ChildFailed
from proxy.testbed.run import (
    MODES,
    ROUTE_HOST,
    SESSIONS_PER_PROCESS,
    Options,
    Ui,
    not_root,
    run,
)


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
    from proxy.testbed.scenarios import SCENARIOS

    parser.add_argument(
        "--scenario",
        choices=tuple(SCENARIOS),
        default="ramp",
        help="ramp: sessions until the wall, per egress mode (default); churn: sessions come "
        "and go at --rate, living --lifetime; storm: ramp to --target, restart the origins, "
        "clients reconnect; faults: reload, egress IP removed and re-added, an origin killed, "
        "the proxy stopped, with sessions held",
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
        default=d.port_range,
        metavar="LO-HI",
        help="the namespace's ephemeral range: R = HI - LO + 1 (default 40000-40999)",
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
        "state is the physical limit); storm: the ramp's pace (default 1000)",
    )
    parser.add_argument(
        "--lifetime",
        type=_positive(float),
        help="churn: mean session lifetime in seconds, exponential (default 30)",
    )
    parser.add_argument(
        "--duration",
        type=_positive(float),
        help="churn: seconds of arrivals (default 120); storm: seconds the clients have to "
        "come back after the restart, and for the ramp (default 60)",
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
        help="storm: sessions to hold before the restart, as a share of the limit (default "
        "0.9); faults: before the first fault (default 0.5)",
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
        help="faults with --proxy-cmd: seconds measured after the reload signal before new "
        "sessions and echoes (default 15: old workers end what they still hold)",
    )
    parser.add_argument("--seed", type=int, default=1, help="churn/storm random seed")
    parser.add_argument(
        "--progress",
        choices=("rich", "json"),
        default="rich",
        help="a progress bar and tables, or JSON lines (for scripts and tests)",
    )


def _mix(text: str) -> tuple[float, float, float]:
    from proxy.testbed.wsload import parse_mix

    try:
        return parse_mix(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def options_from_args(args: argparse.Namespace) -> Options:
    d = Options()
    scenario = getattr(args, "scenario", "ramp")
    mode = args.mode or ("all" if scenario == "ramp" else "connectx")
    return Options(
        modes=MODES if mode == "all" else (mode,),
        egress=args.egress,
        origins=args.origins,
        port_range=args.port_range,
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
    )


def given_options(args: argparse.Namespace) -> set[str]:
    """The options the user typed (argparse leaves the others None)."""
    from proxy.testbed.scenarios import ONLY_FOR

    return {name for name in ONLY_FOR if getattr(args, name, None) is not None}


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


def run_args(args: argparse.Namespace) -> int:
    from proxy.testbed import scenarios

    options = options_from_args(args)
    problem = validate(options) or scenarios.validate(options, given_options(args))
    if problem:
        print(f"originpool testbed: {problem}", file=sys.stderr)
        return 2
    with contextlib.suppress(BrokenPipeError):
        if options.scenario == "ramp":
            return run(options)
        return run_scenario(options)
    return 1


def run_scenario(options: Options) -> int:
    """One scenario (churn, storm) in its own namespace; figures, JSON and plot at the end.
    Exit 0, 1 (it could not run to its end: the reason is printed), 2, 130 as ``run``."""
    from proxy.testbed import scenario_report, scenarios

    if not_root():
        return 2
    ui = Ui(options.progress)
    restore = procs.install_interrupt_handlers()
    opts = options
    figures: dict[str, Any] | None = None
    code = 0
    try:
        ui.say(
            f"originpool testbed --scenario {opts.scenario}: physical limit = {opts.egress} "
            f"egress IPs x {opts.size:,} ports x {opts.origins} origins = {opts.limit:,}"
        )
        ui.say(scenario_intro(opts))
        with tempfile.TemporaryDirectory(prefix="originpool-testbed-") as tmp:
            mode = "proxy-cmd" if opts.proxy_cmd else opts.modes[0]
            try:
                if opts.scenario == "faults":
                    from proxy.testbed.faults import FaultsRun

                    figures = FaultsRun(mode, opts, ui, Path(tmp)).run()
                else:
                    figures = scenarios.ScenarioRun(mode, opts, ui, Path(tmp)).run()
            except (ChildFailed, RuntimeError, OSError) as e:
                ui.say(f"originpool testbed --scenario {opts.scenario}: {e}")
                ui.event("error", error=str(e))
                code = 1
        if figures is not None:
            ui.scenario_done(figures)
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
            scenario_report.plot(doc, opts.plot_path)
            ui.say(f"plot: {opts.plot_path}")
    return code


def scenario_intro(opts: Options) -> str:
    """What is about to happen, in one sentence, with the resolved defaults."""
    if opts.scenario == "churn":
        assert opts.rate is not None and opts.lifetime is not None and opts.mix is not None
        mix = " / ".join(f"{100 * m:.0f}%" for m in opts.mix)
        return (
            f"{opts.rate:g} sessions/s for {opts.duration:g} s, each living {opts.lifetime:g} s "
            f"on average (steady state {opts.rate * opts.lifetime:,.0f} = "
            f"{100 * opts.rate * opts.lifetime / opts.limit:.0f}% of the limit); client closes "
            f"Close / FIN / RST {mix}; tcp_tw_reuse {opts.tw_reuse} in the namespace"
        )
    assert opts.target is not None
    if opts.scenario == "faults":
        return (
            f"ramp to {opts.target:g} of the limit ({int(opts.target * opts.limit):,} sessions) "
            f"at {opts.rate:g}/s, then in order: reload with a route added, egress IP "
            f"{opts.egress_ips()[-1]} removed, re-added, origin "
            f"{opts.origin_addresses()[-1][0]} SIGKILLed, the proxy stopped"
        )
    return (
        f"ramp to {opts.target:g} of the limit ({int(opts.target * opts.limit):,} sessions) "
        f"at {opts.rate:g}/s, then restart {opts.storm_origins} of {opts.origins} origins at "
        f"once; clients reconnect with jittered exponential backoff for up to "
        f"{opts.duration:g} s"
    )
