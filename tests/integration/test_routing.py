"""Model fallbacks, provider preferences, every token kind and prompt caching, end to end:
what OpenRouter (the emulator) did is what the result, the row and /usage say."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

import pytest
from tests.service_fixtures import CHAT, AppFactory, rows

from headspace_inference.config_loading import load_settings
from headspace_inference.inference import InvalidRequestError, UpstreamServerError
from headspace_inference.inference.service import InferenceService
from headspace_inference.settings import ConfigError
from headspace_inference.testing.emulator import Fault
from headspace_inference.testing.emulator.server import CATALOGUE

HAIKU = "anthropic/claude-haiku-4.5"
SONNET = "anthropic/claude-sonnet-4.5"
MINI = "openai/gpt-4o-mini"
MINI_PRICE = {"input_per_million": 0.15, "output_per_million": 0.6}
LONG_SYSTEM = "You summarise coding-agent turns for a dashboard. " * 60
MILLION = Decimal(1_000_000)


def chat_bodies(emulator: Any) -> list[dict[str, Any]]:
    return [r.body for r in emulator.requests if r.path == CHAT]


def usage_of(app: Any) -> dict[str, Any]:
    assert app.extensions["inference"].recorder.flush(timeout=30)
    response = app.test_client().get("/api/inference/usage")
    assert response.status_code == 200
    data: dict[str, Any] = response.get_json()
    return data


def fallback_app(make_app: AppFactory, **pricing: Any) -> Any:
    # ``pricing`` adds to the default prices (the two Anthropic models).
    openrouter: dict[str, Any] = {"models": {"turn": [HAIKU, MINI], "project": SONNET}}
    if pricing:
        openrouter["pricing"] = pricing
    return make_app(openrouter=openrouter)


# --------------------------------------------------------------------------- fallbacks


def test_fallbacks_go_as_models_and_the_primary_answers_when_up(
    make_app: AppFactory, emulator: Any
) -> None:
    app = fallback_app(make_app, **{MINI: MINI_PRICE})
    result = app.extensions["inference"].infer("turn", "summarise", "a turn")
    (body,) = chat_bodies(emulator)
    assert (body["model"], body["models"]) == (HAIKU, [HAIKU, MINI])
    assert result.model == HAIKU
    project = app.extensions["inference"].infer("project", "summarise", "a project")
    assert "models" not in chat_bodies(emulator)[1]  # no fallbacks, no list
    assert project.model == SONNET


def test_a_fallback_that_answers_is_the_model_of_result_row_cost_and_usage(
    make_app: AppFactory, emulator: Any
) -> None:
    app = fallback_app(make_app, **{MINI: MINI_PRICE})
    service: InferenceService = app.extensions["inference"]
    emulator.set_down(HAIKU)
    result = service.infer("turn", "summarise", "the primary is down")
    assert result.model == MINI
    expected = result.input_tokens * Decimal("0.15") + result.output_tokens * Decimal("0.6")
    assert result.cost_usd == pytest.approx(float(expected / MILLION))
    (row,) = rows(app)
    assert (row.model, row.requested_model) == (MINI, HAIKU)
    assert row.cost_usd == (expected / MILLION).quantize(Decimal(10) ** -12)
    usage = usage_of(app)
    assert usage["calls_by_model"] == {MINI: 1}
    assert usage["cost_by_model"][MINI] == pytest.approx(float(expected / MILLION))
    # Our estimate agrees with what OpenRouter charged (the emulator charges the same price).
    assert usage["cost_disagreements"] == {}


def test_an_unpriced_fallback_costs_null_with_one_warning_never_the_primarys_price(
    make_app: AppFactory, emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        app = fallback_app(make_app)  # no price for MINI
        service: InferenceService = app.extensions["inference"]
        emulator.set_down(HAIKU)
        first = service.infer("turn", "summarise", "first")
        second = service.infer("turn", "summarise", "second")
    assert first.model == second.model == MINI
    assert first.cost_usd is None and second.cost_usd is None
    assert first.upstream_cost_usd is not None  # OpenRouter still charged for it
    warnings = [
        r for r in caplog.records if MINI in r.getMessage() and "no price" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert service.status()["unpriced_models"] == [MINI]
    assert [r.cost_usd for r in rows(app)] == [None, None]
    disagreement = usage_of(app)["cost_disagreements"][MINI]
    assert disagreement["estimated"] == 0
    assert disagreement["reported_without_estimate"] == pytest.approx(
        first.upstream_cost_usd + (second.upstream_cost_usd or 0)
    )


def test_every_model_down_is_an_upstream_error_naming_the_last(
    make_app: AppFactory, emulator: Any
) -> None:
    app = fallback_app(make_app, **{MINI: MINI_PRICE})
    emulator.set_down(HAIKU, MINI)
    with pytest.raises(UpstreamServerError, match=MINI):
        app.extensions["inference"].infer("turn", "summarise", "all down")
    (row,) = rows(app)
    assert (row.status, row.model, row.requested_model) == ("error", HAIKU, HAIKU)


def test_a_level_configured_with_an_empty_list_is_refused(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match=r"openrouter\.models\.turn: List should have at least"):
        load_settings(overrides={"openrouter": {"models": {"turn": []}}}, environ={})


def test_the_fallbacks_are_part_of_the_cache_key(make_app: AppFactory, emulator: Any) -> None:
    plain = make_app().extensions["inference"]
    routed = fallback_app(make_app, **{MINI: MINI_PRICE}).extensions["inference"]
    assert plain.infer("turn", "s", "same").cached is False
    assert routed.infer("turn", "s", "same").cached is False
    assert routed.infer("turn", "s", "same").cached is True
    assert emulator.request_count(CHAT) == 2


# --------------------------------------------------------------------------- provider


def test_provider_preferences_are_sent_as_configured(make_app: AppFactory, emulator: Any) -> None:
    provider = {"order": ["Together", "Anthropic"], "allow_fallbacks": False,
                "data_collection": "deny", "quantizations": ["fp8"], "sort": "price",
                "max_price": {"prompt": 5, "completion": 20}}  # fmt: skip
    app = make_app(openrouter={"provider": provider})
    result = app.extensions["inference"].infer("turn", "summarise", "routed")
    (body,) = chat_bodies(emulator)
    assert body["provider"] == provider
    assert result.provider == "Together"  # the emulator answers from the first one asked for
    assert app.extensions["inference"].status()["provider"] == provider
    assert rows(app)[0].provider == "Together"


def test_no_provider_section_sends_no_provider(make_app: AppFactory, emulator: Any) -> None:
    make_app().extensions["inference"].infer("turn", "summarise", "default routing")
    assert "provider" not in chat_bodies(emulator)[0]


@pytest.mark.parametrize(
    ("provider", "named"),
    [
        ({"ordr": ["Anthropic"]}, "openrouter.provider.ordr: unknown key"),
        ({"sort": "fastest"}, "openrouter.provider.sort"),
        ({"data_collection": "maybe"}, "openrouter.provider.data_collection"),
        ({"quantizations": ["fp7"]}, "openrouter.provider.quantizations.0"),
        (
            {"max_price": {"prompt": 1, "tokens": 2}},
            "openrouter.provider.max_price.tokens: unknown",
        ),
        ({"max_price": {"prompt": -1}}, "openrouter.provider.max_price.prompt"),
    ],
)
def test_provider_preferences_outside_openrouters_keys_are_refused_by_name(
    provider: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_settings(overrides={"openrouter": {"provider": provider}}, environ={})


# --------------------------------------------------------------------------- token kinds


def test_cached_cache_write_and_reasoning_tokens_reach_the_row_the_cost_and_usage(
    make_app: AppFactory, emulator: Any
) -> None:
    app = make_app()
    service: InferenceService = app.extensions["inference"]
    emulator.script([Fault(reasoning_tokens=40)])
    first = service.infer("turn", "summarise", "turn one", system_prompt=LONG_SYSTEM,
                          cache_system_prompt=True)  # fmt: skip
    second = service.infer("turn", "summarise", "turn two", system_prompt=LONG_SYSTEM,
                           cache_system_prompt=True)  # fmt: skip
    # The first call wrote the shared prefix to the prompt cache; the second read it.
    assert first.cache_write_tokens > 0 and first.cached_input_tokens == 0
    assert second.cached_input_tokens == first.cache_write_tokens
    assert second.cache_write_tokens == 0
    assert first.reasoning_tokens == 40 and second.reasoning_tokens == 0
    price = CATALOGUE[HAIKU]
    cached = second.cached_input_tokens
    expected = (
        (second.input_tokens - cached) * Decimal(str(price.input_per_million))
        + cached * Decimal(str(price.cache_read_per_million))
        + second.output_tokens * Decimal(str(price.output_per_million))
    ) / MILLION
    assert Decimal(str(second.cost_usd)) == expected.quantize(Decimal(10) ** -12)
    assert second.upstream_cost_usd == pytest.approx(second.cost_usd)
    one, two = rows(app)
    assert (one.cache_write_tokens, one.reasoning_tokens) == (first.cache_write_tokens, 40)
    assert (two.cached_input_tokens, two.cache_write_tokens) == (cached, 0)
    # Reading the cache saved money; writing it cost more than plain input.
    assert two.cache_discount_usd is not None and two.cache_discount_usd > 0
    assert one.cache_discount_usd is not None and one.cache_discount_usd < 0
    usage = usage_of(app)
    assert usage["total_cached_input_tokens"] == cached
    assert usage["total_cache_write_tokens"] == first.cache_write_tokens
    assert usage["total_reasoning_tokens"] == 40
    assert usage["tokens_by_model"][HAIKU]["reasoning"] == 40
    assert usage["cache_discount"] == pytest.approx(
        float(one.cache_discount_usd + two.cache_discount_usd)
    )
    assert usage["cost_disagreements"] == {}


def test_a_cost_that_disagrees_with_openrouters_is_reported(
    make_app: AppFactory, emulator: Any
) -> None:
    # Our configured price is half the emulator's (which charges OpenRouter's default).
    app = make_app(openrouter={"pricing": {HAIKU: {"input_per_million": 0.5,
                                                   "output_per_million": 2.5}}})  # fmt: skip
    result = app.extensions["inference"].infer("turn", "summarise", "priced wrong")
    disagreements = usage_of(app)["cost_disagreements"]
    assert list(disagreements) == [HAIKU]
    assert disagreements[HAIKU]["estimated"] == pytest.approx(result.cost_usd)
    assert disagreements[HAIKU]["reported"] == pytest.approx(result.upstream_cost_usd)
    assert disagreements[HAIKU]["difference"] == pytest.approx(
        (result.upstream_cost_usd or 0) - (result.cost_usd or 0)
    )


# --------------------------------------------------------------------------- prompt caching


def system_content(emulator: Any) -> list[Any]:
    return [b["messages"][0]["content"] for b in chat_bodies(emulator)]


def test_cache_system_prompt_marks_it_for_anthropic_models_only(
    make_app: AppFactory, emulator: Any
) -> None:
    app = make_app(openrouter={"models": {"turn": HAIKU, "other": MINI},
                               "pricing": {MINI: MINI_PRICE}})  # fmt: skip
    service: InferenceService = app.extensions["inference"]
    service.infer("turn", "s", "one", system_prompt="Be brief.", cache_system_prompt=True)
    service.infer("turn", "s", "two", system_prompt="Be brief.")
    service.infer("other", "s", "three", system_prompt="Be brief.", cache_system_prompt=True)
    marked, plain, other = system_content(emulator)
    assert marked == [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    assert plain == other == "Be brief."


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"cache_system_prompt": True}, "cache_system_prompt needs a system_prompt"),
        ({"cache_system_prompt": "yes", "system_prompt": "s"}, "must be true or false"),
    ],
)
def test_cache_system_prompt_misused_is_refused_before_anything_is_sent(
    make_app: AppFactory, emulator: Any, options: dict[str, Any], problem: str
) -> None:
    service: InferenceService = make_app().extensions["inference"]
    with pytest.raises(InvalidRequestError, match=problem):
        service.infer("turn", "s", "text", **options)
    assert emulator.request_count(CHAT) == 0
