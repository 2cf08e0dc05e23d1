"""The Redis spend-guard store: the stores' one contract, and what only a shared store has to
show (its keys and their expiry, any rule name, the same answers as the per-process store)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import redis
from tests.budget_contract import BudgetStoreContract, bucket, usd

from headspace_inference.inference.budget_redis import RedisBudgetStore
from headspace_inference.inference.budget_store import (
    NANO,
    Bucket,
    BudgetStore,
    MemoryBudgetStore,
    Storm,
    Use,
)

pytestmark = pytest.mark.redis


@pytest.fixture
def clients(redis_server_url: str) -> Iterator[list[redis.Redis]]:
    """Clients made by a test, closed after it."""
    made: list[redis.Redis] = []
    yield made
    for client in made:
        client.close()


def redis_store(url: str, prefix: str, clients: list[redis.Redis]) -> RedisBudgetStore:
    """A store with a client of its own, as another process would have."""
    client = redis.Redis.from_url(url)
    clients.append(client)
    return RedisBudgetStore(client, prefix=prefix)


class TestRedisStore(BudgetStoreContract):
    @pytest.fixture
    def store(
        self, redis_server_url: str, redis_prefix: str, clients: list[redis.Redis]
    ) -> BudgetStore:
        return redis_store(redis_server_url, redis_prefix, clients)

    @pytest.fixture
    def twin(
        self, redis_server_url: str, redis_prefix: str, clients: list[redis.Redis]
    ) -> BudgetStore:
        return redis_store(redis_server_url, redis_prefix, clients)


def test_the_store_connects_on_first_use_and_leaves_its_client_to_its_owner(
    redis_server_url: str, redis_prefix: str, clients: list[redis.Redis]
) -> None:
    nowhere = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    RedisBudgetStore(nowhere, prefix=redis_prefix).close()  # no connection tried
    nowhere.close()
    store = redis_store(redis_server_url, redis_prefix, clients)
    store.close()
    assert clients[0].ping() is True


# --------------------------------------------------------------------------- keys and expiry

NOW = 1_800_000_000.0  # the callers' clock, years away from Redis's own: expiries are relative


def test_each_rule_window_is_one_hash_and_every_key_expires(
    redis_server_url: str, redis_prefix: str, clients: list[redis.Redis]
) -> None:
    store = redis_store(redis_server_url, redis_prefix, clients)
    direct = clients[0]
    day = Bucket("daily|day|1800000000", "", 10 * NANO, None, 8 * NANO, None, NOW + 86_400)
    project = Bucket("each|month|1800000000", "42", None, 1000, None, 800, NOW + 30 * 86_400)
    storm = Storm("summarise|42", calls=1, seconds=60, cooldown=300)
    assert store.reserve([day, project], NANO, 100, storm, NOW).granted
    assert store.reserve([day, project], NANO, 100, storm, NOW + 1).storm_tripped

    base = f"{redis_prefix}:budget"
    calls, cooling = f"{base}-storm:summarise|42", f"{base}-cooling:summarise|42"
    assert direct.hgetall(f"{base}:daily|day|1800000000") == {
        b"usd:": b"1000000000",
        b"tokens:": b"100",
    }
    assert direct.hgetall(f"{base}:each|month|1800000000") == {
        b"usd:42": b"1000000000",
        b"tokens:42": b"100",
    }
    assert direct.exists(cooling) and not direct.exists(calls)  # the trip cleared the calls
    # A window's hash lives until an hour after the window ends, reckoned from the caller's
    # now; the breaker's keys for the longer of its window and cool-down, and a second.
    # (The margins below are Redis's own clock moving between the write and the read.)
    assert (
        86_400_000 + 3_600_000 - 5000
        < direct.pttl(f"{base}:daily|day|1800000000")
        <= (86_400_000 + 3_600_000)
    )
    month_ms = (30 * 86_400 + 3600) * 1000
    assert month_ms - 5000 < direct.pttl(f"{base}:each|month|1800000000") <= month_ms
    assert 301_000 - 5000 < direct.pttl(cooling) <= 301_000

    fresh = Storm("score|", calls=5, seconds=600, cooldown=30)
    assert store.reserve([], 0, 0, fresh, NOW).granted
    assert 601_000 - 5000 < direct.pttl(f"{base}-storm:score|") <= 601_000


def test_a_window_already_past_its_slack_is_kept_a_second_not_forever(
    redis_server_url: str, redis_prefix: str, clients: list[redis.Redis]
) -> None:
    store = redis_store(redis_server_url, redis_prefix, clients)
    old = Bucket("late|hour|1", "", None, None, None, None, NOW - 2 * 3600)
    assert store.reserve([old], 5, 5, None, NOW).granted
    assert 0 < clients[0].pttl(f"{redis_prefix}:budget:late|hour|1") <= 1000


def test_a_correction_to_an_ended_window_no_longer_kept_adds_nothing(
    redis_server_url: str, redis_prefix: str, clients: list[redis.Redis]
) -> None:
    store = redis_store(redis_server_url, redis_prefix, clients)
    kept = bucket("kept|day|1", part="1", ends_at=NOW + 1)
    assert store.reserve([kept], usd(0.1), 10, None, NOW).granted
    later = NOW + 2  # the window has ended; its hash is kept for its slack
    gone = bucket("gone|day|1", part="1", ends_at=NOW + 1)  # expired, or never counted
    other_part = bucket("kept|day|1", part="2", ends_at=NOW + 1)
    assert store.adjust([gone, other_part, kept], usd(0.2), 5, later) == ()
    assert store.read("gone|day|1") == {}
    assert store.read("kept|day|1") == {"1": Use(usd(0.3), 15)}
    assert clients[0].keys(f"{redis_prefix}:budget:gone*") == []


# Rule names are printable and at most 64 characters; parts are project ids (any string).
ODD_NAMES = [
    "storm:summarise|42",  # the shape of a breaker's key
    "budget-storm:x",
    "a:b:c",
    "usd:tokens:alert:cap:",
    "spaces and {braces} and * and ?",
    "ünïcödé ✓",
    "x" * 64,
]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_any_rule_name_and_part_is_a_key_of_its_own(
    name: str, redis_server_url: str, redis_prefix: str, clients: list[redis.Redis]
) -> None:
    store = redis_store(redis_server_url, redis_prefix, clients)
    key = f"{name}|day|1800000000"
    parts = ["", "7", "usd:7", "alert:cap:", "ünï", name]
    for i, part in enumerate(parts):
        assert store.reserve([bucket(key, part)], i + 1, i + 10, None, NOW).granted
    # Breakers whose keys are spelled like the rule's window, or like its tail after a
    # ":", count calls, not money.
    for storm_key in {key, key.partition(":")[2]} - {""}:
        storm = Storm(storm_key, calls=1, seconds=60, cooldown=60)
        assert store.reserve([], 0, 0, storm, NOW).granted
        assert store.reserve([], 0, 0, storm, NOW).storm_tripped
    assert store.read(key) == {part: Use(i + 1, i + 10) for i, part in enumerate(parts)}
    assert store.read(f"{name}|day|1800003600") == {}


# --------------------------------------------------------------------------- exactness


def test_times_are_compared_exactly_not_to_lua_s_fourteen_digits(
    redis_server_url: str, redis_prefix: str, clients: list[redis.Redis]
) -> None:
    # Lua's tostring keeps 14 digits: 1800000000.1234567 would be kept as 1800000000.1235,
    # 33 µs later, and the first call would still be in the window 1 µs after it has left.
    first = 1_800_000_000.1234567
    storm = Storm("exact|", calls=1, seconds=10, cooldown=7.25)
    for store in (MemoryBudgetStore(), redis_store(redis_server_url, redis_prefix, clients)):
        assert store.reserve([], 0, 0, storm, first).granted
        assert store.reserve([], 0, 0, storm, first + 10 + 1e-6).granted, store.name
        tripped = store.reserve([], 0, 0, storm, first + 10 + 2e-6)
        assert tripped.storm_tripped and tripped.storm_left == 7.25
        left = store.reserve([], 0, 0, storm, first + 12.5)
        assert left.storm_left == (first + 10 + 2e-6 + 7.25) - (first + 12.5), store.name


def test_amounts_are_added_exactly_up_to_lua_s_integer_limit(
    redis_server_url: str, redis_prefix: str, clients: list[redis.Redis]
) -> None:
    store = redis_store(redis_server_url, redis_prefix, clients)
    huge = Bucket("huge|month|1", "", 2**52 + 1, 2**53 - 1, None, None, NOW + 3600)
    assert store.reserve([huge], 2**52, 2**53 - 2, None, NOW).granted
    assert store.reserve([huge], 1, 1, None, NOW).granted  # both caps reached exactly
    assert store.reserve([huge], 1, 0, None, NOW).refused == 0
    assert store.reserve([huge], 0, 1, None, NOW).refused == 0
    assert store.read(huge.key) == {"": Use(2**52 + 1, 2**53 - 1)}
    store.adjust([huge], -(2**52), -(2**53 - 3), NOW)
    assert store.read(huge.key) == {"": Use(1, 2)}


# --------------------------------------------------------------------------- one behaviour


def test_the_same_calls_get_the_same_answers_from_redis_as_from_memory(
    redis_server_url: str, redis_prefix: str, clients: list[redis.Redis]
) -> None:
    """A seeded run of mixed calls over rolling windows: every answer, alert and read the
    same from both stores."""
    rng = random.Random(22)
    # name: (cap_usd, cap_tokens, warn_at, window seconds); "each" counts per project.
    rules = {
        "all": (0.02, None, 0.8, 40),
        "each": (None, 2000, 0.5, 30),
        "both": (0.01, 2500, 0.9, 25),
        "open": (None, None, 0.8, 15),
    }
    storms = [Storm(f"{p}|{n}", calls=3, seconds=4.5, cooldown=2.25) for p in "ab" for n in "12"]
    memory = MemoryBudgetStore()
    shared = redis_store(redis_server_url, redis_prefix, clients)
    seen = {"granted": 0, "refused": 0, "tripped": 0, "cooling": 0, "alerts": 0}
    now = NOW + 0.123456
    for step in range(800):
        now += rng.choice([0.0, 0.01, 0.3, 1.7])
        buckets = []
        for name in rng.sample(sorted(rules), rng.randint(0, 3)):
            cap_usd, cap_tokens, warn_at, seconds = rules[name]
            start = now - (now - NOW) % seconds
            part = rng.choice(["1", "2", "3"]) if name == "each" else ""
            buckets.append(
                bucket(f"{name}|{seconds}|{start!r}", part, cap_usd=cap_usd,
                       cap_tokens=cap_tokens, warn_at=warn_at, ends_at=start + seconds)
            )  # fmt: skip
        if rng.random() < 0.3:
            delta_usd, delta_tokens = rng.randint(-usd(0.004), usd(0.002)), rng.randint(-300, 100)
            alerts = [s.adjust(buckets, delta_usd, delta_tokens, now) for s in (memory, shared)]
            assert alerts[0] == alerts[1], f"step {step}"
            seen["alerts"] += len(alerts[0])
        else:
            amount, tokens = rng.randint(0, usd(0.003)), rng.randint(0, 300)
            storm = rng.choice([None, *storms])
            answers = [s.reserve(buckets, amount, tokens, storm, now) for s in (memory, shared)]
            assert answers[0] == answers[1], f"step {step}"
            outcome = answers[0]
            seen["alerts"] += len(outcome.alerts)
            seen[
                "granted" if outcome.granted
                else "tripped" if outcome.storm_tripped
                else "cooling" if outcome.storm_left is not None
                else "refused"
            ] += 1  # fmt: skip
        for b in buckets:
            assert memory.read(b.key) == shared.read(b.key), f"step {step}"
    print(seen)
    assert min(seen.values()) >= 10  # every kind of answer was compared, many times
