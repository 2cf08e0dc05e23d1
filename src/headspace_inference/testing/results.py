"""A real InferenceResult built from the flat keywords a consumer's test writes."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from ..inference.types import Answer, InferenceResult
from ..settings import DEFAULT_MODELS


def default_model(level: str) -> str:
    """The model the default configuration gives ``level`` (a level it does not have: the
    turn level's)."""
    models = DEFAULT_MODELS.get(level, DEFAULT_MODELS["turn"])
    return models if isinstance(models, str) else models[0]


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r:.40}")
    return value


def _usd(name: str, value: object) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise ValueError(f"{name} must be a number of USD or None, got {value!r:.40}")
    # Through str(): 0.1 is 0.1, not the binary float's 55 digits.
    amount = Decimal(str(value))
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r:.40}")
    return amount


def inference_result(
    text: str,
    *,
    input_tokens: int = 0,
    output_tokens: int = 0,
    model: str | None = None,
    latency_ms: int = 0,
    cached: bool = False,
    cost_usd: float | Decimal | None = None,
    upstream_cost_usd: float | Decimal | None = None,
    data: Any = None,
    call_id: str | None = None,
    level: str = "turn",
    purpose: str = "test",
    attempts: int | None = None,
    generation_id: str | None = None,
    provider: str | None = None,
    finish_reason: str | None = "stop",
    cached_input_tokens: int = 0,
    cache_write_tokens: int = 0,
    reasoning_tokens: int = 0,
) -> InferenceResult:
    """A real ``InferenceResult`` from flat keywords, so that a host's test can write
    ``from headspace_inference.testing import inference_result as InferenceResult`` and keep
    its ``InferenceResult(text=..., input_tokens=..., model=..., latency_ms=...)`` calls.

    ``model`` defaults to the default configuration's model for ``level``. ``cost_usd`` is
    what the answer cost; as on a real cache hit, a ``cached=True`` result reads
    ``cost_usd == 0.0`` (what the answer cost is what the hit saved). ``call_id`` defaults
    to a fresh request id, ``attempts`` to 1 (0 for a cache hit). A keyword the result does
    not have raises TypeError naming it; a bad value raises ValueError naming the keyword.
    """
    from ..inference.request import new_request_id

    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    if not isinstance(cached, bool):
        raise ValueError(f"cached must be true or false, got {cached!r:.40}")
    answer = Answer(
        text=text,
        model=default_model(level) if model is None else model,
        input_tokens=_count("input_tokens", input_tokens),
        output_tokens=_count("output_tokens", output_tokens),
        cost_usd=_usd("cost_usd", cost_usd),
        upstream_cost_usd=_usd("upstream_cost_usd", upstream_cost_usd),
        generation_id=generation_id,
        provider=provider,
        finish_reason=finish_reason,
        cached_input_tokens=_count("cached_input_tokens", cached_input_tokens),
        cache_write_tokens=_count("cache_write_tokens", cache_write_tokens),
        reasoning_tokens=_count("reasoning_tokens", reasoning_tokens),
        data=data,
    )
    return InferenceResult(
        answer=answer,
        call_id=new_request_id() if call_id is None else call_id,
        level=level,
        purpose=purpose,
        latency_ms=_count("latency_ms", latency_ms),
        cached=cached,
        attempts=(0 if cached else 1) if attempts is None else _count("attempts", attempts),
    )
