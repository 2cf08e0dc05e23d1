"""Estimated cost of a call from its tokens and the configured per-model prices."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from decimal import Decimal

from ..config import PriceSettings
from ..models.inference_call import USD_QUANTUM

log = logging.getLogger(__name__)

_MILLION = Decimal(1_000_000)


class PriceTable:
    """USD per million tokens for each priced model; unknown models cost None, not a guess."""

    def __init__(self, pricing: Mapping[str, PriceSettings]) -> None:
        # str() first: Decimal(0.1) would carry the binary float's error into every sum.
        self._prices = {
            model: (Decimal(str(p.input_per_million)), Decimal(str(p.output_per_million)))
            for model, p in pricing.items()
        }
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def cost(self, model: str, input_tokens: int, output_tokens: int) -> Decimal | None:
        """The estimated cost in USD, or None when ``model`` has no price."""
        price = self._prices.get(model)
        if price is None:
            self._warn_once(model)
            return None
        total = (input_tokens * price[0] + output_tokens * price[1]) / _MILLION
        return total.quantize(USD_QUANTUM)

    def _warn_once(self, model: str) -> None:
        with self._lock:
            if model in self._warned:
                return
            self._warned.add(model)
        log.warning("no price configured for model %s: its calls record no estimated cost", model)
