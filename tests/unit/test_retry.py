"""RetryPolicy: the delay it chooses (a table, jitter bounds, Retry-After as read by the
client's one parser), and its loop, run against the real emulator through a real
OpenRouterClient with a FakeClock, so every wait is recorded and none is slept."""

from __future__ import annotations

import email.utils
import json
import logging
import random
from collections.abc import Callable
from typing import Any

import pytest
from tests.emulator_fixtures import ClientFactory

from headspace_inference.clock import FakeClock
from headspace_inference.inference import errors as e
from headspace_inference.inference.client import (
    MAX_RETRY_AFTER_SECONDS,
    OpenRouterClient,
    parse_retry_after,
)
from headspace_inference.inference.retry import JITTER, RetryPolicy
from headspace_inference.inference.types import Answer, GenerationParams
from headspace_inference.settings import RetrySettings
from headspace_inference.testing.emulator import EmulatorServer, Fault

MODEL = "anthropic/claude-haiku-4.5"
CHAT = "/api/v1/chat/completions"
RETRY_LOGGER = "headspace_inference.inference.retry"


class FixedRandom(random.Random):
    """A generator whose random() always returns ``value``: the ends of the jitter range."""

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


def _policy(**extra: Any) -> RetryPolicy:
    return RetryPolicy.from_settings(RetrySettings(**extra))


@pytest.fixture
def clock(fake_clock: FakeClock) -> FakeClock:
    return fake_clock


@pytest.fixture
def client(make_client: ClientFactory, clock: FakeClock) -> OpenRouterClient:
    return make_client(clock=clock)


def _call(client: OpenRouterClient) -> Callable[[int], Answer]:
    def call(_attempt: int) -> Answer:
        return client.complete(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], params=GenerationParams()
        )

    return call


# --------------------------------------------------------------------------- the delay table


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


# (base, max_delay, attempt) -> the step before jitter: min(max_delay, base * 2 ** (attempt-1)).
BACKOFF_TABLE = [
    (1.0, 30.0, 1, 1.0),
    (1.0, 30.0, 2, 2.0),
    (1.0, 30.0, 3, 4.0),
    (1.0, 30.0, 4, 8.0),
    (1.0, 30.0, 5, 16.0),
    (1.0, 30.0, 6, 30.0),  # 32 capped
    (1.0, 30.0, 10, 30.0),
    (1.0, 30.0, 1000, 30.0),  # no overflow for absurd attempt numbers
    (0.5, 30.0, 1, 0.5),
    (0.5, 30.0, 4, 4.0),
    (2.0, 5.0, 1, 2.0),
    (2.0, 5.0, 2, 4.0),
    (2.0, 5.0, 3, 5.0),  # 8 capped
    (0.0, 30.0, 3, 0.0),
]


@pytest.mark.parametrize(("base", "cap", "attempt", "step"), BACKOFF_TABLE)
@pytest.mark.parametrize("seed", [0, 1, 42, 2024])
def test_backoff_stays_within_jitter_bounds_and_the_cap(
    base: float, cap: float, attempt: int, step: float, seed: int
) -> None:
    policy = RetryPolicy(max_attempts=5, base_delay_seconds=base, max_delay_seconds=cap)

    delay = policy.backoff(attempt, random.Random(seed))

    assert step * (1 - JITTER) <= delay <= step
    assert delay <= cap
    # Exactly step * (1 - JITTER * u), u the seeded generator's first draw.
    assert delay == pytest.approx(step * (1 - JITTER * random.Random(seed).random()))


@pytest.mark.parametrize(("base", "cap", "attempt", "step"), BACKOFF_TABLE)
def test_backoff_at_the_ends_of_the_jitter_range(
    base: float, cap: float, attempt: int, step: float
) -> None:
    policy = RetryPolicy(max_attempts=5, base_delay_seconds=base, max_delay_seconds=cap)

    assert policy.backoff(attempt, FixedRandom(0.0)) == pytest.approx(step)
    assert policy.backoff(attempt, FixedRandom(0.999999)) == pytest.approx(
        step * (1 - JITTER), abs=1e-5
    )


def test_the_cap_bounds_the_delay_for_huge_attempt_numbers() -> None:
    policy = RetryPolicy(max_attempts=10_000, base_delay_seconds=1.0, max_delay_seconds=10.0)
    assert policy.delay_for(6, server_error(), rng=NO_JITTER) == 10.0
    assert policy.delay_for(5_000, server_error(), rng=NO_JITTER) == 10.0


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 6])
def test_jitter_really_varies_the_delay_within_its_bounds(attempt: int) -> None:
    policy = RetryPolicy(max_attempts=99, base_delay_seconds=0.5, max_delay_seconds=8.0)
    step = min(8.0, 0.5 * 2 ** (attempt - 1))
    rng = random.Random(attempt)
    delays = [policy.backoff(attempt, rng) for _ in range(2000)]
    assert all(step * (1 - JITTER) < d <= step for d in delays)
    # the draws spread over most of the range, and hardly repeat
    assert max(delays) - min(delays) > 0.8 * JITTER * step
    assert len({round(d, 9) for d in delays[:50]}) > 40


def test_backoff_is_reproducible_from_a_seed() -> None:
    policy = RetryPolicy()
    first = [policy.backoff(a, random.Random(7)) for a in range(1, 6)]
    second = [policy.backoff(a, random.Random(7)) for a in range(1, 6)]
    assert first == second


def test_from_settings_copies_every_number() -> None:
    settings = RetrySettings(max_attempts=4, base_delay_seconds=0.5, max_delay_seconds=7.0)
    assert RetryPolicy.from_settings(settings) == RetryPolicy(4, 0.5, 7.0)


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
        (e.InvalidResponseError, True),
        (e.RateLimitedError, True),
        (e.CancelledCallError, True),
        (e.QueueFullError, True),
        (e.ShuttingDownError, False),
    ],
)
def test_which_errors_are_retryable(cls: type[e.InferenceError], retryable: bool) -> None:
    assert cls("x").retryable is retryable


# --------------------------------------------------------------------------- Retry-After, read once

NOW = 1_700_000_000.0


def _date(offset: float) -> str:
    return email.utils.formatdate(NOW + offset, usegmt=True)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": " 2.5 "}, 2.5),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "9", "retry-after-ms": "250"}, 0.25),  # ms wins, as the SDKs read it
        ({"retry-after": "9", "retry-after-ms": "soon"}, 9.0),  # an unreadable ms is passed over
        ({"retry-after": _date(30)}, 30.0),  # an HTTP date, measured from now
        ({"retry-after": _date(-60)}, 0.0),  # already past
        ({"retry-after": _date(30), "retry-after-ms": "500"}, 0.5),
        ({"retry-after": "9" * 400}, MAX_RETRY_AFTER_SECONDS),  # capped at a day
        ({"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"}, MAX_RETRY_AFTER_SECONDS),
        ({}, None),
        ({"retry-after": ""}, None),
        *[
            ({"retry-after": bad}, None)
            for bad in ("inf", "Infinity", "1e999", "nan", "-5", "1e3", "soon", "3 s", "0x10")
        ],
        ({"retry-after-ms": "-5"}, None),
    ],
)
def test_the_one_retry_after_parser(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers, NOW) == pytest.approx(expected)


# --------------------------------------------------------------------------- run(): request counts


@pytest.mark.parametrize("failures", [1, 2, 4])
@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=500),
        Fault(status=502),
        Fault(status=503),
        Fault(status=408),
        Fault(status=429),
        Fault(status=429, retry_after=1),
        Fault(error_in_200=True),
        Fault(no_choices=True),
        Fault(drop=True),
    ],
    ids=["500", "502", "503", "408", "429", "429-1s", "error-in-200", "no-choices", "drop"],
)
def test_recovers_after_n_failures_with_exactly_n_plus_one_requests(
    emulator: EmulatorServer,
    client: OpenRouterClient,
    clock: FakeClock,
    fault: Fault,
    failures: int,
) -> None:
    emulator.script([fault] * failures)
    policy = RetryPolicy(max_attempts=failures + 1, base_delay_seconds=1.0, max_delay_seconds=30.0)

    completion, attempts = policy.run(_call(client), clock=clock, rng=random.Random(5))

    assert completion.finish_reason == "stop"
    assert attempts == failures + 1
    assert emulator.request_count(CHAT) == failures + 1
    assert len(clock.sleeps) == failures


@pytest.mark.parametrize("max_attempts", [1, 2, 3, 5])
def test_exhaustion_makes_max_attempts_requests_then_raises(
    emulator: EmulatorServer, client: OpenRouterClient, clock: FakeClock, max_attempts: int
) -> None:
    emulator.script([Fault(status=503)] * (max_attempts + 3))
    policy = _policy(max_attempts=max_attempts)

    with pytest.raises(e.UpstreamServerError) as caught:
        policy.run(_call(client), clock=clock, rng=random.Random(1))

    assert caught.value.attempts == max_attempts
    assert caught.value.status_code == 503
    assert emulator.request_count(CHAT) == max_attempts
    assert len(clock.sleeps) == max_attempts - 1
    for n, slept in enumerate(clock.sleeps, start=1):
        assert 0.75 * 2 ** (n - 1) <= slept <= 2 ** (n - 1)


def test_exhaustion_reraises_the_last_error_itself(fake_clock: FakeClock) -> None:
    last = e.UpstreamRateLimitError("429 last", status_code=429, retry_after=2.0)
    errors: list[e.InferenceError] = [server_error(), server_error(retry_after=1.5), last]
    calls: list[int] = []

    def fn(attempt: int) -> str:
        calls.append(attempt)
        raise errors.pop(0)

    with pytest.raises(e.UpstreamRateLimitError) as caught:
        RetryPolicy(3, 1.0, 30.0).run(fn, clock=fake_clock)
    assert caught.value is last
    assert caught.value.attempts == 3
    assert calls == [1, 2, 3]
    assert fake_clock.sleeps[1] == 1.5


@pytest.mark.parametrize(
    ("fault", "cls"),
    [
        (Fault(status=400), e.BadRequestError),
        (Fault(status=401), e.AuthenticationError),
        (Fault(status=402), e.InsufficientCreditsError),
        (Fault(status=403, metadata={"reasons": ["hate"]}), e.ModerationError),
        (Fault(status=404), e.ModelNotFoundError),
        (Fault(status=418), e.BadRequestError),
    ],
    ids=["400", "401", "402", "403", "404", "418"],
)
def test_final_errors_make_exactly_one_request(
    emulator: EmulatorServer,
    client: OpenRouterClient,
    clock: FakeClock,
    fault: Fault,
    cls: type[e.UpstreamError],
) -> None:
    emulator.script([fault, Fault(status=500), Fault(status=500)])

    with pytest.raises(cls) as caught:
        _policy(max_attempts=5).run(_call(client), clock=clock)

    assert caught.value.retryable is False
    assert caught.value.status_code == fault.status
    assert caught.value.attempts == 1
    assert emulator.request_count(CHAT) == 1
    assert clock.sleeps == []


def test_a_read_timeout_is_retried(emulator: EmulatorServer, make_client: ClientFactory) -> None:
    clock = FakeClock()
    emulator.script([Fault(delay_ms=1000)])
    quick = make_client(timeout_seconds=0.2)
    errors: list[e.InferenceError] = []

    completion, attempts = _policy(max_attempts=2).run(
        _call(quick), clock=clock, on_error=lambda error, _a, _d: errors.append(error)
    )

    assert completion.finish_reason == "stop"
    assert attempts == 2
    assert [type(error) for error in errors] == [e.UpstreamTimeoutError]
    assert emulator.request_count(CHAT) == 2


def test_a_refused_connection_is_retried_until_exhausted(
    closed_port: int, make_client: ClientFactory, clock: FakeClock
) -> None:
    refused = make_client(base_url=f"http://127.0.0.1:{closed_port}/api/v1")

    with pytest.raises(e.UpstreamConnectionError) as caught:
        _policy(max_attempts=3).run(_call(refused), clock=clock, rng=random.Random(2))

    assert caught.value.attempts == 3
    assert len(clock.sleeps) == 2


def test_errors_other_than_inference_errors_are_not_retried(clock: FakeClock) -> None:
    calls: list[int] = []

    def broken(attempt: int) -> None:
        calls.append(attempt)
        raise KeyError("a bug, not an upstream failure")

    with pytest.raises(KeyError):
        _policy(max_attempts=5).run(broken, clock=clock)

    assert calls == [1]
    assert clock.sleeps == []


def test_run_passes_the_attempt_number_to_the_function(
    emulator: EmulatorServer, client: OpenRouterClient, clock: FakeClock
) -> None:
    emulator.script([Fault(status=500), Fault(status=500)])
    seen: list[int] = []

    def call(attempt: int) -> Answer:
        seen.append(attempt)
        return _call(client)(attempt)

    _policy(max_attempts=3).run(call, clock=clock)

    assert seen == [1, 2, 3]


# --------------------------------------------------------------------------- run(): the delays


def test_sleeps_follow_the_backoff_table_exactly(
    emulator: EmulatorServer, client: OpenRouterClient, clock: FakeClock
) -> None:
    emulator.script([Fault(status=500)] * 5)
    policy = RetryPolicy(max_attempts=6, base_delay_seconds=1.0, max_delay_seconds=10.0)

    policy.run(_call(client), clock=clock, rng=random.Random(99))

    mirror = random.Random(99)
    steps = [1.0, 2.0, 4.0, 8.0, 10.0]
    assert clock.sleeps == pytest.approx([s * (1 - JITTER * mirror.random()) for s in steps])
    for delay, step in zip(clock.sleeps, steps, strict=True):
        assert step * (1 - JITTER) <= delay <= step


def test_a_408_is_retried_with_backoff(
    emulator: EmulatorServer, client: OpenRouterClient, clock: FakeClock
) -> None:
    emulator.script([Fault(status=408)])
    errors: list[e.InferenceError] = []

    _policy(max_attempts=2).run(
        _call(client),
        clock=clock,
        on_error=lambda error, _a, _d: errors.append(error),
        rng=random.Random(0),
    )

    assert [type(error) for error in errors] == [e.RequestTimeoutError]
    assert 0.75 <= clock.sleeps[0] <= 1.0


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (Fault(status=429, retry_after=7), 7.0),
        (Fault(status=503, retry_after=12), 12.0),
        (Fault(status=429, retry_after=0.25), 0.25),
        (Fault(status=429, retry_after=0), 0.0),
        (Fault(status=429, retry_after_ms=1500), 1.5),
        (Fault(status=503, retry_after_ms=20), 0.02),
        (Fault(status=429, retry_after=9, retry_after_ms=2500), 2.5),
    ],
    ids=["429-7s", "503-12s", "429-0.25s", "429-0s", "429-1500ms", "503-20ms", "ms-wins"],
)
def test_retry_after_is_what_the_policy_sleeps(
    emulator: EmulatorServer,
    client: OpenRouterClient,
    clock: FakeClock,
    fault: Fault,
    expected: float,
) -> None:
    emulator.script([fault])

    _, attempts = _policy(max_attempts=3, base_delay_seconds=1.0).run(
        _call(client), clock=clock, rng=random.Random(0)
    )

    assert attempts == 2
    assert clock.sleeps == pytest.approx([expected])
    assert emulator.request_count(CHAT) == 2


@pytest.mark.parametrize(
    "header", ["inf", "Infinity", "1e999", "nan", "-5", "1e3", "soon", "3 s", "0x10"]
)
def test_an_unreadable_retry_after_is_ignored_for_the_backoff(
    emulator: EmulatorServer, client: OpenRouterClient, clock: FakeClock, header: str
) -> None:
    # Not delta-seconds and not an HTTP date: the computed backoff applies, and nothing
    # infinite or negative reaches the error (it is shown as JSON by the API and the CLI).
    emulator.script([Fault(status=429, retry_after=header)])
    errors: list[e.InferenceError] = []
    _, attempts = _policy(max_attempts=3, base_delay_seconds=1.0).run(
        _call(client),
        clock=clock,
        rng=random.Random(0),
        on_error=lambda error, _attempt, _delay: errors.append(error),
    )
    assert attempts == 2
    assert errors[0].retry_after is None
    assert clock.sleeps == pytest.approx([1.0 * (1 - JITTER * random.Random(0).random())])


@pytest.mark.parametrize("header", ["9" * 400, "Fri, 31 Dec 9999 23:59:59 GMT"])
def test_an_absurd_retry_after_is_capped_at_a_day(
    emulator: EmulatorServer, client: OpenRouterClient, clock: FakeClock, header: str
) -> None:
    emulator.script([Fault(status=429, retry_after=header)])
    with pytest.raises(e.UpstreamRateLimitError) as caught:
        _policy(max_attempts=3).run(_call(client), clock=clock, rng=random.Random(0))
    assert caught.value.retry_after == MAX_RETRY_AFTER_SECONDS == 86_400
    json.dumps(caught.value.to_dict(), allow_nan=False)  # valid JSON for the API and CLI
    assert clock.sleeps == []


@pytest.mark.parametrize("seconds_ahead", [0, 3, 12, 30])
def test_retry_after_http_date_measured_on_the_fake_clock(
    emulator: EmulatorServer, client: OpenRouterClient, clock: FakeClock, seconds_ahead: int
) -> None:
    when = email.utils.formatdate(clock.time() + seconds_ahead, usegmt=True)
    emulator.script([Fault(status=429, retry_after=when)])

    _, attempts = _policy(max_attempts=3).run(_call(client), clock=clock)

    assert attempts == 2
    assert clock.sleeps == pytest.approx([float(seconds_ahead)])


def test_retry_after_http_date_in_the_past_retries_at_once(
    emulator: EmulatorServer, client: OpenRouterClient, clock: FakeClock
) -> None:
    when = email.utils.formatdate(clock.time() - 60, usegmt=True)
    emulator.script([Fault(status=503, retry_after=when)])

    _policy(max_attempts=2).run(_call(client), clock=clock)

    assert clock.sleeps == [0.0]


@pytest.mark.parametrize(
    "fault",
    [Fault(status=429, retry_after=120), Fault(status=503, retry_after_ms=45_000)],
    ids=["seconds", "ms"],
)
def test_retry_after_beyond_the_cap_stops_at_once(
    emulator: EmulatorServer, client: OpenRouterClient, clock: FakeClock, fault: Fault
) -> None:
    emulator.script([fault] * 3)
    delays: list[float | None] = []

    with pytest.raises(e.UpstreamError) as caught:
        _policy(max_attempts=5, max_delay_seconds=30.0).run(
            _call(client), clock=clock, on_error=lambda _e, _a, d: delays.append(d)
        )

    assert caught.value.retry_after == pytest.approx(120 if fault.retry_after else 45.0)
    assert caught.value.retryable is True  # retryable, just not by us, now
    assert caught.value.attempts == 1
    assert emulator.request_count(CHAT) == 1
    assert clock.sleeps == []
    assert delays == [None]


def test_retry_after_http_date_beyond_the_cap_stops_at_once(
    emulator: EmulatorServer, client: OpenRouterClient, clock: FakeClock
) -> None:
    when = email.utils.formatdate(clock.time() + 300, usegmt=True)
    emulator.script([Fault(status=429, retry_after=when)])

    with pytest.raises(e.UpstreamRateLimitError) as caught:
        _policy(max_attempts=5, max_delay_seconds=30.0).run(_call(client), clock=clock)

    assert caught.value.retry_after == pytest.approx(300.0)
    assert emulator.request_count(CHAT) == 1
    assert clock.sleeps == []


def test_mixed_faults_use_retry_after_where_given_and_backoff_elsewhere(
    emulator: EmulatorServer, client: OpenRouterClient, clock: FakeClock
) -> None:
    emulator.script([Fault(status=502), Fault(status=429, retry_after=5), Fault(status=500)])
    policy = RetryPolicy(max_attempts=4, base_delay_seconds=1.0, max_delay_seconds=30.0)

    _, attempts = policy.run(_call(client), clock=clock, rng=random.Random(8))

    assert attempts == 4
    first, second, third = clock.sleeps
    assert 1.0 * (1 - JITTER) <= first <= 1.0
    assert second == 5.0
    assert 4.0 * (1 - JITTER) <= third <= 4.0


# --------------------------------------------------------------------------- run(): reporting


def test_on_error_sees_every_failure_with_the_chosen_delay(
    emulator: EmulatorServer, client: OpenRouterClient, clock: FakeClock
) -> None:
    emulator.script([Fault(status=500), Fault(status=429, retry_after=3), Fault(no_choices=True)])
    seen: list[tuple[type[e.InferenceError], int | None, int, float | None]] = []

    _, attempts = _policy(max_attempts=4).run(
        _call(client),
        clock=clock,
        on_error=lambda error, a, d: seen.append((type(error), error.status_code, a, d)),
        rng=random.Random(4),
    )

    assert attempts == 4
    assert [(cls, status, attempt) for cls, status, attempt, _ in seen] == [
        (e.UpstreamServerError, 500, 1),
        (e.UpstreamRateLimitError, 429, 2),
        (e.EmptyResponseError, 200, 3),
    ]
    assert [delay for *_, delay in seen] == clock.sleeps
    assert seen[1][3] == 3.0


def test_on_error_gets_none_for_the_last_failure(
    emulator: EmulatorServer, client: OpenRouterClient, clock: FakeClock
) -> None:
    emulator.script([Fault(error_in_200=True)] * 3)
    seen: list[tuple[int, float | None]] = []

    with pytest.raises(e.ErrorInResponseError):
        _policy(max_attempts=3).run(
            _call(client), clock=clock, on_error=lambda _e, a, d: seen.append((a, d))
        )

    assert [a for a, _ in seen] == [1, 2, 3]
    assert [d for _, d in seen][:2] == clock.sleeps
    assert seen[-1][1] is None


def test_on_error_called_once_for_a_final_error(
    emulator: EmulatorServer, client: OpenRouterClient, clock: FakeClock
) -> None:
    emulator.script([Fault(status=402)])
    seen: list[tuple[type[e.InferenceError], int, float | None]] = []

    with pytest.raises(e.InsufficientCreditsError):
        _policy().run(
            _call(client),
            clock=clock,
            on_error=lambda error, a, d: seen.append((type(error), a, d)),
        )

    assert seen == [(e.InsufficientCreditsError, 1, None)]


def test_a_warning_is_logged_for_each_retry(
    emulator: EmulatorServer,
    client: OpenRouterClient,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=RETRY_LOGGER)
    emulator.script([Fault(status=503), Fault(status=429, retry_after=2), Fault(drop=True)])

    _policy(max_attempts=4).run(_call(client), clock=clock, rng=random.Random(6))

    records = [r for r in caplog.records if r.name == RETRY_LOGGER]
    assert [r.levelno for r in records] == [logging.WARNING] * 3
    expected = [
        (1, "UpstreamServerError", "status 503"),
        (2, "UpstreamRateLimitError", "status 429"),
        (3, "UpstreamConnectionError", "status None"),
    ]
    for record, (attempt, name, status), delay in zip(records, expected, clock.sleeps, strict=True):
        message = record.getMessage()
        assert f"attempt {attempt} of 4" in message
        assert name in message and status in message
        assert f"{delay:.2f} s" in message


def test_no_warning_when_nothing_is_retried(
    emulator: EmulatorServer,
    client: OpenRouterClient,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=RETRY_LOGGER)
    emulator.script([Fault(status=400)])

    with pytest.raises(e.BadRequestError):
        _policy().run(_call(client), clock=clock)
    _policy().run(_call(client), clock=clock)

    assert [r for r in caplog.records if r.name == RETRY_LOGGER] == []
