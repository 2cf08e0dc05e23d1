"""The health check over real HTTP: its answers, its cache (fake clock), one shared probe."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from tests.emulator_fixtures import ClientFactory, settings_for

from claude_headspace.clock import FakeClock
from claude_headspace.emulator import EmulatorServer
from claude_headspace.inference.client import OpenRouterClient
from claude_headspace.inference.health import HealthChecker, HealthReport

KEY_PATH = "/api/v1/key"
MODELS_PATH = "/api/v1/models"


def checker_for(
    client: OpenRouterClient | None, base_url: str, clock: FakeClock, **health: Any
) -> HealthChecker:
    settings = settings_for(base_url, health={"timeout_seconds": 2, "cache_seconds": 60, **health})
    return HealthChecker(client, settings, clock=clock)


def test_healthy(
    emulator: EmulatorServer, make_client: ClientFactory, fake_clock: FakeClock
) -> None:
    report = checker_for(make_client(), emulator.base_url, fake_clock).check()
    assert report.state == "healthy" and report.reachable and report.error is None
    assert report.checked_at == datetime.fromtimestamp(fake_clock.time(), UTC)
    assert report.latency_ms is not None and report.latency_ms >= 0
    assert report.to_dict() == {
        "state": "healthy",
        "reachable": True,
        "checked_at": report.checked_at.isoformat(),
        "latency_ms": report.latency_ms,
        "error": None,
    }
    assert emulator.request_count(KEY_PATH) == 1


def test_key_rejected(
    emulator: EmulatorServer, make_client: ClientFactory, fake_clock: FakeClock
) -> None:
    client = make_client(key="wrong-key")
    report = checker_for(client, emulator.base_url, fake_clock).check()
    assert report.state == "key_rejected" and report.reachable
    assert report.error is not None and "401" in report.error
    assert "wrong-key" not in report.error


def test_unreachable(closed_port: int, make_client: ClientFactory, fake_clock: FakeClock) -> None:
    base_url = f"http://127.0.0.1:{closed_port}/api/v1"
    report = checker_for(make_client(base_url=base_url), base_url, fake_clock).check()
    assert report.state == "unreachable" and not report.reachable
    assert report.error is not None and "ConnectError" in report.error


def test_no_key_and_disabled_never_probe(emulator: EmulatorServer, fake_clock: FakeClock) -> None:
    no_key = HealthChecker(None, settings_for(emulator.base_url), clock=fake_clock)
    assert no_key.check().state == "no_key"
    assert no_key.last() is not None and no_key.last().state == "no_key"  # type: ignore[union-attr]
    client = OpenRouterClient(settings_for(emulator.base_url), api_key="sk-or-x")
    disabled = HealthChecker(client, settings_for(emulator.base_url, enabled=False))
    report = disabled.check(force=True)
    assert (report.state, report.reachable) == ("disabled", False)
    client.close()
    assert emulator.request_count() == 0


def test_falls_back_to_models_when_there_is_no_key_endpoint(
    own_emulator: Any, make_client: ClientFactory, fake_clock: FakeClock
) -> None:
    server: EmulatorServer = own_emulator(key_endpoint=False)
    client = make_client(base_url=server.base_url)
    report = checker_for(client, server.base_url, fake_clock).check()
    assert report.state == "healthy"
    assert [r.path for r in server.requests] == [KEY_PATH, MODELS_PATH]


def test_a_broken_configuration_is_a_report_not_an_exception(
    make_client: ClientFactory, fake_clock: FakeClock
) -> None:
    client = make_client(base_url="http://[::1")
    report = checker_for(client, "http://[::1", fake_clock).check()
    assert report.state == "unreachable" and report.error


def test_answers_are_cached_for_cache_seconds(
    emulator: EmulatorServer, make_client: ClientFactory, fake_clock: FakeClock
) -> None:
    checker = checker_for(make_client(), emulator.base_url, fake_clock, cache_seconds=30)
    assert checker.last() is None
    first = checker.check()
    fake_clock.advance(29.9)
    assert checker.check() is first
    assert checker.last() is first
    assert emulator.request_count(KEY_PATH) == 1
    fake_clock.advance(0.2)
    second = checker.check()
    assert second is not first and emulator.request_count(KEY_PATH) == 2
    assert checker.check(force=True) is not second
    assert emulator.request_count(KEY_PATH) == 3


def test_a_changed_answer_shows_after_the_cache_expires(
    own_emulator: Any, make_client: ClientFactory, fake_clock: FakeClock
) -> None:
    server: EmulatorServer = own_emulator()
    checker = checker_for(make_client(base_url=server.base_url), server.base_url, fake_clock)
    assert checker.check().state == "healthy"
    server.stop()
    assert checker.check().state == "healthy"  # cached: OpenRouter is not asked
    fake_clock.advance(61)
    assert checker.check().state == "unreachable"


class GatedClient(OpenRouterClient):
    """A real client whose GET /key waits at a gate first, so a probe stays in flight."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def get_key(self, *, timeout: float) -> dict[str, Any]:
        self.entered.set()
        assert self.gate.wait(10)
        return super().get_key(timeout=timeout)


@pytest.mark.parametrize("force", [False, True])
def test_concurrent_callers_share_one_probe(
    force: bool, emulator: EmulatorServer, fake_clock: FakeClock
) -> None:
    client = GatedClient(settings_for(emulator.base_url), api_key="sk-or-gated")
    checker = checker_for(client, emulator.base_url, fake_clock)
    reports: list[HealthReport] = []
    lock = threading.Lock()

    def call() -> None:
        report = checker.check(force=force)
        with lock:
            reports.append(report)

    prober = threading.Thread(target=call)
    prober.start()
    assert client.entered.wait(10)
    waiters = [threading.Thread(target=call) for _ in range(7)]
    for t in waiters:
        t.start()
    # Open the gate only once all seven wait on the probe in flight (the Condition's own
    # waiter list says so; polled, not slept on, so no timing is assumed).
    deadline = time.monotonic() + 10
    while len(checker._lock._waiters) < 7 and time.monotonic() < deadline:  # type: ignore[attr-defined]
        threading.Event().wait(0.001)
    assert len(checker._lock._waiters) == 7  # type: ignore[attr-defined]
    client.gate.set()
    for t in [prober, *waiters]:
        t.join(10)
    client.close()
    assert len(reports) == 8
    assert all(r is reports[0] for r in reports)
    assert reports[0].state == "healthy"
    assert emulator.request_count(KEY_PATH) == 1
