"""GET /metrics: the service in Prometheus' text format, right under several gunicorn workers.

Four sources, so that each figure is counted once, where it is true:

- the call log's committed-rows hook: calls by level/model/status, tokens by kind, cost,
  saved cost and the latency histogram, counted from the rows as they are committed, so the
  counters equal the table (a cache hit's tokens are not counted again, as in /usage);
- a sampler (every second, and at each scrape in the scraping process): cache hits and
  misses, limiter admissions and rejections as counters of their deltas, and the gauges of
  the moment: callers waiting on the limiter, queued calls, call-log rows pending, spooling;
- the spend guard's event hook: budget events (warning, cap, storm) by kind, counted by the
  process whose call gave them;
- the spend guard's store, read at each scrape by the scraping process alone (a read of
  Redis or the database, too dear for the sampler): each budget's use and cap, by rule and
  project (``""`` for a rule's whole use), as ``service.budget()`` tells them.

Under ``headspace-inference serve`` each worker writes its values to files in
PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode, set up by server.py before any
worker imports it), and a scrape of any worker sums them: counters over every process that ever
ran, gauges over the live ones. Without that variable (one process, tests) each app has a
registry of its own. The budget gauges are not kept in those files at all: a collector of
their own reads the store as the scrape is written (``BudgetGauges``), so every worker's
scrape shows the shared count once, as it is now. Kept in the files, no multiprocess mode
would do: a sum counts the one shared figure once per worker, a max or "mostrecent" keeps a
series another worker last set (a project's use of a window gone by) after it is over.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..calllog.models.inference_call import LATENCY_BUCKETS_MS
from ..calllog.record import CallRecord
from ..inference.service import InferenceService

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 1.0
LATENCY_BUCKETS_S = tuple(ms / 1000 for ms in LATENCY_BUCKETS_MS)
# The model label of a call answered by a model neither configured nor priced, on a level
# with fallbacks: the name an answer carries is the upstream's choice, and every label value
# is a series kept by every process and every scrape, so the set of them is bounded by the
# configuration.
OTHER_MODEL = "(other)"


def multiprocess_dir() -> str | None:
    """The directory prometheus_client shares values through, when it is set."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """One service's metrics (imported lazily: prometheus_client decides at import time
    whether it runs in multiprocess mode, and server.py sets that up first)."""

    def __init__(self, service: InferenceService) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.service = service
        self.shared = multiprocess_dir() is not None
        # In multiprocess mode values live in the directory's files, whatever the registry;
        # a scrape reads them all through a registry of its own.
        self.registry: CollectorRegistry | None = None if self.shared else CollectorRegistry()
        r = self.registry
        p = "headspace_inference_"
        self.calls = Counter(
            f"{p}calls", "Recorded calls", ["level", "model", "status"], registry=r
        )
        self.tokens = Counter(
            f"{p}tokens", "Tokens sent upstream, by kind", ["level", "model", "kind"], registry=r
        )
        self.cost = Counter(f"{p}cost_usd", "Cost of calls, USD", ["level", "model"], registry=r)
        self.saved = Counter(
            f"{p}saved_cost_usd", "What cache hits saved, USD", ["level", "model"], registry=r
        )
        self.latency = Histogram(
            f"{p}latency_seconds",
            "Call latency as recorded",
            ["level"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.cache_hits = Counter(f"{p}cache_hits", "Response cache hits", registry=r)
        self.cache_misses = Counter(f"{p}cache_misses", "Response cache misses", registry=r)
        self.admissions = Counter(
            f"{p}limiter_admissions", "Calls the limiter let through", registry=r
        )
        self.rejections = Counter(f"{p}limiter_rejections", "Calls the limiter refused", registry=r)
        self.waiting = Gauge(
            f"{p}limiter_waiting",
            "Calls waiting on the limiter now",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queued = Gauge(
            f"{p}queue_depth",
            "Calls queued for the workers",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.pending = Gauge(
            f"{p}call_log_pending",
            "Rows not yet in the database",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.spooling = Gauge(
            f"{p}call_log_spooling",
            "1 while the call log spools to disk",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.budget_events = Counter(
            f"{p}budget_events",
            "Spend guard events: a budget's warning mark or cap reached, the storm breaker",
            ["kind"],
            registry=r,
        )
        self.budgets = BudgetGauges(service)
        if self.registry is not None:
            self.registry.register(self.budgets)
        self._lock = threading.Lock()
        self._last: dict[str, int] = {}
        openrouter = service.settings.openrouter
        self._configured = frozenset(openrouter.all_models())
        self._single = frozenset(
            level for level in openrouter.models if not openrouter.route(level)[1]
        )
        service.recorder.on_committed(self.committed)
        service.on_budget_event(self.budget_event)
        self._stop = threading.Event()
        self._sampler = _sample_in_background(self, self._stop)

    def close(self) -> None:
        """End the sampler thread (with the service)."""
        self._stop.set()
        if self._sampler is not threading.current_thread():
            self._sampler.join(timeout=5)

    def committed(self, records: Sequence[CallRecord]) -> None:
        """The call-log writer's hook: count the committed rows."""
        for r in records:
            model = self.model_label(r)
            self.calls.labels(r.level, model, r.status).inc()
            if r.status != "cached":
                if r.input_tokens:
                    self.tokens.labels(r.level, model, "input").inc(r.input_tokens)
                if r.output_tokens:
                    self.tokens.labels(r.level, model, "output").inc(r.output_tokens)
            if r.cost_usd:
                self.cost.labels(r.level, model).inc(float(r.cost_usd))
            if r.saved_cost_usd:
                self.saved.labels(r.level, model).inc(float(r.saved_cost_usd))
            self.latency.labels(r.level).observe(r.latency_ms / 1000)

    def budget_event(self, event: dict[str, Any]) -> None:
        """The spend guard's event hook: count the event by its kind."""
        self.budget_events.labels(str(event.get("kind"))).inc()

    def model_label(self, record: CallRecord) -> str:
        """The model label of a call: the model that answered when it is configured or
        priced; else, as pricing reads it, the model asked for on a level without fallbacks
        (OpenRouter answers under a dated name), OTHER_MODEL on one with fallbacks."""
        model = record.model
        if model in self._configured or self.service.prices.has(model):
            return model
        asked = record.requested_model
        if record.level in self._single and asked in self._configured:
            return asked
        return OTHER_MODEL

    def sample(self) -> None:
        """Read the parts' own counters and gauges into the metrics."""
        service = self.service
        cache = service.cache.stats()
        limiter = service.limiter.stats()
        log_stats = service.recorder.stats()
        queue = service.pool.stats()
        with self._lock:
            for name, counter, value in (
                ("hits", self.cache_hits, cache.get("hits", 0)),
                ("misses", self.cache_misses, cache.get("misses", 0)),
                ("admitted", self.admissions, limiter.get("admitted", 0)),
                ("rejected", self.rejections, limiter.get("rejected", 0)),
            ):
                delta = int(value or 0) - self._last.get(name, 0)
                if delta > 0:
                    counter.inc(delta)
                self._last[name] = int(value or 0)
        self.waiting.set(limiter.get("waiting", 0) or 0)
        self.queued.set(queue.get("queued", 0))
        self.pending.set(log_stats.get("pending", 0))
        self.spooling.set(1 if log_stats.get("state") == "spooling" else 0)

    def render(self) -> tuple[bytes, str]:
        """The text of a scrape, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        self.sample()
        registry = self.registry
        if registry is None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            registry.register(self.budgets)
        return generate_latest(registry), CONTENT_TYPE_LATEST


# The budget gauges: (name, the key of service.budget()'s entries it shows, help).
BUDGET_GAUGES = (
    ("budget_used_usd", "used_usd", "Each budget's use this window, USD (calls in flight too)"),
    ("budget_cap_usd", "cap_usd", "Each budget's cap, USD"),
    ("budget_used_tokens", "used_tokens", "Each budget's use this window, tokens"),
    ("budget_cap_tokens", "cap_tokens", "Each budget's cap, tokens"),
)


class BudgetGauges:
    """A collector of the budget gauges, labelled ``rule`` and ``project`` (``""`` for a
    rule's whole use): read from ``service.budget()`` when a scrape collects it, so they
    are always the store's figures of the moment, and a series is there exactly while
    ``service.budget()`` has its entry (a cap a rule does not have is left out)."""

    def __init__(self, service: InferenceService) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        """The four gauge families, from the store now."""
        from prometheus_client.core import GaugeMetricFamily

        families = [
            (
                key,
                GaugeMetricFamily(f"headspace_inference_{name}", text, labels=["rule", "project"]),
            )
            for name, key, text in BUDGET_GAUGES
        ]
        try:
            states = self._service.budget()
        except Exception as exc:  # a scrape shows what it can; /status tells why not this
            log.warning("metrics: the budgets could not be read: %s", exc)
            states = []
        for state in states:
            project = state.get("project_id")
            labels = [str(state["rule"]), "" if project is None else str(project)]
            for key, family in families:
                value = state.get(key)
                if value is not None:
                    family.add_metric(labels, float(value))
        for _, family in families:
            yield family


def _sample_in_background(metrics: Metrics, stop: threading.Event) -> threading.Thread:
    # Weakly held: the thread ends with the service (stop), or with the app that owns the
    # metrics if that goes first.
    ref = weakref.ref(metrics)

    def run() -> None:
        while not stop.wait(SAMPLE_SECONDS):
            live = ref()
            if live is None:
                return
            try:
                live.sample()
            except Exception as exc:  # a part that cannot answer now; try again next time
                log.debug("metrics: sampling failed: %s", exc)
            del live

    thread = threading.Thread(target=run, name="metrics-sampler", daemon=True)
    thread.start()
    return thread
