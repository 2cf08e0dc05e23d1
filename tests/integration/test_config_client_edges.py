"""Configuration, the OpenRouter client and the health check, at their edges.

Each test here pins a defect once found; all use the real emulator and FakeClock.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from tests.emulator_fixtures import answer_body

from headspace_inference import create_app
from headspace_inference.clock import FakeClock
from headspace_inference.config_loading import load_settings
from headspace_inference.inference import (
    EmptyResponseError,
    InferenceError,
    UpstreamRateLimitError,
)
from headspace_inference.inference.client import OpenRouterClient
from headspace_inference.inference.health import HealthChecker
from headspace_inference.inference.retry import RetryPolicy
from headspace_inference.inference.types import GenerationParams
from headspace_inference.settings import ConfigError, HealthSettings, OpenRouterSettings
from headspace_inference.testing.emulator import EmulatorServer, Fault

KEY = "sk-or-v1-review-c-CANARY-0123456789"
# A key of OpenRouter's real length: "sk-or-v1-" and 64 hex digits.
LONG_KEY = "sk-or-v1-" + "3f9a1c7e5b2d4086e1c3a5b7d9f20468a0b2c4d6e8f13579bd02468ace13579b"
CHAT = "/api/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hello there"}]


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(body, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "body",
    [
        # An unclosed quote on the key's own line.
        f'openrouter:\n  api_key: "{LONG_KEY}\n  timeout_seconds: 5\n',
        # A stray colon after the key.
        f"openrouter:\n  api_key: {LONG_KEY}: x\n",
        # A mis-indented key line.
        f"openrouter:\n  timeout_seconds: 5\n api_key: {LONG_KEY}\n",
        # A tab where YAML wants spaces.
        f"openrouter:\n\tapi_key: {LONG_KEY}\n",
    ],
)
def test_yaml_syntax_error_never_echoes_the_api_key(tmp_path: Path, body: str) -> None:
    # The key is a secret that "never appears in a repr, a log line or an error"; PyYAML's
    # error text quotes the offending line, and read_yaml passes that text on whole.
    with pytest.raises(ConfigError) as info:
        load_settings(_write(tmp_path, body), environ={})
    message = str(info.value)
    assert "not valid YAML" in message
    # PyYAML shortens a long line around the error, so look for any part of the secret.
    secret = LONG_KEY.removeprefix("sk-or-v1-")
    shown = [secret[i : i + 12] for i in range(len(secret) - 11) if secret[i : i + 12] in message]
    assert not shown, f"the error shows part of the key: {shown[0]!r}"


@pytest.mark.parametrize(
    ("variable", "raw", "read"),
    [
        ("HEADSPACE__REDIS__KEY_PREFIX", "2024", lambda s: s.redis.key_prefix),
        ("HEADSPACE__API__TOKEN", "20240101", lambda s: s.api.token.get_secret_value()),
        ("HEADSPACE__OPENROUTER__APP_NAME", "Headspace #2", lambda s: s.openrouter.app_name),
    ],
)
def test_a_string_key_set_from_the_environment_keeps_its_value(
    tmp_path: Path, variable: str, raw: str, read: Any
) -> None:
    # Any key can be set as HEADSPACE__SECTION__KEY; a string key must get the string given,
    # not YAML's reading of it (an int that fails validation, or a value cut at " #").
    try:
        settings = load_settings(tmp_path / "none.yaml", environ={variable: raw})
    except ConfigError as exc:
        pytest.fail(f"{variable}={raw!r} was refused: {exc}")
    assert read(settings) == raw


def test_an_infinite_timeout_is_refused_or_works(emulator: EmulatorServer, tmp_path: Path) -> None:
    # YAML's .inf passes PositiveFloat; the client then fails every call with a bare
    # OverflowError, outside the InferenceError tree that callers catch.
    path = _write(tmp_path, "openrouter:\n  timeout_seconds: .inf\n")
    try:
        settings = load_settings(path, environ={})
    except ConfigError as exc:
        assert "openrouter.timeout_seconds" in str(exc)
        return
    client = OpenRouterClient(
        settings.openrouter.model_copy(update={"base_url": emulator.base_url}), api_key=KEY
    )
    try:
        with contextlib.suppress(InferenceError):
            client.complete(model="acme/model", messages=MESSAGES, params=GenerationParams())
    finally:
        client.close()


# --------------------------------------------------------------------------- client answers


@pytest.fixture
def app(emulator: EmulatorServer, tmp_path: Path) -> Iterator[Flask]:
    built = create_app(
        overrides={
            "database": {"url": f"sqlite:///{tmp_path / 'headspace.db'}"},
            "openrouter": {
                "base_url": emulator.base_url,
                "api_key": KEY,
                "retry": {"max_attempts": 1},
            },
            "inference": {"spool_path": str(tmp_path / "spool")},
        }
    )
    yield built
    built.extensions["inference"].close(timeout=5)


@pytest.mark.parametrize(
    "fields",
    [{"id": 12345}, {"provider": {"name": "Anthropic"}}],
    ids=["numeric-id", "provider-object"],
)
def test_an_oddly_typed_answer_field_is_an_inference_error_or_a_result(
    app: Flask, emulator: EmulatorServer, fields: dict[str, Any]
) -> None:
    # The client promises "one parsed answer or one InferenceError", but passes id, provider
    # and finish_reason through unchecked. The service then calls str methods on them when
    # it records the call: an AttributeError escapes infer(), after the answer was cached,
    # so every identical call fails the same way until the cache entry expires.
    service = app.extensions["inference"]
    emulator.script([Fault(status=200, body=answer_body(**fields))])
    for _ in range(2):  # the second call is served from the cache
        try:
            result = service.infer(level="turn", purpose="review", input_text="odd fields")
        except InferenceError:
            continue
        except Exception as exc:
            pytest.fail(f"infer() raised {type(exc).__name__}, not an InferenceError: {exc}")
        assert result.generation_id is None or isinstance(result.generation_id, str)
        assert result.provider is None or isinstance(result.provider, str)
    assert emulator.request_count(CHAT) >= 1


# --------------------------------------------------------------------------- health check


def test_the_health_probe_keeps_its_short_timeout_when_every_connection_is_busy(
    emulator: EmulatorServer,
) -> None:
    # The probe's own timeout (health.timeout_seconds) governs the request, but waiting for
    # a free pooled connection uses openrouter.timeout_seconds: with the pool busy, the
    # status endpoint waits for the slow call instead of answering after its short timeout.
    settings = OpenRouterSettings(
        base_url=emulator.base_url,
        max_connections=1,
        timeout_seconds=20.0,
        health=HealthSettings(timeout_seconds=0.2, cache_seconds=0.0),
    )
    client = OpenRouterClient(settings, api_key=KEY)
    checker = HealthChecker(client, settings, clock=FakeClock())
    emulator.set_latency(2000)  # chat answers only; /key answers at once
    busy = threading.Thread(
        target=lambda: client.complete(
            model="acme/model", messages=MESSAGES, params=GenerationParams()
        )
    )
    try:
        busy.start()
        while emulator.request_count(CHAT) < 1:  # the one connection is now in use
            time.sleep(0.01)
        report = checker.check()
        # The probe could not get a connection within its 0.2 s: it must say so rather than
        # wait for the slow call to finish and then report on a probe made seconds late.
        assert report.state == "unreachable"
        assert "0.2 s" in (report.error or "")
    finally:
        busy.join()
        client.close()


# --------------------------------------------------------------------------- a malformed key

SECRET_PART = "3f9a1c7e5b2d4086e1c3a5b7d9f20468"


@pytest.mark.parametrize(
    "key",
    [f"sk-or-v1-{SECRET_PART}\n", f"sk-or-v1-{SECRET_PART}\r", f"sk-or-v1-{SECRET_PART}é"],
    ids=["trailing-newline", "trailing-cr", "non-ascii"],
)
def test_a_key_that_cannot_go_in_a_header_fails_cleanly_without_showing_it(
    emulator: EmulatorServer, tmp_path: Path, key: str
) -> None:
    # A key read from a secret file often ends in a newline. It passes configuration, then
    # h11 refuses the header and quotes it as bytes (b'Bearer sk-or-...\n'): the escaped
    # form slips past the redaction of the exact key, so the key is in the error text. A
    # non-ASCII character ends the call with a bare UnicodeEncodeError instead.
    try:
        settings = load_settings(tmp_path / "none.yaml", environ={"OPENROUTER_API_KEY": key})
    except ConfigError as exc:  # refusing the key at start-up is a fix too
        assert SECRET_PART not in str(exc)
        return
    client = OpenRouterClient(
        settings.openrouter.model_copy(update={"base_url": emulator.base_url}),
        api_key=settings.api_key,
    )
    try:
        client.complete(model="acme/model", messages=MESSAGES, params=GenerationParams())
    except InferenceError as exc:
        assert SECRET_PART not in str(exc)
    except Exception as exc:
        pytest.fail(f"complete() raised {type(exc).__name__}, not an InferenceError")
    finally:
        client.close()


def test_a_key_with_a_trailing_newline_is_not_shown_by_the_status_endpoint(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    key = f"sk-or-v1-{SECRET_PART}\n"
    try:
        app = create_app(
            overrides={
                "database": {"url": f"sqlite:///{tmp_path / 'headspace.db'}"},
                "openrouter": {"base_url": emulator.base_url, "api_key": key},
                "inference": {"spool_path": str(tmp_path / "spool")},
            }
        )
    except ConfigError as exc:  # refusing the key at start-up is a fix too
        assert SECRET_PART not in str(exc)
        return
    try:
        app.extensions["inference"].health.check(force=True)
        answer = app.test_client().get("/api/inference/status")
        assert SECRET_PART not in answer.get_data(as_text=True)
    finally:
        app.extensions["inference"].close(timeout=5)


# --------------------------------------------------------------------------- retry headers


def test_retry_after_ms_wins_over_an_http_date_in_the_policy_as_on_the_error(
    emulator: EmulatorServer, fake_clock: FakeClock
) -> None:
    # parse_retry_after prefers retry-after-ms, so the error says retry_after == 0.5. The
    # client once also stored the HTTP date as a second field that the policy preferred: it
    # stopped (an hour is beyond the cap) while the error it raised said 0.5 s. Now the
    # error carries the one value and the policy uses it as it is.
    when = datetime.fromtimestamp(fake_clock.time() + 3600, UTC)
    emulator.script(
        [Fault(status=429, retry_after_ms=500, retry_after=format_datetime(when, usegmt=True))]
    )
    client = OpenRouterClient(
        OpenRouterSettings(base_url=emulator.base_url), api_key=KEY, clock=fake_clock
    )
    policy = RetryPolicy(max_attempts=2, base_delay_seconds=1.0, max_delay_seconds=30.0)
    try:
        _, attempts = policy.run(
            lambda _n: client.complete(
                model="acme/model", messages=MESSAGES, params=GenerationParams()
            ),
            clock=fake_clock,
        )
    except UpstreamRateLimitError as exc:
        pytest.fail(f"stopped at once although the error says retry_after={exc.retry_after}")
    finally:
        client.close()
    assert attempts == 2
    assert fake_clock.sleeps == [pytest.approx(0.5)]


# --------------------------------------------------------------------------- empty choices


def test_a_choice_with_a_null_message_is_noanswer_body(emulator: EmulatorServer) -> None:
    # A 200 with no choices is a retryable EmptyResponseError; a 200 whose only choice has
    # no message at all carries no answer either, yet it comes back as a successful ""
    # (which the service then caches and logs as ok).
    body = answer_body(choices=[{"index": 0, "finish_reason": None, "message": None}])
    emulator.script([Fault(status=200, body=body)])
    client = OpenRouterClient(OpenRouterSettings(base_url=emulator.base_url), api_key=KEY)
    try:
        with pytest.raises(EmptyResponseError):
            client.complete(model="acme/model", messages=MESSAGES, params=GenerationParams())
    finally:
        client.close()
