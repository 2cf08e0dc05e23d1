"""InferenceService: validate, pick the model, cache, share identical calls, limit, retry,
record. It composes injected parts and does nothing else."""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from flask import has_request_context

from ..clock import SYSTEM_CLOCK, Clock
from ..config import Settings
from ..db import Database
from .cache import CachedAnswer, ResponseCache, build_cache, request_key
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
from .pricing import USD_QUANTUM, PriceTable
from .ratelimit import RateLimiter, build_rate_limiter
from .recorder import CallRecord, CallRecorder, new_request_id
from .redis_support import RedisGuard, make_client
from .retry import RetryPolicy
from .singleflight import RedisSingleFlight, SingleFlight
from .types import CallLinks, Completion, GenerationParams, InferenceResult
from .validation import (
    LinkChecker,
    check_input,
    check_level,
    check_params,
    check_purpose,
    check_system_prompt,
)

log = logging.getLogger(__name__)

_CHARS_PER_TOKEN = 4  # a deliberately generous estimate: reservations are reconciled later


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

    def messages(self) -> list[dict[str, str]]:
        """The chat messages sent upstream."""
        messages = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": self.input_text})
        return messages

    def estimated_tokens(self, default_max_tokens: int) -> int:
        """Tokens to reserve before the call: the input's estimate plus the answer's ceiling."""
        chars = len(self.input_text) + len(self.system_prompt or "")
        return chars // _CHARS_PER_TOKEN + 1 + (self.params.max_tokens or default_max_tokens)


@dataclass(frozen=True, slots=True)
class _Fetched:
    completion: Completion
    attempts: int
    cost: Decimal | None


class _StopRetrying(Exception):
    """Carries a local limiter rejection out of the retry loop: waiting longer is not ours
    to decide, the caller was told when to come back."""

    def __init__(self, error: RateLimitedError) -> None:
        super().__init__(str(error))
        self.error = error


def _money(value: Decimal | None) -> float | None:
    return float(value) if value is not None else None


def _clip(value: str | None, size: int) -> str | None:
    if value is None:
        return None
    return value.replace("\x00", "")[:size]


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
        self._prices = PriceTable(self._or.pricing)
        self._retry = RetryPolicy.from_settings(self._or.retry)
        self._links = LinkChecker(database.sessions)
        self._flights = SingleFlight()
        self._shared_flight = shared_flight
        self._pool = _WorkerPool(self)
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
                return self._record_cached(request, hit, started)
        leader: list[bool] = []

        def fetch() -> _Fetched | CachedAnswer:
            leader.append(True)
            shared = self._shared_flight
            if shared is None or not self._or.cache.enabled:
                return self._fetch(request)

            # Another process may be making this very call: share its answer via the cache.
            def load() -> _Fetched | CachedAnswer | None:
                return self.cache.get(request.key)

            def call() -> _Fetched | CachedAnswer:
                return self._fetch(request)

            outcome, _ = shared.do(request.key, call, load)
            return outcome

        try:
            outcome, _shared = self._flights.do(request.key, fetch)
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
        if isinstance(outcome, CachedAnswer):
            return self._record_cached(request, outcome, started)
        if not leader:
            # An identical call was already in flight: its answer served this one too.
            return self._record_cached(request, _answer(outcome), started)
        return self._record_fresh(request, outcome, started)

    def _fetch(self, request: InferenceRequest) -> _Fetched:
        client = self._client
        if client is None:  # checked before; kept for the type checker
            raise NotConfiguredError("no OpenRouter API key is configured")
        estimate = request.estimated_tokens(self._limits.default_max_tokens)
        messages = request.messages()

        def attempt(_number: int) -> Completion:
            try:
                reservation = self.limiter.acquire(estimate)
            except RateLimitedError as exc:
                raise _StopRetrying(exc) from None
            try:
                completion = client.complete(
                    model=request.model, messages=messages, params=request.params
                )
            except InferenceError:
                self.limiter.reconcile(reservation, 0)
                raise
            self.limiter.reconcile(reservation, completion.input_tokens + completion.output_tokens)
            return completion

        try:
            completion, attempts = self._retry.run(
                attempt, clock=self._clock, on_error=self._on_upstream_error
            )
        except _StopRetrying as stop:
            raise stop.error from None
        cost = self._prices.cost(request.model, completion.input_tokens, completion.output_tokens)
        fetched = _Fetched(completion, attempts, cost)
        if self._or.cache.enabled:
            self.cache.put(request.key, _answer(fetched))
        return fetched

    def _on_upstream_error(self, error: InferenceError, attempt: int, delay: float | None) -> None:
        # OpenRouter's 429 is about the account, not this request: everyone waits.
        if isinstance(error, UpstreamRateLimitError) and error.retry_after:
            self.limiter.pause(error.retry_after)

    # ------------------------------------------------------------------ recording

    def _base_record(self, request: InferenceRequest, started: float) -> dict[str, Any]:
        links = request.links
        return {
            "request_id": request.request_id,
            "timestamp": datetime.now(UTC),
            "level": request.level,
            "purpose": request.purpose,
            "model": request.model,
            "input_hash": request.key,
            "latency_ms": int((time.perf_counter() - started) * 1000),
            "project_id": links.project_id,
            "agent_id": links.agent_id,
            "command_id": links.command_id,
            "turn_id": links.turn_id,
        }

    def _record_fresh(
        self, request: InferenceRequest, fetched: _Fetched, started: float
    ) -> InferenceResult:
        c = fetched.completion
        base = self._base_record(request, started)
        # To the call log's twelve decimals here, so the rollup sums exactly what rows hold.
        upstream = (
            Decimal(str(c.upstream_cost_usd)).quantize(USD_QUANTUM)
            if c.upstream_cost_usd is not None
            else None
        )
        self.recorder.record(
            CallRecord(
                **base,
                status="ok",
                input_tokens=c.input_tokens,
                output_tokens=c.output_tokens,
                result_text=_clip(c.text, 1_000_000),
                cost_usd=fetched.cost,
                upstream_cost_usd=upstream,
                attempts=fetched.attempts,
                generation_id=_clip(c.generation_id, 100),
                provider=_clip(c.provider, 100),
                finish_reason=_clip(c.finish_reason, 32),
            )
        )
        self._pool.observe_latency(base["latency_ms"])
        return InferenceResult(
            text=c.text,
            model=c.model,
            input_tokens=c.input_tokens,
            output_tokens=c.output_tokens,
            latency_ms=base["latency_ms"],
            cached=False,
            cost_usd=_money(fetched.cost),
            call_id=request.request_id,
            level=request.level,
            purpose=request.purpose,
            upstream_cost_usd=c.upstream_cost_usd,
            generation_id=c.generation_id,
            provider=c.provider,
            finish_reason=c.finish_reason,
            attempts=fetched.attempts,
        )

    def _record_cached(
        self, request: InferenceRequest, hit: CachedAnswer, started: float
    ) -> InferenceResult:
        base = self._base_record(request, started)
        saved = Decimal(str(hit.cost_usd)) if hit.cost_usd is not None else None
        self.recorder.record(
            CallRecord(
                **base,
                status="cached",
                cached=True,
                input_tokens=hit.input_tokens,
                output_tokens=hit.output_tokens,
                result_text=_clip(hit.text, 1_000_000),
                cost_usd=Decimal(0),
                saved_cost_usd=saved,
                generation_id=_clip(hit.generation_id, 100),
                provider=_clip(hit.provider, 100),
                finish_reason=_clip(hit.finish_reason, 32),
            )
        )
        return InferenceResult(
            text=hit.text,
            model=hit.model,
            input_tokens=hit.input_tokens,
            output_tokens=hit.output_tokens,
            latency_ms=base["latency_ms"],
            cached=True,
            cost_usd=0.0,
            call_id=request.request_id,
            level=request.level,
            purpose=request.purpose,
            generation_id=hit.generation_id,
            provider=hit.provider,
            finish_reason=hit.finish_reason,
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
        self.recorder.record(
            CallRecord(
                **self._base_record(request, started),
                status=status,
                error_type=type(error).__name__[:64],
                error_message=_clip(str(error), 2000),
                attempts=attempts,
            )
        )

    def _cancelled(self, request: InferenceRequest, future: Future[InferenceResult]) -> None:
        error = CancelledCallError("the inference service shut down before this call ran")
        self._record_failure(request, error, started=time.perf_counter(), status="cancelled")
        if not future.done():
            future.set_exception(error)


def _answer(fetched: _Fetched) -> CachedAnswer:
    c = fetched.completion
    return CachedAnswer(
        text=c.text,
        model=c.model,
        input_tokens=c.input_tokens,
        output_tokens=c.output_tokens,
        cost_usd=_money(fetched.cost),
        upstream_cost_usd=c.upstream_cost_usd,
        generation_id=c.generation_id,
        provider=c.provider,
        finish_reason=c.finish_reason,
        stored_at=time.time(),
    )


_STOP = object()


class _WorkerPool:
    """A fixed set of worker threads behind a bounded queue; nothing queued is ever dropped.

    Workers start with the first submit(), so building the app starts no threads.
    """

    def __init__(self, service: InferenceService) -> None:
        self._service = service
        self._size = service.settings.inference.workers
        # SimpleQueue is implemented in C: far cheaper than Queue's condition variables when
        # dozens of workers wait on it. The bound is kept by hand, under the pool's lock.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._capacity = service.settings.inference.queue_size
        self._queued = 0
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._running = 0
        self._latency_ms = 1000.0  # a moving average, for the retry_after of a full queue

    def submit(self, request: InferenceRequest) -> Future[InferenceResult]:
        future: Future[InferenceResult] = Future()
        with self._lock:
            if self._stopping:
                raise ShuttingDownError("the inference service is shutting down")
            if not self._threads:
                self._start()
            if self._queued >= self._capacity:
                waiting = self._queued
                retry_after = round(max(0.1, waiting / self._size * self._latency_ms / 1000), 3)
                raise QueueFullError(
                    f"the inference queue is full ({waiting} calls waiting for "
                    f"{self._size} workers); retry in about {retry_after} s",
                    retry_after=retry_after,
                )
            self._queued += 1
            self._queue.put((request, future))
        return future

    def observe_latency(self, latency_ms: int) -> None:
        self._latency_ms = 0.9 * self._latency_ms + 0.1 * latency_ms

    def stats(self) -> dict[str, Any]:
        return {
            "workers": self._size,
            "queue_size": self._capacity,
            "queued": self._queued,
            "running": self._running,
            "started": bool(self._threads),
        }

    def _start(self) -> None:
        for number in range(self._size):
            thread = threading.Thread(
                target=self._work, name=f"inference-worker-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            request, future = item
            with self._lock:
                self._queued -= 1
            if not future.set_running_or_notify_cancel():
                # The caller cancelled it while queued: it never ran, but it is still logged.
                self._service._cancelled(request, future)
                continue
            with self._lock:
                self._running += 1
            try:
                future.set_result(self._service._execute(request))
            except InferenceError as exc:
                future.set_exception(exc)
            except BaseException as exc:  # a bug must reach the caller, not kill the worker
                log.exception("inference worker: unexpected error in call %s", request.request_id)
                future.set_exception(exc)
            finally:
                with self._lock:
                    self._running -= 1

    def shutdown(self, timeout: float) -> None:
        with self._lock:
            self._stopping = True
            threads = list(self._threads)
        # Calls still queued will not run: each is logged as cancelled and its future told so.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                request, future = item
                with self._lock:
                    self._queued -= 1
                self._service._cancelled(request, future)
        for _ in threads:
            self._queue.put(_STOP)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = sum(t.is_alive() for t in threads)
        if alive:
            log.warning(
                "inference: %d calls still running after %.1f s of shutdown", alive, timeout
            )
