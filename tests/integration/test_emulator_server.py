"""The OpenRouter emulator as any HTTP client sees it: the API, the control endpoints,
concurrent keep-alive clients, and ``python -m claude_headspace.emulator``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from claude_headspace.config import OpenRouterSettings
from claude_headspace.emulator import EmulatorServer, Fault
from claude_headspace.inference.client import OpenRouterClient
from claude_headspace.inference.errors import UpstreamTimeoutError
from claude_headspace.inference.types import GenerationParams

KEY = "sk-or-v1-emulator-test-0123456789"
MODEL = "anthropic/claude-haiku-4.5"
CHAT = "/api/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "count the requests"}]
BODY: dict[str, Any] = {"model": MODEL, "messages": MESSAGES}


def _root(emulator: EmulatorServer) -> str:
    return emulator.base_url.removesuffix("/api/v1")


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=10) as client:
        yield client


@pytest.fixture
def control() -> Iterator[httpx.Client]:
    """A second client, with no key, that drives the control endpoints."""
    with httpx.Client(timeout=10) as client:
        yield client


@pytest.fixture
def strict_emulator() -> Iterator[EmulatorServer]:
    with EmulatorServer(accept_keys={KEY}) as server:
        yield server


def _chat(http: httpx.Client, emulator: EmulatorServer, **extra: Any) -> httpx.Response:
    return http.post(f"{emulator.base_url}/chat/completions", json={**BODY, **extra})


# --------------------------------------------------------------------------- the API


def test_models_list_has_pricing(emulator: EmulatorServer, http: httpx.Client) -> None:
    response = http.get(f"{emulator.base_url}/models")

    assert response.status_code == 200
    models = {m["id"]: m for m in response.json()["data"]}
    assert {"anthropic/claude-haiku-4.5", "anthropic/claude-sonnet-4.5"} <= set(models)
    for model in models.values():
        assert float(model["pricing"]["prompt"]) > 0
        assert float(model["pricing"]["completion"]) > 0
    haiku = models["anthropic/claude-haiku-4.5"]["pricing"]
    assert float(haiku["prompt"]) == pytest.approx(1.0 / 1_000_000)
    assert float(haiku["completion"]) == pytest.approx(5.0 / 1_000_000)


def test_models_answer_without_a_key(emulator: EmulatorServer, control: httpx.Client) -> None:
    assert control.get(f"{emulator.base_url}/models").status_code == 200


def test_key_endpoint_accepts_an_accepted_key(
    strict_emulator: EmulatorServer, http: httpx.Client
) -> None:
    response = http.get(f"{strict_emulator.base_url}/key")

    assert response.status_code == 200
    assert "label" in response.json()["data"]
    assert KEY not in response.text


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer sk-or-v1-not-on-the-list"},
        {"Authorization": KEY},  # no Bearer
        {},
    ],
    ids=["other-key", "no-bearer", "no-header"],
)
def test_key_endpoint_401_for_a_key_not_accepted(
    strict_emulator: EmulatorServer, headers: dict[str, str]
) -> None:
    assert strict_emulator.base_url != ""
    response = httpx.get(f"{strict_emulator.base_url}/key", headers=headers)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == 401
    assert response.json()["error"]["message"]


def test_own_emulator_listens_on_its_own_port(
    emulator: EmulatorServer, strict_emulator: EmulatorServer
) -> None:
    assert strict_emulator.port != emulator.port
    assert strict_emulator.base_url == f"http://127.0.0.1:{strict_emulator.port}/api/v1"


def test_chat_rejects_a_key_not_accepted(
    strict_emulator: EmulatorServer,
) -> None:
    response = httpx.post(
        f"{strict_emulator.base_url}/chat/completions",
        json=BODY,
        headers={"Authorization": "Bearer sk-or-v1-intruder"},
    )
    assert response.status_code == 401


def test_default_emulator_accepts_any_openrouter_shaped_key(
    emulator: EmulatorServer,
) -> None:
    url = f"{emulator.base_url}/key"
    assert httpx.get(url, headers={"Authorization": "Bearer sk-or-v1-anything"}).status_code == 200
    assert httpx.get(url, headers={"Authorization": "Bearer not-a-key"}).status_code == 401


def test_chat_completion_shape(emulator: EmulatorServer, http: httpx.Client) -> None:
    response = _chat(http, emulator)

    assert response.status_code == 200
    data = response.json()
    assert data["id"].startswith("gen-")
    assert data["object"] == "chat.completion"
    assert data["model"] == MODEL
    (choice,) = data["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].startswith("Summary by claude-haiku-4.5:")
    assert choice["finish_reason"] == "stop"
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["cost"] > 0


def test_chat_is_deterministic_and_input_derived(
    emulator: EmulatorServer, http: httpx.Client
) -> None:
    first = _chat(http, emulator).json()
    second = _chat(http, emulator).json()
    other = _chat(http, emulator, messages=[{"role": "user", "content": "something else"}]).json()

    content = first["choices"][0]["message"]["content"]
    assert content == second["choices"][0]["message"]["content"]
    assert content != other["choices"][0]["message"]["content"]
    assert first["usage"] == second["usage"]
    assert first["id"] != second["id"]


def test_sonnet_costs_more_than_haiku(emulator: EmulatorServer, http: httpx.Client) -> None:
    haiku = _chat(http, emulator).json()["usage"]["cost"]
    sonnet = _chat(http, emulator, model="anthropic/claude-sonnet-4.5").json()["usage"]["cost"]
    assert sonnet == pytest.approx(3 * haiku)


def test_generation_returns_what_the_completion_reported(
    emulator: EmulatorServer, http: httpx.Client
) -> None:
    completion = _chat(http, emulator, max_tokens=3).json()

    response = http.get(f"{emulator.base_url}/generation", params={"id": completion["id"]})

    assert response.status_code == 200
    data = response.json()["data"]
    assert data["id"] == completion["id"]
    assert data["model"] == completion["model"]
    assert data["total_cost"] == pytest.approx(completion["usage"]["cost"])
    assert data["tokens_prompt"] == completion["usage"]["prompt_tokens"]
    assert data["tokens_completion"] == completion["usage"]["completion_tokens"] == 3
    assert data["finish_reason"] == completion["choices"][0]["finish_reason"] == "length"
    assert data["provider_name"] == completion["provider"]


def test_generation_unknown_id_is_404(emulator: EmulatorServer, http: httpx.Client) -> None:
    response = http.get(f"{emulator.base_url}/generation", params={"id": "gen-nope"})
    assert response.status_code == 404
    assert "gen-nope" in response.json()["error"]["message"]


def test_chat_without_messages_is_400(emulator: EmulatorServer, http: httpx.Client) -> None:
    response = http.post(f"{emulator.base_url}/chat/completions", json={"model": MODEL})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == 400


def test_unknown_route_is_404(emulator: EmulatorServer, http: httpx.Client) -> None:
    assert http.get(f"{emulator.base_url}/nothing-here").status_code == 404
    assert http.post(f"{emulator.base_url}/nothing-here", json={}).status_code == 404


def test_requests_are_recorded_with_lowercase_headers_and_bodies(
    emulator: EmulatorServer, http: httpx.Client
) -> None:
    _chat(http, emulator)
    http.get(f"{emulator.base_url}/models")

    chat, models = emulator.requests
    assert (chat.method, chat.path, chat.body) == ("POST", CHAT, BODY)
    assert chat.headers["authorization"] == f"Bearer {KEY}"
    assert all(name == name.lower() for name in chat.headers)
    assert (models.method, models.path, models.body) == ("GET", "/api/v1/models", None)
    assert emulator.request_count(CHAT) == 1
    assert emulator.request_count() == 2


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

    limited = _chat(http, emulator)
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "3"
    assert limited.json() == {"error": {"code": 429, "message": "Rate limit exceeded"}}
    unavailable = _chat(http, emulator)
    assert unavailable.status_code == 503
    assert unavailable.headers["retry-after-ms"] == "250"
    in_200 = _chat(http, emulator)
    assert in_200.status_code == 200
    assert "error" in in_200.json()
    empty = _chat(http, emulator)
    assert empty.status_code == 200
    assert empty.json()["choices"] == []
    html = _chat(http, emulator)
    assert html.status_code == 502
    assert html.text == "<html>bad gateway</html>"
    assert _chat(http, emulator).status_code == 200
    assert emulator.request_count(CHAT) == 6


def test_moderation_fault_carries_metadata(emulator: EmulatorServer, http: httpx.Client) -> None:
    emulator.script([Fault(status=403, metadata={"reasons": ["hate"], "flagged_input": "x"})])

    error = _chat(http, emulator).json()["error"]

    assert error["code"] == 403
    assert error["metadata"] == {"reasons": ["hate"], "flagged_input": "x"}


def test_dropped_connection_gives_no_answer(emulator: EmulatorServer) -> None:
    emulator.script([Fault(drop=True)])

    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}) as http:
        with pytest.raises(httpx.TransportError):
            _chat(http, emulator)
        assert _chat(http, emulator).status_code == 200


# --------------------------------------------------------------------------- control endpoints


def test_control_faults_from_another_client(
    emulator: EmulatorServer, http: httpx.Client, control: httpx.Client
) -> None:
    response = control.post(
        f"{_root(emulator)}/_emulator/faults",
        json={"faults": [{"status": 503}, {"status": 429, "retry_after": 1}]},
    )
    assert response.status_code == 200
    assert response.json() == {"ok": True}

    assert [_chat(http, emulator).status_code for _ in range(3)] == [503, 429, 200]


def test_control_faults_rejects_unknown_fields_and_changes_nothing(
    emulator: EmulatorServer, http: httpx.Client, control: httpx.Client
) -> None:
    response = control.post(
        f"{_root(emulator)}/_emulator/faults",
        json={"faults": [{"status": 503}, {"status": 500, "explode": True}]},
    )

    assert response.status_code == 400
    assert "explode" in response.json()["error"]["message"]
    assert _chat(http, emulator).status_code == 200


def test_control_latency_from_another_client(
    emulator: EmulatorServer, control: httpx.Client
) -> None:
    assert (
        control.post(f"{_root(emulator)}/_emulator/latency", json={"ms": 1000}).status_code == 200
    )
    assert emulator.state.latency_ms == 1000
    client = OpenRouterClient(
        OpenRouterSettings(base_url=emulator.base_url, timeout_seconds=0.2), api_key=KEY
    )
    try:
        with pytest.raises(UpstreamTimeoutError):
            client.complete(model=MODEL, messages=MESSAGES, params=GenerationParams())
        assert (
            control.post(f"{_root(emulator)}/_emulator/latency", json={"ms": 0}).status_code == 200
        )
        answer = client.complete(model=MODEL, messages=MESSAGES, params=GenerationParams())
    finally:
        client.close()

    assert answer.finish_reason == "stop"
    assert emulator.state.latency_ms == 0


def test_control_latency_does_not_delay_the_key_or_models(
    emulator: EmulatorServer, http: httpx.Client
) -> None:
    emulator.set_latency(5000)
    assert http.get(f"{emulator.base_url}/key", timeout=2).status_code == 200
    assert http.get(f"{emulator.base_url}/models", timeout=2).status_code == 200


def test_control_chaos_from_another_client(
    emulator: EmulatorServer, http: httpx.Client, control: httpx.Client
) -> None:
    url = f"{_root(emulator)}/_emulator/chaos"

    assert control.post(url, json={"seed": 7, "mix": {"503": 1.0}}).status_code == 200
    assert [_chat(http, emulator).status_code for _ in range(4)] == [503] * 4
    assert control.post(url, json={"seed": None}).status_code == 200
    assert _chat(http, emulator).status_code == 200


def test_control_chaos_is_reproducible_from_its_seed(
    emulator: EmulatorServer, http: httpx.Client, control: httpx.Client
) -> None:
    url = f"{_root(emulator)}/_emulator/chaos"
    mix = {"ok": 0.5, "500": 0.25, "429": 0.25}

    runs = []
    for _ in range(2):
        control.post(url, json={"seed": 123, "mix": mix})
        runs.append([_chat(http, emulator).status_code for _ in range(20)])

    assert runs[0] == runs[1]
    assert set(runs[0]) <= {200, 500, 429}
    assert len(set(runs[0])) > 1


def test_control_chaos_rejects_a_bad_mix(
    emulator: EmulatorServer, http: httpx.Client, control: httpx.Client
) -> None:
    response = control.post(
        f"{_root(emulator)}/_emulator/chaos", json={"seed": 1, "mix": {"boom": 1}}
    )

    assert response.status_code == 400
    assert "boom" in response.json()["error"]["message"]
    assert _chat(http, emulator).status_code == 200


def test_control_requests_and_reset_from_another_client(
    emulator: EmulatorServer, http: httpx.Client, control: httpx.Client
) -> None:
    for _ in range(3):
        _chat(http, emulator)
    http.get(f"{emulator.base_url}/models")
    root = _root(emulator)

    everything = control.get(f"{root}/_emulator/requests").json()
    chats = control.get(f"{root}/_emulator/requests", params={"path": CHAT}).json()
    assert everything["count"] == 4
    assert chats["count"] == 3
    assert chats["requests"][0]["body"] == BODY
    assert chats["requests"][0]["headers"]["authorization"] == f"Bearer {KEY}"
    assert chats["requests"][0]["method"] == "POST"

    control.post(f"{root}/_emulator/faults", json={"faults": [{"status": 500}]})
    control.post(f"{root}/_emulator/latency", json={"ms": 250})
    control.post(f"{root}/_emulator/chaos", json={"seed": 1, "mix": {"502": 1}})
    assert control.post(f"{root}/_emulator/reset").status_code == 200

    assert control.get(f"{root}/_emulator/requests").json() == {"count": 0, "requests": []}
    assert emulator.state.latency_ms == 0
    assert _chat(http, emulator).status_code == 200  # no fault, no chaos left


def test_control_requests_are_not_recorded(emulator: EmulatorServer, control: httpx.Client) -> None:
    control.get(f"{_root(emulator)}/_emulator/requests")
    control.post(f"{_root(emulator)}/_emulator/latency", json={"ms": 0})
    assert emulator.request_count() == 0


def test_unknown_control_route_is_404(emulator: EmulatorServer, control: httpx.Client) -> None:
    assert control.post(f"{_root(emulator)}/_emulator/nothing", json={}).status_code == 404
    assert control.get(f"{_root(emulator)}/_emulator/nothing").status_code == 404


# --------------------------------------------------------------------------- concurrency


def test_concurrent_keep_alive_clients(emulator: EmulatorServer) -> None:
    threads, per_thread = 20, 20
    statuses: list[list[int]] = [[] for _ in range(threads)]
    failures: list[BaseException] = []
    start = threading.Barrier(threads)

    def worker(index: int) -> None:
        try:
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            with httpx.Client(
                headers={"Authorization": f"Bearer {KEY}"}, limits=limits, timeout=30
            ) as http:
                start.wait()
                for n in range(per_thread):
                    content = f"thread {index} request {n}"
                    response = http.post(
                        f"{emulator.base_url}/chat/completions",
                        json={"model": MODEL, "messages": [{"role": "user", "content": content}]},
                    )
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


def test_one_client_shared_by_many_threads(emulator: EmulatorServer) -> None:
    client = OpenRouterClient(
        OpenRouterSettings(base_url=emulator.base_url, max_connections=4), api_key=KEY
    )
    results: list[str] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        try:
            for _ in range(10):
                answer = client.complete(
                    model=MODEL,
                    messages=MESSAGES,
                    params=GenerationParams(),
                )
                with lock:
                    results.append(answer.finish_reason or "")
        except BaseException as exc:
            failures.append(exc)

    pool = [threading.Thread(target=worker) for _ in range(8)]
    try:
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join(timeout=120)
    finally:
        client.close()

    assert failures == []
    assert results == ["stop"] * 80
    assert emulator.request_count(CHAT) == 80


# --------------------------------------------------------------------------- the command line


def _start(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "claude_headspace.emulator", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    first_line = proc.stdout.readline()
    return proc, first_line


def _stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_module_prints_its_url_first_and_answers() -> None:
    proc, first_line = _start()
    try:
        assert first_line, f"no output; stderr: {proc.stderr.read() if proc.poll() else ''}"
        base_url = first_line.split()[-1]
        assert base_url.startswith("http://127.0.0.1:")
        assert base_url.endswith("/api/v1")
        assert not base_url.endswith(":0/api/v1")

        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=10) as http:
            assert http.get(f"{base_url}/models").status_code == 200
            answer = http.post(f"{base_url}/chat/completions", json=BODY)
            assert answer.status_code == 200
            assert answer.json()["id"].startswith("gen-")
    finally:
        code = _stop(proc)
    assert code == 0


def test_module_takes_faults_and_accepted_keys_as_flags() -> None:
    faults = ['{"status": 429, "retry_after": 3}', '{"status": 503}']
    proc, first_line = _start("--accept-key", KEY, "--fault", faults[0], "--fault", faults[1])
    try:
        base_url = first_line.split()[-1]
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=10) as http:
            statuses = [http.post(f"{base_url}/chat/completions", json=BODY) for _ in range(3)]
            assert [r.status_code for r in statuses] == [429, 503, 200]
            assert statuses[0].headers["retry-after"] == "3"
            assert http.get(f"{base_url}/key").status_code == 200
        other = httpx.get(f"{base_url}/key", headers={"Authorization": "Bearer sk-or-v1-other"})
        assert other.status_code == 401
    finally:
        _stop(proc)


def test_module_rejects_a_bad_fault_flag() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "claude_headspace.emulator", "--port", "0", "--fault", "{nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "not JSON" in proc.stderr
