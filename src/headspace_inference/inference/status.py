"""The answer of /api/inference/status (and ``headspace-inference status``), composed from each
part's own ``health()`` and ``stats()``: the service decides whether it takes calls, the health
checker whether OpenRouter answers, the backends whether Redis does, the call log whether
the database does. Nothing here decides any of that again."""

from __future__ import annotations

from typing import Any

from ..calllog.recorder import CallRecorder
from ..settings import OpenRouterSettings
from .backends import Backends
from .budget import SpendGuard
from .errors import (
    InferenceDisabledError,
    NotConfiguredError,
    ServiceUnavailableError,
    ShuttingDownError,
)
from .health import HealthChecker, HealthReport, HealthState
from .pricing import PriceTable
from .workers import WorkerPool

# What the OpenRouter section says when the service takes no calls, so probes nothing.
_STATE: dict[type[ServiceUnavailableError], HealthState] = {
    InferenceDisabledError: "disabled",
    NotConfiguredError: "no_key",
    ShuttingDownError: "stopped",
}


def status_report(
    settings: OpenRouterSettings,
    *,
    unavailable: ServiceUnavailableError | None,
    health: HealthChecker | None,
    backends: Backends,
    recorder: CallRecorder,
    pool: WorkerPool[Any, Any],
    prices: PriceTable,
    guard: SpendGuard,
) -> dict[str, Any]:
    """The status: ``healthy``, ``degraded`` with every reason, or ``disabled``.

    OpenRouter is probed (at most one short, shared, cached probe) only while the service
    takes calls; ``unavailable`` is the service's own answer to whether it does.
    """
    reasons: list[str] = []
    if unavailable is not None or health is None:
        error = unavailable or NotConfiguredError("no OpenRouter API key is configured")
        report = HealthReport(_STATE.get(type(error), "unreachable"), False, None, None, str(error))
        reasons.append(str(error))
    else:
        report = health.check()
        if report.state != "healthy":
            reasons.append(f"OpenRouter {report.state.replace('_', ' ')}: {report.error}")
    guarded = guard.report()
    for reason in (backends.health(), recorder.health(), guarded["reason"]):
        if reason and reason not in reasons:  # the guard's Redis is the backends' Redis
            reasons.append(reason)
    rl, cache = settings.rate_limits, settings.cache
    return {
        "enabled": settings.enabled,
        "state": "disabled" if not settings.enabled else ("degraded" if reasons else "healthy"),
        "reason": "; ".join(reasons) or None,
        "openrouter": {
            "base_url": settings.base_url,
            "api_key_configured": health is not None,
            **report.to_dict(),
        },
        # Each level's primary model; its fallbacks, for the levels that have some.
        "models": {level: settings.route(level)[0] for level in settings.models},
        "fallback_models": {
            level: list(fallbacks)
            for level in settings.models
            if (fallbacks := settings.route(level)[1])
        },
        "provider": settings.provider.as_body() if settings.provider else None,
        # Configured models with no price at all: their calls record no estimated cost.
        "unpriced_models": prices.unpriced(settings.all_models()),
        "rate_limits": {
            "calls_per_minute": rl.calls_per_minute,
            "tokens_per_minute": rl.tokens_per_minute,
            "max_wait_seconds": rl.max_wait_seconds,
            "window_seconds": rl.window_seconds,
            "usage": backends.limiter.stats(),
        },
        "cache": {
            "enabled": cache.enabled,
            "ttl_seconds": cache.ttl_seconds,
            "max_entries": cache.max_entries,
            "stats": backends.cache.stats(),
        },
        "retry": settings.retry.model_dump(),
        "budgets": guard.budget(),
        "spend_guard": guarded,
        "queue": pool.stats(),
        "call_log": recorder.stats(),
    }
