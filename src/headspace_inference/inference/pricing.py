"""Estimated cost of a call from its tokens and per-model prices: openrouter.pricing, over the
prices ``headspace-inference pricing sync`` stored from OpenRouter's /models (configured ones
win)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from ..calllog.models.inference_call import USD_QUANTUM
from ..settings import OpenRouterSettings, PriceSettings

log = logging.getLogger(__name__)

_MILLION = Decimal(1_000_000)
_SYNCED = TypeAdapter(dict[str, PriceSettings])


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
    """The prices a ``headspace-inference pricing sync`` file holds; none (and one warning) when the
    file is unreadable, so that a damaged file never stops the service."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return _SYNCED.validate_python(data.get("prices") if isinstance(data, dict) else None)
    except (OSError, ValueError, ValidationError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else type(exc).__name__
        log.warning("synced prices in %s are ignored: the file cannot be read (%s)", path, reason)
        return {}


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
        cost = (
            uncached * price.input
            + cached_tokens * price.cache_read
            + cache_write_tokens * price.cache_write
            + output_tokens * price.output
        ) / _MILLION
        full = (input_tokens * price.input + output_tokens * price.output) / _MILLION
        cost = cost.quantize(USD_QUANTUM)
        return Charge(cost, full.quantize(USD_QUANTUM) - cost)

    def _warn_once(self, model: str) -> None:
        with self._lock:
            if model in self._warned:
                return
            self._warned.add(model)
        log.warning(
            "no price for model %s (neither openrouter.pricing nor "
            "`headspace-inference pricing sync`): its calls record no estimated cost",
            model,
        )
