"""The rate limiter, the response cache and single-flight, built together from settings.

With ``redis.url`` set, all three share one Redis client (one connection pool) and one
``RedisGuard``: one view of whether Redis is there, one warning when it goes, one reason in
the status while it is away. Without it they are per process. With the cache disabled the
cache is a ``NullCache`` and single-flight is in-process only, since processes share an
answer through the cache. redis-py is imported only when ``redis.url`` is set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..clock import SYSTEM_CLOCK, Clock
from ..settings import Settings
from .cache import MemoryCache, NullCache, RedisCache, ResponseCache, TieredCache
from .ratelimit import FallbackRateLimiter, MemoryRateLimiter, RateLimiter, RedisRateLimiter
from .redis_support import RedisGuard, make_client
from .singleflight import (
    DEFAULT_LOCK_SECONDS,
    Flight,
    RedisSingleFlight,
    SingleFlight,
    TieredFlight,
)

if TYPE_CHECKING:
    import redis


@dataclass
class Backends:
    """What the service is built from; ``close()`` it when the service closes."""

    limiter: RateLimiter
    cache: ResponseCache
    flight: Flight
    client: redis.Redis | None = None  # the process's one Redis client, when configured
    guard: RedisGuard | None = None
    on_close: Sequence[Callable[[], None]] = field(default=(), repr=False)  # before the client

    def health(self) -> str | None:
        """None while every part works as configured, else one line saying why not."""
        reasons = dict.fromkeys(
            r for r in (self.limiter.health(), self.cache.health(), self.flight.health()) if r
        )
        return "; ".join(reasons) or None

    def close(self) -> None:
        """Stop the single-flight lock keeper and close the Redis client's connections."""
        for close in self.on_close:
            close()
        if self.client is not None:
            self.client.close()


def build_backends(
    settings: Settings,
    *,
    clock: Clock = SYSTEM_CLOCK,
    lock_seconds: float = DEFAULT_LOCK_SECONDS,
) -> Backends:
    """The three parts for these settings; touches no network (Redis connects on first use).

    ``lock_seconds`` is the life of a cross-process single-flight lock between renewals:
    how long an identical call may wait on a holder that is gone.
    """
    limits = settings.openrouter.rate_limits
    cache_settings = settings.openrouter.cache
    local_limiter = MemoryRateLimiter(limits, clock=clock)
    if settings.redis.url is None:
        cache: ResponseCache = (
            MemoryCache(cache_settings, clock=clock) if cache_settings.enabled else NullCache()
        )
        return Backends(local_limiter, cache, SingleFlight())

    client = make_client(settings.redis)
    guard = RedisGuard(client, settings.redis)
    prefix = settings.redis.key_prefix
    limiter = FallbackRateLimiter(
        RedisRateLimiter(client, limits, prefix=prefix, clock=clock), local_limiter, guard
    )
    if not cache_settings.enabled:
        # No shared cache, so no way to hand another process an answer: in-process only.
        return Backends(limiter, NullCache(), SingleFlight(), client=client, guard=guard)
    cache = TieredCache(
        MemoryCache(cache_settings, clock=clock),
        RedisCache(client, cache_settings, prefix=prefix),
        guard,
    )
    shared = RedisSingleFlight(client, guard, prefix=prefix, lock_seconds=lock_seconds)
    return Backends(
        limiter,
        cache,
        TieredFlight(SingleFlight(), shared),
        client=client,
        guard=guard,
        on_close=(shared.close,),
    )
