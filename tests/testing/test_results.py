"""inference_result: a real InferenceResult from the flat keywords a host's tests write."""

from __future__ import annotations

from decimal import Decimal

import pytest

from headspace_inference import InferenceResult
from headspace_inference.testing import inference_result


def test_the_hosts_keywords_build_a_real_result() -> None:
    from headspace_inference.testing import inference_result as HostInferenceResult

    result = HostInferenceResult(
        text="Agent refactored authentication middleware.",
        input_tokens=50,
        output_tokens=10,
        model="anthropic/claude-3-haiku",
        latency_ms=200,
    )

    assert isinstance(result, InferenceResult)
    assert result.text == "Agent refactored authentication middleware."
    assert (result.input_tokens, result.output_tokens) == (50, 10)
    assert result.model == "anthropic/claude-3-haiku"
    assert result.latency_ms == 200
    assert result.cached is False
    assert result.cost_usd is None
    assert result.data is None
    assert result.attempts == 1
    assert result.call_id  # a request id, as every real result has


def test_every_field_can_be_given() -> None:
    result = inference_result(
        "{}",
        input_tokens=100,
        output_tokens=20,
        model="m/x",
        latency_ms=7,
        cost_usd=0.0012,
        upstream_cost_usd=Decimal("0.0011"),
        data={"ok": True},
        call_id="req-1",
        level="command",
        purpose="summarise_command",
        attempts=3,
        generation_id="gen-9",
        provider="Anthropic",
        finish_reason="length",
        cached_input_tokens=40,
        cache_write_tokens=10,
        reasoning_tokens=5,
    )

    assert result.to_dict() == {
        "text": "{}",
        "model": "m/x",
        "input_tokens": 100,
        "output_tokens": 20,
        "latency_ms": 7,
        "cached": False,
        "cost_usd": 0.0012,
        "call_id": "req-1",
        "level": "command",
        "purpose": "summarise_command",
        "upstream_cost_usd": 0.0011,
        "generation_id": "gen-9",
        "provider": "Anthropic",
        "finish_reason": "length",
        "attempts": 3,
        "cached_input_tokens": 40,
        "cache_write_tokens": 10,
        "reasoning_tokens": 5,
        "data": {"ok": True},
    }


def test_the_model_defaults_to_the_levels_default_model() -> None:
    assert inference_result("a").model == "anthropic/claude-haiku-4.5"
    assert inference_result("a", level="project").model == "anthropic/claude-sonnet-4.5"
    # A level the default configuration does not have: the turn level's model.
    assert inference_result("a", level="command").model == "anthropic/claude-haiku-4.5"


def test_a_cached_result_costs_nothing_as_a_real_cache_hit() -> None:
    result = inference_result("a", cached=True, cost_usd=0.5)

    assert result.cost_usd == 0.0
    assert result.upstream_cost_usd is None
    assert result.attempts == 0


def test_a_keyword_the_result_does_not_have_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="'error'"):
        inference_result(text="a", error="boom")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("keywords", "named"),
    [
        ({"text": None}, "text"),
        ({"text": "a", "input_tokens": -1}, "input_tokens"),
        ({"text": "a", "output_tokens": 1.5}, "output_tokens"),
        ({"text": "a", "latency_ms": True}, "latency_ms"),
        ({"text": "a", "cost_usd": "0.1"}, "cost_usd"),
        ({"text": "a", "cost_usd": -0.1}, "cost_usd"),
        ({"text": "a", "cost_usd": float("nan")}, "cost_usd"),
        ({"text": "a", "cached": "no"}, "cached"),
    ],
)
def test_a_bad_value_is_a_value_error_naming_the_keyword(
    keywords: dict[str, object], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        inference_result(**keywords)  # type: ignore[arg-type]
