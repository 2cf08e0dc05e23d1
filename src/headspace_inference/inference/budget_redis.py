"""The spend guard's store shared by every process that uses the same Redis and prefix.

Each operation is one call of ``budget.lua`` (beside this module), which alone does the
Redis side's counting: one round trip, atomic for every caller. It keeps, under ``prefix``:

- ``<prefix>:budget:<bucket key>``: a hash per rule window, with ``usd:<part>`` and
  ``tokens:<part>`` (the use, in nanodollars and tokens) and ``alert:warning:<part>``,
  ``alert:cap:<part>`` (set by the one call that gave that alert); ``read`` is one HGETALL.
  It expires ``WINDOW_SLACK_SECONDS`` after its window ends: a correction arriving late (a
  call that ran past the window's end) still lands, and a reservation whose process crashed
  before correcting it is never kept beyond that.
- ``<prefix>:budget-storm:<storm key>``: the breaker's recent call times, and
  ``<prefix>:budget-cooling:<storm key>``: when its cool-down ends; both expire once idle
  for the longer of the breaker's window and cool-down. The three namespaces differ before
  the first ``:`` that follows ``budget``, so no rule name or storm key can reach another's.

Times are the caller's ``now`` (wall-clock seconds), passed exactly (redis-py sends a float
as its ``repr``) and compared in the script; expiries are set relative to ``now``, so they
hold whatever the callers' clock. Redis errors are not caught here: the guard's fallback
(through ``RedisGuard``) catches redis's ConnectionError and TimeoutError.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .budget_store import AlertKind, Bucket, Reserved, Storm, Use
from .redis_support import lua_script

if TYPE_CHECKING:
    import redis

# How long a rule window's hash is kept after the window ends (see the module docstring).
WINDOW_SLACK_SECONDS = 3600.0


def _text(value: bytes | str) -> str:
    # A reply from a client with or without decode_responses.
    return value.decode() if isinstance(value, bytes) else value


def _limit(value: int | None) -> int | str:
    return "" if value is None else value


def _alerts(flat: Sequence[Any]) -> tuple[tuple[int, AlertKind], ...]:
    kinds: dict[str, AlertKind] = {"warning": "warning", "cap": "cap"}
    return tuple((int(flat[i]), kinds[_text(flat[i + 1])]) for i in range(0, len(flat), 2))


class RedisBudgetStore:
    """``BudgetStore`` on Redis: every process with the same client target and prefix
    shares its counts. ``close`` leaves the client to its owner."""

    name = "redis"
    shares_breaker = True

    def __init__(self, client: redis.Redis, *, prefix: str) -> None:
        self._base = f"{prefix}:budget"
        self._script = client.register_script(lua_script("budget.lua"))
        self._client = client

    def reserve(
        self,
        buckets: Sequence[Bucket],
        usd: int,
        tokens: int,
        storm: Storm | None,
        now: float,
    ) -> Reserved:
        keys = [self._bucket_key(b.key) for b in buckets]
        args: list[str | int | float] = ["reserve", now, usd, tokens, len(buckets)]
        args += self._bucket_args(buckets, now)
        if storm is not None:
            keys += [f"{self._base}-storm:{storm.key}", f"{self._base}-cooling:{storm.key}"]
            idle_ms = math.ceil(max(storm.seconds, storm.cooldown) * 1000) + 1000
            args += [storm.calls, storm.seconds, storm.cooldown, idle_ms]
        answer = self._script(keys=keys, args=args)
        outcome = _text(answer[0])
        if outcome == "storm":
            return Reserved(False, storm_left=float(answer[1]), storm_tripped=int(answer[2]) == 1)
        flat = answer[2]
        uses = tuple(Use(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2))
        refused = int(answer[1])
        return Reserved(
            outcome == "granted", uses, None if refused < 0 else refused, _alerts(answer[3])
        )

    def adjust(
        self, buckets: Sequence[Bucket], usd: int, tokens: int, now: float
    ) -> tuple[tuple[int, AlertKind], ...]:
        keys = [self._bucket_key(b.key) for b in buckets]
        args: list[str | int | float] = ["adjust", usd, tokens, len(buckets)]
        args += self._bucket_args(buckets, now)
        args += [int(b.ends_at > now) for b in buckets]
        return _alerts(self._script(keys=keys, args=args))

    def read(self, key: str) -> dict[str, Use]:
        fields = self._client.hgetall(self._bucket_key(key))
        found: dict[str, dict[str, int]] = {}
        for name, value in fields.items():
            what, _, part = _text(name).partition(":")
            if what in ("usd", "tokens"):
                found.setdefault(part, {})[what] = int(value)
        return {part: Use(**amounts) for part, amounts in found.items()}

    def close(self) -> None:
        pass

    def _bucket_key(self, key: str) -> str:
        return f"{self._base}:{key}"

    @staticmethod
    def _bucket_args(buckets: Sequence[Bucket], now: float) -> list[str | int | float]:
        # budget.lua's six arguments per bucket: part, cap_usd, cap_tokens, warn_usd,
        # warn_tokens and the hash's time to live (ms), at least a second.
        args: list[str | int | float] = []
        for b in buckets:
            ttl_ms = max(1000, math.ceil((b.ends_at + WINDOW_SLACK_SECONDS - now) * 1000))
            args += [
                b.part, _limit(b.cap_usd), _limit(b.cap_tokens),
                _limit(b.warn_usd), _limit(b.warn_tokens), ttl_ms,
            ]  # fmt: skip
        return args
