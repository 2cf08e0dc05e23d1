"""The small immutable values that travel through an inference call.

One call, as values: the caller's arguments become an ``InferenceRequest``; OpenRouter's
reply is parsed, once, into an ``Answer`` (the client builds it, the cache stores it as it
is); the caller gets an ``InferenceResult`` that wraps the answer with what this call did;
the call log gets a ``CallRecord`` (record.py) built from the request and the outcome.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from pydantic import TypeAdapter


class CallOptions(TypedDict, total=False):
    """The optional keyword arguments of ``infer()`` and ``submit()``."""

    project_id: int | None
    agent_id: int | None
    command_id: int | None
    turn_id: int | None
    system_prompt: str | None
    max_tokens: int | None
    temperature: float | None
    # A JSON Schema dict or a pydantic model class: the answer is parsed into result.data.
    response_format: Any
    # Mark the system prompt for Anthropic's prompt cache (a long prefix shared by calls).
    cache_system_prompt: bool | None


CALL_OPTIONS = frozenset(CallOptions.__annotations__)


@dataclass(frozen=True, slots=True)
class CallLinks:
    """The optional domain rows an inference call is about."""

    project_id: int | None = None
    agent_id: int | None = None
    command_id: int | None = None
    turn_id: int | None = None

    def items(self) -> list[tuple[str, int | None]]:
        """(field, id) pairs in table order."""
        return [
            ("project_id", self.project_id),
            ("agent_id", self.agent_id),
            ("command_id", self.command_id),
            ("turn_id", self.turn_id),
        ]


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Generation parameters that change the answer, so they belong in the cache key."""

    max_tokens: int | None = None
    temperature: float | None = None

    def as_body(self) -> dict[str, Any]:
        """The parameters set, as request-body fields."""
        body: dict[str, Any] = {}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body


_MONEY = ("cost_usd", "upstream_cost_usd", "cache_discount_usd")


@dataclass(frozen=True, slots=True)
class Answer:
    """One chat-completion answer, built where OpenRouter's reply is parsed.

    ``model`` is the model that answered (OpenRouter's ``model``: a fallback, when the
    primary failed). ``cost_usd`` is our estimate by that model's price (None for an
    unpriced model); ``upstream_cost_usd`` is what OpenRouter itself reported;
    ``cache_discount_usd`` what prompt caching took off our estimate. All are exact to the
    call log's twelve decimals. ``input_tokens`` is OpenRouter's ``prompt_tokens``, cached
    and cache-write tokens included; ``reasoning_tokens`` are part of ``output_tokens``.
    ``data`` is the parsed value of a structured answer (None without ``response_format``);
    it is not part of the stored form: a stored answer is parsed again from ``text``.
    """

    text: str
    model: str
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal | None = None
    upstream_cost_usd: Decimal | None = None
    generation_id: str | None = None
    provider: str | None = None
    finish_reason: str | None = None
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cache_discount_usd: Decimal | None = None
    data: Any = field(default=None, compare=False)

    def to_json(self) -> str:
        """The stored form (the shared cache keeps it), without ``data``."""
        data = {name: getattr(self, name) for name in _STORED}
        for name in _MONEY:
            if data[name] is not None:
                data[name] = str(data[name])
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Answer:
        """The answer a stored form holds; ValueError (never quoting it) when ``raw`` is not
        one: not JSON, JSON of another shape, a field of the wrong type, a negative count."""
        from pydantic import ValidationError

        try:
            answer = _stored_form().validate_json(raw, strict=True)
        except ValidationError as exc:
            where = ", ".join(".".join(map(str, e["loc"])) or e["type"] for e in exc.errors())
            raise ValueError(f"not a stored answer ({where[:120]})") from None
        negative = [name for name in _COUNTS if getattr(answer, name) < 0]
        if negative:
            raise ValueError(f"not a stored answer (negative {', '.join(negative)})")
        # ``data`` is never stored: a structured answer is parsed again from its text.
        return replace(answer, data=None)


_STORED = tuple(f.name for f in fields(Answer) if f.name != "data")
_COUNTS = tuple(f.name for f in fields(Answer) if f.type == "int")


@functools.cache
def _stored_form() -> TypeAdapter[Answer]:
    # pydantic checks the stored form field by field (strict: "1" is not a count, money is
    # a decimal string); built on first use, as only the shared cache reads stored answers.
    from pydantic import TypeAdapter

    return TypeAdapter(Answer)


def _plus(total: Decimal | None, amount: Decimal | None) -> Decimal | None:
    # An unknown amount (an unpriced model) adds nothing; only all unknown is unknown.
    if amount is None:
        return total
    return amount if total is None else total + amount


@dataclass(frozen=True, slots=True)
class Spend:
    """What a call's upstream attempts were charged, summed over every answer that came
    back: the one kept, and those paid for and then discarded (a structured answer that did
    not fit, retried). What a call's row and its result count as the call's tokens and cost.
    A cost is None only when no answer had one (amounts are exact: quantized each)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: Decimal | None = None
    upstream_cost_usd: Decimal | None = None
    cache_discount_usd: Decimal | None = None

    def add(self, answer: Answer) -> Spend:
        """This spend with ``answer``'s tokens and costs added."""
        return Spend(
            input_tokens=self.input_tokens + answer.input_tokens,
            output_tokens=self.output_tokens + answer.output_tokens,
            cached_input_tokens=self.cached_input_tokens + answer.cached_input_tokens,
            cache_write_tokens=self.cache_write_tokens + answer.cache_write_tokens,
            reasoning_tokens=self.reasoning_tokens + answer.reasoning_tokens,
            cost_usd=_plus(self.cost_usd, answer.cost_usd),
            upstream_cost_usd=_plus(self.upstream_cost_usd, answer.upstream_cost_usd),
            cache_discount_usd=_plus(self.cache_discount_usd, answer.cache_discount_usd),
        )


NOTHING_SPENT = Spend()


def counted(answer: Answer, spent: Spend | None, *, cached: bool) -> Answer | Spend:
    """Whose tokens and costs a call counts: a cache hit's answer (it cost nothing; the
    figures are what it saved), else what every attempt was charged (``spent``), else the
    answer's own."""
    return answer if cached or spent is None else spent


def _money(value: Decimal | None) -> float | None:
    return float(value) if value is not None else None


@dataclass(frozen=True, slots=True)
class InferenceResult:
    """What a caller of InferenceService gets back: the answer, and what this call did.

    The tokens and costs are the whole call's, as its row says: every attempt's answer
    that was paid for (``spent``), not only the one kept; a cache hit's are its answer's.
    """

    answer: Answer
    call_id: str
    level: str
    purpose: str
    latency_ms: int
    cached: bool
    attempts: int = 0
    spent: Spend | None = None

    @property
    def _usage(self) -> Answer | Spend:
        return counted(self.answer, self.spent, cached=self.cached)

    @property
    def text(self) -> str:
        """The model's answer."""
        return self.answer.text

    @property
    def data(self) -> Any:
        """The parsed answer of a call with ``response_format`` (an instance when a model
        class was given), else None."""
        return self.answer.data

    @property
    def model(self) -> str:
        """The model that answered (a fallback, when the primary failed)."""
        return self.answer.model

    @property
    def input_tokens(self) -> int:
        """Prompt tokens, as OpenRouter counted them."""
        return self._usage.input_tokens

    @property
    def output_tokens(self) -> int:
        """Completion tokens, as OpenRouter counted them."""
        return self._usage.output_tokens

    @property
    def cost_usd(self) -> float | None:
        """What this call cost by our prices: 0 for a cache hit, None for an unpriced model."""
        return 0.0 if self.cached else _money(self._usage.cost_usd)

    @property
    def upstream_cost_usd(self) -> float | None:
        """What OpenRouter reported this call cost (None for a cache hit: nothing was sent)."""
        return None if self.cached else _money(self._usage.upstream_cost_usd)

    @property
    def cached_input_tokens(self) -> int:
        """Prompt tokens read from the provider's prompt cache (part of input_tokens)."""
        return self._usage.cached_input_tokens

    @property
    def cache_write_tokens(self) -> int:
        """Prompt tokens written to the provider's prompt cache (part of input_tokens)."""
        return self._usage.cache_write_tokens

    @property
    def reasoning_tokens(self) -> int:
        """Reasoning tokens (part of output_tokens)."""
        return self._usage.reasoning_tokens

    @property
    def generation_id(self) -> str | None:
        """OpenRouter's id of the generation."""
        return self.answer.generation_id

    @property
    def provider(self) -> str | None:
        """The provider OpenRouter routed to."""
        return self.answer.provider

    @property
    def finish_reason(self) -> str | None:
        """Why the model stopped."""
        return self.answer.finish_reason

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (CLI output, API answers)."""
        return {
            "text": self.text,
            "model": self.model,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "latency_ms": self.latency_ms,
            "cached": self.cached,
            "cost_usd": self.cost_usd,
            "call_id": self.call_id,
            "level": self.level,
            "purpose": self.purpose,
            "upstream_cost_usd": self.upstream_cost_usd,
            "generation_id": self.generation_id,
            "provider": self.provider,
            "finish_reason": self.finish_reason,
            "attempts": self.attempts,
            "cached_input_tokens": self.cached_input_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "data": _plain(self.data),
        }


def _plain(value: Any) -> Any:
    # A model instance as its JSON form; a JSON value as it is.
    dump = getattr(value, "model_dump", None)
    return dump(mode="json") if callable(dump) else value
