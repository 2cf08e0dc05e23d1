"""FakeInferenceService: scripted answers, recorded calls, and the real service's refusals."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from pydantic import BaseModel

from headspace_inference import create_app
from headspace_inference.clock import FakeClock
from headspace_inference.inference.errors import (
    InferenceError,
    NotConfiguredError,
    RateLimitedError,
    ShuttingDownError,
    StructuredAnswerError,
    UpstreamRateLimitError,
    UpstreamServerError,
)
from headspace_inference.inference.service import InferenceService
from headspace_inference.operate.schemas import Call
from headspace_inference.testing import (
    FakeCall,
    FakeInferenceService,
    FakePurge,
    UnscriptedCallError,
    inference_result,
)
from headspace_inference.testing.emulator import Fault
from tests.service_fixtures import settings_for

HOST_LEVELS = ["turn", "command", "project", "objective"]


@pytest.fixture
def fake() -> FakeInferenceService:
    return FakeInferenceService(levels=HOST_LEVELS)


# --------------------------------------------------------------------------- the script


def test_queued_answers_are_used_once_in_order(fake: FakeInferenceService) -> None:
    fake.script("first", "second")

    texts = [fake.infer(level="turn", purpose="p", input_text="x").text for _ in range(2)]

    assert texts == ["first", "second"]
    assert fake.unused == []
    with pytest.raises(UnscriptedCallError, match="'turn', purpose 'p'"):
        fake.infer(level="turn", purpose="p", input_text="x")


def test_answers_by_level_and_purpose(fake: FakeInferenceService) -> None:
    fake.script("a command summary", level="command")
    fake.always("scored", level="objective", purpose="priority_scoring")
    fake.always("any turn", level="turn")
    fake.always("anything")

    assert fake.infer(level="turn", purpose="summarise_turn", input_text="x").text == "any turn"
    assert fake.infer(level="command", purpose="c", input_text="x").text == "a command summary"
    assert fake.infer(level="command", purpose="c", input_text="x").text == "anything"
    scored = fake.infer(level="objective", purpose="priority_scoring", input_text="x")
    assert scored.text == "scored"
    assert fake.infer(level="objective", purpose="other", input_text="x").text == "anything"


def test_a_text_answer_is_a_result_at_the_calls_level(fake: FakeInferenceService) -> None:
    fake.always("Done.")

    result = fake.infer(level="project", purpose="progress_summary", input_text="x" * 400)

    assert result.level == "project"
    assert result.purpose == "progress_summary"
    assert result.model == "anthropic/claude-sonnet-4.5"
    assert (result.input_tokens, result.output_tokens) == (100, 2)
    assert result.cost_usd == pytest.approx((100 * 3.0 + 2 * 15.0) / 1e6)
    assert result.cached is False


def test_a_scripted_result_is_returned_as_it_is(fake: FakeInferenceService) -> None:
    scripted = inference_result(text="t", input_tokens=50, output_tokens=10, model="m")
    fake.script(scripted)

    assert fake.infer(level="turn", purpose="p", input_text="x") is scripted


def test_scripted_errors_are_raised(fake: FakeInferenceService) -> None:
    error = UpstreamRateLimitError("slow down", retry_after=3.0, status_code=429)
    fake.script(error, UpstreamServerError)

    with pytest.raises(UpstreamRateLimitError) as raised:
        fake.infer(level="turn", purpose="p", input_text="x")
    assert raised.value is error
    with pytest.raises(UpstreamServerError, match="scripted UpstreamServerError"):
        fake.infer(level="turn", purpose="p", input_text="x")
    assert [type(call.error) for call in fake.calls] == [
        UpstreamRateLimitError,
        UpstreamServerError,
    ]


@pytest.mark.parametrize(
    "answer", [RuntimeError("API failure"), ValueError, 42, None, StructuredAnswerError]
)
def test_what_the_real_service_never_gives_cannot_be_scripted(
    fake: FakeInferenceService, answer: Any
) -> None:
    with pytest.raises(TypeError, match=r"InferenceError|scripted answer|more than a message"):
        fake.script(answer)


def test_an_answer_can_be_a_function_of_the_call(fake: FakeInferenceService) -> None:
    fake.always(lambda call: f"echo {call.input_text} for {call.project_id}")

    assert fake.infer(level="turn", purpose="p", input_text="hi", project_id=3).text == (
        "echo hi for 3"
    )


def test_a_function_gives_an_answer_not_another_function(fake: FakeInferenceService) -> None:
    fake.always(lambda call: lambda again: "x")

    with pytest.raises(TypeError, match="InferenceError; got function"):
        fake.infer(level="turn", purpose="p", input_text="x")
    assert isinstance(fake.calls[0].error, TypeError)


def test_a_default_answers_what_nothing_else_does() -> None:
    fake = FakeInferenceService(default="fallback")

    assert fake.infer(level="task", purpose="p", input_text="x").text == "fallback"


def test_a_script_for_an_unknown_level_is_refused(fake: FakeInferenceService) -> None:
    with pytest.raises(InferenceError, match="level must be one of turn, command"):
        fake.script("x", level="task")


# --------------------------------------------------------------------------- the record


def test_calls_record_what_was_asked_and_answered(fake: FakeInferenceService) -> None:
    fake.always("ok")

    fake.infer(
        level="turn", purpose="summarise_turn", input_text="hello",
        project_id=3, agent_id=5, command_id=10, turn_id=1,
    )  # fmt: skip
    fake.submit(level="objective", purpose="priority_scoring", input_text="agents")

    first, second = fake.calls
    assert isinstance(first, FakeCall)
    assert first.method == "infer"
    assert first.kwargs == {
        "level": "turn",
        "purpose": "summarise_turn",
        "input_text": "hello",
        "project_id": 3,
        "agent_id": 5,
        "command_id": 10,
        "turn_id": 1,
    }
    assert (first.project_id, first.agent_id, first.command_id, first.turn_id) == (3, 5, 10, 1)
    assert first.result is not None and first.result.text == "ok"
    assert second.method == "submit"
    assert second.project_id is None
    assert fake.calls_for(level="objective") == [second]
    assert fake.calls_for(purpose="summarise_turn") == [first]

    fake.reset()
    assert fake.calls == []


def test_submit_returns_a_done_future(fake: FakeInferenceService) -> None:
    fake.script("answer", UpstreamServerError("502 from the provider", status_code=502))

    ok = fake.submit(level="turn", purpose="p", input_text="x")
    failed = fake.submit(level="turn", purpose="p", input_text="x")

    assert ok.done() and ok.result().text == "answer"
    assert failed.done() and isinstance(failed.exception(), UpstreamServerError)


def test_unavailable_and_closed_refuse_as_the_real_service(fake: FakeInferenceService) -> None:
    fake.always("x")
    fake.is_available = False
    assert fake.is_available is False
    with pytest.raises(NotConfiguredError):
        fake.infer(level="turn", purpose="p", input_text="x")

    fake.is_available = True
    fake.stop()
    assert fake.is_available is False
    with pytest.raises(ShuttingDownError):
        fake.submit(level="turn", purpose="p", input_text="x")
    assert [type(call.error) for call in fake.calls] == [NotConfiguredError, ShuttingDownError]


def test_start_and_close(fake: FakeInferenceService) -> None:
    assert fake.started is False
    assert fake.start() is fake
    assert fake.started is True
    fake.close()
    assert fake.started is False


def test_init_app_puts_the_fake_where_the_hosts_code_looks(fake: FakeInferenceService) -> None:
    app = Flask("host")

    assert fake.init_app(app, extension_key="inference_service") is fake
    assert app.extensions["inference_service"] is fake
    other = Flask("default")
    second = FakeInferenceService().init_app(other)
    assert other.extensions["inference"] is second


# --------------------------------------------------------------------------- structured answers


class Summary(BaseModel):
    summary: str
    frustration_score: int


def test_a_structured_answer_is_parsed_as_the_real_service_parses_it(
    fake: FakeInferenceService,
) -> None:
    fake.script('```json\n{"summary": "s", "frustration_score": 4}\n```', "not json")

    result = fake.infer(level="turn", purpose="p", input_text="x", response_format=Summary)

    assert result.data == Summary(summary="s", frustration_score=4)
    with pytest.raises(StructuredAnswerError):
        fake.infer(level="turn", purpose="p", input_text="x", response_format=Summary)


# ----------------------------------------------------------------- the real service's checks


@pytest.fixture
def real_service(emulator: Any, tmp_path: Path) -> Iterator[InferenceService]:
    """A real service (SQLite, the emulator) whose input limit is small."""
    url = f"sqlite:///{tmp_path / 'real.db'}"
    overrides = settings_for(
        url, emulator, tmp_path,
        openrouter={"models": dict.fromkeys(HOST_LEVELS, "anthropic/claude-haiku-4.5")},
        inference={"max_input_chars": 100},
    )  # fmt: skip
    app = create_app(overrides=overrides)
    service: InferenceService = app.extensions["inference"]
    yield service
    service.close(timeout=5)


BAD_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("unknown level", {"level": "task"}),
    ("level not a string", {"level": 1}),
    ("empty purpose", {"purpose": ""}),
    ("purpose with a newline", {"purpose": "a\nb"}),
    ("empty input", {"input_text": ""}),
    ("blank input", {"input_text": "   "}),
    ("input not a string", {"input_text": b"bytes"}),
    ("input over the limit", {"input_text": "x" * 101}),
    ("input with NUL", {"input_text": "a\x00b"}),
    ("system prompt over the limit", {"system_prompt": "s" * 101}),
    ("max_tokens zero", {"max_tokens": 0}),
    ("temperature 3", {"temperature": 3}),
    ("cache without a system prompt", {"cache_system_prompt": True}),
    ("bad response_format", {"response_format": "a schema"}),
    ("project id negative", {"project_id": -1}),
    ("project id a string", {"project_id": "1"}),
    ("project that does not exist", {"project_id": 999}),
    ("unknown keyword", {"projectid": 1}),
]


@pytest.mark.parametrize(("case", "bad"), BAD_CALLS, ids=[case for case, _ in BAD_CALLS])
def test_the_fake_refuses_what_the_real_service_refuses(
    real_service: InferenceService, case: str, bad: dict[str, Any]
) -> None:
    fake = FakeInferenceService(
        settings=real_service.settings, engine=real_service.database.engine, default="ok"
    )
    call = {"level": "turn", "purpose": "p", "input_text": "hello", **bad}

    with pytest.raises((InferenceError, TypeError)) as real:
        real_service.infer(**call)
    with pytest.raises(type(real.value)) as faked:
        fake.infer(**call)

    assert str(faked.value) == str(real.value)
    assert fake.calls == []  # refused before anything, as the real one leaves no row


def test_the_fake_takes_what_the_real_service_takes(real_service: InferenceService) -> None:
    fake = FakeInferenceService(settings=real_service.settings, default="ok")
    call: dict[str, Any] = {
        "level": "command", "purpose": "summarise_command", "input_text": "x" * 100,
        "system_prompt": "be brief", "cache_system_prompt": True, "max_tokens": 50,
        "temperature": 0.2,
    }  # fmt: skip

    assert real_service.infer(**call).model == fake.infer(**call).model


def test_levels_and_settings_are_not_both_given(real_service: InferenceService) -> None:
    with pytest.raises(TypeError, match="not both"):
        FakeInferenceService(levels=HOST_LEVELS, settings=real_service.settings)
    with pytest.raises(TypeError, match="list of level names"):
        FakeInferenceService(levels="turn")


def test_levels_may_name_their_models() -> None:
    fake = FakeInferenceService(levels={"turn": "openai/gpt-4o-mini"}, default="ok")

    assert fake.infer(level="turn", purpose="p", input_text="x").model == "openai/gpt-4o-mini"


# --------------------------------------------------------------------------- purge


def test_purge_removes_the_calls_it_would_delete_and_says_how_many() -> None:
    clock = FakeClock()
    fake = FakeInferenceService(levels=HOST_LEVELS, default="ok", clock=clock)
    for project_id in (1, 2, 1):
        fake.infer(level="turn", purpose="p", input_text="x", project_id=project_id)
        clock.advance(60)
    fake.infer(level="turn", purpose="p", input_text="x")  # no project
    third = fake.calls[2].timestamp

    assert fake.purge(project_id=1, before=third) == 1  # the first only
    assert [call.project_id for call in fake.calls] == [2, 1, None]
    assert fake.purge(before=third) == 1
    assert fake.purge(project_id=1) == 1
    assert fake.purge(project_id=7) == 0
    assert [call.project_id for call in fake.calls] == [None]
    assert fake.purge(all=True) == 1
    assert fake.calls == []
    assert fake.purges[0] == FakePurge(project_id=1, before=third, removed=1)
    assert [purge.kwargs for purge in fake.purges] == [
        {"project_id": 1, "before": third},
        {"before": third},
        {"project_id": 1},
        {"project_id": 7},
        {"all": True},
    ]
    assert [purge.removed for purge in fake.purges] == [1, 1, 1, 0, 1]

    fake.reset()
    assert fake.purges == []


def test_calls_are_stamped_by_the_fake_s_clock() -> None:
    clock = FakeClock(wall_start=1_700_000_000.0)
    fake = FakeInferenceService(default="ok", clock=clock)

    fake.infer(level="turn", purpose="p", input_text="x")

    assert fake.calls[0].timestamp == datetime.fromtimestamp(1_700_000_000.0, UTC)


BAD_PURGES: list[tuple[str, dict[str, Any]]] = [
    ("no criteria", {}),
    ("all with a project", {"all": True, "project_id": 1}),
    ("all with before", {"all": True, "before": datetime.now(UTC)}),
    ("project id zero", {"project_id": 0}),
    ("project id a string", {"project_id": "1"}),
    ("project id a bool", {"project_id": True}),
    ("before naive", {"before": datetime(2025, 1, 1)}),
    ("before a string", {"before": "2025-01-01"}),
]


@pytest.mark.parametrize(("case", "bad"), BAD_PURGES, ids=[case for case, _ in BAD_PURGES])
def test_the_fake_refuses_the_purges_the_real_service_refuses(
    real_service: InferenceService, case: str, bad: dict[str, Any]
) -> None:
    fake = FakeInferenceService(settings=real_service.settings, default="ok")
    fake.infer(level="turn", purpose="p", input_text="x", project_id=1)

    with pytest.raises(ValueError) as real:
        real_service.purge(**bad)
    with pytest.raises(ValueError) as faked:
        fake.purge(**bad)

    assert str(faked.value) == str(real.value)
    assert fake.purges == []
    assert len(fake.calls) == 1


def test_the_fake_purges_what_the_real_service_purges(real_service: InferenceService) -> None:
    fake = FakeInferenceService(settings=real_service.settings, default="ok")
    for service in (real_service, fake):
        service.infer(level="turn", purpose="p", input_text="one")
        service.infer(level="turn", purpose="p", input_text="two")
    cut = datetime.now(UTC) + timedelta(hours=1)  # after every call

    assert fake.purge(before=cut) == real_service.purge(before=cut) == 2
    assert fake.purge(all=True) == real_service.purge(all=True) == 0


# --------------------------------------------------------------------------- the live feed


def test_each_recorded_call_reaches_the_callbacks_once_as_a_call(
    fake: FakeInferenceService, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[dict[str, Any]] = []

    def broken(call: dict[str, Any]) -> None:
        raise RuntimeError("the host's bug")

    fake.on_call_recorded(broken)  # logged; neither the call nor the other callback suffers
    fake.on_call_recorded(seen.append)
    scripted = inference_result(text="t", cached=True, cost_usd=0.5, latency_ms=7)
    fake.script("fresh", scripted, UpstreamServerError("502", status_code=502))
    fake.script(RateLimitedError("over the limit"))

    with caplog.at_level(logging.ERROR, logger="headspace_inference.testing.fake"):
        fresh = fake.infer(level="command", purpose="c", input_text="x", project_id=3)
    fake.submit(level="turn", purpose="p", input_text="x")
    with pytest.raises(UpstreamServerError):
        fake.infer(level="turn", purpose="p", input_text="x")
    with pytest.raises(RateLimitedError):
        fake.infer(level="turn", purpose="p", input_text="x")
    with pytest.raises(InferenceError):  # refused for its arguments: no row, no callback
        fake.infer(level="task", purpose="p", input_text="x")
    fake.is_available = False
    with pytest.raises(NotConfiguredError):  # refused as unavailable: a row
        fake.infer(level="turn", purpose="p", input_text="x")

    assert "an on_call_recorded callback failed" in caplog.text
    assert [call["id"] for call in seen] == [1, 2, 3, 4, 5]
    assert [call["status"] for call in seen] == [
        "ok", "cached", "error", "rate_limited", "refused",
    ]  # fmt: skip
    for call in seen:
        Call.model_validate(call)  # the calls API's shape
        assert list(call) == list(Call.model_fields)
    first, cached, failed = seen[:3]
    assert first["call_id"] == fresh.call_id
    assert (first["level"], first["purpose"], first["project_id"]) == ("command", "c", 3)
    assert first["model"] == fresh.model
    assert first["input_tokens"] == fresh.input_tokens
    assert first["timestamp"] == fake.calls[0].timestamp.isoformat().replace("+00:00", "Z")
    assert cached["call_id"] == scripted.call_id
    assert (cached["cost_usd"], cached["saved_cost_usd"], cached["latency_ms"]) == (0.0, 0.5, 7)
    assert (failed["error_type"], failed["error_message"]) == ("UpstreamServerError", "502")


def test_the_fake_s_call_is_the_real_service_s(
    real_service: InferenceService, emulator: Any
) -> None:
    fake = FakeInferenceService(settings=real_service.settings, default="An answer.")
    fake.script(UpstreamServerError("Upstream error 500", status_code=500), level="command")
    real: list[dict[str, Any]] = []
    faked: list[dict[str, Any]] = []
    real_service.on_call_recorded(real.append)
    fake.on_call_recorded(faked.append)
    emulator.script([Fault(status=500)] * 3)  # each of the real service's attempts
    call = {"level": "command", "purpose": "summarise_command", "input_text": "fails"}
    for service in (real_service, fake):
        with pytest.raises(UpstreamServerError):
            service.infer(**call)
    for service in (real_service, fake):
        service.infer(level="turn", purpose="summarise_turn", input_text="a turn")
    assert real_service.recorder.flush(timeout=30)

    assert len(real) == len(faked) == 2
    same = ("level", "purpose", "model", "status", "cached", "error_type", "project_id")
    for ours, theirs in zip(faked, real, strict=True):
        assert list(ours) == list(theirs)
        for key, value in ours.items():
            if value is not None and theirs[key] is not None:
                assert type(value) is type(theirs[key]), key
        assert {key: ours[key] for key in same} == {key: theirs[key] for key in same}


def test_the_fake_states_its_budgets_unspent_and_passes_on_budget_events() -> None:
    from headspace_inference.inference.errors import BudgetExceededError
    from headspace_inference.settings import OpenRouterSettings, Settings

    budgets = [{"name": "turns", "scope": {"level": "turn"}, "window": "day", "cap_usd": 2.0}]
    fake = FakeInferenceService(settings=Settings(openrouter=OpenRouterSettings(budgets=budgets)))
    (state,) = fake.budget(level="turn")
    assert (state["rule"], state["used_usd"], state["left_usd"]) == ("turns", 0.0, 2.0)
    assert fake.budget(level="project") == []
    rows: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    fake.on_call_recorded(rows.append)
    fake.on_budget_event(events.append)
    fake.script(BudgetExceededError("budget 'turns' (day) would be crossed", rule="turns"))
    with pytest.raises(BudgetExceededError):
        fake.infer("turn", "summarise", "text")
    assert rows[0]["status"] == "over_budget"  # the row the real service writes
    fake.budget_event({"kind": "warning", "rule": "turns"})
    assert events == [{"kind": "warning", "rule": "turns"}]
