"""A validated request on its way through the flow, and the call-log row of its outcome."""

from __future__ import annotations

import itertools
import os
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from ..calllog.record import MAX_ERROR_CHARS, MAX_RESULT_CHARS, CallRecord, clip
from ..logsafe import redact
from .errors import BudgetExceededError, InferenceError, RateLimitedError
from .structured import AnswerSchema
from .types import Answer, CallLinks, GenerationParams, Spend, counted

if TYPE_CHECKING:
    from ..settings import OpenRouterSettings
    from .validation import CallArguments

_CHARS_PER_TOKEN = 4  # a deliberately generous estimate: reservations are reconciled later


class _RequestIds:
    """Unique request ids without a system call each: a random 80-bit prefix per process
    (renewed after a fork) and a counter. uuid4() reads os.urandom every time, which under
    many threads costs a GIL hand-off per call."""

    def __init__(self) -> None:
        self._pid = -1
        self._prefix = ""
        self._counter = itertools.count()

    def next(self) -> str:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._prefix = uuid.uuid4().hex[:20]
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFFFFFF:012x}"


_request_ids = _RequestIds()


def new_request_id() -> str:
    """A unique id for one call; its row carries it (and replay uses it to skip duplicates)."""
    return _request_ids.next()


# Anthropic's marker for the end of a cacheable prefix.
CACHE_CONTROL = {"type": "ephemeral"}


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """A validated request: what to ask, at which level, about what."""

    level: str
    purpose: str
    input_text: str
    model: str
    key: str
    links: CallLinks
    system_prompt: str | None
    params: GenerationParams
    request_id: str = field(default_factory=new_request_id)
    # OpenRouter's fallbacks after ``model``, and its provider preferences.
    fallbacks: tuple[str, ...] = ()
    provider: dict[str, Any] | None = None
    schema: AnswerSchema | None = None
    cache_system_prompt: bool = False

    def messages(self) -> list[dict[str, Any]]:
        """The chat messages sent upstream; a system prompt to cache goes as a content block
        marked with ``cache_control`` (the form Anthropic's prompt cache needs)."""
        messages: list[dict[str, Any]] = []
        if self.system_prompt is not None:
            content: Any = self.system_prompt
            if self.cache_system_prompt:
                content = [
                    {"type": "text", "text": self.system_prompt, "cache_control": CACHE_CONTROL}
                ]
            messages.append({"role": "system", "content": content})
        messages.append({"role": "user", "content": self.input_text})
        return messages

    def estimated_input_tokens(self) -> int:
        """The prompt's tokens, estimated from its length before the call."""
        chars = len(self.input_text) + len(self.system_prompt or "")
        return chars // _CHARS_PER_TOKEN + 1

    def output_ceiling(self, default_max_tokens: int) -> int:
        """The most tokens the answer may have: max_tokens, else the service's default."""
        return self.params.max_tokens or default_max_tokens

    def estimated_tokens(self, default_max_tokens: int) -> int:
        """Tokens to reserve before the call: the input's estimate plus the answer's ceiling."""
        return self.estimated_input_tokens() + self.output_ceiling(default_max_tokens)


# The models whose prompt cache needs cache_control marks.
ANTHROPIC = "anthropic/"


class RequestBuilder:
    """The request of a checked call under one ``openrouter`` configuration: its level's
    model and fallbacks, the provider preferences, and the cache key of all that decides
    the answer (the real service and the test kit's fake build theirs with it)."""

    def __init__(self, openrouter: OpenRouterSettings) -> None:
        self._or = openrouter
        self._provider = openrouter.provider.as_body() if openrouter.provider else None

    def __call__(self, call: CallArguments) -> InferenceRequest:
        from .cache import request_key

        model, fallbacks = self._or.route(call.level)
        key = request_key(
            model=model, system_prompt=call.system_prompt, input_text=call.input_text,
            params=call.params, fallbacks=fallbacks, provider=self._provider,
            schema=None if call.schema is None else call.schema.fingerprint,
        )  # fmt: skip
        return InferenceRequest(
            call.level, call.purpose, call.input_text, model, key, call.links, call.system_prompt,
            call.params, fallbacks=fallbacks, provider=self._provider, schema=call.schema,
            # Anthropic's cache_control; other providers cache long prefixes by themselves.
            cache_system_prompt=call.cache_system_prompt and model.startswith(ANTHROPIC),
        )  # fmt: skip


def failed_status(error: BaseException) -> str:
    """The status of the row of a call that failed with ``error``: the local limiter's and
    the spend guard's refusals have their own; any other failure (OpenRouter's 429 too) is
    ``error``."""
    if isinstance(error, RateLimitedError):
        return "rate_limited"
    if isinstance(error, BudgetExceededError):
        return "over_budget"
    return "error"


def call_record(
    request: InferenceRequest,
    *,
    status: str,
    latency_ms: int,
    answer: Answer | None = None,
    error: BaseException | None = None,
    attempts: int = 0,
    spent: Spend | None = None,
    keep_input_chars: int | None = None,
) -> CallRecord:
    """The row of one call: ``answer`` for ``ok`` and ``cached``, ``error`` otherwise.

    With ``keep_input_chars`` (inference.store_input_text) the row keeps the prompt: its
    registered secrets redacted (logsafe), then cut to that many characters.

    A cached row costs nothing; what its answer cost when it was fetched is what it saved.
    ``model`` is the model that answered; an answer that failed its response_format was
    answered (and paid for) too, so its row keeps it, raw text and all, beside the error.

    The tokens and costs of any other row are the whole call's: ``spent``, what every
    attempt was charged (answers retried away included); without it, ``answer``'s own.
    """
    links = request.links
    outcome: dict[str, Any] = {}
    if answer is None and isinstance(error, InferenceError):
        answer = error.answer
    cached = status == "cached"
    if answer is not None:
        outcome = {
            "model": clip("model", answer.model),
            "result_text": clip("result_text", answer.text, MAX_RESULT_CHARS),
            "saved_cost_usd": answer.cost_usd if cached else None,
            "cached": cached,
            "generation_id": clip("generation_id", answer.generation_id),
            "provider": clip("provider", answer.provider),
            "finish_reason": clip("finish_reason", answer.finish_reason),
        }
    usage = spent if answer is None else counted(answer, spent, cached=cached)
    if usage is not None:
        outcome |= {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cached_input_tokens": usage.cached_input_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
            "reasoning_tokens": usage.reasoning_tokens,
            "cost_usd": Decimal(0) if cached else usage.cost_usd,
            "upstream_cost_usd": None if cached else usage.upstream_cost_usd,
            "cache_discount_usd": None if cached else usage.cache_discount_usd,
        }
    if error is not None:
        outcome |= {
            "error_type": clip("error_type", type(error).__name__),
            "error_message": clip("error_message", str(error), MAX_ERROR_CHARS),
        }
    outcome.setdefault("model", request.model)
    return CallRecord(
        request_id=request.request_id,
        timestamp=datetime.now(UTC),
        level=request.level,
        purpose=request.purpose,
        requested_model=request.model,
        status=status,
        input_hash=request.key,
        latency_ms=latency_ms,
        attempts=attempts,
        project_id=links.project_id,
        agent_id=links.agent_id,
        command_id=links.command_id,
        turn_id=links.turn_id,
        input_text=None
        if keep_input_chars is None
        else clip("input_text", redact(request.input_text), keep_input_chars),
        **outcome,
    )
