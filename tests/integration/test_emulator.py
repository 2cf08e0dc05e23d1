"""The OpenRouter emulator as any HTTP client sees it: OpenRouter's shapes (checked by the
official openai SDK), keys, scripted faults, the control endpoints, chaos, keep-alive under
concurrency, and running as a separate process from either command."""

from __future__ import annotations

import http.client as http_client
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tests.emulator_fixtures import TEST_KEY

from headspace_inference.settings import OpenRouterSettings
from headspace_inference.testing.emulator import PROVIDER_ERRORS, EmulatorServer, Fault
from headspace_inference.testing.emulator.cli import parse_faults
from headspace_inference.testing.emulator.server import PRICES, count_tokens

HAIKU = "anthropic/claude-haiku-4.5"
SONNET = "anthropic/claude-sonnet-4.5"
CHAT = "/api/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hello world"}]
BODY: dict[str, Any] = {"model": HAIKU, "messages": MESSAGES}


def sdk(emulator: EmulatorServer, key: str = TEST_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=emulator.base_url, api_key=key, max_retries=0, timeout=5)


def raw_client(emulator: EmulatorServer, key: str | None = TEST_KEY) -> httpx.Client:
    """A plain httpx client at the emulator's root (no key: the control endpoints' way)."""
    return httpx.Client(
        base_url=emulator.base_url.removesuffix("/api/v1"),
        headers={"Authorization": f"Bearer {key}"} if key else {},
        timeout=10,
    )


@pytest.fixture
def http(emulator: EmulatorServer) -> Iterator[httpx.Client]:
    with raw_client(emulator) as client:
        yield client


@pytest.fixture
def control(emulator: EmulatorServer) -> Iterator[httpx.Client]:
    """A second client, with no key, that drives the control endpoints."""
    with raw_client(emulator, key=None) as client:
        yield client


@pytest.fixture
def strict_emulator(own_emulator: Any) -> EmulatorServer:
    server: EmulatorServer = own_emulator(accept_keys={TEST_KEY})
    return server


def chat(client: httpx.Client, **extra: Any) -> httpx.Response:
    return client.post(CHAT, json={**BODY, **extra})


# --------------------------------------------------------------------------- OpenRouter's shapes


def test_the_openai_sdk_parses_a_completion(emulator: EmulatorServer) -> None:
    client = sdk(emulator)
    answer = client.chat.completions.create(model=HAIKU, messages=MESSAGES)  # type: ignore[arg-type]
    client.close()
    assert answer.id.startswith("gen-")
    assert answer.model == HAIKU
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == "Summary by claude-haiku-4.5: hello world"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (6, 10)
    assert answer.usage.total_tokens == 16
    extra = answer.model_dump()
    assert extra["provider"] == "Anthropic"
    p_in, p_out = PRICES[HAIKU]
    assert extra["usage"]["cost"] == pytest.approx((6 * p_in + 10 * p_out) / 1e6)
    assert emulator.request_count(CHAT) == 1


def test_the_prices_are_configs_defaults() -> None:
    defaults = OpenRouterSettings().pricing
    assert {m: (p.input_per_million, p.output_per_million) for m, p in defaults.items()} == PRICES
    assert PRICES[HAIKU] == (1.0, 5.0)


def test_the_openai_sdk_lists_models_with_their_prices(emulator: EmulatorServer) -> None:
    client = sdk(emulator)
    models = {m.id: m for m in client.models.list()}
    client.close()
    assert {HAIKU, SONNET} <= set(models)
    for model in models.values():
        pricing = model.model_dump()["pricing"]
        assert float(pricing["prompt"]) > 0 and float(pricing["completion"]) > 0
    haiku = models[HAIKU].model_dump()["pricing"]
    assert float(haiku["prompt"]) == pytest.approx(1.0 / 1e6)
    assert float(haiku["completion"]) == pytest.approx(5.0 / 1e6)
    assert float(models[SONNET].model_dump()["pricing"]["prompt"]) == pytest.approx(3.0 / 1e6)


@pytest.mark.parametrize(
    ("status", "sdk_error"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (402, openai.APIStatusError),
        (403, openai.PermissionDeniedError),
        (404, openai.NotFoundError),
        (429, openai.RateLimitError),
        (503, openai.InternalServerError),
    ],
)
def test_the_openai_sdk_reads_its_errors(
    status: int, sdk_error: type[openai.APIStatusError], emulator: EmulatorServer
) -> None:
    emulator.script([Fault(status=status, retry_after=1, metadata={"reasons": ["hate"]})])
    client = sdk(emulator)
    with pytest.raises(sdk_error) as caught:
        client.chat.completions.create(model=HAIKU, messages=MESSAGES)  # type: ignore[arg-type]
    client.close()
    assert caught.value.status_code == status
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == status
    assert caught.value.response.headers["retry-after"] == "1"


def test_answers_are_deterministic_and_token_counts_follow_the_input(
    http: httpx.Client,
) -> None:
    def ask(text: str, **extra: Any) -> dict[str, Any]:
        response = chat(http, messages=[{"role": "user", "content": text}], **extra)
        assert response.status_code == 200
        data: dict[str, Any] = response.json()
        return data

    short, long = ask("a b c"), ask("a b c " * 400)
    again, other = ask("a b c"), ask("something else")
    assert again["choices"] == short["choices"] and again["usage"] == short["usage"]
    assert again["id"] != short["id"]
    assert other["choices"] != short["choices"]
    assert long["usage"]["prompt_tokens"] > short["usage"]["prompt_tokens"] >= 1
    assert long["usage"]["prompt_tokens"] >= count_tokens("a b c " * 400)
    usage = short["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["cost"] > 0
    capped = ask("a b c " * 400, max_tokens=3)
    assert capped["usage"]["completion_tokens"] <= 3
    assert capped["choices"][0]["finish_reason"] == "length"


def test_sonnet_costs_three_times_haiku(http: httpx.Client) -> None:
    # an input whose answers have as many tokens for either model's name
    messages = [{"role": "user", "content": "count the requests"}]
    haiku = chat(http, messages=messages).json()["usage"]["cost"]
    sonnet = chat(http, model=SONNET, messages=messages).json()["usage"]["cost"]
    assert sonnet == pytest.approx(3 * haiku)


def test_generation_returns_what_the_completion_reported(http: httpx.Client) -> None:
    completion = chat(http, max_tokens=3).json()

    response = http.get("/api/v1/generation", params={"id": completion["id"]})

    assert response.status_code == 200
    data = response.json()["data"]
    assert data["id"] == completion["id"]
    assert data["model"] == completion["model"]
    assert data["total_cost"] == pytest.approx(completion["usage"]["cost"])
    assert data["tokens_prompt"] == completion["usage"]["prompt_tokens"]
    assert data["tokens_completion"] == completion["usage"]["completion_tokens"] == 3
    assert data["finish_reason"] == completion["choices"][0]["finish_reason"] == "length"
    assert data["provider_name"] == completion["provider"]
    missing = http.get("/api/v1/generation", params={"id": "gen-nope"})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == 404
    assert "gen-nope" in missing.json()["error"]["message"]


def test_bad_requests_get_openrouter_error_bodies(http: httpx.Client) -> None:
    for body in ({"model": HAIKU}, {"model": "nonsense", "messages": []}):
        response = http.post(CHAT, json=body)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == 400
    assert http.get("/api/v1/nothing-here").status_code == 404
    assert http.post("/api/v1/nothing-here", json={}).status_code == 404


def test_requests_are_recorded_with_lowercase_headers_and_bodies(
    emulator: EmulatorServer, http: httpx.Client
) -> None:
    chat(http)
    http.get("/api/v1/models")

    recorded_chat, models = emulator.requests
    assert (recorded_chat.method, recorded_chat.path, recorded_chat.body) == ("POST", CHAT, BODY)
    assert recorded_chat.headers["authorization"] == f"Bearer {TEST_KEY}"
    assert all(name == name.lower() for name in recorded_chat.headers)
    assert (models.method, models.path, models.body) == ("GET", "/api/v1/models", None)
    assert emulator.request_count(CHAT) == 1
    assert emulator.request_count() == 2


# --------------------------------------------------------------------------- keys


def test_the_models_answer_without_a_key(control: httpx.Client) -> None:
    assert control.get("/api/v1/models").status_code == 200


def test_the_default_emulator_accepts_any_openrouter_shaped_key(emulator: EmulatorServer) -> None:
    for key, status in (("sk-or-v1-anything", 200), ("not-a-key", 401)):
        with raw_client(emulator, key=key) as client:
            assert client.get("/api/v1/key").status_code == status
            assert chat(client).status_code == status


def test_only_the_listed_keys_are_accepted(own_emulator: Any) -> None:
    server: EmulatorServer = own_emulator(accept_keys={"sk-or-good", "plain-good"})
    for key, status in (("sk-or-good", 200), ("plain-good", 200), ("sk-or-other", 401)):
        with raw_client(server, key=key) as client:
            assert client.get("/api/v1/key").status_code == status
            assert chat(client).status_code == status


def test_the_key_endpoint_answers_an_accepted_key_without_echoing_it(
    strict_emulator: EmulatorServer,
) -> None:
    with raw_client(strict_emulator) as client:
        response = client.get("/api/v1/key")
    assert response.status_code == 200
    assert "label" in response.json()["data"]
    assert TEST_KEY not in response.text


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": "Bearer sk-or-v1-not-on-the-list"}, {"Authorization": TEST_KEY}, {}],
    ids=["other-key", "no-bearer", "no-header"],
)
def test_the_key_endpoint_gives_401_for_a_key_not_accepted(
    strict_emulator: EmulatorServer, headers: dict[str, str]
) -> None:
    response = httpx.get(f"{strict_emulator.base_url}/key", headers=headers)

    assert response.status_code == 401
    assert set(response.json()["error"]) >= {"code", "message"}
    assert response.json()["error"]["code"] == 401


def test_the_key_endpoint_tells_the_credit_and_what_the_answers_charged(
    emulator: EmulatorServer, http: httpx.Client
) -> None:
    unlimited = http.get("/api/v1/key").json()["data"]
    assert (unlimited["limit"], unlimited["limit_remaining"], unlimited["usage"]) == (None, None, 0)

    emulator.set_key_credit(5.0, usage=1.25)
    for text in ("one", "two"):
        assert chat(http, messages=[{"role": "user", "content": text}]).status_code == 200
    charged = float(emulator.charged().cost)
    assert charged > 0
    data = http.get("/api/v1/key").json()["data"]
    assert data["limit"] == 5.0
    assert data["usage"] == pytest.approx(1.25 + charged, abs=1e-12)
    assert data["limit_remaining"] == pytest.approx(5.0 - 1.25 - charged, abs=1e-12)

    emulator.set_key_credit(1.0, usage=3.0)  # spent past its limit: nothing is left
    assert http.get("/api/v1/key").json()["data"]["limit_remaining"] == 0
    emulator.reset()
    reset = http.get("/api/v1/key").json()["data"]
    assert (reset["limit"], reset["usage"]) == (None, 0)


def test_the_key_credit_is_set_from_outside_and_checked(
    http: httpx.Client, control: httpx.Client
) -> None:
    assert control.post("/_emulator/key", json={"limit": 10, "usage": 2.5}).status_code == 200
    data = http.get("/api/v1/key").json()["data"]
    assert (data["limit"], data["limit_remaining"], data["usage"]) == (10.0, 7.5, 2.5)
    for bad in ({"limit": -1}, {"limit": "10"}, {"limit": 1, "usage": True}, {"usage": None}):
        refused = control.post("/_emulator/key", json=bad)
        assert refused.status_code == 400, bad
        assert "USD" in refused.json()["error"]["message"]
    assert http.get("/api/v1/key").json()["data"]["limit"] == 10.0  # unchanged
    assert control.post("/_emulator/key", json={"limit": None}).status_code == 200
    assert http.get("/api/v1/key").json()["data"]["limit"] is None


def test_own_emulator_listens_on_its_own_port(
    emulator: EmulatorServer, strict_emulator: EmulatorServer
) -> None:
    assert strict_emulator.port != emulator.port
    assert strict_emulator.base_url == f"http://127.0.0.1:{strict_emulator.port}/api/v1"


# --------------------------------------------------------------------------- scripted faults


def test_scripted_faults_answer_in_order_then_normal_answers(
    emulator: EmulatorServer, http: httpx.Client
) -> None:
    emulator.script(
        [
            Fault(status=429, retry_after=3),
            Fault(status=503, retry_after_ms=250),
            Fault(error_in_200=True),
            Fault(no_choices=True),
            Fault(status=502, body="<html>bad gateway</html>"),
        ]
    )
    assert http.get("/api/v1/models").status_code == 200  # not a chat: takes no fault

    limited = chat(http)
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "3"
    assert limited.json() == {"error": {"code": 429, "message": "Rate limit exceeded"}}
    unavailable = chat(http)
    assert unavailable.status_code == 503
    assert unavailable.headers["retry-after-ms"] == "250"
    in_200 = chat(http)
    assert in_200.status_code == 200
    assert "error" in in_200.json()
    empty = chat(http)
    assert empty.status_code == 200
    assert empty.json()["choices"] == []
    html = chat(http)
    assert html.status_code == 502
    assert html.text == "<html>bad gateway</html>"
    assert chat(http).status_code == 200
    assert emulator.request_count(CHAT) == 6


def test_a_moderation_fault_carries_its_metadata(
    emulator: EmulatorServer, http: httpx.Client
) -> None:
    emulator.script([Fault(status=403, metadata={"reasons": ["hate"], "flagged_input": "x"})])

    error = chat(http).json()["error"]

    assert error["code"] == 403
    assert error["metadata"] == {"reasons": ["hate"], "flagged_input": "x"}


@pytest.mark.parametrize(
    "fault",
    [Fault(drop=True), Fault(raw="HTTP/1.1 200 OK\r\nnot a header line\r\n\r\n")],
    ids=["drop", "raw"],
)
def test_a_dropped_or_broken_answer_then_a_normal_one(
    emulator: EmulatorServer, http: httpx.Client, fault: Fault
) -> None:
    emulator.script([fault])

    with pytest.raises(httpx.TransportError):
        chat(http)
    assert chat(http).status_code == 200


def test_a_held_path_waits_until_released(emulator: EmulatorServer, http: httpx.Client) -> None:
    release = emulator.hold("/api/v1/key")
    answers: list[int] = []
    waiting = threading.Thread(target=lambda: answers.append(http.get("/api/v1/key").status_code))
    waiting.start()
    with raw_client(emulator) as other:
        assert chat(other).status_code == 200  # other paths answer meanwhile
    assert emulator.request_count("/api/v1/key") == 1  # recorded on arrival
    assert answers == []
    release.set()
    waiting.join(10)
    assert answers == [200]
    emulator.hold("/api/v1/key")
    emulator.reset()  # lets held requests go, and forgets the hold
    assert http.get("/api/v1/key", timeout=2).status_code == 200


# --------------------------------------------------------------------------- control endpoints


@pytest.mark.parametrize("name", sorted(PROVIDER_ERRORS))
def test_each_provider_error_shape_then_a_normal_answer(
    emulator: EmulatorServer, http: httpx.Client, name: str
) -> None:
    emulator.script([PROVIDER_ERRORS[name]] * 2)
    first, second, third = chat(http), chat(http), chat(http)

    error = first.json()["error"]
    assert first.status_code == second.status_code == (404 if name == "provider-404" else 400)
    assert first.json() == second.json()
    if name.startswith("provider-400-"):
        assert (error["code"], error["message"]) == (int(name[-3:]), "Provider returned error")
    if name == "provider-404":
        assert error["metadata"] == {"provider_name": "Anthropic", "raw": ""}
    if name == "no-models-provided":
        assert error["message"] == "No models provided"
    assert third.status_code == 200 and third.json()["choices"]


def test_named_faults_from_the_command_line() -> None:
    assert parse_faults("provider-404*3") == [PROVIDER_ERRORS["provider-404"]] * 3
    assert parse_faults('{"status": 429}') == [Fault(status=429)]
    assert parse_faults('{"message": "a*b"}*2') == [Fault(message="a*b")] * 2
    for bad, said in [("nope", "neither JSON nor a named fault"), ("trickle*0", "at least 1")]:
        with pytest.raises(ValueError, match=said):
            parse_faults(bad)


def test_a_huge_answer_is_sent_in_chunks_and_a_gzipped_one_inflates(
    emulator: EmulatorServer, http: httpx.Client
) -> None:
    emulator.script([Fault(huge_bytes=3 * 2**20), Fault(huge_bytes=3 * 2**20, gzip=True)])
    plain = chat(http)
    assert plain.headers["transfer-encoding"] == "chunked"
    assert plain.json()["choices"][0]["message"]["content"] == "x" * 3 * 2**20
    assert plain.json()["usage"]["completion_tokens"] == 3 * 2**20 // 4
    with http.stream("POST", CHAT, json=BODY) as packed:
        wire = sum(len(piece) for piece in packed.iter_raw())
        assert packed.headers["content-encoding"] == "gzip"
    assert wire < 2**20 // 50  # about a thousandth of what it inflates to


def test_a_trickled_answer_arrives_whole_one_byte_at_a_time(
    emulator: EmulatorServer, http: httpx.Client
) -> None:
    emulator.script([Fault(trickle_ms=1)], path="/api/v1/key")
    assert http.get("/api/v1/key").json()["data"]["label"]


def test_faults_for_the_key_and_models_endpoints(
    emulator: EmulatorServer, http: httpx.Client, control: httpx.Client
) -> None:
    scripted = {"path": "/api/v1/key", "faults": [{"status": 500}, {"drop": True}]}
    assert control.post("/_emulator/faults", json=scripted).status_code == 200
    emulator.script([Fault(huge_bytes=1000)], path="/api/v1/models")
    assert http.get("/api/v1/key").status_code == 500
    with pytest.raises(httpx.TransportError):
        http.get("/api/v1/key")
    assert http.get("/api/v1/key").status_code == 200
    assert chat(http).status_code == 200  # the chat endpoint's faults are its own
    assert http.get("/api/v1/models").json()["padding"] == "x" * 1000
    refused = control.post("/_emulator/faults", json={"path": "/api/v1/x", "faults": []})
    assert refused.status_code == 400


def test_the_control_endpoints_script_a_server_from_outside(
    emulator: EmulatorServer, http: httpx.Client, control: httpx.Client
) -> None:
    faults = [{"status": 503, "retry_after": 4}, {"error_in_200": True}]
    assert control.post("/_emulator/faults", json={"faults": faults}).json() == {"ok": True}
    first = chat(http)
    assert (first.status_code, first.headers["retry-after"]) == (503, "4")
    assert first.json()["error"]["code"] == 503
    second = chat(http)
    assert second.status_code == 200 and "error" in second.json()
    assert chat(http).json()["choices"]
    listed = control.get("/_emulator/requests", params={"path": CHAT}).json()
    everything = control.get("/_emulator/requests").json()
    http.get("/api/v1/models")
    assert listed["count"] == 3 == everything["count"] == emulator.request_count(CHAT)
    assert control.get("/_emulator/requests").json()["count"] == 4
    assert listed["requests"][0]["body"] == BODY
    assert listed["requests"][0]["headers"]["authorization"] == f"Bearer {TEST_KEY}"
    assert listed["requests"][0]["method"] == "POST"


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        ("/_emulator/faults", {"faults": [{"status": 503}, {"stauts": 500}]}, "stauts"),
        ("/_emulator/chaos", {"seed": 1, "mix": {"boom": 1}}, "boom"),
    ],
    ids=["unknown-fault-field", "unknown-chaos-outcome"],
)
def test_a_bad_control_request_is_refused_and_changes_nothing(
    http: httpx.Client, control: httpx.Client, path: str, body: dict[str, Any], named: str
) -> None:
    response = control.post(path, json=body)

    assert response.status_code == 400
    assert named in response.json()["error"]["message"]
    assert chat(http).status_code == 200


def test_control_latency_delays_chat_answers_only(
    emulator: EmulatorServer, http: httpx.Client, control: httpx.Client
) -> None:
    assert control.post("/_emulator/latency", json={"ms": 1000}).status_code == 200
    assert emulator.state.latency_ms == 1000
    with pytest.raises(httpx.ReadTimeout):
        http.post(CHAT, json=BODY, timeout=0.2)
    assert http.get("/api/v1/key", timeout=0.5).status_code == 200
    assert http.get("/api/v1/models", timeout=0.5).status_code == 200
    assert control.post("/_emulator/latency", json={"ms": 0}).status_code == 200
    assert emulator.state.latency_ms == 0
    assert chat(http).status_code == 200


def test_control_chaos_from_another_client(http: httpx.Client, control: httpx.Client) -> None:
    assert control.post("/_emulator/chaos", json={"seed": 7, "mix": {"503": 1.0}}).is_success
    assert [chat(http).status_code for _ in range(4)] == [503] * 4
    assert control.post("/_emulator/chaos", json={"seed": None}).status_code == 200
    assert chat(http).status_code == 200


def test_control_chaos_is_reproducible_from_its_seed(
    http: httpx.Client, control: httpx.Client
) -> None:
    mix = {"ok": 0.5, "500": 0.25, "429": 0.25}

    runs = []
    for _ in range(2):
        control.post("/_emulator/chaos", json={"seed": 123, "mix": mix})
        runs.append([chat(http).status_code for _ in range(20)])

    assert runs[0] == runs[1]
    assert set(runs[0]) <= {200, 500, 429}
    assert len(set(runs[0])) > 1


def test_control_reset_forgets_everything(
    emulator: EmulatorServer, http: httpx.Client, control: httpx.Client
) -> None:
    chat(http)
    control.post("/_emulator/faults", json={"faults": [{"status": 500}]})
    control.post("/_emulator/latency", json={"ms": 250})
    control.post("/_emulator/chaos", json={"seed": 1, "mix": {"502": 1}})
    assert control.post("/_emulator/reset").status_code == 200

    assert control.get("/_emulator/requests").json() == {"count": 0, "requests": []}
    assert emulator.state.latency_ms == 0
    assert chat(http).status_code == 200  # no fault, no chaos left


def test_control_requests_are_not_recorded(emulator: EmulatorServer, control: httpx.Client) -> None:
    control.get("/_emulator/requests")
    control.post("/_emulator/latency", json={"ms": 0})
    assert emulator.request_count() == 0
    assert control.post("/_emulator/nothing", json={}).status_code == 404
    assert control.get("/_emulator/nothing").status_code == 404


# --------------------------------------------------------------------------- chaos


def outcome(client: httpx.Client) -> str:
    try:
        response = chat(client)
    except httpx.TimeoutException:
        return "timeout"
    except httpx.TransportError:
        return "drop"
    data = response.json()
    if response.status_code != 200:
        return str(response.status_code)
    if "error" in data:
        return "error_in_200"
    return "ok" if data["choices"] else "no_choices"


def test_chaos_is_seeded_and_draws_every_outcome(emulator: EmulatorServer) -> None:
    mix = {"ok": 1, "429": 1, "500": 1, "502": 1, "503": 1, "drop": 1, "error_in_200": 1}
    runs = []
    for _ in range(2):
        emulator.set_chaos(42, mix)
        with raw_client(emulator) as client:
            runs.append([outcome(client) for _ in range(60)])
    emulator.set_chaos(None)
    assert runs[0] == runs[1]
    assert set(runs[0]) == set(mix)


def test_chaos_hangs_past_the_client_timeout(emulator: EmulatorServer) -> None:
    emulator.set_chaos(7, {"timeout": 1.0}, hang_ms=1000)
    with raw_client(emulator) as client:
        client.timeout = httpx.Timeout(0.1)
        assert outcome(client) == "timeout"
    emulator.set_chaos(None)


def test_a_chaos_429_carries_retry_after(emulator: EmulatorServer, http: httpx.Client) -> None:
    emulator.set_chaos(1, {"429": 1})
    response = chat(http)
    assert response.status_code == 429 and "retry-after" in response.headers


# --------------------------------------------------------------------------- serving


def test_keep_alive_serves_many_requests_on_one_connection(emulator: EmulatorServer) -> None:
    conn = http_client.HTTPConnection("127.0.0.1", emulator.port, timeout=5)
    headers = {"Authorization": f"Bearer {TEST_KEY}", "Content-Type": "application/json"}
    conn.connect()
    sock = conn.sock
    for _ in range(5):
        conn.request("POST", CHAT, body=json.dumps(BODY), headers=headers)
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["choices"]
    assert conn.sock is sock  # never reconnected
    conn.close()


def test_concurrent_keep_alive_clients(emulator: EmulatorServer) -> None:
    threads, per_thread = 20, 20
    statuses: list[list[int]] = [[] for _ in range(threads)]
    failures: list[BaseException] = []
    start = threading.Barrier(threads)

    def worker(index: int) -> None:
        try:
            with raw_client(emulator) as client:
                start.wait()
                for n in range(per_thread):
                    content = f"thread {index} request {n}"
                    response = chat(client, messages=[{"role": "user", "content": content}])
                    statuses[index].append(response.status_code)
                    assert content in response.json()["choices"][0]["message"]["content"]
        except BaseException as exc:  # reported below, on the test's thread
            failures.append(exc)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=120)

    assert failures == []
    assert all(s == [200] * per_thread for s in statuses)
    assert emulator.request_count(CHAT) == threads * per_thread


def test_in_process_lifecycle() -> None:
    with EmulatorServer(latency_ms=0) as server:
        assert server.base_url == f"http://127.0.0.1:{server.port}/api/v1"
        assert httpx.get(f"{server.base_url}/models").status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.base_url}/models")


# --------------------------------------------------------------------------- the command line

COMMANDS = {
    "python-m": [sys.executable, "-m", "headspace_inference.testing.emulator"],
    "headspace-inference": [
        str(Path(sys.executable).with_name("headspace-inference")),
        "openrouter-emulator",
    ],
}


@pytest.fixture(params=sorted(COMMANDS))
def command(request: pytest.FixtureRequest) -> list[str]:
    """Both ways to start the emulator: one click command behind them."""
    command = COMMANDS[request.param]
    if not Path(command[0]).exists():
        pytest.skip(f"{command[0]} is not installed")
    return command


def _start(command: list[str], *args: str) -> tuple[subprocess.Popen[str], str]:
    """The emulator in a process of its own, and its base URL (its first line's last word)."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [*command, "--port=0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("OpenRouter emulator listening on http://127.0.0.1:"), line
    base_url = line.split()[-1]
    assert base_url.endswith("/api/v1") and not base_url.endswith(":0/api/v1")
    return proc, base_url


def _stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_runs_as_a_separate_process_and_ends_cleanly_on_sigterm(command: list[str]) -> None:
    proc, base_url = _start(command)
    try:
        with httpx.Client(headers={"Authorization": f"Bearer {TEST_KEY}"}, timeout=10) as client:
            assert client.get(f"{base_url}/models").status_code == 200
            answer = client.post(f"{base_url}/chat/completions", json=BODY)
            assert answer.status_code == 200
            assert answer.json()["id"].startswith("gen-")
    finally:
        code = _stop(proc)
    assert code == 0


def test_the_process_takes_faults_keys_and_chaos_as_flags(command: list[str]) -> None:
    faults = ['{"status": 429, "retry_after": 3}', '{"status": 503}', "provider-400-524*2"]
    flags = [*(f"--fault={f}" for f in faults), "--chaos=5", "--chaos-mix=ok=1", "--key-limit=7"]
    proc, base_url = _start(command, f"--accept-key={TEST_KEY}", "--latency-ms=1", *flags)
    try:
        with httpx.Client(headers={"Authorization": f"Bearer {TEST_KEY}"}, timeout=10) as client:
            statuses = [client.post(f"{base_url}/chat/completions", json=BODY) for _ in range(5)]
            assert [r.status_code for r in statuses] == [429, 503, 400, 400, 200]
            assert statuses[0].headers["retry-after"] == "3"
            assert statuses[3].json()["error"]["code"] == 524
            key = client.get(f"{base_url}/key")
            assert key.status_code == 200 and key.json()["data"]["limit"] == 7.0
        other = httpx.get(f"{base_url}/key", headers={"Authorization": "Bearer sk-or-v1-other"})
        assert other.status_code == 401
    finally:
        _stop(proc)


@pytest.mark.parametrize("flag", ["--fault={nope", "--chaos-mix=boom=1"])
def test_a_bad_flag_is_refused(command: list[str], flag: str) -> None:
    done = subprocess.run([*command, "--port=0", flag], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert ("not JSON" if "fault" in flag else "boom") in done.stderr
