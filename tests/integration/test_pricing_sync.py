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
from tests.service_fixtures import AppFactory

from headspace_inference.inference.pricing import PriceTable
from headspace_inference.inference.service import InferenceService
from headspace_inference.settings import OpenRouterSettings
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
    assert any(f"synced prices in {path} are ignored" in m for m in messages)
    assert table.charge(HAIKU, 1_000_000, 0) is not None  # the configured defaults stay
    assert table.charge(HAIKU, 1_000_000, 0).cost == Decimal(1)  # type: ignore[union-attr]
