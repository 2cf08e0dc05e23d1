"""The response cache, keyed by everything that decides an answer: a memory tier (TTL, LRU
bounds in entries and bytes) and, when Redis is configured, a shared tier behind it; or
NullCache when the cache is disabled, so that callers never ask whether it is."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..clock import SYSTEM_CLOCK, Clock
from ..settings import CacheSettings
from .redis_support import RedisGuard, redis_error
from .types import Answer, GenerationParams

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

# Bump when Answer's shape changes: old entries are then simply never read.
CACHE_FORMAT = "v3"


def request_key(
    *,
    model: str,
    system_prompt: str | None,
    input_text: str,
    params: GenerationParams,
    fallbacks: Sequence[str] = (),
    provider: Mapping[str, Any] | None = None,
    schema: str | None = None,
) -> str:
    """SHA-256 of every input that decides the answer (never the input text alone): the
    models that may answer, the provider preferences (a quantization changes answers) and
    the response format's fingerprint included."""
    canonical = json.dumps(
        [CACHE_FORMAT, model, system_prompt, input_text, params.max_tokens, params.temperature,
         list(fallbacks), provider or None, schema],
        ensure_ascii=False,
        separators=(",", ":"),
        sort_keys=True,
    )  # fmt: skip
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache(Protocol):
    """Get and put answers by request key."""

    def get(self, key: str) -> Answer | None:
        """The live answer for ``key``, or None; counted as a hit or a miss."""
        ...

    def peek(self, key: str) -> Answer | None:
        """Like get(), but counted as neither: for polling, e.g. by a single-flight waiter
        watching for another process's answer (each poll is not a cache miss)."""
        ...

    def put(self, key: str, value: Answer) -> None:
        """Store ``value`` for the configured TTL."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for /api/inference/status."""
        ...

    def clear(self) -> None:
        """Forget every entry."""
        ...

    def health(self) -> str | None:
        """None when the cache works as configured, else a one-line reason (e.g. the shared
        tier is out of use because Redis is unreachable)."""
        ...


class _Counters:
    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0

    def as_dict(self) -> dict[str, Any]:
        total = self.hits + self.misses
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / total, 4) if total else None,
        }


# What an entry besides its text is counted as: the rest of the answer, the key, the slot.
_ENTRY_OVERHEAD = 1024
# An answer over this fraction of max_memory_bytes is not kept in memory: one would push
# out many smaller ones.
_LARGEST_FRACTION = 8


def entry_bytes(answer: Answer) -> int:
    """What a cached answer counts against cache.max_memory_bytes: its text as Python holds
    it, twice when a structured answer's parsed data (a parse of that text) is kept beside
    it, and a fixed overhead for the rest."""
    text = sys.getsizeof(answer.text)
    return text * (1 if answer.data is None else 2) + _ENTRY_OVERHEAD


class MemoryCache:
    """A per-process cache: TTL on the injected clock, least recently used evicted first
    while over max_entries or max_memory_bytes, O(1) per operation (amortized), every
    counter updated under the one lock."""

    def __init__(self, settings: CacheSettings, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._ttl = settings.ttl_seconds
        self._max = settings.max_entries
        self._max_bytes = settings.max_memory_bytes
        self._largest = settings.max_memory_bytes // _LARGEST_FRACTION
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, Answer, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._counters = _Counters()
        self.evictions = 0
        self.expirations = 0
        self.too_large = 0

    def get(self, key: str) -> Answer | None:
        now = self._clock.monotonic()
        with self._lock:
            item = self._data.get(key)
            if item is None:
                self._counters.misses += 1
                return None
            expires, value, size = item
            if now >= expires:
                del self._data[key]
                self._bytes -= size
                self.expirations += 1
                self._counters.misses += 1
                return None
            self._data.move_to_end(key)
            self._counters.hits += 1
            return value

    def peek(self, key: str) -> Answer | None:
        # Neither counted nor made most recently used: a poll is not a use.
        now = self._clock.monotonic()
        with self._lock:
            item = self._data.get(key)
        if item is None or now >= item[0]:
            return None
        return item[1]

    def put(self, key: str, value: Answer, ttl: float | None = None) -> None:
        expires = self._clock.monotonic() + (self._ttl if ttl is None else ttl)
        size = entry_bytes(value)
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old[2]
            if size > self._largest:
                self.too_large += 1
                return
            self._data[key] = (expires, value, size)
            self._bytes += size
            while len(self._data) > self._max or self._bytes > self._max_bytes:
                self._bytes -= self._data.popitem(last=False)[1][2]
                self.evictions += 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "backend": "memory",
                "entries": len(self._data),
                "max_entries": self._max,
                "bytes": self._bytes,
                "max_bytes": self._max_bytes,
                "evictions": self.evictions,
                "expirations": self.expirations,
                "too_large": self.too_large,
                **self._counters.as_dict(),
            }

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def health(self) -> str | None:
        return None


class RedisCache:
    """The shared tier: namespaced, versioned keys; Redis keeps the TTL."""

    def __init__(self, client: redis.Redis, settings: CacheSettings, *, prefix: str) -> None:
        self._client = client
        self._ttl_ms = max(1, int(settings.ttl_seconds * 1000))
        self._prefix = f"{prefix}:cache:{CACHE_FORMAT}:"
        self._lock = threading.Lock()
        self._counters = _Counters()
        self.unreadable = 0  # entries found unreadable, and removed

    def key(self, key: str) -> str:
        """The Redis key for a request key."""
        return self._prefix + key

    def get_with_ttl(self, key: str, *, count: bool = True) -> tuple[Answer | None, float]:
        """The answer and its remaining life in seconds; ``count=False`` for a peek.

        An entry that cannot be read (not a stored answer, or a Redis value of another
        type) is a miss, and is removed: another process's bug, an older release or a hand
        edit must not fail every identical call for the entry's TTL.
        """
        pipe = self._client.pipeline(transaction=False)
        pipe.get(self.key(key))
        pipe.pttl(self.key(key))
        # raise_on_error=False: a key holding a list or hash fails GET (WRONGTYPE), which is
        # an unreadable entry, not a Redis outage; an outage still raises (RedisGuard).
        raw, pttl = pipe.execute(raise_on_error=False)
        answer: Answer | None = None
        problem: str | None = None
        if isinstance(raw, redis_error()):
            problem = f"GET failed: {str(raw)[:80]}"
        elif raw is not None:
            try:
                answer = Answer.from_json(raw)
            except ValueError as exc:
                problem = str(exc)
        if problem is not None:
            self._discard(key, problem)
        if count:
            with self._lock:
                if answer is None:
                    self._counters.misses += 1
                else:
                    self._counters.hits += 1
        if answer is None or isinstance(pttl, Exception):
            return answer, 0.0
        return answer, max(0.0, int(pttl) / 1000)

    def _discard(self, key: str, problem: str) -> None:
        # Deleted without comparing: should another process have just stored a good answer
        # there, it costs one more miss, nothing else.
        self._client.delete(self.key(key))
        with self._lock:
            self.unreadable += 1
        log.warning(
            "response cache: removed an unreadable Redis entry %s (%s); the call goes "
            "upstream as on a miss", self.key(key), problem,
        )  # fmt: skip

    def get(self, key: str) -> Answer | None:
        return self.get_with_ttl(key)[0]

    def peek(self, key: str) -> Answer | None:
        return self.get_with_ttl(key, count=False)[0]

    def put(self, key: str, value: Answer) -> None:
        self._client.set(self.key(key), value.to_json(), px=self._ttl_ms)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"backend": "redis", **self._counters.as_dict(), "unreadable": self.unreadable}

    def clear(self) -> None:
        for name in self._client.scan_iter(match=self._prefix + "*", count=1000):
            self._client.delete(name)

    def health(self) -> str | None:
        # Alone it has no fallback: a Redis failure raises from the call that met it.
        # TieredCache, which the factory builds, reports Redis's health.
        return None


class TieredCache:
    """Memory first, then Redis; a Redis hit is copied into memory for its remaining life.

    While Redis is unreachable the memory tier serves alone (see RedisGuard).
    """

    def __init__(self, local: MemoryCache, shared: RedisCache, guard: RedisGuard) -> None:
        self.local = local
        self.shared = shared
        self._guard = guard

    def get(self, key: str) -> Answer | None:
        value = self.local.get(key)
        if value is not None:
            return value
        return self._from_shared(key, count=True)

    def peek(self, key: str) -> Answer | None:
        value = self.local.peek(key)
        if value is not None:
            return value
        return self._from_shared(key, count=False)

    def _from_shared(self, key: str, *, count: bool) -> Answer | None:
        found, ttl = self._guard.run(
            lambda: self.shared.get_with_ttl(key, count=count), lambda: (None, 0.0)
        )
        if found is not None and ttl > 0:
            self.local.put(key, found, ttl=ttl)
        return found

    def put(self, key: str, value: Answer) -> None:
        self.local.put(key, value)
        self._guard.run(lambda: self.shared.put(key, value), lambda: None)

    def stats(self) -> dict[str, Any]:
        return {
            **self.local.stats(),
            "backend": "memory+redis",
            "redis": self.shared.stats(),
            "redis_available": self._guard.health() is None,
        }

    def clear(self) -> None:
        self.local.clear()
        self._guard.run(self.shared.clear, lambda: None)

    def health(self) -> str | None:
        """Why the shared tier is not in use, or None."""
        return self._guard.health()


class NullCache:
    """The cache when openrouter.cache.enabled is false: never finds, never keeps."""

    def get(self, key: str) -> Answer | None:
        return None

    def peek(self, key: str) -> Answer | None:
        return None

    def put(self, key: str, value: Answer) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        return {"backend": "disabled", "hits": 0, "misses": 0, "hit_rate": None}

    def clear(self) -> None:
        return None

    def health(self) -> str | None:
        return None
