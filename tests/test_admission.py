"""Protecting a restarted origin (issue 20 §2): ``max_session_rate`` answers handshakes over
the rate with 503 and a jittered Retry-After, and ``slow_start`` ramps the rate after the
origin is back; through a real ``originpool serve`` with real WebSocket handshakes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from proxy import config as cfg
from proxy.config_drain import admin_warnings
from tests.test_drain import ADMIN, Origins, started, until
from tests.test_drain import ws_origins as ws_origins
from tests.test_serve import Proc

A = "ws://127.0.2.1:9000"

CONFIG = """
[listen]
address = "127.0.0.1:8080"
[admin]
address = "127.0.0.1:9090"
[egress]
addresses = ["127.0.1.1"]
[[routes]]
host = "app.test"
origins = [{{url = "{A}", max_session_rate = {rate}{slow}}}]
[log]
format = "json"
"""


def write(tmp_path: Path, rate: float, slow_start: float = 0) -> Path:
    path = tmp_path / "originpool.toml"
    slow = f", slow_start = {slow_start}" if slow_start else ""
    path.write_text(CONFIG.format(A=A, rate=rate, slow=slow))
    return path


async def handshake() -> int | str:
    """101 as "ok" (and the session closed again), else the status and Retry-After."""
    try:
        async with connect("ws://app.test:8080/", host="127.0.0.1", port=8080, open_timeout=10):
            return "ok"
    except InvalidStatus as e:
        response = e.response
        assert response.status_code == 503, response
        return int(response.headers["Retry-After"])


async def burst(n: int) -> list[int | str]:
    return list(await asyncio.gather(*(handshake() for _ in range(n))))


async def test_over_the_rate_handshakes_get_503_with_a_jittered_retry_after(
    ws_origins: Origins, tmp_path: Path
) -> None:
    proc = Proc(write(tmp_path, rate=4))
    try:
        await started(proc)
        t0 = time.monotonic()
        answers = await burst(20)
        took = time.monotonic() - t0
        accepted = answers.count("ok")
        waits = [a for a in answers if isinstance(a, int)]
        # a bucket of one second (4), plus what 4/s refills while the burst runs
        assert 4 <= accepted <= 4 + int(4 * took) + 1, (answers, took)
        assert len(waits) == 20 - accepted
        assert min(waits) >= 1 and max(waits) <= 1 + (20 - accepted) / 4 + 1, waits
        assert len(set(waits)) > 1, waits  # jittered: not every client back at once
        # the bucket refills at the rate: a handshake goes through again within a second
        ok: list[int | str] = []

        async def again() -> bool:
            ok.append(await handshake())
            return ok[-1] == "ok"

        deadline = time.monotonic() + 3
        while not await again():
            assert time.monotonic() < deadline, ok
            await asyncio.sleep(0.05)
    finally:
        assert await asyncio.to_thread(proc.stop) == 0
    refused = [ln for ln in proc.lines if ln.get("event") == "access" and ln["status"] == 503]
    assert len(refused) >= len(waits)  # each refusal in the access log


async def test_slow_start_ramps_the_rate_after_an_undrain(
    ws_origins: Origins, tmp_path: Path
) -> None:
    """rate 20/s: a burst of 20 passes whole; right after an undrain, with slow_start = 10,
    the rate starts at a tenth (2/s) and the same burst mostly waits."""
    proc = Proc(write(tmp_path, rate=20, slow_start=10))
    try:
        await started(proc)
        before = await burst(20)
        assert before.count("ok") >= 18, before
        async with httpx.AsyncClient() as admin:
            r = await admin.post(f"{ADMIN}/origins/drain", params={"origin": A, "over": 0})
            assert r.status_code == 202
            await until(lambda: ws_origins.live["A"] == 0, 5, "A's sessions ended")
            r = await admin.post(f"{ADMIN}/origins/undrain", params={"origin": A})
            assert r.status_code == 200
            view = (await admin.get(f"{ADMIN}/origins")).json()[0]
            assert view["state"] == "active" and view["session_rate_now"] < 5
        after = await burst(20)
        assert after.count("ok") <= 4, after  # one token, then ~2/s
    finally:
        assert await asyncio.to_thread(proc.stop) == 0


@pytest.mark.parametrize(
    ("origin", "problem"),
    [
        ('{url = "ws://127.0.2.1:9000", slow_start = 20}', "set max_session_rate too"),
        ('{url = "ws://127.0.2.1:9000", max_session_rate = 0}', "> 0"),
        ('{url = "ws://127.0.2.1:9000", max_session_rate = "fast"}', "sessions per second"),
        ('{url = "ws://127.0.2.1:9000", max_session_rate = 5, slow_start = -1}', ">= 0"),
    ],
)
def test_check_config_names_the_bad_key(origin: str, problem: str) -> None:
    text = (
        f'[listen]\naddress = "127.0.0.1:8080"\n[[routes]]\nhost = "a.test"\norigins = [{origin}]\n'
    )
    with pytest.raises(cfg.ConfigError) as e:
        cfg.parse(text)
    assert "routes[0].origins[0]." in str(e.value) and problem in str(e.value)


def test_two_routes_one_origin_two_rates_is_an_error() -> None:
    text = f"""
[listen]
address = "127.0.0.1:8080"
[[routes]]
host = "a.test"
origins = [{{url = "{A}", max_session_rate = 5}}]
[[routes]]
host = "b.test"
origins = [{{url = "{A}", max_session_rate = 50}}]
"""
    with pytest.raises(cfg.ConfigError, match=r"routes\[1\]\.origins\[0\].*one admission"):
        cfg.parse(text)


def test_admin_off_loopback_without_token_is_a_warning() -> None:
    base = f"""
[listen]
address = "127.0.0.1:8080"
[admin]
address = "{{admin}}"
{{token}}
[[routes]]
host = "a.test"
origins = ["{A}"]
[websocket]
drain_over = 12
"""
    open_admin = cfg.parse(base.format(admin="0.0.0.0:9090", token=""))
    assert open_admin.drain_over == 12
    [warning] = admin_warnings(open_admin)
    assert "admin.address" in warning and "token" in warning
    assert admin_warnings(cfg.parse(base.format(admin="127.0.0.1:9090", token=""))) == []
    with_token = cfg.parse(base.format(admin="0.0.0.0:9090", token='token = "x"'))
    assert with_token.admin_token == "x" and admin_warnings(with_token) == []
    default = base.format(admin="127.0.0.1:9090", token="").replace("drain_over = 12", "")
    assert cfg.parse(default).drain_over == 30.0
