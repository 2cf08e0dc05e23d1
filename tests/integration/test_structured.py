"""Structured answers end to end: response_format sent, the answer parsed and validated,
retried when it does not fit, logged when it never does; over real HTTP to the emulator."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from tests.service_fixtures import CHAT, AppFactory, rows
from tests.structured_schemas import FRUSTRATION, Scores

from headspace_inference.inference import InvalidRequestError, InvalidResponseError
from headspace_inference.inference.errors import StructuredAnswerError
from headspace_inference.inference.service import InferenceService
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


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"type": "objekt"}, "not a valid JSON Schema"),
        ("Scores", "a JSON Schema dict or a pydantic model class"),
    ],
)
def test_a_bad_response_format_is_refused_before_anything_is_sent(
    make_app: AppFactory, emulator: Any, spec: Any, problem: str
) -> None:
    app = make_app()
    service: InferenceService = app.extensions["inference"]
    with pytest.raises(InvalidRequestError, match=problem):
        service.infer("turn", "x", "y", response_format=spec)
    assert emulator.request_count(CHAT) == 0
    assert rows(app) == []
