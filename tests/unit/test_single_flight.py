"""Single-flight: identical requests in flight share one call, among threads (SingleFlight),
among processes on one Redis (RedisSingleFlight), and both at once (TieredFlight, what the
service calls). Every outcome says whether its caller led (made the call).

Ordering is arranged with events, and "every thread is now inside single-flight" is observed
from the threads' own stacks, so nothing here depends on how fast threads happen to run.
The only real time is a Redis lock's life (0.5 s) in the tests about lock renewal.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from headspace_inference.clock import FakeClock
from headspace_inference.inference.redis_support import RedisGuard
from headspace_inference.inference.singleflight import (
    FlightOutcome,
    RedisSingleFlight,
    SingleFlight,
    TieredFlight,
)
from headspace_inference.settings import RedisSettings

THREADS = 50
DEADLINE = 10.0


def inside_single_flight(thread: threading.Thread) -> bool:
    """Whether ``thread`` has joined a flight for good: waiting in ``SingleFlight.run`` as a
    follower (or as the leader, inside its call), or inside ``RedisSingleFlight.run``
    (leading or polling). Merely having entered ``run`` is not enough: a thread about to
    register could still find the flight over and start another."""
    frame = sys._current_frames().get(thread.ident or -1)
    top = frame.f_code.co_name if frame is not None else None
    kinds: set[type] = set()
    while frame is not None:
        if frame.f_code.co_name == "run" and frame.f_code.co_filename.endswith("singleflight.py"):
            kinds.add(type(frame.f_locals.get("self")))
        frame = frame.f_back
    return RedisSingleFlight in kinds or (SingleFlight in kinds and top == "wait")


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.005)


class Crowd:
    """Threads that each call ``target`` once and keep what it returned or raised."""

    def __init__(self, n: int, target: Callable[[], Any]) -> None:
        self.results: list[Any] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._target = target
        self.threads = [threading.Thread(target=self._run) for _ in range(n)]

    def _run(self) -> None:
        try:
            result = self._target()
        except BaseException as exc:
            with self._lock:
                self.errors.append(exc)
        else:
            with self._lock:
                self.results.append(result)

    def start(self) -> Crowd:
        for t in self.threads:
            t.start()
        return self

    def all_inside(self) -> None:
        wait_until(
            lambda: all(inside_single_flight(t) for t in self.threads),
            "every thread to be inside single-flight",
        )

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=DEADLINE)
        assert not any(t.is_alive() for t in self.threads)


def no_load() -> None:
    return None


# --------------------------------------------------------------------------- one process


def test_fifty_threads_on_one_key_make_one_call_and_all_get_its_result() -> None:
    flight = SingleFlight()
    release = threading.Event()
    calls: list[int] = []
    result = {"text": "the one answer"}

    def fn() -> dict[str, str]:
        calls.append(1)
        release.wait(DEADLINE)
        return result

    crowd = Crowd(THREADS, lambda: flight.run("key", fn, no_load)).start()
    crowd.all_inside()  # the leader inside fn, the 49 others waiting for it
    assert flight.in_flight() == 1
    release.set()
    crowd.join()

    assert calls == [1]
    assert crowd.errors == []
    outcomes: list[FlightOutcome[dict[str, str]]] = crowd.results
    assert len(outcomes) == THREADS
    assert all(o.value is result and o.error is None for o in outcomes)
    assert sum(o.led for o in outcomes) == 1  # exactly one caller made the call
    assert flight.in_flight() == 0


def test_the_leaders_exception_reaches_every_waiter() -> None:
    flight = SingleFlight()
    release = threading.Event()
    calls: list[int] = []
    failure = RuntimeError("upstream said no")

    def fn() -> str:
        calls.append(1)
        release.wait(DEADLINE)
        raise failure

    crowd = Crowd(THREADS, lambda: flight.run("key", fn, no_load)).start()
    crowd.all_inside()
    release.set()
    crowd.join()

    assert calls == [1]
    assert crowd.errors == []  # run() carries the exception, it does not raise it
    outcomes: list[FlightOutcome[str]] = crowd.results
    assert all(o.error is failure and o.value is None for o in outcomes)
    assert sum(o.led for o in outcomes) == 1  # the leader's attempts count, nobody else's
    with pytest.raises(RuntimeError, match="upstream said no"):
        outcomes[0].result()
    assert flight.in_flight() == 0


def test_different_keys_do_not_wait_for_each_other() -> None:
    flight = SingleFlight()
    release_a = threading.Event()
    crowd_a = Crowd(
        3, lambda: flight.run("a", lambda: release_a.wait(DEADLINE) and "A", no_load)
    ).start()
    crowd_a.all_inside()

    # Key b is fetched, and answered, while key a is still in flight.
    assert flight.run("b", lambda: "B", no_load) == FlightOutcome(True, "B")
    assert flight.in_flight() == 1

    release_a.set()
    crowd_a.join()
    assert sorted((o.value, o.led) for o in crowd_a.results) == [
        ("A", False),
        ("A", False),
        ("A", True),
    ]
    assert flight.in_flight() == 0


def test_nothing_is_kept_after_a_flight_lands() -> None:
    flight = SingleFlight()
    answers = iter(["first", "second"])
    assert flight.run("key", lambda: next(answers), no_load) == FlightOutcome(True, "first")
    assert flight.in_flight() == 0
    # A later call is a new flight, not a cached answer.
    assert flight.run("key", lambda: next(answers), no_load) == FlightOutcome(True, "second")

    def boom() -> str:
        raise ValueError("boom")

    failed = flight.run("key", boom, no_load)
    assert failed.led and isinstance(failed.error, ValueError)
    assert flight.in_flight() == 0
    assert flight.run("key", lambda: "after", no_load) == FlightOutcome(True, "after")
    assert flight.health() is None


def test_a_leader_takes_an_answer_that_landed_since_its_caller_looked() -> None:
    flight = SingleFlight()
    calls: list[int] = []
    outcome = flight.run("key", lambda: calls.append(1) or "made", lambda: "landed")
    assert outcome == FlightOutcome(False, "landed")  # nobody made a call
    assert calls == []


def test_an_exception_that_is_not_an_exception_is_raised_in_every_caller() -> None:
    flight = SingleFlight()
    release = threading.Event()

    def interrupted() -> str:
        release.wait(DEADLINE)
        raise KeyboardInterrupt

    crowd = Crowd(3, lambda: flight.run("key", interrupted, no_load)).start()
    crowd.all_inside()
    release.set()
    crowd.join()
    assert len(crowd.errors) == 3
    assert all(isinstance(e, KeyboardInterrupt) for e in crowd.errors)
    assert flight.in_flight() == 0


# --------------------------------------------------------------------------- across processes


class RedisSide:
    """One "process": its own connection, guard and flights, the shared prefix. ``load`` and
    ``publish`` stand for the shared cache."""

    def __init__(self, url: str, prefix: str, lock_seconds: float) -> None:
        self.client = redis.Redis.from_url(url)
        self.guard = RedisGuard(self.client, RedisSettings(url=url, key_prefix=prefix))
        self.flight = RedisSingleFlight(
            self.client, self.guard, prefix=prefix, lock_seconds=lock_seconds, poll_seconds=0.01
        )
        self.tiered = TieredFlight(SingleFlight(), self.flight)
        self.result_key = f"{prefix}:test-result"
        self.polls = 0

    def load(self) -> str | None:
        self.polls += 1
        raw = self.client.get(self.result_key)
        return None if raw is None else raw.decode()

    def publish(self, value: str) -> None:
        self.client.set(self.result_key, value, px=60_000)

    def close(self) -> None:
        self.tiered.close()
        self.client.close()


@pytest.fixture
def sides(redis_server_url: str, redis_prefix: str) -> Iterator[Callable[..., RedisSide]]:
    made: list[RedisSide] = []

    def make(lock_seconds: float = 5.0) -> RedisSide:
        made.append(RedisSide(redis_server_url, redis_prefix, lock_seconds))
        return made[-1]

    yield make
    for side in made:
        side.close()


def run_in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(target())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_a_second_process_waits_for_the_first_and_gets_its_answer(
    sides: Callable[..., RedisSide],
) -> None:
    a, b = sides(), sides()
    a_running = threading.Event()
    b_calls: list[int] = []

    def fn_a() -> str:
        a_running.set()
        wait_until(lambda: b.polls > 0, "b to look for the answer")
        a.publish("answer from a")  # the shared cache put, in the real service
        return "answer from a"

    def fn_b() -> str:
        b_calls.append(1)
        return "answer from b"

    thread_a, out_a = run_in_thread(lambda: a.flight.run("req", fn_a, a.load))
    assert a_running.wait(DEADLINE)
    assert b.flight.run("req", fn_b, b.load) == FlightOutcome(False, "answer from a")
    thread_a.join(DEADLINE)
    assert out_a == [FlightOutcome(True, "answer from a")]
    assert b_calls == []
    # The holder released its lock, and its keeper has nothing left to do.
    assert a.client.exists(a.flight.lock_name("req")) == 0
    assert a.flight.keeper.pending_releases() == 0


def test_a_waiter_takes_over_when_the_holder_is_gone_without_an_answer(
    sides: Callable[..., RedisSide],
) -> None:
    b = sides(lock_seconds=0.5)
    # A holder that died (killed with its keeper) without an answer: its lock, unrenewed.
    assert b.client.set(b.flight.lock_name("req"), "dead holder", nx=True, px=500)
    b_calls: list[int] = []

    def fn_b() -> str:
        b_calls.append(1)
        return "answer from b"

    assert b.flight.run("req", fn_b, b.load) == FlightOutcome(True, "answer from b")
    assert b_calls == [1]
    assert b.polls > 0  # it did wait for the holder first


class LapsingClock(FakeClock):
    """A fake clock on which a lock lapses after ``polls`` sleeps: time on it moves only
    when the waiter sleeps, and the lock's key goes when it has slept that often."""

    def __init__(self, client: redis.Redis, lock: str, polls: int) -> None:
        super().__init__()
        self._client, self._lock_name, self._polls = client, lock, polls

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        if len(self.sleeps) == self._polls:
            self._client.delete(self._lock_name)


def test_a_waiter_polls_on_its_clock_until_the_lock_goes_then_leads(
    redis_server_url: str, redis_prefix: str
) -> None:
    """How long a waiter waits between looks is decided on the injected clock; the lock
    itself is redis-py's, living on Redis's clock, so here it "lapses" on the third sleep."""
    client = redis.Redis.from_url(redis_server_url)
    try:
        guard = RedisGuard(client, RedisSettings(url=redis_server_url, key_prefix=redis_prefix))
        name = f"{redis_prefix}:flight:req"
        clock = LapsingClock(client, name, polls=3)
        flight = RedisSingleFlight(
            client, guard, prefix=redis_prefix, poll_seconds=0.25, clock=clock
        )
        assert flight.lock_name("req") == name
        assert client.set(name, "a holder that is gone", px=60_000)
        assert flight.run("req", lambda: "made", no_load) == FlightOutcome(True, "made")
        assert clock.sleeps == [0.25, 0.25, 0.25]
        assert client.exists(name) == 0  # its own lock, released
        flight.close()
    finally:
        client.close()


def test_a_holder_whose_lock_lapsed_leaves_the_next_holder_s_lock_alone(
    sides: Callable[..., RedisSide],
) -> None:
    """A holder that stopped renewing (as one cut off from Redis does) loses its lock after
    one lock life; another process takes over, and the first one's release, checked against
    its own token, does not remove the lock the second now holds."""
    a, b = sides(lock_seconds=0.5), sides(lock_seconds=0.5)
    a.flight.keeper.close()  # a renews nothing from now on
    a_running, b_running, release_b = threading.Event(), threading.Event(), threading.Event()

    def fn_a() -> str:
        a_running.set()
        assert b_running.wait(DEADLINE)  # b led once a's lock had lapsed
        return "from a"

    def fn_b() -> str:
        b_running.set()
        release_b.wait(DEADLINE)
        return "from b"

    thread_a, out_a = run_in_thread(lambda: a.flight.run("req", fn_a, a.load))
    assert a_running.wait(DEADLINE)
    thread_b, out_b = run_in_thread(lambda: b.flight.run("req", fn_b, b.load))
    thread_a.join(DEADLINE)
    assert out_a == [FlightOutcome(True, "from a")]
    lock = b.flight.lock_name("req")
    assert b.client.exists(lock) == 1  # b's, still there after a's release
    release_b.set()
    thread_b.join(DEADLINE)
    assert out_b == [FlightOutcome(True, "from b")]
    assert b.client.exists(lock) == 0
    assert b.flight.keeper.lost == 0


def test_a_holder_slower_than_its_lock_s_life_keeps_it(sides: Callable[..., RedisSide]) -> None:
    """Suspected: a Redis lock lapsing under a very slow holder with many retries, so that
    a second process made the same call. The keeper renews it while the call runs."""
    a, b = sides(lock_seconds=0.5), sides(lock_seconds=0.5)
    a_running = threading.Event()
    b_calls: list[int] = []
    polls_for_three_lives = 3 * 0.5 / 0.01  # b polls every 10 ms, at least

    def slow_a() -> str:
        a_running.set()
        # Outlive the lock three times over, by b's own count of its polls.
        wait_until(lambda: b.polls >= polls_for_three_lives, "b to poll for three lock lives")
        a.publish("slow answer from a")
        return "slow answer from a"

    def fn_b() -> str:
        b_calls.append(1)
        return "answer from b"

    thread_a, out_a = run_in_thread(lambda: a.flight.run("req", slow_a, a.load))
    assert a_running.wait(DEADLINE)
    assert b.flight.run("req", fn_b, b.load) == FlightOutcome(False, "slow answer from a")
    thread_a.join(DEADLINE)
    assert out_a == [FlightOutcome(True, "slow answer from a")]
    assert b_calls == []
    assert a.flight.keeper.renewals >= 1
    assert a.flight.keeper.lost == 0


def test_a_lock_taken_after_the_holder_landed_takes_its_answer(
    sides: Callable[..., RedisSide],
) -> None:
    """Between a caller's cache lookup and its lock, the previous holder may publish and
    release: the new holder finds the answer and makes no second call."""
    a, b = sides(), sides()
    assert a.flight.run("req", lambda: a.publish("from a") or "from a", a.load).led
    b_calls: list[int] = []
    outcome = b.flight.run("req", lambda: b_calls.append(1) or "from b", b.load)
    assert outcome == FlightOutcome(False, "from a")
    assert b_calls == []
    assert b.client.exists(b.flight.lock_name("req")) == 0


def test_one_keeper_thread_renews_every_lock_of_a_process(sides: Callable[..., RedisSide]) -> None:
    a = sides(lock_seconds=0.5)
    release = threading.Event()
    keys = [f"req-{n}" for n in range(10)]

    def keepers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "single-flight-keeper"]

    threads = [
        run_in_thread(lambda k=k: a.tiered.run(k, lambda: release.wait(DEADLINE), a.load))
        for k in keys
    ]
    wait_until(lambda: a.flight.keeper.renewals >= 2, "two rounds of renewals")
    assert len(keepers()) == 1
    assert all(a.client.exists(a.flight.lock_name(k)) for k in keys)
    release.set()
    for thread, out in threads:
        thread.join(DEADLINE)
        assert out == [FlightOutcome(True, True)]
    assert not any(a.client.exists(a.flight.lock_name(k)) for k in keys)
    # Nothing held, nothing to retry: the keeper ends (a forked or idle process runs none).
    wait_until(lambda: not keepers(), "the keeper to end")


def test_different_keys_across_processes_are_independent(
    sides: Callable[..., RedisSide],
) -> None:
    a, b = sides(), sides()
    a_running, release = threading.Event(), threading.Event()

    def fn_a() -> str:
        a_running.set()
        release.wait(DEADLINE)
        return "x"

    thread_a, out_a = run_in_thread(lambda: a.flight.run("x", fn_a, a.load))
    assert a_running.wait(DEADLINE)
    try:
        assert b.flight.run("y", lambda: "y", b.load) == FlightOutcome(True, "y")
    finally:
        release.set()
        thread_a.join(DEADLINE)
    assert out_a == [FlightOutcome(True, "x")]


# --------------------------------------------------------------------------- both at once


def test_fifty_threads_in_two_processes_make_one_call_and_exactly_one_leads(
    sides: Callable[..., RedisSide],
) -> None:
    """TieredFlight: 25 threads in each of two processes ask the same key. One call is made;
    its caller alone has ``led``; in-process followers share their leader's outcome, and the
    other process's leader takes the published answer (and does not lead either)."""
    a, b = sides(), sides()
    release = threading.Event()
    calls: list[str] = []

    def call_for(side: RedisSide, name: str) -> Callable[[], str]:
        def call() -> str:
            calls.append(name)
            release.wait(DEADLINE)
            side.publish(f"answer from {name}")
            return f"answer from {name}"

        return call

    crowds = [
        Crowd(THREADS // 2, lambda s=s, n=n: s.tiered.run("k", call_for(s, n), s.load))
        for s, n in ((a, "a"), (b, "b"))
    ]
    for crowd in crowds:
        crowd.start()
    for crowd in crowds:
        crowd.all_inside()
    wait_until(lambda: len(calls) == 1, "one side to make the call")
    release.set()
    for crowd in crowds:
        crowd.join()

    assert len(calls) == 1
    outcomes: list[FlightOutcome[str]] = [o for c in crowds for o in c.results]
    assert len(outcomes) == THREADS
    assert {o.value for o in outcomes} == {f"answer from {calls[0]}"}
    assert sum(o.led for o in outcomes) == 1
    assert a.tiered.in_flight() == b.tiered.in_flight() == 0


def test_in_process_followers_share_the_leader_s_exception_and_never_lead(
    sides: Callable[..., RedisSide],
) -> None:
    a = sides()
    release = threading.Event()
    failure = RuntimeError("upstream said no")

    def fail() -> str:
        release.wait(DEADLINE)
        raise failure

    crowd = Crowd(5, lambda: a.tiered.run("k", fail, a.load)).start()
    crowd.all_inside()
    release.set()
    crowd.join()
    outcomes: list[FlightOutcome[str]] = crowd.results
    assert all(o.error is failure for o in outcomes)
    assert sum(o.led for o in outcomes) == 1
    assert a.client.exists(a.flight.lock_name("k")) == 0
