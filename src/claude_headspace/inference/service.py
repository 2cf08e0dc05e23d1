"""InferenceService: validate, pick the model, cache, share identical calls, limit, retry,
record. It composes injected parts and does nothing else."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from flask import has_request_context

from ..clock import SYSTEM_CLOCK, Clock
from ..config import Settings
from ..db import Database
from .cache import ResponseCache, build_cache, request_key
from .client import OpenRouterClient
from .errors import (
    CancelledCallError,
    InferenceDisabledError,
    InferenceError,
    NotConfiguredError,
    QueueFullError,
    RateLimitedError,
    ShuttingDownError,
    UpstreamRateLimitError,
)
from .health import HealthChecker
from .ratelimit import RateLimiter, build_rate_limiter
from .record import CallRecord
from .recorder import CallRecorder
from .redis_support import RedisGuard, make_client
from .retry import RetryPolicy
from .singleflight import RedisSingleFlight, SingleFlight
from .types import Answer, CallLinks, InferenceRequest, InferenceResult
from .validation import (
    LinkChecker,
    check_input,
    check_level,
    check_params,
    check_purpose,
    check_system_prompt,
)
from .workers import WorkerPool

log = logging.getLogger(__name__)


class _StopRetrying(Exception):
    """Carries a local limiter rejection out of the retry loop: waiting longer is not ours
    to decide, the caller was told when to come back."""

    def __init__(self, error: RateLimitedError) -> None:
        super().__init__(str(error))
        self.error = error


class InferenceService:
    """The one way Claude Headspace calls models on OpenRouter."""

    def __init__(
        self,
        settings: Settings,
        *,
        database: Database,
        client: OpenRouterClient | None,
        cache: ResponseCache,
        limiter: RateLimiter,
        recorder: CallRecorder,
        health: HealthChecker,
        shared_flight: RedisSingleFlight | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.settings = settings
        self._or = settings.openrouter
        self._limits = settings.inference
        self._database = database
        self._client = client
        self.cache = cache
        self.limiter = limiter
        self.recorder = recorder
        self.health = health
        self._clock = clock
        self._retry = RetryPolicy.from_settings(self._or.retry)
        self._links = LinkChecker(database.sessions)
        self._flights = SingleFlight()
        self._shared_flight = shared_flight
        self._pool: WorkerPool[InferenceRequest, InferenceResult] = WorkerPool(
            size=settings.inference.workers,
            capacity=settings.inference.queue_size,
            run=self._execute,
            cancelled=self._cancelled,
        )
        self._closed = False
        self._warned_request_thread = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        database: Database,
        *,
        spool_dir: Path,
        clock: Clock = SYSTEM_CLOCK,
    ) -> InferenceService:
        """Build the service and its parts from settings; never touches the network."""
        from .usage import apply_rollup

        api_key = settings.api_key
        client = OpenRouterClient(settings.openrouter, api_key=api_key) if api_key else None
        recorder = CallRecorder(
            database.sessions,
            spool_dir,
            rollup=apply_rollup,
            batch_size=settings.inference.log_batch_size,
        ).start()
        shared_flight = None
        if settings.redis.url is not None:
            or_ = settings.openrouter
            # Long enough for a holder's whole call with its retries; a crashed holder's
            # lock lapses after it and a waiter takes over.
            lock_seconds = min(
                600.0,
                or_.timeout_seconds * or_.retry.max_attempts
                + or_.retry.max_delay_seconds * (or_.retry.max_attempts - 1)
                + or_.rate_limits.max_wait_seconds,
            )
            redis_client = make_client(settings.redis)
            shared_flight = RedisSingleFlight(
                redis_client,
                RedisGuard(redis_client, settings.redis, name="single-flight"),
                prefix=settings.redis.key_prefix,
                lock_seconds=lock_seconds,
            )
        return cls(
            settings,
            database=database,
            client=client,
            shared_flight=shared_flight,
            cache=build_cache(settings.openrouter.cache, settings.redis, clock=clock),
            limiter=build_rate_limiter(
                settings.openrouter.rate_limits, settings.redis, clock=clock
            ),
            recorder=recorder,
            health=HealthChecker(client, settings.openrouter, clock=clock),
            clock=clock,
        )

    # ------------------------------------------------------------------ the public calls

    def infer(
        self,
        level: str,
        purpose: str,
        input_text: str,
        *,
        project_id: int | None = None,
        agent_id: int | None = None,
        command_id: int | None = None,
        turn_id: int | None = None,
        system_prompt: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> InferenceResult:
        """Run one inference call on this thread and return its result, or raise InferenceError.

        Blocks for as long as the call takes: from a Flask request handler use submit().
        """
        if has_request_context() and not self._warned_request_thread:
            # Allowed (a handler may choose to wait), but said once: it is the mistake the
            # service exists to prevent.
            self._warned_request_thread = True
            log.warning(
                "inference: infer() called on a Flask request thread blocks that request for "
                "the whole call, up to its retries; use submit() and do not wait on the future "
                "in the handler"
            )
        request = self._accept(
            level, purpose, input_text,
            CallLinks(project_id, agent_id, command_id, turn_id),
            system_prompt, max_tokens, temperature,
        )  # fmt: skip
        return self._execute(request)

    def submit(
        self,
        level: str,
        purpose: str,
        input_text: str,
        *,
        project_id: int | None = None,
        agent_id: int | None = None,
        command_id: int | None = None,
        turn_id: int | None = None,
        system_prompt: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Future[InferenceResult]:
        """Queue the call for the service's workers and return its Future at once.

        Bad arguments, a full queue or a stopping service raise here, before anything runs.
        """
        request = self._accept(
            level, purpose, input_text,
            CallLinks(project_id, agent_id, command_id, turn_id),
            system_prompt, max_tokens, temperature,
        )  # fmt: skip
        try:
            return self._pool.submit(request)
        except (QueueFullError, ShuttingDownError) as exc:
            self._record_failure(request, exc, started=time.perf_counter(), status="refused")
            raise

    def start(self) -> None:
        """Probe OpenRouter once in the background, so the first status request has an answer."""
        if self._or.enabled and self._client is not None:
            threading.Thread(target=self.health.check, name="health-probe", daemon=True).start()

    def close(self, timeout: float | None = None) -> None:
        """Stop taking work, let in-flight calls finish, cancel the queued rest, flush the log."""
        if self._closed:
            return
        self._closed = True
        wait = self._limits.shutdown_timeout_seconds if timeout is None else timeout
        self._pool.shutdown(wait)
        self.recorder.close(timeout=max(wait, 1.0))
        if self._client is not None:
            self._client.close()

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """Health, configuration and live statistics, for /api/inference/status.

        Uses the health checker's cached answer; at most one short probe when it is stale.
        """
        enabled = self._or.enabled
        reasons: list[str] = []
        if not enabled:
            report = None
        else:
            report = self.health.check()
            if self._client is None:
                reasons.append("no OpenRouter API key is configured (set OPENROUTER_API_KEY)")
            elif report.state != "healthy":
                reasons.append(f"OpenRouter {report.state.replace('_', ' ')}: {report.error}")
        for part in (self.limiter, self.cache):
            degraded = getattr(part, "degraded_reason", None)
            reason = degraded() if callable(degraded) else None
            if reason:
                reasons.append(reason)
        call_log = self.recorder.stats()
        if call_log["state"] != "ok":
            reasons.append(f"call log spooling: {call_log['last_error']}")
        if self._closed:
            reasons.append("service is shut down")
        state = "disabled" if not enabled else ("degraded" if reasons else "healthy")
        rl = self._or.rate_limits
        cache = self._or.cache
        return {
            "enabled": enabled,
            "state": state,
            "reason": "; ".join(reasons) if reasons else None,
            "openrouter": {
                "base_url": self._or.base_url,
                "api_key_configured": self._client is not None,
                **(
                    report.to_dict()
                    if report is not None
                    else {
                        "state": "disabled",
                        "reachable": False,
                        "checked_at": None,
                        "latency_ms": None,
                        "error": "inference is disabled",
                    }
                ),
            },
            "models": self._or.models.as_dict(),
            "rate_limits": {
                "calls_per_minute": rl.calls_per_minute,
                "tokens_per_minute": rl.tokens_per_minute,
                "max_wait_seconds": rl.max_wait_seconds,
                "window_seconds": rl.window_seconds,
                "usage": self.limiter.stats(),
            },
            "cache": {
                "enabled": cache.enabled,
                "ttl_seconds": cache.ttl_seconds,
                "max_entries": cache.max_entries,
                "stats": self.cache.stats(),
            },
            "retry": self._or.retry.model_dump(),
            "queue": self._pool.stats(),
            "call_log": call_log,
        }

    # ------------------------------------------------------------------ the flow

    def _accept(
        self,
        level: object,
        purpose: object,
        input_text: object,
        links: CallLinks,
        system_prompt: object,
        max_tokens: object,
        temperature: object,
    ) -> InferenceRequest:
        """A validated request the service will take; raises (and logs refusals) otherwise."""
        request = self._prepare(
            level, purpose, input_text, links, system_prompt, max_tokens, temperature
        )
        self._refuse_if_unavailable(request)
        return request

    def _prepare(
        self,
        level: object,
        purpose: object,
        input_text: object,
        links: CallLinks,
        system_prompt: object,
        max_tokens: object,
        temperature: object,
    ) -> InferenceRequest:
        level_ = check_level(level)
        purpose_ = check_purpose(purpose)
        text = check_input(input_text, self._limits.max_input_chars)
        system = check_system_prompt(system_prompt, self._limits.max_input_chars)
        params = check_params(max_tokens, temperature)
        self._links.check(links)
        model = self._or.models.for_level(level_)
        key = request_key(model=model, system_prompt=system, input_text=text, params=params)
        return InferenceRequest(level_, purpose_, text, model, key, links, system, params)

    def _refuse_if_unavailable(self, request: InferenceRequest) -> None:
        error: InferenceError | None = None
        if self._closed:
            error = ShuttingDownError("the inference service is shut down and takes no new calls")
        elif not self._or.enabled:
            error = InferenceDisabledError("inference is disabled (openrouter.enabled is false)")
        elif self._client is None:
            error = NotConfiguredError(
                "no OpenRouter API key is configured: set OPENROUTER_API_KEY "
                "(or openrouter.api_key in config.yaml)"
            )
        if error is not None:
            self._record_failure(request, error, started=time.perf_counter(), status="refused")
            raise error

    def _execute(self, request: InferenceRequest) -> InferenceResult:
        started = time.perf_counter()
        if self._or.cache.enabled:
            hit = self.cache.get(request.key)
            if hit is not None:
                return self._result(request, hit, started)
        leader: list[bool] = []

        def fetch() -> tuple[Answer, int]:
            leader.append(True)
            shared = self._shared_flight
            if shared is None or not self._or.cache.enabled:
                return self._fetch(request)

            # Another process may be making this very call: share its answer via the cache.
            def load() -> tuple[Answer, int] | None:
                hit = self.cache.get(request.key)
                return None if hit is None else (hit, 0)

            outcome, _ = shared.do(request.key, lambda: self._fetch(request), load)
            return outcome

        try:
            (answer, attempts), shared = self._flights.do(request.key, fetch)
        except InferenceError as exc:
            status = "rate_limited" if isinstance(exc, RateLimitedError) else "error"
            self._record_failure(
                request, exc, started=started, status=status, attempts=exc.attempts if leader else 0
            )
            raise
        except Exception as exc:
            # Not an InferenceError: a bug somewhere below. The call still gets its row
            # (error_type names the exception), and the caller still sees the exception.
            self._record_failure(request, exc, started=started, status="error")
            raise
        # An identical call already in flight answered this one too: a cached call.
        return self._result(request, answer, started, attempts=0 if shared else attempts)

    def _fetch(self, request: InferenceRequest) -> tuple[Answer, int]:
        client = self._client
        if client is None:  # checked before; kept for the type checker
            raise NotConfiguredError("no OpenRouter API key is configured")
        estimate = request.estimated_tokens(self._limits.default_max_tokens)
        messages = request.messages()

        def attempt(_number: int) -> Answer:
            try:
                reservation = self.limiter.acquire(estimate)
            except RateLimitedError as exc:
                raise _StopRetrying(exc) from None
            try:
                answer = client.complete(
                    model=request.model, messages=messages, params=request.params
                )
            except InferenceError:
                self.limiter.reconcile(reservation, 0)
                raise
            self.limiter.reconcile(reservation, answer.input_tokens + answer.output_tokens)
            return answer

        try:
            answer, attempts = self._retry.run(
                attempt, clock=self._clock, on_error=self._on_upstream_error
            )
        except _StopRetrying as stop:
            raise stop.error from None
        if self._or.cache.enabled:
            self.cache.put(request.key, answer)
        return answer, attempts

    def _on_upstream_error(self, error: InferenceError, attempt: int, delay: float | None) -> None:
        # OpenRouter's 429 is about the account, not this request: everyone waits.
        if isinstance(error, UpstreamRateLimitError) and error.retry_after:
            self.limiter.pause(error.retry_after)

    # ------------------------------------------------------------------ recording

    def _record(
        self,
        request: InferenceRequest,
        started: float,
        status: str,
        *,
        answer: Answer | None = None,
        error: BaseException | None = None,
        attempts: int = 0,
    ) -> int:
        latency_ms = int((time.perf_counter() - started) * 1000)
        self.recorder.record(
            CallRecord.of(
                request, status=status, latency_ms=latency_ms, answer=answer, error=error,
                attempts=attempts,
            )
        )  # fmt: skip
        return latency_ms

    def _result(
        self, request: InferenceRequest, answer: Answer, started: float, *, attempts: int = 0
    ) -> InferenceResult:
        """Record a call that got an answer (fresh when it made attempts, else cached)."""
        cached = attempts == 0
        latency_ms = self._record(
            request, started, "cached" if cached else "ok", answer=answer, attempts=attempts
        )
        return InferenceResult(
            answer=answer,
            call_id=request.request_id,
            level=request.level,
            purpose=request.purpose,
            latency_ms=latency_ms,
            cached=cached,
            attempts=attempts,
        )

    def _record_failure(
        self,
        request: InferenceRequest,
        error: Exception,
        *,
        started: float,
        status: str,
        attempts: int = 0,
    ) -> None:
        self._record(request, started, status, error=error, attempts=attempts)

    def _cancelled(self, request: InferenceRequest, error: CancelledCallError) -> None:
        self._record_failure(request, error, started=time.perf_counter(), status="cancelled")
