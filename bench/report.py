"""Writes BENCHMARKS.md from one run's bench/results/latest.json (`make bench` does both)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FLOOR = "floor: httpx pooled"


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def render(r: dict[str, Any]) -> str:
    lat = r["latency"]
    ratio = r["ratios_to_floor"]
    floor_us = lat[FLOOR]["median_us"]
    m = r["machine"]
    out = [
        "# Benchmarks",
        "",
        "Ours next to the ways a Python service would otherwise call OpenRouter, on one",
        "machine, in one run, against the same local server (the bundled emulator, in its",
        "own process, answering at once unless stated). Every figure below comes from",
        f"`bench/results/latest.json`, written by `make bench` on {r['when']} in {r['seconds']} s",
        f"({m['cpu_count']} cores, Python {m['python']}, {m['platform']}).",
        "",
        "Reproduce: `make bench` (a fresh clone needs nothing else; it installs the `bench`",
        "extra: `openai`, `litellm` with its model-cost map read locally, and what LiteLLM's",
        "Router needs on its cache path). It rewrites this file from its own run.",
        "Ratios are medians divided by the floor's median in the same run; no benchmark",
        "asserts a time.",
        "",
        "## Per call (one caller thread, emulator latency 0)",
        "",
        _row("What", "median µs", "p99 µs", "× httpx floor"),
        _row("---", "---:", "---:", "---:"),
    ]
    for name, s in lat.items():
        out.append(_row(name, f"{s['median_us']:.0f}", f"{s['p99_us']:.0f}", f"{ratio[name]:.2f}"))
    fresh_pg = ratio["ours: infer(), fresh, PostgreSQL log"]
    hit_pg = ratio["ours: infer(), cache hit, PostgreSQL log"]
    hit_sqlite = ratio["ours: infer(), cache hit, SQLite log"]
    out += [
        "",
        "What it means for a user:",
        "",
        "- A fresh call through the whole service (validation, cache lookup, single-flight,",
        "  rate limiter, retry policy, cost, cache store and its `inference_calls` row) costs",
        f"  **{fresh_pg:.2f}×** a bare pooled httpx round trip with PostgreSQL logging (target",
        f"  ≤ 1.5×: {_verdict(fresh_pg <= 1.5)}). The `openai` SDK alone, with no cache, limits",
        f"  or log, is {ratio['openai SDK: chat.completions.create']:.2f}×; `litellm.completion`"
        f" {ratio['litellm.completion']:.2f}×.",
        f"- A cache hit, including its log row, costs **{hit_pg:.2f}×** the floor with",
        f"  PostgreSQL logging and {hit_sqlite:.2f}× with SQLite (target ≤ 0.1×:",
        f"  {_verdict(max(hit_pg, hit_sqlite) <= 0.1)}); a LiteLLM Router local-cache hit is",
        f"  {ratio.get('litellm Router (rpm/tpm, local cache): cache hit', float('nan')):.2f}×.",
        "  The row is written off the caller's path: one journal `write` on the call, the",
        "  database commit in batches on a writer thread (see README, The call log).",
        f"- The floor itself: {floor_us:.0f} µs for httpx; the stdlib `http.client` is",
        f"  {ratio['floor: http.client keep-alive']:.2f}× of it (httpx's own cost per request).",
        "- p99 of fresh calls is dominated by the moments the call-log writer commits a batch",
        "  (it shares the GIL with callers).",
    ]
    st = r.get("structured")
    if st:
        out += [
            "",
            "## A structured call over a plain one",
            "",
            "The host's priority-scoring answer (three `{agent_id, score, reason}` in a list",
            "wrapper, fence-wrapped as Haiku writes it) asked for with",
            "`response_format=Scores` (a pydantic model), against a plain fresh call through",
            "the same service, timed right after it:",
            "",
            f"- Added per call: **{st['added_us']:.0f} µs, {st['added_ratio_to_floor']:.3f}×"
            " the floor** (the difference of the two medians). It holds everything a",
            "  structured call does differently end to end: the schema encoded into a larger",
            "  request, the emulator building a schema-valid answer in its own process (its",
            "  time is in the wall clock), the longer answer, then the fence stripped and the",
            "  answer parsed and validated. How it splits was not measured, except that last",
            "  part:",
            f"- Parse + validate alone: {st['parse_validate_model_ratio_to_floor']:.3f}× the"
            " floor for the pydantic model,",
            f"  {st['parse_validate_dict_ratio_to_floor']:.3f}× for the same schema as a dict"
            " (jsonschema).",
        ]
    out += _spend_guard(lat, ratio)
    tp = r["throughput"]
    out += [
        "",
        "## Throughput under concurrency",
        "",
        f"{tp['callers']} callers through `submit()` ({tp['callers']} workers), emulator latency",
        f"{tp['latency_ms']:.0f} ms, limits high, {tp['calls']} calls, SQLite logging. Ideal =",
        f"workers ÷ latency = {tp['ideal_calls_per_second']:.0f} calls/s.",
        "",
        _row("What", "calls/s", "of ideal", "CPU ms per call (this process)"),
        _row("---", "---:", "---:", "---:"),
    ]
    for name, f in tp.get("floors", {}).items():
        share = f["calls_per_second"] / tp["ideal_calls_per_second"]
        out.append(_row(f"floor: {name}", f"{f['calls_per_second']:.0f}", f"{share:.0%}",
                        f"{f['cpu_ms_per_call']:.2f}"))  # fmt: skip
    out.append(_row("**ours: submit()**", f"{tp['calls_per_second']:.0f}",
                    f"{tp['fraction_of_ideal']:.0%}", f"{tp['cpu_ms_per_call']:.2f}"))  # fmt: skip
    floors = tp.get("floors", {})
    per_request = floors.get("httpx, a client per request", {})
    stdlib_cpu = floors.get("http.client, a connection per thread", {}).get(
        "cpu_ms_per_call", float("nan")
    )
    ceiling = per_request.get("calls_per_second", float("nan")) / tp["ideal_calls_per_second"]
    floor_cpu = per_request.get("cpu_ms_per_call", float("nan"))
    cpu_ratio = tp["cpu_ms_per_call"] / floor_cpu
    out += [
        "",
        f"Targets: ≥ 90% of ideal ({_verdict(tp['fraction_of_ideal'] >= 0.9)}); CPU per call",
        f"within 1.3× of httpx's own per-request CPU in the same run: **{cpu_ratio:.2f}×**",
        f"({_verdict(cpu_ratio <= 1.3)}). On this 2-core machine the limit is CPU under one",
        "GIL, not waiting: 64 threads each spend their call's CPU under one interpreter lock,",
        "and the emulator answering them takes the other core. What the table shows:",
        "",
        "- The second floor row is httpx with nothing but the HTTP request, each request on a",
        f"  single-connection client of its own: {ceiling:.0%} of ideal. That is the ceiling",
        "  for an httpx-based caller on this machine in this run, so the 90% target is only",
        "  reachable when the floor itself is well above it. One shared httpx client is the",
        "  first row: httpcore's shared pool does work in proportion to waiting requests ×",
        "  open connections on every request, which is why the service's client",
        "  (`ClientSlots`) lends a single-connection `httpx.Client` out per request, through",
        "  httpx's public `send` (a host's own `httpx.Client`, given as `http_client=`, is used",
        "  as it is, shared pool included). So the service's whole",
        "  call (validation, hashing, the limiter, single-flight, the future, the journal",
        "  write, the log row and its batch commit) costs "
        f"{cpu_ratio:.2f}× the floor's bare request.",
        "  The answer is parsed once, into the value the cache, the result and the log row",
        "  all take.",
        "- What would go further: the stdlib transport's "
        f"{stdlib_cpu:.2f} ms per call (third floor",
        "  row) shows httpx's own per-request CPU is still most of the budget; an HTTP/2 or",
        "  async transport (one connection, no thread per in-flight call), or more processes",
        "  (`headspace-inference serve --workers N` with Redis sharing the limits, which scales",
        "  across cores) are the levers. We did not hand-roll an HTTP client to win this row.",
    ]
    lb = r["limiter_burst"]
    out += [
        "",
        "## Limiter under burst",
        "",
        f"{lb['requests']} requests from 20 threads against {lb['limit']} calls per",
        f"{lb['window_seconds']} s (memory limiter, real clock).",
        "",
        _row("Most admitted in any window", "Limit", "Used while demand exceeded it", "Took"),
        _row("---:", "---:", "---:", "---:"),
        _row(
            lb["max_in_any_window"],
            lb["limit"],
            f"{lb['utilisation_while_saturated']:.1%}",
            f"{lb['seconds']} s",
        ),
        "",
        f"Targets: never above the limit ({_verdict(lb['max_in_any_window'] <= lb['limit'])}),",
        f"≥ 95% used ({_verdict(lb['utilisation_while_saturated'] >= 0.95)}). Admissions are",
        "scheduled, not polled: a waiter sleeps exactly until its slot.",
        "The cross-process budget (4 processes on one Redis never exceed the limit in any",
        "window) is checked by `tests/integration/test_multiprocess.py`.",
    ]
    so = r.get("scale_out")
    if so:
        mem = lat.get("cache hit: memory tier", {}).get("median_us")
        red = lat.get("cache hit: Redis tier (memory bypassed)", {}).get("median_us")
        out += [
            "",
            "## Scale-out: one budget and one cache through Redis",
            "",
            f"{so['processes']} processes, {so['requests']} requests in all, one Redis, limit",
            f"{so['limit']} calls per {so['window_seconds']:g} s (Redis limiter, real clock):",
            f"at most **{so['max_in_any_window']}** admitted in any window "
            f"({_verdict(so['max_in_any_window'] <= so['limit'])}: never above the limit), "
            f"{so['utilisation_while_saturated']:.1%} of the limit used while demand exceeded it.",
            "Without Redis the same four processes would each admit the limit (4× the budget).",
            "",
            f"A cache hit from the memory tier takes {mem:.1f} µs; from the Redis tier (a",
            f"process that has not seen the answer yet) {red:.0f} µs, still well under one",
            "upstream round trip; the answer is then copied into that process's memory tier.",
        ]
    usage = r.get("usage", {}).get("rows", {})
    if usage:
        out += [
            "",
            "## `/api/inference/usage` on PostgreSQL: rollup vs raw aggregates",
            "",
            "Call rows spread over 90 days; `/usage` over all time through the Flask test",
            "client (median of 50) against the same numbers aggregated from the raw table",
            "(median of 5), same run. `python bench/bench_usage.py --rows 1000000 3000000`.",
            "",
            _row(
                "Rows",
                "/usage median ms",
                "raw aggregates median ms",
                "speed-up",
                "rollup rows",
                "rollup = raw",
            ),
            _row("---:", "---:", "---:", "---:", "---:", "---"),
        ]
        for rows, u in sorted(usage.items(), key=lambda kv: int(kv[0])):
            out.append(_row(f"{int(rows):,}", u["usage_endpoint_median_ms"],
                            u["raw_aggregates_median_ms"], f"{u['speedup']}×", u["rollup_rows"],
                            u["rollup_equals_raw_all_time"]
                            and u["rollup_equals_raw_partial_window"]))  # fmt: skip
        sizes = sorted(usage, key=int)
        first = usage[sizes[0]]
        growth = r["usage"].get("growth")
        out += [
            "",
            f"Targets at {int(sizes[0]):,} rows: < 10 ms "
            f"({_verdict(first['usage_endpoint_median_ms'] < 10)}), ≥ 100× raw "
            f"({_verdict(first['speedup'] >= 100)}); {int(sizes[-1]):,} rows within 1.5× of "
            f"{int(sizes[0]):,}: {growth}× ({_verdict(growth is not None and growth <= 1.5)}).",
            "The answer reads a few hundred day and hour rows whatever the table's size.",
        ]
    console = r.get("console")
    if console:
        out += _console(console)
    fp = r["footprint"]
    out += [
        "",
        "## Footprint",
        "",
        "What each costs over `import flask, sqlalchemy.orm, pydantic, httpx` (which a Flask",
        "host with a database has loaded anyway; peak RSS "
        f"{fp['baseline_rss_mib']} MiB), in fresh interpreters: the least import time of",
        "several, and the median peak RSS. `+ init_app`: a host's app given the extension (it",
        "validates and registers, and starts nothing); `started`: its database migrated and the",
        "service started. openai and litellm: the import, then a client built.",
        "",
        _row("Package", "import ms", "peak RSS MiB over the baseline"),
        _row("---", "---:", "---:"),
    ]
    for name, f in fp.items():
        if isinstance(f, dict):
            shown = "-" if f["import_ms"] is None else f["import_ms"]
            out.append(_row(name, shown, f["rss_mib"]))
    out += [
        "",
        f"`headspace-inference --help` in an empty directory: {fp['help_ms']} ms (least of",
        f"several); files it wrote: {', '.join(fp['help_files']) or 'none'}.",
        "",
    ]
    return "\n".join(out)


GUARD = "spend guard: reserve + settle, "


def _spend_guard(lat: dict[str, Any], ratio: dict[str, float]) -> list[str]:
    """What the spend guard adds to a call, from the per-call rows of the same run."""
    if GUARD + "Redis" not in lat:
        return []

    def us(name: str) -> float:
        return float(lat[name]["median_us"])

    redis_off = "ours: infer(), fresh, SQLite log, Redis, no budgets"
    redis_on = "ours: infer(), fresh, SQLite log, Redis, budgets in Redis"
    sqlite_on = "ours: infer(), fresh, SQLite log, budgets in SQLite"
    sqlite_off = "ours: infer(), fresh, SQLite log"
    return [
        "",
        "## Spend guard",
        "",
        "Three budgets every call meets (its purpose's day, its project's month, everything's",
        "day) and the storm breaker: one attempt's reservation of its worst case and its",
        "correction to the answer's cost, timed alone in each store (rows above):",
        "",
        f"- Per process (what each process counts while its shared store is away):"
        f" **{ratio[GUARD + 'per process']:.3f}×** the floor ({us(GUARD + 'per process'):.0f} µs).",
        f"- Redis (one script per operation, two round trips a call):"
        f" **{ratio[GUARD + 'Redis']:.3f}×** ({us(GUARD + 'Redis'):.0f} µs).",
        f"- The database, when no Redis is configured: SQLite"
        f" {ratio[GUARD + 'SQLite']:.3f}×, PostgreSQL {ratio[GUARD + 'PostgreSQL']:.3f}× (two",
        "  transactions a call, each a commit; a host that guards many calls a second",
        "  configures Redis).",
        f"- A whole fresh call: {ratio[sqlite_off]:.2f}× without budgets, {ratio[sqlite_on]:.2f}×"
        " with them in SQLite;",
        f"  with Redis (limiter, cache and single-flight there too) {ratio[redis_off]:.2f}×"
        f" without budgets, {ratio[redis_on]:.2f}× with them.",
    ]


def _console(c: dict[str, Any]) -> list[str]:
    """The operator console's section: calls pages, the feed's delay, a /metrics scrape."""
    pages = c["calls"]["rows"]
    out = [
        "",
        "## The operator console",
        "",
        "`GET /api/inference/calls?limit=50` on PostgreSQL through the Flask test client, median",
        "of 50: the first page, a deep page (a cursor 90 % down the table) and the same with",
        "`level=task`. Keyset pages (never OFFSET): an index range scan from the cursor.",
        "`python bench/bench_console.py --rows 1000000 3000000`.",
        "",
        _row("Rows", "first page ms", "deep page ms", "deep page, level filter ms"),
        _row("---:", "---:", "---:", "---:"),
    ]
    for rows, p in sorted(pages.items(), key=lambda kv: int(kv[0])):
        out.append(
            _row(f"{int(rows):,}", p["first_page_ms"], p["deep_page_ms"], p["deep_page_level_ms"])
        )
    worst = max(max(p.values()) for p in pages.values())
    growth = c["calls"].get("deep_growth")
    out += [
        "",
        f"Target: < 20 ms median at every size and depth ({_verdict(worst < 20)}); the deep "
        f"page at the largest size is {growth}× the smallest's "
        f"({_verdict(growth is not None and growth <= 1.5)}: flat).",
    ]
    feed, metrics = c["feed"], c["metrics"]
    out += [
        "",
        f"Live feed ({feed['transport']} LISTEN/NOTIFY, one open stream): from a call's "
        f"return to its `inference_call` event, median {feed['median_ms']} ms, p90 "
        f"{feed['p90_ms']} ms over {feed['events']} calls. Most of it is the call log's batch "
        "linger (50 ms): an event is sent only once its row is committed.",
        "",
        f"`GET /metrics` from `headspace-inference serve --workers {metrics['workers']}` "
        f"(multiprocess mode), after {metrics['calls']} calls spread over the workers "
        f"({metrics['series']} series): median {metrics['median_ms']} ms a scrape over HTTP.",
    ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", nargs="?", default="latest.json", help="in bench/results")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument(
        "--check", action="store_true", help="fail if --out differs from what the results give"
    )
    args = parser.parse_args()
    source = ROOT / "bench" / "results" / args.results
    text = render(json.loads(source.read_text()))
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            sys.exit(
                f"{args.out.name} is not what bench/report.py makes of {source.name}: "
                "run `make bench` (or `python -m bench.report`) and commit both"
            )
        print(f"{args.out.name} matches {source.name}")
        return
    args.out.write_text(text)
    print(f"wrote {args.out} from {source.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
