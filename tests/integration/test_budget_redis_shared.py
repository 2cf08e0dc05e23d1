"""The Redis spend-guard store shared for real: 8 processes x 4 threads racing one small cap
(and one breaker), and a Redis cut and stalled under the store.

The racers are ``multiprocessing`` processes (fork), each with its own client and store, as
workers of one app would be; they meet at a barrier, reserve on the wall clock and report
what they were granted. Figures print with ``-s``.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from tests.tcp_proxy import TcpProxy

from headspace_inference.inference.budget_redis import RedisBudgetStore
from headspace_inference.inference.budget_store import Bucket, Storm, Use
from headspace_inference.inference.redis_support import redis_down

pytestmark = pytest.mark.redis

PROCESSES, THREADS, ATTEMPTS = 8, 4, 25  # 800 attempts
UNIT = 1_000_000  # a thousandth of a dollar, in nanodollars
CAP_USD = 100 * UNIT  # about 50 reservations of 1-3 units
CAP_TOKENS = 1000  # about 50 of 10-30 tokens


def _race(url: str, prefix: str, index: int, plan: dict[str, Any], start: Any, out: Any) -> None:
    """One process: THREADS threads each make ATTEMPTS reservations; puts one JSON report.

    ``plan["correct"]``: each granted reservation (the worst case) is corrected at once to a
    real figure no larger. ``plan["storm"]``: every call asks the breaker.
    """
    client = redis.Redis.from_url(url)
    store = RedisBudgetStore(client, prefix=prefix)
    buckets = [Bucket(**b) for b in plan["buckets"]]
    storm = Storm(**plan["storm"]) if plan["storm"] else None
    lock = threading.Lock()
    report: dict[str, Any] = {
        "granted": 0, "usd": 0, "tokens": 0, "refused": [0] * len(buckets),
        "passed_breaker": 0, "tripped": 0, "cooling": 0, "highest": [0, 0], "errors": [],
    }  # fmt: skip
    together = threading.Barrier(THREADS)

    def attempts(thread: int) -> None:
        rng = random.Random(f"{index}-{thread}")
        together.wait(timeout=60)
        for _ in range(ATTEMPTS):
            usd, tokens = rng.randint(1, 3) * UNIT + rng.randint(0, 999), rng.randint(10, 30)
            answer = store.reserve(buckets, usd, tokens, storm, time.time())
            if answer.granted and plan["correct"]:
                real_usd, real_tokens = rng.randint(0, usd), rng.randint(0, tokens)
                store.adjust(buckets, real_usd - usd, real_tokens - tokens, time.time())
                usd, tokens = real_usd, real_tokens
            with lock:
                if answer.storm_left is None:
                    report["passed_breaker"] += 1
                report["tripped"] += answer.storm_tripped
                report["cooling"] += answer.storm_left is not None and not answer.storm_tripped
                if answer.refused is not None:
                    report["refused"][answer.refused] += 1
                if answer.granted:
                    report["granted"] += 1
                    report["usd"] += usd
                    report["tokens"] += tokens
                    # Each grant reports the use just after its own addition (one script).
                    report["highest"][0] = max(report["highest"][0], answer.uses[0].usd)
                    report["highest"][1] = max(report["highest"][1], answer.uses[1].tokens)

    def run(thread: int) -> None:
        try:
            attempts(thread)
        except Exception as exc:  # reported, so the test fails with it
            with lock:
                report["errors"].append(repr(exc))

    start.wait(timeout=60)
    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    out.put(json.dumps(report))


def race(url: str, prefix: str, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs PROCESSES racers to the end; their reports."""
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Barrier(PROCESSES), ctx.Queue()
    processes = [
        ctx.Process(target=_race, args=(url, prefix, i, plan, start, out), daemon=True)
        for i in range(PROCESSES)
    ]
    for p in processes:
        p.start()
    try:
        reports = [json.loads(out.get(timeout=120)) for _ in processes]
    finally:
        for p in processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    for report in reports:
        assert report["errors"] == []
    return reports


def the_buckets(now: float) -> tuple[Bucket, Bucket]:
    """One cap in USD over everything, one in tokens over project 7 apart."""
    ends_at = now + 3600
    return (
        Bucket("all|hour|1", "", CAP_USD, None, CAP_USD * 8 // 10, None, ends_at),
        Bucket("each|hour|1", "7", None, CAP_TOKENS, None, CAP_TOKENS * 8 // 10, ends_at),
    )


def plan_of(buckets: tuple[Bucket, ...], *, correct: bool, storm: Storm | None) -> dict[str, Any]:
    return {
        "buckets": [dataclasses.asdict(b) for b in buckets],
        "correct": correct,
        "storm": None if storm is None else dataclasses.asdict(storm),
    }


def totals(reports: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "granted": sum(r["granted"] for r in reports),
        "usd": sum(r["usd"] for r in reports),
        "tokens": sum(r["tokens"] for r in reports),
        "refused": [sum(r["refused"][i] for r in reports) for i in range(2)],
        "passed_breaker": sum(r["passed_breaker"] for r in reports),
        "tripped": sum(r["tripped"] for r in reports),
        "cooling": sum(r["cooling"] for r in reports),
        "highest": [max(r["highest"][i] for r in reports) for i in range(2)],
    }


@pytest.mark.parametrize("correct", [False, True], ids=["reserved", "corrected"])
def test_processes_and_threads_racing_one_small_cap_never_cross_it(
    correct: bool, redis_server_url: str, redis_prefix: str
) -> None:
    every, project = the_buckets(time.time())
    reports = race(
        redis_server_url, redis_prefix, plan_of((every, project), correct=correct, storm=None)
    )
    sums = totals(reports)
    print(f"\n{'corrected' if correct else 'reserved'}: {sums}")
    attempts = PROCESSES * THREADS * ATTEMPTS
    assert sums["granted"] + sum(sums["refused"]) == attempts
    assert sums["granted"] >= 30 and sum(sums["refused"]) >= 600  # the caps were met
    # No grant ever saw a use beyond a cap, and the store holds exactly what was granted
    # (corrected: the real figures).
    assert sums["highest"][0] <= CAP_USD and sums["highest"][1] <= CAP_TOKENS
    assert sums["usd"] <= CAP_USD and sums["tokens"] <= CAP_TOKENS
    client = redis.Redis.from_url(redis_server_url)
    try:
        store = RedisBudgetStore(client, prefix=redis_prefix)
        assert store.read(every.key) == {"": Use(sums["usd"], sums["tokens"])}
        assert store.read(project.key) == {"7": Use(sums["usd"], sums["tokens"])}
    finally:
        client.close()


def test_processes_racing_one_breaker_pass_exactly_its_calls(
    redis_server_url: str, redis_prefix: str
) -> None:
    storm = Storm("summarise|7", calls=100, seconds=3600, cooldown=3600)
    unlimited = Bucket("open|hour|1", "", None, None, None, None, time.time() + 3600)
    plan = plan_of((unlimited, unlimited), correct=False, storm=storm)
    sums = totals(race(redis_server_url, redis_prefix, plan))
    print(f"\nbreaker: {sums}")
    assert sums["passed_breaker"] == sums["granted"] == 100
    assert sums["tripped"] == 1
    assert sums["cooling"] == PROCESSES * THREADS * ATTEMPTS - 101


# --------------------------------------------------------------------------- Redis away


@pytest.fixture
def proxy(redis_server_url: str) -> Iterator[TcpProxy]:
    target = redis.connection.parse_url(redis_server_url)
    with TcpProxy(target.get("host", "127.0.0.1"), int(target.get("port", 6379))) as p:
        yield p


@pytest.fixture
def proxied(proxy: TcpProxy, redis_server_url: str) -> Iterator[redis.Redis]:
    """A client reaching Redis through the proxy, with short timeouts (as make_client's)."""
    db = redis.connection.parse_url(redis_server_url).get("db", 0)
    client = redis.Redis.from_url(
        proxy.url("redis", f"/{db}"), socket_timeout=0.3, socket_connect_timeout=0.3
    )
    yield client
    client.close()


def test_a_cut_redis_raises_what_the_fallback_catches_and_the_store_works_again(
    proxy: TcpProxy, proxied: redis.Redis, redis_prefix: str
) -> None:
    store = RedisBudgetStore(proxied, prefix=redis_prefix)
    cap, now = the_buckets(time.time())[0], time.time()
    assert store.reserve([cap], UNIT, 1, None, now).granted

    proxy.cut()
    for operation in (
        lambda: store.reserve([cap], UNIT, 1, None, now),
        lambda: store.adjust([cap], -UNIT, 0, now),
        lambda: store.read(cap.key),
    ):
        with pytest.raises(redis.ConnectionError) as raised:
            operation()
        assert isinstance(raised.value, redis_down())  # what RedisGuard falls back on

    proxy.restore()
    assert store.reserve([cap], 2 * UNIT, 2, None, now).uses == (Use(3 * UNIT, 3),)
    assert store.read(cap.key) == {"": Use(3 * UNIT, 3)}


def test_a_stalled_redis_times_out_and_a_reservation_it_then_runs_stays_counted(
    proxy: TcpProxy, proxied: redis.Redis, redis_server_url: str, redis_prefix: str
) -> None:
    """A timeout does not say the script did not run: a request held up on the way (here,
    in the stalled proxy) runs when it arrives, and the reservation its caller was told
    failed stays counted until its window ends. So the guard errs towards counting a
    call's spend twice (the fallback counts it too), never towards missing it."""
    store = RedisBudgetStore(proxied, prefix=redis_prefix)
    cap, now = the_buckets(time.time())[0], time.time()
    assert store.reserve([cap], UNIT, 1, None, now).granted

    proxy.stall()
    with pytest.raises(redis.TimeoutError) as raised:
        store.reserve([cap], 2 * UNIT, 2, None, now)
    assert isinstance(raised.value, redis_down())
    proxy.resume()

    direct = redis.Redis.from_url(redis_server_url)
    try:
        seen = RedisBudgetStore(direct, prefix=redis_prefix)
        deadline = time.monotonic() + 10
        while seen.read(cap.key) != {"": Use(3 * UNIT, 3)} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen.read(cap.key) == {"": Use(3 * UNIT, 3)}
    finally:
        direct.close()
    assert store.reserve([cap], UNIT, 1, None, now).uses == (Use(4 * UNIT, 4),)
