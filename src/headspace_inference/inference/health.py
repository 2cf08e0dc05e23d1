"""Is OpenRouter reachable, and does it accept our key? Asked rarely, answered from a cache."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from ..clock import SYSTEM_CLOCK, Clock
from ..settings import OpenRouterSettings
from .client import OpenRouterClient
from .errors import AuthenticationError, InferenceError, ModelNotFoundError, TransportError

log = logging.getLogger(__name__)

# The last three are not a probe's answers: the status says them when the service takes no
# calls (status.py), and then nothing is probed.
HealthState = Literal["healthy", "unreachable", "key_rejected", "no_key", "disabled", "stopped"]


@dataclass(frozen=True)
class KeyCredit:
    """The key's credit as OpenRouter's GET /key told it, in USD: its ``limit`` (None:
    unlimited, or not told), what is left of it and what the key has used."""

    limit: float | None
    limit_remaining: float | None
    usage: float | None

    @classmethod
    def from_key(cls, answer: dict[str, Any]) -> KeyCredit:
        """From /key's answer (``{"data": {...}}``). A field that is not a finite number is
        read as None: the credit is shown to an operator, never a reason to fail a probe."""
        data = answer.get("data")
        fields = data if isinstance(data, dict) else {}
        return cls(*(_usd(fields.get(name)) for name in ("limit", "limit_remaining", "usage")))

    def to_dict(self) -> dict[str, float | None]:
        """JSON-ready form."""
        return {"limit": self.limit, "limit_remaining": self.limit_remaining, "usage": self.usage}


def _usd(value: Any) -> float | None:
    # JSON parsers accept NaN and Infinity (and true is an int to Python): neither is a sum.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class HealthReport:
    """The answer of one probe."""

    state: HealthState
    reachable: bool
    checked_at: datetime | None
    latency_ms: int | None
    error: str | None
    # Known when the probe read GET /key; None when it fell back to /models or failed.
    credit: KeyCredit | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for /api/inference/status."""
        return {
            "state": self.state,
            "reachable": self.reachable,
            "checked_at": self.checked_at.isoformat() if self.checked_at else None,
            "latency_ms": self.latency_ms,
            "error": self.error,
            "credit": self.credit.to_dict() if self.credit else None,
        }


class HealthChecker:
    """Probes OpenRouter (GET /key, whose answer also tells the key's credit, else GET
    /models) with its own short timeout, caches the answer for health.cache_seconds, and
    lets concurrent callers share one probe."""

    def __init__(
        self,
        client: OpenRouterClient,
        settings: OpenRouterSettings,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._client = client
        self._settings = settings
        self._clock = clock
        self._lock = threading.Condition()
        self._last: HealthReport | None = None
        self._last_at = 0.0
        self._probing = False
        self._generation = 0  # probes finished so far; waiters wait for it to move

    def last(self) -> HealthReport | None:
        """The cached answer, without probing."""
        with self._lock:
            return self._last

    def check(self, *, force: bool = False) -> HealthReport:
        """A fresh-enough answer: cached, shared with a probe in flight, or probed now.

        Never raises: every failure is a report.
        """
        timeout = self._settings.health.timeout_seconds
        with self._lock:
            if self._probing:
                # Someone is asking OpenRouter right now: share their answer, forced or not.
                generation = self._generation
                self._lock.wait_for(lambda: self._generation != generation, timeout=timeout + 1)
                if self._generation != generation and self._last is not None:
                    return self._last
                # That probe outlived its own timeout: report it rather than start a second.
                return HealthReport(
                    "unreachable", False, None, None, "the health probe in flight did not finish"
                )
            fresh = self._fresh_answer()
            if fresh is not None and not force:
                return fresh
            self._probing = True
        report: HealthReport | None = None
        try:
            report = self._probe(self._client, timeout)
        finally:
            with self._lock:
                # The answer and the end of the probe are published together, so a waiter
                # never wakes to find the probe over but its answer missing.
                if report is not None:
                    self._last = report
                    self._last_at = self._clock.monotonic()
                self._probing = False
                self._generation += 1
                self._lock.notify_all()
        return report

    def _fresh_answer(self) -> HealthReport | None:
        last = self._last
        if last is None or last.checked_at is None:  # never probed, or not a probe's answer
            return None
        age = self._clock.monotonic() - self._last_at
        return last if age < self._settings.health.cache_seconds else None

    def _probe(self, client: OpenRouterClient, timeout: float) -> HealthReport:
        started = time.perf_counter()
        checked_at = datetime.fromtimestamp(self._clock.time(), UTC)
        credit: KeyCredit | None = None  # what /key said of the key's credit, once it answers

        def report(state: HealthState, reachable: bool, error: str | None) -> HealthReport:
            latency = int((time.perf_counter() - started) * 1000)
            return HealthReport(state, reachable, checked_at, latency, error, credit)

        try:
            try:
                credit = KeyCredit.from_key(client.get_key(timeout=timeout))
            except ModelNotFoundError:
                # No /key endpoint here: a model list at least proves OpenRouter answers.
                client.list_models(timeout=timeout)
        except AuthenticationError as exc:
            return report("key_rejected", True, str(exc))
        except TransportError as exc:
            return report("unreachable", False, str(exc))
        except InferenceError as exc:
            # It answered, but not with a working account (402, 5xx, a broken body...).
            return report("unreachable", exc.status_code is not None, str(exc))
        except Exception as exc:  # a probe must never take the status endpoint down
            log.warning("OpenRouter health probe failed unexpectedly: %s", type(exc).__name__)
            return report("unreachable", False, f"health probe failed: {type(exc).__name__}")
        return report("healthy", True, None)
