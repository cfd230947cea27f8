"""The rise/fall rules and the HTTP check's verdicts, without sockets (pool.health_state,
proxy.health_probe.HTTPCheck)."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pool.health_state import HealthCheck, OriginHealth
from pool.origin import Origin
from proxy.health_probe import HTTPCheck, ProbeError

SPEC = HealthCheck(rise=2, fall=3, passive_fails=2)


def confirmed(spec: HealthCheck = SPEC) -> OriginHealth:
    h = OriginHealth(spec)
    assert h.check(True) is None
    return h


def test_starts_up_and_the_first_failure_takes_an_unconfirmed_origin_down():
    h = OriginHealth(SPEC)
    assert h.up
    change = h.check(False, "ECONNREFUSED")
    assert change is not None and not change.up and change.count == 1
    assert change.detail == "ECONNREFUSED" and change.cause == "check"


def test_confirmed_up_needs_fall_consecutive_failures():
    h = confirmed()
    assert h.check(False) is None
    assert h.check(False) is None
    assert h.check(True) is None  # a pass in between starts the count again
    assert h.check(False) is None
    assert h.check(False) is None
    change = h.check(False)
    assert change is not None and not change.up and change.count == 3


def test_down_needs_rise_consecutive_passes():
    h = OriginHealth(SPEC)
    h.check(False)
    assert not h.up
    assert h.check(True) is None
    assert h.check(False) is None  # resets
    assert h.check(True) is None
    change = h.check(True)
    assert change is not None and change.up and change.count == 2
    # back up and confirmed: one failure is not enough any more
    assert h.check(False) is None and h.up


def test_passive_ejection_after_n_consecutive_failures_and_only_a_check_brings_it_back():
    h = confirmed()
    assert h.report(False, "HTTP 502") is None
    assert h.report(True) is None  # a good answer resets
    assert h.report(False) is None
    change = h.report(False, "HTTP 503")
    assert change is not None and not change.up and change.cause == "passive"
    assert change.detail == "HTTP 503"
    # traffic's successes do not bring it back (nothing should reach it): checks do
    assert h.report(True) is None and not h.up
    assert h.check(True) is None
    assert h.check(True) is not None and h.up


def test_passive_off_by_default():
    h = confirmed(HealthCheck())
    for _ in range(100):
        assert h.report(False) is None
    assert h.up


def test_renew_keeps_the_verdict_and_restarts_the_counts():
    h = OriginHealth(SPEC)
    h.check(False)
    h.check(True)
    h.renew(HealthCheck(rise=1))
    assert not h.up
    change = h.check(True)
    assert change is not None and change.up


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 5), st.integers(1, 5))
def test_transitions_alternate_and_follow_the_counts(checks, rise, fall):
    """Whatever the sequence: each transition flips the verdict, a down follows exactly
    ``fall`` consecutive failures (1 before the first pass), an up exactly ``rise`` passes."""
    h = OriginHealth(HealthCheck(rise=rise, fall=fall))
    up, confirmed_, run = True, False, 0
    for i, ok in enumerate(checks):
        change = h.check(ok, str(i))
        # the reference model, written plainly
        expected = None
        if up:
            if ok:
                confirmed_, run = True, 0
            else:
                run += 1
                if run >= (fall if confirmed_ else 1):
                    up, confirmed_, run, expected = False, False, 0, False
        else:
            if ok:
                run += 1
                if run >= rise:
                    up, confirmed_, run, expected = True, True, 0, True
            else:
                run = 0
        assert (None if change is None else change.up) == expected
        assert h.up == up


# -- the HTTP check's bytes ---------------------------------------------------------------------


def origin(url: str = "http://app.internal:8080") -> Origin:
    return Origin.parse(url)


def test_request_is_valid_http11_with_host_and_close():
    check = HTTPCheck(HealthCheck(type="http", method="HEAD", path="/healthz?x=1"), origin())
    data = check.request()
    server = h11.Connection(h11.SERVER)
    server.receive_data(data)
    req = server.next_event()
    assert isinstance(req, h11.Request)
    assert req.method == b"HEAD" and req.target == b"/healthz?x=1"
    headers = dict(req.headers)
    assert headers[b"host"] == b"app.internal:8080"
    assert headers[b"connection"] == b"close"
    assert isinstance(server.next_event(), h11.EndOfMessage)


@pytest.mark.parametrize(
    ("url", "host", "expected"),
    [
        ("http://a.example", None, b"a.example"),
        ("https://a.example", None, b"a.example"),
        ("https://a.example:8443", None, b"a.example:8443"),
        ("http://[::1]:9000", None, b"[::1]:9000"),
        ("http://10.0.0.1:9000", "status.example", b"status.example"),
    ],
)
def test_host_header(url, host, expected):
    assert HTTPCheck(HealthCheck(type="http", host=host), origin(url)).host() == expected


@pytest.mark.parametrize(
    ("status", "result"),
    [(200, "pass"), (204, "pass"), (302, "pass"), (399, "pass"), (404, "status"), (503, "status")],
)
def test_status_range(status, result):
    check = HTTPCheck(HealthCheck(type="http"), origin())
    check.request()
    got = check.feed(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n".encode())
    assert got == status
    assert check.verdict(status)[0] == result


def test_head_in_pieces_and_informational_skipped():
    check = HTTPCheck(HealthCheck(type="http", expect_status=(200, 200)), origin())
    check.request()
    assert check.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2") is None
    assert check.feed(b"00 OK\r\ncontent-length: 5\r\n\r\n") == 200


@pytest.mark.parametrize("answer", [b"", b"HTTP/1.1 200 OK\r\n", b"SSH-2.0-OpenSSH\r\n\r\n"])
def test_no_valid_head_is_a_protocol_failure(answer):
    check = HTTPCheck(HealthCheck(type="http"), origin())
    check.request()
    with pytest.raises(ProbeError):
        if answer:
            check.feed(answer)
        check.feed(b"")
