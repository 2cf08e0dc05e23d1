"""InferenceService: the flow of one call, and nothing else.

```
infer()/submit() -> validate (level, input, ids, size) -> model for level, request key
  -> cache -> single-flight [leader: cache again
       -> (spend guard reserve -> limiter -> client -> spend guard settle) x retry -> cache]
  -> CallRecord into the call log -> InferenceResult
```
Every part is built elsewhere and injected: the client (client.py), the limiter, cache and
single-flight (backends.py), the spend guard (budget.py), the call log (recorder.py), the
health probe (health.py), the threads behind submit() (workers.py); the status answer is
composed in status.py.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar, Unpack

import httpx
from flask import has_request_context

from ..calllog.database import DATABASE_AWAY, Database
from ..calllog.journal import check_spool_dir
from ..calllog.record import CallRecord
from ..calllog.recorder import CallRecorder
from ..calllog.rollup import apply_rollup
from ..clock import SYSTEM_CLOCK, Clock
from ..settings import Settings
from .backends import Backends, build_backends
from .budget import BudgetEvent, SpendGuard, build_spend_guard
from .client import OpenRouterClient
from .errors import (
    BudgetExceededError,
    CancelledCallError,
    InferenceDisabledError,
    InferenceError,
    NotConfiguredError,
    QueueFullError,
    RateLimitedError,
    ServiceUnavailableError,
    ShuttingDownError,
    StructuredAnswerError,
    UpstreamRateLimitError,
)
from .health import HealthChecker
from .pricing import PriceTable
from .request import InferenceRequest, RequestBuilder, call_record, failed_status
from .retry import RetryPolicy
from .status import status_report
from .tracing import Tracing
from .types import (
    NOTHING_SPENT,
    Answer,
    CallOptions,
    InferenceResult,
    Spend,
)
from .validation import LinkChecker, check_call
from .workers import WorkerPool

log = logging.getLogger(__name__)

T = TypeVar("T")


class InferenceService:
    """The one way Claude Headspace calls models on OpenRouter."""

    def __init__(
        self,
        settings: Settings,
        *,
        database: Database,
        client: OpenRouterClient | None,
        backends: Backends,
        recorder: CallRecorder,
        guard: SpendGuard | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.settings = settings
        self.database = database
        self._or = settings.openrouter
        self._limits = settings.inference
        self._client = client
        # The price table the client prices with (built with the synced prices at start).
        self.prices = client.prices if client else PriceTable.from_settings(self._or)
        self._requests = RequestBuilder(self._or)
        self._backends = backends
        self.cache = backends.cache
        self.limiter = backends.limiter
        self.flight = backends.flight
        self.recorder = recorder
        self.guard = guard or build_spend_guard(
            settings, database=database, backends=backends, prices=self.prices, clock=clock
        )
        # Only a service with a key can ask OpenRouter anything.
        self.health = HealthChecker(client, self._or, clock=clock) if client else None
        self._clock = clock
        self._retry = RetryPolicy.from_settings(self._or.retry)
        self._tracing = Tracing()
        self._links = LinkChecker(database.sessions)
        self.pool: WorkerPool[InferenceRequest, InferenceResult] = WorkerPool(
            size=settings.inference.workers,
            capacity=settings.inference.queue_size,
            run=self._execute,
            cancelled=self._cancelled,
        )
        self._closed = False
        self._started = False
        self._start_lock = threading.Lock()
        self._on_start: list[Callable[[], object]] = []
        self._cancel_exit_hook: Callable[[], None] = lambda: None
        self._warned_request_thread = False
        self._recorded: list[Callable[[dict[str, Any]], object]] = []

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        database: Database,
        *,
        spool_dir: Path,
        clock: Clock = SYSTEM_CLOCK,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
    ) -> InferenceService:
        """Build the service and its parts from settings. Starts nothing: no thread,
        connection, file or network until start() (or the first call, which starts it).

        ``transport`` carries the client's requests instead of its own connections (an
        egress proxy of the host's, or a fault injected by a test); ``http_client`` is the
        host's own ``httpx.Client`` (its proxies, TLS, event hooks), used as it is and left
        open by close(). Not both. Where and how OpenRouter is called stays ours either way.
        """
        api_key = settings.api_key
        client = None
        if api_key:
            client = OpenRouterClient(
                settings.openrouter, api_key=api_key, transport=transport,
                http_client=http_client, clock=clock,
                prices=PriceTable.from_settings(settings.openrouter),
            )  # fmt: skip
        recorder = CallRecorder(
            database.sessions,
            spool_dir,
            rollup=apply_rollup,
            batch_size=settings.inference.log_batch_size,
        )
        return cls(
            settings,
            database=database,
            client=client,
            backends=build_backends(settings, clock=clock),
            recorder=recorder,
            clock=clock,
        )

    # ------------------------------------------------------------------ the public calls

    def infer(
        self, level: str, purpose: str, input_text: str, **options: Unpack[CallOptions]
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
        request = self._accept(level, purpose, input_text, options)
        return self._execute(request)

    def submit(
        self, level: str, purpose: str, input_text: str, **options: Unpack[CallOptions]
    ) -> Future[InferenceResult]:
        """Queue the call for the service's workers and return its Future at once.

        Bad arguments, a full queue or a stopping service raise here, before anything runs.
        """
        request = self._accept(level, purpose, input_text, options)
        try:
            return self.pool.submit(request)
        except (QueueFullError, ShuttingDownError) as exc:
            self._record(request, time.perf_counter(), "refused", error=exc)
            raise

    @property
    def is_available(self) -> bool:
        """Whether calls are taken now: enabled, a key configured, not shut down."""
        return self._unavailable() is None

    def start(self) -> InferenceService:
        """Start what the service runs on, once: the spool directory, the database's
        migrations (``database.auto_migrate``; else a warning when it is behind), the call
        log's writer, one background probe of OpenRouter (so the first status request has an
        answer), and an exit hook that closes the service, flushing its call log.

        The first call and the first request to one of the service's routes start it; a
        host may call it earlier (at the end of its start-up) to fail fast. Thread-safe.
        """
        with self._start_lock:
            if self._started or self._closed:
                return self
            check_spool_dir(self.recorder.spool_dir)
            if self.database.settings.auto_migrate:
                self.database.upgrade()
            else:
                _warn_if_behind(self.database)
            self.recorder.start()
            self._cancel_exit_hook = at_exit(self, InferenceService.close)
            self._started = True
            started, self._on_start = self._on_start, []
        if self.health is not None and self._unavailable() is None:
            threading.Thread(target=self.health.check, name="health-probe", daemon=True).start()
        for callback in started:
            callback()
        return self

    @property
    def started(self) -> bool:
        """Whether start() has run (and close() has not)."""
        return self._started and not self._closed

    def on_start(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` once the service has started (at once if it has)."""
        with self._start_lock:
            if not self._started:
                self._on_start.append(callback)
                return
        callback()

    def on_call_recorded(self, callback: Callable[[dict[str, Any]], object]) -> None:
        """Call ``callback(call)`` once for each call row this process writes, after its
        commit, with the CALL as the calls API shows it (its row ``id`` included): a host
        re-emits it as an event of its own.

        It runs on the call log's writer thread, in the order rows are written, so it must
        return quickly (hand the call on); an exception from it is logged and goes no
        further. Rows other processes write reach only their own callbacks.
        """
        with self._start_lock:
            first = not self._recorded
            self._recorded.append(callback)
        if first:
            self.recorder.on_committed(self._tell_recorded)

    def _tell_recorded(self, records: Sequence[CallRecord]) -> None:
        """The committed-rows hook behind on_call_recorded: the batch's rows read back by
        request id (the row ids are the database's, and COPY does not return them)."""
        from ..calllog.call_json import calls_with_request_ids

        ids = [r.request_id for r in records]
        try:
            with self.database.sessions() as session:
                calls = calls_with_request_ids(session, ids)
        except Exception:  # committed rows stay committed; only their callbacks are missed
            log.exception("inference: reading %d recorded calls for on_call_recorded", len(ids))
            return
        callbacks = list(self._recorded)
        for call in calls:
            for callback in callbacks:
                try:
                    callback(dict(call))
                except Exception:  # the host's failure is its own: the writer goes on
                    log.exception("inference: an on_call_recorded callback failed")

    def on_budget_event(self, callback: Callable[[BudgetEvent], object]) -> None:
        """Call ``callback(event)`` for each spend-guard event this process's calls give: a
        budget passing its warning mark (``kind: warning``) or reaching its cap (``cap``),
        each once per window across every process sharing the counts, and the storm breaker
        tripping (``storm``). It runs on the calling thread, so it must return quickly; an
        exception from it is logged and goes no further."""
        self.guard.on_event(callback)

    def budget(
        self,
        *,
        level: str | None = None,
        purpose: str | None = None,
        project_id: int | None = None,
    ) -> list[dict[str, Any]]:
        """What each budget has used and has left this window, and when it resets; with a
        call's ``level``, ``purpose`` and/or ``project_id``, only the budgets such a call
        would meet (ask before a batch). See SpendGuard.budget."""
        return self.guard.budget(level=level, purpose=purpose, project_id=project_id)

    def stop(self, timeout: float | None = None) -> None:
        """The same as close() (the host's code calls stop() at exit)."""
        self.close(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Stop taking work, let in-flight calls finish, cancel the queued rest, flush the
        log, and give back what start() took: threads, the connections of an engine the
        library built, the exit hook."""
        with self._start_lock:
            if self._closed:
                return
            self._closed = True
        wait = self._limits.shutdown_timeout_seconds if timeout is None else timeout
        self.pool.shutdown(wait)
        if self._started:
            self.recorder.close(timeout=max(wait, 1.0))
        if self._client is not None:
            self._client.close()
        self.guard.close()
        self._backends.close()
        self._cancel_exit_hook()
        self.database.dispose()

    def status(self) -> dict[str, Any]:
        """Health, configuration and live statistics, for /api/inference/status."""
        return status_report(
            self._or,
            unavailable=self._unavailable(),
            health=self.health,
            backends=self._backends,
            recorder=self.recorder,
            pool=self.pool,
            prices=self.prices,
            guard=self.guard,
        )

    def purge(
        self,
        project_id: int | None = None,
        before: datetime | None = None,
        all: bool = False,
    ) -> int:
        """Delete calls from the log, with the usage rollup kept equal to the rows (one
        transaction): those of ``project_id`` and/or older than ``before`` (an aware
        datetime), or ``all`` of them; how many. No criteria raises ValueError. Delete a
        host's calls through this, never with SQL: a direct DELETE leaves the rollup
        counting them (``flask inference usage --check`` finds it, ``--rebuild`` repairs)."""
        from ..calllog.purge import purge, purge_criteria

        purge_criteria(project_id, before, all)  # refused before anything is done
        if self.started:  # calls made before the purge are purged with the rest
            self.recorder.flush(timeout=self._limits.shutdown_timeout_seconds)
        with self.database.sessions.begin() as session:
            deleted = purge(session, project_id=project_id, before=before, all=all)
        log.info(
            "call log: %d calls purged (project_id=%s, before=%s, all=%s)",
            deleted, project_id, before, all,
        )  # fmt: skip
        return deleted

    # ------------------------------------------------------------------ the flow

    def _unavailable(self) -> ServiceUnavailableError | None:
        """Why the service takes no calls now, or None: the one place this is decided."""
        if self._closed:
            return ShuttingDownError("the inference service is shut down and takes no new calls")
        if not self._or.enabled:
            return InferenceDisabledError("inference is disabled (openrouter.enabled is false)")
        if self._client is None:
            return NotConfiguredError(
                "no OpenRouter API key is configured: set OPENROUTER_API_KEY "
                "(or openrouter.api_key in config.yaml)"
            )
        return None

    def _accept(
        self, level: object, purpose: object, input_text: object, options: CallOptions
    ) -> InferenceRequest:
        """A validated request the service will take; raises (and logs refusals) otherwise."""
        if not self._started:
            self.start()
        call = check_call(
            level, purpose, input_text, options,
            levels=self.settings.levels, max_input_chars=self._limits.max_input_chars,
        )  # fmt: skip
        self._links.check(call.links)
        request = self._requests(call)
        refusal = self._unavailable()
        if refusal is not None:
            self._record(request, time.perf_counter(), "refused", error=refusal)
            raise refusal
        return request

    def _execute(self, request: InferenceRequest) -> InferenceResult:
        started = time.perf_counter()
        hit = self._usable(request, self.cache.get(request.key))
        if hit is not None:
            return self._result(request, hit, started)

        def load() -> tuple[Answer, int, Spend | None] | None:
            # An answer another caller put in the cache meanwhile (peek: looking again is
            # not another miss).
            found = self._usable(request, self.cache.peek(request.key), quiet=True)
            return None if found is None else (found, 0, None)

        outcome = self.flight.run(request.key, lambda: self._fetch(request), load)
        error = outcome.error
        if error is not None:
            if isinstance(error, InferenceError):
                status = failed_status(error)
                # Only the caller that made the attempts counts them, and what they were
                # charged; the others shared them.
                attempts = error.attempts if outcome.led else 0
                spent = (error.spent or NOTHING_SPENT) if outcome.led else NOTHING_SPENT
            else:
                # Not an InferenceError: a bug somewhere below. The call still gets its row
                # (error_type names the exception), and the caller still sees the exception.
                status, attempts, spent = "error", 0, NOTHING_SPENT
            self._record(request, started, status, error=error, attempts=attempts, spent=spent)
            raise error
        answer, attempts, paid = outcome.result()
        if not outcome.led:
            # An answer shared with an identical call (in flight, or just cached) is a hit.
            return self._result(request, answer, started)
        return self._result(request, answer, started, attempts=attempts, spent=paid)

    @staticmethod
    def _usable(
        request: InferenceRequest, found: Answer | None, *, quiet: bool = False
    ) -> Answer | None:
        """A cached answer as the caller gets it, or None (a miss). The shared cache keeps a
        structured answer's text only, so it is parsed again; it validated against this
        same schema when it was fetched (the request key says so), so one that no longer
        does was damaged in the cache: a miss, which the fresh answer then replaces (said
        once a call: ``quiet`` for the second look, a peek, of the call that saw it)."""
        if found is None or request.schema is None or found.data is not None:
            return found
        try:
            return OpenRouterClient.structured(found, request.schema)
        except StructuredAnswerError:
            if not quiet:
                log.warning(
                    "response cache: an entry for %s does not fit its response_format %s; "
                    "treated as a miss", request.model, request.schema.name,
                )  # fmt: skip
            return None

    def _fetch(self, request: InferenceRequest) -> tuple[Answer, int, Spend | None]:
        """The upstream call with its retries: (answer, attempts made, what they were charged
        in all). A failure carries its ``attempts`` and ``spent`` likewise."""
        client = self._client
        if client is None:  # refused before; kept for the type checker
            raise NotConfiguredError("no OpenRouter API key is configured")
        estimate = request.estimated_tokens(self._limits.default_max_tokens)
        messages = request.messages()
        # Every answer that came back was paid for, kept or not: the call counts them all.
        spent = NOTHING_SPENT

        def attempt(number: int) -> Answer:
            nonlocal spent
            try:
                # The guard first: a call over budget is refused at once, not after waiting
                # for a rate-limit slot; the slot's wait is spent holding the reservation.
                hold = self.guard.reserve(request, first_attempt=number == 1)
                try:
                    reservation = self.limiter.acquire(estimate)
                except BaseException:
                    self.guard.settle(hold, None)
                    raise
            except (RateLimitedError, BudgetExceededError) as exc:
                exc.attempts = number - 1  # the attempts that did reach OpenRouter
                raise
            # What this attempt was charged, when an answer came back.
            paid: Answer | None = None
            try:
                paid = client.complete(
                    model=request.model, messages=messages, params=request.params,
                    fallbacks=request.fallbacks, provider=request.provider,
                    schema=request.schema,
                )  # fmt: skip
                return paid
            except InferenceError as exc:
                # An answer that does not fit was answered, so spent, all the same.
                paid = exc.answer
                raise
            finally:
                if paid is not None:
                    spent = spent.add(paid)
                used = 0 if paid is None else paid.input_tokens + paid.output_tokens
                self.limiter.reconcile(reservation, used)
                self.guard.settle(hold, paid)

        try:
            answer, attempts = self._retry.run(
                attempt, clock=self._clock, on_error=self._on_upstream_error
            )
        except InferenceError as exc:
            exc.spent = spent
            raise
        self.cache.put(request.key, answer)
        return answer, attempts, spent

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
        spent: Spend | None = None,
    ) -> int:
        """Journal the call's row; its latency in ms."""
        latency_ms = int((time.perf_counter() - started) * 1000)
        keep = self._limits.input_text_max_chars if self._limits.store_input_text else None
        record = call_record(
            request, status=status, latency_ms=latency_ms, answer=answer, error=error,
            attempts=attempts, spent=spent, keep_input_chars=keep,
        )  # fmt: skip
        self.recorder.record(record)
        self._tracing.record(request, record, started)
        return latency_ms

    def _result(
        self,
        request: InferenceRequest,
        answer: Answer,
        started: float,
        *,
        attempts: int = 0,
        spent: Spend | None = None,
    ) -> InferenceResult:
        """Record a call that got an answer: fresh if it made attempts, else a cache hit."""
        cached = attempts == 0
        latency_ms = self._record(
            request, started, "cached" if cached else "ok", answer=answer, attempts=attempts,
            spent=None if cached else spent,
        )  # fmt: skip
        return InferenceResult(
            answer=answer,
            call_id=request.request_id,
            level=request.level,
            purpose=request.purpose,
            latency_ms=latency_ms,
            cached=cached,
            attempts=attempts,
            spent=None if cached else spent,
        )

    def _cancelled(self, request: InferenceRequest, error: CancelledCallError) -> None:
        self._record(request, time.perf_counter(), "cancelled", error=error)


def at_exit(target: T, action: Callable[[T], object]) -> Callable[[], None]:
    """``action(target)`` when the interpreter exits, if ``target`` is still alive and this
    is the process that asked; returns what cancels it (for a ``target`` that closes first:
    calling it again does nothing).

    A weak reference: a target that is dropped (as tests do) is not kept alive for the
    hook's sake. Only in the process that registered it: a child forked from this one
    inherits the hook but not the target's threads, and the locks they held at the fork
    stay held. Hooks run in the reverse order of their registration.
    """
    ref = weakref.ref(target)
    owner = os.getpid()

    def run() -> None:
        live = ref()
        if live is not None and os.getpid() == owner:
            action(live)

    atexit.register(run)
    return lambda: atexit.unregister(run)


def _warn_if_behind(database: Database) -> None:
    try:
        behind = database.behind()
    except DATABASE_AWAY:
        return  # the call log spools until the database is back; its status says so
    if behind:
        log.warning(
            "inference: the database is behind the service's migrations: %s; "
            "run `flask inference db upgrade` (the call log spools until then)",
            ", ".join(behind),
        )
