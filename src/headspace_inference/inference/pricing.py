"""Estimated cost of a call from its tokens and per-model prices: openrouter.pricing, over the
prices ``headspace-inference pricing sync`` stored from OpenRouter's /models (configured ones
win)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, DecimalException
from pathlib import Path

from pydantic import ValidationError

from ..row_bounds import MAX_USD, USD_QUANTUM
from ..settings import OpenRouterSettings, PriceSettings

log = logging.getLogger(__name__)

_MILLION = Decimal(1_000_000)
# The unpriced models named in a warning each; past them, one warning says more came. The
# name an answer carries is the upstream's choice, so the set it fills must be bounded.
MAX_NAMED_UNPRICED = 20


@dataclass(frozen=True, slots=True)
class Price:
    """One model's USD per million tokens, as exact decimals."""

    input: Decimal
    output: Decimal
    cache_read: Decimal
    cache_write: Decimal

    @classmethod
    def of(cls, p: PriceSettings) -> Price:
        """The price ``p`` sets; a cache price not given is the input price."""

        # str() first: Decimal(0.1) would carry the binary float's error into every sum.
        def exact(value: float | None, default: float) -> Decimal:
            return Decimal(str(default if value is None else value))

        input_ = p.input_per_million
        return cls(
            exact(input_, input_),
            exact(p.output_per_million, 0.0),
            exact(p.cache_read_per_million, input_),
            exact(p.cache_write_per_million, input_),
        )


@dataclass(frozen=True, slots=True)
class Charge:
    """What a call cost by our prices, and what prompt caching took off (negative when
    writing the cache cost more than it saved)."""

    cost: Decimal
    cache_discount: Decimal


def read_synced_prices(path: Path) -> dict[str, PriceSettings]:
    """The prices a ``headspace-inference pricing sync`` file holds: none (and one warning)
    when the file is unreadable, and none for a model whose entry is not a price within
    bounds (one warning each), so that a damaged file never stops the service."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        # RecursionError: JSON nested deeper than the parser goes.
        reason = exc.strerror if isinstance(exc, OSError) else type(exc).__name__
        log.warning("synced prices in %s are ignored: the file cannot be read (%s)", path, reason)
        return {}
    entries = data.get("prices") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        log.warning("synced prices in %s are ignored: the file has no prices mapping", path)
        return {}
    prices: dict[str, PriceSettings] = {}
    for model, entry in entries.items():
        try:
            prices[model] = PriceSettings.model_validate(entry)
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(p) for p in problem["loc"]) or "its entry"
            log.warning(
                "synced price of %.200s in %s is ignored: %s: %s",
                model, path, where, problem["msg"],
            )  # fmt: skip
    return prices


class PriceTable:
    """USD per million tokens for each priced model; unknown models cost None, not a guess."""

    def __init__(
        self,
        pricing: Mapping[str, PriceSettings],
        *,
        synced: Mapping[str, PriceSettings] | None = None,
    ) -> None:
        merged = {**(synced or {}), **pricing}  # configured prices win
        self._prices = {model: Price.of(p) for model, p in merged.items()}
        self._warned: set[str] = set()
        self._summarised = False
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: OpenRouterSettings) -> PriceTable:
        """The configured prices over the synced ones; one warning per configured model that
        has neither (its calls will record no estimated cost)."""
        table = cls(settings.pricing, synced=read_synced_prices(settings.pricing_path()))
        for model in table.unpriced(settings.all_models()):
            table._warn_once(model)
        return table

    def unpriced(self, models: Iterable[str]) -> list[str]:
        """Those of ``models`` with no price at all."""
        return [m for m in models if m not in self._prices]

    def has(self, model: str) -> bool:
        """Whether ``model`` has a price."""
        return model in self._prices

    def worst_case(self, model: str, input_tokens: int, output_tokens: int) -> Decimal | None:
        """The most a call of these sizes can cost at ``model``'s prices (its input billed at
        the dearest of the input and cache prices), or None when it has no price."""
        price = self._prices.get(model)
        if price is None:
            return None
        dearest_input = max(price.input, price.cache_read, price.cache_write)
        return (input_tokens * dearest_input + output_tokens * price.output) / _MILLION

    def charge(
        self,
        model: str,
        input_tokens: int,
        output_tokens: int,
        *,
        cached_tokens: int = 0,
        cache_write_tokens: int = 0,
    ) -> Charge | None:
        """The estimated cost in USD, or None (and one warning) when ``model`` has no price.

        ``input_tokens`` include the cached and cache-write ones (OpenRouter's
        ``prompt_tokens``): those are billed at the cache prices, the rest at the input price.
        """
        price = self._prices.get(model)
        if price is None:
            self._warn_once(model)
            return None
        uncached = max(0, input_tokens - cached_tokens - cache_write_tokens)
        try:
            cost = (
                uncached * price.input
                + cached_tokens * price.cache_read
                + cache_write_tokens * price.cache_write
                + output_tokens * price.output
            ) / _MILLION
            full = (input_tokens * price.input + output_tokens * price.output) / _MILLION
            cost = cost.quantize(USD_QUANTUM)
            charge = Charge(cost, full.quantize(USD_QUANTUM) - cost)
        except DecimalException:
            charge = None
        # Prices are bounded where they are read (settings.MAX_PRICE_PER_MILLION), so this
        # holds; a Price built some other way gets no cost (the row keeps its tokens and
        # OpenRouter's figure), never an error after the upstream has been paid.
        if charge is None or max(abs(charge.cost), abs(charge.cache_discount)) > MAX_USD:
            log.warning(
                "the cost of a call to %.200s is past what the call log holds (%s USD): "
                "recorded without an estimated cost", model, MAX_USD,
            )  # fmt: skip
            return None
        return charge

    def _warn_once(self, model: str) -> None:
        with self._lock:
            if model in self._warned or self._summarised:
                return
            self._summarised = len(self._warned) >= MAX_NAMED_UNPRICED
            if not self._summarised:
                self._warned.add(model)
        if self._summarised:
            log.warning(
                "more models without a price answered than the %d named: their calls record "
                "no estimated cost, and no further one is named",
                MAX_NAMED_UNPRICED,
            )
            return
        log.warning(
            "no price for model %.200s (neither openrouter.pricing nor "
            "`headspace-inference pricing sync`): its calls record no estimated cost",
            model,
        )
