"""The spend guard end to end: the real service over real HTTP to the emulator, its budgets
counted in the real database (SQLite and PostgreSQL) or Redis, on an injected clock."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import text
from tests.conftest import redis_url_through
from tests.service_fixtures import CHAT, service_rows, settings_for
from tests.tcp_proxy import TcpProxy

from headspace_inference.clock import FakeClock
from headspace_inference.config_loading import load_settings
from headspace_inference.inference import BudgetExceededError, CallStormError
from headspace_inference.inference.service import InferenceService
from headspace_inference.standalone.database import standalone_database

# 2026-12-05 23:59:30 UTC: half a minute before a day (and an hour, and no month) ends.
BEFORE_MIDNIGHT = datetime(2026, 12, 5, 23, 59, 30, tzinfo=UTC).timestamp()
INPUT = "x" * 40  # an estimated 11 input tokens: with max_tokens=100, a worst case of 111
WORST = 111
RETRY_INTERVAL = 0.2  # how soon a guard tries Redis again after it failed

ServiceFactory = Callable[..., InferenceService]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(wall_start=BEFORE_MIDNIGHT)


@pytest.fixture(params=["database", "redis"])
def store(request: pytest.FixtureRequest) -> str:
    """Where the budgets are counted: the call log's database, or Redis when configured."""
    return str(request.param)


@pytest.fixture
def make_service(
    database_url: str,
    emulator: Any,
    tmp_path: Path,
    clock: FakeClock,
    store: str,
    request: pytest.FixtureRequest,
) -> Iterator[ServiceFactory]:
    made: list[InferenceService] = []
    redis: dict[str, Any] = {}
    if store == "redis":
        url = request.getfixturevalue("redis_server_url")
        redis = {"redis": {"url": url, "key_prefix": request.getfixturevalue("redis_prefix")}}

    def factory(
        *, redis_section: dict[str, Any] | None = None, **openrouter: Any
    ) -> InferenceService:
        extra: dict[str, Any] = {"openrouter": openrouter, **redis}
        if redis_section is not None:
            extra["redis"] = redis_section
        settings = load_settings(
            tmp_path / "none.yaml",
            overrides=settings_for(database_url, emulator, tmp_path, **extra),
            environ={},
        )
        service = InferenceService.from_settings(
            settings,
            standalone_database(settings.database),
            spool_dir=tmp_path / "spool",
            clock=clock,
        )
        made.append(service)
        return service

    yield factory
    for service in made:
        service.close(timeout=5)


def chat_count(emulator: Any) -> int:
    return sum(1 for r in emulator.requests if r.path == CHAT)


def used_tokens(service: InferenceService, **call: Any) -> int:
    (state,) = service.budget(**call)
    return int(state["used_tokens"])


def test_a_call_that_would_cross_a_cap_is_refused_before_anything_is_sent(
    make_service: ServiceFactory, emulator: Any, clock: FakeClock
) -> None:
    service = make_service(
        budgets=[{"name": "turns", "scope": {"level": "turn"}, "window": "day", "cap_tokens": 300}]
    )
    spent = 0
    made = 0
    while spent + WORST <= 300:  # a call is let through while its worst case fits
        result = service.infer("turn", "summarise", f"{made:02d}" + INPUT[2:], max_tokens=100)
        made += 1
        spent += result.input_tokens + result.output_tokens
        assert used_tokens(service, level="turn") == spent  # corrected to what was reported
    with pytest.raises(BudgetExceededError) as refused:
        service.infer("turn", "summarise", "one too many" + INPUT, max_tokens=100)
    assert chat_count(emulator) == made  # the refused call sent nothing
    error = refused.value
    assert error.rule == "turns" and not error.retryable
    assert error.retry_after == pytest.approx(30.0)  # to the end of the day, UTC
    assert "budget 'turns' (day) would be crossed" in str(error)
    assert used_tokens(service, level="turn") == spent  # a refusal counts nothing
    # Other levels are not in the rule's scope.
    assert service.infer("project", "describe", "a project", max_tokens=100).text
    row = service_rows(service)[-2]
    assert (row.status, row.attempts, row.error_type) == ("over_budget", 0, "BudgetExceededError")
    assert row.input_tokens == 0 and row.cost_usd is None


def test_a_call_whose_worst_case_is_over_the_whole_cap_is_told_so(
    make_service: ServiceFactory, emulator: Any
) -> None:
    service = make_service(budgets=[{"window": "hour", "cap_tokens": 50}])
    with pytest.raises(BudgetExceededError) as refused:
        service.infer("turn", "summarise", INPUT, max_tokens=100)
    assert refused.value.retry_after is None
    assert "more than the whole cap" in str(refused.value)
    assert refused.value.rule == "all/hour"
    assert chat_count(emulator) == 0


def test_the_reservation_is_the_worst_case_until_the_answer_corrects_it(
    make_service: ServiceFactory, emulator: Any
) -> None:
    service = make_service(budgets=[{"window": "day", "cap_usd": 1.0, "cap_tokens": 10_000}])
    emulator.set_latency(400)
    during: list[dict[str, Any]] = []
    release = threading.Event()

    def watch() -> None:
        # While the call is upstream its worst case is held.
        while not release.is_set():
            (state,) = service.budget()
            if state["used_tokens"]:
                during.append(state)
                return

    watcher = threading.Thread(target=watch)
    watcher.start()
    result = service.infer("turn", "summarise", INPUT, max_tokens=100)
    release.set()
    watcher.join()
    assert during and during[0]["used_tokens"] == WORST
    # Haiku's dearest input price (its cache write, 1.25 $/M) and its output price (5 $/M).
    assert during[0]["used_usd"] == pytest.approx((11 * 1.25 + 100 * 5) / 1e6, abs=1e-9)
    (state,) = service.budget()
    charged = emulator.charged()
    assert state["used_tokens"] == result.input_tokens + result.output_tokens
    assert state["used_tokens"] == charged.prompt_tokens + charged.completion_tokens
    assert state["used_usd"] == pytest.approx(float(charged.cost), abs=1e-9)
    assert state["left_usd"] == pytest.approx(1.0 - float(charged.cost), abs=1e-9)


def test_a_window_rolls_over_at_its_calendar_end(
    make_service: ServiceFactory, emulator: Any, clock: FakeClock
) -> None:
    service = make_service(budgets=[{"name": "daily", "window": "day", "cap_tokens": 120}])
    service.infer("turn", "summarise", "first" + INPUT, max_tokens=100)
    with pytest.raises(BudgetExceededError) as refused:
        service.infer("turn", "summarise", "second" + INPUT, max_tokens=100)
    assert refused.value.retry_after == pytest.approx(30.0)
    (before,) = service.budget()
    assert before["resets_at"] == "2026-12-06T00:00:00+00:00"
    clock.advance(31)
    service.infer("turn", "summarise", "second" + INPUT, max_tokens=100)
    (after,) = service.budget()
    assert after["resets_at"] == "2026-12-07T00:00:00+00:00"
    assert 0 < after["used_tokens"] <= WORST
    assert chat_count(emulator) == 2


def test_cache_hits_cost_nothing_and_are_never_refused(
    make_service: ServiceFactory, emulator: Any
) -> None:
    service = make_service(budgets=[{"window": "day", "cap_tokens": 120}])
    first = service.infer("turn", "summarise", INPUT, max_tokens=100)
    with pytest.raises(BudgetExceededError):
        service.infer("turn", "summarise", "another" + INPUT, max_tokens=100)
    again = service.infer("turn", "summarise", INPUT, max_tokens=100)
    assert again.cached and again.text == first.text
    assert used_tokens(service) == first.input_tokens + first.output_tokens
    assert chat_count(emulator) == 1


def test_the_warning_and_the_cap_are_each_told_once(
    make_service: ServiceFactory, emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    service = make_service(
        budgets=[{"name": "turns", "window": "day", "cap_tokens": 400, "warn_at": 0.25}]
    )
    events: list[dict[str, Any]] = []
    service.on_budget_event(events.append)
    caplog.set_level(logging.WARNING, logger="headspace_inference.inference.budget")
    for i in range(12):
        with contextlib.suppress(BudgetExceededError):
            service.infer("turn", "summarise", f"{i:02d}" + INPUT, max_tokens=100)
    kinds = [e["kind"] for e in events]
    assert kinds == ["warning", "cap"]
    warning = events[0]
    assert warning["rule"] == "turns" and warning["cap_tokens"] == 400
    assert warning["used_tokens"] >= 100 and warning["warn_at"] == 0.25
    assert warning["resets_at"] == "2026-12-06T00:00:00+00:00"
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 2
    assert "budget 'turns' passed 25%" in lines[0] and "has reached its cap" in lines[1]


def test_the_storm_breaker_trips_refuses_one_purpose_and_resets(
    make_service: ServiceFactory, emulator: Any, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    service = make_service(storm_breaker={"calls": 3, "seconds": 60, "cooldown_seconds": 30})
    events: list[dict[str, Any]] = []
    service.on_budget_event(events.append)
    caplog.set_level(logging.WARNING, logger="headspace_inference.inference.budget")
    for i in range(3):
        service.infer("turn", "loop", f"hook {i}")
        clock.advance(1)
    with pytest.raises(CallStormError) as refused:
        service.infer("turn", "loop", "hook 3")
    assert refused.value.retry_after == pytest.approx(30.0)
    assert refused.value.rule == "storm_breaker" and not refused.value.retryable
    with pytest.raises(CallStormError):
        service.infer("turn", "loop", "hook 4")
    assert service.infer("turn", "other", "hook 3").text  # other purposes run on
    assert service.infer("turn", "loop", "hook 0").cached  # a hit is never refused
    assert chat_count(emulator) == 4
    clock.advance(31)
    assert not service.infer("turn", "loop", "hook 5").cached  # reset by itself
    assert [e["kind"] for e in events] == ["storm"]
    assert events[0]["purpose"] == "loop" and events[0]["cooldown_seconds"] == 30
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "storm breaker tripped: purpose 'loop'" in lines[0]
    statuses = [(r.purpose, r.status, r.error_type) for r in service_rows(service)]
    assert statuses.count(("loop", "over_budget", "CallStormError")) == 2


def add_projects(service: InferenceService, *ids: int) -> None:
    with service.database.engine.begin() as conn:
        for project in ids:
            conn.execute(
                text("INSERT INTO projects (id, name, created_at) VALUES (:id, :name, :t)"),
                {"id": project, "name": f"p{project}", "t": "2026-01-01 00:00:00"},
            )


def test_a_rule_for_each_project_caps_each_apart(
    make_service: ServiceFactory, emulator: Any
) -> None:
    service = make_service(
        budgets=[{"name": "per-project", "scope": {"project_id": "each"}, "window": "month",
                  "cap_tokens": 120}]
    )  # fmt: skip
    add_projects(service, 1, 2)
    service.infer("turn", "summarise", "one" + INPUT, max_tokens=100, project_id=1)
    with pytest.raises(BudgetExceededError) as refused:
        service.infer("turn", "summarise", "two" + INPUT, max_tokens=100, project_id=1)
    assert "for project 1" in str(refused.value)
    service.infer("turn", "summarise", "two" + INPUT, max_tokens=100, project_id=2)
    service.infer("turn", "summarise", "no project" + INPUT, max_tokens=100)  # not counted
    states = service.budget()
    assert [s["project_id"] for s in states] == [1, 2]
    assert all(s["resets_at"] == "2027-01-01T00:00:00+00:00" for s in states)
    (three,) = service.budget(project_id=3)
    assert (three["project_id"], three["used_tokens"], three["left_tokens"]) == (3, 0, 120)
    assert service.budget(level="turn", project_id=2) == [states[1]]


def test_a_route_with_fallbacks_reserves_at_its_dearest_model(
    make_service: ServiceFactory, emulator: Any
) -> None:
    service = make_service(
        models={"turn": ["anthropic/claude-haiku-4.5", "anthropic/claude-sonnet-4.5"]},
        budgets=[{"window": "day", "cap_usd": 0.0015}],
    )
    # Sonnet's worst case: 11 x 3.75 + 100 x 15 = 1541 µ$, over the cap; Haiku's is not.
    with pytest.raises(BudgetExceededError):
        service.infer("turn", "summarise", INPUT, max_tokens=100)
    assert chat_count(emulator) == 0
    assert service.infer("turn", "summarise", INPUT, max_tokens=90).text


def test_status_shows_each_budget_and_where_it_is_counted(
    make_service: ServiceFactory, emulator: Any, store: str
) -> None:
    service = make_service(budgets=[{"name": "all", "window": "day", "cap_usd": 2}])
    service.infer("turn", "summarise", INPUT, max_tokens=100)
    status = service.status()
    (state,) = status["budgets"]
    assert state["rule"] == "all" and state["cap_usd"] == 2
    assert state["used_usd"] == pytest.approx(float(emulator.charged().cost), abs=1e-9)
    guard = status["spend_guard"]
    assert (guard["store"], guard["shared"], guard["reason"]) == (store, True, None)
    assert guard["storm_breaker"]["enabled"] is True


def cuttable_redis(proxy: TcpProxy, server_url: str, prefix: str) -> dict[str, Any]:
    """A redis section through ``proxy``, whose guard tries Redis again soon after a cut."""
    return {
        "url": redis_url_through(proxy, server_url),
        "key_prefix": prefix,
        "retry_interval_seconds": RETRY_INTERVAL,
        "socket_timeout_seconds": 0.2,
    }


@pytest.mark.parametrize("store", ["redis"], indirect=True)
def test_with_redis_cut_each_process_keeps_the_caps_and_pays_back_when_it_returns(
    make_service: ServiceFactory,
    emulator: Any,
    redis_proxy: TcpProxy,
    redis_server_url: str,
    redis_prefix: str,
) -> None:
    service = make_service(
        redis_section=cuttable_redis(redis_proxy, redis_server_url, redis_prefix),
        budgets=[{"name": "turns", "window": "day", "cap_tokens": 300}],
    )
    results = [service.infer("turn", "summarise", "before" + INPUT[6:], max_tokens=100)]
    redis_proxy.cut()
    spent = lambda: sum(r.input_tokens + r.output_tokens for r in results)  # noqa: E731
    # Cut off, the process stands in from the use it last saw: the cap still holds here.
    while spent() + WORST <= 300:
        results.append(
            service.infer("turn", "summarise", f"cut{len(results):02d}" + INPUT[5:], max_tokens=100)
        )
    with pytest.raises(BudgetExceededError):
        service.infer("turn", "summarise", "refused while cut" + INPUT, max_tokens=100)
    status = service.status()
    assert status["state"] == "degraded" and not status["spend_guard"]["shared"]
    assert "Redis unreachable" in status["spend_guard"]["reason"]
    assert status["budgets"][0]["used_tokens"] == spent()  # the stand-in's count
    redis_proxy.restore()
    time.sleep(RETRY_INTERVAL * 2)  # the guard tries Redis again after its interval
    with pytest.raises(BudgetExceededError):  # refused by Redis, which was paid back
        service.infer("turn", "summarise", "refused by redis" + INPUT, max_tokens=100)
    direct = redis_lib.Redis.from_url(redis_server_url)
    try:
        (key,) = [k for k in direct.scan_iter(match=f"{redis_prefix}:budget:turns|*")]
        counted = {k.decode(): int(v) for k, v in direct.hgetall(key).items()}
    finally:
        direct.close()
    assert counted["tokens:"] == spent()  # every call made while cut is in Redis, once
    assert service.status()["spend_guard"]["shared"]
    assert chat_count(emulator) == len(results)


@pytest.mark.parametrize("store", ["redis"], indirect=True)
def test_a_window_that_began_while_redis_was_cut_is_paid_back_in_full(
    make_service: ServiceFactory,
    emulator: Any,
    clock: FakeClock,
    redis_proxy: TcpProxy,
    redis_server_url: str,
    redis_prefix: str,
) -> None:
    service = make_service(
        redis_section=cuttable_redis(redis_proxy, redis_server_url, redis_prefix),
        budgets=[{"name": "daily", "window": "day", "cap_tokens": 10_000}],
    )
    service.infer("turn", "summarise", "yesterday" + INPUT, max_tokens=100)
    redis_proxy.cut()
    clock.advance(60)  # a new day, which Redis has not seen
    today = service.infer("turn", "summarise", "today" + INPUT, max_tokens=100)
    redis_proxy.restore()
    time.sleep(RETRY_INTERVAL * 2)
    service.infer("turn", "summarise", "today again" + INPUT, max_tokens=100)
    (state,) = service.budget()  # read from Redis again
    assert service.status()["spend_guard"]["shared"]
    direct = redis_lib.Redis.from_url(redis_server_url)
    try:
        day = int(datetime(2026, 12, 6, tzinfo=UTC).timestamp())
        counted = direct.hgetall(f"{redis_prefix}:budget:daily|day|{day}")
    finally:
        direct.close()
    last = service_rows(service)[-1]
    assert int(counted[b"tokens:"]) == (
        today.input_tokens + today.output_tokens + last.input_tokens + last.output_tokens
    )
    assert state["used_tokens"] == int(counted[b"tokens:"])


def test_a_call_over_the_whole_cap_leaves_the_windows_cap_alert_for_when_it_is_reached(
    make_service: ServiceFactory, emulator: Any
) -> None:
    service = make_service(budgets=[{"name": "small", "window": "day", "cap_tokens": 240}])
    events: list[dict[str, Any]] = []
    service.on_budget_event(events.append)
    with pytest.raises(BudgetExceededError, match="more than the whole cap"):
        service.infer("turn", "summarise", INPUT, max_tokens=300)
    assert events == []  # nothing was used: no alert given, none used up
    for i in range(6):
        with contextlib.suppress(BudgetExceededError):
            service.infer("turn", "summarise", f"{i:02d}" + INPUT[2:], max_tokens=100)
    assert [e["kind"] for e in events] == ["warning", "cap"]


@pytest.mark.slow
def test_with_the_database_cut_the_breaker_counts_each_call_once(
    emulator: Any,
    tmp_path: Path,
    clock: FakeClock,
    postgres_proxy: tuple[TcpProxy, str],
) -> None:
    proxy, url = postgres_proxy
    settings = load_settings(
        tmp_path / "none.yaml",
        overrides=settings_for(
            url, emulator, tmp_path,
            openrouter={"budgets": [{"window": "day", "cap_usd": 10}],
                        "storm_breaker": {"calls": 2, "seconds": 60, "cooldown_seconds": 60}},
            redis={"retry_interval_seconds": 60},
        ),
        environ={},
    )  # fmt: skip
    service = InferenceService.from_settings(
        settings, standalone_database(settings.database), spool_dir=tmp_path / "spool", clock=clock
    )
    try:
        service.infer("turn", "loop", "one")
        proxy.cut()
        service.infer("turn", "loop", "two")  # the guard falls back, the call goes on
        assert not service.status()["spend_guard"]["shared"]
        with pytest.raises(CallStormError):  # the third in a minute: one count, not two
            service.infer("turn", "loop", "three")
    finally:
        proxy.restore()
        service.close(timeout=5)
