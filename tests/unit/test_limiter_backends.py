"""The rate limiter contract, run unchanged over the memory and the Redis implementation.

Both take the injected FakeClock: the memory limiter reads ``clock.monotonic()``, the Redis
one ``clock.time()``, and FakeClock moves both together, so every wait below is exact and
takes no real time. Only the many-threads test uses the real clock (and a short window).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import redis

from headspace_inference.clock import SYSTEM_CLOCK, Clock, FakeClock
from headspace_inference.inference.errors import RateLimitedError
from headspace_inference.inference.ratelimit import (
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    Reservation,
)
from headspace_inference.settings import RateLimitSettings

# Redis hands admitted_at back through Lua's tostring (14 significant digits), so wall-clock
# times of ~1.7e9 s come back rounded to 0.1 ms. This is a precision margin, not a timing one.
EPS = 1e-3

STAT_FIELDS = {
    "backend",
    "calls_in_window",
    "tokens_in_window",
    "scheduled",
    "waiting",
    "paused_for",
    "admitted",
    "rejected",
}


@dataclass
class Backend:
    """Builds limiters of one kind; ``now`` reads the clock that kind schedules on."""

    name: str
    make: Callable[..., RateLimiter]
    clock: FakeClock

    def now(self) -> float:
        return self.clock.monotonic() if self.name == "memory" else self.clock.time()


def settings(
    calls: int = 1000, tokens: int = 1_000_000, window: float = 60.0, max_wait: float = 1000.0
) -> RateLimitSettings:
    return RateLimitSettings(
        calls_per_minute=calls,
        tokens_per_minute=tokens,
        window_seconds=window,
        max_wait_seconds=max_wait,
    )


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest, fake_clock: FakeClock) -> Iterator[Backend]:
    """A factory of limiters on the fake clock; for Redis, all share this test's prefix."""
    if request.param == "memory":

        def make_memory(s: RateLimitSettings, clock: Clock = fake_clock) -> RateLimiter:
            return MemoryRateLimiter(s, clock=clock)

        yield Backend("memory", make_memory, fake_clock)
        return

    url: str = request.getfixturevalue("redis_server_url")
    prefix: str = request.getfixturevalue("redis_prefix")
    clients: list[redis.Redis] = []

    def make_redis(s: RateLimitSettings, clock: Clock = fake_clock) -> RateLimiter:
        client = redis.Redis.from_url(url)
        clients.append(client)
        return RedisRateLimiter(client, s, prefix=prefix, clock=clock)

    yield Backend("redis", make_redis, fake_clock)
    for client in clients:
        client.close()


def frozen_sleeps(clock: FakeClock) -> list[float]:
    """Make ``clock.sleep`` record without moving time, as if every sleeper were still
    waiting: admissions then pile up in the schedule the way concurrent callers' do."""
    recorded: list[float] = []
    clock.sleep = recorded.append  # type: ignore[method-assign]
    return recorded


def rejected(limiter: RateLimiter, tokens: int = 1) -> RateLimitedError:
    with pytest.raises(RateLimitedError) as info:
        limiter.acquire(tokens, max_wait=0)
    return info.value


# --------------------------------------------------------------------------- admission counts


def test_calls_per_window_are_counted_and_retry_after_is_when_the_oldest_leaves(
    backend: Backend,
) -> None:
    limiter = backend.make(settings(calls=3))
    first = backend.now()
    for _ in range(3):
        r = limiter.acquire(1, max_wait=0)
        assert r.waited == 0
        backend.clock.advance(5)

    error = rejected(limiter)
    assert error.retryable is True
    # now = first + 15; the oldest admission (at `first`) leaves the window at first + 60.
    assert error.retry_after == pytest.approx(first + 60 - backend.now(), abs=EPS)
    assert error.retry_after == pytest.approx(45, abs=EPS)

    backend.clock.advance(44.5)
    assert rejected(limiter).retry_after == pytest.approx(0.5, abs=EPS)
    backend.clock.advance(0.5)  # exactly one window after the first admission
    assert limiter.acquire(1, max_wait=0).admitted_at == pytest.approx(backend.now(), abs=EPS)
    # The window holds three again: the next frees when the second admission leaves.
    assert rejected(limiter).retry_after == pytest.approx(5, abs=EPS)
    assert backend.clock.sleeps == []


def test_tokens_per_window_are_counted_and_retry_after_is_when_enough_leave(
    backend: Backend,
) -> None:
    limiter = backend.make(settings(tokens=100))
    limiter.acquire(40, max_wait=0)
    backend.clock.advance(5)
    limiter.acquire(40, max_wait=0)
    backend.clock.advance(5)

    # 80 of 100 used: 30 more does not fit until the first 40 leave (50 s from now) ...
    assert rejected(limiter, 30).retry_after == pytest.approx(50, abs=EPS)
    # ... but 20 does, exactly filling the budget.
    limiter.acquire(20, max_wait=0)
    assert rejected(limiter, 1).retry_after == pytest.approx(50, abs=EPS)
    # 61 needs both 40s gone: the second leaves 60 s after it was admitted, 55 s from now.
    assert rejected(limiter, 61).retry_after == pytest.approx(55, abs=EPS)

    backend.clock.advance(50)
    limiter.acquire(40, max_wait=0)
    stats = limiter.stats()
    assert stats["calls_in_window"] == 3
    assert stats["tokens_in_window"] == 100


def test_a_request_over_the_whole_budget_fails_at_once_and_is_not_retryable(
    backend: Backend,
) -> None:
    limiter = backend.make(settings(tokens=100))
    with pytest.raises(RateLimitedError) as info:
        limiter.acquire(101)
    assert info.value.retryable is False
    assert info.value.retry_after is None
    assert "101" in str(info.value)
    assert backend.clock.sleeps == []
    stats = limiter.stats()
    assert stats["admitted"] == 0
    assert stats["calls_in_window"] == 0
    # The whole budget in one call is allowed.
    assert limiter.acquire(100, max_wait=0).tokens == 100


# --------------------------------------------------------------------------- waiting, FIFO


def test_waiting_callers_are_admitted_in_arrival_order_at_their_slots(backend: Backend) -> None:
    limiter = backend.make(settings(calls=2))
    t0 = backend.now()
    limiter.acquire(1)
    backend.clock.advance(10)
    limiter.acquire(1)

    reservations: list[Reservation] = []
    called_at: list[float] = []
    for _ in range(5):
        called_at.append(backend.now())
        reservations.append(limiter.acquire(1))

    admitted = [r.admitted_at for r in reservations]
    assert admitted == sorted(admitted)
    # Two per 60 s window: the slots are t0 + 60, 70, 120, 130, 180.
    expected = [t0 + 60, t0 + 70, t0 + 120, t0 + 130, t0 + 180]
    assert admitted == pytest.approx(expected, abs=EPS)
    for r, now in zip(reservations, called_at, strict=True):
        assert r.waited == pytest.approx(r.admitted_at - now, abs=EPS)
    # Each caller slept exactly until its slot (the fake clock's sleep moves time).
    assert backend.clock.sleeps == pytest.approx([50, 10, 50, 10, 50], abs=EPS)


def test_scheduled_admissions_queue_first_come_first_served(backend: Backend) -> None:
    """With every sleeper still waiting, later callers are scheduled behind earlier ones."""
    sleeps = frozen_sleeps(backend.clock)
    limiter = backend.make(settings(calls=2, tokens=100, max_wait=150))
    now = backend.now()
    reservations = [limiter.acquire(10) for _ in range(6)]
    admitted = [r.admitted_at for r in reservations]
    assert admitted == pytest.approx([now, now, now + 60, now + 60, now + 120, now + 120], abs=EPS)
    assert [r.waited for r in reservations] == pytest.approx([a - now for a in admitted], abs=EPS)
    assert sleeps == pytest.approx([60, 60, 120, 120], abs=EPS)

    # The seventh slot (now + 180) is beyond max_wait: rejected at once, told when.
    with pytest.raises(RateLimitedError) as info:
        limiter.acquire(1)
    assert info.value.retry_after == pytest.approx(180, abs=EPS)
    assert len(sleeps) == 4
    stats = limiter.stats()
    assert stats["calls_in_window"] == 2
    assert stats["scheduled"] == 4


def test_a_small_request_never_overtakes_a_waiting_large_one(backend: Backend) -> None:
    sleeps = frozen_sleeps(backend.clock)
    limiter = backend.make(settings(tokens=100))
    now = backend.now()
    limiter.acquire(70)
    backend.clock.advance(1)
    large = limiter.acquire(60)  # must wait for the 70 to leave: now + 60
    small = limiter.acquire(1)  # tokens alone would not delay it, arrival order does
    assert large.admitted_at == pytest.approx(now + 60, abs=EPS)
    assert small.admitted_at >= large.admitted_at - EPS
    assert sleeps == pytest.approx([59, small.admitted_at - backend.now()], abs=EPS)


# --------------------------------------------------------------------------- reconcile, pause


def test_reconcile_lowers_token_use(backend: Backend) -> None:
    limiter = backend.make(settings(tokens=100))
    estimate = limiter.acquire(90, max_wait=0)
    rejected(limiter, 20)
    limiter.reconcile(estimate, 30)
    assert limiter.stats()["tokens_in_window"] == 30
    limiter.acquire(20, max_wait=0)
    assert limiter.stats()["tokens_in_window"] == 50


def test_reconcile_raises_token_use(backend: Backend) -> None:
    limiter = backend.make(settings(tokens=100))
    estimate = limiter.acquire(10, max_wait=0)
    backend.clock.advance(2)
    limiter.acquire(5, max_wait=0)
    limiter.reconcile(estimate, 95)
    assert limiter.stats()["tokens_in_window"] == 100
    # Full: the next token frees when the reconciled call leaves, 58 s from now.
    assert rejected(limiter, 1).retry_after == pytest.approx(58, abs=EPS)


def test_reconcile_of_a_reservation_that_left_the_window_is_ignored(backend: Backend) -> None:
    limiter = backend.make(settings(tokens=100))
    old = limiter.acquire(50, max_wait=0)
    backend.clock.advance(61)
    limiter.acquire(1, max_wait=0)  # prunes the old admission
    limiter.reconcile(old, 99)
    assert limiter.stats()["tokens_in_window"] == 1
    limiter.acquire(99, max_wait=0)


def test_pause_blocks_everyone_until_its_end(backend: Backend) -> None:
    limiter = backend.make(settings())
    start = backend.now()
    limiter.pause(30)
    assert limiter.stats()["paused_for"] == pytest.approx(30, abs=EPS)
    for _ in range(3):
        assert rejected(limiter).retry_after == pytest.approx(30, abs=EPS)
    # A shorter pause never shortens a longer one.
    limiter.pause(10)
    assert rejected(limiter).retry_after == pytest.approx(30, abs=EPS)

    backend.clock.advance(10)
    first = limiter.acquire(1)  # waits the 20 s left
    second = limiter.acquire(1)  # the pause is over: no wait
    assert first.admitted_at == pytest.approx(start + 30, abs=EPS)
    assert first.waited == pytest.approx(20, abs=EPS)
    assert second.waited == 0
    assert backend.clock.sleeps == pytest.approx([20], abs=EPS)
    assert limiter.stats()["paused_for"] is None


# --------------------------------------------------------------------------- stats


def test_stats_fields(backend: Backend) -> None:
    limiter = backend.make(settings(calls=2, max_wait=100))
    fresh = limiter.stats()
    assert set(fresh) == STAT_FIELDS
    assert fresh == {
        "backend": backend.name,
        "calls_in_window": 0,
        "tokens_in_window": 0,
        "scheduled": 0,
        "waiting": 0,
        "paused_for": None,
        "admitted": 0,
        "rejected": 0,
    }

    seen_while_waiting: list[int] = []
    clock = backend.clock

    def sleep(seconds: float) -> None:
        seen_while_waiting.append(limiter.stats()["waiting"])
        clock.sleeps.append(seconds)  # record, but leave time where it is

    clock.sleep = sleep  # type: ignore[method-assign]
    limiter.acquire(7)
    limiter.acquire(5)
    limiter.acquire(3)  # scheduled one window ahead
    rejected(limiter)
    limiter.pause(12)
    assert seen_while_waiting == [1]
    assert limiter.stats() == {
        "backend": backend.name,
        "calls_in_window": 2,
        "tokens_in_window": 12,
        "scheduled": 1,
        "waiting": 0,
        "paused_for": pytest.approx(12, abs=EPS),
        "admitted": 3,
        "rejected": 1,
    }


def test_stats_agree_with_admission_at_the_window_boundary(backend: Backend) -> None:
    """An admission exactly one window old no longer counts for acquire(); stats must say
    the same (both implementations prune ``time <= now - window``)."""
    limiter = backend.make(settings(calls=1))
    limiter.acquire(4, max_wait=0)
    backend.clock.advance(60)
    stats = limiter.stats()
    assert stats["calls_in_window"] == 0
    assert stats["tokens_in_window"] == 0
    limiter.acquire(1, max_wait=0)  # the window is indeed free


# --------------------------------------------------------------------------- real threads


def test_many_threads_on_the_real_clock_never_exceed_the_window(backend: Backend) -> None:
    """50 threads, 5 calls per 0.25 s: sorted admission times, read on the limiter's own
    clock, hold at most 5 in any window. Nothing here depends on how fast threads run."""
    window, calls, threads_n = 0.25, 5, 50
    limiter = backend.make(
        RateLimitSettings(calls_per_minute=calls, window_seconds=window, max_wait_seconds=10),
        clock=SYSTEM_CLOCK,
    )
    read_clock = SYSTEM_CLOCK.monotonic if backend.name == "memory" else SYSTEM_CLOCK.time
    start = threading.Barrier(threads_n)
    reservations: list[Reservation] = []
    late: list[tuple[float, float]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        start.wait()
        try:
            r = limiter.acquire(1)
        except BaseException as exc:
            with lock:
                errors.append(exc)
            return
        returned_at = read_clock()
        with lock:
            reservations.append(r)
            late.append((returned_at, r.admitted_at))

    threads = [threading.Thread(target=worker) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(reservations) == threads_n
    assert len({r.id for r in reservations}) == threads_n

    admitted = sorted(r.admitted_at for r in reservations)
    for i in range(len(admitted) - calls):
        # The (i + calls)-th admission comes no sooner than one window after the i-th.
        assert admitted[i + calls] - admitted[i] >= window - EPS, (i, admitted)
    # Nobody went ahead before its slot.
    assert all(returned >= at - EPS for returned, at in late)
    stats = limiter.stats()
    assert stats["admitted"] == threads_n
    assert stats["waiting"] == 0


# --------------------------------------------------------------------------- Redis only


def test_redis_limiters_with_one_prefix_share_one_budget_and_one_pause(
    redis_server_url: str, redis_prefix: str, fake_clock: FakeClock
) -> None:
    """Two limiters on separate connections (two processes, as far as Redis can tell)."""
    clients = [redis.Redis.from_url(redis_server_url) for _ in range(2)]
    try:
        a, b = (
            RedisRateLimiter(c, settings(calls=3), prefix=redis_prefix, clock=fake_clock)
            for c in clients
        )
        a.acquire(1, max_wait=0)
        b.acquire(1, max_wait=0)
        a.acquire(1, max_wait=0)
        assert rejected(b).retry_after == pytest.approx(60, abs=EPS)
        assert a.stats()["calls_in_window"] == b.stats()["calls_in_window"] == 3

        fake_clock.advance(60)
        a.pause(20)
        assert rejected(b).retry_after == pytest.approx(20, abs=EPS)
    finally:
        for c in clients:
            c.close()


class _SleeperClock(FakeClock):
    """A FakeClock whose sleep blocks until the test opens the gate, then wakes at the time
    it was meant to (start + seconds), so a test can move time on while a caller sleeps."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.gate = threading.Event()

    def sleep(self, seconds: float) -> None:
        start = self.monotonic()
        self.entered.set()
        assert self.gate.wait(30)
        with self._lock:
            self.sleeps.append(seconds)
            self._now = max(self._now, start + seconds)


def _waiter(limiter: RateLimiter) -> tuple[threading.Thread, list[Reservation | Exception]]:
    got: list[Reservation | Exception] = []

    def run() -> None:
        try:
            got.append(limiter.acquire(1))
        except Exception as exc:
            got.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, got


def test_a_pause_also_holds_a_caller_already_waiting_for_its_slot(backend: Backend) -> None:
    # Found in review: a caller asleep until its booked slot used to go at that slot even
    # when a 429 paused everyone meanwhile.
    clock = _SleeperClock()
    settings = RateLimitSettings(
        calls_per_minute=1, tokens_per_minute=1000, window_seconds=10, max_wait_seconds=100
    )
    limiter = backend.make(settings, clock=clock)
    start = clock.monotonic()
    limiter.acquire(1)  # fills the window: the next call's slot is start + 10
    waiter, got = _waiter(limiter)
    assert clock.entered.wait(30)
    clock.advance(5)
    limiter.pause(10)  # OpenRouter said 429, Retry-After 10: nobody until start + 15
    clock.gate.set()
    waiter.join(30)
    [reservation] = got
    assert isinstance(reservation, Reservation)
    assert clock.monotonic() == pytest.approx(start + 15, abs=EPS)
    assert reservation.waited == pytest.approx(15, abs=EPS)  # within max_wait: sat out
    assert clock.sleeps == pytest.approx([10, 5], abs=EPS)


def test_a_pause_beyond_max_wait_fails_a_waiting_caller_at_once_and_gives_back_its_slot(
    backend: Backend,
) -> None:
    """Defect: with max_wait_seconds 5, a 429 with Retry-After 20 held a caller admitted
    earlier (asleep towards its booked slot) for 23.9 s. No caller may wait longer than
    max_wait; this one is told when to come back as soon as it wakes, and the admission it
    had booked is given back."""
    clock = _SleeperClock()
    settings = RateLimitSettings(
        calls_per_minute=1, tokens_per_minute=1000, window_seconds=60, max_wait_seconds=5
    )
    limiter = backend.make(settings, clock=clock)
    start = clock.monotonic()
    limiter.acquire(1)
    clock.advance(56)
    arrived = clock.monotonic()
    waiter, got = _waiter(limiter)  # booked at start + 60: 4 s to wait, within max_wait
    assert clock.entered.wait(30)
    clock.advance(3.9)
    limiter.pause(20)  # until start + 79.9
    clock.gate.set()
    waiter.join(30)

    [error] = got
    assert isinstance(error, RateLimitedError)
    assert error.retryable is True
    # When the pause ends (rounded up to the millisecond, so a float's last bit can add one).
    assert error.retry_after == pytest.approx(19.9, abs=2 * EPS)
    assert clock.sleeps == pytest.approx([4], abs=EPS)  # its slot, and not a moment more
    assert clock.monotonic() - arrived <= settings.max_wait_seconds + EPS
    stats = limiter.stats()
    assert (stats["admitted"], stats["rejected"], stats["waiting"]) == (1, 1, 0)
    assert (stats["calls_in_window"], stats["scheduled"]) == (0, 0)

    # The slot it gave back is free: right after the pause, a call goes at once (had the
    # admission stayed, the one call per window would be taken until start + 120).
    clock.advance(error.retry_after)
    assert limiter.acquire(1, max_wait=0).waited == 0
    assert start + 79.9 - EPS <= clock.monotonic()


def test_a_pause_lasts_at_most_one_window(backend: Backend) -> None:
    """A Retry-After of a day (the most the client accepts) pauses for one window: then one
    call may go and bring back OpenRouter's current word."""
    limiter = backend.make(settings(window=60, max_wait=1000))
    limiter.pause(86_400)
    assert limiter.stats()["paused_for"] == pytest.approx(60, abs=EPS)
    assert rejected(limiter).retry_after == pytest.approx(60, abs=EPS)
    backend.clock.advance(60)
    assert limiter.acquire(1, max_wait=0).waited == 0
