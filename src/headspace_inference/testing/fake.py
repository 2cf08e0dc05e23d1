"""A scripted stand-in for InferenceService, for the tests of a host's consumers.

It has the call surface consumers use (``infer``, ``submit``, ``is_available``, ``start``,
``stop``/``close``), checks arguments with the real service's own checks (so a fake never
takes a call the real service refuses), answers from a script, and records every call.
Nothing is sent anywhere and nothing runs in the background: ``submit`` returns a Future
that is already done.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias, Unpack

from ..inference.errors import InferenceError, NotConfiguredError, ShuttingDownError
from ..inference.types import CallOptions, InferenceResult
from ..settings import OpenRouterSettings, Settings
from .results import default_model, inference_result

if TYPE_CHECKING:
    from flask import Flask
    from sqlalchemy import Engine

    from ..inference.validation import CallArguments, LinkChecker

__all__ = ["FakeCall", "FakeInferenceService", "Scripted", "UnscriptedCallError"]

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
    ``error``). ``kwargs`` is every argument by name, as the real ``infer`` takes them."""

    method: str  # "infer" or "submit"
    level: str
    purpose: str
    input_text: str
    options: dict[str, Any] = field(default_factory=dict)
    result: InferenceResult | None = None
    error: BaseException | None = None

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
    call raises UnscriptedCallError).
    """

    def __init__(
        self,
        *,
        levels: Levels | None = None,
        settings: Settings | None = None,
        engine: Engine | None = None,
        available: bool = True,
        default: Scripted | None = None,
    ) -> None:
        if levels is not None and settings is not None:
            raise TypeError("give the fake levels or settings, not both")
        if settings is None:
            settings = Settings(openrouter=_openrouter_for(levels))
        self.settings = settings
        from ..inference.pricing import PriceTable

        # The configured prices (a fake reads no synced price file).
        self._prices = PriceTable(settings.openrouter.pricing)
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
        self.calls: list[FakeCall] = []

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
        """Forget the calls and the script (the default answer stays)."""
        with self._lock:
            self.calls.clear()
            self._queue.clear()
            self._standing.clear()

    # ------------------------------------------------------------------ the service's surface

    def infer(
        self, level: str, purpose: str, input_text: str, **options: Unpack[CallOptions]
    ) -> InferenceResult:
        """Check the arguments as the real service does, record the call, and answer it
        from the script (raising a scripted InferenceError)."""
        call, arguments = self._take("infer", level, purpose, input_text, options)
        return self._answer(call, arguments)

    def submit(
        self, level: str, purpose: str, input_text: str, **options: Unpack[CallOptions]
    ) -> Future[InferenceResult]:
        """As infer(), answered at once into a done Future (a scripted error is the
        Future's exception); bad arguments and an unavailable service raise here."""
        call, arguments = self._take("submit", level, purpose, input_text, options)
        future: Future[InferenceResult] = Future()
        try:
            future.set_result(self._answer(call, arguments))
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
    ) -> tuple[FakeCall, CallArguments]:
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
        call = FakeCall(
            method, arguments.level, arguments.purpose, arguments.input_text, dict(options)
        )
        with self._lock:
            self.calls.append(call)
        refusal = self._refusal()
        if refusal is not None:
            call.error = refusal
            raise refusal
        return call, arguments

    def _refusal(self) -> InferenceError | None:
        if self._closed:
            return ShuttingDownError("the (fake) inference service is shut down")
        if not self._available:
            return NotConfiguredError("the (fake) inference service is set unavailable")
        return None

    def _answer(self, call: FakeCall, arguments: CallArguments) -> InferenceResult:
        try:
            answer = self._next(call)
            if callable(answer) and not isinstance(answer, type):
                answer = _checked(answer(call), function=False)
            result = self._resolve(answer, arguments)
        except BaseException as exc:
            call.error = exc
            raise
        call.result = result
        return result

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

    def _resolve(self, answer: object, arguments: CallArguments) -> InferenceResult:
        if isinstance(answer, type) and issubclass(answer, InferenceError):
            raise _stock(answer)
        if isinstance(answer, InferenceError):
            raise answer
        if isinstance(answer, InferenceResult):
            result = answer
        else:
            result = self._result_for(str(answer), arguments)  # a text (_checked saw to it)
        if arguments.schema is not None and result.data is None:
            # As the real service: the answer is parsed and validated against
            # response_format; one that does not fit raises StructuredAnswerError.
            from ..inference.client import OpenRouterClient

            parsed = OpenRouterClient.structured(result.answer, arguments.schema)
            result = dataclasses.replace(result, answer=parsed)
        return result

    def _result_for(self, text: str, arguments: CallArguments) -> InferenceResult:
        """A fresh answer at the call's level: its model, the emulator's token counts, and
        their cost by the configured prices."""
        from .emulator.server import count_tokens

        model, _ = self.settings.openrouter.route(arguments.level)
        input_tokens = count_tokens(arguments.input_text + (arguments.system_prompt or ""))
        output_tokens = count_tokens(text)
        charge = self._prices.charge(model, input_tokens, output_tokens)
        return inference_result(
            text,
            model=model,
            level=arguments.level,
            purpose=arguments.purpose,
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
