"""Redis plumbing shared by the limiter, the cache, single-flight and the spend guard: one
client per process, and one guard that falls back to local tiers while Redis is unreachable
and says so (``OutageGuard``, which the spend guard also keeps for the database).

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
ALL_PARTS = "rate limiter, response cache, single-flight and spend guard"


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


class OutageGuard:
    """Runs a shared store's commands, and after a failure skips the store for
    ``retry_interval`` seconds, running the caller's per-process fallback instead.

    The first failure logs a warning (the parts then hold per process only); the first
    success after it logs that the store is back. :meth:`health` says whether the store
    answers now, probing (``probe``) when nothing has been heard from it for a while.
    ``down()`` is the exceptions that mean the store is unreachable (not that it refused a
    command); a probe also counts ``refused()`` (reachable, not usable) as down.
    """

    def __init__(
        self,
        *,
        store: str,
        name: str,
        retry_interval: float,
        probe: Callable[[], object],
        probe_timeout: float,
        down: Callable[[], tuple[type[BaseException], ...]],
        refused: Callable[[], tuple[type[BaseException], ...]] = lambda: (),
    ) -> None:
        self._store = store
        self._name = name
        self._retry_interval = retry_interval
        self._probe = probe
        self._down = down
        self._refused = refused
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        # When the store was last heard from (a command's outcome or a probe); -inf: never,
        # so a fresh process probes at its first health() instead of assuming all is well.
        self._observed_at = float("-inf")
        self._probing = False
        self._probed = threading.Event()  # set when the current probe ends
        self._probe_timeout = probe_timeout
        self.last_error: str | None = None

    @property
    def available(self) -> bool:
        """Whether the store should be tried now."""
        with self._lock:
            return self._down_since is None or time.monotonic() >= self._retry_at

    def run(self, command: Callable[[], T], fallback: Callable[[], T]) -> T:
        """``command()`` on the store, or ``fallback()`` while it is unavailable."""
        if not self.available:
            return fallback()
        try:
            result = command()
        except self._down() as exc:
            self.failed(exc)
            return fallback()
        self.succeeded()
        return result

    def health(self) -> str | None:
        """None while the store answers, else why the parts are running without it.

        Cheap and current: the last outcome when the store was heard from within the retry
        interval, otherwise one probe (bounded by the store's own timeout) made by the first
        caller while concurrent callers take the last known state. So a fresh process with
        the store down reports it at once, and a process whose store came back says so
        without waiting for a call to go through it.
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
                self._probe()
            except (*self._down(), *self._refused()) as exc:
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
                f"{self._store} unreachable for the {self._name} ({self.last_error}); "
                "using per-process state"
            )

    def failed(self, exc: BaseException) -> None:
        """Record that a command failed: skip the store for the retry interval."""
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
                "%s unreachable for the %s (%s): falling back to this process alone "
                "until it is back", self._store, self._name, self.last_error,
            )  # fmt: skip

    def succeeded(self) -> None:
        """Record that a command went through."""
        now = time.monotonic()
        with self._lock:
            was_down = self._down_since is not None
            self._down_since = None
            self._observed_at = now
        if was_down:
            log.info("%s is back for the %s", self._store, self._name)


class RedisGuard(OutageGuard):
    """The process's one view of whether Redis is there (a PING probes it)."""

    def __init__(
        self, client: redis.Redis, settings: RedisSettings, *, name: str = ALL_PARTS
    ) -> None:
        super().__init__(
            store="Redis",
            name=name,
            retry_interval=settings.retry_interval_seconds,
            probe=client.ping,
            probe_timeout=settings.socket_timeout_seconds * 2 + 0.5,
            down=redis_down,
            refused=lambda: (redis_error(),),  # NOAUTH too: reachable, not usable
        )
        self.client = client
