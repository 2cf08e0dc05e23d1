"""A real Redis outage, through a loopback TCP proxy in front of the test Redis: the limiter
and the cache keep working on their local tiers, say so, and go back to Redis by themselves.

Nothing here asserts on elapsed time: recovery is awaited by polling, and the only sleeps
are short pauses of about the guard's 0.2 s retry interval.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from tests.tcp_proxy import TcpProxy

from claude_headspace.clock import FakeClock
from claude_headspace.config import CacheSettings, RateLimitSettings, RedisSettings
from claude_headspace.inference.cache import (
    MemoryCache,
    RedisCache,
    TieredCache,
    build_cache,
    request_key,
)
from claude_headspace.inference.ratelimit import (
    FallbackRateLimiter,
    MemoryRateLimiter,
    build_rate_limiter,
)
from claude_headspace.inference.redis_support import RedisGuard
from claude_headspace.inference.singleflight import RedisSingleFlight
from claude_headspace.inference.types import Answer, GenerationParams

pytestmark = pytest.mark.redis

GUARD_LOGGER = "claude_headspace.inference.redis_support"
RETRY_INTERVAL = 0.2
DEADLINE = 15.0


@pytest.fixture
def proxy(redis_server_url: str) -> Iterator[TcpProxy]:
    target = redis.connection.parse_url(redis_server_url)
    with TcpProxy(target.get("host", "127.0.0.1"), int(target.get("port", 6379))) as p:
        yield p


@pytest.fixture
def redis_settings(proxy: TcpProxy, redis_server_url: str, redis_prefix: str) -> RedisSettings:
    db = redis.connection.parse_url(redis_server_url).get("db", 0)
    return RedisSettings(
        url=proxy.url("redis", f"/{db}"),
        key_prefix=redis_prefix,
        retry_interval_seconds=RETRY_INTERVAL,
        socket_timeout_seconds=0.2,
    )


@pytest.fixture
def direct(redis_server_url: str) -> Iterator[redis.Redis]:
    """A client that bypasses the proxy, to see what really reached Redis."""
    client = redis.Redis.from_url(redis_server_url)
    yield client
    client.close()


def guard_records(caplog: pytest.LogCaptureFixture, level: int, part: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == GUARD_LOGGER and r.levelno == level and part in r.getMessage()
    ]


def poll(step: Callable[[], bool], what: str) -> None:
    """Repeat ``step`` (which makes a real call) until it reports success."""
    deadline = time.monotonic() + DEADLINE
    while not step():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)


def answer(text: str) -> Answer:
    return Answer(text=text, model="m", input_tokens=1, output_tokens=2, finish_reason="stop")


def key(n: int) -> str:
    return request_key(model="m", system_prompt=None, input_text=str(n), params=GenerationParams())


# --------------------------------------------------------------------------- the proxy itself


def test_the_proxy_forwards_cuts_and_restores(
    proxy: TcpProxy, redis_settings: RedisSettings
) -> None:
    client = redis.Redis.from_url(str(redis_settings.url), socket_timeout=1)
    try:
        assert client.ping() is True
        assert proxy.open_connections == 1
        proxy.cut()
        assert proxy.open_connections == 0
        with pytest.raises(redis.exceptions.ConnectionError):
            client.ping()
        proxy.restore()
        assert client.ping() is True
    finally:
        client.close()


# --------------------------------------------------------------------------- rate limiter


def test_the_limiter_falls_back_to_memory_and_comes_back(
    redis_settings: RedisSettings,
    proxy: TcpProxy,
    direct: redis.Redis,
    redis_prefix: str,
    fake_clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=GUARD_LOGGER)
    limiter = build_rate_limiter(RateLimitSettings(), redis_settings, clock=fake_clock)
    assert isinstance(limiter, FallbackRateLimiter)
    admissions = f"{redis_prefix}:ratelimit:admissions"

    limiter.acquire(10)
    assert direct.zcard(admissions) == 1
    assert limiter.stats()["backend"] == "redis"
    assert limiter.degraded_reason() is None

    proxy.cut()
    for _ in range(3):
        r = limiter.acquire(10)
        limiter.reconcile(r, 5)
    time.sleep(RETRY_INTERVAL + 0.05)  # let the guard try Redis again, and fail again
    limiter.acquire(10)
    limiter.pause(0.001)

    assert direct.zcard(admissions) == 1  # nothing reached Redis
    assert isinstance(limiter.local, MemoryRateLimiter)
    assert limiter.local.admitted == 4
    reason = limiter.degraded_reason()
    assert reason is not None
    assert "rate limiter" in reason
    assert limiter.stats()["backend"] == "memory"
    warnings = guard_records(caplog, logging.WARNING, "rate limiter")
    assert len(warnings) == 1, warnings
    assert guard_records(caplog, logging.INFO, "back") == []

    proxy.restore()

    def through_redis() -> bool:
        limiter.acquire(10)
        return limiter.degraded_reason() is None

    poll(through_redis, "the limiter to use Redis again")
    assert direct.zcard(admissions) >= 2
    assert limiter.stats()["backend"] == "redis"
    assert len(guard_records(caplog, logging.INFO, "Redis is back for the rate limiter")) == 1
    assert len(guard_records(caplog, logging.WARNING, "rate limiter")) == 1


# --------------------------------------------------------------------------- cache


def test_the_cache_falls_back_to_memory_and_comes_back(
    redis_settings: RedisSettings,
    proxy: TcpProxy,
    direct: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=GUARD_LOGGER)
    cache = build_cache(CacheSettings(), redis_settings)
    assert isinstance(cache, TieredCache)

    cache.put(key(1), answer("before"))
    assert direct.exists(cache.shared.key(key(1))) == 1
    assert cache.degraded_reason() is None

    proxy.cut()
    cache.put(key(2), answer("during"))
    assert cache.get(key(2)) == answer("during")  # served by memory
    assert cache.get(key(1)) == answer("before")
    assert cache.get(key(3)) is None
    time.sleep(RETRY_INTERVAL + 0.05)
    assert cache.get(key(4)) is None

    assert direct.exists(cache.shared.key(key(2))) == 0  # never reached Redis
    reason = cache.degraded_reason()
    assert reason is not None
    assert "response cache" in reason
    assert cache.stats()["redis_available"] is False
    assert len(guard_records(caplog, logging.WARNING, "response cache")) == 1

    # Meanwhile another process wrote an answer to Redis.
    direct.set(cache.shared.key(key(5)), answer("from elsewhere").to_json(), px=60_000)
    proxy.restore()

    def through_redis() -> bool:
        return cache.get(key(5)) is not None

    poll(through_redis, "the cache to read Redis again")
    assert cache.get(key(5)) == answer("from elsewhere")
    assert cache.degraded_reason() is None
    assert cache.stats()["redis_available"] is True
    assert len(guard_records(caplog, logging.INFO, "Redis is back for the response cache")) == 1
    cache.put(key(6), answer("after"))
    assert direct.exists(cache.shared.key(key(6))) == 1


# --------------------------------------------------------------------------- single-flight


def test_single_flight_just_makes_the_call_while_redis_is_down(
    redis_settings: RedisSettings, proxy: TcpProxy, redis_prefix: str
) -> None:
    client = redis.Redis.from_url(
        str(redis_settings.url), socket_timeout=0.2, socket_connect_timeout=0.2
    )
    try:
        guard = RedisGuard(client, redis_settings, name="single-flight")
        flight = RedisSingleFlight(client, guard, prefix=redis_prefix, lock_seconds=5)
        local = MemoryCache(CacheSettings())
        proxy.cut()
        assert flight.do("k", lambda: "made anyway", lambda: local.get("k")) == (
            "made anyway",
            False,
        )
        assert guard.degraded_reason() is not None
    finally:
        client.close()


def test_two_tiered_caches_share_entries_through_the_proxy(
    redis_settings: RedisSettings,
) -> None:
    """The proxy is transparent: two "processes" behind it share the Redis tier."""
    caches = [build_cache(CacheSettings(), redis_settings) for _ in range(2)]
    one, two = caches
    assert isinstance(one, TieredCache)
    assert isinstance(two, TieredCache)
    assert isinstance(two.shared, RedisCache)
    one.put(key(1), answer("shared"))
    assert two.get(key(1)) == answer("shared")
    for cache in caches:
        cache.shared._client.close()  # type: ignore[union-attr]
