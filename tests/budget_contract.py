"""The one contract every spend-guard store keeps (inference/budget_store.py).

A store's tests subclass ``BudgetStoreContract`` and define two fixtures: ``store``, a fresh
store, and ``twin``, a second store sharing its state the way another process would (the
same Redis prefix, the same database; for the per-process store, the store itself)::

    class TestRedisStore(BudgetStoreContract):
        @pytest.fixture
        def store(self, ...) -> BudgetStore: ...
        @pytest.fixture
        def twin(self, store, ...) -> BudgetStore: ...

``STORM_SHARED`` says whether the twin shares the storm breaker (False for a store that keeps
the breaker per process).
"""

from __future__ import annotations

import pytest

from headspace_inference.inference.budget_store import (
    NANO,
    Bucket,
    BudgetStore,
    Storm,
    Use,
)

NOW = 1_800_000_000.0
END = NOW + 3600


def bucket(
    key: str = "rule|hour|1800000000",
    part: str = "",
    *,
    cap_usd: float | None = 1.0,
    cap_tokens: int | None = None,
    warn_at: float = 0.8,
    ends_at: float = END,
) -> Bucket:
    usd = None if cap_usd is None else round(cap_usd * NANO)
    return Bucket(
        key,
        part,
        cap_usd=usd,
        cap_tokens=cap_tokens,
        warn_usd=None if usd is None else int(usd * warn_at),
        warn_tokens=None if cap_tokens is None else int(cap_tokens * warn_at),
        ends_at=ends_at,
    )


def usd(amount: float) -> int:
    return round(amount * NANO)


class BudgetStoreContract:
    STORM_SHARED = True

    def test_a_reservation_within_every_cap_is_added_to_every_bucket(
        self, store: BudgetStore
    ) -> None:
        a, b = bucket("a|day|1"), bucket("b|day|1", cap_usd=None, cap_tokens=1000)
        done = store.reserve([a, b], usd(0.25), 100, None, NOW)
        assert done.granted and done.refused is None
        assert done.uses == (Use(usd(0.25), 100), Use(usd(0.25), 100))
        assert store.read("a|day|1") == {"": Use(usd(0.25), 100)}

    def test_a_reservation_that_would_cross_one_cap_adds_to_none(self, store: BudgetStore) -> None:
        roomy, tight = bucket("roomy|day|1", cap_usd=10.0), bucket("tight|day|1", cap_usd=0.5)
        assert store.reserve([roomy, tight], usd(0.4), 10, None, NOW).granted
        refused = store.reserve([roomy, tight], usd(0.2), 10, None, NOW)
        assert not refused.granted and refused.refused == 1
        assert refused.uses == (Use(usd(0.4), 10), Use(usd(0.4), 10))  # as found
        assert store.read("roomy|day|1") == {"": Use(usd(0.4), 10)}
        assert store.read("tight|day|1") == {"": Use(usd(0.4), 10)}

    def test_use_may_reach_a_cap_exactly_but_never_pass_it(self, store: BudgetStore) -> None:
        cap = bucket(cap_usd=1.0)
        assert store.reserve([cap], usd(0.6), 0, None, NOW).granted
        assert store.reserve([cap], usd(0.4), 0, None, NOW).granted
        assert not store.reserve([cap], 1, 0, None, NOW).granted
        assert store.read(cap.key) == {"": Use(usd(1.0), 0)}

    def test_a_token_cap_refuses_by_tokens(self, store: BudgetStore) -> None:
        cap = bucket(cap_usd=None, cap_tokens=1000)
        assert store.reserve([cap], usd(99), 900, None, NOW).granted
        refused = store.reserve([cap], 0, 101, None, NOW)
        assert not refused.granted and refused.refused == 0

    def test_parts_of_one_window_are_counted_apart(self, store: BudgetStore) -> None:
        p1, p2 = bucket(part="1", cap_usd=1.0), bucket(part="2", cap_usd=1.0)
        assert store.reserve([p1], usd(1.0), 5, None, NOW).granted
        assert not store.reserve([p1], 1, 0, None, NOW).granted
        assert store.reserve([p2], usd(0.5), 7, None, NOW).granted
        assert store.read(p1.key) == {"1": Use(usd(1.0), 5), "2": Use(usd(0.5), 7)}
        assert store.read("nothing|here|0") == {}

    def test_a_correction_ignores_caps_and_never_goes_below_zero(self, store: BudgetStore) -> None:
        cap = bucket(cap_usd=1.0, cap_tokens=100)
        assert store.reserve([cap], usd(0.5), 50, None, NOW).granted
        store.adjust([cap], usd(0.75), 60, NOW)  # the real answer cost more than reserved
        assert store.read(cap.key) == {"": Use(usd(1.25), 110)}
        store.adjust([cap], -usd(5), -500, NOW)
        assert store.read(cap.key) == {"": Use(0, 0)}

    def test_the_warning_is_given_once_per_window_across_stores(
        self, store: BudgetStore, twin: BudgetStore
    ) -> None:
        cap = bucket(cap_usd=1.0, warn_at=0.8)
        assert store.reserve([cap], usd(0.7), 0, None, NOW).alerts == ()
        crossed = twin.reserve([cap], usd(0.15), 0, None, NOW)
        assert crossed.granted and crossed.alerts == ((0, "warning"),)
        assert store.reserve([cap], usd(0.01), 0, None, NOW).alerts == ()
        store.adjust([cap], -usd(0.5), 0, NOW)
        assert twin.adjust([cap], usd(0.5), 0, NOW) == ()  # given already this window
        later = bucket("rule|hour|1800003600", ends_at=END + 3600)
        assert store.reserve([later], usd(0.9), 0, None, END).alerts == ((0, "warning"),)

    def test_the_cap_alert_is_given_once_whether_reached_or_refused(
        self, store: BudgetStore, twin: BudgetStore
    ) -> None:
        refused_first = bucket("refused|day|1", cap_usd=1.0, warn_at=1.0)
        assert store.reserve([refused_first], usd(0.5), 0, None, NOW).alerts == ()
        refused = twin.reserve([refused_first], usd(0.6), 0, None, NOW)
        assert not refused.granted and refused.alerts == ((0, "cap"),)
        assert store.reserve([refused_first], usd(0.6), 0, None, NOW).alerts == ()

        reached_first = bucket("reached|day|1", cap_usd=1.0, warn_at=0.5)
        found = store.reserve([reached_first], usd(1.0), 0, None, NOW)
        assert found.granted and set(found.alerts) == {(0, "warning"), (0, "cap")}
        assert twin.reserve([reached_first], 1, 0, None, NOW).alerts == ()
        # A correction that brings use to the cap tells the cap too.
        corrected = bucket("corrected|day|1", cap_usd=1.0, warn_at=1.0)
        assert store.reserve([corrected], usd(0.4), 0, None, NOW).granted
        assert store.adjust([corrected], usd(0.7), 0, NOW) == ((0, "warning"), (0, "cap"))

    def test_the_breaker_trips_past_its_calls_cools_down_and_resets(
        self, store: BudgetStore, twin: BudgetStore
    ) -> None:
        storm = Storm("summarise|7", calls=3, seconds=10, cooldown=30)
        other = Storm("score|7", calls=3, seconds=10, cooldown=30)
        sharer = twin if self.STORM_SHARED else store
        for i in range(3):
            assert (store if i % 2 else sharer).reserve([], 0, 0, storm, NOW + i).granted
        tripped = store.reserve([], 0, 0, storm, NOW + 3)
        assert not tripped.granted and tripped.storm_tripped and tripped.storm_left == 30
        refused = sharer.reserve([], 0, 0, storm, NOW + 13)
        assert not refused.granted and not refused.storm_tripped
        assert refused.storm_left == pytest.approx(20)
        assert store.reserve([], 0, 0, other, NOW + 13).granted  # other purposes run on
        assert store.reserve([], 0, 0, storm, NOW + 33).granted  # cooled down
        # Calls older than the breaker's window no longer count.
        for i in range(3):
            assert store.reserve([], 0, 0, storm, NOW + 50 + i * 6).granted

    def test_a_call_the_breaker_refuses_counts_nothing(self, store: BudgetStore) -> None:
        storm = Storm("loop|", calls=1, seconds=60, cooldown=60)
        cap = bucket()
        assert store.reserve([cap], usd(0.1), 1, storm, NOW).granted
        refused = store.reserve([cap], usd(0.1), 1, storm, NOW + 1)
        assert refused.storm_tripped and refused.uses == ()
        assert store.read(cap.key) == {"": Use(usd(0.1), 1)}

    def test_a_correction_counts_a_bucket_of_a_live_window_from_nothing(
        self, store: BudgetStore, twin: BudgetStore
    ) -> None:
        # What a process counted while the store was away, in a window the store had not
        # seen yet, is paid back in full; a window that has ended is left alone.
        fresh = bucket("fresh|day|1", part="7", cap_usd=1.0, warn_at=0.5)
        assert store.adjust([fresh], usd(0.75), 30, NOW) == ((0, "warning"),)
        assert twin.read(fresh.key) == {"7": Use(usd(0.75), 30)}
        ended = bucket("ended|day|0", ends_at=NOW)
        assert store.adjust([ended], usd(0.75), 30, NOW) == ()
        assert twin.read(ended.key) == {}
