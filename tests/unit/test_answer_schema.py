"""Structured answers without the network: the schema checks, the fence, the fingerprint."""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import pytest
from pydantic import BaseModel
from tests.structured_schemas import FRUSTRATION, Score, Scores

from headspace_inference.inference import structured
from headspace_inference.inference.errors import InvalidRequestError
from headspace_inference.inference.structured import AnswerFormatError, answer_schema, strip_fence
from headspace_inference.testing.emulator.server import example_of


@pytest.mark.parametrize(
    ("text", "body"),
    [
        ('```json\n{"a": 1}\n```', '{"a": 1}'),
        ('```\n{"a": 1}\n```\n', '{"a": 1}'),
        ("  ```JSON \n[1, 2]\n  ```  ", "[1, 2]"),
        ('{"a": "```"}', '{"a": "```"}'),  # a fence inside is not a fence around
        ('Here:\n```json\n{"a": 1}\n```', 'Here:\n```json\n{"a": 1}\n```'),
    ],
)
def test_only_a_fence_around_the_whole_answer_is_stripped(text: str, body: str) -> None:
    assert strip_fence(text) == body


def test_a_model_class_parses_to_an_instance_and_is_sent_strict() -> None:
    schema = answer_schema(Scores)
    value = schema.parse('```json\n{"scores": [{"agent_id": 3, "score": 70, "reason": "r"}]}\n```')
    assert value == Scores(scores=[Score(agent_id=3, score=70, reason="r")])
    fmt = schema.response_format()
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["name"] == "Scores"
    assert fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"] == Scores.model_json_schema()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("not json", "Scores"),
        ('{"scores": [{"agent_id": 3, "score": 170, "reason": "r"}]}', "scores.0.score"),
        ('{"scores": [{"agent_id": 3, "reason": "r"}]}', "scores.0.score: Field required"),
    ],
)
def test_a_model_class_refuses_what_does_not_fit(text: str, problem: str) -> None:
    with pytest.raises(AnswerFormatError, match=problem):
        answer_schema(Scores).parse(text)


def test_a_dict_is_validated_as_json_schema() -> None:
    schema = answer_schema(FRUSTRATION)
    assert schema.parse('{"summary": "s", "frustration_score": 4}') == {
        "summary": "s",
        "frustration_score": 4,
    }
    assert schema.name == "frustration"
    with pytest.raises(AnswerFormatError, match=r"\$\.frustration_score.*maximum"):
        schema.parse('{"summary": "s", "frustration_score": 11}')
    with pytest.raises(AnswerFormatError, match="not JSON"):
        schema.parse("{'summary': 's'}")
    with pytest.raises(AnswerFormatError, match="Additional properties"):
        schema.parse('{"summary": "s", "frustration_score": 1, "x": 1}')


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"type": "objekt"}, "not a valid JSON Schema"),
        ({"type": "object", "required": "summary"}, "not a valid JSON Schema"),
        ({"type": "object", "default": {1, 2}}, "JSON-serialisable"),
        ("{}", "a JSON Schema dict or a pydantic model class, got str"),
        (Score(agent_id=1, score=1, reason="r"), "got Score"),
        (int, "got type"),
    ],
)
def test_a_bad_response_format_is_refused_by_name(spec: object, problem: str) -> None:
    with pytest.raises(InvalidRequestError, match=problem):
        answer_schema(spec)


def test_the_fingerprint_follows_the_schema_not_its_key_order() -> None:
    reordered = dict(reversed(list(FRUSTRATION.items())))
    assert answer_schema(reordered).fingerprint == answer_schema(FRUSTRATION).fingerprint
    other = {**FRUSTRATION, "required": ["summary"]}
    assert answer_schema(other).fingerprint != answer_schema(FRUSTRATION).fingerprint
    assert answer_schema(Scores).fingerprint != answer_schema(Score).fingerprint


def test_a_name_openrouter_would_refuse_is_made_safe() -> None:
    assert answer_schema({"title": "priority scores!", "type": "object"}).name == "priority_scores_"
    assert answer_schema({"type": "object"}).name == "answer"


@pytest.mark.parametrize("spec", [Scores, Score, FRUSTRATION])
def test_the_emulators_answer_for_a_schema_validates(spec: Any) -> None:
    schema = answer_schema(spec)
    schema.parse(json.dumps(example_of(schema.schema)))


class Node(BaseModel):
    name: str
    children: list[Node] = []


LINKED = {"$defs": {"item": {"type": "object", "properties": {"next": {"$ref": "#/$defs/item"}}}},
          "$ref": "#/$defs/item"}  # fmt: skip


@pytest.mark.parametrize(
    "spec",
    [
        LINKED,
        {"type": "object", "properties": {"$ref": {"type": "string"}, "$id": {"type": "string"}}},
        {"$defs": {"n": {"$anchor": "node", "type": "array", "items": {"$ref": "#node"}}},
         "$ref": "#node"},
        {"anyOf": [{"type": "null"}, {"type": "array", "items": {"$ref": "#"}}]},
        Node,
    ],
    ids=["linked-list", "property-names", "anchor", "nullable-tree", "pydantic-tree"],
)  # fmt: skip
def test_a_recursive_schema_that_descends_is_accepted(spec: Any) -> None:
    answer_schema(spec)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"$defs": {"n": {"$anchor": "node", "allOf": [{"$ref": "#node"}]}}, "$ref": "#node"},
         "refers to itself"),
        ({"dependentSchemas": {"a": {"$ref": "#"}}}, "refers to itself"),
        ({"if": {"$ref": "#/then"}, "then": {"$ref": "#/if"}}, "refers to itself"),
        ({"$ref": "#nowhere"}, "names no \\$anchor"),
        ({"properties": {"a": {"$id": "https://example.com/a", "type": "string"}}},
         "\\$id at #/properties/a is not supported"),
        ({"$dynamicRef": "#meta"}, "\\$dynamicRef at # is not supported"),
    ],
)  # fmt: skip
def test_a_schema_no_answer_could_be_checked_against_is_refused(spec: Any, problem: str) -> None:
    with pytest.raises(InvalidRequestError, match=problem):
        answer_schema(spec)


def test_a_tree_answer_is_checked_down_to_its_depth() -> None:
    value: Any = None
    for _ in range(structured.MAX_ANSWER_DEPTH):  # as deep as an answer may be
        value = [value]
    assert answer_schema(Node).parse('{"name": "n"}') == Node(name="n")
    nullable_tree = {"anyOf": [{"type": "null"}, {"type": "array", "items": {"$ref": "#"}}]}
    assert answer_schema(nullable_tree).parse(json.dumps(value)) == value
    with pytest.raises(AnswerFormatError, match="nested more than 128 levels"):
        answer_schema(nullable_tree).parse(json.dumps([value]))


def test_checked_schemas_are_kept_within_a_budget_of_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    checked = structured._CHECKED
    checked.clear()
    monkeypatch.setattr(checked, "budget", 256 * 1024)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(40):  # 40 distinct schemas of about 32 KiB: 1.3 MB of JSON
            answer_schema({"type": "object", "title": f"s{n}", "description": "x" * 32_000})
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        checked.clear()
    assert checked.size <= 256 * 1024
    # What the kept ones hold, with their dicts and validators: within a few times the
    # budget, not growing with the number of schemas seen (40 kept would be 5 MB or more).
    assert held < 4 * 256 * 1024
