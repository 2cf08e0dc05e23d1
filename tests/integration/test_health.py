"""HealthChecker over real HTTP against the emulator: its answers, its cache on a FakeClock,
forced probes, and one shared probe for concurrent callers."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from flask import Flask
from tests.emulator_fixtures import TEST_KEY, ClientFactory, settings_for
from tests.service_fixtures import AppFactory

from headspace_inference.clock import FakeClock
from headspace_inference.inference.health import HealthChecker, HealthReport, KeyCredit
from headspace_inference.testing.emulator import EmulatorServer, Fault

KEY_PATH = "/api/v1/key"
MODELS_PATH = "/api/v1/models"


@pytest.fixture
def checker_for(
    emulator: EmulatorServer, make_client: ClientFactory, fake_clock: FakeClock
) -> Callable[..., HealthChecker]:
    """Builds a checker (default: the shared emulator, TEST_KEY, a client on the fake clock,
    answers cached for 60 s); its clients are closed afterwards."""

    def make(
        *,
        base_url: str | None = None,
        key: str | None = TEST_KEY,
        cache_seconds: float = 60.0,
        **extra: Any,
    ) -> HealthChecker:
        url = base_url or emulator.base_url
        health = {"timeout_seconds": 2.0, "cache_seconds": cache_seconds}
        settings = settings_for(url, health=health, **extra)
        client = make_client(base_url=url, key=key, clock=fake_clock)
        return HealthChecker(client, settings, clock=fake_clock)

    return make


# --------------------------------------------------------------------------- the answers


def test_healthy(
    emulator: EmulatorServer, checker_for: Callable[..., HealthChecker], fake_clock: FakeClock
) -> None:
    report = checker_for().check()

    assert report.state == "healthy"
    assert report.reachable is True
    assert report.error is None
    assert report.checked_at == datetime.fromtimestamp(fake_clock.time(), UTC)
    assert isinstance(report.latency_ms, int) and report.latency_ms >= 0
    assert report.to_dict() == {
        "state": "healthy",
        "reachable": True,
        "checked_at": report.checked_at.isoformat(),
        "latency_ms": report.latency_ms,
        "error": None,
        "credit": {"limit": None, "limit_remaining": None, "usage": 0.0},  # the key's
    }
    assert TEST_KEY not in repr(report.to_dict())
    assert emulator.request_count(KEY_PATH) == 1
    assert emulator.requests[0].headers["authorization"] == f"Bearer {TEST_KEY}"


def test_key_rejected(
    own_emulator: Callable[..., EmulatorServer], checker_for: Callable[..., HealthChecker]
) -> None:
    strict = own_emulator(accept_keys={"sk-or-v1-only-this-one"})

    report = checker_for(base_url=strict.base_url, key="sk-or-wrong-key").check()

    assert report.state == "key_rejected"
    assert report.reachable is True
    assert report.error is not None and "401" in report.error
    assert "sk-or-wrong-key" not in report.error
    assert strict.request_count(KEY_PATH) == 1


def test_unreachable(closed_port: int, checker_for: Callable[..., HealthChecker]) -> None:
    report = checker_for(base_url=f"http://127.0.0.1:{closed_port}/api/v1").check()

    assert report.state == "unreachable"
    assert report.reachable is False
    assert report.error is not None and "ConnectError" in report.error
    assert report.checked_at is not None


def test_a_broken_configuration_is_a_report_not_an_exception(
    checker_for: Callable[..., HealthChecker],
) -> None:
    report = checker_for(base_url="http://[::1").check()
    assert report.state == "unreachable" and report.error


def test_falls_back_to_models_without_a_key_endpoint(
    own_emulator: Callable[..., EmulatorServer], checker_for: Callable[..., HealthChecker]
) -> None:
    gateway = own_emulator(key_endpoint=False)

    report = checker_for(base_url=gateway.base_url).check()

    assert report.state == "healthy"
    assert [r.path for r in gateway.requests] == [KEY_PATH, MODELS_PATH]


# --------------------------------------------------------------------------- the key's credit


def test_the_probe_keeps_the_keys_credit(
    emulator: EmulatorServer, checker_for: Callable[..., HealthChecker]
) -> None:
    emulator.set_key_credit(20.0, usage=4.5)

    report = checker_for().check()

    assert report.credit == KeyCredit(limit=20.0, limit_remaining=15.5, usage=4.5)
    assert report.to_dict()["credit"] == {"limit": 20.0, "limit_remaining": 15.5, "usage": 4.5}


@pytest.mark.parametrize(
    ("data", "credit"),
    [
        ({"limit": "20", "limit_remaining": True, "usage": [1]}, KeyCredit(None, None, None)),
        ({"limit": 1e400, "limit_remaining": -1, "usage": 3}, KeyCredit(None, -1.0, 3.0)),
        ({"label": "no numbers at all"}, KeyCredit(None, None, None)),
        ("not an object", KeyCredit(None, None, None)),
    ],
    ids=["not-numbers", "infinite", "missing", "data-not-an-object"],
)
def test_a_credit_that_is_not_numbers_is_null_not_an_error(
    emulator: EmulatorServer,
    checker_for: Callable[..., HealthChecker],
    data: Any,
    credit: KeyCredit,
) -> None:
    body = json.dumps({"data": data}).replace("Infinity", "1e400")
    emulator.script([Fault(status=200, body=body)], path=KEY_PATH)

    report = checker_for().check()

    assert (report.state, report.credit) == ("healthy", credit)


def test_no_credit_from_the_models_fallback_or_a_failed_probe(
    own_emulator: Callable[..., EmulatorServer],
    emulator: EmulatorServer,
    checker_for: Callable[..., HealthChecker],
) -> None:
    gateway = own_emulator(key_endpoint=False)
    fallback = checker_for(base_url=gateway.base_url).check()
    assert (fallback.state, fallback.credit) == ("healthy", None)
    assert fallback.to_dict()["credit"] is None

    emulator.script([Fault(status=500)], path=KEY_PATH)
    failed = checker_for().check()
    assert (failed.state, failed.credit) == ("unreachable", None)


def test_the_status_shows_the_keys_credit_and_what_the_calls_charged(
    make_app: AppFactory, emulator: EmulatorServer
) -> None:
    emulator.set_key_credit(10.0, usage=2.0)
    app: Flask = make_app(openrouter={"health": {"cache_seconds": 0}})
    service = app.extensions["inference"]
    service.start()
    # Its start probes once in the background: done before the call, so the status's own
    # probe (nothing cached) is the one that tells what the call charged.
    for thread in threading.enumerate():
        if thread.name == "health-probe":
            thread.join(timeout=10)
    service.infer("turn", "credit", "spend a little")
    charged = float(emulator.charged().cost)

    credit = app.test_client().get("/api/inference/status").json["openrouter"]["credit"]

    assert credit["limit"] == 10.0
    assert credit["usage"] == pytest.approx(2.0 + charged, abs=1e-12)
    assert credit["limit_remaining"] == pytest.approx(8.0 - charged, abs=1e-12)
    disabled: Flask = make_app(openrouter={"enabled": False})
    assert disabled.test_client().get("/api/inference/status").json["openrouter"]["credit"] is None


def test_chat_faults_do_not_affect_the_probe(
    emulator: EmulatorServer, checker_for: Callable[..., HealthChecker]
) -> None:
    emulator.script([Fault(status=503)])
    emulator.set_latency(5000)

    assert checker_for().check().state == "healthy"


# --------------------------------------------------------------------------- the cache


def test_an_answer_is_cached_for_cache_seconds(
    emulator: EmulatorServer, checker_for: Callable[..., HealthChecker], fake_clock: FakeClock
) -> None:
    checker = checker_for(cache_seconds=10)
    assert checker.last() is None

    first = checker.check()
    assert checker.last() is first
    assert checker.check() is first
    fake_clock.advance(9.99)
    assert checker.check() is first
    assert emulator.request_count(KEY_PATH) == 1

    fake_clock.advance(0.01)
    second = checker.check()
    assert emulator.request_count(KEY_PATH) == 2
    assert second is not first
    assert second.checked_at is not None and first.checked_at is not None
    assert second.checked_at > first.checked_at
    fake_clock.advance(5)
    assert checker.check() is second
    assert emulator.request_count(KEY_PATH) == 2


def test_a_failed_probe_is_cached_too(
    own_emulator: Callable[..., EmulatorServer],
    checker_for: Callable[..., HealthChecker],
    fake_clock: FakeClock,
) -> None:
    strict = own_emulator(accept_keys={"sk-or-v1-other"})
    checker = checker_for(base_url=strict.base_url)

    for _ in range(5):
        assert checker.check().state == "key_rejected"
    assert strict.request_count(KEY_PATH) == 1
    fake_clock.advance(60)
    assert checker.check().state == "key_rejected"
    assert strict.request_count(KEY_PATH) == 2


def test_an_emulator_that_goes_away_turns_unreachable_after_the_cache(
    own_emulator: Callable[..., EmulatorServer],
    checker_for: Callable[..., HealthChecker],
    fake_clock: FakeClock,
) -> None:
    server = own_emulator()
    checker = checker_for(base_url=server.base_url, cache_seconds=30)
    assert checker.check().state == "healthy"

    server.stop()
    assert checker.check().state == "healthy"  # still the cached answer: OpenRouter not asked
    fake_clock.advance(30)

    report = checker.check()
    assert report.state == "unreachable"
    assert report.reachable is False
    assert checker.last() == report


def test_zero_cache_seconds_probes_every_time(
    emulator: EmulatorServer, checker_for: Callable[..., HealthChecker]
) -> None:
    checker = checker_for(cache_seconds=0)
    for _ in range(3):
        checker.check()
    assert emulator.request_count(KEY_PATH) == 3


def test_force_probes_again_within_the_window(
    emulator: EmulatorServer, checker_for: Callable[..., HealthChecker]
) -> None:
    checker = checker_for()

    first = checker.check()
    forced = checker.check(force=True)

    assert emulator.request_count(KEY_PATH) == 2
    assert forced is not first
    assert forced.state == "healthy"
    assert checker.check() is forced  # a forced answer refreshes the cache
    assert emulator.request_count(KEY_PATH) == 2


# --------------------------------------------------------------------------- concurrency


def _waiting_on_a_condition(thread: threading.Thread) -> bool:
    """Whether ``thread`` is blocked in threading.Condition.wait, read from its stack."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code is threading.Condition.wait.__code__:
            return True
        frame = frame.f_back
    return False


@pytest.mark.parametrize("force", [False, True])
def test_callers_during_a_probe_share_it(
    force: bool, emulator: EmulatorServer, checker_for: Callable[..., HealthChecker]
) -> None:
    checker = checker_for()
    release = emulator.hold(KEY_PATH)  # the probe's GET /key stays in flight until released
    reports: list[HealthReport] = []
    lock = threading.Lock()

    def call() -> None:
        report = checker.check(force=force)
        with lock:
            reports.append(report)

    prober = threading.Thread(target=call)
    prober.start()
    deadline = time.monotonic() + 10
    while emulator.request_count(KEY_PATH) < 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    waiters = [threading.Thread(target=call) for _ in range(7)]
    for t in waiters:
        t.start()
    # Release the probe only once all seven wait for it (seen from their stacks, polled:
    # no timing is assumed). Forced or not, they take its answer rather than probe again.
    while not all(map(_waiting_on_a_condition, waiters)) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert all(map(_waiting_on_a_condition, waiters))
    release.set()
    for t in [prober, *waiters]:
        t.join(10)
    assert len(reports) == 8
    assert all(r is reports[0] for r in reports)
    assert reports[0].state == "healthy"
    assert emulator.request_count(KEY_PATH) == 1


def _all_at_once(callers: int, call: Callable[[], HealthReport]) -> list[HealthReport]:
    """``call`` on ``callers`` threads released together; every report, or the first error."""
    start = threading.Barrier(callers)
    reports: list[HealthReport] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        try:
            start.wait()
            report = call()
            with lock:
                reports.append(report)
        except BaseException as exc:  # reported below, on the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    return reports


def test_concurrent_checks_share_a_probe(
    emulator: EmulatorServer, checker_for: Callable[..., HealthChecker]
) -> None:
    checker = checker_for()

    reports = _all_at_once(10, checker.check)

    assert [r.state for r in reports] == ["healthy"] * 10
    assert emulator.request_count(KEY_PATH) <= 2


def test_concurrent_forced_checks_all_get_an_answer(
    emulator: EmulatorServer, checker_for: Callable[..., HealthChecker]
) -> None:
    checker = checker_for()
    checker.check()

    reports = _all_at_once(10, lambda: checker.check(force=True))

    assert [r.state for r in reports] == ["healthy"] * 10
    # At least one fresh probe was made; callers arriving mid-probe may share its answer.
    assert 2 <= emulator.request_count(KEY_PATH) <= 1 + 10
