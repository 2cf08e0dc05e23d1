"""The response cache contract, run unchanged over the memory and the Redis implementation,
then what only one of them promises: the LRU bound (memory), the tiered cache (Redis).

Expiry is tested on the fake clock for memory; Redis keeps TTLs on its own clock, so its
variant uses a real 0.2 s TTL and polls for the entry to go (never a timed assert).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from decimal import Decimal

import pytest
import redis

from headspace_inference.clock import FakeClock
from headspace_inference.inference.cache import (
    CACHE_FORMAT,
    MemoryCache,
    NullCache,
    RedisCache,
    ResponseCache,
    TieredCache,
    entry_bytes,
    request_key,
)
from headspace_inference.inference.redis_support import RedisGuard
from headspace_inference.inference.types import Answer, GenerationParams
from headspace_inference.settings import CacheSettings, RedisSettings

TTL = 0.2
POLL_DEADLINE = 10.0


def answer(text: str = "an answer", **changes: object) -> Answer:
    base = Answer(
        text=text,
        model="anthropic/claude-haiku-4.5",
        input_tokens=12,
        output_tokens=34,
        cost_usd=Decimal("0.000182"),
        upstream_cost_usd=Decimal("0.00018"),
        generation_id="gen-1",
        provider="Anthropic",
        finish_reason="stop",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def key(n: int | str) -> str:
    return request_key(
        model="m", system_prompt=None, input_text=f"input {n}", params=GenerationParams()
    )


@dataclass
class Backend:
    name: str
    make: Callable[[float], ResponseCache]  # a cache with this TTL (seconds)
    expire: Callable[[ResponseCache, str], None]  # wait until ``key`` has outlived its TTL

    @property
    def cache(self) -> ResponseCache:
        """A cache whose entries outlive the test."""
        return self.make(300.0)


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` until it holds; fail (not hang) if it never does."""
    deadline = time.monotonic() + POLL_DEADLINE
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest, fake_clock: FakeClock) -> Iterator[Backend]:
    """Caches on the fake clock (memory) or on Redis under this test's prefix."""
    if request.param == "memory":
        yield Backend(
            "memory",
            lambda ttl: MemoryCache(CacheSettings(ttl_seconds=ttl), clock=fake_clock),
            lambda _cache, _key: fake_clock.advance(TTL),
        )
        return
    url: str = request.getfixturevalue("redis_server_url")
    prefix: str = request.getfixturevalue("redis_prefix")
    clients: list[redis.Redis] = []
    probe = redis.Redis.from_url(url)

    def make(ttl: float) -> ResponseCache:
        clients.append(redis.Redis.from_url(url))
        return RedisCache(clients[-1], CacheSettings(ttl_seconds=ttl), prefix=prefix)

    def gone(cache: ResponseCache, k: str) -> None:
        # Redis keeps the TTL on its own clock: poll the key itself (not through the cache,
        # so that the cache's counters stay untouched) until Redis has dropped it.
        name = cache.key(k)  # type: ignore[attr-defined]
        wait_for(lambda: probe.exists(name) == 0, "Redis to expire the entry")

    yield Backend("redis", make, gone)
    for client in [*clients, probe]:
        client.close()


# --------------------------------------------------------------------------- both backends


def test_miss_then_hit(backend: Backend) -> None:
    cache = backend.cache
    assert cache.get(key(1)) is None
    cache.put(key(1), answer("one"))
    assert cache.get(key(1)) == answer("one")
    assert cache.get(key(2)) is None
    stats = cache.stats()
    assert stats["backend"] == backend.name
    assert (stats["hits"], stats["misses"], stats["hit_rate"]) == (1, 2, pytest.approx(1 / 3, 1e-3))


def test_a_hit_returns_everything_a_cache_hit_needs(backend: Backend) -> None:
    value = answer('ünïcode ✓ and "quotes"', cost_usd=None, generation_id=None, provider=None)
    cache = backend.cache
    cache.put(key("full"), value)
    assert cache.get(key("full")) == value


def test_put_replaces_the_previous_answer(backend: Backend) -> None:
    cache = backend.cache
    cache.put(key(1), answer("old"))
    cache.put(key(1), answer("new"))
    found = cache.get(key(1))
    assert found is not None
    assert found.text == "new"


def test_entries_expire_after_the_ttl_and_are_refreshed_by_the_next_put(
    backend: Backend,
) -> None:
    cache = backend.make(TTL)
    cache.put(key(1), answer("first"))
    assert cache.get(key(1)) == answer("first")
    backend.expire(cache, key(1))
    assert cache.get(key(1)) is None
    cache.put(key(1), answer("second"))
    assert cache.get(key(1)) == answer("second")
    stats = cache.stats()
    assert (stats["hits"], stats["misses"]) == (2, 1)


def test_clear_forgets_every_entry(backend: Backend) -> None:
    cache = backend.cache
    for n in range(5):
        cache.put(key(n), answer(str(n)))
    cache.clear()
    assert all(cache.get(key(n)) is None for n in range(5))


def test_stats_counters_are_exact_under_twenty_threads(backend: Backend) -> None:
    cache = backend.cache
    cache.put(key("present"), answer())
    threads_n, rounds = 20, 50
    start = threading.Barrier(threads_n)
    wrong: list[str] = []

    def worker(n: int) -> None:
        start.wait()
        for i in range(rounds):
            if cache.get(key("present")) is None:
                wrong.append("miss on a present key")
            if cache.get(key(f"absent-{n}-{i}")) is not None:
                wrong.append("hit on an absent key")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert wrong == []
    stats = cache.stats()
    assert stats["hits"] == threads_n * rounds
    assert stats["misses"] == threads_n * rounds
    assert stats["hit_rate"] == 0.5


def test_peek_finds_live_answers_and_counts_nothing(backend: Backend) -> None:
    """peek() is for polling (a single-flight waiter watching for another process's
    answer): it must not count a miss per poll, as get() did."""
    cache = backend.make(TTL)
    assert cache.peek(key(1)) is None
    cache.put(key(1), answer("one"))
    for _ in range(50):
        assert cache.peek(key(1)) == answer("one")
        assert cache.peek(key(2)) is None
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["hit_rate"]) == (0, 0, None)
    backend.expire(cache, key(1))
    assert cache.peek(key(1)) is None
    assert cache.get(key(1)) is None  # get still counts
    assert cache.stats()["misses"] == 1


def test_a_working_cache_reports_no_health_problem(backend: Backend) -> None:
    cache = backend.cache
    cache.put(key(1), answer())
    assert cache.health() is None


# --------------------------------------------------------------------------- disabled


def test_the_null_cache_never_finds_and_never_keeps() -> None:
    cache = NullCache()
    cache.put(key(1), answer())
    assert cache.get(key(1)) is None
    assert cache.peek(key(1)) is None
    cache.clear()
    assert cache.health() is None
    assert cache.stats() == {"backend": "disabled", "hits": 0, "misses": 0, "hit_rate": None}


# --------------------------------------------------------------------------- request keys


BASE = {
    "model": "anthropic/claude-haiku-4.5",
    "system_prompt": "You summarise turns.",
    "input_text": "Summarise this turn.",
    "params": GenerationParams(max_tokens=200, temperature=0.2),
}


@pytest.mark.parametrize(
    "change",
    [
        {"model": "anthropic/claude-sonnet-4.5"},
        {"system_prompt": "You score objectives."},
        {"system_prompt": None},
        {"system_prompt": ""},
        {"input_text": "Summarise this turn!"},
        {"params": GenerationParams(max_tokens=201, temperature=0.2)},
        {"params": GenerationParams(max_tokens=None, temperature=0.2)},
        {"params": GenerationParams(max_tokens=200, temperature=0.3)},
        {"params": GenerationParams(max_tokens=200, temperature=None)},
        {"params": GenerationParams(max_tokens=200, temperature=0.0)},
        {"fallbacks": ("openai/gpt-4o-mini",)},
        {"provider": {"quantizations": ["fp8"]}},
        {"schema": "f" * 64},
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_anything_that_decides_the_answer_changes_the_request_key(
    change: dict[str, object],
) -> None:
    assert request_key(**{**BASE, **change}) != request_key(**BASE)  # type: ignore[arg-type]


def test_provider_key_order_does_not_change_the_request_key() -> None:
    one = request_key(**BASE, provider={"order": ["A"], "zdr": True})  # type: ignore[arg-type]
    two = request_key(**BASE, provider={"zdr": True, "order": ["A"]})  # type: ignore[arg-type]
    assert one == two


def test_request_keys_are_stable_and_opaque() -> None:
    first = request_key(**BASE)  # type: ignore[arg-type]
    assert first == request_key(**dict(BASE))  # type: ignore[arg-type]
    assert len(first) == 64
    assert int(first, 16) >= 0
    assert "Summarise" not in first


def test_request_keys_of_all_variants_are_distinct() -> None:
    models = ["a/x", "a/y"]
    systems = [None, "", "s"]
    params = [GenerationParams(m, t) for m in (None, 10) for t in (None, 0.0, 1.0)]
    keys = {
        request_key(model=m, system_prompt=s, input_text="same text", params=p)
        for m, s, p in itertools.product(models, systems, params)
    }
    assert len(keys) == len(models) * len(systems) * len(params)


def test_the_boundary_between_system_prompt_and_input_is_part_of_the_key() -> None:
    p = GenerationParams()
    assert request_key(model="m", system_prompt="ab", input_text="c", params=p) != request_key(
        model="m", system_prompt="a", input_text="bc", params=p
    )


def test_a_different_model_is_not_served_from_the_cache(backend: Backend) -> None:
    text, params = "the same text", GenerationParams(max_tokens=50)
    light = request_key(model="light", system_prompt=None, input_text=text, params=params)
    capable = request_key(model="capable", system_prompt=None, input_text=text, params=params)
    cache = backend.cache
    cache.put(light, answer(model="light"))
    assert cache.get(capable) is None
    assert cache.get(light) is not None


def test_cached_answer_round_trips_through_its_stored_form() -> None:
    value = answer("näive ✓", upstream_cost_usd=None, finish_reason=None)
    assert Answer.from_json(value.to_json()) == value
    assert Answer.from_json(value.to_json().encode()) == value


# --------------------------------------------------------------------------- memory only


def test_memory_expiry_is_exact_on_the_fake_clock(fake_clock: FakeClock) -> None:
    cache = MemoryCache(CacheSettings(ttl_seconds=10), clock=fake_clock)
    cache.put(key(1), answer())
    fake_clock.advance(9.5)
    assert cache.get(key(1)) is not None
    fake_clock.advance(0.5)
    assert cache.get(key(1)) is None
    stats = cache.stats()
    assert (stats["expirations"], stats["entries"]) == (1, 0)


def test_memory_evicts_the_least_recently_used_entry_first(fake_clock: FakeClock) -> None:
    cache = MemoryCache(CacheSettings(max_entries=3), clock=fake_clock)
    for name in "abc":
        cache.put(key(name), answer(name))
    assert cache.get(key("a")) is not None  # a is now the most recently used
    cache.put(key("d"), answer("d"))  # evicts b
    assert cache.get(key("b")) is None
    cache.put(key("c"), answer("c2"))  # a put also counts as a use: order a, d, c
    cache.put(key("e"), answer("e"))  # evicts a
    assert cache.get(key("a")) is None
    assert [cache.get(key(n)) is not None for n in "cde"] == [True, True, True]
    stats = cache.stats()
    assert (stats["entries"], stats["max_entries"], stats["evictions"]) == (3, 3, 2)


def test_a_memory_peek_is_not_a_use(fake_clock: FakeClock) -> None:
    cache = MemoryCache(CacheSettings(max_entries=2), clock=fake_clock)
    cache.put(key("a"), answer("a"))
    cache.put(key("b"), answer("b"))
    assert cache.peek(key("a")) == answer("a")  # does not make a the most recently used
    cache.put(key("c"), answer("c"))  # so a, the least recently used, goes
    assert cache.peek(key("a")) is None
    assert cache.peek(key("b")) == answer("b")


def test_memory_bound_holds_under_concurrent_puts(fake_clock: FakeClock) -> None:
    cache = MemoryCache(CacheSettings(max_entries=50), clock=fake_clock)
    threads_n, puts = 20, 200
    start = threading.Barrier(threads_n)
    sizes: list[int] = []

    def worker(n: int) -> None:
        start.wait()
        for i in range(puts):
            cache.put(key(f"{n}-{i}"), answer())
            if i % 20 == 0:
                sizes.append(cache.stats()["entries"])

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert max(sizes) <= 50
    stats = cache.stats()
    assert stats["entries"] == 50
    assert stats["evictions"] == threads_n * puts - 50


def test_memory_holds_at_most_its_bytes_and_never_an_answer_over_an_eighth(
    fake_clock: FakeClock,
) -> None:
    bound = 256 * 1024
    cache = MemoryCache(CacheSettings(max_memory_bytes=bound), clock=fake_clock)
    for n in range(40):  # 40 answers of 20 KB: 800 KB offered
        cache.put(key(n), answer("x" * 20_000))
        assert cache.stats()["bytes"] <= bound
    stats = cache.stats()
    assert stats["entries"] == bound // entry_bytes(answer("x" * 20_000))
    assert cache.get(key(39)) is not None and cache.get(key(0)) is None  # oldest went first
    kept = cache.stats()["bytes"]
    cache.put(key("big"), answer("x" * (bound // 8)))  # over an eighth: not kept
    assert cache.get(key("big")) is None
    assert (cache.stats()["bytes"], cache.stats()["too_large"]) == (kept, 1)
    cache.put(key(39), answer("x" * (bound // 8)))  # nor kept when it replaces an entry
    assert cache.get(key(39)) is None
    assert cache.stats()["bytes"] == kept - entry_bytes(answer("x" * 20_000))


def test_memory_bytes_follow_expiry_and_clear(fake_clock: FakeClock) -> None:
    cache = MemoryCache(CacheSettings(ttl_seconds=10), clock=fake_clock)
    cache.put(key(1), answer("x" * 1000))
    cache.put(key(2), answer("y" * 1000), ttl=100)
    fake_clock.advance(10)
    assert cache.get(key(1)) is None
    assert cache.stats()["bytes"] == entry_bytes(answer("y" * 1000))
    cache.clear()
    assert cache.stats()["bytes"] == 0


# --------------------------------------------------------------------------- Redis only


@pytest.fixture
def redis_clients(redis_server_url: str) -> Iterator[Callable[[], redis.Redis]]:
    made: list[redis.Redis] = []

    def make() -> redis.Redis:
        made.append(redis.Redis.from_url(redis_server_url))
        return made[-1]

    yield make
    for client in made:
        client.close()


def tiered(
    url: str,
    prefix: str,
    client: redis.Redis,
    clock: FakeClock,
    ttl: float = 300.0,
) -> TieredCache:
    """One process's cache: its own memory tier and connection, a shared Redis tier."""
    settings = CacheSettings(ttl_seconds=ttl)
    guard = RedisGuard(client, RedisSettings(url=url, key_prefix=prefix), name="response cache")
    return TieredCache(
        MemoryCache(settings, clock=clock), RedisCache(client, settings, prefix=prefix), guard
    )


def test_redis_keys_are_namespaced_and_versioned(
    redis_server_url: str, redis_prefix: str, redis_clients: Callable[[], redis.Redis]
) -> None:
    client = redis_clients()
    cache = RedisCache(client, CacheSettings(ttl_seconds=60), prefix=redis_prefix)
    cache.put(key(1), answer())
    assert cache.key(key(1)) == f"{redis_prefix}:cache:{CACHE_FORMAT}:{key(1)}"
    stored = client.get(cache.key(key(1)))
    assert stored is not None
    assert Answer.from_json(stored) == answer()
    assert 0 < client.pttl(cache.key(key(1))) <= 60_000


def test_a_put_in_one_process_is_a_hit_in_another(
    redis_server_url: str, redis_prefix: str, redis_clients: Callable[[], redis.Redis]
) -> None:
    one = tiered(redis_server_url, redis_prefix, redis_clients(), FakeClock())
    two = tiered(redis_server_url, redis_prefix, redis_clients(), FakeClock())
    assert two.get(key(1)) is None
    one.put(key(1), answer("shared"))
    assert two.get(key(1)) == answer("shared")
    stats = two.stats()
    assert stats["redis"]["hits"] == 1
    assert stats["redis"]["misses"] == 1
    assert stats["redis_available"] is True
    assert two.health() is None


def test_a_tiered_peek_reads_another_process_s_answer_without_counting(
    redis_server_url: str, redis_prefix: str, redis_clients: Callable[[], redis.Redis]
) -> None:
    one = tiered(redis_server_url, redis_prefix, redis_clients(), FakeClock())
    two = tiered(redis_server_url, redis_prefix, redis_clients(), FakeClock())
    for _ in range(20):
        assert two.peek(key(1)) is None
    one.put(key(1), answer("shared"))
    assert two.peek(key(1)) == answer("shared")
    assert two.local.peek(key(1)) == answer("shared")  # copied to memory, like a get
    stats = two.stats()
    assert (stats["hits"], stats["misses"]) == (0, 0)
    assert (stats["redis"]["hits"], stats["redis"]["misses"]) == (0, 0)


def test_tiered_stats_name_both_tiers(
    redis_server_url: str, redis_prefix: str, redis_clients: Callable[[], redis.Redis]
) -> None:
    cache = tiered(redis_server_url, redis_prefix, redis_clients(), FakeClock())
    stats = cache.stats()
    # The memory tier's own "backend": "memory" must not overwrite the tiered cache's name.
    assert stats["backend"] == "memory+redis"
    assert stats["redis"]["backend"] == "redis"
    assert {"entries", "max_entries", "evictions", "hits", "misses"} <= set(stats)


def test_a_redis_hit_is_copied_to_memory_for_its_remaining_life(
    redis_server_url: str, redis_prefix: str, redis_clients: Callable[[], redis.Redis]
) -> None:
    writer_client = redis_clients()
    writer = tiered(redis_server_url, redis_prefix, writer_client, FakeClock())
    writer.put(key(1), answer("aged"))
    # Age the entry: 50 s of its 300 s are left.
    writer_client.pexpire(writer.shared.key(key(1)), 50_000)

    clock = FakeClock()
    reader = tiered(redis_server_url, redis_prefix, redis_clients(), clock)
    assert reader.local.get(key(1)) is None
    assert reader.get(key(1)) == answer("aged")
    assert reader.local.stats()["entries"] == 1

    # The memory copy lives as long as the Redis entry had left, not a full TTL.
    clock.advance(49)
    assert reader.local.get(key(1)) == answer("aged")
    clock.advance(1)
    assert reader.local.get(key(1)) is None


def test_a_memory_hit_does_not_touch_redis(
    redis_server_url: str, redis_prefix: str, redis_clients: Callable[[], redis.Redis]
) -> None:
    cache = tiered(redis_server_url, redis_prefix, redis_clients(), FakeClock())
    cache.put(key(1), answer())
    for _ in range(3):
        assert cache.get(key(1)) == answer()
    assert cache.stats()["redis"] == {
        "backend": "redis", "hits": 0, "misses": 0, "hit_rate": None, "unreadable": 0
    }  # fmt: skip


def test_a_redis_miss_puts_nothing_in_memory(
    redis_server_url: str, redis_prefix: str, redis_clients: Callable[[], redis.Redis]
) -> None:
    cache = tiered(redis_server_url, redis_prefix, redis_clients(), FakeClock())
    assert cache.get(key(1)) is None
    assert cache.local.stats()["entries"] == 0


def test_tiered_clear_forgets_both_tiers_for_every_process(
    redis_server_url: str, redis_prefix: str, redis_clients: Callable[[], redis.Redis]
) -> None:
    one = tiered(redis_server_url, redis_prefix, redis_clients(), FakeClock())
    two = tiered(redis_server_url, redis_prefix, redis_clients(), FakeClock())
    one.put(key(1), answer())
    one.clear()
    assert one.get(key(1)) is None
    assert two.get(key(1)) is None
