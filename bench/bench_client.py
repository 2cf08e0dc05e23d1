"""The OpenRouter client's per-request cost against two floors, in one run.

    python bench/bench_client.py [--samples N] [--warmup N]

Starts the emulator in its own process (so it does not share our GIL) and times, one request
at a time over a kept-alive connection: (a) a raw pooled httpx POST, (b) stdlib http.client,
(c) ``OpenRouterClient.complete``; prints median and p99 of each and the ratio (c)/(a).
Nothing is asserted: speed is measured, not tested.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

# Runnable as a plain script from a checkout, with or without an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from claude_headspace.config import OpenRouterSettings
from claude_headspace.inference.client import OpenRouterClient
from claude_headspace.inference.types import GenerationParams

KEY = "sk-or-bench-client"
MODEL = "anthropic/claude-haiku-4.5"
MESSAGES = [{"role": "user", "content": "floor request for the client benchmark"}]


@contextlib.contextmanager
def emulator_process() -> Iterator[str]:
    """The emulator in a child process; yields its base URL (read from its first line)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "claude_headspace.emulator", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        url = line.split()[-1] if line else ""
        if not url.startswith("http"):
            raise RuntimeError(f"emulator did not start: {line!r}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


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
    args = parser.parse_args(argv)

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
