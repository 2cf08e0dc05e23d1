"""Structured answers end to end: response_format sent, the answer parsed and validated,
retried when it does not fit, logged when it never does; over real HTTP to the emulator."""

from __future__ import annotations

import json
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from tests.service_fixtures import CHAT, AppFactory, assert_row_is_the_bill, rows
from tests.structured_schemas import FRUSTRATION, Scores

from headspace_inference.inference import (
    InvalidRequestError,
    InvalidResponseError,
    RateLimitedError,
)
from headspace_inference.inference.errors import StructuredAnswerError
from headspace_inference.inference.service import InferenceService
from headspace_inference.inference.structured import MAX_SCHEMA_BYTES
from headspace_inference.testing.emulator import Fault

GOOD = {"scores": [{"agent_id": 7, "score": 85, "reason": "blocked on review"}]}


def chat_bodies(emulator: Any) -> list[dict[str, Any]]:
    return [r.body for r in emulator.requests if r.path == CHAT]


def service_of(make_app: AppFactory, **extra: Any) -> InferenceService:
    service: InferenceService = make_app(**extra).extensions["inference"]
    return service


def test_a_model_class_is_sent_as_strict_json_schema_and_comes_back_an_instance(
    make_app: AppFactory, emulator: Any
) -> None:
    service = service_of(make_app)
    result = service.infer("objective", "score priorities", "agents: 7", response_format=Scores)
    assert isinstance(result.data, Scores)
    assert result.data.scores and 0 <= result.data.scores[0].score <= 100
    assert json.loads(result.text) == result.data.model_dump()  # the raw text is kept
    (body,) = chat_bodies(emulator)
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "Scores", "strict": True, "schema": Scores.model_json_schema()},
    }
    assert result.to_dict()["data"] == result.data.model_dump()


def test_a_dict_schema_comes_back_as_its_json_value(make_app: AppFactory, emulator: Any) -> None:
    service = service_of(make_app)
    result = service.submit(
        "turn", "frustration", "this is broken again", response_format=FRUSTRATION
    ).result(timeout=30)
    assert set(result.data) == {"summary", "frustration_score"}
    assert 0 <= result.data["frustration_score"] <= 10
    assert chat_bodies(emulator)[0]["response_format"]["json_schema"]["name"] == "frustration"


def test_a_call_without_response_format_has_no_data(make_app: AppFactory, emulator: Any) -> None:
    result = service_of(make_app).infer("turn", "summarise", "plain text please")
    assert result.data is None
    assert "response_format" not in chat_bodies(emulator)[0]


def test_a_fence_wrapped_answer_is_parsed(make_app: AppFactory, emulator: Any) -> None:
    emulator.script([Fault(content=f"```json\n{json.dumps(GOOD)}\n```")])
    result = service_of(make_app).infer("objective", "score", "agents", response_format=Scores)
    assert result.data == Scores.model_validate(GOOD)
    assert result.text.startswith("```json")
    assert emulator.request_count(CHAT) == 1


def test_an_invalid_answer_is_retried_then_the_valid_one_is_kept(
    make_app: AppFactory, emulator: Any
) -> None:
    out_of_range = {"scores": [{"agent_id": 7, "score": 170, "reason": "r"}]}
    emulator.script([Fault(content="Sure! Here are the scores."),
                     Fault(content=json.dumps(out_of_range))])  # fmt: skip
    app = make_app(openrouter={"retry": {"max_attempts": 3}})
    service: InferenceService = app.extensions["inference"]
    result = service.infer("objective", "score", "agents", response_format=Scores)
    assert emulator.request_count(CHAT) == 3
    assert result.attempts == 3
    assert isinstance(result.data, Scores)
    (row,) = rows(app)
    assert (row.status, row.attempts, row.error_type) == ("ok", 3, None)


def test_an_answer_that_never_fits_raises_and_its_row_keeps_text_and_error(
    make_app: AppFactory, emulator: Any
) -> None:
    emulator.script([Fault(content="not json"), Fault(content='{"summary": "s"}')])
    app = make_app(openrouter={"retry": {"max_attempts": 2}})
    service: InferenceService = app.extensions["inference"]
    with pytest.raises(InvalidResponseError) as info:
        service.infer("turn", "frustration", "grr", response_format=FRUSTRATION)
    assert isinstance(info.value, StructuredAnswerError)
    assert info.value.retryable
    assert "frustration_score" in str(info.value)
    assert emulator.request_count(CHAT) == 2
    (row,) = rows(app)
    assert (row.status, row.attempts, row.error_type) == ("error", 2, "StructuredAnswerError")
    assert row.result_text == '{"summary": "s"}'
    assert "'frustration_score' is a required property" in (row.error_message or "")
    # It was answered, so paid for: the row says what it cost.
    assert row.input_tokens > 0 and row.output_tokens > 0
    assert row.cost_usd is not None and row.cost_usd > Decimal(0)


def test_the_schema_is_part_of_the_cache_key_and_a_hit_comes_back_parsed(
    make_app: AppFactory, emulator: Any
) -> None:
    service = service_of(make_app)
    first = service.infer("turn", "frustration", "same text", response_format=FRUSTRATION)
    other = {**FRUSTRATION, "title": "frustration_v2"}
    second = service.infer("turn", "frustration", "same text", response_format=other)
    plain = service.infer("turn", "frustration", "same text")
    assert emulator.request_count(CHAT) == 3
    assert not (first.cached or second.cached or plain.cached)
    again = service.infer("turn", "frustration", "same text", response_format=dict(FRUSTRATION))
    assert emulator.request_count(CHAT) == 3
    assert again.cached and again.data == first.data


def test_a_structured_answer_from_the_shared_cache_comes_back_parsed(
    make_app: AppFactory, emulator: Any, redis_server_url: str, redis_prefix: str
) -> None:
    shared = {"redis": {"url": redis_server_url, "key_prefix": redis_prefix}}
    writer = service_of(make_app, **shared)
    fresh = writer.infer("objective", "score", "agents 1 2", response_format=Scores)
    # Another process's service: an empty memory cache, the same Redis.
    reader = service_of(make_app, **shared)
    hit = reader.infer("objective", "score", "agents 1 2", response_format=Scores)
    assert emulator.request_count(CHAT) == 1
    assert hit.cached
    assert isinstance(hit.data, Scores) and hit.data == fresh.data


def _nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels // 2):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def _sized(size: int) -> dict[str, Any]:
    return {"type": "object", "description": "x" * size}


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"type": "objekt"}, "not a valid JSON Schema"),
        ("Scores", "a JSON Schema dict or a pydantic model class"),
        ({"$ref": "#"}, r"refers to itself .*\(# -> #\)"),
        (
            {
                "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
                "$ref": "#/$defs/a",
            },
            r"refers to itself .*#/\$defs/a -> #/\$defs/b -> #/\$defs/a",
        ),
        ({"anyOf": [{"type": "null"}, {"allOf": [{"$ref": "#"}]}]}, "refers to itself"),
        ({"$ref": "https://example.com/schema.json"}, "points outside the schema"),
        ({"$ref": "#/$defs/missing"}, "points to nothing"),
        (_nested(3000), "nested more than 64 levels"),
        (_nested(80), "nested more than 64 levels"),
        (_sized(MAX_SCHEMA_BYTES), f"over the limit of {MAX_SCHEMA_BYTES}"),
        ({"type": "number", "maximum": float("nan")}, "not a JSON-serialisable schema"),
        ({"type": "number", "minimum": float("-inf")}, "not a JSON-serialisable schema"),
    ],
    ids=[
        "type",
        "str",
        "self-ref",
        "a-b-a",
        "combinators",
        "remote",
        "missing",
        "deep",
        "past-depth",
        "size",
        "nan",
        "infinity",
    ],
)
def test_a_bad_response_format_is_refused_before_anything_is_sent(
    make_app: AppFactory, emulator: Any, spec: Any, problem: str
) -> None:
    app = make_app()
    service: InferenceService = app.extensions["inference"]
    with pytest.raises(InvalidRequestError, match=problem) as info:
        service.infer("turn", "x", "y", response_format=spec)
    assert "response_format" in str(info.value)
    with pytest.raises(InvalidRequestError, match=problem):  # submit() refuses it as it is
        service.submit("turn", "x", "y", response_format=spec)
    assert emulator.request_count(CHAT) == 0
    assert rows(app) == []


# ------------------------------------------------------------------ what a call paid for

NEVER_FITS = '{"summary": "no score"}'  # FRUSTRATION needs frustration_score


def test_every_attempt_of_answers_that_never_fit_is_in_the_rows_and_in_usage(
    make_app: AppFactory, emulator: Any
) -> None:
    calls, attempts = 4, 3
    app = make_app(openrouter={"retry": {"max_attempts": attempts}})
    service: InferenceService = app.extensions["inference"]
    emulator.script([Fault(content=NEVER_FITS)] * (calls * attempts))
    for n in range(calls):
        with pytest.raises(StructuredAnswerError):
            service.infer("turn", "frustration", f"grr {n}", response_format=FRUSTRATION)
    charged = emulator.charged()  # what OpenRouter would have billed
    assert charged.answers == calls * attempts
    found = rows(app)
    assert len(found) == calls
    # Every attempt was alike (same prompt size, same answer): each row is K of them.
    prompt, completion = (
        charged.prompt_tokens // (calls * attempts),
        charged.completion_tokens // (calls * attempts),
    )
    per_cost = charged.cost / (calls * attempts)
    ours = service.prices.charge(found[0].model, prompt, completion)
    assert ours is not None
    for row in found:
        assert (row.status, row.attempts, row.error_type) == (
            "error", attempts, "StructuredAnswerError",
        )  # fmt: skip
        assert (row.input_tokens, row.output_tokens) == (attempts * prompt, attempts * completion)
        assert row.upstream_cost_usd == attempts * per_cost
        assert row.cost_usd == attempts * ours.cost
    assert sum(r.upstream_cost_usd or 0 for r in found) == charged.cost
    usage = app.test_client().get("/api/inference/usage").json
    assert usage["total_calls"] == calls and usage["errors"] == calls
    assert usage["total_input_tokens"] == charged.prompt_tokens
    assert usage["total_output_tokens"] == charged.completion_tokens
    assert Decimal(str(usage["upstream_reported_cost"])) == round(charged.cost, 10)
    assert Decimal(str(usage["total_cost"])) == round(calls * attempts * ours.cost, 10)


def test_a_call_kept_at_its_last_attempt_counts_the_ones_before_in_row_and_result(
    make_app: AppFactory, emulator: Any
) -> None:
    app = make_app(openrouter={"retry": {"max_attempts": 3}})
    service: InferenceService = app.extensions["inference"]
    emulator.script([Fault(content="not json"), Fault(content=NEVER_FITS)])
    result = service.infer("turn", "frustration", "grr", response_format=FRUSTRATION)
    charged = emulator.charged()
    assert charged.answers == 3 and result.attempts == 3
    (row,) = rows(app)
    assert_row_is_the_bill(row, charged, "ok", 3)
    # The result says what the row says; its answer keeps the kept answer's own figures.
    assert (result.input_tokens, result.output_tokens) == (row.input_tokens, row.output_tokens)
    assert result.upstream_cost_usd == float(charged.cost)
    assert row.cost_usd is not None and result.cost_usd == float(row.cost_usd)
    assert result.answer.output_tokens < result.output_tokens
    # A hit on it costs nothing, and saved what the kept answer cost.
    hit = service.infer("turn", "frustration", "grr", response_format=FRUSTRATION)
    assert hit.cached and hit.cost_usd == 0.0
    assert rows(app)[1].saved_cost_usd == result.answer.cost_usd


# ------------------------------------------------------------------ answers past the bounds

NUMBER = {
    "title": "rating",
    "type": "object",
    "properties": {"score": {"type": "number", "minimum": 0, "maximum": 10}},
    "required": ["score"],
}


@pytest.mark.parametrize(
    ("schema", "answer", "problem"),
    [
        (FRUSTRATION, "[" * 100_000 + "]" * 100_000, "nested more than 128 levels"),
        ({"type": "array"}, "[" * 500 + "]" * 500, "nested more than 128 levels"),
        (NUMBER, '{"score": NaN}', "NaN is not a JSON number"),
        (NUMBER, '{"score": Infinity}', "Infinity is not a JSON number"),
        (NUMBER, '{"score": 1e400}', "inf, which is not a JSON number"),
        (Scores, "[" * 100_000 + "]" * 100_000, "recursion limit exceeded"),  # pydantic's
    ],
    ids=["deep-dict-schema", "deep-array", "nan", "infinity", "overflow", "deep-model"],
)
def test_an_answer_past_the_bounds_is_an_invalid_answer_with_its_cost_in_the_row(
    make_app: AppFactory, emulator: Any, schema: Any, answer: str, problem: str
) -> None:
    app = make_app(openrouter={"retry": {"max_attempts": 2}})
    service: InferenceService = app.extensions["inference"]
    emulator.script([Fault(content=answer)] * 2)
    with pytest.raises(StructuredAnswerError, match=problem):
        service.infer("turn", "rate", "how bad", response_format=schema)
    (row,) = rows(app)
    assert (row.status, row.attempts, row.error_type) == ("error", 2, "StructuredAnswerError")
    assert row.upstream_cost_usd == emulator.charged().cost > 0
    assert row.cost_usd is not None and row.cost_usd > 0


def test_a_pydantic_float_refuses_nan_and_infinity_in_any_spelling(
    make_app: AppFactory, emulator: Any
) -> None:
    class Rating(BaseModel):
        score: float

    service = service_of(make_app, openrouter={"retry": {"max_attempts": 1}})
    for answer in ('{"score": NaN}', '{"score": "NaN"}', '{"score": "-inf"}', '{"score": 1e999}'):
        emulator.script([Fault(content=answer)])
        with pytest.raises(StructuredAnswerError, match="not a JSON number"):
            service.infer("turn", "rate", answer, response_format=Rating)
    emulator.script([Fault(content='{"score": 2.5}')])
    assert service.infer("turn", "rate", "fine", response_format=Rating).data == Rating(score=2.5)


def test_a_recursive_schema_that_descends_is_kept_and_checks_a_deep_tree(
    make_app: AppFactory, emulator: Any
) -> None:
    tree = {"title": "tree", "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string"},
                           "children": {"type": "array", "items": {"$ref": "#"}}}}  # fmt: skip
    value: dict[str, Any] = {"name": "leaf"}
    for n in range(60):  # 121 levels of JSON
        value = {"name": f"n{n}", "children": [value]}
    emulator.script([Fault(content=json.dumps(value))])
    result = service_of(make_app).infer("turn", "tree", "a tree", response_format=tree)
    assert result.data == value


def test_a_call_stopped_by_the_local_limiter_after_a_paid_attempt_keeps_its_cost(
    make_app: AppFactory, emulator: Any
) -> None:
    # One call a minute: the retry of an answer that did not fit finds no slot.
    limits = {"calls_per_minute": 1, "max_wait_seconds": 0}
    app = make_app(openrouter={"retry": {"max_attempts": 3}, "rate_limits": limits})
    service: InferenceService = app.extensions["inference"]
    emulator.script([Fault(content=NEVER_FITS)])
    with pytest.raises(RateLimitedError):
        service.infer("turn", "frustration", "grr", response_format=FRUSTRATION)
    charged = emulator.charged()
    assert charged.answers == 1
    (row,) = rows(app)
    assert_row_is_the_bill(row, charged, "rate_limited", 1)


def _waiting_in_a_flight() -> int:
    """Threads blocked as followers of a single-flight (waiting on its leader's outcome)."""
    count = 0
    for frame in sys._current_frames().values():
        top, names = frame, []
        while frame is not None:
            names.append((Path(frame.f_code.co_filename).name, frame.f_code.co_name))
            frame = frame.f_back
        if ("singleflight.py", "run") in names and Path(top.f_code.co_filename).name == (
            "threading.py"
        ):
            count += 1
    return count


def test_an_identical_call_that_shared_a_paid_failure_does_not_count_it_again(
    make_app: AppFactory, emulator: Any
) -> None:
    app = make_app(openrouter={"retry": {"max_attempts": 2}})
    service: InferenceService = app.extensions["inference"]
    emulator.script([Fault(content=NEVER_FITS)] * 2)
    gate = emulator.hold(CHAT)  # the leader's attempts wait at the emulator
    leader = service.submit("turn", "frustration", "same", response_format=FRUSTRATION)
    deadline = time.monotonic() + 30
    while emulator.request_count(CHAT) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    follower = service.submit("turn", "frustration", "same", response_format=FRUSTRATION)
    while _waiting_in_a_flight() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _waiting_in_a_flight() == 1  # the follower has joined the leader's flight
    gate.set()
    for future in (leader, follower):
        with pytest.raises(StructuredAnswerError):
            future.result(timeout=30)
    charged = emulator.charged()
    assert charged.answers == 2
    led, shared = sorted(rows(app), key=lambda r: -r.attempts)
    assert (led.attempts, led.upstream_cost_usd) == (2, charged.cost)
    assert (shared.attempts, shared.input_tokens, shared.output_tokens) == (0, 0, 0)
    assert shared.cost_usd is None and shared.upstream_cost_usd is None
    usage = app.test_client().get("/api/inference/usage").json
    assert Decimal(str(usage["upstream_reported_cost"])) == round(charged.cost, 10)
