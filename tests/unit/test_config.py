"""Configuration: file, environment and code overrides, and every validation error."""

from __future__ import annotations

import itertools
import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from headspace_inference.calllog.journal import check_spool_dir
from headspace_inference.config_loading import load_host_settings, load_settings
from headspace_inference.inference.pricing import PriceTable
from headspace_inference.settings import MAX_PRICE_PER_MILLION, ConfigError, Settings


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(body)
    return path


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    settings = load_settings(tmp_path / "nope.yaml", environ={})
    assert settings == Settings()
    assert settings.openrouter.models == {
        "turn": "anthropic/claude-haiku-4.5",
        "task": "anthropic/claude-haiku-4.5",
        "project": "anthropic/claude-sonnet-4.5",
        "objective": "anthropic/claude-sonnet-4.5",
    }
    assert settings.openrouter.rate_limits.calls_per_minute == 30
    assert settings.openrouter.retry.max_attempts == 3
    assert settings.openrouter.cache.ttl_seconds == 300


def test_a_configured_models_mapping_replaces_the_four_levels(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "openrouter:\n  models:\n    turn: a/light\n    command: a/light\n"
        "    project: a/big\n    objective: a/big\n",
    )
    settings = load_settings(path, environ={})
    assert settings.levels == ("turn", "command", "project", "objective")
    assert settings.openrouter.models["command"] == "a/light"
    assert "task" not in settings.openrouter.models


@pytest.mark.parametrize(
    ("models", "named"),
    [
        ("{}", "openrouter.models: Dictionary should have at least 1 item"),
        ("{Turn: a/m}", "openrouter.models.Turn.[key]: String should match pattern"),
        ("{a_level_name_too_long: a/m}", "openrouter.models.a_level_name_too_long.[key]"),
        ("{turn: ''}", "openrouter.models.turn: String should have at least 1 character"),
    ],
)
def test_a_bad_level_or_model_is_named(tmp_path: Path, models: str, named: str) -> None:
    path = write(tmp_path, f"openrouter:\n  models: {models}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert named in str(caught.value)


def test_example_config_is_valid_and_documents_every_key() -> None:
    example = Path(__file__).parents[2] / "config.example.yaml"
    settings = load_settings(example, environ={})
    text = example.read_text()

    def keys(model: object, prefix: str = "") -> list[str]:
        out = []
        for name in type(model).model_fields:  # type: ignore[attr-defined]
            value = getattr(model, name)
            out.append(name)
            if hasattr(type(value), "model_fields"):
                out += keys(value)
        return out

    for key in keys(settings):
        assert f"{key}:" in text, f"config.example.yaml does not document {key}"


def test_file_then_environment_then_named_variables_then_code(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
database: {url: "sqlite:///from-file.db"}
redis: {url: "redis://file:6379/0"}
openrouter:
  api_key: from-file-key
  rate_limits: {calls_per_minute: 5, tokens_per_minute: 500}
""",
    )
    settings = load_settings(path, environ={})
    assert settings.openrouter.rate_limits.calls_per_minute == 5
    assert settings.api_key == "from-file-key"

    env = {
        "HEADSPACE__OPENROUTER__RATE_LIMITS__CALLS_PER_MINUTE": "60",
        "HEADSPACE__OPENROUTER__API_KEY": "from-headspace-var",
        "HEADSPACE__DATABASE__URL": "sqlite:///from-headspace-var.db",
        "HEADSPACE__OPENROUTER__CACHE__ENABLED": "false",
    }
    settings = load_settings(path, environ=env)
    assert settings.openrouter.rate_limits.calls_per_minute == 60
    assert settings.openrouter.rate_limits.tokens_per_minute == 500
    assert settings.openrouter.cache.enabled is False
    assert settings.api_key == "from-headspace-var"
    assert settings.database.url == "sqlite:///from-headspace-var.db"

    env |= {
        "OPENROUTER_API_KEY": "from-openrouter-var",
        "DATABASE_URL": "postgresql://db/x",
        "REDIS_URL": "redis://env:6379/1",
    }
    settings = load_settings(path, environ=env)
    assert settings.api_key == "from-openrouter-var"
    assert settings.database.url == "postgresql://db/x"
    assert settings.redis.url == "redis://env:6379/1"

    settings = load_settings(
        path, overrides={"openrouter": {"rate_limits": {"calls_per_minute": 7}}}, environ=env
    )
    assert settings.openrouter.rate_limits.calls_per_minute == 7
    assert settings.openrouter.rate_limits.tokens_per_minute == 500


def test_headspace_config_variable_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "openrouter: {timeout_seconds: 12}\n")
    monkeypatch.setenv("HEADSPACE_CONFIG", str(path))
    assert load_settings(environ={}).openrouter.timeout_seconds == 12


@pytest.mark.parametrize(
    ("body", "env", "expected"),
    [
        (
            "openrouter: {rate_limits: {calls_per_minute: -1}}",
            {},
            "openrouter.rate_limits.calls_per_minute: Input should be greater than 0 (got -1)",
        ),
        (
            "openrouter: {rate_limits: {calls_per_minute: lots}}",
            {},
            "openrouter.rate_limits.calls_per_minute: Input should be a valid integer",
        ),
        ("openrouter: {timeout_seconds: 0}", {}, "openrouter.timeout_seconds"),
        ("openrouter: {retry: {max_attempts: 0}}", {}, "openrouter.retry.max_attempts"),
        ("openrouter: {cache: {ttl_seconds: -5}}", {}, "openrouter.cache.ttl_seconds"),
        ("openrouter: {colour: blue}", {}, "openrouter.colour: unknown key"),
        ("openrouter: {models: {Epic: some/model}}", {}, "openrouter.models.Epic.[key]: String"),
        ("databse: {url: x}", {}, "databse: unknown key"),
        ("openrouter: {base_url: ftp://x}", {}, "openrouter.base_url: Value error, must start"),
        ("openrouter: {enabled: perhaps}", {}, "openrouter.enabled: Input should be a valid bool"),
        (
            "",
            {"HEADSPACE__OPENROUTER__RATE_LIMITS__TOKENS_PER_MINUTE": "-3"},
            "openrouter.rate_limits.tokens_per_minute",
        ),
        ("", {"HEADSPACE__OPENROUTER__NOPE": "1"}, "openrouter.nope: unknown key"),
        (
            "openrouter: {pricing: {m: {input_per_million: -1, output_per_million: 1}}}",
            {},
            "openrouter.pricing.m.input_per_million",
        ),
    ],
)
def test_validation_errors_name_the_key_and_value(
    tmp_path: Path, body: str, env: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, body), environ=env)
    assert expected in str(info.value)


def test_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "openrouter: [unclosed"), environ={})
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(write(tmp_path, "- a\n- b\n"), environ={})


def test_api_key_never_shown(tmp_path: Path) -> None:
    secret = "sk-or-v1-CANARY-0123456789"
    settings = load_settings(tmp_path / "none.yaml", environ={"OPENROUTER_API_KEY": secret})
    assert settings.api_key == secret
    assert secret not in repr(settings)
    assert secret not in str(settings)
    assert secret not in settings.model_dump_json()
    # A bad value next to the key: the error names the key but never echoes it.
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, f"openrouter: {{api_key: [{secret}]}}"), environ={})
    assert "openrouter.api_key" in str(info.value)
    assert secret not in str(info.value)


def test_model_without_pricing_warns_once_per_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Fallbacks count too; the warning comes when the service builds its price table (which
    # also knows the synced prices), and a call to the model later does not repeat it.
    path = write(
        tmp_path,
        "openrouter: {models: {turn: acme/tiny, task: [acme/tiny, acme/spare]},"
        f" pricing_file: {tmp_path / 'absent.json'}}}",
    )
    settings = load_settings(path, environ={})
    with caplog.at_level(logging.WARNING):
        table = PriceTable.from_settings(settings.openrouter)
        assert table.charge("acme/tiny", 10, 10) is None
    assert table.unpriced(settings.openrouter.all_models()) == ["acme/spare", "acme/tiny"]
    for model in ("acme/tiny", "acme/spare"):
        warnings = [r.getMessage() for r in caplog.records if model in r.getMessage()]
        assert len(warnings) == 1
        assert "no estimated cost" in warnings[0]


def test_environment_override_parsing(tmp_path: Path) -> None:
    path = write(tmp_path, "redis: {url: 'redis://file:6379/0'}\n")
    env = {
        "HEADSPACE__REDIS__URL": "null",
        "HEADSPACE__OPENROUTER__RETRY__BASE_DELAY_SECONDS": "0.25",
        "HEADSPACE__REDIS__KEY_PREFIX": "2024",  # text, typed by the setting: stays a string
        "HEADSPACE__OPENROUTER__APP_NAME": "Headspace #2",
        "UNRELATED": "x",
    }
    settings = load_settings(path, environ=env)
    assert settings.redis.url is None
    assert settings.openrouter.retry.base_delay_seconds == 0.25
    assert settings.redis.key_prefix == "2024"
    assert settings.openrouter.app_name == "Headspace #2"
    with pytest.raises(ConfigError, match="HEADSPACE__OPENROUTER____X: an empty section"):
        load_settings(path, environ={"HEADSPACE__OPENROUTER____X": "1"})


def _yaml_bomb(levels: str = "abcdefghi") -> str:
    """Billion laughs: nine levels of nine aliases each stand for 9**9 strings."""
    lines = [f"{levels[0]}: &{levels[0]} [" + ",".join(["lol"] * 9) + "]"]
    for prev, cur in itertools.pairwise(levels):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + f"\nopenrouter: {{timeout_seconds: *{levels[-1]}}}\n"


@pytest.mark.timeout(10)
def test_a_yaml_bomb_is_refused_at_its_first_alias(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not valid YAML: aliases \(\*name\) are not allowed"):
        load_settings(write(tmp_path, _yaml_bomb()), environ={})
    # The same in a variable holding a flow mapping.
    flow = "{a: &a [lol, lol], b: *a}"
    with pytest.raises(ConfigError, match=r"HEADSPACE__OPENROUTER__MODELS: .*aliases"):
        load_settings(tmp_path / "none.yaml", environ={"HEADSPACE__OPENROUTER__MODELS": flow})


@pytest.mark.timeout(10)
def test_a_huge_bad_value_is_shown_as_a_short_prefix(tmp_path: Path) -> None:
    # As the bomb would expand, but built in code: 9**9 strings behind shared references.
    value: Any = ["lol"] * 9
    for _ in range(8):
        value = [value] * 9
    with pytest.raises(ConfigError) as info:
        load_settings(
            tmp_path / "none.yaml",
            overrides={"openrouter": {"timeout_seconds": value}},
            environ={},
        )
    message = str(info.value)
    assert "openrouter.timeout_seconds: Input should be a valid number (got [[" in message
    assert len(message.partition("(got ")[2]) < 80


CANARY = "tok-CANARY-5eb1"


def test_a_secret_variable_is_read_as_it_is_never_as_yaml(tmp_path: Path) -> None:
    # Read as YAML, "{tok-..." was a broken flow mapping, in an error quoting the token.
    env = {"HEADSPACE__API__TOKEN": "{" + CANARY, "HEADSPACE__OPENROUTER__API_KEY": f"[{CANARY}]"}
    settings = load_settings(tmp_path / "none.yaml", environ=env)
    assert settings.api.token is not None
    assert settings.api.token.get_secret_value() == "{" + CANARY
    assert settings.api_key == f"[{CANARY}]"


@pytest.mark.parametrize(
    ("body", "env", "key"),
    [
        # Broken YAML around a secret, in a variable and in the file.
        ("", {"HEADSPACE__API": f'{{token: "{CANARY}'}, "HEADSPACE__API"),
        ("", {"HEADSPACE__OPENROUTER": f"{{api_key: {CANARY}, x: [}}"}, "HEADSPACE__OPENROUTER"),
        (f"api:\n  token: !{CANARY}\n", {}, "not valid YAML: an unknown tag"),
        (f"api:\n  token: !{CANARY}!x\n", {}, "not valid YAML: found undefined tag handle"),
        (f'api:\n  token: "{CANARY}\n', {}, "not valid YAML"),
        # A secret that parses, to the wrong type, or where a section belongs.
        (f"api: {{token: [{CANARY}]}}", {}, "api.token"),
        (f"api: {CANARY}", {}, "api: Input should be a valid dictionary"),
        (f"openrouter: [{CANARY}]", {}, "openrouter: Input should be a valid dictionary"),
        ("", {"HEADSPACE__OPENROUTER__API_KEY": f"{CANARY} with spaces"}, "openrouter.api_key"),
        # A URL may carry a password.
        (f"database: {{url: [postgresql://u:{CANARY}@db/x]}}", {}, "database.url"),
    ],
)
def test_no_error_quotes_a_secret(tmp_path: Path, body: str, env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, body), environ=env)
    message = str(info.value)
    assert key in message
    assert CANARY not in message and "CANARY" not in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"openrouter: {app_name: caf\xe9}\n", "not UTF-8 text (at byte offset 26)"),
        (b"openrouter: {max_connections: " + b"9" * 5000 + b"}\n", "a number or date"),
        (b"inference: {spool_path: 2024-02-30}\n", "a number or date that cannot be read"),
        (b"openrouter: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
    ],
    ids=["latin-1", "long-number", "no-such-date", "deep"],
)
def test_a_file_that_cannot_be_read_is_named(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: .*{re.escape(expected)}"):
        load_settings(path, environ={})


def test_a_directory_for_a_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(tmp_path))}: cannot be read \(Is a directory\)"
    ):
        load_settings(tmp_path, environ={})


@pytest.mark.parametrize(
    ("body", "env", "expected"),
    [
        ("database: {url: 'not a url'}", {}, "database.url: Value error, not a database URL"),
        ("", {"DATABASE_URL": "garbage"}, "database.url: Value error, not a database URL"),
        (
            "database: {url: 'postgresql://u:pw@db:port/x'}",
            {},
            "database.url: Value error, not a database URL",
        ),
        ("database: {url: 'mysql://u@db/x'}", {}, "database.url: Value error, no installed driver"),
        ("database: {url: 'http://db/x'}", {}, "database.url: Value error, no installed driver"),
        ("redis: {url: notaurl}", {}, "redis.url: Value error, must start with redis://"),
        ("", {"REDIS_URL": "redis://:pw@cache:port/0"}, "redis.url: Value error, not a Redis URL"),
        ("redis: {url: 'redis://cache/0?socket_timeout=x'}", {}, "redis.url: Value error, not a"),
    ],
)
def test_an_unusable_url_is_refused_when_read(
    tmp_path: Path, body: str, env: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, body), environ=env)
    assert expected in str(info.value)
    assert "pw" not in str(info.value)


def test_usable_urls_are_kept_as_written(tmp_path: Path) -> None:
    for url in ("sqlite://", "sqlite:///x.db", "postgres://u:pw@db/x", "postgresql+psycopg://db/x"):
        assert (
            load_settings(tmp_path / "none.yaml", environ={"DATABASE_URL": url}).database.url == url
        )
    for url in ("redis://cache:6379/0", "rediss://:pw@cache/1", "unix:///run/redis.sock"):
        assert load_settings(tmp_path / "none.yaml", environ={"REDIS_URL": url}).redis.url == url


def _duration_keys(model: type[BaseModel] = Settings, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += _duration_keys(field.annotation, f"{prefix}{name}.")
        elif name.endswith("_seconds"):
            keys.append(prefix + name)
    return keys


@pytest.mark.parametrize("key", _duration_keys())
def test_every_duration_has_an_upper_bound(tmp_path: Path, key: str) -> None:
    # 1.0e+308 s passed, then overflowed as milliseconds or added to a clock.
    *sections, name = key.split(".")
    body = "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections))
    body += f"{'  ' * len(sections)}{name}: 1.0e+308\n"
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: Input should be less than or equal"):
        load_settings(write(tmp_path, body), environ={})


@pytest.mark.parametrize(
    "env",
    [{}, {"OPENROUTER_API_KEY": "sk-or-x"}, {"HEADSPACE__OPENROUTER__MODELS__TURN": "a/b"}],
)
def test_a_section_that_is_not_a_mapping_is_named(tmp_path: Path, env: dict[str, str]) -> None:
    # With a variable under it, the section fell back to its defaults (openrouter.ai) silently.
    with pytest.raises(ConfigError, match=r"openrouter: .* \(got text\)"):
        load_settings(write(tmp_path, "openrouter: 'oops'"), environ=env)
    with pytest.raises(ConfigError, match=r"openrouter: .* \(got a list\)"):
        load_settings(
            write(tmp_path, "openrouter: [a]"),
            overrides={"openrouter": {"enabled": False}},
            environ={},
        )


@pytest.mark.parametrize("name", ["", "   "])
def test_an_empty_model_name_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match=r"openrouter\.models\.turn: String should have at least"):
        load_settings(write(tmp_path, f"openrouter: {{models: {{turn: '{name}'}}}}"), environ={})


@pytest.mark.parametrize(
    ("price", "key"),
    [
        # 1.0e+15 was accepted, and every row of the model was refused by the database;
        # 1.0e+25 ended every call in a raw decimal.InvalidOperation.
        ("1.0e+15", "input_per_million"),
        ("1.0e+25", "output_per_million"),
        (f"{MAX_PRICE_PER_MILLION + 1}", "cache_read_per_million"),
    ],
)
def test_a_price_no_row_can_hold_is_refused_at_start_up_naming_the_key(
    tmp_path: Path, price: str, key: str
) -> None:
    prices = {"input_per_million": 1.0, "output_per_million": 5.0, key: price}
    entry = ", ".join(f"{k}: {v}" for k, v in prices.items())
    body = "openrouter: {pricing: {acme/dear: {" + entry + "}}}"
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, body), environ={})
    message = str(info.value)
    assert "\n" not in message
    assert (
        f"openrouter.pricing.acme/dear.{key}: Input should be less than or equal to "
        f"{MAX_PRICE_PER_MILLION}"
    ) in message
    # The bound itself is a price.
    at_bound = body.replace(f"{key}: {price}", f"{key}: {MAX_PRICE_PER_MILLION}")
    assert load_settings(write(tmp_path, at_bound), environ={}).openrouter.pricing


def test_the_spool_directory_is_made_and_proved_writable(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # so that only the code's own mode counts
    try:
        spool = check_spool_dir(tmp_path / "a" / "spool")
    finally:
        os.umask(old_umask)
    assert spool.is_dir() and list(spool.iterdir()) == []  # the probe file is gone
    # As private as the call log itself makes it (start-up makes it before the call log).
    assert spool.stat().st_mode & 0o777 == 0o700
    (tmp_path / "a-file").write_text("")
    # Its parent is a file: no one, root included, can make it.
    with pytest.raises(ConfigError, match=r"^inference\.spool_path: cannot write to .*a-file/s"):
        check_spool_dir(tmp_path / "a-file" / "spool")


@pytest.mark.parametrize(
    ("key", "value"), [("app_name", "a\\nb"), ("site_url", "https://café.example")]
)
def test_a_header_setting_must_be_printable_ascii(tmp_path: Path, key: str, value: str) -> None:
    # Sent in every request's headers, where httpx refuses anything else: every call failed.
    with pytest.raises(ConfigError, match=rf"openrouter\.{key}: Value error, must be printable"):
        load_settings(write(tmp_path, f'openrouter: {{{key}: "{value}"}}'), environ={})


def test_an_unknown_key_is_named_on_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, f'openrouter: {{"a\\nb": 1, "{"k" * 500}": 2}}'), environ={})
    message = str(info.value)
    assert "openrouter.'a\\nb': unknown key" in message and "\n" not in message
    assert "openrouter.'kkkk" in message and len(message) < 300


def test_each_source_wins_over_the_one_below_it_key_by_key(tmp_path: Path) -> None:
    # defaults < file < HEADSPACE__ < named variable < code, each for the one key it sets:
    # the keys below it in the same section keep their values.
    path = write(
        tmp_path,
        "openrouter: {api_key: file-key, app_name: From file, timeout_seconds: 11}\n",
    )
    env = {"HEADSPACE__OPENROUTER__API_KEY": "var-key", "HEADSPACE__OPENROUTER__APP_NAME": "Var"}
    assert load_settings(path, environ=env).api_key == "var-key"
    env["OPENROUTER_API_KEY"] = "named-key"
    settings = load_settings(path, environ=env)
    assert settings.api_key == "named-key"
    assert settings.openrouter.app_name == "Var"
    assert settings.openrouter.timeout_seconds == 11
    assert settings.openrouter.connect_timeout_seconds == 5  # the default
    code = load_settings(path, overrides={"openrouter": {"api_key": "code-key"}}, environ=env)
    assert code.api_key == "code-key" and code.openrouter.app_name == "Var"
    # An empty named variable is not set: the one below it stands.
    assert load_settings(path, environ={"OPENROUTER_API_KEY": ""}).api_key == "file-key"


def test_a_host_s_sources_in_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "database: {url: 'not a url'}\n"  # the host's own section: not read
        "inference: {workers: 3, redis: {url: 'redis://file/0'}}\n",
    )
    env = {"HEADSPACE__INFERENCE__REDIS__URL": "redis://var/0", "DATABASE_URL": "garbage"}
    host = load_host_settings(path, environ=env)
    assert host.inference.redis.url == "redis://var/0" and host.inference.workers == 3
    env["REDIS_URL"] = "redis://named/0"
    assert load_host_settings(path, environ=env).inference.redis.url == "redis://named/0"
    argument = load_host_settings(path, environ=env, redis_url="redis://argument/0")
    assert argument.inference.redis.url == "redis://argument/0"
    code = load_host_settings(
        path,
        {"inference": {"redis": {"url": "redis://code/0"}}},
        environ=env,
        redis_url="redis://argument/0",
    )
    assert code.inference.redis.url == "redis://code/0" and code.inference.workers == 3
    # A host's variables for sections that are not the service's are the host's business.
    assert load_host_settings(path, environ={"HEADSPACE__SERVER__PORT": "1"}).inference.workers == 3


def test_nested_variables_in_any_case_and_flow_values(tmp_path: Path) -> None:
    env = {
        "headspace__openrouter__rate_limits__calls_per_minute": "12",
        "HEADSPACE__OpenRouter__Retry__Max_Attempts": "5",
        "HEADSPACE__OPENROUTER__MODELS__TURN": "[a/primary, a/fallback]",
        "HEADSPACE__OPENROUTER__PROVIDER": "{order: [anthropic], allow_fallbacks: false}",
    }
    settings = load_settings(tmp_path / "none.yaml", environ=env)
    assert settings.openrouter.rate_limits.calls_per_minute == 12
    assert settings.openrouter.retry.max_attempts == 5
    assert settings.openrouter.route("turn") == ("a/primary", ("a/fallback",))
    assert settings.openrouter.provider is not None
    assert settings.openrouter.provider.as_body() == {
        "order": ["anthropic"],
        "allow_fallbacks": False,
    }


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ({"environ": {"HEADSPACE__DATABSE__URL": "sqlite://"}}, "databse: unknown key (did you"),
        ({"environ": {"HEADSPACE__OPENROUTER__TIMEOUT": "3"}}, "openrouter.timeout: unknown key"),
        ({"overrides": {"databse": {"url": "sqlite://"}}}, "databse: unknown key (did you mean"),
    ],
)
def test_an_unknown_key_from_a_variable_or_code_is_named(
    tmp_path: Path, where: dict[str, Any], expected: str
) -> None:
    where.setdefault("environ", {})
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "none.yaml", **where)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"HEADSPACE__API__TOKEN": f"{CANARY} x"}, "api.token: Value error, must be printable"),
        ({"OPENROUTER_API_KEY": f"{CANARY}\u00e9"}, "openrouter.api_key: Value error, must be"),
        ({"HEADSPACE__DATABASE__URL": f"postgresql://u:{CANARY}@db:x/d"}, "database.url: Value"),
        ({"REDIS_URL": f"redis://:{CANARY}@cache:x/0"}, "redis.url: Value error, not a Redis"),
        ({"HEADSPACE__OPENROUTER__MODELS": f"{{turn: [{CANARY}, &a x]"}, "HEADSPACE__OPENROUTER__"),
    ],
)
def test_a_bad_variable_is_named_and_its_secret_never_shown(
    tmp_path: Path, env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "none.yaml", environ=env)
    message = str(info.value)
    assert named in message
    assert "CANARY" not in message and "\n" not in message


@pytest.mark.parametrize(
    ("budgets", "named"),
    [
        ("[{window: week, cap_usd: 1}]", "openrouter.budgets.0.window"),
        ("[{window: day}]", "a budget needs cap_usd and/or cap_tokens"),
        ("[{window: day, cap_usd: 0}]", "openrouter.budgets.0.cap_usd"),
        ("[{window: day, cap_usd: 1, warn_at: 1.5}]", "openrouter.budgets.0.warn_at"),
        ("[{window: day, cap_usd: 1, scope: {project_id: every}}]", "scope.project_id"),
        ("[{window: day, cap_usd: 1, scope: {level: nope}}]", "scope.level 'nope' is not a level"),
        (
            "[{window: day, cap_usd: 1}, {window: day, cap_tokens: 5}]",
            "two budgets are called 'all/day'",
        ),
        (f"[{{window: day, cap_usd: 1, scope: {{purpose: {'p' * 150}}}}}]", "needs a name"),
    ],
)
def test_a_bad_budget_is_refused_naming_what_is_wrong(
    tmp_path: Path, budgets: str, named: str
) -> None:
    path = write(tmp_path, f"openrouter:\n  budgets: {budgets}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert named in str(caught.value)
