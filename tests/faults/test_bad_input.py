"""Bad input, generated: each gets a clear error naming what was wrong, none reaches
OpenRouter, none corrupts state."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headspace_inference import create_app
from headspace_inference.calllog.record import _WIDTHS as WIDTHS
from headspace_inference.calllog.record import CallRecord
from headspace_inference.config_loading import load_settings
from headspace_inference.inference import InferenceError, InvalidRequestError
from headspace_inference.inference.pricing import MAX_NAMED_UNPRICED
from headspace_inference.inference.request import new_request_id
from headspace_inference.operate.metrics import OTHER_MODEL
from headspace_inference.row_bounds import MODEL_NAME_CHARS
from headspace_inference.settings import ENV_PREFIX, ConfigError, Settings
from headspace_inference.testing.emulator.server import Fault
from tests.call_rows import make_record
from tests.console.test_metrics import samples
from tests.drivers import EVERY_DATABASE
from tests.integration.test_recorder import count_rows, write_all
from tests.service_fixtures import AppFactory, rows

HAIKU = "anthropic/claude-haiku-4.5"
MINI = "openai/gpt-4o-mini"

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


# ------------------------------------------------------------- names no column can hold


@pytest.mark.parametrize(
    ("models", "key"),
    [
        ({"turn": "acme/" + "m" * MODEL_NAME_CHARS}, "openrouter.models.turn"),
        ({"turn": "acme/x", "task": ["acme/x", "acme/" + "m" * 252]}, "openrouter.models.task.1"),
    ],
)
def test_a_model_name_longer_than_its_column_is_refused_at_start_up_naming_the_key(
    tmp_path: Path, models: dict[str, Any], key: str
) -> None:
    # 257 characters started fine; every row of the level was then refused by PostgreSQL
    # and moved to rejected.jsonl: the calls exited 0, the log had none of them.
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"openrouter": {"models": models}}))
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert f"{key}: String should have at most {MODEL_NAME_CHARS} characters" in str(info.value)
    longest = {"turn": "acme/" + "m" * (MODEL_NAME_CHARS - 5)}
    path.write_text(yaml.safe_dump({"openrouter": {"models": longest}}))
    assert load_settings(path, environ={}).openrouter.models == longest


@EVERY_DATABASE
def test_every_text_of_a_row_is_cut_to_its_column(database_url: str, tmp_path: Path) -> None:
    # An error row kept its model and requested_model whole (the answer's path cut them):
    # PostgreSQL refused it for length. Every bounded text is cut, whatever built the record.
    long = {name: "x" * (width + 50) for name, width in WIDTHS.items()}
    record = make_record(1, **{**long, "request_id": new_request_id(), "status": "error",
                               "error_message": "e" * 5000})  # fmt: skip
    assert all(
        len(getattr(record, name)) == width
        for name, width in WIDTHS.items()
        if name not in ("request_id", "status")
    )
    # A journal line written before the cut comes back cut too.
    line = json.loads(record.to_json()) | {"model": "m" * 500, "provider": "p\x00" * 300}
    from_journal = CallRecord.from_json(json.dumps(line | {"request_id": new_request_id()}))
    assert len(from_journal.model) == WIDTHS["model"]
    assert from_journal.provider == "p" * WIDTHS["provider"]
    write_all(database_url, tmp_path / "spool", [record, from_journal])
    assert count_rows(database_url) == 2


def test_answering_model_names_chosen_upstream_are_bounded_in_metrics_and_warnings(
    make_app: AppFactory, emulator: Any, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # 300 distinct names the upstream said answered: 303 metric series, 303 warnings.
    served = [f"acme/served-{i:03d}" for i in range(299)] + ["acme/" + "s" * 400]
    dated = [f"anthropic/claude-4.5-haiku-2025100{i}" for i in range(5)]
    app = make_app(openrouter={"models": {"turn": [HAIKU, MINI], "task": HAIKU}})
    service = app.extensions["inference"]
    client = app.test_client()
    client.get("/metrics")
    emulator.script([Fault(served_model=name) for name in served + dated])
    with caplog.at_level(logging.WARNING, logger="headspace_inference.inference.pricing"):
        for i in range(len(served)):
            assert service.infer("turn", "names", f"call {i}").cost_usd is None
        # Without fallbacks another name is the model asked for (a dated one), priced as it.
        for i in range(len(dated)):
            assert service.infer("task", "names", f"dated {i}").cost_usd is not None
    logged = rows(app)
    assert len(logged) == 305
    assert {r.model for r in logged} == {*served[:-1], served[-1][:MODEL_NAME_CHARS], *dated}
    text = client.get("/metrics").get_data(as_text=True)
    series = {
        tuple(dict(labels)[k] for k in ("level", "model")): value
        for labels, value in samples(text, "headspace_inference_calls_total").items()
    }
    assert series == {("turn", OTHER_MODEL): 300, ("task", HAIKU): 5}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # MINI (configured, not priced) is named too, at start-up.
    named = [m for m in warnings if m.startswith("no price for model ")]
    assert len(named) == MAX_NAMED_UNPRICED
    assert len([m for m in warnings if "no further one is named" in m]) == 1
    assert len(warnings) == MAX_NAMED_UNPRICED + 1
