"""``headspace-inference pricing sync`` against the emulator's /models, and the service pricing
by what it stored (configured prices winning)."""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from tests.call_rows import make_record
from tests.integration.test_recorder import count_rows, write_all
from tests.service_fixtures import AppFactory, rows

from headspace_inference.calllog.models import MAX_INTEGER
from headspace_inference.inference.pricing import PriceTable
from headspace_inference.inference.service import InferenceService
from headspace_inference.row_bounds import MAX_USD
from headspace_inference.settings import MAX_PRICE_PER_MILLION, OpenRouterSettings, PriceSettings
from headspace_inference.standalone.cli import main

HAIKU = "anthropic/claude-haiku-4.5"
SONNET = "anthropic/claude-sonnet-4.5"
MINI = "openai/gpt-4o-mini"


def sync(base_url: str, prices: Path, tmp_path: Path, **env: str) -> Result:
    environ = {
        "HEADSPACE_CONFIG": str(tmp_path / "absent.yaml"),
        "HEADSPACE__OPENROUTER__BASE_URL": base_url,
        "HEADSPACE__OPENROUTER__PRICING_FILE": str(prices),
        **env,
    }
    return CliRunner().invoke(main, ["pricing", "sync"], env=environ)


def test_sync_stores_the_configured_models_prices_in_our_units(
    emulator: Any, tmp_path: Path
) -> None:
    prices = tmp_path / "instance" / "openrouter-pricing.json"
    result = sync(emulator.base_url, prices, tmp_path)
    assert result.exit_code == 0, result.output
    assert f"2 model(s) priced from {emulator.base_url}/models into {prices}" in result.output
    stored = json.loads(prices.read_text())
    assert stored["source"] == f"{emulator.base_url}/models"
    assert stored["prices"][HAIKU] == {
        "input_per_million": 1.0,
        "output_per_million": 5.0,
        "cache_read_per_million": 0.1,
        "cache_write_per_million": 1.25,
    }
    assert stored["prices"][SONNET]["cache_write_per_million"] == 3.75
    # Each also under its canonical slug, the dated name OpenRouter may answer as.
    assert stored["prices"]["anthropic/claude-4.5-haiku-20251001"] == stored["prices"][HAIKU]
    assert MINI not in stored["prices"]  # listed, but not configured
    # No key needed, none sent (a service's health probe, with its key, may also ask).
    unkeyed = [
        r
        for r in emulator.requests
        if r.path == "/api/v1/models" and "authorization" not in r.headers
    ]
    assert len(unkeyed) == 1


def test_a_configured_model_openrouter_does_not_list_is_warned_of(
    emulator: Any, tmp_path: Path
) -> None:
    prices = tmp_path / "prices.json"
    models = json.dumps({"turn": [HAIKU, "acme/unlisted"]})
    result = sync(emulator.base_url, prices, tmp_path, HEADSPACE__OPENROUTER__MODELS=models)
    assert result.exit_code == 0
    assert "warning: no price for acme/unlisted: not listed by OpenRouter's /models" in (
        result.output
    )
    assert "1 model(s) priced" in result.output
    assert set(json.loads(prices.read_text())["prices"]) == {
        HAIKU,
        "anthropic/claude-4.5-haiku-20251001",
    }


def test_an_unreachable_openrouter_fails_and_writes_nothing(
    closed_port: int, tmp_path: Path
) -> None:
    prices = tmp_path / "prices.json"
    result = sync(f"http://127.0.0.1:{closed_port}/api/v1", prices, tmp_path)
    assert result.exit_code == 1
    assert "error: prices not synced: could not talk to OpenRouter" in result.output
    assert not prices.exists()


def test_the_service_prices_by_synced_prices_and_configured_ones_win(
    make_app: AppFactory, emulator: Any, tmp_path: Path
) -> None:
    prices = tmp_path / "openrouter-pricing.json"  # make_app's pricing_file
    models = json.dumps({"turn": [HAIKU, MINI]})
    assert sync(emulator.base_url, prices, tmp_path,
                HEADSPACE__OPENROUTER__MODELS=models).exit_code == 0  # fmt: skip
    assert json.loads(prices.read_text())["prices"][MINI]["cache_read_per_million"] == 0.075
    # Haiku configured at ten times OpenRouter's price; MINI only synced.
    configured = {HAIKU: {"input_per_million": 10.0, "output_per_million": 50.0}}
    app = make_app(openrouter={"models": {"turn": [HAIKU, MINI]}, "pricing": configured})
    service: InferenceService = app.extensions["inference"]
    assert service.status()["unpriced_models"] == []
    haiku = service.infer("turn", "summarise", "by haiku")
    assert haiku.cost_usd == pytest.approx(
        (haiku.input_tokens * 10.0 + haiku.output_tokens * 50.0) / 1e6
    )
    emulator.set_down(HAIKU)
    mini = service.infer("turn", "summarise", "by the fallback")
    assert mini.model == MINI
    assert mini.cost_usd == pytest.approx(
        (mini.input_tokens * 0.15 + mini.output_tokens * 0.6) / 1e6
    )
    assert mini.cost_usd == pytest.approx(mini.upstream_cost_usd)


def test_a_damaged_prices_file_is_ignored_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "prices.json"
    path.write_text('{"prices": {"acme/x": {"input_per_million": "lots"}}}')
    settings = OpenRouterSettings(pricing_file=str(path), models={"turn": "acme/x"})
    with caplog.at_level(logging.WARNING):
        table = PriceTable.from_settings(settings)
    assert table.unpriced(["acme/x"]) == ["acme/x"]
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"synced price of acme/x in {path} is ignored" in m for m in messages)
    assert table.charge(HAIKU, 1_000_000, 0) is not None  # the configured defaults stay
    assert table.charge(HAIKU, 1_000_000, 0).cost == Decimal(1)  # type: ignore[union-attr]


# ----------------------------------------------------------------- prices no row can hold


def listing(**prompt_prices: str) -> str:
    """A /models body listing the emulator's models, some with another prompt price (USD per
    token, as OpenRouter writes it); a model given None is left out."""
    entries = []
    for model in (HAIKU, SONNET, MINI):
        entry = _model_entry(model)
        price = prompt_prices.get(model, entry["pricing"]["prompt"])
        if price is not None:
            entry["pricing"]["prompt"] = price
            entries.append(entry)
    return json.dumps({"data": entries})


def _model_entry(model: str) -> dict[str, Any]:
    from headspace_inference.testing.emulator.server import _model_entry as entry

    return entry(model)


def stored_prices(path: Path) -> dict[str, Any]:
    prices: dict[str, Any] = json.loads(path.read_text())["prices"]
    return prices


def test_a_synced_price_no_row_can_hold_is_refused_and_reported(
    make_app: AppFactory, emulator: Any, tmp_path: Path
) -> None:
    # "1e300" USD a token was written, and every later call of the model ended in a raw
    # decimal.InvalidOperation after the upstream had answered.
    prices = tmp_path / "openrouter-pricing.json"  # make_app's pricing_file
    models = json.dumps({"turn": MINI})
    emulator.set_models_body(listing(**{MINI: "1e300"}))
    result = sync(emulator.base_url, prices, tmp_path, HEADSPACE__OPENROUTER__MODELS=models)
    assert result.exit_code == 0, result.output
    assert (
        f"warning: no price for {MINI}: pricing.prompt is '1e300' per token, past the most a "
        f"call's row can hold ({MAX_PRICE_PER_MILLION} USD per million tokens)"
    ) in result.output
    assert "0 model(s) priced" in result.output
    assert MINI not in stored_prices(prices)
    # The service prices it as unpriced, and every call is an answer with its row.
    app = make_app(openrouter={"models": {"turn": MINI}})
    service: InferenceService = app.extensions["inference"]
    answers = [service.infer("turn", "summarise", f"call {i}") for i in range(3)]
    assert all(a.cost_usd is None for a in answers)
    assert len(rows(app)) == 3


def test_a_price_at_the_bound_costs_what_a_row_holds_for_the_largest_call(
    database_url: str, tmp_path: Path
) -> None:
    # The bound is the one fact: at it, the largest token counts a row can hold cost no more
    # than the call log (row and rollup) holds, on either database.
    top = float(MAX_PRICE_PER_MILLION)
    table = PriceTable({"acme/dear": PriceSettings(
        input_per_million=top, output_per_million=top,
        cache_read_per_million=top, cache_write_per_million=top,
    )})  # fmt: skip
    charge = table.charge("acme/dear", MAX_INTEGER, MAX_INTEGER,
                          cached_tokens=MAX_INTEGER, cache_write_tokens=MAX_INTEGER)  # fmt: skip
    assert charge is not None and 0 < charge.cost <= MAX_USD
    record = make_record(1, model="acme/dear", input_tokens=MAX_INTEGER,
                         output_tokens=MAX_INTEGER, cost_usd=charge.cost,
                         cache_discount_usd=charge.cache_discount)  # fmt: skip
    write_all(database_url, tmp_path / "spool", [record])
    assert count_rows(database_url) == 1


def test_a_cost_past_what_the_log_holds_is_no_cost_never_a_decimal_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prices are bounded where they are read; one built around the checks still never
    # raises after the upstream was paid: the row keeps tokens and OpenRouter's figure.
    unchecked = PriceSettings.model_construct(
        input_per_million=1e300, output_per_million=1e25,
        cache_read_per_million=None, cache_write_per_million=None,
    )  # fmt: skip
    table = PriceTable({"acme/dear": unchecked})
    with caplog.at_level(logging.WARNING, logger="headspace_inference.inference.pricing"):
        assert table.charge("acme/dear", 1000, 1000) is None
    assert any("past what the call log holds" in r.getMessage() for r in caplog.records)


def refused_after_a_good_sync(emulator: Any, tmp_path: Path, body: str, said: str) -> Path:
    """A good sync, then one answered with ``body``: refused (exit 1, ``said``, no traceback)
    and the file left byte for byte as it was; the file's path."""
    prices = tmp_path / "prices.json"
    assert sync(emulator.base_url, prices, tmp_path).exit_code == 0
    before = prices.read_bytes()
    emulator.set_models_body(body)
    result = sync(emulator.base_url, prices, tmp_path)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert said in result.output
    assert prices.read_bytes() == before
    return prices


def test_an_empty_listing_is_refused_and_the_file_left_as_it_was(
    emulator: Any, tmp_path: Path
) -> None:
    refused_after_a_good_sync(
        emulator, tmp_path, '{"data": []}',
        "error: prices not synced: the /models answer lists no model",
    )  # fmt: skip


def test_a_partial_listing_keeps_the_prices_it_does_not_give_unless_pruned(
    emulator: Any, tmp_path: Path
) -> None:
    # A good sync, then a listing without MINI and with another haiku price: the file was
    # rewritten without MINI's price, silently.
    prices = tmp_path / "prices.json"
    models = json.dumps({"turn": [HAIKU, MINI]})
    assert sync(emulator.base_url, prices, tmp_path,
                HEADSPACE__OPENROUTER__MODELS=models).exit_code == 0  # fmt: skip
    mini = stored_prices(prices)[MINI]
    emulator.set_models_body(listing(**{MINI: None, HAIKU: "0.000002"}))
    result = sync(emulator.base_url, prices, tmp_path, HEADSPACE__OPENROUTER__MODELS=models)
    assert result.exit_code == 0, result.output
    assert f"warning: no price for {MINI}: not listed by OpenRouter's /models" in result.output
    assert f"changed: anthropic/claude-4.5-haiku-20251001, {HAIKU}" in result.output
    kept = "kept (not priced by this answer; --prune drops them)"
    assert f"{kept}: {MINI}, openai/gpt-4o-mini-2024-07-18" in result.output
    stored = stored_prices(prices)
    assert stored[MINI] == mini
    assert stored[HAIKU]["input_per_million"] == 2.0
    # Told to, the sync keeps only what this answer priced.
    pruned = CliRunner().invoke(
        main, ["pricing", "sync", "--prune"],
        env={"HEADSPACE_CONFIG": str(tmp_path / "absent.yaml"),
             "HEADSPACE__OPENROUTER__BASE_URL": emulator.base_url,
             "HEADSPACE__OPENROUTER__PRICING_FILE": str(prices),
             "HEADSPACE__OPENROUTER__MODELS": models},
    )  # fmt: skip
    assert pruned.exit_code == 0, pruned.output
    assert f"removed: {MINI}, openai/gpt-4o-mini-2024-07-18" in pruned.output
    assert MINI not in stored_prices(prices)


def test_a_deeply_nested_models_answer_is_a_clear_error_and_the_file_untouched(
    emulator: Any, tmp_path: Path
) -> None:
    depth = 100_000
    prices = refused_after_a_good_sync(
        emulator, tmp_path, '{"data": ' + "[" * depth + "]" * depth + "}",
        "error: prices not synced: OpenRouter answered 200 with JSON nested deeper",
    )  # fmt: skip
    # A price nested deep inside an entry is that model's problem, not a traceback.
    deep = json.loads(listing())
    deep["data"][0]["pricing"]["prompt"] = json.loads("[" * 500 + "]" * 500)
    emulator.set_models_body(json.dumps(deep))
    result = sync(emulator.base_url, prices, tmp_path)
    assert result.exit_code == 0, result.output
    assert f"warning: no price for {HAIKU}: pricing.prompt is list, not a number" in (result.output)


def test_a_damaged_pricing_file_never_stops_the_service(
    make_app: AppFactory, emulator: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prices = tmp_path / "openrouter-pricing.json"  # make_app's pricing_file
    depth = 100_000
    prices.write_text('{"prices": ' + "[" * depth + "]" * depth + "}")
    with caplog.at_level(logging.WARNING, logger="headspace_inference.inference.pricing"):
        app = make_app(openrouter={"models": {"turn": MINI}})
        service: InferenceService = app.extensions["inference"]
        assert service.infer("turn", "summarise", "nested file").cost_usd is None
    assert any(
        f"synced prices in {prices} are ignored: the file cannot be read (RecursionError)"
        in r.getMessage()
        for r in caplog.records
    )
    # A price out of bounds ignores that model only, naming the file and the model.
    caplog.clear()
    prices.write_text(json.dumps({"prices": {
        MINI: {"input_per_million": 1.0e25, "output_per_million": 1.0},
        SONNET: {"input_per_million": 3.0, "output_per_million": 15.0},
    }}))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="headspace_inference.inference.pricing"):
        table = PriceTable.from_settings(
            OpenRouterSettings(pricing_file=str(prices), models={"turn": [MINI, SONNET]},
                               pricing={})
        )  # fmt: skip
    assert table.unpriced([MINI, SONNET]) == [MINI]
    assert any(
        f"synced price of {MINI} in {prices} is ignored: input_per_million: Input should be "
        f"less than or equal to {MAX_PRICE_PER_MILLION}" in r.getMessage()
        for r in caplog.records
    )
