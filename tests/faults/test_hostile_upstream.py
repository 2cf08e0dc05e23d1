"""A hostile upstream, through the real service and the emulator over HTTP: an answer that
trickles, one that inflates or is simply huge, and provider failures that arrive dressed as
final ones. Each test prints one `FAULT <name>: ...` line with its figures.
"""

from __future__ import annotations

import json
import os
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from headspace_inference.inference import errors as e
from headspace_inference.inference.client import OpenRouterClient
from headspace_inference.inference.service import InferenceService
from headspace_inference.settings import OpenRouterSettings
from headspace_inference.standalone.cli import main
from headspace_inference.testing.emulator import PROVIDER_ERRORS, EmulatorServer, Fault
from tests.emulator_fixtures import TEST_KEY
from tests.integration.test_client import ask
from tests.integration.test_recorder import reap
from tests.service_fixtures import AppFactory, rows

CHAT = "/api/v1/chat/completions"
MIB = 2**20
# How long a call may take past its own bound before a test gives up on it (the unfixed
# code kept a trickled call alive for minutes): a bound for the test, not the property.
GIVE_UP_SECONDS = 20.0


def report(name: str, **figures: Any) -> None:
    print(f"\nFAULT {name}: " + json.dumps(figures), flush=True)


def timed(call: Callable[[], Any]) -> tuple[Any, BaseException | None, float]:
    """``call()`` on a thread of its own: (result, error, seconds taken), or a failure when it
    is still running after GIVE_UP_SECONDS."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = call()
        except BaseException as exc:  # handed back to the test
            out["error"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(GIVE_UP_SECONDS)
    elapsed = time.monotonic() - started
    if thread.is_alive():
        pytest.fail(f"still running after {elapsed:.1f} s")
    return out.get("result"), out.get("error"), elapsed


def service_of(app: Any) -> InferenceService:
    service: InferenceService = app.extensions["inference"]
    return service


# --------------------------------------------------------------------------- a trickle


@pytest.mark.slow
def test_a_trickling_answer_ends_within_the_attempts_timeout(
    make_app: AppFactory, emulator: EmulatorServer
) -> None:
    # One byte a second, status line first: no read ever times out. One connection, so the
    # call after it can only be answered if the trickled one gave its connection back.
    app = make_app(
        openrouter={"timeout_seconds": 2, "max_connections": 1, "retry": {"max_attempts": 1}}
    )
    service = service_of(app)
    emulator.script([Fault(trickle_ms=1000)])

    _, error, elapsed = timed(lambda: service.infer("turn", "trickle", "slowly"))
    again, _, _ = timed(lambda: service.infer("turn", "trickle", "slowly"))

    report("trickle", timeout_seconds=2, elapsed=round(elapsed, 2), error=type(error).__name__)
    assert isinstance(error, e.UpstreamTimeoutError), error
    assert error.attempts == 1
    assert "2 s" in str(error)
    # A bound, with slack for a loaded machine: never the trickle's own length (minutes).
    assert elapsed < 2 + 3
    # The same call again: its single-flight lock and the one connection were given back.
    assert again is not None and again.attempts == 1
    first, second = rows(app)
    assert (first.status, first.error_type, first.attempts) == (
        "error",
        "UpstreamTimeoutError",
        1,
    )
    assert (second.status, second.attempts) == ("ok", 1)


@pytest.mark.slow
@pytest.mark.parametrize("sender", ["own slots, reused", "host's http_client", "transport"])
def test_a_trickle_ends_within_the_timeout_whatever_carries_the_request(
    emulator: EmulatorServer, sender: str
) -> None:
    # The request on our own single-connection slot that an answer left open (so the
    # connection is known before its answer's first byte); or on a host's client or
    # transport, on a new connection.
    given: dict[str, Any] = {}
    if sender == "host's http_client":
        given["http_client"] = httpx.Client()
    elif sender == "transport":
        given["transport"] = httpx.HTTPTransport()
    settings = OpenRouterSettings(base_url=emulator.base_url, timeout_seconds=1)
    client = OpenRouterClient(settings, api_key=TEST_KEY, **given)
    try:
        if not given:
            ask(client)
        emulator.script([Fault(trickle_ms=300)])
        _, error, elapsed = timed(lambda: ask(client))
        assert ask(client).text  # the client, and its slot, still serve
    finally:
        client.close()
        for owned in given.values():
            owned.close()

    assert isinstance(error, e.UpstreamTimeoutError), error
    assert elapsed < 1 + 3


def test_a_forked_child_keeps_the_deadline(emulator: EmulatorServer) -> None:
    # A client that has made requests (its deadline thread running) forked, as a process
    # running the service may be: the child has no copy of the parent's thread.
    settings = OpenRouterSettings(base_url=emulator.base_url, timeout_seconds=1)
    client = OpenRouterClient(settings, api_key=TEST_KEY)
    try:
        ask(client)
        emulator.script([Fault(trickle_ms=300)])
        pid = os.fork()
        if pid == 0:  # the child: a trickled answer must still end within its timeout
            code = 2
            try:
                ask(client)
            except e.UpstreamTimeoutError:
                code = 0
            finally:
                os._exit(code)
        assert reap(pid, GIVE_UP_SECONDS) == 0
    finally:
        client.close()


@pytest.mark.slow
def test_status_answers_within_its_health_timeout_while_the_key_endpoint_trickles(
    make_app: AppFactory, emulator: EmulatorServer
) -> None:
    app = make_app(openrouter={"health": {"timeout_seconds": 2, "cache_seconds": 0}})
    health = service_of(app).health
    assert health is not None
    health.check()  # the start-up probe over: the status request probes on its own
    emulator.script([Fault(trickle_ms=1000)], path="/api/v1/key")

    response, _, elapsed = timed(lambda: app.test_client().get("/api/inference/status"))

    report("trickled /key under /status", health_timeout=2, elapsed=round(elapsed, 2))
    assert response.status_code == 200
    openrouter = response.json["openrouter"]
    assert (openrouter["state"], openrouter["reachable"]) == ("unreachable", False)
    assert "did not answer in time" in openrouter["error"]
    assert elapsed < 2 + 3


# --------------------------------------------------------------------------- size


def test_a_gzip_bomb_is_refused_with_its_row_and_bounded_memory(
    make_app: AppFactory, emulator: EmulatorServer
) -> None:
    # About 0.3 MB on the wire inflating to 300 MB; the emulator makes it as it sends it.
    app = make_app()
    service = service_of(app)
    emulator.script([Fault(huge_bytes=300 * MIB, gzip=True)])
    service.start()

    tracemalloc.start()
    try:
        _, error, _ = timed(lambda: service.infer("turn", "bomb", "inflate"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    report("gzip bomb", inflates_to_mb=300, peak_traced_mb=round(peak / MIB, 1))
    assert isinstance(error, e.InvalidResponseError), error
    assert "openrouter.max_response_bytes" in str(error)
    assert error.attempts == 1  # a retry would pay for another answer of the same size
    assert emulator.request_count(CHAT) == 1
    # The cap (8 MiB) plus what one step of decoding may inflate to: far below 300 MB.
    assert peak < 64 * MIB
    [row] = rows(app)
    assert (row.status, row.error_type, row.attempts) == ("error", "InvalidResponseError", 1)


def test_a_plain_answer_over_the_cap_is_refused_and_never_cached(
    make_app: AppFactory, emulator: EmulatorServer
) -> None:
    app = make_app()
    service = service_of(app)
    emulator.script([Fault(huge_bytes=50 * MIB)])

    _, error, _ = timed(lambda: service.infer("turn", "huge", "fifty megabytes"))

    stats = service.cache.stats()
    report("plain 50 MB answer", error=type(error).__name__, cache_bytes=stats.get("bytes"))
    assert isinstance(error, e.InvalidResponseError), error
    assert "8388608 bytes" in str(error)
    assert stats["entries"] == 0
    [row] = rows(app)
    assert (row.status, row.error_type, row.attempts) == ("error", "InvalidResponseError", 1)


def test_the_memory_cache_stays_within_its_bytes(
    make_app: AppFactory, emulator: EmulatorServer
) -> None:
    bound = 4 * MIB
    app = make_app(openrouter={"cache": {"max_memory_bytes": bound}})
    service = service_of(app)
    # Twenty answers of 300 KB (6 MB in all), then one of 1 MB: more than an eighth of the
    # bound, so never kept.
    emulator.script([Fault(huge_bytes=300_000)] * 20 + [Fault(huge_bytes=MIB)])
    for i in range(21):
        service.infer("turn", "large", f"question {i}")

    stats = service.cache.stats()
    report("memory cache after 6 MB of answers", **{k: stats[k] for k in ("entries", "bytes")})
    assert stats["bytes"] <= bound == stats["max_bytes"]
    assert 0 < stats["entries"] < 20
    assert service.infer("turn", "large", "question 20").cached is False  # not kept


def test_pricing_sync_refuses_a_bomb_and_keeps_the_file(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    prices = tmp_path / "openrouter-pricing.json"
    env = {
        "HEADSPACE_CONFIG": str(tmp_path / "absent.yaml"),
        "HEADSPACE__OPENROUTER__BASE_URL": emulator.base_url,
        "HEADSPACE__OPENROUTER__PRICING_FILE": str(prices),
    }
    assert CliRunner().invoke(main, ["pricing", "sync"], env=env).exit_code == 0
    before = prices.read_bytes()
    # About 1 MB on the wire inflating to 1 GB.
    emulator.script([Fault(huge_bytes=1024 * MIB, gzip=True)], path="/api/v1/models")

    tracemalloc.start()
    try:
        result, _, _ = timed(lambda: CliRunner().invoke(main, ["pricing", "sync"], env=env))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    report("pricing sync bomb", inflates_to_mb=1024, peak_traced_mb=round(peak / MIB, 1))
    assert result.exit_code == 1, result.output
    assert "error: prices not synced" in result.output
    assert "bytes" in result.output
    assert prices.read_bytes() == before
    assert peak < 128 * MIB


# --------------------------------------------------------------------------- provider errors


@pytest.mark.parametrize("shape", sorted(PROVIDER_ERRORS))
def test_a_transient_provider_failure_dressed_as_final_is_retried(
    make_app: AppFactory, emulator: EmulatorServer, shape: str
) -> None:
    app = make_app()
    service = service_of(app)
    emulator.script([PROVIDER_ERRORS[shape]])

    result = service.infer("turn", "provider blip", f"shape {shape}")

    report(f"provider error {shape}", attempts=result.attempts)
    assert result.attempts == 2
    assert emulator.request_count(CHAT) == 2
    [row] = rows(app)
    assert (row.status, row.attempts) == ("ok", 2)


BAD_REQUESTS = {
    "inner code 400": Fault(status=400, message="Invalid request: max_tokens must be positive"),
    "schema error": Fault(
        status=400,
        message="Invalid schema for response_format 'answer': 'type' is required",
        metadata={"provider_name": "OpenAI", "raw": ""},
    ),
    "unknown model": Fault(status=400, message="nope/model is not a valid model ID"),
    "no endpoints": Fault(status=404, message="No endpoints found for nope/model."),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_a_callers_own_bad_request_stays_final(
    make_app: AppFactory, emulator: EmulatorServer, case: str
) -> None:
    app = make_app()
    emulator.script([BAD_REQUESTS[case]])

    with pytest.raises(e.UpstreamError) as caught:
        service_of(app).infer("turn", "bad request", f"case {case}")

    assert isinstance(caught.value, e.BadRequestError | e.ModelNotFoundError)
    assert caught.value.retryable is False
    assert caught.value.attempts == 1
    assert emulator.request_count(CHAT) == 1
    [row] = rows(app)
    assert (row.status, row.attempts) == ("error", 1)
