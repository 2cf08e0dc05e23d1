"""The retry policy: the delay table, jitter bounds, Retry-After, and the one loop (fake clock)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import pytest

from claude_headspace.clock import FakeClock
from claude_headspace.config import RetrySettings
from claude_headspace.inference import errors as e
from claude_headspace.inference.retry import JITTER, RetryPolicy


class FixedRandom(random.Random):
    """A generator whose random() always returns ``value``, to pin the jitter."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


POLICY = RetryPolicy(max_attempts=5, base_delay_seconds=1.0, max_delay_seconds=10.0)
NO_JITTER = FixedRandom(0.0)
FULL_JITTER = FixedRandom(0.999_999)


def server_error(retry_after: float | None = None) -> e.UpstreamServerError:
    return e.UpstreamServerError("503", status_code=503, retry_after=retry_after)


@pytest.mark.parametrize(
    ("attempt", "error", "rng", "expected"),
    [
        # exponential from base, capped at max_delay; u = 0 leaves the step whole
        (1, server_error(), NO_JITTER, 1.0),
        (2, server_error(), NO_JITTER, 2.0),
        (3, server_error(), NO_JITTER, 4.0),
        (4, server_error(), NO_JITTER, 8.0),
        # u -> 1 takes off (almost) JITTER of the step
        (1, server_error(), FULL_JITTER, 1.0 * (1 - JITTER * 0.999_999)),
        (3, server_error(), FixedRandom(0.5), 4.0 * (1 - JITTER * 0.5)),
        # Retry-After is used as it is, shorter or longer than the backoff
        (1, server_error(retry_after=7.5), FULL_JITTER, 7.5),
        (3, server_error(retry_after=0.25), NO_JITTER, 0.25),
        (2, server_error(retry_after=0.0), NO_JITTER, 0.0),
        (1, server_error(retry_after=10.0), NO_JITTER, 10.0),  # exactly the cap: still waits
        # beyond the cap: stop at once
        (1, server_error(retry_after=10.01), NO_JITTER, None),
        # the last attempt never waits
        (5, server_error(), NO_JITTER, None),
        (5, server_error(retry_after=1.0), NO_JITTER, None),
        # final errors never wait
        (1, e.BadRequestError("400", status_code=400), NO_JITTER, None),
        (1, e.ModerationError("403", status_code=403, retry_after=1.0), NO_JITTER, None),
        # every retryable kind waits the same way
        (2, e.UpstreamTimeoutError("t"), NO_JITTER, 2.0),
        (2, e.UpstreamConnectionError("c"), NO_JITTER, 2.0),
        (2, e.RequestTimeoutError("408", status_code=408), NO_JITTER, 2.0),
        (2, e.UpstreamRateLimitError("429", status_code=429, retry_after=3.0), NO_JITTER, 3.0),
        (2, e.ErrorInResponseError("200e", status_code=200), NO_JITTER, 2.0),
        (2, e.EmptyResponseError("200-", status_code=200), NO_JITTER, 2.0),
    ],
)
def test_delay_table(
    attempt: int, error: e.InferenceError, rng: random.Random, expected: float | None
) -> None:
    delay = POLICY.delay_for(attempt, error, rng=rng)
    if expected is None:
        assert delay is None
    else:
        assert delay == pytest.approx(expected)


def test_the_cap_bounds_the_step_and_huge_attempts_do_not_overflow() -> None:
    policy = RetryPolicy(max_attempts=10_000, base_delay_seconds=1.0, max_delay_seconds=10.0)
    assert policy.delay_for(6, server_error(), rng=NO_JITTER) == 10.0
    assert policy.delay_for(5_000, server_error(), rng=NO_JITTER) == 10.0


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 6])
def test_jitter_stays_within_its_bounds(attempt: int) -> None:
    policy = RetryPolicy(max_attempts=99, base_delay_seconds=0.5, max_delay_seconds=8.0)
    step = min(8.0, 0.5 * 2 ** (attempt - 1))
    rng = random.Random(attempt)
    delays = [policy.backoff(attempt, rng) for _ in range(2000)]
    assert all(step * (1 - JITTER) < d <= step for d in delays)
    # and it really is random: the draws spread over most of the range
    assert max(delays) - min(delays) > 0.8 * JITTER * step


def test_http_date_retry_after_is_measured_from_now() -> None:
    error = server_error(retry_after=99.0)  # what the client computed on its own clock
    error.retry_at = 1_700_000_030.0
    assert POLICY.delay_for(1, error, now=1_700_000_025.0) == pytest.approx(5.0)
    assert POLICY.delay_for(1, error, now=1_700_000_040.0) == 0.0  # already past
    assert POLICY.delay_for(1, error, now=1_700_000_000.0) is None  # 30 s > the 10 s cap
    # without a now, the seconds the client worked out are used
    assert POLICY.delay_for(1, error) is None


def test_from_settings() -> None:
    settings = RetrySettings(max_attempts=4, base_delay_seconds=0.5, max_delay_seconds=7.0)
    assert RetryPolicy.from_settings(settings) == RetryPolicy(4, 0.5, 7.0)


# --------------------------------------------------------------------------- the loop


def failing(
    errors: list[e.InferenceError], result: str = "ok"
) -> tuple[list[int], Callable[[int], str]]:
    """fn(attempt) raising ``errors`` in turn, then returning ``result``; and its call log."""
    calls: list[int] = []

    def fn(attempt: int) -> str:
        calls.append(attempt)
        if errors:
            raise errors.pop(0)
        return result

    return calls, fn


@pytest.mark.parametrize("failures", [0, 1, 2])
def test_recovers_after_n_failures(failures: int, fake_clock: FakeClock) -> None:
    policy = RetryPolicy(max_attempts=3, base_delay_seconds=1.0, max_delay_seconds=30.0)
    calls, fn = failing([server_error() for _ in range(failures)])
    result, attempts = policy.run(fn, clock=fake_clock)
    assert (result, attempts) == ("ok", failures + 1)
    assert calls == list(range(1, failures + 2))
    assert len(fake_clock.sleeps) == failures
    for n, slept in enumerate(fake_clock.sleeps, start=1):
        assert 0.75 * 2 ** (n - 1) < slept <= 2 ** (n - 1)


def test_exhaustion_reraises_the_last_error_with_attempts(fake_clock: FakeClock) -> None:
    policy = RetryPolicy(max_attempts=3, base_delay_seconds=1.0, max_delay_seconds=30.0)
    last = e.UpstreamRateLimitError("429 last", status_code=429, retry_after=2.0)
    calls, fn = failing([server_error(), server_error(retry_after=1.5), last])
    seen: list[tuple[str, int, float | None]] = []
    with pytest.raises(e.UpstreamRateLimitError) as caught:
        policy.run(fn, clock=fake_clock, on_error=lambda x, n, d: seen.append((str(x), n, d)))
    assert caught.value is last
    assert caught.value.attempts == 3
    assert calls == [1, 2, 3]
    assert fake_clock.sleeps[1] == 1.5
    assert [(s[0], s[1]) for s in seen] == [("503", 1), ("503", 2), ("429 last", 3)]
    assert seen[1][2] == 1.5 and seen[2][2] is None


@pytest.mark.parametrize(
    "error",
    [
        e.BadRequestError("400", status_code=400),
        e.AuthenticationError("401", status_code=401),
        e.InsufficientCreditsError("402", status_code=402),
        e.ModerationError("403", status_code=403),
        e.ModelNotFoundError("404", status_code=404),
    ],
)
def test_final_errors_are_never_retried(error: e.InferenceError, fake_clock: FakeClock) -> None:
    calls, fn = failing([error])
    with pytest.raises(type(error)) as caught:
        POLICY.run(fn, clock=fake_clock)
    assert calls == [1] and fake_clock.sleeps == []
    assert caught.value.attempts == 1


def test_retry_after_beyond_the_cap_stops_at_once(fake_clock: FakeClock) -> None:
    calls, fn = failing([e.UpstreamRateLimitError("429", status_code=429, retry_after=600.0)])
    with pytest.raises(e.UpstreamRateLimitError) as caught:
        POLICY.run(fn, clock=fake_clock)
    assert calls == [1] and fake_clock.sleeps == []
    assert caught.value.retry_after == 600.0


def test_other_exceptions_pass_straight_through(fake_clock: FakeClock) -> None:
    def fn(attempt: int) -> str:
        raise KeyError("a bug, not an upstream failure")

    with pytest.raises(KeyError):
        POLICY.run(fn, clock=fake_clock)
    assert fake_clock.sleeps == []


def test_each_retry_is_logged_at_warning(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="claude_headspace.inference.retry")
    _, fn = failing([server_error(retry_after=0.5), e.UpstreamTimeoutError("t")])
    POLICY.run(fn, clock=fake_clock, rng=NO_JITTER)
    records = [r for r in caplog.records if r.name == "claude_headspace.inference.retry"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.WARNING]
    first, second = (r.getMessage() for r in records)
    assert "attempt 1 of 5" in first and "status 503" in first and "0.50 s" in first
    assert "attempt 2 of 5" in second and "UpstreamTimeoutError" in second and "2.00 s" in second


@pytest.mark.parametrize(
    ("cls", "retryable"),
    [
        (e.UpstreamTimeoutError, True),
        (e.UpstreamConnectionError, True),
        (e.BadRequestError, False),
        (e.AuthenticationError, False),
        (e.InsufficientCreditsError, False),
        (e.ModerationError, False),
        (e.ModelNotFoundError, False),
        (e.RequestTimeoutError, True),
        (e.UpstreamRateLimitError, True),
        (e.UpstreamServerError, True),
        (e.ErrorInResponseError, True),
        (e.EmptyResponseError, True),
    ],
)
def test_which_errors_are_retryable(cls: type[e.UpstreamError], retryable: bool) -> None:
    assert cls("x").retryable is retryable
