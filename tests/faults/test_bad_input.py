"""Bad input, generated: each gets a clear error naming what was wrong, none reaches
OpenRouter, none corrupts state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headspace_inference import create_app
from headspace_inference.config_loading import load_settings
from headspace_inference.inference import InferenceError, InvalidRequestError
from headspace_inference.settings import ENV_PREFIX, ConfigError, Settings

CHAT = "/api/v1/chat/completions"
NAMES = ("level", "purpose", "input_text", "project_id", "agent_id", "command_id", "turn_id",
         "max_tokens", "temperature", "system_prompt")  # fmt: skip

KEYS = [
    "url",
    "enabled",
    "calls_per_minute",
    "ttl_seconds",
    "max_attempts",
    "turn",
    "workers",
    "token",
    "unknown",
    "tokens_per_minute",
    "base_url",
    "timeout_seconds",
]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
    st.text(max_size=30), st.binary(max_size=10), st.lists(st.integers(), max_size=3),
)  # fmt: skip


@st.composite
def config_documents(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly-plausible configuration trees with random keys and values spliced in."""
    doc: dict[str, Any] = {}
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(["database", "redis", "openrouter", "inference", "api",
                                        "extra", "openrouter.rate_limits", "openrouter.cache",
                                        "openrouter.retry", "openrouter.models"]))  # fmt: skip
        key = draw(st.sampled_from(KEYS))
        node = doc
        for part in section.split("."):
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[key] = draw(scalars)
    return doc


@settings(max_examples=200, deadline=None)
@given(config_documents())
def test_every_configuration_is_accepted_or_rejected_by_key(doc: dict[str, Any]) -> None:
    try:
        text = yaml.safe_dump(doc)
    except yaml.representer.RepresenterError:
        text = json.dumps(doc, default=str)
    path = Path("/tmp") / "hs-config-property.yaml"
    path.write_text(text)
    try:
        settings_ = load_settings(path, environ={})
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message
        assert message.startswith("invalid configuration") or "YAML" in message
        # It names at least one key path that was in the document.
        assert any(part in message for part in _paths(doc)), message
    else:
        assert isinstance(settings_, Settings)


CANARY = "tok-CANARY-77e1"
secret_values = st.sampled_from([
    CANARY, f"{CANARY} x", [CANARY], {"k": CANARY}, "{" + CANARY, "[" + CANARY, f"!{CANARY}",
    f"!{CANARY}!x", f'"{CANARY}', f"{{token: {CANARY}", 7,
])  # fmt: skip
secret_places = st.sampled_from(["api.token", "openrouter.api_key", "api", "openrouter"])


@settings(max_examples=200, deadline=None)
@given(
    doc=config_documents(),
    place=secret_places,
    value=secret_values,
    how=st.sampled_from(["yaml", "flow", "variable"]),
)
def test_no_configuration_error_shows_a_secret(
    doc: dict[str, Any], place: str, value: Any, how: str
) -> None:
    # A secret in the right place or the wrong one, of the right type or not, next to
    # random other mistakes: an error may name its key, never show it.
    environ: dict[str, str] = {}
    if how == "variable":
        environ[ENV_PREFIX + place.replace(".", "__").upper()] = (
            value if isinstance(value, str) else json.dumps(value)
        )
        text = yaml.safe_dump(doc)
    else:
        *sections, key = place.split(".")
        node = doc
        for part in sections:
            node = node.setdefault(part, {}) if isinstance(node.get(part), dict) else {}
        node[key] = value
        text = json.dumps(doc, default=str) if how == "flow" else yaml.safe_dump(doc)
        if isinstance(value, str) and value[0] in '[{!"':  # verbatim, to break the YAML
            text = text.replace(json.dumps(value) if how == "flow" else repr(value), value)
    path = Path("/tmp") / "hs-config-secret.yaml"
    path.write_text(text)
    try:
        load_settings(path, environ=environ)
    except ConfigError as exc:
        assert "CANARY" not in str(exc) and "\n" not in str(exc)


def _paths(doc: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in doc.items():
        path = f"{prefix}{key}"
        out.append(path)
        if isinstance(value, dict):
            out += _paths(value, path + ".")
    return out


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from headspace_inference.testing.emulator import EmulatorServer

    emulator = EmulatorServer().start()
    tmp = tmp_path_factory.mktemp("bad-input")
    app = create_app(
        overrides={
            "database": {"url": f"sqlite:///{tmp / 'db.sqlite'}"},
            "openrouter": {"base_url": emulator.base_url, "api_key": "sk-or-bad-input",
                           "rate_limits": {"calls_per_minute": 10**6,
                                           "tokens_per_minute": 10**9}},
            "inference": {"spool_path": str(tmp / "spool"), "max_input_chars": 500},
        }
    )  # fmt: skip
    service = app.extensions["inference"]
    service.emulator = emulator
    yield service
    service.close()
    emulator.stop()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    level=st.one_of(st.sampled_from(["turn", "task", "project", "objective"]), scalars),
    purpose=st.one_of(st.just("p"), scalars, st.text(min_size=190, max_size=260)),
    input_text=st.one_of(st.just("fine"), scalars, st.text(max_size=600),
                         st.just("x" * 501), st.just("\ud800 lone")),
    ids=st.fixed_dictionaries({}, optional={
        n: st.one_of(st.integers(-5, 10**15), st.booleans(), st.floats(), st.text(max_size=3))
        for n in ("project_id", "agent_id", "command_id", "turn_id")}),
    max_tokens=st.one_of(st.none(), st.integers(-5, 2 * 10**6), st.floats(), st.text(max_size=3)),
    temperature=st.one_of(st.none(), st.floats(allow_nan=True), st.integers(-3, 5),
                          st.text(max_size=3)),
)  # fmt: skip
def test_bad_arguments_are_named_and_never_reach_openrouter(
    service: Any, level: Any, purpose: Any, input_text: Any, ids: dict[str, Any],
    max_tokens: Any, temperature: Any,
) -> None:  # fmt: skip
    before = service.emulator.request_count(CHAT)
    try:
        result = service.infer(level, purpose, input_text, max_tokens=max_tokens,
                               temperature=temperature, **ids)  # fmt: skip
    except InvalidRequestError as exc:
        assert any(name in str(exc) for name in NAMES), str(exc)
        assert service.emulator.request_count(CHAT) == before
    except InferenceError as exc:  # pragma: no cover - a valid call may not fail here
        pytest.fail(f"a valid call failed: {exc!r}")
    else:
        assert isinstance(result.text, str)
    # Nothing is wedged: a plain call still works after whatever came before.
    assert service.infer("turn", "p", "still fine").text
