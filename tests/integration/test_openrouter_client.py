"""OpenRouterClient over real HTTP against the emulator: results, headers, every error class,
timeouts, refused and dropped connections, the official SDK, and the key kept out of logs."""

from __future__ import annotations

import logging
import random
import socket
import traceback
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from claude_headspace.clock import FakeClock
from claude_headspace.config import OpenRouterSettings, RetrySettings
from claude_headspace.emulator import EmulatorServer, Fault
from claude_headspace.inference.client import OpenRouterClient
from claude_headspace.inference.errors import (
    AuthenticationError,
    BadRequestError,
    EmptyResponseError,
    ErrorInResponseError,
    InferenceError,
    InsufficientCreditsError,
    InvalidResponseError,
    ModelNotFoundError,
    ModerationError,
    RequestTimeoutError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamRateLimitError,
    UpstreamServerError,
    UpstreamTimeoutError,
)
from claude_headspace.inference.health import HealthChecker
from claude_headspace.inference.retry import RetryPolicy
from claude_headspace.inference.types import Answer, GenerationParams

KEY = "sk-or-v1-client-test-0123456789abcdef"
CANARY = "sk-or-v1-CANARY-1234567890abcdef"
# The key's own part: a cut-off key that shows only a prefix of it still leaks.
CANARY_MARK = "CANARY"
MODEL = "anthropic/claude-haiku-4.5"
CHAT = "/api/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hello world"}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def client_for(emulator: EmulatorServer) -> Iterator[Callable[..., OpenRouterClient]]:
    """Builds clients (default: the shared emulator and KEY) and closes them afterwards."""
    made: list[OpenRouterClient] = []

    def make(
        *, key: str | None = KEY, base_url: str | None = None, **extra: Any
    ) -> OpenRouterClient:
        clock = extra.pop("clock", None) or FakeClock()
        settings = OpenRouterSettings(base_url=base_url or emulator.base_url, **extra)
        client = OpenRouterClient(settings, api_key=key, clock=clock)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def _complete(client: OpenRouterClient, **params: Any) -> Answer:
    return client.complete(model=MODEL, messages=MESSAGES, params=GenerationParams(**params))


# --------------------------------------------------------------------------- success


def test_completion_carries_every_structured_field(
    emulator: EmulatorServer, client_for: Callable[..., OpenRouterClient]
) -> None:
    completion = _complete(client_for())

    # "hello world" is 11 characters: 3 tokens, plus 3 for the one message.
    assert completion.text == "Summary by claude-haiku-4.5: hello world"
    assert completion.input_tokens == 6
    assert completion.output_tokens == 10  # 40 characters
    assert completion.model == MODEL
    assert completion.generation_id is not None
    assert completion.generation_id.startswith("gen-")
    assert completion.provider == "Anthropic"
    assert completion.finish_reason == "stop"
    # haiku: $1 per million in, $5 per million out.
    assert completion.upstream_cost_usd == Decimal("0.000056")
    assert emulator.request_count(CHAT) == 1


def test_request_body_carries_model_messages_and_generation_parameters(
    emulator: EmulatorServer, client_for: Callable[..., OpenRouterClient]
) -> None:
    _complete(client_for(), max_tokens=50, temperature=0.3)

    (request,) = emulator.requests
    assert request.method == "POST"
    assert request.path == CHAT
    assert request.body == {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 50,
        "temperature": 0.3,
    }


def test_unset_generation_parameters_are_not_sent(
    emulator: EmulatorServer, client_for: Callable[..., OpenRouterClient]
) -> None:
    _complete(client_for())

    assert emulator.requests[0].body == {"model": MODEL, "messages": MESSAGES}


def test_max_tokens_truncation_reports_finish_reason_length(
    client_for: Callable[..., OpenRouterClient],
) -> None:
    completion = _complete(client_for(), max_tokens=2)

    assert completion.finish_reason == "length"
    assert completion.output_tokens == 2
    assert len(completion.text) <= 8
    assert "Summary by claude-haiku-4.5: hello world".startswith(completion.text)


def test_headers_sent(
    emulator: EmulatorServer, client_for: Callable[..., OpenRouterClient]
) -> None:
    client = client_for(site_url="https://example.test/headspace", app_name="Headspace Tests")
    _complete(client)

    headers = emulator.requests[0].headers
    assert headers["authorization"] == f"Bearer {KEY}"
    assert headers["http-referer"] == "https://example.test/headspace"
    assert headers["x-title"] == "Headspace Tests"
    assert headers["content-type"] == "application/json"


def test_same_headers_on_key_and_models_requests(
    emulator: EmulatorServer, client_for: Callable[..., OpenRouterClient]
) -> None:
    client = client_for(site_url="https://example.test/h", app_name="H")
    assert "data" in client.get_key(timeout=5)
    assert {m["id"] for m in client.list_models(timeout=5)["data"]} >= {MODEL}

    assert [r.path for r in emulator.requests] == ["/api/v1/key", "/api/v1/models"]
    for request in emulator.requests:
        assert request.headers["authorization"] == f"Bearer {KEY}"
        assert request.headers["http-referer"] == "https://example.test/h"
        assert request.headers["x-title"] == "H"


def test_injected_httpx_client_gets_the_headers_too(
    emulator: EmulatorServer,
) -> None:
    with httpx.Client() as http:
        client = OpenRouterClient(
            OpenRouterSettings(base_url=emulator.base_url, app_name="Injected"),
            api_key=KEY,
            http=http,
        )
        _complete(client)

    headers = emulator.requests[0].headers
    assert headers["authorization"] == f"Bearer {KEY}"
    assert headers["x-title"] == "Injected"


def test_keep_alive_connection_serves_sequential_calls(
    emulator: EmulatorServer, client_for: Callable[..., OpenRouterClient]
) -> None:
    client = client_for()
    texts = [_complete(client).text for _ in range(5)]

    assert len(set(texts)) == 1
    assert emulator.request_count(CHAT) == 5


def test_generation_endpoint_reports_what_the_completion_did(
    emulator: EmulatorServer, client_for: Callable[..., OpenRouterClient]
) -> None:
    completion = _complete(client_for())

    response = httpx.get(
        f"{emulator.base_url}/generation",
        params={"id": completion.generation_id},
        headers={"Authorization": f"Bearer {KEY}"},
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


# --------------------------------------------------------------------------- the official SDK


def test_openai_sdk_parses_a_chat_completion(emulator: EmulatorServer) -> None:
    sdk = openai.OpenAI(base_url=emulator.base_url, api_key=KEY, max_retries=0)
    try:
        answer = sdk.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    finally:
        sdk.close()

    assert answer.id.startswith("gen-")
    assert answer.model == MODEL
    assert answer.choices[0].message.content == "Summary by claude-haiku-4.5: hello world"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == 6
    assert answer.usage.completion_tokens == 10
    assert answer.usage.total_tokens == 16
    assert emulator.request_count(CHAT) == 1


def test_openai_sdk_lists_models(emulator: EmulatorServer) -> None:
    sdk = openai.OpenAI(base_url=emulator.base_url, api_key=KEY, max_retries=0)
    try:
        models = list(sdk.models.list())
    finally:
        sdk.close()

    ids = {m.id for m in models}
    assert {"anthropic/claude-haiku-4.5", "anthropic/claude-sonnet-4.5"} <= ids


def test_openai_sdk_sees_emulated_errors_as_its_own_status_errors(emulator: EmulatorServer) -> None:
    emulator.script([Fault(status=402)])
    sdk = openai.OpenAI(base_url=emulator.base_url, api_key=KEY, max_retries=0)
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            sdk.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    finally:
        sdk.close()

    assert caught.value.status_code == 402


# --------------------------------------------------------------------------- every error class

MODERATION = {"reasons": ["violence", "harassment"], "flagged_input": "some flagged text"}

ERROR_CASES = [
    pytest.param(Fault(status=400), BadRequestError, False, 400, id="400"),
    pytest.param(Fault(status=401), AuthenticationError, False, 401, id="401"),
    pytest.param(Fault(status=402), InsufficientCreditsError, False, 402, id="402"),
    pytest.param(Fault(status=403, metadata=MODERATION), ModerationError, False, 403, id="403"),
    pytest.param(Fault(status=404), ModelNotFoundError, False, 404, id="404"),
    pytest.param(Fault(status=408), RequestTimeoutError, True, 408, id="408"),
    pytest.param(Fault(status=429), UpstreamRateLimitError, True, 429, id="429"),
    pytest.param(Fault(status=500), UpstreamServerError, True, 500, id="500"),
    pytest.param(Fault(status=502), UpstreamServerError, True, 502, id="502"),
    pytest.param(Fault(status=503), UpstreamServerError, True, 503, id="503"),
    pytest.param(Fault(status=504), UpstreamServerError, True, 504, id="504"),
    pytest.param(Fault(status=520), UpstreamServerError, True, 520, id="520"),
    pytest.param(Fault(error_in_200=True), ErrorInResponseError, True, 200, id="error-in-200"),
    pytest.param(Fault(no_choices=True), EmptyResponseError, True, 200, id="no-choices"),
    pytest.param(
        Fault(status=200, body="<html>oops</html>"),
        InvalidResponseError,
        True,
        200,
        id="200-not-json",
    ),
    pytest.param(
        Fault(status=502, body="<html>Bad gateway</html>"),
        UpstreamServerError,
        True,
        502,
        id="502-not-json",
    ),
]


@pytest.mark.parametrize(("fault", "cls", "retryable", "status"), ERROR_CASES)
def test_each_failure_maps_to_its_error_class(
    emulator: EmulatorServer,
    client_for: Callable[..., OpenRouterClient],
    fault: Fault,
    cls: type[UpstreamError],
    retryable: bool,
    status: int,
) -> None:
    emulator.script([fault])

    with pytest.raises(cls) as caught:
        _complete(client_for())

    error = caught.value
    assert type(error) is cls
    assert isinstance(error, InferenceError)
    assert error.retryable is retryable
    assert error.status_code == status
    assert error.to_dict()["status_code"] == status
    assert error.to_dict()["retryable"] is retryable
    assert str(error)  # something an operator can read
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
def test_error_keeps_openrouter_code_and_message(
    emulator: EmulatorServer,
    client_for: Callable[..., OpenRouterClient],
    status: int,
    phrase: str,
) -> None:
    emulator.script([Fault(status=status)])

    with pytest.raises(UpstreamError) as caught:
        _complete(client_for())

    assert caught.value.code == status
    assert phrase in str(caught.value)
    assert str(status) in str(caught.value)


def test_moderation_error_keeps_metadata_and_reasons(
    emulator: EmulatorServer, client_for: Callable[..., OpenRouterClient]
) -> None:
    emulator.script([Fault(status=403, metadata=MODERATION)])

    with pytest.raises(ModerationError) as caught:
        _complete(client_for())

    error = caught.value
    assert error.reasons == ["violence", "harassment"]
    assert error.metadata["reasons"] == ["violence", "harassment"]
    assert error.metadata["flagged_input"] == "some flagged text"
    assert "violence, harassment" in str(error)
    # The user's own flagged text stays out of the operator's message.
    assert "some flagged text" not in str(error)


def test_moderation_error_without_metadata_has_no_reasons(
    emulator: EmulatorServer, client_for: Callable[..., OpenRouterClient]
) -> None:
    emulator.script([Fault(status=403)])

    with pytest.raises(ModerationError) as caught:
        _complete(client_for())

    assert caught.value.reasons == []


def test_error_in_200_keeps_the_upstream_message(
    emulator: EmulatorServer, client_for: Callable[..., OpenRouterClient]
) -> None:
    emulator.script([Fault(error_in_200=True, message="provider went away")])

    with pytest.raises(ErrorInResponseError) as caught:
        _complete(client_for())

    assert "provider went away" in str(caught.value)
    assert caught.value.code == 502


def test_no_choices_message_says_so(
    emulator: EmulatorServer, client_for: Callable[..., OpenRouterClient]
) -> None:
    emulator.script([Fault(no_choices=True)])

    with pytest.raises(EmptyResponseError) as caught:
        _complete(client_for())

    assert "no choices" in str(caught.value)


@pytest.mark.parametrize("status", [200, 502])
def test_non_json_body_says_so_and_quotes_the_first_bytes(
    emulator: EmulatorServer, client_for: Callable[..., OpenRouterClient], status: int
) -> None:
    body = "<html><body>Cloudflare says hello</body></html>" + "x" * 5000
    emulator.script([Fault(status=status, body=body)])

    with pytest.raises(UpstreamError) as caught:
        _complete(client_for())

    message = str(caught.value)
    assert "not JSON" in message
    assert "<html><body>Cloudflare says hello" in message
    # Only the first bytes: a log line, not a page.
    assert len(message) < 600
    assert caught.value.status_code == status


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (Fault(status=429, retry_after=7), 7.0),
        (Fault(status=503, retry_after=2.5), 2.5),
        (Fault(status=429, retry_after_ms=1500), 1.5),
        (Fault(status=429), None),
    ],
)
def test_retry_after_is_read_onto_the_error(
    emulator: EmulatorServer,
    client_for: Callable[..., OpenRouterClient],
    fault: Fault,
    expected: float | None,
) -> None:
    emulator.script([fault])

    with pytest.raises(UpstreamError) as caught:
        _complete(client_for())

    assert caught.value.retry_after == expected


# --------------------------------------------------------------------------- transport failures


def test_read_timeout_shorter_than_the_emulator_delay(
    emulator: EmulatorServer, client_for: Callable[..., OpenRouterClient]
) -> None:
    emulator.script([Fault(delay_ms=1000)])

    with pytest.raises(UpstreamTimeoutError) as caught:
        _complete(client_for(timeout_seconds=0.2))

    assert caught.value.retryable is True
    assert caught.value.status_code is None
    assert "did not answer in time" in str(caught.value)
    assert emulator.request_count(CHAT) == 1


def test_connection_refused(client_for: Callable[..., OpenRouterClient]) -> None:
    client = client_for(base_url=f"http://127.0.0.1:{_free_port()}/api/v1")

    with pytest.raises(UpstreamConnectionError) as caught:
        _complete(client)

    assert caught.value.retryable is True
    assert caught.value.status_code is None
    assert "could not talk to OpenRouter" in str(caught.value)


def test_dropped_connection(
    emulator: EmulatorServer, client_for: Callable[..., OpenRouterClient]
) -> None:
    emulator.script([Fault(drop=True)])

    with pytest.raises(UpstreamConnectionError) as caught:
        _complete(client_for())

    assert caught.value.retryable is True
    assert emulator.request_count(CHAT) == 1


def test_client_recovers_on_the_next_call_after_a_drop(
    emulator: EmulatorServer, client_for: Callable[..., OpenRouterClient]
) -> None:
    client = client_for()
    _complete(client)  # a kept-alive connection that the drop then cuts
    emulator.script([Fault(drop=True)])

    with pytest.raises(UpstreamConnectionError):
        _complete(client)
    assert _complete(client).finish_reason == "stop"
    assert emulator.request_count(CHAT) == 3


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
    ]


def _assert_no_canary(caplog: pytest.LogCaptureFixture, errors: list[BaseException]) -> None:
    for error in errors:
        rendered = [
            str(error),
            repr(error),
            repr(getattr(error, "to_dict", dict)()),
            repr(getattr(error, "metadata", None)),
            "".join(traceback.format_exception(error)),
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


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "claude_headspace", "openai", "urllib3"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


@pytest.mark.parametrize("fault", _leak_paths())
def test_canary_key_absent_from_logs_and_errors(
    emulator: EmulatorServer,
    client_for: Callable[..., OpenRouterClient],
    debug_logs: pytest.LogCaptureFixture,
    fault: Fault | None,
) -> None:
    clock = FakeClock()
    if fault is None:
        client = client_for(key=CANARY, base_url=f"http://127.0.0.1:{_free_port()}/api/v1")
    else:
        client = client_for(key=CANARY, timeout_seconds=0.2, clock=clock)
        emulator.script([fault, fault])
    errors: list[BaseException] = []
    policy = RetryPolicy.from_settings(RetrySettings(max_attempts=2))

    with pytest.raises(InferenceError) as caught:
        policy.run(
            lambda _attempt: _complete(client),
            clock=clock,
            on_error=lambda error, _attempt, _delay: errors.append(error),
            rng=random.Random(3),
        )
    errors.append(caught.value)
    # The health probe over the same client, and the paths a status page would show.
    report = HealthChecker(client, OpenRouterSettings()).check()
    assert CANARY not in repr(report.to_dict())
    logging.getLogger("claude_headspace.tests").debug("error seen: %s", caught.value)

    assert any(r.name.startswith("httpcore") for r in debug_logs.records)
    _assert_no_canary(debug_logs, errors)


def test_canary_key_absent_on_success_and_health_paths(
    own_emulator: Callable[..., EmulatorServer],
    client_for: Callable[..., OpenRouterClient],
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    client = client_for(key=CANARY)
    completion = _complete(client)
    assert CANARY not in repr(completion)

    strict = own_emulator(accept_keys={"sk-or-v1-some-other-key"})
    rejected = client_for(key=CANARY, base_url=strict.base_url)
    reports = [
        HealthChecker(client, OpenRouterSettings()).check(),
        HealthChecker(rejected, OpenRouterSettings()).check(),
    ]
    assert [r.state for r in reports] == ["healthy", "key_rejected"]
    with pytest.raises(AuthenticationError) as caught:
        rejected.get_key(timeout=5)

    for report in reports:
        assert CANARY not in repr(report) and CANARY not in repr(report.to_dict())
    _assert_no_canary(debug_logs, [caught.value])
