"""`make bench`: every benchmark in one run, against one emulator, on this machine.

Prints each figure with its ratio to the floor (a raw pooled httpx round trip) and writes
bench/results/latest.json. Nothing here asserts a time; `--quick` takes few samples so CI
can check that the benchmarks still run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    BENCH_KEY,
    HAIKU,
    Summary,
    chat_body,
    emulator_process,
    postgres_database,
    sample,
    summarise,
)

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network for litellm
RESULTS = Path(__file__).parent / "results"


class Run:
    """Collects the figures of one run."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.samples = 60 if quick else 2000
        self.warmup = 10 if quick else 200
        self.latency: dict[str, Summary] = {}
        self.other: dict[str, Any] = {}

    def time(self, name: str, fn: Any, *, samples: int | None = None) -> Summary:
        summary = summarise(name, sample(fn, warmup=self.warmup, samples=samples or self.samples))
        self.latency[name] = summary
        floor = self.latency.get("floor: httpx pooled")
        ratio = f"{summary.median_us / floor.median_us:5.2f}x" if floor else "  -  "
        print(
            f"  {name:<46} median {summary.median_us:8.1f} us   p99 {summary.p99_us:8.1f} us"
            f"   {ratio} floor",
            flush=True,
        )
        return summary


# --------------------------------------------------------------------------- databases


def make_service(
    base_url: str,
    db_url: str,
    spool: Path,
    *,
    openrouter: dict[str, Any] | None = None,
    redis: dict[str, Any] | None = None,
    **inference: Any,
) -> Any:
    from headspace_inference import create_app

    app = create_app(
        overrides={
            "database": {"url": db_url, "auto_migrate": True},
            "openrouter": {
                "base_url": base_url,
                "api_key": BENCH_KEY,
                "rate_limits": {"calls_per_minute": 10**7, "tokens_per_minute": 10**9},
                "health": {"cache_seconds": 3600},
                # Thousands of calls of one purpose a second: the breaker counts them (its
                # cost is part of every figure) but must not trip.
                "storm_breaker": {"calls": 10**9},
                **(openrouter or {}),
            },
            "inference": {"spool_path": str(spool), **inference},
            **({"redis": redis} if redis else {}),
        }
    )
    return app.extensions["inference"]


# --------------------------------------------------------------------------- per call


def per_call(run: Run, base_url: str, work: Path) -> None:
    print("\nPer call, emulator latency 0 (one client thread)", flush=True)
    body = json.dumps(chat_body("floor request")).encode()
    headers = {"Authorization": f"Bearer {BENCH_KEY}", "Content-Type": "application/json"}
    with httpx.Client(base_url=base_url, headers=headers) as client:
        run.time(
            "floor: httpx pooled",
            lambda i: client.post("/chat/completions", content=body).json(),
        )
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port)

    def stdlib(i: int) -> None:
        conn.request("POST", f"{parts.path}/chat/completions", body=body, headers=headers)
        json.loads(conn.getresponse().read())

    run.time("floor: http.client keep-alive", stdlib)
    conn.close()

    service = make_service(base_url, f"sqlite:///{work / 'bench.db'}", work / "spool-sqlite")
    run.time(
        "ours: infer(), fresh, SQLite log",
        lambda i: service.infer("turn", "bench", f"fresh sqlite {i} {uuid.uuid4().hex}"),
    )
    run.time("ours: infer(), cache hit, SQLite log", lambda i: service.infer("turn", "b", "hit"))
    structured(run, service)
    service.close()

    with postgres_database() as pg_url:
        service = make_service(base_url, pg_url, work / "spool-pg")
        run.time(
            "ours: infer(), fresh, PostgreSQL log",
            lambda i: service.infer("turn", "bench", f"fresh pg {i} {uuid.uuid4().hex}"),
        )
        run.time(
            "ours: infer(), cache hit, PostgreSQL log",
            lambda i: service.infer("turn", "bench", "the same words"),
        )
        service.close()

    import openai

    sdk = openai.OpenAI(base_url=base_url, api_key=BENCH_KEY, max_retries=0)
    run.time(
        "openai SDK: chat.completions.create",
        lambda i: sdk.chat.completions.create(
            model=HAIKU, messages=[{"role": "user", "content": f"openai {i}"}]
        ),
    )
    sdk.close()

    import litellm

    litellm.telemetry = False
    llm_model = f"openrouter/{HAIKU}"
    run.time(
        "litellm.completion",
        lambda i: litellm.completion(
            model=llm_model,
            messages=[{"role": "user", "content": f"litellm {i} {uuid.uuid4().hex}"}],
            api_base=base_url,
            api_key=BENCH_KEY,
        ),
        samples=max(60, run.samples // 4),
    )
    router = litellm.Router(
        model_list=[
            {
                "model_name": "haiku",
                "litellm_params": {
                    "model": llm_model,
                    "api_base": base_url,
                    "api_key": BENCH_KEY,
                    "rpm": 10**6,
                    "tpm": 10**9,
                },
            }
        ],
        cache_responses=True,
        cache_kwargs={"type": "local"},
    )
    run.time(
        "litellm Router (rpm/tpm, local cache): fresh",
        lambda i: router.completion(
            model="haiku", messages=[{"role": "user", "content": f"router {i} {uuid.uuid4()}"}]
        ),
        samples=max(60, run.samples // 4),
    )
    run.time(
        "litellm Router (rpm/tpm, local cache): cache hit",
        lambda i: router.completion(
            model="haiku", messages=[{"role": "user", "content": "router same words"}]
        ),
        samples=max(60, run.samples // 4),
    )


# --------------------------------------------------------------------------- spend guard

# Claude Headspace's kind of rules: a purpose's day, each project's month, everything's day;
# every call below meets all three, and the storm breaker (on, its default).
BENCH_BUDGETS = [
    {"name": "summaries", "scope": {"purpose": "bench"}, "window": "day", "cap_usd": 10**5},
    {"name": "per-project", "scope": {"project_id": "each"}, "window": "month", "cap_usd": 10**5},
    {"name": "everything", "window": "day", "cap_usd": 10**5, "cap_tokens": 10**11},
]
GUARD_NAMES = {
    "memory": "spend guard: reserve + settle, per process",
    "redis": "spend guard: reserve + settle, Redis",
    "sqlite": "spend guard: reserve + settle, SQLite",
    "postgresql": "spend guard: reserve + settle, PostgreSQL",
}


def spend_guard(run: Run, base_url: str, work: Path) -> None:
    """What the guard adds to a fresh call: its reserve and settle alone, in each store
    (three budgets and the breaker), and a whole fresh call with and without budgets."""
    from sqlalchemy import text

    from headspace_inference.inference.budget import SpendGuard
    from headspace_inference.inference.budget_store import MemoryBudgetStore
    from headspace_inference.inference.request import RequestBuilder
    from headspace_inference.inference.types import Answer
    from headspace_inference.inference.validation import check_call

    print("\nSpend guard (three budgets and the storm breaker on every call)", flush=True)
    answer = Answer("text " * 40, HAIKU, 120, 60, Decimal("0.0004"), Decimal("0.0004"))

    def timed(name: str, guard: SpendGuard, settings: Any) -> None:
        build = RequestBuilder(settings.openrouter)
        options = {"project_id": 1, "max_tokens": 200}
        call = check_call("turn", "bench", "a turn to summarise " * 20, options,
                          levels=settings.levels, max_input_chars=10**6)  # fmt: skip
        request = build(call)

        def once(i: int) -> None:
            guard.settle(guard.reserve(request, first_attempt=True), answer)

        run.time(name, once)

    def with_project(service: Any) -> Any:
        with service.database.engine.begin() as conn:
            conn.execute(text("INSERT INTO projects (id, name, created_at) "
                              "VALUES (1, 'bench', '2026-01-01 00:00:00')"))  # fmt: skip
        return service

    openrouter = {"budgets": BENCH_BUDGETS, "storm_breaker": {"calls": 10**9}}
    sqlite = with_project(make_service(base_url, f"sqlite:///{work / 'guard.db'}",
                                       work / "spool-guard", openrouter=openrouter))  # fmt: skip
    # The same rules counted in this process alone (what each process does while its
    # shared store is away).
    per_process = SpendGuard(
        sqlite.settings.openrouter, store=MemoryBudgetStore(), prices=sqlite.prices,
        default_max_tokens=sqlite.settings.inference.default_max_tokens,
    )  # fmt: skip
    timed(GUARD_NAMES["memory"], per_process, sqlite.settings)
    timed(GUARD_NAMES["sqlite"], sqlite.guard, sqlite.settings)
    run.time(
        "ours: infer(), fresh, SQLite log, budgets in SQLite",
        lambda i: sqlite.infer("turn", "bench", f"guarded {i} {uuid.uuid4().hex}", project_id=1),
    )
    sqlite.close()
    prefix = f"hs-bench-{uuid.uuid4().hex[:8]}"
    redis = {"url": REDIS_URL, "key_prefix": prefix}
    # With Redis the limiter, the cache and single-flight go through it too: the same
    # service without budgets tells the guard's part.
    for budgets, name in (({}, "no budgets"), (openrouter, "budgets in Redis")):
        redis_service = with_project(make_service(
            base_url, f"sqlite:///{work / f'guard-redis-{len(budgets)}.db'}",
            work / f"spool-guard-redis-{len(budgets)}", openrouter=budgets, redis=redis,
        ))  # fmt: skip
        if budgets:
            timed(GUARD_NAMES["redis"], redis_service.guard, redis_service.settings)
        run.time(
            f"ours: infer(), fresh, SQLite log, Redis, {name}",
            lambda i: redis_service.infer(  # noqa: B023 (timed before the loop moves on)
                "turn", "bench", f"redis {i} {uuid.uuid4()}", project_id=1
            ),
        )
        redis_service.close()
    import redis as redis_lib

    client = redis_lib.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()
    with postgres_database() as pg_url:
        pg = with_project(make_service(base_url, pg_url, work / "spool-guard-pg",
                                       openrouter=openrouter))  # fmt: skip
        timed(GUARD_NAMES["postgresql"], pg.guard, pg.settings)
        pg.close()


# --------------------------------------------------------------------------- structured


def structured(run: Run, service: Any) -> None:
    """A structured call next to a plain one (same service, same emulator), and the parse
    and validation it adds, alone: the host's priority-scoring answer, three agents."""
    from pydantic import BaseModel, Field

    from headspace_inference.inference.structured import answer_schema

    class Score(BaseModel):
        agent_id: int
        score: int = Field(ge=0, le=100)
        reason: str

    class Scores(BaseModel):
        scores: list[Score]

    schema_dict = Scores.model_json_schema()
    run.time(
        "ours: infer(response_format=model), fresh, SQLite",
        lambda i: service.infer(
            "turn", "bench", f"structured {i} {uuid.uuid4().hex}", response_format=Scores
        ),
    )
    # The plain fresh call again, right after: the two are compared within the same minute.
    run.time(
        "ours: infer(), fresh, SQLite (again)",
        lambda i: service.infer("turn", "bench", f"plain again {i} {uuid.uuid4().hex}"),
    )
    answer = json.dumps(
        {"scores": [{"agent_id": n, "score": 10 * n, "reason": "blocked on review"}
                    for n in range(1, 4)]}
    )  # fmt: skip
    fenced = f"```json\n{answer}\n```"
    by_model, by_dict = answer_schema(Scores), answer_schema(schema_dict)
    run.time("structured: parse + validate, pydantic model", lambda i: by_model.parse(fenced))
    run.time("structured: parse + validate, JSON Schema dict", lambda i: by_dict.parse(fenced))
    lat = run.latency
    floor = lat["floor: httpx pooled"].median_us
    plain = lat["ours: infer(), fresh, SQLite (again)"].median_us
    added = lat["ours: infer(response_format=model), fresh, SQLite"].median_us - plain
    run.other["structured"] = {
        "added_us": round(added, 1),
        "added_ratio_to_floor": round(added / floor, 3),
        "parse_validate_model_ratio_to_floor": round(
            lat["structured: parse + validate, pydantic model"].median_us / floor, 4
        ),
        "parse_validate_dict_ratio_to_floor": round(
            lat["structured: parse + validate, JSON Schema dict"].median_us / floor, 4
        ),
    }


# --------------------------------------------------------------------------- throughput


def _concurrency_floors(base_url: str, callers: int, calls: int) -> dict[str, Any]:
    """The same load without the service: what httpx and the stdlib manage here."""
    import http.client
    import queue
    from urllib.parse import urlsplit

    body = json.dumps(chat_body("floor")).encode()
    headers = {"Authorization": f"Bearer {BENCH_KEY}", "Content-Type": "application/json"}
    per = max(1, calls // callers)

    def measure(fn: Any) -> dict[str, float]:
        threads = [threading.Thread(target=lambda: [fn() for _ in range(per)])
                   for _ in range(callers)]  # fmt: skip
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        n = per * callers
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        return {"calls_per_second": round(n / wall, 1), "cpu_ms_per_call": round(cpu / n * 1000, 3)}

    out = {}
    limits = httpx.Limits(max_connections=callers, max_keepalive_connections=callers)
    with httpx.Client(base_url=base_url, headers=headers, limits=limits) as shared:
        out["httpx, one shared client"] = measure(
            lambda: shared.post("/chat/completions", content=body).json()
        )
    idle: queue.LifoQueue[httpx.Client] = queue.LifoQueue()
    one = httpx.Limits(max_connections=1)
    clients = [httpx.Client(base_url=base_url, headers=headers, limits=one) for _ in range(callers)]
    for c in clients:
        idle.put(c)

    def checkout() -> None:
        c = idle.get()
        try:
            c.post("/chat/completions", content=body).json()
        finally:
            idle.put(c)

    out["httpx, a client per request"] = measure(checkout)
    for c in clients:
        c.close()
    parts = urlsplit(base_url)
    local = threading.local()

    def stdlib() -> None:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port)
        local.conn.request("POST", f"{parts.path}/chat/completions", body=body, headers=headers)
        json.loads(local.conn.getresponse().read())

    out["http.client, a connection per thread"] = measure(stdlib)
    for name, figures in out.items():
        print(f"  floor: {name:<38} {figures['calls_per_second']:7.0f} calls/s, "
              f"{figures['cpu_ms_per_call']:.2f} ms CPU per call", flush=True)  # fmt: skip
    return out


def throughput(run: Run, base_url: str, work: Path) -> None:
    callers, latency = 64, 0.050
    calls = 640 if run.quick else 6400
    print(f"\nThroughput: {callers} callers through submit(), emulator latency 50 ms", flush=True)
    floors = _concurrency_floors(base_url, callers, calls)
    service = make_service(base_url, f"sqlite:///{work / 'tp.db'}", work / "spool-tp",
                           workers=callers, queue_size=calls)  # fmt: skip
    service.infer("turn", "warm", "warm up")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    futures = [service.submit("turn", "tp", f"throughput {i} {uuid.uuid4().hex}")
               for i in range(calls)]  # fmt: skip
    for f in futures:
        f.result(timeout=300)
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    service.close()
    ideal = callers / latency
    rate = calls / wall
    run.other["throughput"] = {
        "calls": calls, "callers": callers, "latency_ms": latency * 1000,
        "calls_per_second": round(rate, 1), "ideal_calls_per_second": ideal,
        "fraction_of_ideal": round(rate / ideal, 3),
        "cpu_ms_per_call": round(cpu / calls * 1000, 3),
        "floors": floors,
    }  # fmt: skip
    print(f"  {rate:.0f} calls/s of an ideal {ideal:.0f} ({rate / ideal:.1%}); "
          f"{cpu / calls * 1000:.2f} ms CPU per call in this process", flush=True)  # fmt: skip


# --------------------------------------------------------------------------- limiter


def limiter_burst(run: Run) -> None:
    from headspace_inference.inference.ratelimit import MemoryRateLimiter
    from headspace_inference.settings import RateLimitSettings

    limit, window, requests = 100, 0.5, 1000
    print(f"\nLimiter under burst: {requests} requests, {limit} per {window} s", flush=True)
    limiter = MemoryRateLimiter(
        RateLimitSettings(calls_per_minute=limit, tokens_per_minute=10**9,
                          window_seconds=window, max_wait_seconds=60)
    )  # fmt: skip
    admitted: list[float] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for _ in range(n):
            # The time the limiter granted (its own clock): what it promises to keep.
            admitted_at = limiter.acquire(1).admitted_at
            with lock:
                admitted.append(admitted_at)

    threads = [threading.Thread(target=worker, args=(requests // 20,)) for _ in range(20)]
    start = time.monotonic()  # the memory limiter's clock
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    times = sorted(a - start for a in admitted)
    worst = max(sum(1 for u in times[i:] if u < t + window) for i, t in enumerate(times))
    full_windows = int(times[-1] // window)
    per_window = [sum(1 for u in times if k * window <= u < (k + 1) * window)
                  for k in range(full_windows)]  # fmt: skip
    used = sum(per_window) / (limit * len(per_window)) if per_window else 1.0
    run.other["limiter_burst"] = {
        "requests": requests, "limit": limit, "window_seconds": window,
        "max_in_any_window": worst, "utilisation_while_saturated": round(used, 3),
        "seconds": round(times[-1], 3),
    }  # fmt: skip
    print(f"  at most {worst} admitted in any {window} s window (limit {limit}); "
          f"{used:.1%} of the limit used while demand exceeded it", flush=True)  # fmt: skip


# --------------------------------------------------------------------------- scale-out

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _limiter_process(prefix: str, requests: int, limit: int, window: float, out: Any) -> None:
    import redis as redis_lib

    from headspace_inference.inference.ratelimit import RedisRateLimiter
    from headspace_inference.settings import RateLimitSettings

    settings = RateLimitSettings(calls_per_minute=limit, tokens_per_minute=10**9,
                                 window_seconds=window, max_wait_seconds=120)  # fmt: skip
    limiter = RedisRateLimiter(redis_lib.Redis.from_url(REDIS_URL), settings, prefix=prefix)
    out.put([limiter.acquire(1).admitted_at for _ in range(requests)])


def scale_out(run: Run) -> None:
    import multiprocessing

    import redis as redis_lib

    from headspace_inference.inference.cache import MemoryCache, RedisCache
    from headspace_inference.inference.types import Answer
    from headspace_inference.settings import CacheSettings

    print("\nScale-out on Redis", flush=True)
    client = redis_lib.Redis.from_url(REDIS_URL)
    prefix = f"hs-bench-{uuid.uuid4().hex[:8]}"
    try:
        answer = Answer("text " * 40, HAIKU, 100, 50, Decimal("0.0004"), Decimal("0.0004"),
                        "gen-1", "Anthropic", "stop")  # fmt: skip
        memory = MemoryCache(CacheSettings())
        shared = RedisCache(client, CacheSettings(), prefix=prefix)
        memory.put("k", answer)
        shared.put("k", answer)
        run.time("cache hit: memory tier", lambda i: memory.get("k"))
        run.time("cache hit: Redis tier (memory bypassed)", lambda i: shared.get("k"))

        processes, per, limit, window = 4, 100, 50, 1.0
        queue: Any = multiprocessing.get_context("fork").Queue()
        procs = [
            multiprocessing.get_context("fork").Process(
                target=_limiter_process, args=(prefix, per, limit, window, queue)
            )
            for _ in range(processes)
        ]
        for p in procs:
            p.start()
        times = sorted(t for _ in procs for t in queue.get(timeout=120))
        for p in procs:
            p.join()
        start = times[0]
        worst = max(sum(1 for u in times[i:] if u < t + window) for i, t in enumerate(times))
        windows = int((times[-1] - start) // window)
        per_window = [sum(1 for u in times if k <= (u - start) / window < k + 1)
                      for k in range(windows)]  # fmt: skip
        used = sum(per_window) / (limit * len(per_window)) if per_window else 1.0
        run.other["scale_out"] = {
            "processes": processes, "requests": processes * per, "limit": limit,
            "window_seconds": window, "max_in_any_window": worst,
            "utilisation_while_saturated": round(used, 3),
        }  # fmt: skip
        print(f"  {processes} processes x {per} requests on one Redis, limit {limit} per "
              f"{window:g} s: at most {worst} admitted in any window; {used:.1%} of the limit "
              "used", flush=True)  # fmt: skip
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


# --------------------------------------------------------------------------- footprint


BASELINE = "import flask, sqlalchemy.orm, pydantic, httpx"
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report this
# (large) benchmark process's peak instead of its own.
_PROBE = (
    "{baseline}; import time; t = time.perf_counter(); {imp}; d = time.perf_counter() - t; "
    "{build}; hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
    "print(d, hwm.split()[1])"
)


def _probe(imp: str, build: str, samples: int, cwd: str) -> tuple[float, float]:
    """Import ``imp`` over the baseline in fresh interpreters: (least ms, median peak MiB)."""
    code = _PROBE.format(baseline=BASELINE, imp=imp or "pass", build=build or "pass")
    runs = []
    for _ in range(samples):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=cwd,
            env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
        )  # fmt: skip
        seconds, rss_kb = out.stdout.split()[-2:]
        runs.append((float(seconds) * 1000, int(rss_kb) / 1024))
    return min(r[0] for r in runs), statistics.median(r[1] for r in runs)


def footprint(run: Run) -> None:
    samples = 3 if run.quick else 10
    print(f"\nFootprint over `{BASELINE}` (fresh interpreters: least time of {samples}, "
          "median peak RSS)", flush=True)  # fmt: skip
    host = (
        "from flask import Flask; app = Flask('host', instance_path='%s'); "
        "app.config['SQLALCHEMY_DATABASE_URI'] = 'sqlite:///%s/host.db'; "
        "import headspace_inference; "
        "headspace_inference.Inference(app, settings=__import__("
        "'headspace_inference.settings', fromlist=['x']).Settings())"
    )
    probes = {
        "headspace_inference": ("import headspace_inference", ""),
        "headspace_inference + init_app": ("", host),
        "headspace_inference started": (
            "",
            host + "; s = app.extensions['inference']; s.database.upgrade(); s.start(); s.close()",
        ),
        "openai": ("import openai", "openai.OpenAI(api_key='x')"),
        "litellm": ("import litellm", "litellm.Router(model_list=[])"),
    }
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as work:
        _, base_mib = _probe("", "", samples, work)
        for name, (imp, build) in probes.items():
            ms, mib = _probe(imp, build.replace("%s", work), samples, work)
            # A build step's time is not an import's: only the import is timed.
            results[name] = {
                "import_ms": round(ms, 1) if imp else None,
                "rss_mib": round(mib - base_mib, 1),
            }
            shown = f"{ms:7.1f} ms" if imp else "        -"
            print(f"  {name:<32} import {shown}   peak RSS {mib - base_mib:+6.1f} MiB",
                  flush=True)  # fmt: skip
        results["baseline_rss_mib"] = round(base_mib, 1)
    command = str(Path(sys.executable).with_name("headspace-inference"))
    times = []
    with tempfile.TemporaryDirectory() as empty:
        for _ in range(samples):
            started = time.perf_counter()
            subprocess.run([command, "--help"], capture_output=True, check=True, cwd=empty)
            times.append((time.perf_counter() - started) * 1000)
        left = sorted(str(p.relative_to(empty)) for p in Path(empty).rglob("*"))
    results["help_ms"] = round(min(times), 1)
    results["help_files"] = left
    print(f"  headspace-inference --help: {min(times):.0f} ms (least of {samples}); "
          f"files written: {left or 'none'}", flush=True)  # fmt: skip
    run.other["footprint"] = results


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few samples (CI smoke run)")
    parser.add_argument("--skip-usage", action="store_true", help="skip the /usage benchmark")
    parser.add_argument(
        "--skip-console", action="store_true", help="skip the operator console's benchmarks"
    )
    args = parser.parse_args()
    run = Run(args.quick)
    started = time.time()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, {platform.platform()}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with emulator_process(latency_ms=0) as base_url:
            per_call(run, base_url, work)
            spend_guard(run, base_url, work)
        with emulator_process(latency_ms=50) as base_url:
            throughput(run, base_url, work)
    limiter_burst(run)
    scale_out(run)
    footprint(run)
    if not args.skip_usage:
        print("\n/usage on PostgreSQL: rollup vs raw aggregates", flush=True)
        rows = ["20000", "60000"] if args.quick else ["1000000", "3000000"]
        out = subprocess.run(
            [sys.executable, "bench/bench_usage.py", "--json", "--rows", *rows],
            capture_output=True, text=True,
        )  # fmt: skip
        print(out.stdout.strip() and out.stdout.strip().splitlines()[-1][:2000], flush=True)
        with contextlib.suppress(ValueError, IndexError):
            run.other["usage"] = json.loads(out.stdout.strip().splitlines()[-1])
    if not args.skip_console:
        print("\nthe operator console on PostgreSQL: calls pages, feed delay, /metrics", flush=True)
        sizes = [] if args.quick else ["--rows", "1000000", "3000000"]
        quick = ["--quick"] if args.quick else []
        out = subprocess.run(
            [sys.executable, "bench/bench_console.py", "--json", *quick, *sizes],
            capture_output=True, text=True,
        )  # fmt: skip
        print(out.stdout.strip() and out.stdout.strip().splitlines()[-1][:2000], flush=True)
        with contextlib.suppress(ValueError, IndexError):
            run.other["console"] = json.loads(out.stdout.strip().splitlines()[-1])
    ru = resource.getrusage(resource.RUSAGE_SELF)
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "command": "make bench" + (" (--quick)" if args.quick else ""),
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "seconds": round(time.time() - started, 1),
        "max_rss_mb": round(ru.ru_maxrss / 1024, 1),
        "latency": {k: v.as_dict() for k, v in run.latency.items()},
        **run.other,
    }
    floor = run.latency["floor: httpx pooled"].median_us
    result["ratios_to_floor"] = {k: round(v.median_us / floor, 3) for k, v in run.latency.items()}
    RESULTS.mkdir(exist_ok=True)
    name = "quick.json" if args.quick else "latest.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
    print(f"\nwrote bench/results/{name} after {result['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
