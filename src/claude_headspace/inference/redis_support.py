"""Redis plumbing shared by the limiter, the cache and single-flight: one client per process,
and a guard that falls back to local tiers while Redis is unreachable."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..config import RedisSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)


def make_client(settings: RedisSettings) -> redis.Redis:
    """A pooled client with short timeouts: a slow Redis must not stall an inference call."""
    if settings.url is None:
        raise ValueError("redis.url is not set")
    return redis.Redis.from_url(
        settings.url,
        socket_timeout=settings.socket_timeout_seconds,
        socket_connect_timeout=settings.socket_timeout_seconds,
        health_check_interval=30,
    )


class RedisGuard:
    """Runs Redis commands, and after a failure skips Redis for retry_interval_seconds.

    The first failure logs a warning (limits and cache then hold per process only);
    the first success after it logs that Redis is back.
    """

    def __init__(self, client: redis.Redis, settings: RedisSettings, *, name: str) -> None:
        self.client = client
        self._retry_interval = settings.retry_interval_seconds
        self._name = name
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
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
        except REDIS_DOWN as exc:
            self._failed(exc)
            return fallback()
        self._succeeded()
        return result

    def degraded_reason(self) -> str | None:
        """Why this part is running without Redis, or None."""
        with self._lock:
            if self._down_since is None:
                return None
        return (
            f"Redis unreachable for the {self._name} ({self.last_error}); using per-process state"
        )

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
            self._retry_at = time.monotonic() + self._retry_interval
            self.last_error = f"{type(exc).__name__}: {exc}"[:200]
        if first:
            log.warning(
                "Redis unreachable for the %s (%s): falling back to this process alone "
                "until it is back", self._name, self.last_error,
            )  # fmt: skip

    def _succeeded(self) -> None:
        with self._lock:
            was_down = self._down_since is not None
            self._down_since = None
        if was_down:
            log.info("Redis is back for the %s", self._name)
