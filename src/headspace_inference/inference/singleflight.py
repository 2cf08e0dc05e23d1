"""Single-flight: identical requests in flight share one upstream call.

``SingleFlight`` does it among the threads of one process. ``RedisSingleFlight`` does it
among processes on one Redis: the first process takes a short lock and makes the call; the
others watch the shared cache for its answer, and take over if the lock goes without one.
``TieredFlight`` composes the two, and is what the service calls: one ``run`` whose
``FlightOutcome`` says whether this caller made the upstream call (``led``) and carries the
value or the exception.

The cross-process lock is redis-py's own ``redis.lock.Lock``; what is ours is the flow
around it. It lives ``lock_seconds`` (a few seconds) and is renewed (``extend``), while its
call runs, by one keeper thread per process. So a holder slower than the lock's life keeps it,
and a holder that is gone (killed, or cut off from Redis by a blip) stops renewing and its
lock lapses within ``lock_seconds``: an identical call elsewhere never waits longer than
that on a holder that is no longer there. A release that fails (Redis away when the call
ended) is retried by the keeper while the lock could still be alive.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

from ..clock import SYSTEM_CLOCK, Clock
from .redis_support import RedisGuard, redis_down, redis_error

if TYPE_CHECKING:
    import redis
    from redis.lock import Lock

log = logging.getLogger(__name__)

T = TypeVar("T")

# Long enough that a busy machine's keeper (renewing every third of it, at most every
# second) does not miss it; short enough that a call waiting on a holder that is gone gets
# through within a few seconds.
DEFAULT_LOCK_SECONDS = 3.0


@dataclass(frozen=True, slots=True)
class FlightOutcome(Generic[T]):
    """What one caller of a flight got.

    ``led`` is True for exactly the caller that ran ``call`` (made the upstream call), False
    for callers that shared another's. Either ``error`` is set (the leader's exception,
    which in-process followers share) or ``value`` is the result.
    """

    led: bool
    value: T | None = None
    error: Exception | None = None

    def result(self) -> T:
        """The value, or raise the error."""
        if self.error is not None:
            raise self.error
        return cast(T, self.value)


def _lead(call: Callable[[], T]) -> FlightOutcome[T]:
    try:
        return FlightOutcome(True, call())
    except Exception as exc:
        return FlightOutcome(True, error=exc)


def _load_or_lead(call: Callable[[], T], load: Callable[[], T | None]) -> FlightOutcome[T]:
    # The holder before us may have published and released between our caller's cache
    # lookup and our lock: then its answer is ours, and no second call is made.
    value = load()
    if value is not None:
        return FlightOutcome(False, value)
    return _lead(call)


class Flight(Protocol):
    """Identical calls in flight share one call."""

    def run(
        self, key: str, call: Callable[[], T], load: Callable[[], T | None]
    ) -> FlightOutcome[T]:
        """Run ``call`` once for all concurrent callers of ``key``; never raises for an
        Exception of ``call``, which the outcome carries.

        ``load`` reads the answer another flight published (the shared cache): polled while
        waiting on another process, and looked at once by a leader before it calls (a
        flight may have landed since the caller's own lookup). So it must not count as a
        cache lookup: ``cache.peek``.
        """
        ...

    def in_flight(self) -> int:
        """How many keys this process is running right now."""
        ...

    def health(self) -> str | None:
        """None when calls are shared as configured, else a one-line reason (e.g. only
        within this process because Redis is unreachable)."""
        ...


class _Flight(Generic[T]):
    def __init__(self) -> None:
        self.done = threading.Event()
        self.outcome: FlightOutcome[T] = FlightOutcome(False)
        self.fatal: BaseException | None = None  # not an Exception: raised, not carried


class SingleFlight:
    """Among this process's threads, one call per key at a time; the others share it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight[Any]] = {}

    def run(
        self, key: str, call: Callable[[], T], load: Callable[[], T | None] | None = None
    ) -> FlightOutcome[T]:
        """``call()`` for the first caller of ``key`` (``led``); the callers that arrive while
        it runs share its value or its exception.

        The first caller looks at ``load()`` once before calling: a flight that landed
        between the caller's own cache lookup and now has put its answer there.
        """
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            flight.done.wait()
            if flight.fatal is not None:
                raise flight.fatal
            shared = flight.outcome
            return FlightOutcome(False, shared.value, shared.error)
        try:
            flight.outcome = _lead(call) if load is None else _load_or_lead(call, load)
        except Exception as exc:  # load() failed (call()'s are in the outcome): nobody led
            flight.outcome = FlightOutcome(False, error=exc)
        except BaseException as exc:
            flight.fatal = exc
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()
        return flight.outcome

    def in_flight(self) -> int:
        """How many keys are being fetched right now."""
        with self._lock:
            return len(self._flights)

    def health(self) -> str | None:
        return None


class _LockKeeper:
    """One thread per process that renews the locks held by running calls and retries
    releases that failed. It runs only while there is something to do (so a process that
    holds no lock, e.g. a pre-fork master, has no thread of it)."""

    def __init__(self, guard: RedisGuard, lock_seconds: float) -> None:
        self._guard = guard
        self._lock_seconds = lock_seconds
        self.interval = min(1.0, lock_seconds / 3)
        self._reset()
        self._closed = False

    def _reset(self) -> None:
        # Also after a fork: the child has none of the parent's calls, nor its thread, and
        # must not inherit a lock the thread may have held at the fork.
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._held: dict[str, Lock] = {}  # token -> lock, while the call runs
        self._pending: dict[str, tuple[Lock, float]] = {}  # token -> (lock, retry until)
        self._thread: threading.Thread | None = None
        self.renewals = 0
        self.lost = 0

    def hold(self, lock: Lock, token: str) -> None:
        if self._pid != os.getpid():
            self._reset()
        with self._cond:
            self._held[token] = lock
            self._wake()

    def release(self, lock: Lock, token: str) -> None:
        from redis.exceptions import LockNotOwnedError

        if self._pid != os.getpid():
            self._reset()
        with self._cond:
            self._held.pop(token, None)
        try:
            released = self._guard.run(lambda: _released(lock.release), lambda: False)
        except LockNotOwnedError:
            # It lapsed (Redis away, or the keeper late) and may be another's now; the
            # release, checked against our token, left it alone.
            log.info("single-flight: lock %s lapsed before its call ended", lock.name)
            return
        except redis_error() as exc:  # not an outage, but the release did not happen
            log.warning("single-flight: releasing a lock failed (%s); will retry", exc)
            released = False
        if not released:
            # Redis is away: keep trying while the lock could still be alive (nobody
            # renews it any more, so it lapses within one lock life at the latest).
            with self._cond:
                until = time.monotonic() + self._lock_seconds
                self._pending[token] = (lock, until)
                self._wake()

    def pending_releases(self) -> int:
        with self._cond:
            return len(self._pending)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _is_closed(self) -> bool:
        return self._closed

    def _wake(self) -> None:
        # Called under the condition.
        if self._closed:
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._loop, name="single-flight-keeper", daemon=True
            )
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closed or not (self._held or self._pending):
                    self._thread = None
                    return
                self._cond.wait(self.interval)
                if self._is_closed():  # close() may have come during the wait
                    self._thread = None
                    return
                now = time.monotonic()
                self._pending = {t: p for t, p in self._pending.items() if p[1] > now}
                held = dict(self._held)
                pending = {t: lock for t, (lock, _) in self._pending.items()}
            if not (held or pending):
                continue
            # Straight to Redis, not through the guard's back-off: the keeper is off the
            # callers' path, and a lock not renewed for one lock life is lost.
            try:
                if held:
                    self._renew_all(held)
                if pending:
                    self._release_all(pending)
            except redis_down() as exc:
                self._guard.failed(exc)
            except redis_error() as exc:
                log.warning("single-flight: renewing or releasing locks failed: %s", exc)
            else:
                self._guard.succeeded()

    def _renew_all(self, held: dict[str, Lock]) -> None:
        from redis.exceptions import LockError

        lost = []
        for token, lock in held.items():
            try:
                lock.extend(self._lock_seconds, replace_ttl=True)
            except LockError:  # not ours any more, or released since ``held`` was read
                lost.append(token)
        with self._cond:
            self.renewals += 1
            for token in lost:
                # Lapsed while Redis was away, or taken over: renewing it is pointless now.
                if self._held.pop(token, None) is not None:
                    self.lost += 1
        for token in lost:
            log.info("single-flight: lock %s lapsed while its call was still running", token)

    def _release_all(self, pending: dict[str, Lock]) -> None:
        from redis.exceptions import LockNotOwnedError

        for token, lock in pending.items():
            # Lock.release() of redis-py 5 forgets the token before its command is sent, so
            # a release that failed is made again with the token the lock was taken with.
            with contextlib.suppress(LockNotOwnedError):  # lapsed meanwhile: nothing to do
                lock.do_release(token)
            with self._cond:
                self._pending.pop(token, None)


def _released(release: Callable[[], None]) -> bool:
    release()
    return True


class RedisSingleFlight:
    """Across processes: a lock per key (redis-py's ``Lock``: taken with SET NX PX, renewed
    while its call runs, released only by its holder's token), and waiters that poll
    ``load()`` (the shared cache) until the holder's answer appears, taking over when the
    lock goes without one. While Redis is unreachable it simply makes the call.

    How long to wait between polls is decided here, on the injected clock, not by the lock's
    own blocking acquire: a waiter's turn ends with the holder's answer, not the lock.
    """

    def __init__(
        self,
        client: redis.Redis,
        guard: RedisGuard,
        *,
        prefix: str,
        lock_seconds: float = DEFAULT_LOCK_SECONDS,
        poll_seconds: float = 0.02,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._client = client
        self._guard = guard
        self._prefix = f"{prefix}:flight:"
        # Whole milliseconds, at least one: what Redis keeps as the lock's life.
        self._lock_seconds = max(1, int(lock_seconds * 1000)) / 1000
        self._poll = poll_seconds
        self._clock = clock
        self.keeper = _LockKeeper(guard, self._lock_seconds)

    def lock_name(self, key: str) -> str:
        """The Redis key of the lock for request key ``key``."""
        return self._prefix + key

    def run(
        self, key: str, call: Callable[[], T], load: Callable[[], T | None]
    ) -> FlightOutcome[T]:
        """Run ``call`` once across processes for ``key``; the others get ``load()``'s
        answer (``led`` False). Only ``call``'s Exceptions are carried; ``load``'s raise."""
        # thread_local=False: the keeper thread renews and releases it, not this one.
        lock = self._client.lock(
            self.lock_name(key), timeout=self._lock_seconds, blocking=False, thread_local=False
        )
        while True:
            token = uuid.uuid4().hex
            taken: bool | None = self._try(partial(lock.acquire, token=token), None)
            if taken is None:  # no Redis: nobody to share with, make the call
                return _load_or_lead(call, load)
            if taken:
                self.keeper.hold(lock, token)
                try:
                    return _load_or_lead(call, load)
                finally:
                    self.keeper.release(lock, token)
            # Someone else is making this call: wait for its answer, or for its lock to go.
            while True:
                value = load()
                if value is not None:
                    return FlightOutcome(False, value)
                if not self._try(lock.locked, False):
                    break
                self._clock.sleep(self._poll)
            value = load()
            if value is not None:
                return FlightOutcome(False, value)

    def _try(self, command: Callable[[], T], fallback: T) -> T:
        # Any Redis error, not only an outage, means no sharing: the call is still made.
        try:
            return self._guard.run(command, lambda: fallback)
        except redis_error() as exc:
            log.warning("single-flight: Redis refused a lock command (%s); not sharing", exc)
            return fallback

    def health(self) -> str | None:
        return self._guard.health()

    def close(self) -> None:
        """Stop renewing (running calls' locks then lapse within one lock life)."""
        self.keeper.close()


class TieredFlight:
    """The flight the service calls when Redis is configured: threads of this process
    share through ``SingleFlight``, and only its leader goes on to ``RedisSingleFlight``, so
    a process takes one lock per key and polls for another process's answer once."""

    def __init__(self, local: SingleFlight, shared: RedisSingleFlight) -> None:
        self.local = local
        self.shared = shared

    def run(
        self, key: str, call: Callable[[], T], load: Callable[[], T | None]
    ) -> FlightOutcome[T]:
        # ``load`` goes to the Redis flight only, which looks once it holds the lock.
        outer = self.local.run(key, lambda: self.shared.run(key, call, load))
        if outer.error is not None:
            # Raised by the flight itself (``load``), never by ``call``, whose exceptions
            # the inner outcome carries: nobody here made the upstream call.
            return FlightOutcome(False, error=outer.error)
        inner = cast(FlightOutcome[T], outer.value)
        # This process's followers share what its leader got, never the lead.
        return inner if outer.led else FlightOutcome(False, inner.value, inner.error)

    def in_flight(self) -> int:
        return self.local.in_flight()

    def health(self) -> str | None:
        return self.shared.health()

    def close(self) -> None:
        self.shared.close()
