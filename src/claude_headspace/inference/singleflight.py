"""Single-flight: identical requests in flight share one upstream call.

``SingleFlight`` does it among the threads of one process. ``RedisSingleFlight`` extends it
to every process on the same Redis: the first process takes a short-lived lock and makes
the call; the others watch the shared cache for its answer, and take over if the lock
lapses (its holder crashed or gave up) so that nobody waits forever.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import redis

from .redis_support import RedisGuard

T = TypeVar("T")


class _Flight(Generic[T]):
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


class SingleFlight:
    """Among this process's threads, one call per key at a time; the others share it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight[Any]] = {}

    def do(self, key: str, fn: Callable[[], T]) -> tuple[T, bool]:
        """``(fn(), False)`` for the first caller of ``key``; ``(its result, True)`` for
        callers that arrive while it runs. Its exception reaches every one of them."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.result, True  # type: ignore[return-value]
        try:
            flight.result = fn()
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()
        return flight.result, False

    def in_flight(self) -> int:
        """How many keys are being fetched right now."""
        with self._lock:
            return len(self._flights)


_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisSingleFlight:
    """Across processes: a lock per key (SET NX PX, released only by its holder), and
    waiters that poll ``load()`` (the shared cache) until the holder's answer appears.

    ``do(key, fn, load)`` returns ``(value, shared)``. A waiter whose holder's lock expires
    without an answer (a crash, or the call failed) tries to take the lock itself. While
    Redis is unreachable it simply runs ``fn()``.
    """

    def __init__(
        self,
        client: redis.Redis,
        guard: RedisGuard,
        *,
        prefix: str,
        lock_seconds: float,
        poll_seconds: float = 0.02,
    ) -> None:
        self._client = client
        self._guard = guard
        self._prefix = f"{prefix}:flight:"
        self._lock_ms = max(1, int(lock_seconds * 1000))
        self._poll = poll_seconds
        self._release = client.register_script(_RELEASE)

    def do(self, key: str, fn: Callable[[], T], load: Callable[[], T | None]) -> tuple[T, bool]:
        """Run ``fn`` once across processes for ``key``; the others get ``load()``'s answer."""
        name = self._prefix + key
        token = uuid.uuid4().hex
        while True:
            acquired = self._guard.run(
                lambda: bool(self._client.set(name, token, nx=True, px=self._lock_ms)),
                lambda: True,  # no Redis: nobody to share with, make the call
            )
            if acquired:
                try:
                    return fn(), False
                finally:
                    self._guard.run(lambda: self._release(keys=[name], args=[token]), lambda: 0)
            # Someone else is making this call: wait for its answer, or for its lock to go.
            while True:
                value = load()
                if value is not None:
                    return value, True
                held = self._guard.run(lambda: bool(self._client.exists(name)), lambda: False)
                if not held:
                    break
                time.sleep(self._poll)
            value = load()
            if value is not None:
                return value, True
