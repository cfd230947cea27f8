"""The runner keeps reading the proxy's pipe while it samples (issue 22's admin timeout).

The scale run printed ``(admin /metrics of 127.0.0.1:9098 unavailable: timed out)``: no port
clash (only the workers' own admin ports, 9090 + i, listen there), but thousands of sessions
were ending, each with a ``websocket_session`` line, and the runner sampled (census, then one
GET per worker) without reading the workers' shared stdout pipe. A worker whose write found
the pipe full blocked, event loop and all, and could not answer.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from testbed.options import Options
from testbed.run import ModeRun
from testbed.ui import Ui

LINE = '{"event":"websocket_session","closed_by":"origin","close_code":1011}'
LINES = 20000  # ~1.3 MB: many times what a pipe holds (64 KiB)


def _chatty_proxy(flag: Path) -> list[str]:
    """A stand-in proxy: writes more lines than the pipe holds, then says so in a file."""
    code = (
        "import sys, pathlib\n"
        "out = sys.stdout\n"
        f"for _ in range({LINES}):\n"
        f"    out.write({LINE!r} + '\\n')\n"
        "out.flush()\n"
        f"pathlib.Path({str(flag)!r}).write_text('done')\n"
        "sys.stdin.read()\n"  # until the runner closes it: ended by PID otherwise
    )
    return [sys.executable, "-c", code]


def test_sampling_reads_the_pipes_so_a_blocked_worker_can_answer(tmp_path):
    run = ModeRun("connectx", Options(), Ui("json"), tmp_path)
    flag = tmp_path / "written"
    try:
        run.proxy = run.children.start("proxy", _chatty_proxy(flag), stdin=True)

        def scrape() -> bool:
            """What a /metrics GET needs: the proxy got past its writes, within a deadline."""
            end = time.monotonic() + 10
            while time.monotonic() < end:
                if flag.exists():
                    return True
                time.sleep(0.05)  # polling the flag with a deadline
            return False

        assert run.pumping(scrape), "the proxy stayed blocked on its full stdout pipe"
        end = time.monotonic() + 10  # what is still in the pipe, read to the end
        while sum(run.session_ends.values()) < LINES and time.monotonic() < end:
            for who, line in run.children.pump(0.1):
                run.on_line(who, line)
        assert run.session_ends == {"origin 1011": LINES}
    finally:
        run.children.end_all(grace=2)
