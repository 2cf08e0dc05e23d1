"""Calls-per-window and tokens-per-window limits, by scheduled admission.

Every admission is kept with its time and tokens, including admissions scheduled in the
near future. An arriving request is given the earliest time at or after now, after any
pause, and after the last scheduled admission (which keeps arrivals first come, first
served), at which both windows ending then have room for it. If that time is within
``max_wait`` the admission is recorded at once, atomically, and the caller sleeps until
then; otherwise nothing is recorded and the caller is told when to retry.

A 429 from OpenRouter pauses everyone (``pause``). No caller ever waits longer than
``max_wait`` in all: one already asleep towards its booked slot when a pause begins sits the
pause out only if that still ends within ``max_wait`` of its arrival; otherwise it gets
RateLimitedError with ``retry_after`` (the pause's end) as soon as it wakes, and its
booked admission is given back, so it spends none of the budget.

A pause lasts at most one window (``window_seconds``), whatever Retry-After said. A longer
one, which also ended that call's own retries, is believed for a window, not for up to a
day: when it is over one call goes upstream and, if OpenRouter still refuses, brings back a
fresh Retry-After and a fresh pause. So a wrong or stale header (a proxy's, say) costs a
window at most, and a real long limit costs one refused request per window. Tying the cap
to ``openrouter.retry.max_delay_seconds`` instead would switch pausing off wherever that is
0 and send every caller upstream into the 429s.

Check and consume are one step, so concurrent callers never overshoot. The memory limiter
does it under a lock; the Redis limiter does the same in one server-side script, so all
processes share one budget.

The admission rules are written twice, once per store, and held to one contract by
tests/unit/test_limiter_backends.py: ``MemoryRateLimiter`` in Python for one process, and
``ratelimit.lua`` (beside this module) for Redis, which alone does the Redis side's
arithmetic (window, slots, pause); ``RedisRateLimiter`` passes it the time and the settings,
and sleeps what it answers.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..clock import SYSTEM_CLOCK, Clock
from ..settings import RateLimitSettings
from .errors import RateLimitedError
from .redis_support import RedisGuard, lua_script, redis_error

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Reservation:
    """One admitted call and the tokens reserved for it."""

    id: str
    tokens: int
    admitted_at: float
    waited: float


class RateLimiter(Protocol):
    """Admits calls within the configured calls and tokens per window."""

    def acquire(self, tokens: int, *, max_wait: float | None = None) -> Reservation:
        """Reserve one call and ``tokens``, waiting our turn up to ``max_wait``; else raise
        RateLimitedError at once with ``retry_after``."""
        ...

    def reconcile(self, reservation: Reservation, actual_tokens: int) -> None:
        """Replace the reservation's estimate with the tokens really used."""
        ...

    def pause(self, seconds: float) -> None:
        """Admit nobody for ``seconds``, at most one window (OpenRouter said 429 with
        Retry-After)."""
        ...

    def stats(self) -> dict[str, Any]:
        """Current use, for /api/inference/status."""
        ...

    def health(self) -> str | None:
        """None when limits hold as configured, else a one-line reason (e.g. they are per
        process because Redis is unreachable)."""
        ...


def _too_big(tokens: int, limit: int) -> RateLimitedError:
    return RateLimitedError(
        f"the call needs an estimated {tokens} tokens, more than the whole per-window "
        f"budget of {limit} (openrouter.rate_limits.tokens_per_minute); it can never be "
        "admitted: lower max_tokens or shorten the input",
        retryable=False,
    )


def _over(wait: float, max_wait: float) -> RateLimitedError:
    retry_after = math.ceil(wait * 1000) / 1000
    return RateLimitedError(
        f"rate limit reached: the next free slot is in {retry_after:.3f} s, beyond the "
        f"{max_wait:g} s a call may wait (openrouter.rate_limits.max_wait_seconds)",
        retry_after=retry_after,
    )


def _paused(remaining: float, waited: float, max_wait: float) -> RateLimitedError:
    retry_after = math.ceil(remaining * 1000) / 1000
    return RateLimitedError(
        f"rate limit reached: OpenRouter asked for a pause (429) that ends in "
        f"{retry_after:.3f} s; after the {waited:.3f} s already waited that is beyond the "
        f"{max_wait:g} s a call may wait (openrouter.rate_limits.max_wait_seconds)",
        retry_after=retry_after,
    )


def _sit_out(
    clock: Clock,
    waited: float,
    max_wait: float,
    pause_left: Callable[[], float],
    give_back: Callable[[], None],
) -> float:
    """After sleeping ``waited`` s towards its booked slot, a caller sits out a 429 pause
    that began meanwhile (the pause holds callers already waiting too), but only while its
    whole wait stays within ``max_wait``: otherwise its admission is given back and it
    raises RateLimitedError at once. Returns the whole wait."""
    while (remaining := pause_left()) > 0:
        if waited + remaining > max_wait:
            give_back()
            raise _paused(remaining, waited, max_wait)
        clock.sleep(remaining)
        waited += remaining
    return waited


class MemoryRateLimiter:
    """The limiter for one process."""

    def __init__(self, settings: RateLimitSettings, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._calls = settings.calls_per_minute
        self._tokens = settings.tokens_per_minute
        self._window = settings.window_seconds
        self._max_wait = settings.max_wait_seconds
        self._clock = clock
        self._lock = threading.Lock()
        # [time, tokens, id] in non-decreasing time: admissions are scheduled in order.
        self._log: deque[list[Any]] = deque()
        self._by_id: dict[str, list[Any]] = {}
        self._ids = itertools.count()  # ids only need to be unique in this limiter
        self._total = 0
        self._paused_until = 0.0
        self._waiting = 0
        self.admitted = 0
        self.rejected = 0

    def acquire(self, tokens: int, *, max_wait: float | None = None) -> Reservation:
        limit_wait = self._max_wait if max_wait is None else max_wait
        if tokens > self._tokens:
            raise _too_big(tokens, self._tokens)
        with self._lock:
            now = self._clock.monotonic()
            self._prune(now)
            at = self._earliest(now, tokens)
            wait = at - now
            if wait > limit_wait:
                self.rejected += 1
                raise _over(wait, limit_wait)
            entry: list[Any] = [at, tokens, str(next(self._ids))]
            self._log.append(entry)
            self._by_id[entry[2]] = entry
            self._total += tokens
            self.admitted += 1
            if wait > 0:
                self._waiting += 1
        if wait > 0:
            try:
                self._clock.sleep(wait)
                wait = _sit_out(
                    self._clock, wait, limit_wait, self._pause_left, lambda: self._give_back(entry)
                )
            finally:
                with self._lock:
                    self._waiting -= 1
        return Reservation(entry[2], tokens, at, wait)

    def _pause_left(self) -> float:
        with self._lock:
            return self._paused_until - self._clock.monotonic()

    def _give_back(self, entry: list[Any]) -> None:
        # Rare (a pause cut a waiter short), so a linear search of the schedule is fine.
        with self._lock:
            for i, other in enumerate(self._log):
                if other is entry:
                    del self._log[i]
                    self._total -= entry[1]
                    self._by_id.pop(entry[2], None)
                    break
            self.admitted -= 1
            self.rejected += 1

    def _prune(self, now: float) -> None:
        horizon = now - self._window
        while self._log and self._log[0][0] <= horizon:
            _, tokens, key = self._log.popleft()
            self._total -= tokens
            self._by_id.pop(key, None)

    def _earliest(self, now: float, tokens: int) -> float:
        at = max(now, self._paused_until)
        if self._log:
            at = max(at, self._log[-1][0])
            if len(self._log) >= self._calls:
                # The call `calls` places back must have left the window.
                at = max(at, self._log[len(self._log) - self._calls][0] + self._window)
            if self._total + tokens > self._tokens:
                remaining = self._total
                for when, used, _ in self._log:
                    remaining -= used
                    if remaining + tokens <= self._tokens:
                        at = max(at, when + self._window)
                        break
        return at

    def reconcile(self, reservation: Reservation, actual_tokens: int) -> None:
        with self._lock:
            entry = self._by_id.get(reservation.id)
            if entry is not None:
                self._total += actual_tokens - entry[1]
                entry[1] = actual_tokens

    def pause(self, seconds: float) -> None:
        seconds = min(seconds, self._window)  # at most a window: see the module docstring
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock.monotonic() + seconds)

    def health(self) -> str | None:
        return None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            now = self._clock.monotonic()
            self._prune(now)
            current = [e for e in self._log if e[0] <= now]
            return {
                "backend": "memory",
                "calls_in_window": len(current),
                "tokens_in_window": sum(e[1] for e in current),
                "scheduled": len(self._log) - len(current),
                "waiting": self._waiting,
                "paused_for": round(max(0.0, self._paused_until - now), 3) or None,
                "admitted": self.admitted,
                "rejected": self.rejected,
            }


class RedisRateLimiter:
    """The limiter shared by every process that uses the same Redis and prefix.

    Times are the injected clock's wall time (``clock.time()``): hosts sharing a budget
    must keep their clocks in step (NTP), and tests pass a fake clock.
    """

    def __init__(
        self,
        client: redis.Redis,
        settings: RateLimitSettings,
        *,
        prefix: str,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._settings = settings
        self._clock = clock
        base = f"{prefix}:ratelimit:"
        self._keys = [base + "admissions", base + "tokens", base + "total", base + "pause"]
        self._script = client.register_script(lua_script("ratelimit.lua"))
        self._ttl_ms = int(settings.window_seconds * 2000 + settings.max_wait_seconds * 1000)
        self._lock = threading.Lock()
        self._waiting = 0
        self.admitted = 0
        self.rejected = 0

    def acquire(self, tokens: int, *, max_wait: float | None = None) -> Reservation:
        s = self._settings
        limit_wait = s.max_wait_seconds if max_wait is None else max_wait
        if tokens > s.tokens_per_minute:
            raise _too_big(tokens, s.tokens_per_minute)
        key = uuid.uuid4().hex
        answer = self._run(
            "acquire", self._clock.time(), s.window_seconds, s.calls_per_minute,
            s.tokens_per_minute, tokens, limit_wait, key, self._ttl_ms,
        )  # fmt: skip
        wait = float(answer[1])
        if int(answer[0]) == 0:
            with self._lock:
                self.rejected += 1
            raise _over(wait, limit_wait)
        with self._lock:
            self.admitted += 1
        if wait > 0:
            with self._lock:
                self._waiting += 1
            try:
                self._clock.sleep(wait)
                wait = _sit_out(
                    self._clock, wait, limit_wait, self._pause_left, lambda: self._give_back(key)
                )
            finally:
                with self._lock:
                    self._waiting -= 1
        return Reservation(key, tokens, float(answer[2]), wait)

    def _run(self, command: str, *args: str | float) -> Any:
        # One command of ratelimit.lua, on this limiter's keys.
        return self._script(keys=self._keys, args=[command, *args])

    def _pause_left(self) -> float:
        # The pause any process set. If Redis cannot be read now, the slot granted stands.
        try:
            return float(self._run("pause_left", self._clock.time()))
        except redis_error():
            return 0.0

    def _give_back(self, key: str) -> None:
        try:
            self._run("give_back", key)
        except redis_error() as exc:
            # The caller is told to come back either way; the admission it leaves behind
            # only holds its slot until it leaves the window.
            log.debug("rate limiter: could not give back admission %s: %s", key, exc)
        with self._lock:
            self.admitted -= 1
            self.rejected += 1

    def reconcile(self, reservation: Reservation, actual_tokens: int) -> None:
        self._run("reconcile", reservation.id, actual_tokens)

    def pause(self, seconds: float) -> None:
        # At most a window (see the module docstring): the script caps it.
        self._run("pause", self._clock.time(), seconds, self._settings.window_seconds)

    def stats(self) -> dict[str, Any]:
        calls, tokens, scheduled, paused = self._run(
            "stats", self._clock.time(), self._settings.window_seconds
        )
        with self._lock:
            return {
                "backend": "redis",
                "calls_in_window": int(calls),
                "tokens_in_window": int(tokens),
                "scheduled": int(scheduled),
                "waiting": self._waiting,
                "paused_for": round(max(0.0, float(paused)), 3) or None,
                "admitted": self.admitted,
                "rejected": self.rejected,
            }

    def health(self) -> str | None:
        # Alone it has no fallback: a Redis failure raises from the call that met it.
        # FallbackRateLimiter, which the factory builds, reports Redis's health.
        return None


class FallbackRateLimiter:
    """The Redis limiter, with a per-process limiter standing in while Redis is unreachable."""

    def __init__(
        self, shared: RedisRateLimiter, local: MemoryRateLimiter, guard: RedisGuard
    ) -> None:
        self.shared = shared
        self.local = local
        self._guard = guard

    def acquire(self, tokens: int, *, max_wait: float | None = None) -> Reservation:
        return self._guard.run(
            lambda: self.shared.acquire(tokens, max_wait=max_wait),
            lambda: self.local.acquire(tokens, max_wait=max_wait),
        )

    def reconcile(self, reservation: Reservation, actual_tokens: int) -> None:
        # Whichever limiter made the reservation knows its id; the other ignores it.
        self.local.reconcile(reservation, actual_tokens)
        self._guard.run(lambda: self.shared.reconcile(reservation, actual_tokens), lambda: None)

    def pause(self, seconds: float) -> None:
        self.local.pause(seconds)
        self._guard.run(lambda: self.shared.pause(seconds), lambda: None)

    def stats(self) -> dict[str, Any]:
        shared = self._guard.run(self.shared.stats, lambda: None)
        return shared if shared is not None else {**self.local.stats(), "backend": "memory"}

    def health(self) -> str | None:
        """Why limits are per process right now, or None."""
        return self._guard.health()
