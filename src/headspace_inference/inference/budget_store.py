"""What the spend guard keeps, and the one contract every place that keeps it meets.

The guard (budget.py) decides which rules a call meets and what it may cost; a store only
counts. It keeps, for each rule's window (a ``Bucket``'s ``key``) and each part of it (one
project's use under a per-project rule, else ``""``), the USD and tokens used, reservations
in flight included; and for the storm breaker, each purpose's recent calls and cool-down.

Three stores keep the same contract (tests/budget_contract.py holds them to it):
``MemoryBudgetStore`` for one process, the Redis store (budget_redis.py, one Lua script per
operation) and the database store (budget_database.py, a row per rule, window and part,
updated under a lock). Each operation is atomic across every caller sharing the store: a
reservation checks every bucket and adds to all of them, or adds to none.

Money is counted in whole nanodollars (``NANO`` per USD), rounded up: integers that Redis,
Lua's doubles (exact to 2**53, about 9 million USD) and SQL all add exactly.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from typing import Literal, Protocol

NANO = 10**9  # nanodollars per USD

# The first time in its window a bucket's use reaches its warning mark, or its cap (a call
# refused, or a correction that brings it to the cap), the store says so, once across every
# process sharing it.
AlertKind = Literal["warning", "cap"]
ALERT_KINDS: tuple[AlertKind, ...] = ("warning", "cap")


def nano_usd(amount: Decimal | float) -> int:
    """``amount`` USD in whole nanodollars, rounded up (a guard counts a cost never short)."""
    value = Decimal(str(amount)) if isinstance(amount, float) else amount
    return int((value * NANO).to_integral_value(ROUND_CEILING))


@dataclass(frozen=True, slots=True)
class Bucket:
    """One rule's use in one window, and for a rule applying to each project apart, one
    project's: what a store counts under (``key``, ``part``), with its limits."""

    key: str  # the rule's window: "<rule name>|<window>|<window start, epoch seconds>"
    part: str  # "" (the rule's whole use), or the project id of a per-project rule
    cap_usd: int | None  # nanodollars
    cap_tokens: int | None
    warn_usd: int | None  # the use at which the warning is given (cap x warn_at)
    warn_tokens: int | None
    ends_at: float  # epoch seconds; the store may forget the bucket some time after


@dataclass(frozen=True, slots=True)
class Use:
    """What a bucket has used: nanodollars and tokens, reservations in flight included."""

    usd: int = 0
    tokens: int = 0


NO_USE = Use()


@dataclass(frozen=True, slots=True)
class Storm:
    """The storm breaker's question for one call: has its purpose (and project) made more
    than ``calls`` calls in the last ``seconds``? If so it is refused for ``cooldown``."""

    key: str  # "<purpose>|<project id or ''>"
    calls: int
    seconds: float
    cooldown: float


@dataclass(frozen=True, slots=True)
class Reserved:
    """A reservation's outcome.

    ``granted``: the amounts were added to every bucket. Otherwise nothing was added, and
    either the storm breaker refused (``storm_left`` seconds of cool-down remain;
    ``storm_tripped`` when this very call tripped it), or ``refused`` is the index of the
    first bucket the call would have crossed. ``uses`` are the buckets' uses after the
    reservation (granted) or as found (refused); empty when the breaker refused.
    ``alerts`` are (bucket index, kind) given for the first time in their window.
    """

    granted: bool
    uses: tuple[Use, ...] = ()
    refused: int | None = None
    alerts: tuple[tuple[int, AlertKind], ...] = ()
    storm_left: float | None = None
    storm_tripped: bool = False


class BudgetStore(Protocol):
    """Counts the guard's buckets; every operation is atomic for all callers sharing it."""

    name: str  # "memory", "redis" or "database": what /status calls it
    # Whether the storm breaker is shared by every caller of the store (Redis), or kept by
    # each process (the database store keeps it in memory: see FallbackBudgetStore).
    shares_breaker: bool

    def reserve(
        self,
        buckets: Sequence[Bucket],
        usd: int,
        tokens: int,
        storm: Storm | None,
        now: float,
    ) -> Reserved:
        """The breaker first (a purpose cooling down is refused, and nothing counted;
        otherwise the call is counted, and the one that makes more than ``storm.calls`` in
        ``storm.seconds`` trips it and is refused). Then, when for every bucket its use plus
        (``usd``, ``tokens``) stays within each cap it has, adds them to every bucket;
        otherwise adds nothing and names the first bucket that would be crossed. A cap
        is crossed when use + amount > cap (use may reach the cap exactly)."""
        ...

    def adjust(
        self, buckets: Sequence[Bucket], usd: int, tokens: int, now: float
    ) -> tuple[tuple[int, AlertKind], ...]:
        """Add (``usd``, ``tokens``) to every bucket, whatever the caps (a correction of a
        reservation to what was really spent: negative gives back, and no use goes below
        zero; or what a process counted while the store was away, paid back). A bucket not
        counted yet is counted from nothing while its window lasts (``ends_at`` > ``now``);
        after, it is left alone. The alerts this gives for the first time in their window."""
        ...

    def read(self, key: str) -> dict[str, Use]:
        """Every part of one rule's window with its use (empty when nothing is counted)."""
        ...

    def close(self) -> None:
        """Give back connections the store opened."""
        ...


def first_crossed(
    buckets: Sequence[Bucket], uses: Sequence[Use], usd: int, tokens: int
) -> int | None:
    """The index of the first bucket whose cap ``usd``/``tokens`` more would cross."""
    for i, (bucket, use) in enumerate(zip(buckets, uses, strict=True)):
        if bucket.cap_usd is not None and use.usd + usd > bucket.cap_usd:
            return i
        if bucket.cap_tokens is not None and use.tokens + tokens > bucket.cap_tokens:
            return i
    return None


def reached(bucket: Bucket, use: Use, kind: AlertKind) -> bool:
    """Whether ``use`` has reached the bucket's warning mark or its cap."""
    usd_mark, tokens_mark = (
        (bucket.warn_usd, bucket.warn_tokens)
        if kind == "warning"
        else (bucket.cap_usd, bucket.cap_tokens)
    )
    return (usd_mark is not None and use.usd >= usd_mark) or (
        tokens_mark is not None and use.tokens >= tokens_mark
    )


class Count(Protocol):
    """One bucket's count as a store holds it while it decides (under its lock, or the
    row's): its use, and which alerts it has given this window."""

    usd: int
    tokens: int

    def given(self, kind: AlertKind) -> bool: ...

    def give(self, kind: AlertKind) -> None: ...


def decide(buckets: Sequence[Bucket], counts: Sequence[Count], usd: int, tokens: int) -> Reserved:
    """A reservation's outcome on the buckets' ``counts``, which it changes in place: added
    to every one when no cap is crossed, else to none (the crossed bucket's cap alert given
    once). The one decision every store makes, wherever it keeps the counts."""
    uses = tuple(Use(c.usd, c.tokens) for c in counts)
    crossed = first_crossed(buckets, uses, usd, tokens)
    if crossed is not None:
        return Reserved(False, uses, crossed, once([(crossed, "cap", counts[crossed])]))
    for count in counts:
        count.usd += usd
        count.tokens += tokens
    uses = tuple(Use(c.usd, c.tokens) for c in counts)
    return Reserved(True, uses, None, crossings(enumerate(zip(buckets, counts, strict=True))))


def crossings(
    counted: Iterable[tuple[int, tuple[Bucket, Count]]],
) -> tuple[tuple[int, AlertKind], ...]:
    """The alerts the (index, (bucket, count)) pairs have reached and not given yet (each
    given now)."""
    found: list[tuple[int, AlertKind, Count]] = []
    for i, (bucket, count) in counted:
        use = Use(count.usd, count.tokens)
        found += [(i, kind, count) for kind in ALERT_KINDS if reached(bucket, use, kind)]
    return once(found)


def once(found: Sequence[tuple[int, AlertKind, Count]]) -> tuple[tuple[int, AlertKind], ...]:
    """Each kind once per bucket and window: those of ``found`` not given yet, given now."""
    new: list[tuple[int, AlertKind]] = []
    for index, kind, count in found:
        if not count.given(kind):
            count.give(kind)
            new.append((index, kind))
    return tuple(new)


@dataclass
class _Part:
    usd: int = 0
    tokens: int = 0
    ends_at: float = 0.0
    alerted: set[str] = field(default_factory=set)

    def given(self, kind: AlertKind) -> bool:
        return kind in self.alerted

    def give(self, kind: AlertKind) -> None:
        self.alerted.add(kind)


@dataclass
class _Breaker:
    calls: deque[float] = field(default_factory=deque)
    cooling_until: float = 0.0


class MemoryBudgetStore:
    """The store of one process: everything under one lock.

    Buckets are forgotten once their window has ended (a correction arriving after that
    adds to nothing), breakers once idle past their window and cool-down.
    """

    name = "memory"
    shares_breaker = True  # by everyone sharing this store: its one process

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: dict[tuple[str, str], _Part] = {}
        self._breakers: dict[str, _Breaker] = {}
        self._swept_at = -math.inf

    def reserve(
        self,
        buckets: Sequence[Bucket],
        usd: int,
        tokens: int,
        storm: Storm | None,
        now: float,
    ) -> Reserved:
        with self._lock:
            self._sweep(now)
            if storm is not None:
                refusal = self._breaker(storm, now)
                if refusal is not None:
                    return refusal
            return decide(buckets, [self._part(b) for b in buckets], usd, tokens)

    def adjust(
        self, buckets: Sequence[Bucket], usd: int, tokens: int, now: float
    ) -> tuple[tuple[int, AlertKind], ...]:
        with self._lock:
            counted: list[tuple[int, tuple[Bucket, Count]]] = []
            for i, bucket in enumerate(buckets):
                part = self._parts.get((bucket.key, bucket.part))
                if part is None and bucket.ends_at > now:
                    part = self._part(bucket)
                if part is not None:  # else its window has ended and been forgotten
                    part.usd = max(0, part.usd + usd)
                    part.tokens = max(0, part.tokens + tokens)
                    counted.append((i, (bucket, part)))
            return crossings(counted)

    def read(self, key: str) -> dict[str, Use]:
        with self._lock:
            return {part: Use(p.usd, p.tokens) for (k, part), p in self._parts.items() if k == key}

    def seed(self, bucket: Bucket, use: Use) -> None:
        """Start counting ``bucket`` from ``use`` unless it is counted already (a guard
        standing in for a shared store starts from the last use it was told)."""
        with self._lock:
            part = self._part(bucket)
            part.usd, part.tokens = max(part.usd, use.usd), max(part.tokens, use.tokens)

    def forget(self) -> None:
        """Drop every bucket (a stand-in whose shared store is back)."""
        with self._lock:
            self._parts.clear()

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ under the lock

    def _part(self, bucket: Bucket) -> _Part:
        part = self._parts.get((bucket.key, bucket.part))
        if part is None:
            part = self._parts[(bucket.key, bucket.part)] = _Part(ends_at=bucket.ends_at)
        return part

    def _breaker(self, storm: Storm, now: float) -> Reserved | None:
        breaker = self._breakers.setdefault(storm.key, _Breaker())
        if now < breaker.cooling_until:
            return Reserved(False, storm_left=breaker.cooling_until - now)
        calls = breaker.calls
        while calls and calls[0] <= now - storm.seconds:
            calls.popleft()
        calls.append(now)
        if len(calls) > storm.calls:
            calls.clear()
            breaker.cooling_until = now + storm.cooldown
            return Reserved(False, storm_left=storm.cooldown, storm_tripped=True)
        return None

    def _sweep(self, now: float) -> None:
        # At most once a minute: forget ended windows and idle breakers.
        if now - self._swept_at < 60:
            return
        self._swept_at = now
        for where, part in list(self._parts.items()):
            if part.ends_at <= now:
                del self._parts[where]
        for key, breaker in list(self._breakers.items()):
            idle = not breaker.calls or breaker.calls[-1] < now - 86_400
            if breaker.cooling_until <= now and idle:
                del self._breakers[key]
