"""Single-flight: identical requests in flight share one call, among threads (SingleFlight)
and among processes on one Redis (RedisSingleFlight).

Ordering is arranged with events, and "every thread is now waiting" is observed from the
threads' own stacks, so nothing here depends on how fast threads happen to run.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from claude_headspace.config import RedisSettings
from claude_headspace.inference.redis_support import RedisGuard
from claude_headspace.inference.singleflight import RedisSingleFlight, SingleFlight

THREADS = 50
DEADLINE = 10.0


def blocked_in_single_flight(thread: threading.Thread) -> bool:
    """Whether ``thread`` is inside a single-flight ``do`` and blocked on a threading wait."""
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None or frame.f_code.co_name != "wait":
        return False
    while frame is not None:
        if frame.f_code.co_name == "do" and frame.f_code.co_filename.endswith("singleflight.py"):
            return True
        frame = frame.f_back
    return False


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

    def all_waiting(self) -> None:
        wait_until(
            lambda: all(blocked_in_single_flight(t) for t in self.threads),
            "every thread to wait in single-flight",
        )

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=DEADLINE)
        assert not any(t.is_alive() for t in self.threads)


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

    crowd = Crowd(THREADS, lambda: flight.do("key", fn)).start()
    crowd.all_waiting()  # the leader inside fn, the 49 others waiting for it
    assert flight.in_flight() == 1
    release.set()
    crowd.join()

    assert calls == [1]
    assert crowd.errors == []
    assert len(crowd.results) == THREADS
    assert all(value is result for value, _ in crowd.results)
    shared_flags = sorted(shared for _, shared in crowd.results)
    assert shared_flags == [False] + [True] * (THREADS - 1)
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

    crowd = Crowd(THREADS, lambda: flight.do("key", fn)).start()
    crowd.all_waiting()
    release.set()
    crowd.join()

    assert calls == [1]
    assert crowd.results == []
    assert len(crowd.errors) == THREADS
    assert all(error is failure for error in crowd.errors)
    assert flight.in_flight() == 0


def test_different_keys_do_not_wait_for_each_other() -> None:
    flight = SingleFlight()
    release_a = threading.Event()
    crowd_a = Crowd(3, lambda: flight.do("a", lambda: release_a.wait(DEADLINE) and "A")).start()
    crowd_a.all_waiting()

    # Key b is fetched, and answered, while key a is still in flight.
    assert flight.do("b", lambda: "B") == ("B", False)
    assert flight.in_flight() == 1

    release_a.set()
    crowd_a.join()
    assert sorted(crowd_a.results) == [("A", False), ("A", True), ("A", True)]
    assert flight.in_flight() == 0


def test_nothing_is_kept_after_a_flight_lands() -> None:
    flight = SingleFlight()
    answers = iter(["first", "second"])
    assert flight.do("key", lambda: next(answers)) == ("first", False)
    assert flight.in_flight() == 0
    # A later call is a new flight, not a cached answer.
    assert flight.do("key", lambda: next(answers)) == ("second", False)

    def boom() -> str:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        flight.do("key", boom)
    assert flight.in_flight() == 0
    assert flight.do("key", lambda: "after") == ("after", False)


# --------------------------------------------------------------------------- across processes


class RedisSide:
    """One "process": its own connection, guard and RedisSingleFlight, the shared prefix."""

    def __init__(self, url: str, prefix: str, lock_seconds: float) -> None:
        self.client = redis.Redis.from_url(url)
        guard = RedisGuard(
            self.client, RedisSettings(url=url, key_prefix=prefix), name="single-flight"
        )
        self.flight = RedisSingleFlight(
            self.client, guard, prefix=prefix, lock_seconds=lock_seconds, poll_seconds=0.01
        )
        self.result_key = f"{prefix}:test-result"
        self.lock_key = f"{prefix}:flight:"  # + request key, as RedisSingleFlight names it

    def load(self) -> str | None:
        raw = self.client.get(self.result_key)
        return None if raw is None else raw.decode()

    def publish(self, value: str) -> None:
        self.client.set(self.result_key, value, px=60_000)


@pytest.fixture
def two_sides(redis_server_url: str, redis_prefix: str) -> Iterator[Callable[..., RedisSide]]:
    made: list[RedisSide] = []

    def make(lock_seconds: float = 5.0) -> RedisSide:
        made.append(RedisSide(redis_server_url, redis_prefix, lock_seconds))
        return made[-1]

    yield make
    for side in made:
        side.client.close()


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
    two_sides: Callable[..., RedisSide],
) -> None:
    a, b = two_sides(), two_sides()
    a_running = threading.Event()
    b_polled = threading.Event()
    b_calls: list[int] = []

    def fn_a() -> str:
        a_running.set()
        assert b_polled.wait(DEADLINE), "b never looked for the answer"
        a.publish("answer from a")  # the shared cache put, in the real service
        return "answer from a"

    def load_b() -> str | None:
        b_polled.set()
        return b.load()

    def fn_b() -> str:
        b_calls.append(1)
        return "answer from b"

    thread_a, out_a = run_in_thread(lambda: a.flight.do("req", fn_a, a.load))
    assert a_running.wait(DEADLINE)
    assert b.flight.do("req", fn_b, load_b) == ("answer from a", True)
    thread_a.join(DEADLINE)
    assert out_a == [("answer from a", False)]
    assert b_calls == []
    # The holder released its lock.
    assert a.client.exists(a.lock_key + "req") == 0


def test_a_waiter_takes_over_when_the_holders_lock_lapses_unpublished(
    two_sides: Callable[..., RedisSide],
) -> None:
    a, b = two_sides(lock_seconds=0.3), two_sides(lock_seconds=0.3)
    a_running = threading.Event()
    b_done = threading.Event()
    b_calls: list[int] = []

    def fn_a() -> str:
        # A holder that hangs (or crashed) and never publishes its answer.
        a_running.set()
        b_done.wait(DEADLINE)
        return "late answer from a"

    def fn_b() -> str:
        b_calls.append(1)
        return "answer from b"

    thread_a, out_a = run_in_thread(lambda: a.flight.do("req", fn_a, a.load))
    assert a_running.wait(DEADLINE)
    try:
        assert b.flight.do("req", fn_b, b.load) == ("answer from b", False)
    finally:
        b_done.set()
        thread_a.join(DEADLINE)
    assert b_calls == [1]
    assert out_a == [("late answer from a", False)]


def test_different_keys_across_processes_are_independent(
    two_sides: Callable[..., RedisSide],
) -> None:
    a, b = two_sides(), two_sides()
    a_running, release = threading.Event(), threading.Event()

    def fn_a() -> str:
        a_running.set()
        release.wait(DEADLINE)
        return "x"

    thread_a, out_a = run_in_thread(lambda: a.flight.do("x", fn_a, a.load))
    assert a_running.wait(DEADLINE)
    try:
        assert b.flight.do("y", lambda: "y", b.load) == ("y", False)
    finally:
        release.set()
        thread_a.join(DEADLINE)
    assert out_a == [("x", False)]
