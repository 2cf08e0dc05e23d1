"""Every way an inference call can fail, as one exception tree.

"(retryable)" marks the classes whose ``retryable`` is true: the retry policy tries again
(an upstream one), or the caller may (a local one); every other class is final.

InferenceError                      base; carries retryable, retry_after, status_code,
                                    and the attempts made and what they were charged
├── InvalidRequestError             the caller's arguments are wrong; nothing was sent
│   ├── UnknownLevelError           level is not turn, task, project or objective
│   ├── InputTooLargeError          input_text is over inference.max_input_chars
│   └── UnknownEntityError          a project/agent/command/turn id that does not exist
├── ServiceUnavailableError         the service will not make the call right now
│   ├── InferenceDisabledError      openrouter.enabled is false
│   ├── NotConfiguredError          no API key is configured
│   ├── QueueFullError              submit() found the work queue full (retryable)
│   └── ShuttingDownError           the service is stopping (or stopped) and took no new work
├── RateLimitedError                no local rate-limit slot within max_wait (retryable)
├── BudgetExceededError             a budget's cap would be crossed; nothing was sent
│   └── CallStormError              the storm breaker refuses the call's purpose for now
├── CancelledCallError              accepted, then cancelled by shutdown (retryable)
└── UpstreamError                   OpenRouter, or the way to it, failed the call
    ├── TransportError              no HTTP answer at all (retryable)
    │   ├── UpstreamTimeoutError    connect, read, write or pool timeout
    │   └── UpstreamConnectionError refused, reset or dropped connection
    ├── BadRequestError             400: the request itself is invalid (final; see
    │                               classify for a provider's failure dressed as one)
    ├── AuthenticationError         401: the key is missing, wrong or revoked (final)
    ├── InsufficientCreditsError    402: the account has no credits left (final)
    ├── ModerationError             403: input flagged by moderation (final)
    ├── ModelNotFoundError          404: no such model or endpoint (final)
    ├── RequestTimeoutError         408: OpenRouter timed the request out (retryable)
    ├── UpstreamRateLimitError      429: OpenRouter's own rate limit (retryable)
    ├── UpstreamServerError         5xx: OpenRouter or the provider failed (retryable)
    ├── ErrorInResponseError        200 whose body carries an error object (retryable)
    ├── EmptyResponseError          200 with no choices (retryable)
    └── InvalidResponseError        a body that is not the JSON we expect (retryable)
        └── StructuredAnswerError   an answer that does not parse or validate against
                                    response_format (retryable; carries the answer)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .types import Answer, Spend

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "BudgetExceededError",
    "CallStormError",
    "CancelledCallError",
    "EmptyResponseError",
    "ErrorInResponseError",
    "InferenceDisabledError",
    "InferenceError",
    "InputTooLargeError",
    "InsufficientCreditsError",
    "InvalidRequestError",
    "InvalidResponseError",
    "ModelNotFoundError",
    "ModerationError",
    "NotConfiguredError",
    "QueueFullError",
    "RateLimitedError",
    "RequestTimeoutError",
    "ServiceUnavailableError",
    "ShuttingDownError",
    "StructuredAnswerError",
    "TransportError",
    "UnknownEntityError",
    "UnknownLevelError",
    "UpstreamConnectionError",
    "UpstreamError",
    "UpstreamRateLimitError",
    "UpstreamServerError",
    "UpstreamTimeoutError",
    "classify",
    "error_for_status",
]


class InferenceError(Exception):
    """Base of every inference failure; says whether and when a retry makes sense."""

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        retryable: bool | None = None,
        retry_after: float | None = None,
        status_code: int | None = None,
        code: int | str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable
        # Seconds to wait before trying again, when known (from OpenRouter's Retry-After,
        # or the local limiter's or queue's estimate); the retry policy uses it as it is.
        self.retry_after = retry_after
        self.status_code = status_code
        self.code = code
        self.metadata: dict[str, Any] = dict(metadata or {})
        # Upstream attempts made before this error was raised (set by the retry loop).
        self.attempts = 0
        # What came back and was paid for though it failed the call (a structured answer
        # that does not fit), else None.
        self.answer: Answer | None = None
        # What all the call's attempts were charged (set by the service with ``attempts``).
        self.spent: Spend | None = None

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description for logs, the CLI and API answers."""
        return {
            "type": type(self).__name__,
            "message": self.message,
            "retryable": self.retryable,
            "retry_after": self.retry_after,
            "status_code": self.status_code,
        }


class InvalidRequestError(InferenceError, ValueError):
    """The caller's arguments are wrong; no upstream request was made."""


class UnknownLevelError(InvalidRequestError):
    """The level is not one of turn, task, project, objective."""


class InputTooLargeError(InvalidRequestError):
    """The input text is longer than inference.max_input_chars."""


class UnknownEntityError(InvalidRequestError):
    """A project, agent, command or turn id that does not exist."""


class ServiceUnavailableError(InferenceError):
    """The service will not make the call right now."""


class InferenceDisabledError(ServiceUnavailableError):
    """Inference is switched off in configuration (openrouter.enabled: false)."""


class NotConfiguredError(ServiceUnavailableError):
    """No OpenRouter API key is configured."""


class QueueFullError(ServiceUnavailableError):
    """The work queue behind submit() is full."""

    retryable = True


class ShuttingDownError(ServiceUnavailableError):
    """The service is shutting down and takes no new work."""


class RateLimitedError(InferenceError):
    """The local rate limiter cannot admit the call within max_wait_seconds."""

    retryable = True


class BudgetExceededError(InferenceError):
    """A budget (openrouter.budgets) would be crossed by the call's worst case: refused
    before anything was sent. ``rule`` names the budget; ``retry_after`` is the seconds to
    its window's end (None when the call's worst case alone is over the whole cap). Final:
    the retry policy does not try again, and neither should a caller before then."""

    def __init__(self, message: str, *, rule: str, **kwargs: Any) -> None:
        super().__init__(message, retryable=False, **kwargs)
        self.rule = rule

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "rule": self.rule}


class CallStormError(BudgetExceededError):
    """The storm breaker (openrouter.storm_breaker) refuses the call's purpose (and
    project) for its cool-down: it made more calls than allowed in a short time.
    ``retry_after`` is the cool-down left; other purposes run on."""


class CancelledCallError(InferenceError):
    """The call was accepted but cancelled by shutdown before it ran."""

    retryable = True


class UpstreamError(InferenceError):
    """OpenRouter, or the way to it, failed the call."""


class TransportError(UpstreamError):
    """No HTTP answer came back."""

    retryable = True


class UpstreamTimeoutError(TransportError):
    """A connect, read, write or pool timeout."""


class UpstreamConnectionError(TransportError):
    """The connection was refused, reset or dropped."""


class BadRequestError(UpstreamError):
    """400: OpenRouter rejected the request as invalid."""


class AuthenticationError(UpstreamError):
    """401: the API key is missing, wrong or revoked."""


class InsufficientCreditsError(UpstreamError):
    """402: the OpenRouter account has no credits left."""


class ModerationError(UpstreamError):
    """403: the input was flagged by moderation; metadata holds the reasons."""

    @property
    def reasons(self) -> list[str]:
        """The moderation categories OpenRouter gave, if any."""
        reasons = self.metadata.get("reasons")
        return [str(r) for r in reasons] if isinstance(reasons, list) else []


class ModelNotFoundError(UpstreamError):
    """404: no such model or endpoint."""


class RequestTimeoutError(UpstreamError):
    """408: OpenRouter timed the request out."""

    retryable = True


class UpstreamRateLimitError(UpstreamError):
    """429: OpenRouter's own rate limit."""

    retryable = True


class UpstreamServerError(UpstreamError):
    """5xx: OpenRouter or the model provider failed."""

    retryable = True


class ErrorInResponseError(UpstreamError):
    """A 200 answer whose body carries an error object (a provider failed mid-way)."""

    retryable = True


class EmptyResponseError(UpstreamError):
    """A 200 answer with no choices in it."""

    retryable = True


class InvalidResponseError(UpstreamError):
    """A body that is not the JSON an OpenRouter answer should be."""

    retryable = True


class StructuredAnswerError(InvalidResponseError):
    """An answer that does not parse or validate against the call's response_format;
    ``answer`` is what came back (its raw text, tokens and cost: it was paid for)."""

    answer: Answer

    def __init__(self, message: str, *, answer: Answer, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.answer = answer


# The statuses with a class of their own, final or retryable; error_for_status covers the rest.
_BY_STATUS: dict[int, type[UpstreamError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: InsufficientCreditsError,
    403: ModerationError,
    404: ModelNotFoundError,
    408: RequestTimeoutError,
    429: UpstreamRateLimitError,
}


def error_for_status(status_code: int) -> type[UpstreamError]:
    """The exception class for an HTTP error status from OpenRouter."""
    if status_code in _BY_STATUS:
        return _BY_STATUS[status_code]
    if status_code >= 500:
        return UpstreamServerError
    # Any other 4xx is the request's fault and will not get better by retrying.
    return BadRequestError


# OpenRouter passes a provider's failure through, and some arrive with a final-looking
# status (users' reports against its SDKs and clients: OPENROUTER.md); a retry of the same
# request then succeeds. Matched on the start of OpenRouter's error message.
_PROVIDER_FAILED = "provider returned error"
_NO_MODELS = "no models provided"


def classify(
    status_code: int, code: object, message: str, *, model_named: bool = False
) -> type[UpstreamError]:
    """The exception class for an HTTP error from OpenRouter, by its status and its body's
    ``error.code`` and ``error.message``; ``model_named``: the request named a model.

    ======  ===========================================  ============================
    status  body                                         class
    ======  ===========================================  ============================
    400     code 408, 429 or 5xx ("Provider returned     the code's (UpstreamServer-
    404     error" carrying 502, 503, 524, 529...)       Error for 5xx): retried
    404     "Provider returned error"                    UpstreamServerError: retried
    400     "No models provided", for a request that     UpstreamServerError: retried
            named one
    any     anything else (a caller's own bad request:   error_for_status(status)
            code 400, a schema error, an unknown model)
    ======  ===========================================  ============================
    """
    said = message.strip().lower()
    if status_code in (400, 404) and type(code) is int and code != status_code:
        carried = error_for_status(code)
        if carried.retryable:
            return carried
    if status_code == 404 and said.startswith(_PROVIDER_FAILED):
        return UpstreamServerError
    if status_code == 400 and model_named and said.startswith(_NO_MODELS):
        return UpstreamServerError
    return error_for_status(status_code)
