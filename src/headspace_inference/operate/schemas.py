"""The JSON answers of /api/inference/..., as pydantic models: the OpenAPI document's schemas
are generated from them (openapi.py), and a CALL is serialised by their field list, so a
field is added in one place and shows in both. A CALL and its detail are the call log's
(calllog/call_json.py: the feed and on_call_recorded send them too).

Models that describe an answer whose every key is known forbid others
(``additionalProperties: false``): an answer that grows a key its model lacks fails the
document's check instead of going undocumented. The free-form parts (a backend's counters,
the retry settings) are ``dict[str, Any]``.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from ..calllog.call_json import Answer, Call, CallDetail


class Error(Answer):
    """Every error: the message (naming a bad parameter) and the HTTP status."""

    error: str
    status: int


# ------------------------------------------------------------------------------ /status


class KeyCredit(Answer):
    """The key's credit, USD, as OpenRouter's GET /key told the probe (a figure it did not
    give as a number is null)."""

    limit: float | None = Field(description="the key's credit limit; null: unlimited")
    limit_remaining: float | None
    usage: float | None = Field(description="what the key has spent")


class OpenRouterHealth(Answer):
    """OpenRouter's side: the cached probe's result, or why nothing is probed."""

    base_url: str
    api_key_configured: bool
    state: Literal["healthy", "unreachable", "key_rejected", "no_key", "disabled", "stopped"]
    reachable: bool
    checked_at: datetime | None
    latency_ms: int | None
    error: str | None
    credit: KeyCredit | None = Field(
        description="null when the probe could not read GET /key (or nothing is probed)"
    )


class RateLimits(Answer):
    calls_per_minute: int
    tokens_per_minute: int
    max_wait_seconds: float
    window_seconds: float
    usage: dict[str, Any] = Field(description="the limiter's counters (by backend)")


class CacheStatus(Answer):
    enabled: bool
    ttl_seconds: float
    max_entries: int
    stats: dict[str, Any] = Field(description="the cache's counters (by backend)")


class CallLogStatus(Answer):
    """The call log's writer: ``spooling`` while the database refuses rows (they wait in
    the spool, replayed once it answers)."""

    state: Literal["ok", "spooling", "stopped"]
    pending: int
    oldest_pending: datetime | None
    written: int
    replayed: int
    write_failures: int
    rejected: int
    last_error: str | None
    last_error_at: datetime | None
    spool_dir: str
    spool_bytes: int


class BudgetState(Answer):
    """One budget's use this window (for a per-project rule, one project's)."""

    rule: str
    scope: dict[str, Any] = Field(description="level, purpose and/or project_id; {} = every call")
    window: Literal["hour", "day", "month"]
    project_id: int | None = Field(description="the project, for a rule with project_id: each")
    warn_at: float
    cap_usd: float | None
    cap_tokens: int | None
    used_usd: float | None = Field(description="reservations of calls in flight included")
    used_tokens: int
    left_usd: float | None
    left_tokens: int | None
    resets_at: datetime = Field(description="the window's end (calendar windows, UTC)")


class StormBreaker(Answer):
    enabled: bool
    calls: int
    seconds: float
    cooldown_seconds: float


class SpendGuardStatus(Answer):
    """Where the budgets' counts are kept; ``shared`` is false while they are held per
    process (no Redis or database answering, or none configured for them)."""

    store: Literal["memory", "redis", "database"]
    shared: bool
    reason: str | None
    storm_breaker: StormBreaker


class Status(Answer):
    """Service health, configuration and live statistics."""

    enabled: bool
    state: Literal["healthy", "degraded", "disabled"]
    reason: str | None = Field(description="every reason for degraded or disabled, joined")
    openrouter: OpenRouterHealth
    models: dict[str, str] = Field(description="each configured level's primary model")
    fallback_models: dict[str, list[str]] = Field(
        description="the fallbacks of the levels that have some"
    )
    provider: dict[str, Any] | None = Field(description="OpenRouter's provider preferences")
    unpriced_models: list[str] = Field(
        description="configured models with no price: their calls record no estimated cost"
    )
    rate_limits: RateLimits
    cache: CacheStatus
    retry: dict[str, Any]
    queue: dict[str, Any]
    call_log: CallLogStatus
    budgets: list[BudgetState]
    spend_guard: SpendGuardStatus


# ------------------------------------------------------------------------------- /usage


class Window(Answer):
    since: datetime | None
    until: datetime | None


class Filters(Answer):
    level: str | None
    model: str | None
    project_id: int | None


class Tokens(Answer):
    input: int
    output: int
    cached_input: int
    cache_write: int
    reasoning: int


class CostDisagreement(Answer):
    """Where our estimate and OpenRouter's figure differ (over the calls with both) by more
    than 1%, or OpenRouter charged for calls without an estimate."""

    estimated: float
    reported: float
    difference: float
    reported_without_estimate: float


class Latency(Answer):
    """Milliseconds. A percentile is the upper bound of the histogram bucket holding it;
    null when there are no calls, or when it lies past the last bound (60 s)."""

    mean: float | None
    p50: int | None
    p90: int | None
    p99: int | None


class Usage(Answer):
    """Calls, tokens, cost, cache hits, errors and latency over a window [since, until)."""

    window: Window
    filters: Filters
    total_calls: int
    calls_by_level: dict[str, int]
    calls_by_model: dict[str, int]
    total_input_tokens: int
    total_output_tokens: int
    total_cached_input_tokens: int
    total_cache_write_tokens: int
    total_reasoning_tokens: int
    tokens_by_level: dict[str, Tokens]
    tokens_by_model: dict[str, Tokens]
    total_cost: float
    cost_by_model: dict[str, float]
    cost_by_level: dict[str, float]
    upstream_reported_cost: float
    cache_discount: float
    cache_discount_by_model: dict[str, float]
    cost_disagreements: dict[str, CostDisagreement]
    cache_hits: int
    saved_cost: float
    errors: int
    latency_ms: dict[str, Latency] = Field(description="by level")


class DailyCostDay(Answer):
    day: date
    calls: int
    cost_by_model: dict[str, float]


class DailyCost(Answer):
    """Cost per UTC day by model, oldest day first; ``models`` are those with any cost."""

    days: list[DailyCostDay]
    models: list[str]


# -------------------------------------------------------------------------------- /calls


class CallPage(Answer):
    """One page, newest first; ``next_cursor`` starts the next one (null on the last)."""

    calls: list[Call]
    next_cursor: str | None


# Every model the document names, in its components.
DOCUMENTED: tuple[type[BaseModel], ...] = (Status, Usage, DailyCost, CallPage, CallDetail, Error)
