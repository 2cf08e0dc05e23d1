"""The app around a service wired to the emulator, for tests that need the whole service."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from headspace_inference import create_app
from headspace_inference.calllog.models import InferenceCall
from headspace_inference.inference.service import InferenceService
from headspace_inference.settings import normalise_url

KEY = "sk-or-test-service"
CHAT = "/api/v1/chat/completions"

AppFactory = Callable[..., Flask]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def settings_for(url: str, emulator: Any, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    base = {
        "database": {"url": url, "auto_migrate": True},
        "openrouter": {
            "base_url": emulator.base_url,
            "api_key": KEY,
            "retry": {"base_delay_seconds": 0.0, "max_delay_seconds": 0.0},
            "rate_limits": {"calls_per_minute": 10_000, "tokens_per_minute": 10_000_000},
            # Never the working directory's synced prices.
            "pricing_file": str(tmp_path / "openrouter-pricing.json"),
        },
        "inference": {"spool_path": str(tmp_path / "spool")},
    }
    return _merge(base, extra)


@pytest.fixture
def make_app(database_url: str, emulator: Any, tmp_path: Path) -> Iterator[AppFactory]:
    apps: list[Flask] = []

    def factory(**extra: Any) -> Flask:
        app = create_app(overrides=settings_for(database_url, emulator, tmp_path, **extra))
        apps.append(app)
        return app

    yield factory
    for app in apps:
        app.extensions["inference"].close(timeout=5)


def rows(app: Flask) -> list[InferenceCall]:
    return service_rows(app.extensions["inference"])


def service_rows(service: InferenceService) -> list[InferenceCall]:
    assert service.recorder.flush(timeout=30)
    url = service.database.url
    engine = create_engine(normalise_url(url), poolclass=NullPool)
    with Session(engine) as session:
        found = list(session.scalars(select(InferenceCall).order_by(InferenceCall.id)))
    engine.dispose()
    return found


def assert_row_is_the_bill(row: InferenceCall, charged: Any, status: str, attempts: int) -> None:
    """``row`` has ``status`` and ``attempts`` and counts what the emulator charged
    (``emulator.charged()``): every answer's tokens, and OpenRouter's cost."""
    assert (row.status, row.attempts) == (status, attempts)
    assert (row.input_tokens, row.output_tokens) == (
        charged.prompt_tokens, charged.completion_tokens,
    )  # fmt: skip
    assert row.upstream_cost_usd == charged.cost
