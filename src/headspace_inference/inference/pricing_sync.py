"""``headspace-inference pricing sync``: the configured models' prices from OpenRouter's
``GET /models`` (no key needed), kept in a JSON file under the instance directory.

A file rather than a table: prices are configuration the service reads once at start, not
records; a file needs no migration, can be read, diffed and edited by hand, and works
before any database exists. ``openrouter.pricing`` wins over it, model by model.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from ..settings import MAX_PRICE_PER_MILLION, OpenRouterSettings, PriceSettings
from .client import OpenRouterClient
from .pricing import read_synced_prices

_MILLION = Decimal(1_000_000)
# OpenRouter's pricing keys (strings of USD per token) -> ours (USD per million tokens).
_KEYS = {
    "prompt": "input_per_million",
    "completion": "output_per_million",
    "input_cache_read": "cache_read_per_million",
    "input_cache_write": "cache_write_per_million",
}


class PricingError(ValueError):
    """A /models answer or entry whose prices cannot be read; names the model and the key."""


def _per_million(model: str, key: str, raw: Any) -> float:
    # A price is a JSON string or number; anything else (a list, nested as deep as it
    # likes) is not turned into text to find out.
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise PricingError(f"{model}: pricing.{key} is {type(raw).__name__}, not a number")
    try:
        value = Decimal(str(raw)) * _MILLION
    except (InvalidOperation, ValueError):
        raise PricingError(f"{model}: pricing.{key} is {raw!r:.40}, not a number") from None
    # "-1" is OpenRouter's "price varies" (its router models); no price is better than that.
    if not value.is_finite() or value < 0 or not math.isfinite(float(value)):
        raise PricingError(f"{model}: pricing.{key} is {raw!r:.40}, not a price")
    if value > MAX_PRICE_PER_MILLION:
        raise PricingError(
            f"{model}: pricing.{key} is {raw!r:.40} per token, past the most a call's row "
            f"can hold ({MAX_PRICE_PER_MILLION} USD per million tokens)"
        )
    return float(value)


def price_of(entry: Mapping[str, Any]) -> PriceSettings:
    """Our price for one /models entry; PricingError when it has no usable price."""
    model = f"{entry.get('id')!s:.200}"
    pricing = entry.get("pricing")
    if not isinstance(pricing, Mapping):
        raise PricingError(f"{model}: no pricing")
    values: dict[str, float] = {}
    for theirs, ours in _KEYS.items():
        if pricing.get(theirs) is not None:
            values[ours] = _per_million(model, theirs, pricing[theirs])
    if "input_per_million" not in values or "output_per_million" not in values:
        raise PricingError(f"{model}: pricing has no prompt or completion price")
    return PriceSettings(**values)


def synced_prices(
    listing: Mapping[str, Any], models: list[str]
) -> tuple[dict[str, PriceSettings], list[str]]:
    """The prices of ``models`` in a /models answer, each also under its canonical slug (the
    dated name OpenRouter may answer as); and the problems, one line per model not priced.
    An answer that lists no model at all is a PricingError: it says nothing of any price."""
    entries = listing.get("data")
    if not isinstance(entries, list):
        raise PricingError("the /models answer has no data list")
    if not entries:
        raise PricingError("the /models answer lists no model")
    by_id: dict[str, Mapping[str, Any]] = {}
    for entry in entries:
        if isinstance(entry, Mapping) and isinstance(entry.get("id"), str):
            by_id[entry["id"]] = entry
    prices: dict[str, PriceSettings] = {}
    problems: list[str] = []
    for model in models:
        entry = by_id.get(model)
        if entry is None:
            problems.append(f"{model}: not listed by OpenRouter's /models")
            continue
        try:
            price = price_of(entry)
        except PricingError as exc:
            problems.append(str(exc))
            continue
        prices[model] = price
        slug = entry.get("canonical_slug")
        if isinstance(slug, str) and slug and slug != model:
            prices[slug] = price
    return prices, problems


@dataclass(frozen=True)
class SyncReport:
    """What a sync wrote: the file, the configured models it priced, the problems (one line
    per configured model not priced), and how the file's prices changed."""

    path: Path
    priced: int
    problems: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    # Held before and not priced by this answer: kept, unless the sync was told to prune.
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def merged_prices(
    before: Mapping[str, PriceSettings],
    fetched: Mapping[str, PriceSettings],
    *,
    prune: bool,
) -> tuple[dict[str, PriceSettings], dict[str, list[str]]]:
    """The prices to store after a sync, and their changes by kind (added, changed, kept,
    removed): what ``fetched`` prices, over what was held ``before``, which is kept for
    every model ``fetched`` does not price, unless ``prune``."""
    gone = sorted(set(before) - set(fetched))
    changes = {
        "added": sorted(set(fetched) - set(before)),
        "changed": sorted(m for m in fetched if m in before and before[m] != fetched[m]),
        "kept": [] if prune else gone,
        "removed": gone if prune else [],
    }
    stored = dict(fetched) if prune else {**before, **fetched}
    return stored, changes


def write_prices(path: Path, prices: Mapping[str, PriceSettings], source: str) -> None:
    """Write the file at once (a reader never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "source": source,
        "synced_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "prices": {m: p.model_dump(exclude_none=True) for m, p in sorted(prices.items())},
    }
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".pricing-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2)
            out.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def sync(settings: OpenRouterSettings, *, timeout: float = 30.0, prune: bool = False) -> SyncReport:
    """Fetch /models and store the configured models' prices over those the file held (kept
    when this answer does not price them, unless ``prune``). PricingError, or the client's
    InferenceError, when the answer cannot be used: the file is then left as it was."""
    client = OpenRouterClient(settings, api_key=None)
    try:
        listing = client.list_models(timeout=timeout)
    finally:
        client.close()
    models = settings.all_models()
    fetched, problems = synced_prices(listing, models)
    path = settings.pricing_path()
    stored, changes = merged_prices(read_synced_prices(path), fetched, prune=prune)
    write_prices(path, stored, f"{settings.base_url}/models")
    return SyncReport(path, len(models) - len(problems), problems, **changes)
