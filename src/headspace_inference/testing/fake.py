"""A scripted stand-in for InferenceService, for the tests of a host's consumers.

It has the surface hosts use (``infer``, ``submit``, ``is_available``, ``start``,
``stop``/``close``, ``purge``, ``on_call_recorded``), checks arguments with the real
service's own checks (so a fake never takes a call the real service refuses), answers from
a script, and records every call. Nothing is sent anywhere and nothing runs in the
background: ``submit`` returns a Future that is already done, and ``on_call_recorded``
callbacks run in the calling thread before the call returns.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeAlias, Unpack

from ..clock import SYSTEM_CLOCK, Clock
from ..inference.errors import (
    InferenceError,
    NotConfiguredError,
    ShuttingDownError,
)
from ..inference.types import CallOptions, InferenceResult
from ..settings import OpenRouterSettings, Settings
from .results import default_model, inference_result

if TYPE_CHECKING:
    from flask import Flask
    from sqlalchemy import Engine

    from ..inference.request import InferenceRequest
    from ..inference.validation import LinkChecker

__all__ = ["FakeCall", "FakeInferenceService", "FakePurge", "Scripted", "UnscriptedCallError"]

log = logging.getLogger(__name__)

# What a script holds: a text (answered as a result at the call's level), a whole result,
# an InferenceError (raised; an exception class is raised with a stock message), or a
# function of the call returning one of those.
Scripted: TypeAlias = (
    "str | InferenceResult | InferenceError | type[InferenceError] | Callable[[FakeCall], Any]"
)

# The configured levels: their names, or a mapping of level to model (or models).
Levels: TypeAlias = Iterable[str] | Mapping[str, str | list[str]]


class UnscriptedCallError(AssertionError):
    """A call the script has no answer for (an AssertionError: the test is incomplete)."""


@dataclass
class FakeCall:
    """One call the fake took: what was asked and what it answered (``result`` or
    ``error``), and when (``timestamp``, by the fake's clock: what ``purge(before=...)``
    compares). ``kwargs`` is every argument by name, as the real ``infer`` takes them."""

    method: str  # "infer" or "submit"
    level: str
    purpose: str
    input_text: str
    options: dict[str, Any] = field(default_factory=dict)
    result: InferenceResult | None = None
    error: BaseException | None = None
    timestamp: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def kwargs(self) -> dict[str, Any]:
        """``level``, ``purpose``, ``input_text`` and the options given."""
        return {
            "level": self.level,
            "purpose": self.purpose,
            "input_text": self.input_text,
            **self.options,
        }

    @property
    def project_id(self) -> int | None:
        """The project the call was about, if given."""
        return self.options.get("project_id")

    @property
    def agent_id(self) -> int | None:
        """The agent the call was about, if given."""
        return self.options.get("agent_id")

    @property
    def command_id(self) -> int | None:
        """The command the call was about, if given."""
        return self.options.get("command_id")

    @property
    def turn_id(self) -> int | None:
        """The turn the call was about, if given."""
        return self.options.get("turn_id")


@dataclass(frozen=True)
class FakePurge:
    """One purge the fake took: its criteria, and how many recorded calls it removed."""

    project_id: int | None = None
    before: datetime | None = None
    all: bool = False
    removed: int = 0

    @property
    def kwargs(self) -> dict[str, Any]:
        """The criteria given, by name, as ``purge`` was called (``{"all": True}``)."""
        given = {"project_id": self.project_id, "before": self.before, "all": self.all}
        return {name: value for name, value in given.items() if value not in (None, False)}

    def removes(self, call: FakeCall) -> bool:
        """Whether the purge takes ``call``, as the real one takes its row."""
        if self.all:
            return True
        return (self.project_id is None or call.project_id == self.project_id) and (
            self.before is None or call.timestamp < self.before
        )


@dataclass(frozen=True)
class _Entry:
    answer: Any
    level: str | None
    purpose: str | None

    def matches(self, call: FakeCall) -> bool:
        return (self.level is None or self.level == call.level) and (
            self.purpose is None or self.purpose == call.purpose
        )


def _checked(answer: object, *, function: bool = True) -> object:
    """``answer`` if it is something the real service could give (or, with ``function``, a
    function of the call giving one); TypeError otherwise."""
    if isinstance(answer, type):
        if not issubclass(answer, InferenceError):
            raise TypeError(_NOT_AN_INFERENCE_ERROR.format(answer.__name__))
        try:
            _stock(answer)
        except TypeError:
            raise TypeError(
                f"{answer.__name__} takes more than a message: script an instance"
            ) from None
        return answer
    if isinstance(answer, str | InferenceResult | InferenceError):
        return answer
    if function and callable(answer):
        return answer
    if isinstance(answer, BaseException):
        raise TypeError(_NOT_AN_INFERENCE_ERROR.format(type(answer).__name__))
    raise TypeError(
        "a scripted answer is a text, an InferenceResult, an InferenceError"
        f"{' or a function of the call' if function else ''}; got {type(answer).__name__}"
    )


def _stock(error: type[InferenceError]) -> InferenceError:
    """The error a scripted exception class raises."""
    return error(f"scripted {error.__name__}")


_NOT_AN_INFERENCE_ERROR = (
    "the real service raises only InferenceError subclasses, never {}: script one from "
    "headspace_inference.inference.errors (e.g. UpstreamServerError('...'))"
)


class FakeInferenceService:
    """A stand-in for ``InferenceService`` that answers from a script and records its calls.

    ``levels`` are the configured levels (names, or a mapping of level to model), else those
    of ``settings`` (a real ``Settings``), else the default four. ``engine``: check link ids
    against that database as the real service does (else only their form is checked).
    ``default``: the answer to a call nothing else in the script matches (without it, such a
    call raises UnscriptedCallError). ``clock``: the time the calls are stamped with (its
    ``time()``), for tests of ``purge(before=...)``.
    """

    def __init__(
        self,
        *,
        levels: Levels | None = None,
        settings: Settings | None = None,
        engine: Engine | None = None,
        available: bool = True,
        default: Scripted | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if levels is not None and settings is not None:
            raise TypeError("give the fake levels or settings, not both")
        if settings is None:
            settings = Settings(openrouter=_openrouter_for(levels))
        self.settings = settings
        from ..inference.pricing import PriceTable
        from ..inference.request import RequestBuilder

        # The configured prices (a fake reads no synced price file).
        self._prices = PriceTable(settings.openrouter.pricing)
        self._requests = RequestBuilder(settings.openrouter)
        self._clock = clock
        self._links: LinkChecker | None = None
        if engine is not None:
            from ..calllog.database import session_factory
            from ..inference.validation import LinkChecker

            self._links = LinkChecker(session_factory(engine))
        self._available = available
        self._default = None if default is None else _checked(default)
        self._queue: list[_Entry] = []
        self._standing: dict[tuple[str | None, str | None], object] = {}
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        self._recorded: list[Callable[[dict[str, Any]], object]] = []
        self._row_ids = itertools.count(1)
        self.calls: list[FakeCall] = []
        self.purges: list[FakePurge] = []
        self._budget_listeners: list[Callable[[dict[str, Any]], object]] = []

    # ------------------------------------------------------------------ the script

    def script(
        self, *answers: Scripted, level: str | None = None, purpose: str | None = None
    ) -> FakeInferenceService:
        """Queue ``answers``, each used once, in order, by the calls at ``level`` for
        ``purpose`` (None: any); queued answers come before standing ones."""
        self._check_level(level)
        entries = [_Entry(_checked(answer), level, purpose) for answer in answers]
        with self._lock:
            self._queue.extend(entries)
        return self

    def always(
        self, answer: Scripted, *, level: str | None = None, purpose: str | None = None
    ) -> FakeInferenceService:
        """Answer every call at ``level`` for ``purpose`` (None: any) with ``answer`` once
        its queue is used up; the most specific standing answer wins."""
        self._check_level(level)
        checked = _checked(answer)
        with self._lock:
            self._standing[(level, purpose)] = checked
        return self

    @property
    def unused(self) -> list[object]:
        """The queued answers no call has used yet."""
        with self._lock:
            return [entry.answer for entry in self._queue]

    def calls_for(self, level: str | None = None, purpose: str | None = None) -> list[FakeCall]:
        """The calls at ``level`` for ``purpose`` (None: any), in order."""
        entry = _Entry(None, level, purpose)
        with self._lock:
            return [call for call in self.calls if entry.matches(call)]

    def reset(self) -> None:
        """Forget the calls, the purges and the script (the default answer and the
        on_call_recorded callbacks stay)."""
        with self._lock:
            self.calls.clear()
            self.purges.clear()
            self._queue.clear()
            self._standing.clear()

    # ------------------------------------------------------------------ the service's surface

    def infer(
        self, level: str, purpose: str, input_text: str, **options: Unpack[CallOptions]
    ) -> InferenceResult:
        """Check the arguments as the real service does, record the call, and answer it
        from the script (raising a scripted InferenceError)."""
        call, request = self._take("infer", level, purpose, input_text, options)
        return self._answer(call, request)

    def submit(
        self, level: str, purpose: str, input_text: str, **options: Unpack[CallOptions]
    ) -> Future[InferenceResult]:
        """As infer(), answered at once into a done Future (a scripted error is the
        Future's exception); bad arguments and an unavailable service raise here."""
        call, request = self._take("submit", level, purpose, input_text, options)
        future: Future[InferenceResult] = Future()
        try:
            future.set_result(self._answer(call, request))
        except InferenceError as exc:
            future.set_exception(exc)
        return future

    @property
    def is_available(self) -> bool:
        """Whether calls are taken: True unless set False, or after stop()/close()."""
        return self._available and not self._closed

    @is_available.setter
    def is_available(self, value: bool) -> None:
        self._available = value

    @property
    def started(self) -> bool:
        """Whether start() (or a call) has run, and close() has not."""
        return self._started and not self._closed

    def start(self) -> FakeInferenceService:
        """Mark the fake started (the real one starts its writer and threads here)."""
        self._started = True
        return self

    def stop(self, timeout: float | None = None) -> None:
        """The same as close()."""
        self.close(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Take no more calls: later ones raise ShuttingDownError, as the real service's do."""
        self._closed = True

    def purge(
        self,
        project_id: int | None = None,
        before: datetime | None = None,
        all: bool = False,
    ) -> int:
        """Check the criteria as the real ``purge`` does (no criteria, or ``all`` with
        another, raises its ValueError), remove the recorded calls it would delete from
        ``calls`` (those of ``project_id`` and/or stamped before ``before``, or all), record
        it in ``purges``, and return how many calls it removed."""
        from ..calllog.purge import purge_criteria

        purge_criteria(project_id, before, all)
        with self._lock:
            taken = FakePurge(project_id, before, all)
            kept = [call for call in self.calls if not taken.removes(call)]
            taken = dataclasses.replace(taken, removed=len(self.calls) - len(kept))
            self.calls[:] = kept
            self.purges.append(taken)
        return taken.removed

    def on_call_recorded(self, callback: Callable[[dict[str, Any]], object]) -> None:
        """Call ``callback(call)`` once for each call the fake records (answered, failed or
        refused as unavailable; not one refused for its arguments, which the real service
        writes no row for), with the CALL the real service's callbacks get, built by the
        same code from the row the real service would write; ``id`` counts from 1. It runs
        in the calling thread before the call returns; an exception from it is logged and
        goes no further, as the real service's."""
        with self._lock:
            self._recorded.append(callback)

    def budget(
        self,
        *,
        level: str | None = None,
        purpose: str | None = None,
        project_id: int | None = None,
    ) -> list[dict[str, Any]]:
        """The budgets of the fake's settings as the real service states them, with nothing
        used: the fake spends nothing (script a BudgetExceededError to test a refusal)."""
        from ..inference.budget import SpendGuard
        from ..inference.budget_store import MemoryBudgetStore

        guard = SpendGuard(
            self.settings.openrouter, store=MemoryBudgetStore(), prices=self._prices,
            default_max_tokens=self.settings.inference.default_max_tokens, clock=self._clock,
        )  # fmt: skip
        return guard.budget(level=level, purpose=purpose, project_id=project_id)

    def on_budget_event(self, callback: Callable[[dict[str, Any]], object]) -> None:
        """Keep ``callback`` for ``budget_event()``: the fake's calls spend nothing, so they
        give no budget event of their own."""
        with self._lock:
            self._budget_listeners.append(callback)

    def budget_event(self, event: dict[str, Any]) -> None:
        """Give ``event`` (the shape ``InferenceService.on_budget_event`` documents) to every
        on_budget_event callback, as a host's test of its own handling needs."""
        with self._lock:
            listeners = list(self._budget_listeners)
        for callback in listeners:
            callback(dict(event))

    def init_app(self, app: Flask, *, extension_key: str = "inference") -> FakeInferenceService:
        """Put the fake in ``app.extensions[extension_key]``, where the app's code looks the
        service up (Claude Headspace's consumers look under ``inference_service``), in place
        of whatever is there (a real service the host's factory built, never started)."""
        app.extensions[extension_key] = self
        return self

    # ------------------------------------------------------------------ the flow

    def _check_level(self, level: str | None) -> None:
        if level is not None:
            from ..inference.validation import check_level

            check_level(level, self.settings.levels)

    def _take(
        self,
        method: str,
        level: object,
        purpose: object,
        input_text: object,
        options: Mapping[str, Any],
    ) -> tuple[FakeCall, InferenceRequest]:
        """The checked call, recorded; raises what the real service would before calling."""
        from ..inference.validation import check_call

        if not self._started:
            self.start()
        arguments = check_call(
            level, purpose, input_text, options,
            levels=self.settings.levels,
            max_input_chars=self.settings.inference.max_input_chars,
        )  # fmt: skip
        if self._links is not None:
            self._links.check(arguments.links)
        request = self._requests(arguments)
        call = FakeCall(
            method, arguments.level, arguments.purpose, arguments.input_text, dict(options),
            timestamp=datetime.fromtimestamp(self._clock.time(), UTC),
        )  # fmt: skip
        with self._lock:
            self.calls.append(call)
        refusal = self._refusal()
        if refusal is not None:
            call.error = refusal
            self._tell_recorded(call, request, "refused")
            raise refusal
        return call, request

    def _refusal(self) -> InferenceError | None:
        if self._closed:
            return ShuttingDownError("the (fake) inference service is shut down")
        if not self._available:
            return NotConfiguredError("the (fake) inference service is set unavailable")
        return None

    def _answer(self, call: FakeCall, request: InferenceRequest) -> InferenceResult:
        try:
            answer = self._next(call)
            if callable(answer) and not isinstance(answer, type):
                answer = _checked(answer(call), function=False)
            result = self._resolve(answer, request)
        except BaseException as exc:
            call.error = exc
            from ..inference.request import failed_status  # as the real service's row says

            self._tell_recorded(call, request, failed_status(exc))
            raise
        call.result = result
        self._tell_recorded(call, request, "cached" if result.cached else "ok")
        return result

    def _tell_recorded(self, call: FakeCall, request: InferenceRequest, status: str) -> None:
        """The on_call_recorded callbacks, with the CALL of the row the real service would
        write for ``call`` (built by its call_record and the calls API's call_json)."""
        with self._lock:
            callbacks = list(self._recorded)
        if not callbacks:
            return
        from ..calllog.call_json import call_json
        from ..inference.request import call_record

        limits = self.settings.inference
        result, error = call.result, call.error
        answer, latency_ms = None, 0
        attempts = error.attempts if isinstance(error, InferenceError) else 0
        if result is not None:  # the row of the call_id the caller got
            request = dataclasses.replace(request, request_id=result.call_id)
            answer, latency_ms, attempts = result.answer, result.latency_ms, result.attempts
        record = call_record(
            request, status=status, latency_ms=latency_ms, answer=answer, error=error,
            attempts=attempts,
            keep_input_chars=limits.input_text_max_chars if limits.store_input_text else None,
        )  # fmt: skip
        record = dataclasses.replace(record, timestamp=call.timestamp)
        row = call_json(SimpleNamespace(id=next(self._row_ids), **record.values()))
        for callback in callbacks:
            try:
                callback(dict(row))
            except Exception:  # the host's failure is its own: the call goes on
                log.exception("inference: an on_call_recorded callback failed")

    def _next(self, call: FakeCall) -> object:
        with self._lock:
            for index, entry in enumerate(self._queue):
                if entry.matches(call):
                    del self._queue[index]
                    return entry.answer
            for key in (
                (call.level, call.purpose),
                (call.level, None),
                (None, call.purpose),
                (None, None),
            ):
                if key in self._standing:
                    return self._standing[key]
        if self._default is not None:
            return self._default
        raise UnscriptedCallError(
            f"the fake inference service has no answer for level {call.level!r}, purpose "
            f"{call.purpose!r}: script one with fake.script(...) or fake.always(...)"
        )

    def _resolve(self, answer: object, request: InferenceRequest) -> InferenceResult:
        if isinstance(answer, type) and issubclass(answer, InferenceError):
            raise _stock(answer)
        if isinstance(answer, InferenceError):
            raise answer
        if isinstance(answer, InferenceResult):
            result = answer
        else:
            result = self._result_for(str(answer), request)  # a text (_checked saw to it)
        if request.schema is not None and result.data is None:
            # As the real service: the answer is parsed and validated against
            # response_format; one that does not fit raises StructuredAnswerError.
            from ..inference.client import OpenRouterClient

            parsed = OpenRouterClient.structured(result.answer, request.schema)
            result = dataclasses.replace(result, answer=parsed)
        return result

    def _result_for(self, text: str, request: InferenceRequest) -> InferenceResult:
        """A fresh answer at the call's level: its model, the emulator's token counts, and
        their cost by the configured prices."""
        from .emulator.server import count_tokens

        model = request.model
        input_tokens = count_tokens(request.input_text + (request.system_prompt or ""))
        output_tokens = count_tokens(text)
        charge = self._prices.charge(model, input_tokens, output_tokens)
        return inference_result(
            text,
            model=model,
            call_id=request.request_id,
            level=request.level,
            purpose=request.purpose,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=None if charge is None else charge.cost,
        )


def _openrouter_for(levels: Levels | None) -> OpenRouterSettings:
    if levels is None:
        return OpenRouterSettings()
    if isinstance(levels, str):
        raise TypeError("levels is a list of level names (or a mapping of level to model)")
    if isinstance(levels, Mapping):
        models = dict(levels)
    else:
        models = {level: default_model(level) for level in levels}
    return OpenRouterSettings(models=models)
