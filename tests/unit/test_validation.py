"""Argument checks: every bad value gets an error that names it; every good one passes."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from headspace_inference.inference.errors import (
    InputTooLargeError,
    InvalidRequestError,
    UnknownLevelError,
)
from headspace_inference.inference.validation import (
    check_input,
    check_level,
    check_params,
    check_purpose,
)


@given(st.text(max_size=300))
def test_input_text_is_accepted_or_rejected_by_name(text: str) -> None:
    try:
        assert check_input(text, 200) == text
    except InvalidRequestError as exc:
        assert "input_text" in str(exc)
        encodable = True
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            encodable = False
        assert not text.strip() or len(text) > 200 or not encodable or "\x00" in text
        if len(text) > 200 and text.strip() and encodable and "\x00" not in text:
            assert isinstance(exc, InputTooLargeError)
    else:
        assert text.strip() and len(text) <= 200 and "\x00" not in text


@given(st.one_of(st.integers(), st.floats(), st.binary(), st.none(), st.lists(st.text())))
def test_non_string_input_names_its_type(value: object) -> None:
    with pytest.raises(InvalidRequestError, match="input_text must be a string"):
        check_input(value, 200)


HOST_LEVELS = ("turn", "command", "project", "objective")


@given(st.one_of(st.text(max_size=20), st.sampled_from((*HOST_LEVELS, "task"))))
def test_only_the_configured_levels_pass(level: str) -> None:
    if level in HOST_LEVELS:
        assert check_level(level, HOST_LEVELS) == level
    else:
        with pytest.raises(UnknownLevelError, match="level must be one of turn, command, proj"):
            check_level(level, HOST_LEVELS)


@given(st.text(max_size=250))
def test_purpose_is_short_single_line_text(purpose: str) -> None:
    try:
        check_purpose(purpose)
    except InvalidRequestError as exc:
        assert "purpose" in str(exc)
    else:
        assert purpose.strip() and len(purpose) <= 200
        assert not any(ord(c) < 32 and c != "\t" for c in purpose)


@given(
    st.one_of(st.none(), st.integers(-5, 2_000_000), st.booleans(), st.floats()),
    st.one_of(st.none(), st.floats(allow_nan=True), st.integers(-3, 3), st.booleans()),
)
def test_generation_params_in_range_or_named(max_tokens: object, temperature: object) -> None:
    good_tokens = max_tokens is None or (type(max_tokens) is int and 1 <= max_tokens <= 1_000_000)
    good_temp = temperature is None or (
        type(temperature) in (int, float)
        and math.isfinite(temperature)  # type: ignore[arg-type]
        and 0 <= temperature <= 2  # type: ignore[operator]
    )
    if good_tokens and good_temp:
        params = check_params(max_tokens, temperature)
        assert params.max_tokens == max_tokens
    else:
        with pytest.raises(InvalidRequestError, match=r"max_tokens|temperature"):
            check_params(max_tokens, temperature)
