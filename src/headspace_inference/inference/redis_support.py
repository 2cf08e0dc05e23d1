"""Redis plumbing shared by the limiter, the cache and single-flight: one client per process,
and one guard that falls back to local tiers while Redis is unreachable and says so.

``redis`` is imported where a client is built or its exceptions are caught, never at module
level: a process configured without Redis never loads it.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, TypeVar

from ..settings import RedisSettings

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

T = TypeVar("T")


@functools.cache
def redis_down() -> tuple[type[BaseException], ...]:
    """The exceptions that mean Redis is unreachable (not that it refused a command)."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (RedisConnectionError, RedisTimeoutError, OSError)


@functools.cache
def lua_script(name: str) -> str:
    """The source of a Redis Lua script shipped beside this module (package data)."""
    return resources.files(__package__ or "").joinpath(name).read_text(encoding="utf-8")


@functools.cache
def redis_error() -> type[Exception]:
    """``redis.RedisError``, the base of every error redis-py raises."""
    from redis.exceptions import RedisError

    return RedisError


# What the guard of the whole process is called in its log lines and reasons.
ALL_PARTS = "rate limiter, response cache and single-flight"


def make_client(settings: RedisSettings) -> redis.Redis:
    """A pooled client with short timeouts: a slow Redis must not stall an inference call."""
    if settings.url is None:
        raise ValueError("redis.url is not set")
    import redis

    return redis.Redis.from_url(
        settings.url,
        socket_timeout=settings.socket_timeout_seconds,
        socket_connect_timeout=settings.socket_timeout_seconds,
        health_check_interval=30,
    )


class RedisGuard:
    """Runs Redis commands, and after a failure skips Redis for retry_interval_seconds.

    The first failure logs a warning (limits and cache then hold per process only);
    the first success after it logs that Redis is back. :meth:`health` says whether Redis
    answers now, probing with a PING when nothing has been heard from it for a while.
    """

    def __init__(
        self, client: redis.Redis, settings: RedisSettings, *, name: str = ALL_PARTS
    ) -> None:
        self.client = client
        self._retry_interval = settings.retry_interval_seconds
        self._name = name
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        # When Redis was last heard from (a command's outcome or a probe); -inf: never, so
        # a fresh process probes at its first health() instead of assuming all is well.
        self._observed_at = float("-inf")
        self._probing = False
        self._probed = threading.Event()  # set when the current probe ends
        self._probe_timeout = settings.socket_timeout_seconds * 2 + 0.5
        self.last_error: str | None = None

    @property
    def available(self) -> bool:
        """Whether Redis should be tried now."""
        with self._lock:
            return self._down_since is None or time.monotonic() >= self._retry_at

    def run(self, command: Callable[[], T], fallback: Callable[[], T]) -> T:
        """``command()`` on Redis, or ``fallback()`` while Redis is unavailable."""
        if not self.available:
            return fallback()
        try:
            result = command()
        except redis_down() as exc:
            self.failed(exc)
            return fallback()
        self.succeeded()
        return result

    def health(self) -> str | None:
        """None while Redis answers, else why the parts are running without it.

        Cheap and current: the last outcome when Redis was heard from within the retry
        interval, otherwise one PING (bounded by the socket timeout) made by the first
        caller while concurrent callers take the last known state. So a fresh process with
        Redis down reports it at once, and a process whose Redis came back says so without
        waiting for a call to go through it.
        """
        now = time.monotonic()
        with self._lock:
            probe = not self._probing and now - self._observed_at >= self._retry_interval
            never_heard = self._observed_at == float("-inf")
            if probe:
                self._probing = True
                self._probed = threading.Event()
            probed = self._probed
        if probe:
            try:
                self.client.ping()
            except (*redis_down(), redis_error()) as exc:  # NOAUTH too: reachable, not usable
                self.failed(exc)
            else:
                self.succeeded()
            finally:
                with self._lock:
                    self._probing = False
                probed.set()
        elif never_heard:
            # Nothing known yet, and the first probe is under way: its answer, not a guess.
            probed.wait(self._probe_timeout)
        return self._reason()

    def _reason(self) -> str | None:
        with self._lock:
            if self._down_since is None:
                return None
            return (
                f"Redis unreachable for the {self._name} ({self.last_error}); "
                "using per-process state"
            )

    def failed(self, exc: BaseException) -> None:
        """Record that a Redis command failed: skip Redis for the retry interval."""
        now = time.monotonic()
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = now
            self._retry_at = now + self._retry_interval
            self._observed_at = now
            self.last_error = f"{type(exc).__name__}: {exc}"[:200]
        if first:
            log.warning(
                "Redis unreachable for the %s (%s): falling back to this process alone "
                "until it is back", self._name, self.last_error,
            )  # fmt: skip

    def succeeded(self) -> None:
        """Record that a Redis command went through."""
        now = time.monotonic()
        with self._lock:
            was_down = self._down_since is not None
            self._down_since = None
            self._observed_at = now
        if was_down:
            log.info("Redis is back for the %s", self._name)
