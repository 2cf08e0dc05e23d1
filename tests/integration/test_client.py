"""OpenRouterClient over real HTTP against the emulator: answers, headers, the injected
client and transport, every error class, timeouts, refused and dropped connections, and
the key kept out of answers, errors, tracebacks and logs.

The retry loop over this client is tested in tests/unit/test_retry.py.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import threading
import traceback
from collections.abc import Callable
from decimal import Decimal
from email.utils import formatdate
from typing import Any

import httpx
import pytest
from tests.emulator_fixtures import TEST_KEY, ClientFactory, answer_body, settings_for

from headspace_inference import logsafe
from headspace_inference.clock import FakeClock
from headspace_inference.inference import errors as e
from headspace_inference.inference.client import OpenRouterClient
from headspace_inference.inference.health import HealthChecker
from headspace_inference.inference.retry import RetryPolicy
from headspace_inference.inference.types import Answer, GenerationParams
from headspace_inference.settings import OpenRouterSettings, RetrySettings
from headspace_inference.testing.emulator import EmulatorServer, Fault
from headspace_inference.testing.emulator.server import PRICES

CHAT = "/api/v1/chat/completions"
HAIKU = "anthropic/claude-haiku-4.5"
SONNET = "anthropic/claude-sonnet-4.5"
MESSAGES = [{"role": "user", "content": "hello world"}]
CANARY = "sk-or-v1-CANARY-c1e2n3t4-do-not-log-5f6a7b8c9d"
# The key's own part: a cut-off key that shows only a prefix of it still leaks.
CANARY_MARK = "CANARY"


def ask(client: OpenRouterClient, text: str = "hello world", **params: Any) -> Answer:
    return client.complete(
        model=HAIKU, messages=[{"role": "user", "content": text}], params=GenerationParams(**params)
    )


# --------------------------------------------------------------------------- answers


def test_a_completion_carries_every_structured_field(
    emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    completion = ask(make_client())

    # "hello world" is 11 characters: 3 tokens, plus 3 for the one message.
    assert completion.text == "Summary by claude-haiku-4.5: hello world"
    assert completion.input_tokens == 6
    assert completion.output_tokens == 10  # 40 characters
    assert completion.model == HAIKU
    assert completion.generation_id is not None
    assert completion.generation_id.startswith("gen-")
    assert completion.provider == "Anthropic"
    assert completion.finish_reason == "stop"
    # haiku: $1 per million in, $5 per million out.
    assert completion.upstream_cost_usd == Decimal("0.000056")
    assert emulator.request_count(CHAT) == 1


def test_the_same_input_gives_the_same_answer_at_the_emulator_price(
    make_client: ClientFactory,
) -> None:
    client = make_client()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Summarise the turn where the agent fixed the flaky test."},
    ]
    got = client.complete(model=SONNET, messages=messages, params=GenerationParams())
    assert "Summarise the turn" in got.text
    assert got.model == SONNET
    assert got.input_tokens > 0 and got.output_tokens > 0
    p_in, p_out = PRICES[SONNET]
    expected = (got.input_tokens * p_in + got.output_tokens * p_out) / 1e6
    assert got.upstream_cost_usd is not None
    assert float(got.upstream_cost_usd) == pytest.approx(expected)
    again = client.complete(model=SONNET, messages=messages, params=GenerationParams())
    assert (again.text, again.input_tokens) == (got.text, got.input_tokens)
    assert again.generation_id != got.generation_id


def test_generation_parameters_are_sent_and_honoured(
    emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    got = ask(make_client(), "word " * 200, max_tokens=5, temperature=0.2)
    assert got.output_tokens <= 5
    assert got.finish_reason == "length"
    (request,) = emulator.requests
    assert (request.method, request.path) == ("POST", CHAT)
    assert request.body == {
        "model": HAIKU,
        "messages": [{"role": "user", "content": "word " * 200}],
        "max_tokens": 5,
        "temperature": 0.2,
    }
    ask(make_client())  # parameters left unset are not sent at all
    assert emulator.requests[-1].body == {"model": HAIKU, "messages": MESSAGES}


def test_max_tokens_cuts_the_answer_short(make_client: ClientFactory) -> None:
    completion = ask(make_client(), max_tokens=2)

    assert completion.finish_reason == "length"
    assert completion.output_tokens == 2
    assert len(completion.text) <= 8
    assert "Summary by claude-haiku-4.5: hello world".startswith(completion.text)


def test_headers_are_sent_on_every_request(
    emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    client = make_client(site_url="https://example.test/headspace", app_name="Headspace Test")
    ask(client)
    assert "data" in client.get_key(timeout=5)
    assert {m["id"] for m in client.list_models(timeout=5)["data"]} >= {HAIKU, SONNET}
    assert [r.path for r in emulator.requests] == [CHAT, "/api/v1/key", "/api/v1/models"]
    for request in emulator.requests:
        assert request.headers["authorization"] == f"Bearer {TEST_KEY}"
        assert request.headers["http-referer"] == "https://example.test/headspace"
        assert request.headers["x-title"] == "Headspace Test"
        assert request.headers["accept"] == "application/json"
    assert emulator.requests[0].headers["content-type"] == "application/json"


def test_an_injected_transport_gets_the_headers_and_is_not_closed(
    emulator: EmulatorServer,
) -> None:
    with httpx.HTTPTransport() as transport:
        settings = settings_for(emulator.base_url, app_name="Injected")
        client = OpenRouterClient(settings, api_key=TEST_KEY, transport=transport)
        assert ask(client).text
        client.close()  # does not close what it was given...
        with pytest.raises(e.UpstreamError, match="closed; no request was sent"):
            ask(client)  # ...but is closed itself
        again = OpenRouterClient(settings, api_key=TEST_KEY, transport=transport)
        assert ask(again).text  # the transport still carries requests
    headers = emulator.requests[0].headers
    assert headers["authorization"] == f"Bearer {TEST_KEY}"
    assert headers["x-title"] == "Injected"
    assert headers["user-agent"].startswith("headspace-inference/")
    assert emulator.request_count(CHAT) == 2


def test_an_injected_transport_carries_every_request(emulator: EmulatorServer) -> None:
    seen: list[str] = []

    class Counting(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            seen.append(request.url.path)
            return super().handle_request(request)

    settings = settings_for(emulator.base_url)
    client = OpenRouterClient(settings, api_key=TEST_KEY, transport=Counting())
    try:
        ask(client)
        client.get_key(timeout=5)
    finally:
        client.close()
    assert seen == [CHAT, "/api/v1/key"]
    assert emulator.requests[1].headers["authorization"] == f"Bearer {TEST_KEY}"


def test_key_and_models(make_client: ClientFactory) -> None:
    client = make_client()
    assert "data" in client.get_key(timeout=5)
    assert {m["id"] for m in client.list_models(timeout=5)["data"]} >= {HAIKU, SONNET}
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
    # and one after another, on the connections kept alive
    assert len({ask(client).text for _ in range(5)}) == 1
    assert emulator.request_count(CHAT) == 85


def test_the_generation_endpoint_reports_what_the_completion_did(
    emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    completion = ask(make_client())

    response = httpx.get(
        f"{emulator.base_url}/generation",
        params={"id": completion.generation_id},
        headers={"Authorization": f"Bearer {TEST_KEY}"},
    )

    assert response.status_code == 200
    data = response.json()["data"]
    assert data["id"] == completion.generation_id
    assert data["model"] == completion.model
    assert data["total_cost"] == pytest.approx(float(completion.upstream_cost_usd or -1))
    assert data["tokens_prompt"] == completion.input_tokens
    assert data["tokens_completion"] == completion.output_tokens
    assert data["finish_reason"] == completion.finish_reason
    assert data["provider_name"] == completion.provider


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
    emulator.script([Fault(status=200, body=answer_body(usage=usage))])
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
    body = answer_body(usage=usage)
    if cost in ("NaN", "Infinity"):
        # Python's json reads these bare words as numbers: send them as such.
        body = body.replace(f'"cost": "{cost}"', f'"cost": {cost}')
    emulator.script([Fault(status=200, body=body)])
    result = ask(make_client())
    assert (result.input_tokens, result.output_tokens) == (12, 3)
    assert result.upstream_cost_usd == (None if kept is None else Decimal(str(kept)))


# --------------------------------------------------------------------------- every error class


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
        (520, e.UpstreamServerError, True),
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
    assert error.to_dict()["status_code"] == status
    assert error.to_dict()["retryable"] is retryable
    assert f"OpenRouter answered {status}" in str(error)
    assert f"upstream says {status}" in str(error)
    assert error.retry_after is None
    assert emulator.request_count(CHAT) == 1


@pytest.mark.parametrize(
    ("fault", "cls"),
    [
        pytest.param(Fault(error_in_200=True), e.ErrorInResponseError, id="error-in-200"),
        pytest.param(Fault(no_choices=True), e.EmptyResponseError, id="no-choices"),
        pytest.param(Fault(body="<html>oops</html>"), e.InvalidResponseError, id="200-not-json"),
    ],
)
def test_a_200_that_is_no_answer_is_a_retryable_error(
    fault: Fault, cls: type[e.UpstreamError], emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    emulator.script([fault])
    with pytest.raises(cls) as caught:
        ask(make_client())
    assert type(caught.value) is cls
    assert caught.value.retryable is True
    assert caught.value.status_code == 200
    assert emulator.request_count(CHAT) == 1


@pytest.mark.parametrize(
    ("status", "phrase"),
    [
        (400, "Invalid request"),
        (402, "Insufficient credits"),
        (404, "No endpoints found"),
        (429, "Rate limit exceeded"),
        (503, "No available providers"),
    ],
)
def test_an_error_keeps_openrouter_code_and_message(
    emulator: EmulatorServer, make_client: ClientFactory, status: int, phrase: str
) -> None:
    emulator.script([Fault(status=status)])

    with pytest.raises(e.UpstreamError) as caught:
        ask(make_client())

    assert caught.value.code == status
    assert phrase in str(caught.value)
    assert str(status) in str(caught.value)


def test_moderation_reasons_are_kept_and_named(
    emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    metadata = {
        "reasons": ["violence", "harassment"],
        "flagged_input": "the user's own words",
        "provider_name": "Anthropic",
        "model_slug": HAIKU,
    }
    emulator.script([Fault(status=403, metadata=metadata), Fault(status=403)])
    client = make_client()
    with pytest.raises(e.ModerationError) as caught:
        ask(client)
    assert caught.value.reasons == ["violence", "harassment"]
    assert caught.value.metadata == metadata
    assert "flagged for violence, harassment" in str(caught.value)
    assert "provider Anthropic" in str(caught.value)
    # The user's own flagged text stays out of the operator's message.
    assert "the user's own words" not in str(caught.value)
    with pytest.raises(e.ModerationError) as bare:
        ask(client)
    assert bare.value.reasons == []


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (Fault(status=429, retry_after=7), 7.0),
        (Fault(status=503, retry_after="2.5"), 2.5),
        (Fault(status=429, retry_after_ms=1500), 1.5),
        # retry-after-ms wins over Retry-After, as OpenRouter's SDKs read it
        (Fault(status=429, retry_after=9, retry_after_ms=250), 0.25),
        (Fault(status=429), None),
    ],
)
def test_retry_after_is_read_onto_the_error(
    fault: Fault, expected: float | None, emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    emulator.script([fault])
    with pytest.raises(e.UpstreamError) as caught:
        ask(make_client())
    assert caught.value.retry_after == pytest.approx(expected)


def test_an_http_date_retry_after_is_measured_on_the_client_clock(
    emulator: EmulatorServer, make_client: ClientFactory, fake_clock: FakeClock
) -> None:
    when = formatdate(fake_clock.time() + 12, usegmt=True)
    emulator.script([Fault(status=429, retry_after=when)])
    with pytest.raises(e.UpstreamRateLimitError) as caught:
        ask(make_client(clock=fake_clock))
    assert caught.value.retry_after == pytest.approx(12.0)


def test_a_200_carrying_an_error_keeps_the_upstream_message(
    emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    emulator.script([Fault(error_in_200=True, message="Provider disconnected")])
    with pytest.raises(e.ErrorInResponseError) as caught:
        ask(make_client())
    assert caught.value.code == 502
    assert "Provider disconnected" in str(caught.value)


def test_a_200_with_no_choices_says_so(
    emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    emulator.script([Fault(no_choices=True)])
    with pytest.raises(e.EmptyResponseError) as caught:
        ask(make_client())
    assert "no choices" in str(caught.value)


@pytest.mark.parametrize(
    ("status", "cls"), [(200, e.InvalidResponseError), (502, e.UpstreamServerError)]
)
def test_a_body_that_is_not_json_says_so_and_quotes_its_first_bytes(
    status: int, cls: type[e.UpstreamError], emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    page = "<html><body>Bad gateway from the edge proxy</body></html>" + "x" * 5000
    emulator.script([Fault(status=status, body=page)])
    with pytest.raises(cls) as caught:
        ask(make_client())
    text = str(caught.value)
    assert "not JSON" in text
    assert "<html><body>Bad gateway from the edge proxy" in text
    assert "x" * 400 not in text  # only the first bytes: a log line, not a page
    assert len(text) < 600
    assert caught.value.status_code == status


# --------------------------------------------------------------------------- no HTTP answer


def test_a_read_timeout_shorter_than_the_delay(
    emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    emulator.script([Fault(delay_ms=1000)])
    with pytest.raises(e.UpstreamTimeoutError) as caught:
        ask(make_client(timeout_seconds=0.2))
    assert caught.value.retryable and caught.value.status_code is None
    assert "did not answer in time (ReadTimeout after 0.2 s" in str(caught.value)
    assert isinstance(caught.value.__cause__, httpx.ReadTimeout)  # httpx's own, kept
    assert emulator.request_count(CHAT) == 1
    # the connection that timed out is not reused for the next call
    assert ask(make_client(timeout_seconds=5)).text


def test_a_dropped_connection_then_a_fresh_one(
    emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    client = make_client()
    ask(client)  # a kept-alive connection that the drop then cuts
    emulator.script([Fault(drop=True)])
    with pytest.raises(e.UpstreamConnectionError) as caught:
        ask(client)
    assert caught.value.retryable
    assert isinstance(caught.value.__cause__, httpx.TransportError)
    assert ask(client).finish_reason == "stop"  # the client recovers on a fresh connection
    assert emulator.request_count(CHAT) == 3


def test_a_refused_connection(closed_port: int, make_client: ClientFactory) -> None:
    client = make_client(base_url=f"http://127.0.0.1:{closed_port}/api/v1")
    with pytest.raises(e.UpstreamConnectionError) as caught:
        ask(client)
    assert caught.value.retryable and caught.value.status_code is None
    assert "could not talk to OpenRouter" in str(caught.value)
    assert "ConnectError" in str(caught.value)
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


def test_a_malformed_base_url_is_final(make_client: ClientFactory) -> None:
    with pytest.raises(e.UpstreamError) as caught:
        ask(make_client(base_url="http://[::1"))
    assert not caught.value.retryable


def test_a_closed_client_fails_at_once_without_sending(
    emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    client = make_client()
    ask(client)  # a connection exists, and goes back to the idle set
    client.close()
    with pytest.raises(e.UpstreamError) as caught:
        ask(client)
    assert not caught.value.retryable
    assert "closed; no request was sent" in str(caught.value)
    assert emulator.request_count(CHAT) == 1


# --------------------------------------------------------------------------- the key stays secret


def _leak_paths() -> list[Any]:
    return [
        pytest.param(Fault(status=status), id=str(status))
        for status in (400, 401, 402, 404, 408, 429, 500, 502, 503, 504)
    ] + [
        pytest.param(Fault(status=403, metadata={"reasons": ["hate"]}), id="403"),
        pytest.param(Fault(error_in_200=True), id="error-in-200"),
        pytest.param(Fault(no_choices=True), id="no-choices"),
        pytest.param(Fault(status=200, body="not json at all"), id="200-not-json"),
        pytest.param(Fault(status=502, body="<html>bad gateway</html>"), id="502-not-json"),
        pytest.param(Fault(drop=True), id="drop"),
        pytest.param(Fault(delay_ms=1000), id="timeout"),
        pytest.param(Fault(status=429, retry_after=3600), id="retry-after-beyond-cap"),
        pytest.param(None, id="refused"),
        pytest.param(Fault(status=400, message=f"your key {CANARY} is wrong"), id="echoed-json"),
        pytest.param(Fault(error_in_200=True, message=f"key {CANARY} failed"), id="echoed-in-200"),
        # A proxy's HTML error page that echoes the request's Authorization header.
        pytest.param(
            Fault(status=502, body=f"<pre>Authorization: Bearer {CANARY}</pre>"),
            id="echoed-502-not-json",
        ),
        pytest.param(
            Fault(status=200, body=f"<pre>Authorization: Bearer {CANARY}</pre>"),
            id="echoed-200-not-json",
        ),
        # An upstream that echoes the request into the error's metadata, kept on the error.
        pytest.param(
            Fault(status=502, metadata={"provider_name": "p", "raw": f"Bearer {CANARY}"}),
            id="echoed-in-metadata",
        ),
        pytest.param(
            Fault(error_in_200=True, metadata={"headers": [{"authorization": CANARY}]}),
            id="echoed-in-200-metadata",
        ),
        # The echoed key straddles the cut where the body preview ends (200 bytes).
        pytest.param(
            Fault(status=502, body="x" * 170 + f"Bearer {CANARY} and more"),
            id="echoed-across-preview-cut",
        ),
        # A malformed count that the error quotes.
        pytest.param(
            Fault(status=200, body=answer_body(usage={"prompt_tokens": f"Bearer {CANARY}"})),
            id="echoed-in-usage",
        ),
        # An answer no HTTP parser accepts, echoing the header: httpx's error quotes the
        # line, and that error is kept as our error's cause, which a traceback prints.
        pytest.param(
            Fault(raw=f"HTTP/1.1 502 Bad Gateway\r\nEchoed request: Bearer {CANARY}\r\n\r\n"),
            id="echoed-in-the-cause",
        ),
    ]


def _assert_no_canary(caplog: pytest.LogCaptureFixture, errors: list[BaseException]) -> None:
    for error in errors:
        rendered = [
            str(error),
            repr(error),
            repr(getattr(error, "to_dict", dict)()),
            repr(getattr(error, "metadata", None)),
            "".join(traceback.format_exception(error)),  # with every cause in the chain
        ]
        for text in rendered:
            assert CANARY_MARK not in text, f"key leaked in {type(error).__name__}: {text[:300]}"
    assert caplog.records, "expected some log records to inspect (DEBUG capture is on)"
    for record in caplog.records:
        text = " ".join(
            [
                record.getMessage(),
                str(record.msg),
                repr(record.args),
                record.exc_text or "",
                logging.Formatter().format(record),
            ]
        )
        assert CANARY_MARK not in text, f"key leaked in a {record.name} log record"
    assert CANARY_MARK not in caplog.text


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    # As the app does at start-up: httpcore's own DEBUG records quote what a server sent,
    # and logsafe is what keeps an echoed key out of them. Our errors, and the causes they
    # keep, are checked without it (_assert_no_canary formats them itself).
    logsafe.protect(CANARY)
    caplog.set_level(logging.DEBUG)  # the root: httpx's and httpcore's own loggers included
    for name in ("httpx", "httpcore", "headspace_inference", "openai", "urllib3"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


@pytest.mark.parametrize("fault", _leak_paths())
def test_the_key_is_in_no_error_traceback_or_log_record(
    emulator: EmulatorServer,
    make_client: ClientFactory,
    closed_port: int,
    debug_logs: pytest.LogCaptureFixture,
    fault: Fault | None,
) -> None:
    clock = FakeClock()
    if fault is None:
        client = make_client(key=CANARY, base_url=f"http://127.0.0.1:{closed_port}/api/v1")
    else:
        client = make_client(key=CANARY, timeout_seconds=0.2, clock=clock)
        emulator.script([fault, fault])
    errors: list[BaseException] = []
    policy = RetryPolicy.from_settings(RetrySettings(max_attempts=2))

    with pytest.raises(e.InferenceError) as caught:
        policy.run(
            lambda _attempt: ask(client),
            clock=clock,
            on_error=lambda error, _attempt, _delay: errors.append(error),
            rng=random.Random(3),
        )
    errors.append(caught.value)
    # The health probe over the same client, and the paths a status page would show.
    report = HealthChecker(client, OpenRouterSettings()).check()
    assert CANARY not in repr(report.to_dict())
    logging.getLogger("headspace_inference.tests").exception("error seen", exc_info=caught.value)

    assert any(r.name.startswith("httpcore") for r in debug_logs.records)
    _assert_no_canary(debug_logs, errors)


def test_the_key_is_absent_on_success_account_and_health_paths(
    own_emulator: Any,
    make_client: ClientFactory,
    closed_port: int,
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    client = make_client(key=CANARY)
    completion = ask(client)
    assert CANARY not in repr(completion)
    shown = [json.dumps(client.get_key(timeout=5)), json.dumps(client.list_models(timeout=5))]

    strict: EmulatorServer = own_emulator(accept_keys={"sk-or-v1-some-other-key"})
    rejected = make_client(key=CANARY, base_url=strict.base_url)
    reports = [
        HealthChecker(client, OpenRouterSettings()).check(),
        HealthChecker(rejected, OpenRouterSettings()).check(),
    ]
    assert [r.state for r in reports] == ["healthy", "key_rejected"]
    refused = make_client(key=CANARY, base_url=f"http://127.0.0.1:{closed_port}/api/v1")
    errors: list[BaseException] = []
    for call in (lambda: rejected.get_key(timeout=5), lambda: refused.get_key(timeout=1)):
        with pytest.raises(e.UpstreamError) as caught:
            call()
        errors.append(caught.value)

    assert isinstance(errors[0], e.AuthenticationError)
    assert isinstance(errors[1], e.UpstreamConnectionError)
    assert any(r.headers.get("authorization") == f"Bearer {CANARY}" for r in strict.requests)
    for text in shown + [repr(r) for r in reports] + [repr(r.to_dict()) for r in reports]:
        assert CANARY not in text
    _assert_no_canary(debug_logs, errors)


def test_a_key_echoed_in_a_successful_answer_is_redacted(
    emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    # Errors already redact an echoed key; a successful answer, which is cached, logged and
    # shown, carried it as it came in every text field.
    echo = f"Bearer {CANARY}"
    message = {"role": "assistant", "content": f"you sent {echo}"}
    choice = {"finish_reason": echo, "message": message}
    body = answer_body(id=echo, model=echo, provider=echo, choices=[choice])
    emulator.script([Fault(status=200, body=body)])

    answer = ask(make_client(key=CANARY))

    assert CANARY_MARK not in repr(answer)
    assert answer.model == answer.provider == answer.generation_id == "Bearer [REDACTED]"
    assert answer.finish_reason == "Bearer [REDACTED]"
    assert answer.text == "you sent Bearer [REDACTED]"


def test_a_compressed_answer_is_decoded() -> None:
    # The client asks for a compressed answer, so it must read one: a gzip body comes out
    # as the JSON it holds, whatever transport carried it.
    choice = {"index": 0, "finish_reason": "stop", "message": {"content": "squeezed"}}
    body = answer_body(choices=[choice]).encode()

    def gzipped(request: httpx.Request) -> httpx.Response:
        assert "gzip" in request.headers["accept-encoding"]
        return httpx.Response(
            200, headers={"content-encoding": "gzip"}, content=gzip.compress(body)
        )

    settings = settings_for("http://openrouter.test/api/v1")
    client = OpenRouterClient(settings, api_key=TEST_KEY, transport=httpx.MockTransport(gzipped))
    assert ask(client).text == "squeezed"


def test_the_environments_proxy_carries_every_request(
    own_emulator: Callable[..., EmulatorServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A plain-HTTP forward proxy gets each request in absolute form; the emulator answers
    # such a request as its own, so it can stand in for the proxy. The OpenRouter host
    # named here does not exist: only the proxy can have answered.
    proxy = own_emulator()
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = OpenRouterClient(settings_for("http://openrouter.invalid/api/v1"), api_key=TEST_KEY)
    try:
        assert ask(client).text
    finally:
        client.close()
    assert proxy.request_count(CHAT) == 1
    monkeypatch.setenv("NO_PROXY", "openrouter.invalid")
    direct = OpenRouterClient(settings_for("http://openrouter.invalid/api/v1"), api_key=TEST_KEY)
    try:
        with pytest.raises(e.UpstreamConnectionError):
            ask(direct)  # NO_PROXY: straight to a host that does not exist
    finally:
        direct.close()
    assert proxy.request_count(CHAT) == 1
