"""The small immutable values that travel through an inference call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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


@dataclass(frozen=True, slots=True)
class Completion:
    """One parsed chat-completion answer from OpenRouter."""

    text: str
    model: str
    input_tokens: int
    output_tokens: int
    latency_ms: int
    generation_id: str | None = None
    provider: str | None = None
    finish_reason: str | None = None
    upstream_cost_usd: float | None = None


@dataclass(frozen=True, slots=True)
class InferenceResult:
    """What a caller of InferenceService gets back."""

    text: str
    model: str
    input_tokens: int
    output_tokens: int
    latency_ms: int
    cached: bool
    cost_usd: float | None
    call_id: str
    level: str = ""
    purpose: str = ""
    upstream_cost_usd: float | None = None
    generation_id: str | None = None
    provider: str | None = None
    finish_reason: str | None = None
    attempts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

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
        }
