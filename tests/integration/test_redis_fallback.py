"""The limiter, the cache and single-flight as ``build_backends`` makes them (one Redis
client and one guard per process), on a real Redis reached through a loopback TCP proxy
that the tests cut and restore: the parts keep working on their local tiers, say so, and go
back to Redis by themselves; health is current; single-flight locks do not outlive a blip.

Nothing here asserts on elapsed time but the bound on waiting for a lock left by a blip
(a few seconds, checked against a generous 10 s): recovery is awaited by polling, and the
only sleeps are short pauses of about the guard's 0.2 s retry interval.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from tests.conftest import redis_url_through
from tests.tcp_proxy import TcpProxy

from headspace_inference.clock import FakeClock
from headspace_inference.inference.backends import Backends, build_backends
from headspace_inference.inference.cache import MemoryCache, NullCache, TieredCache, request_key
from headspace_inference.inference.ratelimit import FallbackRateLimiter, MemoryRateLimiter
from headspace_inference.inference.singleflight import (
    DEFAULT_LOCK_SECONDS,
    FlightOutcome,
    SingleFlight,
    TieredFlight,
)
from headspace_inference.inference.types import Answer, GenerationParams
from headspace_inference.settings import RedisSettings, Settings

pytestmark = pytest.mark.redis

GUARD_LOGGER = "headspace_inference.inference.redis_support"
PARTS = "rate limiter, response cache, single-flight and spend guard"
RETRY_INTERVAL = 0.2
DEADLINE = 15.0


@pytest.fixture
def proxy(redis_proxy: TcpProxy) -> TcpProxy:
    return redis_proxy


@pytest.fixture
def redis_settings(proxy: TcpProxy, redis_server_url: str, redis_prefix: str) -> RedisSettings:
    return RedisSettings(
        url=redis_url_through(proxy, redis_server_url),
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


@pytest.fixture
def make_backends(fake_clock: FakeClock) -> Iterator[Callable[..., Backends]]:
    """Builds one "process"'s backends from a Redis section (and optional overrides)."""
    made: list[Backends] = []

    def make(redis_settings: RedisSettings, **openrouter: Any) -> Backends:
        settings = Settings.model_validate(
            {"redis": redis_settings.model_dump(), "openrouter": openrouter}
        )
        made.append(build_backends(settings, clock=fake_clock))
        return made[-1]

    yield make
    for backends in made:
        backends.close()


def guard_records(caplog: pytest.LogCaptureFixture, level: int, part: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == GUARD_LOGGER and r.levelno == level and part in r.getMessage()
    ]


def poll(step: Callable[[], bool], what: str) -> None:
    """Repeat ``step`` until it reports success."""
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


# --------------------------------------------------------------------------- the factory


def test_one_client_serves_the_limiter_the_cache_and_single_flight(
    redis_settings: RedisSettings, proxy: TcpProxy, make_backends: Callable[..., Backends]
) -> None:
    """Review: three Redis clients (three pools) and three guards per process. Used one
    after the other, the three parts now go through one pooled connection."""
    backends = make_backends(redis_settings)
    assert isinstance(backends.limiter, FallbackRateLimiter)
    assert isinstance(backends.cache, TieredCache)
    assert isinstance(backends.flight, TieredFlight)
    backends.limiter.reconcile(backends.limiter.acquire(10), 5)
    backends.cache.put(key(1), answer("one"))
    assert backends.cache.peek(key(2)) is None
    outcome = backends.flight.run(key(3), lambda: "made", lambda: None)
    assert outcome == FlightOutcome(True, "made")
    assert backends.health() is None
    assert proxy.accepted == 1


def test_without_redis_or_with_the_cache_disabled(
    redis_settings: RedisSettings, make_backends: Callable[..., Backends]
) -> None:
    alone = build_backends(Settings())
    assert isinstance(alone.limiter, MemoryRateLimiter)
    assert isinstance(alone.cache, MemoryCache)
    assert isinstance(alone.flight, SingleFlight)
    assert alone.health() is None
    alone.close()

    # No cache, so nothing to hand another process an answer through: in-process only.
    uncached = make_backends(redis_settings, cache={"enabled": False})
    assert isinstance(uncached.cache, NullCache)
    assert isinstance(uncached.flight, SingleFlight)
    assert isinstance(uncached.limiter, FallbackRateLimiter)  # limits are still shared


# Base install, no redis-py: any import of it fails, as it would there.
_WITHOUT_REDIS = textwrap.dedent(
    """
    import sys

    class NoRedis:
        def find_spec(self, name, path=None, target=None):
            if name == "redis" or name.startswith("redis."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoRedis())
    from headspace_inference.settings import Settings
    from headspace_inference.inference.backends import build_backends

    backends = build_backends(Settings())
    backends.limiter.reconcile(backends.limiter.acquire(10), 5)
    assert backends.flight.run("k", lambda: "made", lambda: None).led
    backends.close()
    assert not any(m == "redis" or m.startswith("redis.") for m in sys.modules)
    """
)


def test_without_redis_configured_redis_py_is_never_imported() -> None:
    """The limiter, the cache and single-flight import redis-py only where a Redis client
    is built or its errors are caught, so a process without ``redis.url`` runs without it."""
    ran = subprocess.run(
        [sys.executable, "-c", _WITHOUT_REDIS], capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr[-3000:]


# --------------------------------------------------------------------------- health


def test_a_fresh_process_with_redis_down_reports_it_at_its_first_health_check(
    redis_settings: RedisSettings, proxy: TcpProxy, make_backends: Callable[..., Backends]
) -> None:
    """Defect: the first /status of a fresh process with Redis down said healthy while its
    own limiter showed backend: memory (the guard only knew of failed commands)."""
    backends = make_backends(redis_settings)
    proxy.cut()
    reason = backends.health()
    assert reason is not None and "Redis unreachable" in reason
    for part in (backends.limiter, backends.cache, backends.flight):
        assert part.health() == reason  # one guard, one reason
    assert backends.limiter.stats()["backend"] == "memory"


def test_health_is_back_when_redis_is_back_without_any_call(
    redis_settings: RedisSettings, proxy: TcpProxy, make_backends: Callable[..., Backends]
) -> None:
    """Suspected: status stayed degraded after Redis returned until the next call."""
    backends = make_backends(redis_settings)
    proxy.cut()
    backends.cache.put(key(1), answer("during"))  # a command fails: down
    assert backends.health() is not None
    proxy.restore()
    poll(lambda: backends.health() is None, "health to see Redis back, with no call made")
    assert backends.limiter.stats()["backend"] == "redis"


def test_health_pings_at_most_once_per_interval_for_all_callers(
    proxy: TcpProxy,
    redis_server_url: str,
    redis_prefix: str,
    make_backends: Callable[..., Backends],
) -> None:
    # With the proxy cut each PING costs one connection the proxy turns away: count those.
    db = redis.connection.parse_url(redis_server_url).get("db", 0)
    settings = RedisSettings(
        url=proxy.url("redis", f"/{db}"), key_prefix=redis_prefix, retry_interval_seconds=60
    )
    backends = make_backends(settings)
    proxy.cut()
    start = threading.Barrier(10)
    reasons: list[str | None] = []

    def check() -> None:
        start.wait()
        for _ in range(20):
            reasons.append(backends.health())

    threads = [threading.Thread(target=check) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert proxy.refused == 1  # one PING for 200 health checks
    # Callers that came while the first one was under way waited for its answer rather
    # than guess "healthy" for a process that had not heard from Redis yet.
    assert len(reasons) == 200
    assert all(r is not None and "Redis unreachable" in r for r in reasons)


# --------------------------------------------------------------------------- rate limiter


def test_the_limiter_falls_back_to_memory_and_comes_back(
    redis_settings: RedisSettings,
    proxy: TcpProxy,
    direct: redis.Redis,
    redis_prefix: str,
    make_backends: Callable[..., Backends],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=GUARD_LOGGER)
    backends = make_backends(redis_settings)
    limiter = backends.limiter
    assert isinstance(limiter, FallbackRateLimiter)
    admissions = f"{redis_prefix}:ratelimit:admissions"

    limiter.acquire(10)
    assert direct.zcard(admissions) == 1
    assert limiter.stats()["backend"] == "redis"
    assert limiter.health() is None

    proxy.cut()
    for _ in range(3):
        r = limiter.acquire(10)
        limiter.reconcile(r, 5)
    time.sleep(RETRY_INTERVAL + 0.05)  # let the guard try Redis again, and fail again
    limiter.acquire(10)
    limiter.pause(0.001)
    backends.cache.put(key(1), answer("during"))  # the cache meets the same outage

    assert direct.zcard(admissions) == 1  # nothing reached Redis
    assert isinstance(limiter.local, MemoryRateLimiter)
    assert limiter.local.admitted == 4
    reason = limiter.health()
    assert reason is not None
    assert PARTS in reason
    assert limiter.stats()["backend"] == "memory"
    # One guard per process: one warning for the outage, whichever part met it.
    warnings = guard_records(caplog, logging.WARNING, "Redis unreachable")
    assert len(warnings) == 1, warnings
    assert guard_records(caplog, logging.INFO, "back") == []

    proxy.restore()

    def through_redis() -> bool:
        limiter.acquire(10)
        return limiter.health() is None

    poll(through_redis, "the limiter to use Redis again")
    assert direct.zcard(admissions) >= 2
    assert limiter.stats()["backend"] == "redis"
    assert len(guard_records(caplog, logging.INFO, f"Redis is back for the {PARTS}")) == 1
    assert len(guard_records(caplog, logging.WARNING, "Redis unreachable")) == 1


# --------------------------------------------------------------------------- cache


def test_the_cache_falls_back_to_memory_and_comes_back(
    redis_settings: RedisSettings,
    proxy: TcpProxy,
    direct: redis.Redis,
    make_backends: Callable[..., Backends],
) -> None:
    cache = make_backends(redis_settings).cache
    assert isinstance(cache, TieredCache)

    cache.put(key(1), answer("before"))
    assert direct.exists(cache.shared.key(key(1))) == 1
    assert cache.health() is None

    proxy.cut()
    cache.put(key(2), answer("during"))
    assert cache.get(key(2)) == answer("during")  # served by memory
    assert cache.get(key(1)) == answer("before")
    assert cache.get(key(3)) is None
    time.sleep(RETRY_INTERVAL + 0.05)
    assert cache.get(key(4)) is None

    assert direct.exists(cache.shared.key(key(2))) == 0  # never reached Redis
    reason = cache.health()
    assert reason is not None
    assert PARTS in reason
    assert cache.stats()["redis_available"] is False

    # Meanwhile another process wrote an answer to Redis.
    direct.set(cache.shared.key(key(5)), answer("from elsewhere").to_json(), px=60_000)
    proxy.restore()

    poll(lambda: cache.get(key(5)) is not None, "the cache to read Redis again")
    assert cache.get(key(5)) == answer("from elsewhere")
    assert cache.health() is None
    assert cache.stats()["redis_available"] is True
    cache.put(key(6), answer("after"))
    assert direct.exists(cache.shared.key(key(6))) == 1


def test_two_processes_share_cache_entries_through_the_proxy(
    redis_settings: RedisSettings, make_backends: Callable[..., Backends]
) -> None:
    """The proxy is transparent: two "processes" behind it share the Redis tier."""
    one, two = make_backends(redis_settings), make_backends(redis_settings)
    one.cache.put(key(1), answer("shared"))
    assert two.cache.get(key(1)) == answer("shared")


# --------------------------------------------------------------------------- single-flight


def test_single_flight_just_makes_the_call_while_redis_is_down(
    redis_settings: RedisSettings, proxy: TcpProxy, make_backends: Callable[..., Backends]
) -> None:
    backends = make_backends(redis_settings)
    proxy.cut()
    outcome = backends.flight.run("k", lambda: "made anyway", lambda: None)
    assert outcome == FlightOutcome(True, "made anyway")
    assert backends.flight.health() is not None


def _hold_through_a_blip(holder: Backends, proxy: TcpProxy, k: str) -> None:
    """``holder`` takes the lock for ``k`` and Redis goes away (for it) before its call
    ends: the release fails."""

    def call() -> str:
        proxy.cut()
        return "holder's answer, never shared: its cache put failed too"

    outcome = holder.flight.run(k, call, lambda: holder.cache.peek(k))
    assert outcome.led
    assert isinstance(holder.flight, TieredFlight)
    assert holder.flight.shared.keeper.pending_releases() == 1


def test_an_identical_call_after_a_redis_blip_waits_a_few_seconds_at_most(
    redis_settings: RedisSettings,
    proxy: TcpProxy,
    redis_server_url: str,
    redis_prefix: str,
    direct: redis.Redis,
    make_backends: Callable[..., Backends],
) -> None:
    """Defect: a call held the cross-process lock when Redis was cut; the failed release was
    swallowed and an identical call from another process waited out the lock (45 s; 180 s
    with default settings). Now the lock lives DEFAULT_LOCK_SECONDS unless renewed, and a
    holder cut off from Redis cannot renew it."""
    holder = make_backends(redis_settings)
    other = make_backends(redis_settings.model_copy(update={"url": redis_server_url}))
    _hold_through_a_blip(holder, proxy, key(1))
    assert isinstance(holder.flight, TieredFlight)
    assert direct.exists(holder.flight.shared.lock_name(key(1))) == 1  # left behind

    started = time.monotonic()
    outcome = other.flight.run(key(1), lambda: "made", lambda: other.cache.peek(key(1)))
    waited = time.monotonic() - started
    print(f"\nFLIGHT an identical call after a Redis blip waited {waited:.2f} s "
          f"(lock life {DEFAULT_LOCK_SECONDS:g} s)")  # fmt: skip
    assert outcome == FlightOutcome(True, "made")
    assert waited < 10.0  # generous: the bound is the lock's life, 3 s


def test_a_release_that_failed_is_made_when_redis_is_back(
    proxy: TcpProxy,
    redis_server_url: str,
    redis_prefix: str,
    direct: redis.Redis,
    make_backends: Callable[..., Backends],
    fake_clock: FakeClock,
) -> None:
    # A lock life of a minute: only the retried release can remove it within the deadline.
    db = redis.connection.parse_url(redis_server_url).get("db", 0)
    settings = Settings.model_validate(
        {
            "redis": {
                "url": proxy.url("redis", f"/{db}"),
                "key_prefix": redis_prefix,
                "retry_interval_seconds": RETRY_INTERVAL,
                "socket_timeout_seconds": 0.2,
            }
        }
    )
    holder = build_backends(settings, clock=fake_clock, lock_seconds=60)
    try:
        _hold_through_a_blip(holder, proxy, key(1))
        assert isinstance(holder.flight, TieredFlight)
        lock = holder.flight.shared.lock_name(key(1))
        assert 0 < direct.pttl(lock) <= 60_000
        proxy.restore()
        poll(lambda: direct.exists(lock) == 0, "the keeper to release the lock")
        assert holder.flight.shared.keeper.pending_releases() == 0
    finally:
        holder.close()


def test_polling_for_another_process_s_answer_counts_no_cache_misses(
    redis_server_url: str, redis_prefix: str, make_backends: Callable[..., Backends]
) -> None:
    """Defect: the waiter polled load() = cache.get every 20 ms and each poll counted a miss
    (49 extra misses in each tier for a 1 s wait). load() is cache.peek now."""
    settings = RedisSettings(url=redis_server_url, key_prefix=redis_prefix)
    leader, waiter = make_backends(settings), make_backends(settings)
    polls: list[int] = []
    running = threading.Event()

    def load() -> Answer | None:
        polls.append(1)
        return waiter.cache.peek(key(1))

    def call() -> Answer:
        running.set()  # the leader holds the cross-process lock by now
        poll(lambda: len(polls) >= 25, "the waiter to poll 25 times")
        leader.cache.put(key(1), answer("shared"))  # as the service's _fetch does
        return answer("shared")

    holder = threading.Thread(
        target=lambda: leader.flight.run(key(1), call, lambda: leader.cache.peek(key(1)))
    )
    assert waiter.cache.get(key(1)) is None  # the service's own lookup: one real miss
    holder.start()
    assert running.wait(DEADLINE)
    outcome = waiter.flight.run(key(1), lambda: answer("not made"), load)
    holder.join(DEADLINE)
    assert outcome == FlightOutcome(False, answer("shared"))
    assert len(polls) >= 25
    stats = waiter.cache.stats()
    assert (stats["hits"], stats["misses"]) == (0, 1)
    assert (stats["redis"]["hits"], stats["redis"]["misses"]) == (0, 1)
