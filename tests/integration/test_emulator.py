"""The emulator itself: OpenRouter's shapes (checked by the official openai SDK), the control
endpoints, chaos, keep-alive under concurrency, and running as a separate process."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tests.emulator_fixtures import TEST_KEY

from claude_headspace.emulator import EmulatorServer, Fault
from claude_headspace.emulator.server import PRICES, count_tokens

HAIKU = "anthropic/claude-haiku-4.5"
CHAT = "/api/v1/chat/completions"


def sdk(emulator: EmulatorServer, key: str = TEST_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=emulator.base_url, api_key=key, max_retries=0, timeout=5)


def raw_client(emulator: EmulatorServer, key: str = TEST_KEY) -> httpx.Client:
    return httpx.Client(
        base_url=emulator.base_url.removesuffix("/api/v1"),
        headers={"Authorization": f"Bearer {key}"},
        timeout=5,
    )


# --------------------------------------------------------------------------- OpenRouter's shapes


def test_the_openai_sdk_parses_a_completion(emulator: EmulatorServer) -> None:
    client = sdk(emulator)
    answer = client.chat.completions.create(
        model=HAIKU,
        messages=[{"role": "user", "content": "Summarise: the build is green again."}],
        max_tokens=64,
    )
    assert answer.id.startswith("gen-")
    assert answer.model == HAIKU
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert "the build is green again." in (answer.choices[0].message.content or "")
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert answer.usage.prompt_tokens >= 1 and 1 <= answer.usage.completion_tokens <= 64
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    extra = answer.model_dump()
    assert extra["provider"] == "Anthropic"
    p_in, p_out = PRICES[HAIKU]
    cost = (answer.usage.prompt_tokens * p_in + answer.usage.completion_tokens * p_out) / 1e6
    assert extra["usage"]["cost"] == pytest.approx(cost)
    client.close()


@pytest.mark.parametrize(
    ("status", "sdk_error"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
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
        client.chat.completions.create(model=HAIKU, messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == status
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == status
    assert caught.value.response.headers["retry-after"] == "1"
    client.close()


def test_answers_are_deterministic_and_token_counts_follow_the_input(
    emulator: EmulatorServer,
) -> None:
    with raw_client(emulator) as client:

        def chat(text: str, **extra: Any) -> dict[str, Any]:
            body = {"model": HAIKU, "messages": [{"role": "user", "content": text}], **extra}
            response = client.post("/api/v1/chat/completions", json=body)
            assert response.status_code == 200
            data: dict[str, Any] = response.json()
            return data

        short, long = chat("a b c"), chat("a b c " * 400)
        assert chat("a b c")["choices"] == short["choices"]
        assert long["usage"]["prompt_tokens"] > short["usage"]["prompt_tokens"] >= 1
        assert long["usage"]["prompt_tokens"] >= count_tokens("a b c " * 400)
        capped = chat("a b c " * 400, max_tokens=3)
        assert capped["usage"]["completion_tokens"] <= 3
        assert capped["choices"][0]["finish_reason"] == "length"


def test_models_key_and_generation(emulator: EmulatorServer) -> None:
    with raw_client(emulator) as client:
        models = client.get("/api/v1/models").json()["data"]
        by_id = {m["id"]: m for m in models}
        assert float(by_id[HAIKU]["pricing"]["prompt"]) == pytest.approx(1.0 / 1e6)
        assert float(by_id[HAIKU]["pricing"]["completion"]) == pytest.approx(5.0 / 1e6)
        assert float(by_id["anthropic/claude-sonnet-4.5"]["pricing"]["prompt"]) == pytest.approx(
            3.0 / 1e6
        )
        assert client.get("/api/v1/key").status_code == 200
        gen = client.post(
            "/api/v1/chat/completions",
            json={"model": HAIKU, "messages": [{"role": "user", "content": "hi"}]},
        ).json()
        found = client.get("/api/v1/generation", params={"id": gen["id"]})
        assert found.status_code == 200
        assert found.json()["data"]["total_cost"] == pytest.approx(gen["usage"]["cost"])
        missing = client.get("/api/v1/generation", params={"id": "gen-nope"})
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == 404
    with raw_client(emulator, key="wrong") as client:
        rejected = client.get("/api/v1/key")
        assert rejected.status_code == 401
        assert set(rejected.json()["error"]) >= {"code", "message"}
        assert client.post("/api/v1/chat/completions", json={}).status_code == 401


def test_only_the_listed_keys_are_accepted(own_emulator: Any) -> None:
    server: EmulatorServer = own_emulator(accept_keys={"sk-or-good", "plain-good"})
    for key, status in (("sk-or-good", 200), ("plain-good", 200), ("sk-or-other", 401)):
        with raw_client(server, key=key) as client:
            assert client.get("/api/v1/key").status_code == status


def test_bad_requests_get_openrouter_error_bodies(emulator: EmulatorServer) -> None:
    with raw_client(emulator) as client:
        for body in ({"model": HAIKU}, {"model": "nonsense", "messages": []}):
            response = client.post("/api/v1/chat/completions", json=body)
            assert response.status_code == 400
            assert response.json()["error"]["code"] == 400
        assert client.get("/api/v1/nowhere").status_code == 404


# --------------------------------------------------------------------------- control


def test_the_control_endpoints_script_a_server_from_outside(emulator: EmulatorServer) -> None:
    chat = {"model": HAIKU, "messages": [{"role": "user", "content": "hi"}]}
    with raw_client(emulator) as client:
        faults = [{"status": 503, "retry_after": 4}, {"error_in_200": True}]
        assert client.post("/_emulator/faults", json={"faults": faults}).json() == {"ok": True}
        first = client.post(CHAT, json=chat)
        assert (first.status_code, first.headers["retry-after"]) == (503, "4")
        assert first.json()["error"]["code"] == 503
        second = client.post(CHAT, json=chat)
        assert second.status_code == 200 and "error" in second.json()
        assert client.post(CHAT, json=chat).json()["choices"]
        assert client.post("/_emulator/latency", json={"ms": 1}).status_code == 200
        assert emulator.state.latency_ms == 1
        listed = client.get("/_emulator/requests", params={"path": CHAT}).json()
        assert listed["count"] == 3 == emulator.request_count(CHAT)
        assert listed["requests"][0]["body"] == chat
        bad = client.post("/_emulator/faults", json={"faults": [{"stauts": 500}]})
        assert bad.status_code == 400 and "stauts" in bad.json()["error"]["message"]
        bad_mix = client.post("/_emulator/chaos", json={"seed": 1, "mix": {"boom": 1}})
        assert bad_mix.status_code == 400
        assert client.post("/_emulator/reset").status_code == 200
        assert emulator.request_count() == 0 and emulator.state.latency_ms == 0
        assert client.post("/_emulator/nothing").status_code == 404


def test_faults_are_consumed_in_order_one_per_chat_request(emulator: EmulatorServer) -> None:
    emulator.script([Fault(status=500), Fault(status=429), Fault(status=502)])
    chat = {"model": HAIKU, "messages": [{"role": "user", "content": "hi"}]}
    with raw_client(emulator) as client:
        assert client.get("/api/v1/models").status_code == 200  # not a chat: takes no fault
        codes = [client.post(CHAT, json=chat).status_code for _ in range(4)]
    assert codes == [500, 429, 502, 200]


def outcome(client: httpx.Client) -> str:
    chat = {"model": HAIKU, "messages": [{"role": "user", "content": "hi"}]}
    try:
        response = client.post(CHAT, json=chat)
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
    with httpx.Client(headers={"Authorization": f"Bearer {TEST_KEY}"}, timeout=0.1) as client:
        client.base_url = httpx.URL(emulator.base_url.removesuffix("/api/v1"))
        assert outcome(client) == "timeout"
    emulator.set_chaos(None)


def test_a_chaos_429_carries_retry_after(emulator: EmulatorServer) -> None:
    emulator.set_chaos(1, {"429": 1})
    with raw_client(emulator) as client:
        response = client.post(CHAT, json={"model": HAIKU, "messages": []})
    assert response.status_code == 429 and "retry-after" in response.headers


# --------------------------------------------------------------------------- serving


def test_keep_alive_serves_many_requests_on_one_connection(emulator: EmulatorServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=5)
    body = json.dumps({"model": HAIKU, "messages": [{"role": "user", "content": "hi"}]})
    headers = {"Authorization": f"Bearer {TEST_KEY}", "Content-Type": "application/json"}
    conn.connect()
    sock = conn.sock
    for _ in range(5):
        conn.request("POST", CHAT, body=body, headers=headers)
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["choices"]
    assert conn.sock is sock  # never reconnected
    conn.close()


def test_concurrent_clients(emulator: EmulatorServer) -> None:
    failures: list[BaseException] = []

    def work(n: int) -> None:
        try:
            with raw_client(emulator) as client:
                for i in range(10):
                    body = {"model": HAIKU, "messages": [{"role": "user", "content": f"{n} {i}"}]}
                    assert client.post(CHAT, json=body).status_code == 200
        except BaseException as exc:  # reported below, not lost in the thread
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert emulator.request_count(CHAT) == 160


def test_in_process_lifecycle() -> None:
    with EmulatorServer(latency_ms=0) as server:
        assert server.base_url == f"http://127.0.0.1:{server.port}/api/v1"
        assert httpx.get(f"{server.base_url}/models").status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.base_url}/models")


@contextmanager
def process(*command: str) -> Iterator[str]:
    """A command that prints the emulator's URL as the last word of its first line."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("OpenRouter emulator listening on http://127.0.0.1:"), line
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "claude_headspace.emulator"],
        [str(Path(sys.executable).with_name("headspace")), "openrouter-emulator"],
    ],
    ids=["python-m", "headspace"],
)
def test_runs_as_a_separate_process(command: list[str]) -> None:
    if not Path(command[0]).exists():
        pytest.skip(f"{command[0]} is not installed")
    args = [
        *command,
        "--port=0",
        "--accept-key=sk-or-proc",
        '--fault={"status": 503}',
        "--chaos=5",
        "--chaos-mix=ok=1",
    ]
    with process(*args) as url:
        headers = {"Authorization": "Bearer sk-or-proc"}
        chat = {"model": HAIKU, "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.get(f"{url}/key", headers=headers).status_code == 200
        assert (
            httpx.get(f"{url}/key", headers={"Authorization": "Bearer sk-or-x"}).status_code == 401
        )
        assert httpx.post(f"{url}/chat/completions", json=chat, headers=headers).status_code == 503
        assert httpx.post(f"{url}/chat/completions", json=chat, headers=headers).status_code == 200


def test_a_bad_fault_flag_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "claude_headspace.emulator", "--port=0", "--fault=nope"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "not JSON" in done.stderr
