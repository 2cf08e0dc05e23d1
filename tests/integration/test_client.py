"""The OpenRouter client over real HTTP against the emulator: answers, errors, retries, secrets."""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime
from decimal import Decimal
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from tests.emulator_fixtures import TEST_KEY, ClientFactory, settings_for

from claude_headspace.clock import FakeClock
from claude_headspace.emulator import EmulatorServer, Fault
from claude_headspace.emulator.server import PRICES
from claude_headspace.inference import errors as e
from claude_headspace.inference.client import OpenRouterClient
from claude_headspace.inference.retry import RetryPolicy
from claude_headspace.inference.types import GenerationParams

CHAT = "/api/v1/chat/completions"
HAIKU = "anthropic/claude-haiku-4.5"
SONNET = "anthropic/claude-sonnet-4.5"
CANARY = "sk-or-v1-CANARY-c1e2n3t4-do-not-log-5f6a7b8c9d"
NO_PARAMS = GenerationParams()


def ask(client: OpenRouterClient, text: str = "hello there", **params: Any) -> Any:
    return client.complete(
        model=HAIKU, messages=[{"role": "user", "content": text}], params=GenerationParams(**params)
    )


# --------------------------------------------------------------------------- answers


def test_a_completion_is_parsed_whole(emulator: EmulatorServer, make_client: ClientFactory) -> None:
    client = make_client()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Summarise the turn where the agent fixed the flaky test."},
    ]
    got = client.complete(model=SONNET, messages=messages, params=NO_PARAMS)
    assert "Summarise the turn" in got.text
    assert got.model == SONNET
    assert got.generation_id is not None and got.generation_id.startswith("gen-")
    assert got.provider == "Anthropic"
    assert got.finish_reason == "stop"
    assert got.input_tokens > 0 and got.output_tokens > 0
    p_in, p_out = PRICES[SONNET]
    expected = (got.input_tokens * p_in + got.output_tokens * p_out) / 1e6
    assert got.upstream_cost_usd is not None
    assert float(got.upstream_cost_usd) == pytest.approx(expected)
    # the same input gives the same answer
    again = client.complete(model=SONNET, messages=messages, params=NO_PARAMS)
    assert (again.text, again.input_tokens) == (got.text, got.input_tokens)
    assert again.generation_id != got.generation_id


def test_generation_parameters_are_sent_and_honoured(
    emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    got = ask(make_client(), "word " * 200, max_tokens=5, temperature=0.2)
    assert got.output_tokens <= 5
    assert got.finish_reason == "length"
    (request,) = emulator.requests
    assert request.body == {
        "model": HAIKU,
        "messages": [{"role": "user", "content": "word " * 200}],
        "max_tokens": 5,
        "temperature": 0.2,
    }
    ask(make_client())
    assert "max_tokens" not in emulator.requests[-1].body


def test_headers_are_sent(emulator: EmulatorServer, make_client: ClientFactory) -> None:
    client = make_client(site_url="https://example.test/headspace", app_name="Headspace Test")
    ask(client)
    client.get_key(timeout=5)
    client.list_models(timeout=5)
    assert [r.path for r in emulator.requests] == [CHAT, "/api/v1/key", "/api/v1/models"]
    for request in emulator.requests:
        assert request.headers["authorization"] == f"Bearer {TEST_KEY}"
        assert request.headers["http-referer"] == "https://example.test/headspace"
        assert request.headers["x-title"] == "Headspace Test"
        assert request.headers["accept"] == "application/json"
    assert emulator.requests[0].headers["content-type"] == "application/json"


def test_an_injected_httpx_client_is_used_with_our_headers(emulator: EmulatorServer) -> None:
    with httpx.Client() as http:
        client = OpenRouterClient(settings_for(emulator.base_url), api_key=TEST_KEY, http=http)
        assert ask(client).text
        client.close()  # does not close what it was given
        assert not http.is_closed
    assert emulator.requests[0].headers["authorization"] == f"Bearer {TEST_KEY}"
    assert emulator.requests[0].headers["x-title"] == "Claude Headspace"


def test_key_and_models(emulator: EmulatorServer, make_client: ClientFactory) -> None:
    client = make_client()
    assert "data" in client.get_key(timeout=5)
    models = client.list_models(timeout=5)
    assert {m["id"] for m in models["data"]} >= {HAIKU, SONNET}
    with pytest.raises(e.AuthenticationError) as caught:
        make_client(key="not-an-openrouter-key").get_key(timeout=5)
    assert caught.value.status_code == 401


def test_one_client_serves_many_threads_over_kept_alive_connections(
    emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    client = make_client(max_connections=4)
    failures: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(10):
                assert f"thread {n} call {i}" in ask(client, f"thread {n} call {i}").text
        except BaseException as exc:  # reported below, not lost in the thread
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert emulator.request_count(CHAT) == 80


# --------------------------------------------------------------------------- errors by status


@pytest.mark.parametrize(
    ("status", "cls", "retryable"),
    [
        (400, e.BadRequestError, False),
        (401, e.AuthenticationError, False),
        (402, e.InsufficientCreditsError, False),
        (403, e.ModerationError, False),
        (404, e.ModelNotFoundError, False),
        (408, e.RequestTimeoutError, True),
        (409, e.BadRequestError, False),
        (429, e.UpstreamRateLimitError, True),
        (500, e.UpstreamServerError, True),
        (502, e.UpstreamServerError, True),
        (503, e.UpstreamServerError, True),
        (504, e.UpstreamServerError, True),
    ],
)
def test_each_status_maps_to_its_error(
    status: int,
    cls: type[e.UpstreamError],
    retryable: bool,
    emulator: EmulatorServer,
    make_client: ClientFactory,
) -> None:
    emulator.script([Fault(status=status, message=f"upstream says {status}")])
    with pytest.raises(e.UpstreamError) as caught:
        ask(make_client())
    error = caught.value
    assert type(error) is cls
    assert error.retryable is retryable
    assert error.status_code == status
    assert error.code == status
    assert f"OpenRouter answered {status}" in str(error)
    assert f"upstream says {status}" in str(error)
    assert error.retry_after is None


def test_moderation_reasons_are_kept_and_named(
    emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    metadata = {
        "reasons": ["violence", "harassment"],
        "flagged_input": "the user's own words",
        "provider_name": "Anthropic",
        "model_slug": HAIKU,
    }
    emulator.script([Fault(status=403, metadata=metadata)])
    with pytest.raises(e.ModerationError) as caught:
        ask(make_client())
    assert caught.value.reasons == ["violence", "harassment"]
    assert caught.value.metadata == metadata
    assert "flagged for violence, harassment" in str(caught.value)
    assert "provider Anthropic" in str(caught.value)
    assert "the user's own words" not in str(caught.value)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (Fault(status=429, retry_after=7), 7.0),
        (Fault(status=503, retry_after="2.5"), 2.5),
        (Fault(status=429, retry_after_ms=1500), 1.5),
        # retry-after-ms wins over Retry-After, as OpenRouter's SDKs read it
        (Fault(status=429, retry_after=9, retry_after_ms=250), 0.25),
    ],
)
def test_retry_after_in_seconds_and_milliseconds(
    fault: Fault, expected: float, emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    emulator.script([fault])
    with pytest.raises(e.UpstreamError) as caught:
        ask(make_client())
    assert caught.value.retry_after == pytest.approx(expected)
    assert caught.value.retry_at is None


def test_retry_after_as_an_http_date_uses_the_clock(
    emulator: EmulatorServer, make_client: ClientFactory, fake_clock: FakeClock
) -> None:
    when = datetime.fromtimestamp(fake_clock.time() + 12, UTC)
    emulator.script([Fault(status=429, retry_after=format_datetime(when, usegmt=True))])
    with pytest.raises(e.UpstreamRateLimitError) as caught:
        ask(make_client(clock=fake_clock))
    assert caught.value.retry_after == pytest.approx(12.0)
    assert caught.value.retry_at == pytest.approx(fake_clock.time() + 12)


def test_a_200_carrying_an_error_is_retryable(
    emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    emulator.script([Fault(error_in_200=True, message="Provider disconnected")])
    with pytest.raises(e.ErrorInResponseError) as caught:
        ask(make_client())
    assert caught.value.retryable and caught.value.status_code == 200
    assert caught.value.code == 502
    assert "Provider disconnected" in str(caught.value)


def test_a_200_with_no_choices_is_retryable(
    emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    emulator.script([Fault(no_choices=True)])
    with pytest.raises(e.EmptyResponseError) as caught:
        ask(make_client())
    assert caught.value.retryable and "no choices" in str(caught.value)


@pytest.mark.parametrize(
    ("status", "cls"), [(200, e.InvalidResponseError), (502, e.UpstreamServerError)]
)
def test_a_body_that_is_not_json_says_so_and_quotes_it(
    status: int, cls: type[e.UpstreamError], emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    page = "<html><body>Bad gateway from the edge proxy</body></html>" + "x" * 500
    emulator.script([Fault(status=status, body=page)])
    with pytest.raises(cls) as caught:
        ask(make_client())
    text = str(caught.value)
    assert "not JSON" in text
    assert "<html><body>Bad gateway from the edge proxy" in text
    assert "x" * 400 not in text  # only the first bytes
    assert caught.value.status_code == status


# --------------------------------------------------------------------------- no HTTP answer


def test_a_read_timeout_shorter_than_the_delay(
    emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    emulator.script([Fault(delay_ms=2000)])
    with pytest.raises(e.UpstreamTimeoutError) as caught:
        ask(make_client(timeout_seconds=0.2))
    assert caught.value.retryable and caught.value.status_code is None
    assert "ReadTimeout after 0.2 s" in str(caught.value)
    # the connection that timed out is not reused for the next call
    emulator.script([])
    assert ask(make_client(timeout_seconds=5)).text


def test_a_dropped_connection(emulator: EmulatorServer, make_client: ClientFactory) -> None:
    client = make_client()
    emulator.script([Fault(drop=True)])
    with pytest.raises(e.UpstreamConnectionError) as caught:
        ask(client)
    assert caught.value.retryable
    assert ask(client).text  # the client recovers on a fresh connection


def test_a_refused_connection(closed_port: int, make_client: ClientFactory) -> None:
    client = make_client(base_url=f"http://127.0.0.1:{closed_port}/api/v1")
    with pytest.raises(e.UpstreamConnectionError) as caught:
        ask(client)
    assert caught.value.retryable and caught.value.status_code is None
    assert "ConnectError" in str(caught.value)


def test_a_malformed_base_url_is_final(make_client: ClientFactory) -> None:
    with pytest.raises(e.UpstreamError) as caught:
        ask(make_client(base_url="http://[::1"))
    assert not caught.value.retryable


# --------------------------------------------------------------------------- with the retry policy


def run_with_retries(
    client: OpenRouterClient, clock: FakeClock, max_attempts: int = 3, max_delay: float = 30.0
) -> tuple[Any, int]:
    policy = RetryPolicy(max_attempts, base_delay_seconds=1.0, max_delay_seconds=max_delay)
    return policy.run(lambda attempt: ask(client), clock=clock)


RETRYABLE_FAULTS = [
    Fault(status=500),
    Fault(status=502),
    Fault(status=503),
    Fault(status=408),
    Fault(status=429, retry_after=1),
    Fault(error_in_200=True),
    Fault(no_choices=True),
    Fault(drop=True),
]


@pytest.mark.parametrize("failures", [1, 2])
@pytest.mark.parametrize("fault", RETRYABLE_FAULTS, ids=repr)
def test_recovers_after_n_failures_with_exact_request_counts(
    fault: Fault,
    failures: int,
    emulator: EmulatorServer,
    make_client: ClientFactory,
    fake_clock: FakeClock,
) -> None:
    emulator.script([fault] * failures)
    completion, attempts = run_with_retries(make_client(), fake_clock)
    assert completion.text
    assert attempts == failures + 1
    assert emulator.request_count(CHAT) == failures + 1
    assert len(fake_clock.sleeps) == failures


def test_exhaustion_makes_max_attempts_requests(
    emulator: EmulatorServer, make_client: ClientFactory, fake_clock: FakeClock
) -> None:
    emulator.script([Fault(status=503)] * 4)
    with pytest.raises(e.UpstreamServerError) as caught:
        run_with_retries(make_client(), fake_clock, max_attempts=4)
    assert caught.value.attempts == 4
    assert emulator.request_count(CHAT) == 4
    assert len(fake_clock.sleeps) == 3
    for n, slept in enumerate(fake_clock.sleeps, start=1):
        assert 0.75 * 2 ** (n - 1) < slept <= 2 ** (n - 1)


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404])
def test_final_errors_make_one_request(
    status: int, emulator: EmulatorServer, make_client: ClientFactory, fake_clock: FakeClock
) -> None:
    emulator.script([Fault(status=status, metadata={"reasons": ["self-harm"]})] * 3)
    with pytest.raises(e.UpstreamError) as caught:
        run_with_retries(make_client(), fake_clock)
    assert caught.value.status_code == status and caught.value.attempts == 1
    assert emulator.request_count(CHAT) == 1
    assert fake_clock.sleeps == []


@pytest.mark.parametrize("retry_after", [3, "http-date"], ids=["seconds", "http-date"])
def test_retry_after_is_what_the_policy_sleeps(
    retry_after: int | str,
    emulator: EmulatorServer,
    make_client: ClientFactory,
    fake_clock: FakeClock,
) -> None:
    if retry_after == "http-date":
        when = datetime.fromtimestamp(fake_clock.time() + 3, UTC)
        retry_after = format_datetime(when, usegmt=True)
    emulator.script([Fault(status=429, retry_after=retry_after)])
    _, attempts = run_with_retries(make_client(clock=fake_clock), fake_clock)
    assert attempts == 2
    assert fake_clock.sleeps == [pytest.approx(3.0)]


def test_retry_after_beyond_the_cap_stops_at_once(
    emulator: EmulatorServer, make_client: ClientFactory, fake_clock: FakeClock
) -> None:
    emulator.script([Fault(status=429, retry_after=120)] * 3)
    with pytest.raises(e.UpstreamRateLimitError) as caught:
        run_with_retries(make_client(), fake_clock, max_delay=30)
    assert caught.value.retry_after == 120
    assert caught.value.attempts == 1
    assert emulator.request_count(CHAT) == 1
    assert fake_clock.sleeps == []


# --------------------------------------------------------------------------- the key stays secret


def test_the_key_is_in_no_log_record_and_no_error(
    own_emulator: Any,
    closed_port: int,
    fake_clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # the root: httpx's and httpcore's own loggers included
    for name in ("httpx", "httpcore", "claude_headspace"):
        caplog.set_level(logging.DEBUG, logger=name)
    server: EmulatorServer = own_emulator(accept_keys={CANARY})
    client = OpenRouterClient(settings_for(server.base_url, timeout_seconds=0.3), api_key=CANARY)
    texts: list[str] = []

    def attempt(call: Any) -> None:
        try:
            call()
        except e.InferenceError as exc:
            texts.extend([str(exc), repr(exc), repr(exc.to_dict()), repr(exc.metadata)])

    try:
        ask(client)
        client.get_key(timeout=5)
        client.list_models(timeout=5)
        faults = [Fault(status=s, metadata={"reasons": ["x"]}) for s in (400, 401, 402, 403, 404)]
        faults += [
            Fault(status=429, retry_after=1),
            Fault(status=500),
            Fault(status=502, body="<html>" + CANARY[:8]),
            Fault(error_in_200=True),
            Fault(no_choices=True),
            Fault(drop=True),
            Fault(delay_ms=1000),
        ]
        for fault in faults:
            server.script([fault])
            attempt(lambda: ask(client))
        server.script([Fault(status=500)] * 3)
        attempt(lambda: RetryPolicy(3, 0.1, 1.0).run(lambda n: ask(client), clock=fake_clock))
    finally:
        client.close()
    refused = OpenRouterClient(
        settings_for(f"http://127.0.0.1:{closed_port}/api/v1"), api_key=CANARY
    )
    attempt(lambda: ask(refused))
    attempt(lambda: refused.get_key(timeout=1))
    refused.close()

    assert any(r.headers.get("authorization") == f"Bearer {CANARY}" for r in server.requests)
    assert len(texts) >= 4 * (len(faults) + 3)
    for text in texts:
        assert CANARY not in text
    assert any(r.name.startswith(("httpx", "httpcore")) for r in caplog.records)
    for record in caplog.records:
        assert CANARY not in record.getMessage()
        assert CANARY not in repr(record.args)
        assert CANARY not in str(record.exc_text or "")
    assert CANARY not in caplog.text


def test_a_closed_client_fails_at_once_without_sending(
    emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    client = make_client()
    ask(client)  # a pooled connection exists, and goes back to the idle set
    client.close()
    with pytest.raises(e.UpstreamError) as caught:
        ask(client)
    assert not caught.value.retryable
    assert "closed; no request was sent" in str(caught.value)
    assert emulator.request_count("/api/v1/chat/completions") == 1


def _answer_with_usage(usage: dict[str, Any]) -> Fault:
    # A 200 whose body is given whole: a normal answer but for its usage block.
    body = {
        "id": "gen-usage",
        "model": "anthropic/claude-haiku-4.5",
        "choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": usage,
    }
    return Fault(status=200, body=json.dumps(body))


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -5, "completion_tokens": 3},
        {"prompt_tokens": 10, "completion_tokens": 2.5},
        {"prompt_tokens": 10**12, "completion_tokens": 3},
        {"prompt_tokens": "12", "completion_tokens": 3},
        {"prompt_tokens": True, "completion_tokens": 3},
    ],
    ids=["negative", "fraction", "beyond-32-bits", "string", "bool"],
)
def test_token_counts_that_are_not_counts_are_a_malformed_answer(
    emulator: EmulatorServer, make_client: ClientFactory, usage: dict[str, Any]
) -> None:
    # They drive the limiter's budget and the cost: a negative count would give budget back.
    emulator.script([_answer_with_usage(usage)])
    with pytest.raises(e.InvalidResponseError) as caught:
        ask(make_client())
    assert "usage." in str(caught.value) and caught.value.retryable


@pytest.mark.parametrize(
    ("cost", "kept"),
    [("0.00012", 0.00012), (0, 0.0), ("NaN", None), ("Infinity", None), (-1, None), ("x", None)],
)
def test_openrouter_cost_is_kept_only_when_a_finite_non_negative_number(
    emulator: EmulatorServer, make_client: ClientFactory, cost: Any, kept: float | None
) -> None:
    usage: dict[str, Any] = {"prompt_tokens": 12.0, "completion_tokens": 3, "cost": cost}
    if cost in ("NaN", "Infinity"):
        # Python's json reads these bare words as numbers: send them as such.
        fault = _answer_with_usage({**usage, "cost": 0})
        assert fault.body is not None
        fault = Fault(status=200, body=fault.body.replace('"cost": 0', f'"cost": {cost}'))
    else:
        fault = _answer_with_usage(usage)
    emulator.script([fault])
    result = ask(make_client())
    assert (result.input_tokens, result.output_tokens) == (12, 3)
    assert result.upstream_cost_usd == (None if kept is None else Decimal(str(kept)))
