"""The inference service end to end: real HTTP to the emulator, real databases."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool
from tests.service_fixtures import CHAT, AppFactory, assert_row_is_the_bill, rows, settings_for

from headspace_inference import create_app
from headspace_inference.calllog.models import InferenceCall
from headspace_inference.clock import FakeClock
from headspace_inference.config_loading import load_settings
from headspace_inference.inference import (
    CancelledCallError,
    EmptyResponseError,
    InferenceDisabledError,
    InferenceError,
    InputTooLargeError,
    InvalidRequestError,
    NotConfiguredError,
    QueueFullError,
    RateLimitedError,
    ShuttingDownError,
    UnknownEntityError,
    UnknownLevelError,
    UpstreamServerError,
)
from headspace_inference.inference.service import InferenceService
from headspace_inference.settings import normalise_url
from headspace_inference.standalone.database import standalone_database
from headspace_inference.testing.emulator import Fault


def chat_bodies(emulator: Any) -> list[dict[str, Any]]:
    return [r.body for r in emulator.requests if r.path == CHAT]


def test_levels_route_to_their_models_and_each_call_is_logged(
    make_app: AppFactory, emulator: Any
) -> None:
    app = make_app()
    service: InferenceService = app.extensions["inference"]
    results = {
        level: service.infer(level, f"{level} summary", f"input for {level}")
        for level in ("turn", "task", "project", "objective")
    }
    models = [b["model"] for b in chat_bodies(emulator)]
    assert models == [
        "anthropic/claude-haiku-4.5",
        "anthropic/claude-haiku-4.5",
        "anthropic/claude-sonnet-4.5",
        "anthropic/claude-sonnet-4.5",
    ]
    logged = rows(app)
    assert [(r.level, r.model, r.status, r.cached) for r in logged] == [
        ("turn", "anthropic/claude-haiku-4.5", "ok", False),
        ("task", "anthropic/claude-haiku-4.5", "ok", False),
        ("project", "anthropic/claude-sonnet-4.5", "ok", False),
        ("objective", "anthropic/claude-sonnet-4.5", "ok", False),
    ]
    prices = {"anthropic/claude-haiku-4.5": (1, 5), "anthropic/claude-sonnet-4.5": (3, 15)}
    for row in logged:
        result = results[row.level]
        assert row.request_id == result.call_id
        assert row.result_text == result.text and result.text
        assert row.input_tokens == result.input_tokens > 0
        assert row.output_tokens == result.output_tokens > 0
        p_in, p_out = prices[row.model]
        expected = (Decimal(row.input_tokens * p_in + row.output_tokens * p_out)) / 10**6
        assert row.cost_usd == expected
        assert result.cost_usd == pytest.approx(float(expected))
        assert row.upstream_cost_usd is not None
        assert row.generation_id and row.generation_id.startswith("gen-")
        assert row.attempts == 1
        assert len(row.input_hash) == 64
        assert row.purpose == f"{row.level} summary"
        assert row.error_message is None


def test_cache_hit_is_flagged_free_logged_and_makes_no_upstream_call(
    make_app: AppFactory, emulator: Any
) -> None:
    app = make_app()
    service: InferenceService = app.extensions["inference"]
    first = service.infer("turn", "summarise", "the same words")
    second = service.infer("turn", "summarise", "the same words")
    assert len(chat_bodies(emulator)) == 1
    assert not first.cached and second.cached
    assert second.text == first.text
    assert second.cost_usd == 0.0
    assert second.call_id != first.call_id
    fresh, hit = rows(app)
    assert hit.cached and hit.status == "cached"
    assert hit.cost_usd == 0
    assert hit.saved_cost_usd == fresh.cost_usd
    assert hit.input_hash == fresh.input_hash


def test_same_text_at_a_level_with_another_model_is_not_served_from_cache(
    make_app: AppFactory, emulator: Any
) -> None:
    service: InferenceService = make_app().extensions["inference"]
    service.infer("turn", "p", "shared text")
    task = service.infer("task", "p", "shared text")  # same model as turn: a hit
    project = service.infer("project", "p", "shared text")  # another model: a miss
    assert task.cached and not project.cached
    assert [b["model"] for b in chat_bodies(emulator)] == [
        "anthropic/claude-haiku-4.5",
        "anthropic/claude-sonnet-4.5",
    ]
    other = service.infer("turn", "p", "shared text", max_tokens=17)
    assert not other.cached


def test_cache_entry_expires_on_the_injected_clock(
    database_url: str, emulator: Any, tmp_path: Path
) -> None:
    settings = load_settings(
        tmp_path / "none.yaml",
        overrides=settings_for(
            database_url, emulator, tmp_path, openrouter={"cache": {"ttl_seconds": 60}}
        ),
        environ={},
    )
    clock = FakeClock()
    service = InferenceService.from_settings(
        settings, standalone_database(settings.database), spool_dir=tmp_path / "spool", clock=clock
    )
    try:
        assert not service.infer("turn", "p", "ttl text").cached
        clock.advance(59)
        assert service.infer("turn", "p", "ttl text").cached
        clock.advance(2)
        assert not service.infer("turn", "p", "ttl text").cached
        assert len(chat_bodies(emulator)) == 2
    finally:
        service.close()


def test_fifty_threads_with_one_input_make_one_upstream_request(
    make_app: AppFactory, emulator: Any
) -> None:
    app = make_app()
    service: InferenceService = app.extensions["inference"]
    emulator.set_latency(300)
    barrier = threading.Barrier(50)
    results: list[Any] = []

    def call() -> None:
        barrier.wait()
        results.append(service.infer("project", "score", "one input for all"))

    threads = [threading.Thread(target=call) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(chat_bodies(emulator)) == 1
    assert len({r.text for r in results}) == 1
    assert sum(not r.cached for r in results) == 1
    logged = rows(app)
    assert len(logged) == 50
    assert sum(r.status == "ok" for r in logged) == 1
    assert sum(r.status == "cached" for r in logged) == 49


def test_upstream_failure_after_retries_is_logged_and_raised(
    make_app: AppFactory, emulator: Any
) -> None:
    app = make_app()
    service: InferenceService = app.extensions["inference"]
    emulator.script([Fault(status=500)] * 3)
    with pytest.raises(UpstreamServerError) as info:
        service.infer("turn", "p", "fails three times")
    assert info.value.retryable and info.value.status_code == 500
    assert len(chat_bodies(emulator)) == 3
    (row,) = rows(app)
    assert row.status == "error" and row.error_type == "UpstreamServerError"
    assert row.attempts == 3
    assert row.result_text is None and row.cost_usd is None
    assert "500" in (row.error_message or "")
    # Recovery after two failures: one result, three requests, one row with 3 attempts.
    emulator.script([Fault(status=502), Fault(status=503)])
    result = service.infer("turn", "p", "recovers")
    assert result.attempts == 3
    assert rows(app)[-1].status == "ok"


def test_local_rate_limit_rejection_is_logged_with_retry_after(
    make_app: AppFactory, emulator: Any
) -> None:
    app = make_app(openrouter={"rate_limits": {"calls_per_minute": 2, "max_wait_seconds": 0}})
    service: InferenceService = app.extensions["inference"]
    service.infer("turn", "p", "one")
    service.infer("turn", "p", "two")
    with pytest.raises(RateLimitedError) as info:
        service.infer("turn", "p", "three")
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 60
    assert len(chat_bodies(emulator)) == 2
    assert [r.status for r in rows(app)] == ["ok", "ok", "rate_limited"]
    # A cache hit is not counted against the limit.
    assert service.infer("turn", "p", "one").cached


def test_a_retry_the_limiter_refuses_keeps_the_attempts_that_reached_openrouter(
    make_app: AppFactory, emulator: Any
) -> None:
    # The first attempt is admitted and fails with a 500; its retry finds the limiter full.
    # The row must say one attempt reached OpenRouter (it said 0: the refusal was carried
    # out of the retry loop past the attempt count).
    limits = {"calls_per_minute": 1, "max_wait_seconds": 0}
    app = make_app(openrouter={"retry": {"max_attempts": 3}, "rate_limits": limits})
    service: InferenceService = app.extensions["inference"]
    emulator.script([Fault(status=500)])
    with pytest.raises(RateLimitedError) as info:
        service.infer("turn", "p", "fails, then waits too long")
    assert info.value.attempts == 1
    assert len(chat_bodies(emulator)) == 1
    [row] = rows(app)
    assert (row.status, row.attempts, row.error_type) == ("rate_limited", 1, "RateLimitedError")


def test_upstream_429_pauses_the_limiter_for_everyone(make_app: AppFactory, emulator: Any) -> None:
    app = make_app(
        openrouter={
            "retry": {"max_attempts": 1},
            "rate_limits": {"max_wait_seconds": 0},
        }
    )
    service: InferenceService = app.extensions["inference"]
    emulator.script([Fault(status=429, retry_after=20)])
    with pytest.raises(InferenceError) as info:
        service.infer("turn", "p", "hits the upstream limit")
    assert info.value.status_code == 429
    # Someone else's call now waits for the pause instead of going upstream.
    with pytest.raises(RateLimitedError) as waiting:
        service.infer("task", "p", "another caller")
    assert waiting.value.retry_after is not None and waiting.value.retry_after > 15
    assert len(chat_bodies(emulator)) == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"level": "epic"}, UnknownLevelError, "level must be one of"),
        ({"input_text": ""}, InvalidRequestError, "input_text must not be empty"),
        ({"input_text": "   "}, InvalidRequestError, "input_text must not be empty"),
        ({"input_text": 42}, InvalidRequestError, "input_text must be a string"),
        ({"input_text": "x" * 101}, InputTooLargeError, "101 characters; the limit is 100"),
        ({"input_text": "bad \ud800"}, InvalidRequestError, "lone surrogate"),
        ({"purpose": ""}, InvalidRequestError, "purpose must not be empty"),
        ({"project_id": 0}, InvalidRequestError, "project_id must be a positive integer"),
        ({"agent_id": True}, InvalidRequestError, "agent_id must be a positive integer"),
        ({"project_id": 404}, UnknownEntityError, "project_id 404 does not exist"),
        ({"turn_id": 9}, UnknownEntityError, "turn_id 9 does not exist"),
        ({"max_tokens": 0}, InvalidRequestError, "max_tokens must be an integer"),
        ({"temperature": float("nan")}, InvalidRequestError, "temperature must be a number"),
        # What the database or the upstream cannot take is refused too, before any spend.
        ({"project_id": 3_000_000_000}, InvalidRequestError, "project_id must be a positive"),
        ({"command_id": 2**63}, InvalidRequestError, "command_id must be a positive"),
        ({"temperature": 10**400}, InvalidRequestError, "temperature must be a number"),
        ({"max_tokens": 10**5000}, InvalidRequestError, "max_tokens must be an integer"),
    ],
)
def test_bad_arguments_raise_before_any_upstream_call(
    make_app: AppFactory, emulator: Any, kwargs: dict[str, Any], error: type, words: str
) -> None:
    app = make_app(inference={"max_input_chars": 100})
    service: InferenceService = app.extensions["inference"]
    call: dict[str, Any] = {"level": "turn", "purpose": "p", "input_text": "fine"} | kwargs
    for method in (service.infer, service.submit):
        with pytest.raises(error, match=words):
            method(call.pop("level"), call.pop("purpose"), call.pop("input_text"), **call)
        call = {"level": "turn", "purpose": "p", "input_text": "fine"} | kwargs
    assert chat_bodies(emulator) == []


def test_an_unknown_keyword_is_a_type_error_before_any_spend(
    make_app: AppFactory, emulator: Any
) -> None:
    app = make_app()
    service: InferenceService = app.extensions["inference"]
    for method in (service.infer, service.submit):
        with pytest.raises(TypeError, match="unexpected keyword argument 'project'"):
            method("turn", "p", "text", project=1)  # type: ignore[call-arg]
    assert chat_bodies(emulator) == []
    assert rows(app) == []


def test_links_to_existing_rows_are_stored(make_app: AppFactory, emulator: Any) -> None:
    app = make_app()
    engine = app.extensions["inference"].database.engine
    with engine.begin() as conn:
        now = {"t": "2026-01-01 00:00:00"}
        conn.execute(text("INSERT INTO projects (id, name, created_at) VALUES (1, 'p', :t)"), now)
        conn.execute(text("INSERT INTO agents (id, project_id, created_at) VALUES (2, 1, :t)"), now)
        conn.execute(
            text("INSERT INTO commands (id, agent_id, state, created_at) VALUES (3, 2, 'x', :t)"),
            now,
        )
        conn.execute(
            text("INSERT INTO turns (id, command_id, actor, created_at) VALUES (4, 3, 'a', :t)"),
            now,
        )
    service: InferenceService = app.extensions["inference"]
    service.infer("turn", "p", "linked", project_id=1, agent_id=2, command_id=3, turn_id=4)
    (row,) = rows(app)
    assert (row.project_id, row.agent_id, row.command_id, row.turn_id) == (1, 2, 3, 4)


def test_no_key_is_a_degraded_start_and_calls_are_refused_and_logged(
    make_app: AppFactory, emulator: Any
) -> None:
    app = make_app(openrouter={"api_key": None})
    service: InferenceService = app.extensions["inference"]
    status = service.status()
    assert status["state"] == "degraded" and "API key" in status["reason"]
    # Nothing to probe OpenRouter with: the status says so and asks nothing.
    assert (status["openrouter"]["state"], status["openrouter"]["reachable"]) == ("no_key", False)
    assert status["openrouter"]["error"] and status["openrouter"]["api_key_configured"] is False
    with pytest.raises(NotConfiguredError, match="OPENROUTER_API_KEY"):
        service.infer("turn", "p", "x")
    with pytest.raises(NotConfiguredError):
        service.submit("turn", "p", "y")
    assert [r.status for r in rows(app)] == ["refused", "refused"]
    assert emulator.requests == []


def test_disabled_service_refuses_and_logs(make_app: AppFactory, emulator: Any) -> None:
    app = make_app(openrouter={"enabled": False})
    service: InferenceService = app.extensions["inference"]
    for _ in range(2):
        status = service.status()
        assert status["state"] == "disabled"
        assert (status["openrouter"]["state"], status["openrouter"]["reachable"]) == (
            "disabled",
            False,
        )
    with pytest.raises(InferenceDisabledError):
        service.infer("turn", "p", "x")
    assert [(r.status, r.error_type) for r in rows(app)] == [("refused", "InferenceDisabledError")]
    assert emulator.requests == []


def test_unreachable_openrouter_is_degraded_not_a_crash(
    database_url: str, tmp_path: Path, emulator: Any
) -> None:
    class Closed:
        base_url = "http://127.0.0.1:9/api/v1"

    app = create_app(
        overrides=settings_for(
            database_url, Closed, tmp_path, openrouter={"retry": {"max_attempts": 2}}
        )
    )
    service: InferenceService = app.extensions["inference"]
    try:
        status = service.status()
        assert status["state"] == "degraded"
        assert status["openrouter"]["reachable"] is False
        with pytest.raises(InferenceError) as info:
            service.infer("turn", "p", "nobody home")
        assert info.value.retryable and info.value.attempts == 2
        assert [r.status for r in rows(app)] == ["error"]
    finally:
        service.close()


def test_a_flask_route_answers_while_slow_inferences_are_in_flight(
    make_app: AppFactory, emulator: Any
) -> None:
    app = make_app(inference={"workers": 20})
    service: InferenceService = app.extensions["inference"]
    emulator.set_latency(1500)
    futures = [service.submit("turn", "slow", f"slow input {i}") for i in range(20)]
    response = app.test_client().get("/api/inference/status")
    in_flight_when_answered = sum(not f.done() for f in futures)
    assert response.status_code == 200
    assert in_flight_when_answered == 20
    assert all(not f.result(timeout=30).cached for f in futures)
    assert len(rows(app)) == 20


def test_infer_on_a_request_thread_works_and_warns_once(
    make_app: AppFactory, emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    service: InferenceService = app.extensions["inference"]
    caplog.set_level(logging.WARNING, logger="headspace_inference")
    service.infer("turn", "p", "outside any request")
    assert not [r for r in caplog.records if "request thread" in r.getMessage()]
    with app.test_request_context("/"):
        assert service.infer("turn", "p", "in a handler").text
        service.infer("turn", "p", "in a handler, again")
    warned = [r for r in caplog.records if "request thread" in r.getMessage()]
    assert len(warned) == 1 and "submit()" in warned[0].getMessage()


def test_full_queue_fails_at_once_with_retry_after_and_is_logged(
    make_app: AppFactory, emulator: Any
) -> None:
    app = make_app(inference={"workers": 1, "queue_size": 1})
    service: InferenceService = app.extensions["inference"]
    emulator.set_latency(500)
    running = service.submit("turn", "p", "first")
    while not running.running():
        threading.Event().wait(0.01)
    queued = service.submit("turn", "p", "second")
    with pytest.raises(QueueFullError) as info:
        service.submit("turn", "p", "third")
    assert info.value.retryable and info.value.retry_after and info.value.retry_after > 0
    running.result(timeout=10)
    queued.result(timeout=10)
    assert sorted(r.status for r in rows(app)) == ["ok", "ok", "refused"]


def test_shutdown_finishes_running_cancels_queued_and_flushes(
    make_app: AppFactory, emulator: Any, tmp_path: Path
) -> None:
    app = make_app(inference={"workers": 2, "queue_size": 50})
    service: InferenceService = app.extensions["inference"]
    emulator.set_latency(400)
    futures: list[Future[Any]] = [service.submit("turn", "p", f"job {i}") for i in range(10)]
    while sum(f.running() for f in futures) < 2:
        threading.Event().wait(0.01)
    service.close(timeout=10)
    outcomes = []
    for f in futures:
        try:
            outcomes.append(("ok", f.result(timeout=0)))
        except CancelledCallError:
            outcomes.append(("cancelled", None))
    assert [o for o, _ in outcomes].count("ok") == 2
    assert [o for o, _ in outcomes].count("cancelled") == 8
    with pytest.raises(ShuttingDownError):
        service.submit("turn", "p", "too late")
    with pytest.raises(ShuttingDownError):
        service.infer("turn", "p", "too late")
    url = app.extensions["inference"].database.url
    engine = create_engine(normalise_url(url), poolclass=NullPool)
    with Session(engine) as session:
        statuses = sorted(session.scalars(select(InferenceCall.status)))
    engine.dispose()
    assert statuses == ["cancelled"] * 8 + ["ok"] * 2
    # The two refusals after shutdown are journalled for the next start, not lost.
    journals = list((tmp_path / "spool").glob("calls-*.jsonl"))
    lines = [line for j in journals for line in j.read_text().splitlines()]
    assert len(lines) == 2 and all('"refused"' in line for line in lines)


def test_a_call_outliving_the_shutdown_timeout_ends_in_an_inference_error_and_a_row(
    make_app: AppFactory, emulator: Any, tmp_path: Path
) -> None:
    # Shutdown waits 0.05 s, then closes the client under a call still waiting on
    # OpenRouter. The call must end as an InferenceError (not httpx's RuntimeError about a
    # closed client), without another attempt, and its row must survive to the next start.
    app = make_app(
        openrouter={"retry": {"max_attempts": 3}},
        inference={"shutdown_timeout_seconds": 0.05},
    )
    service: InferenceService = app.extensions["inference"]
    emulator.set_latency(1000)
    future = service.submit("turn", "p", "outlives the shutdown")
    while emulator.request_count(CHAT) < 1:
        threading.Event().wait(0.01)
    service.close()
    with pytest.raises(InferenceError) as caught:
        future.result(timeout=30)
    assert not caught.value.retryable
    assert "closed while the request was in flight" in str(caught.value)
    assert emulator.request_count(CHAT) == 1
    emulator.set_latency(0)
    restarted = make_app()  # same database and spool: replays the journal
    [row] = rows(restarted)
    assert (row.status, row.error_type, row.purpose) == ("error", "UpstreamError", "p")


class _Bug(httpx.BaseTransport):
    """A layer below the client that fails with a bug, not with anything HTTP."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        raise KeyError("a bug")


def test_an_unexpected_exception_below_the_service_still_leaves_a_row(
    database_url: str, emulator: Any, tmp_path: Path
) -> None:
    # Fault injection through httpx's transport seam: a bug (not an InferenceError) raised
    # where OpenRouter's answer would come from.
    settings = load_settings(
        tmp_path / "none.yaml", overrides=settings_for(database_url, emulator, tmp_path),
        environ={},
    )  # fmt: skip
    database = standalone_database(settings.database)
    service = InferenceService.from_settings(
        settings, database, spool_dir=tmp_path / "spool", transport=_Bug()
    )
    try:
        with pytest.raises(KeyError):
            service.infer("turn", "p", "meets a bug")
        with pytest.raises(KeyError):
            service.submit("task", "p", "meets a bug in a worker").result(timeout=30)
        assert service.recorder.flush(timeout=30)
        with database.sessions() as session:
            found = list(session.scalars(select(InferenceCall).order_by(InferenceCall.id)))
    finally:
        service.close()
        database.dispose()
    assert [(r.level, r.status, r.error_type) for r in found] == [
        ("turn", "error", "KeyError"),
        ("task", "error", "KeyError"),
    ]


def test_a_200_with_no_choices_that_reports_usage_is_counted_in_its_calls_row(
    make_app: AppFactory, emulator: Any
) -> None:
    # OpenRouter charged each answer it sent with usage, the ones the client refused too.
    app = make_app(openrouter={"retry": {"max_attempts": 3, "base_delay_seconds": 0.0}})
    service: InferenceService = app.extensions["inference"]
    emulator.script([Fault(no_choices=True), Fault(no_choices=True)])
    result = service.infer("turn", "summary", "count me")
    charged = emulator.charged()
    assert charged.answers == 3 and result.attempts == 3
    (row,) = rows(app)
    assert_row_is_the_bill(row, charged, "ok", 3)
    # All three failed the same way: the error row counts every one of them.
    emulator.script([Fault(no_choices=True)] * 3)
    with pytest.raises(EmptyResponseError):
        service.infer("turn", "summary", "count me again")
    error_row = rows(app)[1]
    assert (error_row.status, error_row.attempts) == ("error", 3)
    assert error_row.upstream_cost_usd == emulator.charged().cost - charged.cost > 0
    assert error_row.cost_usd is not None and error_row.cost_usd > 0
