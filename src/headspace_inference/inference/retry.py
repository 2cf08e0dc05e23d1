"""The retry policy: whether to retry, how long to wait, and the one loop that does it."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ..clock import Clock
from ..settings import RetrySettings
from .errors import InferenceError, UpstreamError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Up to this fraction of a computed backoff is removed at random, so that callers who
# failed together do not all come back together.
JITTER = 0.25

OnError = Callable[[InferenceError, int, float | None], None]


@dataclass(frozen=True)
class RetryPolicy:
    """Retry retryable errors with capped exponential backoff and jitter, honouring Retry-After."""

    max_attempts: int = 3
    base_delay_seconds: float = 1.0
    max_delay_seconds: float = 30.0

    @classmethod
    def from_settings(cls, settings: RetrySettings) -> RetryPolicy:
        """The policy configured under openrouter.retry."""
        return cls(settings.max_attempts, settings.base_delay_seconds, settings.max_delay_seconds)

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """The delay after failed attempt ``attempt`` (1-based) when the error names none.

        Exactly ``step * (1 - JITTER * u)`` with ``step = min(max_delay, base * 2 ** (attempt
        - 1))`` and ``u = rng.random()`` in ``[0, 1)``: so within ``(0.75 * step, step]``,
        never longer than the cap.
        """
        # The exponent is bounded so a huge attempt number cannot overflow a float.
        growth = 2.0 ** min(attempt - 1, 64)
        step = min(self.max_delay_seconds, self.base_delay_seconds * growth)
        fraction = (rng or random).random()
        return step * (1 - JITTER * fraction)

    def delay_for(
        self, attempt: int, error: InferenceError, *, rng: random.Random | None = None
    ) -> float | None:
        """Seconds to wait after failed attempt ``attempt`` (1-based), or None to stop.

        Stops for a final error, after the last attempt, and when the error's
        ``retry_after`` (the server's Retry-After, read once by the client) is beyond
        ``max_delay_seconds``: the error keeps it for the caller. A ``retry_after`` within
        the cap is used as it is; without one, :meth:`backoff`.
        """
        if not error.retryable or attempt >= self.max_attempts:
            return None
        wait = error.retry_after
        if wait is not None:
            # The server said when; waiting longer than we allow means giving up now and
            # passing its answer on to the caller.
            if wait > self.max_delay_seconds:
                return None
            return max(0.0, wait)
        return self.backoff(attempt, rng)

    def run(
        self,
        fn: Callable[[int], T],
        *,
        clock: Clock,
        on_error: OnError | None = None,
        rng: random.Random | None = None,
    ) -> tuple[T, int]:
        """Call ``fn(attempt)`` until it succeeds or the policy stops; (result, attempts).

        Only UpstreamErrors (OpenRouter's answers, or none) are retried; the last one is
        re-raised with ``attempts`` set. Anything else ``fn`` raises, such as the local
        limiter's RateLimitedError, ends the loop at once, as it is. ``on_error`` sees every
        upstream failure with the delay chosen (None when it is the last). Waiting goes
        through ``clock.sleep``.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn(attempt), attempt
            except UpstreamError as error:
                error.attempts = attempt
                delay = self.delay_for(attempt, error, rng=rng)
                if on_error is not None:
                    on_error(error, attempt, delay)
                if delay is None:
                    raise
                log.warning(
                    "OpenRouter call failed on attempt %d of %d (%s, status %s); "
                    "retrying in %.2f s",
                    attempt,
                    self.max_attempts,
                    type(error).__name__,
                    error.status_code,
                    delay,
                )
                clock.sleep(delay)
