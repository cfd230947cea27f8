"""proxy.timer.Timer: lazy re-arming must still fire exactly once, at the last deadline set,
and never after a disarm; stop() must drop the loop timer itself."""

from __future__ import annotations

import asyncio

from proxy.timer import Timer


async def test_rearm_later_fires_once_at_the_new_deadline() -> None:
    loop = asyncio.get_running_loop()
    fired: list[tuple[str, float]] = []
    timer = Timer()
    start = loop.time()
    timer.arm(0.05, lambda: fired.append(("first", loop.time())))
    timer.arm(0.2, lambda: fired.append(("second", loop.time())))  # the pending one sleeps again
    await asyncio.sleep(0.4)
    assert [name for name, _ in fired] == ["second"]
    assert fired[0][1] - start >= 0.2 - 0.01  # loop.time() granularity


async def test_rearm_earlier_replaces_the_pending_loop_timer() -> None:
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    timer = Timer()
    start = loop.time()
    timer.arm(5.0, lambda: fired.append(-1.0))
    timer.arm(0.05, lambda: fired.append(loop.time()))
    await asyncio.sleep(0.3)
    assert len(fired) == 1 and fired[0] > 0 and fired[0] - start < 1.0


async def test_disarm_and_stop_fire_nothing() -> None:
    fired: list[str] = []
    a, b = Timer(), Timer()
    a.arm(0.05, lambda: fired.append("a"))
    b.arm(0.05, lambda: fired.append("b"))
    a.disarm()
    b.stop()
    assert b._handle is None  # no loop timer left behind (memory per WebSocket session)
    await asyncio.sleep(0.2)
    assert fired == []
    a.arm(0.05, lambda: fired.append("a again"))  # a disarmed timer arms again as new
    await asyncio.sleep(0.2)
    assert fired == ["a again"]


async def test_a_callback_may_arm_its_own_timer_again() -> None:
    fired: list[int] = []
    timer = Timer()

    def tick() -> None:
        fired.append(len(fired))
        if len(fired) < 3:
            timer.arm(0.02, tick)

    timer.arm(0.02, tick)
    await asyncio.sleep(0.3)
    assert fired == [0, 1, 2]
