"""HealthChecker against the emulator: its answers, its cache on a FakeClock, forced probes,
and one shared probe for concurrent callers."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from claude_headspace.clock import FakeClock
from claude_headspace.config import HealthSettings, OpenRouterSettings
from claude_headspace.emulator import EmulatorServer, Fault
from claude_headspace.inference.client import OpenRouterClient
from claude_headspace.inference.health import HealthChecker, HealthReport

KEY = "sk-or-v1-health-test-0123456789"
KEY_PATH = "/api/v1/key"
MODELS_PATH = "/api/v1/models"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _settings(base_url: str, *, cache_seconds: float = 60.0, **extra: Any) -> OpenRouterSettings:
    return OpenRouterSettings(
        base_url=base_url,
        health=HealthSettings(timeout_seconds=2.0, cache_seconds=cache_seconds),
        **extra,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def checker_for(
    emulator: EmulatorServer, clock: FakeClock
) -> Iterator[Callable[..., HealthChecker]]:
    """Builds a checker (default: the shared emulator, KEY); its clients are closed after."""
    clients: list[OpenRouterClient] = []

    def make(
        *,
        base_url: str | None = None,
        key: str | None = KEY,
        with_client: bool = True,
        **extra: Any,
    ) -> HealthChecker:
        settings = _settings(base_url or emulator.base_url, **extra)
        client = None
        if with_client:
            client = OpenRouterClient(settings, api_key=key, clock=clock)
            clients.append(client)
        return HealthChecker(client, settings, clock=clock)

    yield make
    for client in clients:
        client.close()


# --------------------------------------------------------------------------- the answers


def test_healthy(
    emulator: EmulatorServer, checker_for: Callable[..., HealthChecker], clock: FakeClock
) -> None:
    report = checker_for().check()

    assert report.state == "healthy"
    assert report.reachable is True
    assert report.error is None
    assert report.checked_at == datetime.fromtimestamp(clock.time(), UTC)
    assert isinstance(report.latency_ms, int)
    assert report.latency_ms >= 0
    assert emulator.request_count(KEY_PATH) == 1
    assert emulator.requests[0].headers["authorization"] == f"Bearer {KEY}"


def test_key_rejected(
    own_emulator: Callable[..., EmulatorServer], checker_for: Callable[..., HealthChecker]
) -> None:
    strict = own_emulator(accept_keys={"sk-or-v1-only-this-one"})

    report = checker_for(base_url=strict.base_url).check()

    assert report.state == "key_rejected"
    assert report.reachable is True
    assert report.error is not None
    assert "401" in report.error
    assert strict.request_count(KEY_PATH) == 1


def test_unreachable(checker_for: Callable[..., HealthChecker]) -> None:
    report = checker_for(base_url=f"http://127.0.0.1:{_closed_port()}/api/v1").check()

    assert report.state == "unreachable"
    assert report.reachable is False
    assert report.error is not None
    assert report.checked_at is not None


def test_no_key(emulator: EmulatorServer, checker_for: Callable[..., HealthChecker]) -> None:
    report = checker_for(with_client=False).check()

    assert report.state == "no_key"
    assert report.reachable is False
    assert report.error
    assert emulator.request_count() == 0


def test_disabled(emulator: EmulatorServer, checker_for: Callable[..., HealthChecker]) -> None:
    checker = checker_for(enabled=False)

    report = checker.check()

    assert report.state == "disabled"
    assert report.reachable is False
    assert checker.check(force=True).state == "disabled"
    assert emulator.request_count() == 0


def test_falls_back_to_models_without_a_key_endpoint(
    own_emulator: Callable[..., EmulatorServer], checker_for: Callable[..., HealthChecker]
) -> None:
    gateway = own_emulator(key_endpoint=False)

    report = checker_for(base_url=gateway.base_url).check()

    assert report.state == "healthy"
    assert gateway.request_count(KEY_PATH) == 1
    assert gateway.request_count(MODELS_PATH) == 1


def test_report_to_dict(checker_for: Callable[..., HealthChecker], clock: FakeClock) -> None:
    data = checker_for().check().to_dict()

    assert data["state"] == "healthy"
    assert data["reachable"] is True
    assert data["error"] is None
    assert data["checked_at"] == datetime.fromtimestamp(clock.time(), UTC).isoformat()
    assert KEY not in repr(data)


def test_chat_faults_do_not_affect_the_probe(
    emulator: EmulatorServer, checker_for: Callable[..., HealthChecker]
) -> None:
    emulator.script([Fault(status=503)])
    emulator.set_latency(5000)

    assert checker_for().check().state == "healthy"


def test_an_emulator_that_goes_away_turns_unreachable_after_the_cache(
    own_emulator: Callable[..., EmulatorServer],
    checker_for: Callable[..., HealthChecker],
    clock: FakeClock,
) -> None:
    server = own_emulator()
    checker = checker_for(base_url=server.base_url, cache_seconds=30)
    assert checker.check().state == "healthy"

    server.stop()
    assert checker.check().state == "healthy"  # still the cached answer
    clock.advance(30)

    report = checker.check()
    assert report.state == "unreachable"
    assert report.reachable is False
    assert checker.last() == report


# --------------------------------------------------------------------------- the cache


def test_answer_is_cached_for_cache_seconds(
    emulator: EmulatorServer, checker_for: Callable[..., HealthChecker], clock: FakeClock
) -> None:
    checker = checker_for(cache_seconds=10)

    first = checker.check()
    assert emulator.request_count(KEY_PATH) == 1
    assert checker.check() is first
    clock.advance(9.99)
    assert checker.check() is first
    assert emulator.request_count(KEY_PATH) == 1

    clock.advance(0.01)
    second = checker.check()
    assert emulator.request_count(KEY_PATH) == 2
    assert second is not first
    assert second.checked_at is not None
    assert first.checked_at is not None
    assert second.checked_at > first.checked_at
    clock.advance(5)
    assert checker.check() is second
    assert emulator.request_count(KEY_PATH) == 2


def test_a_failed_probe_is_cached_too(
    own_emulator: Callable[..., EmulatorServer],
    checker_for: Callable[..., HealthChecker],
    clock: FakeClock,
) -> None:
    strict = own_emulator(accept_keys={"sk-or-v1-other"})
    checker = checker_for(base_url=strict.base_url, cache_seconds=60)

    for _ in range(5):
        assert checker.check().state == "key_rejected"
    assert strict.request_count(KEY_PATH) == 1
    clock.advance(60)
    assert checker.check().state == "key_rejected"
    assert strict.request_count(KEY_PATH) == 2


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
    checker = checker_for(cache_seconds=60)

    first = checker.check()
    forced = checker.check(force=True)

    assert emulator.request_count(KEY_PATH) == 2
    assert forced is not first
    assert forced.state == "healthy"
    assert checker.check() is forced  # a forced answer refreshes the cache
    assert emulator.request_count(KEY_PATH) == 2


def test_last_returns_the_cached_answer_without_probing(
    emulator: EmulatorServer, checker_for: Callable[..., HealthChecker]
) -> None:
    checker = checker_for()
    assert checker.last() is None
    report = checker.check()

    assert checker.last() is report
    assert emulator.request_count(KEY_PATH) == 1


# --------------------------------------------------------------------------- concurrency


def test_concurrent_checks_share_a_probe(
    emulator: EmulatorServer, checker_for: Callable[..., HealthChecker]
) -> None:
    checker = checker_for(cache_seconds=60)
    callers = 10
    start = threading.Barrier(callers)
    reports: list[HealthReport] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def call() -> None:
        try:
            start.wait()
            report = checker.check()
            with lock:
                reports.append(report)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert failures == []
    assert len(reports) == callers
    assert {r.state for r in reports} == {"healthy"}
    assert emulator.request_count(KEY_PATH) <= 2


def test_concurrent_forced_checks_all_get_an_answer(
    emulator: EmulatorServer, checker_for: Callable[..., HealthChecker]
) -> None:
    checker = checker_for()
    checker.check()
    callers = 10
    start = threading.Barrier(callers)
    states: list[str] = []

    def call() -> None:
        start.wait()
        states.append(checker.check(force=True).state)

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert states == ["healthy"] * callers
    # At least one fresh probe was made; callers arriving mid-probe may share its answer.
    assert 2 <= emulator.request_count(KEY_PATH) <= 1 + callers
