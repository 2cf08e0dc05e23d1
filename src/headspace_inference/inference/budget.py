"""The spend guard: budgets that hold across processes, and a breaker for call storms.

```
each upstream attempt: rules that apply (scope) -> buckets (rule, calendar window, project)
  -> worst case (input estimate + output ceiling, at the dearest model of the route)
  -> store.reserve [breaker first, then every cap at once] -> refused: BudgetExceededError
  -> the attempt -> store.adjust by (what OpenRouter reported - worst case)
```
Windows are calendar windows in UTC (the hour, the day, the month a call is made in): a cap
resets at a time an operator can name, and ``retry_after`` says when. A rule with
``project_id: each`` counts each project apart (a bucket per project).

Where counts are kept (budget_store.py): Redis when ``redis.url`` is set (one script, one
round trip, per reservation and per correction), else the call log's database (a row per
bucket, under a lock), so that every process sharing either shares the caps. With no
budgets the database is never touched: the breaker is then kept in Redis, or per process.
While the shared store is away, ``FallbackBudgetStore`` keeps the same rules in this process
from the last use it saw, owes what it counts meanwhile, and pays it back when the store
answers again.

A reservation is held until its attempt's answer corrects it; one whose process died first
stays counted until its window ends (the store forgets the window then), never longer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..clock import SYSTEM_CLOCK, Clock
from ..settings import BudgetRule, OpenRouterSettings, Settings
from .budget_store import (
    NANO,
    NO_USE,
    AlertKind,
    Bucket,
    BudgetStore,
    MemoryBudgetStore,
    Reserved,
    Storm,
    Use,
    first_crossed,
    nano_usd,
)
from .errors import BudgetExceededError, CallStormError

if TYPE_CHECKING:
    from ..calllog.database import Database
    from .backends import Backends
    from .pricing import PriceTable
    from .request import InferenceRequest
    from .types import Answer

log = logging.getLogger(__name__)

T = TypeVar("T")

BudgetEvent = dict[str, Any]
STORM_RULE = "storm_breaker"


def window_bounds(window: str, now: float) -> tuple[datetime, datetime]:
    """The calendar window (UTC) of ``window`` kind that ``now`` falls in: start, end."""
    at = datetime.fromtimestamp(now, UTC)
    if window == "hour":
        start = at.replace(minute=0, second=0, microsecond=0)
        return start, start + timedelta(hours=1)
    if window == "day":
        start = at.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start, (start + timedelta(days=32)).replace(day=1)


def _usd(nano: int | None) -> float | None:
    return None if nano is None else nano / NANO


class _Rule:
    """One configured budget, ready to match calls and name their buckets."""

    def __init__(self, settings: BudgetRule) -> None:
        self.settings = settings
        self.label = settings.label
        self.scope = settings.scope
        self.per_project = settings.scope.project_id == "each"
        self.cap_usd = None if settings.cap_usd is None else nano_usd(settings.cap_usd)
        self.cap_tokens = settings.cap_tokens
        self.warn_usd = None if self.cap_usd is None else int(self.cap_usd * settings.warn_at)
        self.warn_tokens = (
            None if self.cap_tokens is None else int(self.cap_tokens * settings.warn_at)
        )

    def applies(self, level: str | None, purpose: str | None, project_id: int | None) -> bool:
        scope = self.scope
        if scope.level is not None and scope.level != level:
            return False
        if scope.purpose is not None and scope.purpose != purpose:
            return False
        if scope.project_id is None:
            return True
        if project_id is None:
            return False
        return self.per_project or scope.project_id == project_id

    def key(self, now: float) -> tuple[str, datetime]:
        """The store's key of this rule's window at ``now``, and the window's end."""
        start, end = window_bounds(self.settings.window, now)
        return f"{self.label}|{self.settings.window}|{int(start.timestamp())}", end

    def bucket(self, project_id: int | None, now: float) -> Bucket:
        key, end = self.key(now)
        part = str(project_id) if self.per_project and project_id is not None else ""
        return Bucket(
            key, part, self.cap_usd, self.cap_tokens, self.warn_usd, self.warn_tokens,
            end.timestamp(),
        )  # fmt: skip

    def state(self, part: str, use: Use, resets_at: datetime) -> dict[str, Any]:
        """What /status and service.budget() say of this rule's bucket ``part``."""
        s = self.settings

        def left(cap: int | None, used: int) -> int | None:
            return None if cap is None else max(0, cap - used)

        return {
            "rule": self.label,
            "scope": s.scope.model_dump(exclude_none=True),
            "window": s.window,
            "project_id": int(part) if part else None,
            "warn_at": s.warn_at,
            "cap_usd": s.cap_usd,
            "cap_tokens": s.cap_tokens,
            "used_usd": _usd(use.usd),
            "used_tokens": use.tokens,
            "left_usd": _usd(left(self.cap_usd, use.usd)),
            "left_tokens": left(self.cap_tokens, use.tokens),
            "resets_at": resets_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class Hold:
    """What one attempt reserved, to be corrected when its answer is known."""

    buckets: tuple[Bucket, ...] = ()
    rules: tuple[_Rule, ...] = ()
    usd: int = 0
    tokens: int = 0


NO_HOLD = Hold()


class SpendGuard:
    """Reserves each upstream attempt's worst case against every budget that applies, and
    corrects it to what was spent; the storm breaker; the alerts; the state for /status."""

    def __init__(
        self,
        settings: OpenRouterSettings,
        *,
        store: BudgetStore,
        prices: PriceTable,
        default_max_tokens: int,
        health: Callable[[], str | None] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._rules = [_Rule(rule) for rule in settings.budgets]
        self._breaker = settings.storm_breaker
        self.store = store
        self._prices = prices
        self._default_max_tokens = default_max_tokens
        self._health = health
        self._clock = clock
        self._listeners: list[Callable[[BudgetEvent], object]] = []
        self._unpriced: set[str] = set()
        self._lock = threading.Lock()

    def on_event(self, callback: Callable[[BudgetEvent], object]) -> None:
        """Call ``callback(event)`` for each budget event this process's calls give."""
        self._listeners.append(callback)

    # ------------------------------------------------------------------ a call's attempts

    def reserve(self, request: InferenceRequest, *, first_attempt: bool) -> Hold:
        """Reserve the attempt's worst case against every budget that applies (and, at its
        first attempt, count the call for the storm breaker); raise BudgetExceededError
        (CallStormError) instead when that would cross a cap (the breaker is tripped)."""
        now = self._clock.time()
        project = request.links.project_id
        rules = [r for r in self._rules if r.applies(request.level, request.purpose, project)]
        storm = None
        if first_attempt and self._breaker.enabled:
            b = self._breaker
            key = f"{request.purpose}|{'' if project is None else project}"
            storm = Storm(key, b.calls, b.seconds, b.cooldown_seconds)
        if not rules and storm is None:
            return NO_HOLD
        buckets = tuple(rule.bucket(project, now) for rule in rules)
        usd, tokens = self._worst_case(request) if rules else (0, 0)
        for rule, bucket in zip(rules, buckets, strict=True):
            if first_crossed([bucket], [NO_USE], usd, tokens) is not None:
                # Over the whole cap alone: refused without asking the store, so it
                # neither counts for the breaker nor gives the window's one cap alert.
                raise self._refusal(rule, bucket, NO_USE, usd, tokens, now)
        reserved = self.store.reserve(buckets, usd, tokens, storm, now)
        if reserved.storm_left is not None:
            raise self._storm_refusal(request, reserved, now)
        self._alert(rules, buckets, reserved.uses, reserved.alerts, now)
        if not reserved.granted:
            index = reserved.refused if reserved.refused is not None else 0
            use = reserved.uses[index] if index < len(reserved.uses) else NO_USE
            raise self._refusal(rules[index], buckets[index], use, usd, tokens, now)
        return Hold(buckets, tuple(rules), usd, tokens) if buckets else NO_HOLD

    def settle(self, hold: Hold, answer: Answer | None) -> None:
        """Correct ``hold`` to what its attempt was charged: ``answer``'s tokens and cost
        (OpenRouter's figure, else ours by the model's price); nothing without an answer."""
        if not hold.buckets:
            return
        usd, tokens = (0, 0) if answer is None else spent(answer)
        now = self._clock.time()
        alerts = self.store.adjust(hold.buckets, usd - hold.usd, tokens - hold.tokens, now)
        if alerts:
            self._alert(hold.rules, hold.buckets, self._uses(hold.buckets), alerts, now)

    def _worst_case(self, request: InferenceRequest) -> tuple[int, int]:
        """(nanodollars, tokens) the attempt may cost at most: the input's estimate and the
        output's ceiling, at the dearest model it may be routed to."""
        input_tokens = request.estimated_input_tokens()
        output_tokens = request.output_ceiling(self._default_max_tokens)
        worst = Decimal(0)
        for model in (request.model, *request.fallbacks):
            cost = self._prices.worst_case(model, input_tokens, output_tokens)
            if cost is None:
                self._say_unpriced(model)
            else:
                worst = max(worst, cost)
        return nano_usd(worst), input_tokens + output_tokens

    def _say_unpriced(self, model: str) -> None:
        if not any(r.cap_usd is not None for r in self._rules):
            return
        with self._lock:
            if model in self._unpriced:
                return
            self._unpriced.add(model)
        log.warning(
            "spend guard: model %.200s has no price, so USD budgets reserve nothing for its "
            "calls ahead; they count what OpenRouter reports each call cost once it answers",
            model,
        )

    # ------------------------------------------------------------------ refusals, alerts

    def _refusal(
        self, rule: _Rule, bucket: Bucket, use: Use, usd: int, tokens: int, now: float
    ) -> BudgetExceededError:
        whole = first_crossed([bucket], [NO_USE], usd, tokens) is not None
        where = f" for project {bucket.part}" if bucket.part else ""
        resets = datetime.fromtimestamp(bucket.ends_at, UTC).isoformat()
        if whole:
            why = (
                f"the call's worst case (${usd / NANO:.6f}, {tokens} tokens) is more than the "
                "whole cap: lower max_tokens or shorten the input"
            )
        else:
            why = (
                f"used ${use.usd / NANO:.6f} and {use.tokens} tokens of "
                f"{_caps(rule)}; the call may cost up to ${usd / NANO:.6f} and {tokens} tokens; "
                f"the window resets at {resets}"
            )
        return BudgetExceededError(
            f"budget {rule.label!r} ({rule.settings.window}{where}) would be crossed: {why}",
            rule=rule.label,
            retry_after=None if whole else max(0.0, round(bucket.ends_at - now, 3)),
        )

    def _storm_refusal(
        self, request: InferenceRequest, reserved: Reserved, now: float
    ) -> CallStormError:
        left = reserved.storm_left or 0.0
        b = self._breaker
        project = request.links.project_id
        where = "" if project is None else f" for project {project}"
        if reserved.storm_tripped:
            event: BudgetEvent = {
                "kind": "storm",
                "rule": STORM_RULE,
                "purpose": request.purpose,
                "project_id": project,
                "calls": b.calls,
                "seconds": b.seconds,
                "cooldown_seconds": b.cooldown_seconds,
                "resets_at": _iso(now + left),
                "at": _iso(now),
            }
            log.warning(
                "spend guard: the storm breaker tripped: purpose %r%s made more than %d calls "
                "in %g s; refused for %g s (openrouter.storm_breaker)",
                request.purpose, where, b.calls, b.seconds, b.cooldown_seconds,
            )  # fmt: skip
            self._tell(event)
        return CallStormError(
            f"the storm breaker refuses purpose {request.purpose!r}{where} for "
            f"{left:.1f} s more: it made more than {b.calls} calls in {b.seconds:g} s "
            "(openrouter.storm_breaker)",
            rule=STORM_RULE,
            retry_after=round(left, 3),
        )

    def _alert(
        self,
        rules: Sequence[_Rule],
        buckets: Sequence[Bucket],
        uses: Sequence[Use],
        alerts: Sequence[tuple[int, AlertKind]],
        now: float,
    ) -> None:
        for index, kind in alerts:
            rule, bucket = rules[index], buckets[index]
            use = uses[index] if index < len(uses) else NO_USE
            state = rule.state(bucket.part, use, datetime.fromtimestamp(bucket.ends_at, UTC))
            event: BudgetEvent = {
                "kind": kind,
                **{k: state[k] for k in ("rule", "window", "scope", "project_id")},
                **{k: state[k] for k in ("used_usd", "cap_usd", "used_tokens", "cap_tokens")},
                "warn_at": state["warn_at"],
                "resets_at": state["resets_at"],
                "at": _iso(now),
            }
            where = "" if not bucket.part else f" for project {bucket.part}"
            what = "has reached its cap" if kind == "cap" else f"passed {state['warn_at']:.0%}"
            log.warning(
                "spend guard: budget %r%s %s: $%.6f and %d tokens of %s used or reserved "
                "this %s (resets at %s)",
                rule.label, where, what, use.usd / NANO, use.tokens, _caps(rule),
                rule.settings.window, state["resets_at"],
            )  # fmt: skip
            self._tell(event)

    def _tell(self, event: BudgetEvent) -> None:
        for callback in list(self._listeners):
            try:
                callback(dict(event))
            except Exception:  # a listener's failure is its own: the call goes on
                log.exception("spend guard: a budget event listener failed")

    # ------------------------------------------------------------------ what is left

    def _uses(self, buckets: Sequence[Bucket]) -> list[Use]:
        found: dict[str, dict[str, Use]] = {}
        for bucket in buckets:
            if bucket.key not in found:
                found[bucket.key] = self.store.read(bucket.key)
        return [found[b.key].get(b.part, NO_USE) for b in buckets]

    def budget(
        self,
        *,
        level: str | None = None,
        purpose: str | None = None,
        project_id: int | None = None,
    ) -> list[dict[str, Any]]:
        """Each budget's use, cap, what is left and when it resets, this window.

        With no arguments: every rule, and for a per-project rule each project with use in
        this window. With a call's ``level``, ``purpose`` and/or ``project_id``: only the
        rules such a call would meet (what is left before a batch of them), a per-project
        rule for that project alone.
        """
        asked = level is not None or purpose is not None or project_id is not None
        now = self._clock.time()
        states: list[dict[str, Any]] = []
        for rule in self._rules:
            if asked and not _may_apply(rule, level, purpose, project_id):
                continue
            key, end = rule.key(now)
            parts = self.store.read(key)
            if not rule.per_project:
                states.append(rule.state("", parts.get("", NO_USE), end))
            elif project_id is not None:
                states.append(rule.state(str(project_id), parts.get(str(project_id), NO_USE), end))
            else:
                states += [rule.state(p, use, end) for p, use in sorted(parts.items()) if p]
        return states

    def report(self) -> dict[str, Any]:
        """The guard's own part of /status: where counts are kept and whether it is shared."""
        reason = self._health() if self._health is not None else None
        b = self._breaker
        return {
            "store": self.store.name,
            "shared": self.store.name != "memory" and reason is None,
            "reason": reason,
            "storm_breaker": {
                "enabled": b.enabled,
                "calls": b.calls,
                "seconds": b.seconds,
                "cooldown_seconds": b.cooldown_seconds,
            },
        }

    def close(self) -> None:
        self.store.close()


def _may_apply(rule: _Rule, level: str | None, purpose: str | None, project_id: int | None) -> bool:
    # A rule applies to the asked calls unless one of its scope's keys says otherwise.
    scope = rule.scope
    return (
        (level is None or scope.level in (None, level))
        and (purpose is None or scope.purpose in (None, purpose))
        and (project_id is None or scope.project_id in (None, "each", project_id))
    )


def spent(answer: Answer) -> tuple[int, int]:
    """What one answer cost: (nanodollars, tokens). OpenRouter's own figure when it gave
    one (what the account is charged), else ours by the model's price, else nothing."""
    cost = answer.upstream_cost_usd if answer.upstream_cost_usd is not None else answer.cost_usd
    return (0 if cost is None else nano_usd(cost)), answer.input_tokens + answer.output_tokens


def _caps(rule: _Rule) -> str:
    caps = []
    if rule.settings.cap_usd is not None:
        caps.append(f"${rule.settings.cap_usd:g}")
    if rule.settings.cap_tokens is not None:
        caps.append(f"{rule.settings.cap_tokens} tokens")
    return " and ".join(caps)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


class StoreGuard(Protocol):
    """Runs a shared store's operation, or its stand-in while that store is away."""

    def run(self, command: Callable[[], T], fallback: Callable[[], T]) -> T: ...

    def health(self) -> str | None: ...


class FallbackBudgetStore:
    """A shared store (Redis, the database), with this process's own store standing in while
    it is away: the same rules, from the use last seen of each bucket, so N processes cut
    off at once may together spend up to N times what was left of a cap then. What is
    counted meanwhile is owed, and paid to the shared store when it answers again."""

    def __init__(self, shared: BudgetStore, guard: StoreGuard) -> None:
        self.shared = shared
        self.local = MemoryBudgetStore()
        self.name = shared.name
        self.shares_breaker = shared.shares_breaker
        self._guard = guard
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], tuple[Bucket, Use]] = {}
        self._owed: dict[tuple[str, str], tuple[Bucket, int, int]] = {}
        self._stood_in = False  # the stand-in has counted since the store last answered

    def reserve(
        self,
        buckets: Sequence[Bucket],
        usd: int,
        tokens: int,
        storm: Storm | None,
        now: float,
    ) -> Reserved:
        if storm is not None and not self.shared.shares_breaker:
            # A store that keeps no breaker for everyone: this process keeps it, in one
            # count whether the store answers or not.
            refusal = self.local.reserve((), 0, 0, storm, now)
            if not refusal.granted:
                return refusal
            storm = None

        def shared() -> Reserved:
            self._pay_back(now)
            reserved = self.shared.reserve(buckets, usd, tokens, storm, now)
            self._saw(buckets, reserved.uses)
            return reserved

        def local() -> Reserved:
            self._stood_in = True
            self._seed(buckets)
            reserved = self.local.reserve(buckets, usd, tokens, storm, now)
            if reserved.granted:
                self._owe(buckets, usd, tokens)
            return reserved

        return self._guard.run(shared, local)

    def adjust(
        self, buckets: Sequence[Bucket], usd: int, tokens: int, now: float
    ) -> tuple[tuple[int, AlertKind], ...]:
        def shared() -> tuple[tuple[int, AlertKind], ...]:
            self._pay_back(now)
            alerts = self.shared.adjust(buckets, usd, tokens, now)
            self._saw_added(buckets, usd, tokens)
            return alerts

        def local() -> tuple[tuple[int, AlertKind], ...]:
            self._stood_in = True
            self._seed(buckets)
            self._owe(buckets, usd, tokens)
            return self.local.adjust(buckets, usd, tokens, now)

        return self._guard.run(shared, local)

    def read(self, key: str) -> dict[str, Use]:
        return self._guard.run(lambda: self.shared.read(key), lambda: self.local.read(key))

    def close(self) -> None:
        self.shared.close()

    def owed(self) -> int:
        """How many buckets hold counts not yet paid to the shared store."""
        with self._lock:
            return len(self._owed)

    def _saw(self, buckets: Sequence[Bucket], uses: Sequence[Use]) -> None:
        with self._lock:
            for bucket, use in zip(buckets, uses, strict=False):
                self._seen[(bucket.key, bucket.part)] = (bucket, use)

    def _saw_added(self, buckets: Sequence[Bucket], usd: int, tokens: int) -> None:
        # A correction's answer carries no use: the last seen one moves by what it added.
        with self._lock:
            for bucket in buckets:
                where = (bucket.key, bucket.part)
                if where in self._seen:
                    use = self._seen[where][1]
                    moved = Use(max(0, use.usd + usd), max(0, use.tokens + tokens))
                    self._seen[where] = (bucket, moved)

    def _seed(self, buckets: Sequence[Bucket]) -> None:
        with self._lock:
            seen = [self._seen.get((b.key, b.part), (b, NO_USE))[1] for b in buckets]
        for bucket, use in zip(buckets, seen, strict=True):
            self.local.seed(bucket, use)

    def _owe(self, buckets: Sequence[Bucket], usd: int, tokens: int) -> None:
        with self._lock:
            for bucket in buckets:
                where = (bucket.key, bucket.part)
                _, owed_usd, owed_tokens = self._owed.get(where, (bucket, 0, 0))
                self._owed[where] = (bucket, owed_usd + usd, owed_tokens + tokens)

    def _pay_back(self, now: float) -> None:
        """Add what was counted here while the shared store was away to it, each bucket once
        (taken under the lock; what the store fails to take is owed again), then forget the
        stand-in's counts, so a later outage starts from the shared store's."""
        if not self._stood_in:
            return
        with self._lock:
            owed, self._owed = self._owed, {}
            self._seen = {w: s for w, s in self._seen.items() if s[0].ends_at > now}
        unpaid = dict(owed)
        try:
            for where, (bucket, usd, tokens) in owed.items():
                if bucket.ends_at > now and (usd or tokens):
                    self.shared.adjust([bucket], usd, tokens, now)
                del unpaid[where]
        finally:
            with self._lock:
                for where, (bucket, usd, tokens) in unpaid.items():
                    _, more_usd, more_tokens = self._owed.get(where, (bucket, 0, 0))
                    self._owed[where] = (bucket, usd + more_usd, tokens + more_tokens)
        self._stood_in = False
        self.local.forget()
        if owed:
            log.info(
                "spend guard: what %d budgets counted while their store was away is added "
                "to it", len(owed),
            )  # fmt: skip


def build_spend_guard(
    settings: Settings,
    *,
    database: Database,
    backends: Backends,
    prices: PriceTable,
    clock: Clock = SYSTEM_CLOCK,
) -> SpendGuard:
    """The guard for these settings; opens nothing (its store connects on first use).

    Redis when ``redis.url`` is set (the backends' client, and their view of whether Redis
    is there); else the database, when there are budgets; else (the breaker alone) this
    process's memory: a breaker needs no database write on every call.
    """
    from .redis_support import OutageGuard

    store: BudgetStore
    health = None
    if backends.client is not None and backends.guard is not None:
        from .budget_redis import RedisBudgetStore

        shared: BudgetStore = RedisBudgetStore(backends.client, prefix=settings.redis.key_prefix)
        store = FallbackBudgetStore(shared, backends.guard)
        health = backends.guard.health
    elif settings.openrouter.budgets:
        from sqlalchemy import text

        from ..calllog.database import DATABASE_AWAY
        from .budget_database import DatabaseBudgetStore

        def probe() -> None:
            # The bounded read every request's read is (database.read_timeout_seconds):
            # /status asks this, and must not wait on a stalled database for longer.
            database.read(lambda session: session.execute(text("SELECT 1")))

        outage = OutageGuard(
            store="the database",
            name="spend guard",
            retry_interval=settings.redis.retry_interval_seconds,
            probe=probe,
            probe_timeout=database.settings.read_timeout_seconds + 0.5,
            down=lambda: DATABASE_AWAY,
        )
        store = FallbackBudgetStore(DatabaseBudgetStore(database), outage)
        health = outage.health
    else:
        store = MemoryBudgetStore()
    return SpendGuard(
        settings.openrouter,
        store=store,
        prices=prices,
        default_max_tokens=settings.inference.default_max_tokens,
        health=health,
        clock=clock,
    )
