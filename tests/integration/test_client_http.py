"""What OpenRouterClient sends its requests through, over real HTTP against the emulator:
its own single-connection clients, a host's own ``httpx.Client`` (used as given, never
closed, its defaults kept out of our requests), a given transport, and not both.
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
from tests.emulator_fixtures import TEST_KEY, ClientFactory, settings_for
from tests.service_fixtures import settings_for as service_settings_for

from headspace_inference.config_loading import load_settings
from headspace_inference.inference import errors as e
from headspace_inference.inference.client import OpenRouterClient
from headspace_inference.inference.service import InferenceService
from headspace_inference.inference.types import Answer, GenerationParams
from headspace_inference.standalone.database import standalone_database
from headspace_inference.testing.emulator import EmulatorServer, Fault

CHAT = "/api/v1/chat/completions"
KEY_PATH = "/api/v1/key"
HAIKU = "anthropic/claude-haiku-4.5"


def ask(client: OpenRouterClient, text: str = "hello world") -> Answer:
    return client.complete(
        model=HAIKU, messages=[{"role": "user", "content": text}], params=GenerationParams()
    )


def in_flight(client: OpenRouterClient) -> tuple[threading.Thread, list[BaseException]]:
    """A chat call started on a thread of its own (its error, if any, in the list)."""
    errors: list[BaseException] = []

    def call() -> None:
        try:
            ask(client, "the slow call")
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    return thread, errors


# --------------------------------------------------------------------------- our own clients


KEY_PATH = "/api/v1/key"


def test_a_slot_comes_back_after_an_answer_an_error_a_timeout_and_a_drop(
    emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    # One connection: a call whose slot were not given back would leave every later call
    # waiting for a free connection, then failing with "no free connection".
    client = make_client(max_connections=1, timeout_seconds=0.5)
    emulator.script([Fault(status=500), Fault(delay_ms=1500), Fault(drop=True)])
    with pytest.raises(e.UpstreamServerError):
        ask(client)
    with pytest.raises(e.UpstreamTimeoutError, match="did not answer in time"):
        ask(client)
    with pytest.raises(e.UpstreamConnectionError):
        ask(client)
    for n in range(3):
        assert ask(client, f"after the faults {n}").text.endswith(f"after the faults {n}")


def test_every_connection_busy_is_a_timeout_naming_the_wait_and_the_setting(
    emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    client = make_client(max_connections=1, timeout_seconds=20.0)
    gate = emulator.hold(CHAT)
    thread, errors = in_flight(client)
    try:
        while emulator.request_count(CHAT) < 1:  # the one connection is now in use
            thread.join(0.01)
        with pytest.raises(e.UpstreamTimeoutError) as caught:
            client.get_key(timeout=0.2)
    finally:
        gate.set()
        thread.join()
    assert str(caught.value) == (
        "no free connection to OpenRouter within 0.2 s (openrouter.max_connections=1)"
    )
    assert caught.value.retryable
    assert isinstance(caught.value.__cause__, httpx.PoolTimeout)
    assert emulator.request_count(KEY_PATH) == 0  # never sent
    assert not errors  # the call that held the connection was answered


def test_a_call_in_flight_when_the_client_closes_fails_as_closed(
    emulator: EmulatorServer, make_client: ClientFactory
) -> None:
    client = make_client()
    gate = emulator.hold(CHAT)
    thread, errors = in_flight(client)
    try:
        while emulator.request_count(CHAT) < 1:
            thread.join(0.01)
        client.close()  # closes the connection the call is waiting on
    finally:
        gate.set()
        thread.join()
    assert len(errors) == 1 and isinstance(errors[0], e.UpstreamError)
    assert "was closed while the request was in flight" in str(errors[0])
    assert not errors[0].retryable


# --------------------------------------------------------------------------- a host's client


def test_a_host_client_carries_every_request_and_its_hooks_see_them(
    emulator: EmulatorServer,
) -> None:
    seen: list[tuple[str, str]] = []
    answered: list[int] = []
    host = httpx.Client(
        event_hooks={
            "request": [lambda request: seen.append((request.method, str(request.url)))],
            "response": [lambda response: answered.append(response.status_code)],
        }
    )
    client = OpenRouterClient(settings_for(emulator.base_url), api_key=TEST_KEY, http_client=host)
    try:
        assert ask(client).text
        assert "data" in client.get_key(timeout=5)
    finally:
        client.close()
        host.close()
    assert seen == [
        ("POST", f"{emulator.base_url}/chat/completions"),
        ("GET", f"{emulator.base_url}/key"),
    ]
    assert answered == [200, 200]
    headers = emulator.requests[0].headers
    assert headers["authorization"] == f"Bearer {TEST_KEY}"
    assert headers["user-agent"].startswith("headspace-inference/")


def test_close_leaves_a_host_client_open(emulator: EmulatorServer) -> None:
    with httpx.Client() as host:
        client = OpenRouterClient(
            settings_for(emulator.base_url), api_key=TEST_KEY, http_client=host
        )
        assert ask(client).text
        client.close()
        assert not host.is_closed
        assert host.get(f"{emulator.base_url}/models").status_code == 200  # still the host's
        with pytest.raises(e.UpstreamError, match="closed; no request was sent"):
            ask(client)  # ours is closed
    assert emulator.request_count(CHAT) == 1


def test_a_host_clients_own_defaults_do_not_reach_openrouter(emulator: EmulatorServer) -> None:
    # The host's client is built for its own calls: its base_url, headers, params, cookies
    # and auth are not ours, and must not redirect or be added to a call to OpenRouter.
    sent: list[httpx.Request] = []
    host = httpx.Client(
        base_url="http://host-service.invalid/v2",
        headers={"X-Host-Tenant": "t-1", "Authorization": "Bearer host-token", "User-Agent": "h"},
        params={"tenant": "t-1"},
        cookies={"host_session": "s-1"},
        auth=("host-user", "host-password"),
        event_hooks={"request": [sent.append]},
    )
    with_key = OpenRouterClient(settings_for(emulator.base_url), api_key=TEST_KEY, http_client=host)
    without_key = OpenRouterClient(settings_for(emulator.base_url), api_key=None, http_client=host)
    try:
        assert ask(with_key).text
        assert without_key.list_models(timeout=5)["data"]
    finally:
        host.close()
    assert [str(r.url) for r in sent] == [
        f"{emulator.base_url}/chat/completions",
        f"{emulator.base_url}/models",
    ]
    chat, models = emulator.requests
    assert chat.headers["authorization"] == f"Bearer {TEST_KEY}"
    assert "authorization" not in models.headers  # no key: none, not the host's
    for request in (chat, models):
        assert request.headers["user-agent"].startswith("headspace-inference/")
        assert "x-host-tenant" not in request.headers
        assert "cookie" not in request.headers


def test_a_redirect_is_not_followed_even_by_a_host_client_that_follows_its_own(
    emulator: EmulatorServer,
) -> None:
    moved = f"{emulator.base_url}/key"
    redirect = f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {moved}\r\nContent-Length: 0\r\n\r\n"
    emulator.script([Fault(raw=redirect)])
    with httpx.Client(follow_redirects=True) as host:
        client = OpenRouterClient(
            settings_for(emulator.base_url), api_key=TEST_KEY, http_client=host
        )
        with pytest.raises(e.InvalidResponseError) as caught:
            ask(client)
    assert caught.value.status_code == 307
    assert emulator.request_count(KEY_PATH) == 0


def test_a_host_client_the_host_closed_is_our_error(emulator: EmulatorServer) -> None:
    host = httpx.Client()
    client = OpenRouterClient(settings_for(emulator.base_url), api_key=TEST_KEY, http_client=host)
    host.close()
    with pytest.raises(e.UpstreamError) as caught:
        ask(client)
    assert not caught.value.retryable
    assert "the host closed its httpx.Client" in str(caught.value)
    assert emulator.request_count(CHAT) == 0


def test_a_host_clients_full_pool_is_a_timeout_naming_it_and_our_wait(
    emulator: EmulatorServer,
) -> None:
    gate = emulator.hold(CHAT)
    with httpx.Client(limits=httpx.Limits(max_connections=1)) as host:
        client = OpenRouterClient(
            settings_for(emulator.base_url, timeout_seconds=20.0),
            api_key=TEST_KEY,
            http_client=host,
        )
        thread, errors = in_flight(client)
        try:
            while emulator.request_count(CHAT) < 1:
                thread.join(0.01)
            with pytest.raises(e.UpstreamTimeoutError) as caught:
                client.get_key(timeout=0.2)  # our per-call timeout, not the host's default
        finally:
            gate.set()
            thread.join()
    assert str(caught.value) == (
        "no free connection to OpenRouter within 0.2 s (the pool of the given httpx.Client)"
    )
    assert not errors


def test_a_transport_and_a_host_client_together_are_refused(emulator: EmulatorServer) -> None:
    transport, host = httpx.HTTPTransport(), httpx.Client()
    with transport, host, pytest.raises(TypeError, match="transport= or http_client=, not both"):
        OpenRouterClient(
            settings_for(emulator.base_url), api_key=TEST_KEY, transport=transport, http_client=host
        )


def test_the_service_sends_through_a_host_client_and_leaves_it_open(
    sqlite_url: str, emulator: EmulatorServer, tmp_path: Path
) -> None:
    seen: list[str] = []
    settings = load_settings(
        tmp_path / "none.yaml",
        overrides=service_settings_for(sqlite_url, emulator, tmp_path),
        environ={},
    )
    database = standalone_database(settings.database)
    database.upgrade()
    with httpx.Client(event_hooks={"request": [lambda r: seen.append(r.url.path)]}) as host:
        service = InferenceService.from_settings(
            settings, database, spool_dir=tmp_path / "spool", http_client=host
        )
        try:
            assert service.infer("turn", "p", "through the host's client").text
        finally:
            service.close()
            database.dispose()
        assert not host.is_closed
    # The call through the host's client (and the health probe the first call starts, if it
    # has run by now: through it too).
    assert CHAT in seen
    assert set(seen) <= {CHAT, KEY_PATH}


def test_a_host_passes_its_client_to_init_app(
    sqlite_url: str, emulator: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flask import Flask

    from headspace_inference import Inference

    monkeypatch.setenv("OPENROUTER_API_KEY", TEST_KEY)
    seen: list[str] = []
    overrides = {"openrouter": {"base_url": emulator.base_url}}
    with httpx.Client(event_hooks={"request": [lambda r: seen.append(r.url.path)]}) as host:
        app = Flask("host", instance_path=str(tmp_path / "instance"))
        with pytest.raises(TypeError, match="transport= or http_client=, not both"):
            Inference(app, database_url=sqlite_url, overrides=overrides, http_client=host,
                      transport=httpx.HTTPTransport())  # fmt: skip
        Inference(app, database_url=sqlite_url, overrides=overrides, http_client=host)
        service = app.extensions["inference"]
        service.database.upgrade()
        try:
            assert service.infer("turn", "p", "through the host's client").text
        finally:
            service.close()
        assert not host.is_closed
    # The call through the host's client (and the health probe the first call starts, if it
    # has run by now: through it too).
    assert CHAT in seen
    assert set(seen) <= {CHAT, KEY_PATH}
