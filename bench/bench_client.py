"""The OpenRouter client's per-request cost against two floors, in one run.

    python bench/bench_client.py [--samples N] [--warmup N] [--threads N --calls N]

Starts the emulator in its own process (so it does not share our GIL) and times, one request
at a time over a kept-alive connection: (a) a raw pooled httpx POST, (b) stdlib http.client,
(c) ``OpenRouterClient.complete``; prints median and p99 of each and the ratio (c)/(a).
With ``--threads N`` it then shares one ``OpenRouterClient`` among N threads against an
emulator answering after ``--latency-ms``, over its own single-connection clients and then
over one shared ``httpx.Client`` passed as a host's, and prints calls/s and CPU ms per call
(this process) of each. Nothing is asserted: speed is measured, not tested.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

# Runnable as a plain script from a checkout, with or without an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench.common import emulator_process
from headspace_inference.inference.client import OpenRouterClient
from headspace_inference.inference.types import GenerationParams
from headspace_inference.settings import OpenRouterSettings

KEY = "sk-or-bench-client"
MODEL = "anthropic/claude-haiku-4.5"
MESSAGES = [{"role": "user", "content": "floor request for the client benchmark"}]


def timed(fn: Callable[[], Any], *, warmup: int, samples: int) -> list[float]:
    """Seconds per call of ``fn`` over ``samples`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    clock = time.perf_counter
    out = []
    for _ in range(samples):
        start = clock()
        fn()
        out.append(clock() - start)
    return out


def summary(seconds: list[float]) -> tuple[float, float]:
    """(median, p99) in microseconds."""
    us = sorted(s * 1e6 for s in seconds)
    return statistics.median(us), us[min(len(us) - 1, round(0.99 * (len(us) - 1)))]


def main(argv: list[str] | None = None) -> None:
    """Run the three measurements, interleaved in rounds so drift hits each alike."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=3000, help="timed calls per variant")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=0, help="then N threads share a client")
    parser.add_argument("--calls", type=int, default=6400, help="calls made by the N threads")
    parser.add_argument("--latency-ms", type=int, default=50, help="the emulator's, for --threads")
    args = parser.parse_args(argv)
    single(args)
    if args.threads:
        concurrent(args.threads, args.calls, args.latency_ms)


def concurrent(threads: int, calls: int, latency_ms: int) -> None:
    """``threads`` threads share one OpenRouterClient (max_connections=threads): over its
    own single-connection clients, then over one shared httpx.Client given as a host's."""
    per = max(1, calls // threads)
    params = GenerationParams()
    ideal = threads / (latency_ms / 1000) if latency_ms else float("inf")
    print(f"\n{threads} threads, one client, emulator latency {latency_ms} ms, "
          f"{per * threads} calls (ideal {ideal:.0f} calls/s)")  # fmt: skip
    with emulator_process(latency_ms) as base_url:
        settings = OpenRouterSettings(base_url=base_url, max_connections=threads)
        limits = httpx.Limits(max_connections=threads, max_keepalive_connections=threads)
        with httpx.Client(limits=limits) as shared:
            variants = {
                "its own slots": OpenRouterClient(settings, api_key=KEY),
                "a shared httpx.Client (http_client=)": OpenRouterClient(
                    settings, api_key=KEY, http_client=shared
                ),
            }
            for name, client in variants.items():
                rate, cpu = _share(client, threads, per, params)
                client.close()
                print(f"{name:<38} {rate:6.0f} calls/s, {cpu:.3f} ms CPU per call")


def _share(
    client: OpenRouterClient, threads: int, per: int, params: GenerationParams
) -> tuple[float, float]:
    """(calls/s, CPU ms per call in this process) of ``threads`` threads sharing ``client``."""

    def work() -> None:
        for _ in range(per):
            client.complete(model=MODEL, messages=MESSAGES, params=params)

    client.complete(model=MODEL, messages=MESSAGES, params=params)  # imports, first use
    pool = [threading.Thread(target=work) for _ in range(threads)]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    n = per * threads
    return n / wall, cpu / n * 1000


def single(args: argparse.Namespace) -> None:
    """One request at a time: ours against the two floors."""
    body = json.dumps({"model": MODEL, "messages": MESSAGES}).encode()
    headers = {
        "Authorization": f"Bearer {KEY}",
        "HTTP-Referer": "https://github.com/claude-headspace",
        "X-Title": "Claude Headspace",
        "Content-Type": "application/json",
        "Accept": "application/json",
    }
    params = GenerationParams()
    with emulator_process() as base_url:
        parts = urlsplit(base_url)
        raw = httpx.Client(headers=headers)
        chat_url = f"{base_url}/chat/completions"
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port)
        client = OpenRouterClient(OpenRouterSettings(base_url=base_url), api_key=KEY)

        def raw_httpx() -> Any:
            return raw.post(chat_url, content=body).json()

        def stdlib() -> Any:
            conn.request("POST", f"{parts.path}/chat/completions", body=body, headers=headers)
            return json.loads(conn.getresponse().read())

        def ours() -> Any:
            return client.complete(model=MODEL, messages=MESSAGES, params=params)

        variants: dict[str, Callable[[], Any]] = {
            "(a) raw httpx, pooled": raw_httpx,
            "(b) http.client keep-alive": stdlib,
            "(c) OpenRouterClient.complete": ours,
        }
        results: dict[str, list[float]] = {name: [] for name in variants}
        per_round = max(1, args.samples // args.rounds)
        for _ in range(args.rounds):
            for name, fn in variants.items():
                results[name] += timed(fn, warmup=args.warmup, samples=per_round)
        raw.close()
        conn.close()
        client.close()

    print(f"per request, emulator out of process, latency 0, {per_round * args.rounds} samples")
    print(f"{'variant':<32} {'median us':>10} {'p99 us':>10}")
    medians = {}
    for name, seconds in results.items():
        median, p99 = summary(seconds)
        medians[name] = median
        print(f"{name:<32} {median:>10.1f} {p99:>10.1f}")
    ratio = medians["(c) OpenRouterClient.complete"] / medians["(a) raw httpx, pooled"]
    print(f"ratio (c)/(a), medians: {ratio:.3f}")


if __name__ == "__main__":
    main()
