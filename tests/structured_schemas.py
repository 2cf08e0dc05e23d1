"""The host's two hand-parsed answers as schemas, for the structured-answer tests: priority
scoring as a pydantic model (a list in a wrapper, as strict mode asks), frustration scoring
as a JSON Schema dict."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Score(BaseModel):
    agent_id: int
    score: int = Field(ge=0, le=100)
    reason: str


class Scores(BaseModel):
    scores: list[Score]


FRUSTRATION: dict[str, Any] = {
    "title": "frustration",
    "type": "object",
    "properties": {
        "summary": {"type": "string"},
        "frustration_score": {"type": "integer", "minimum": 0, "maximum": 10},
    },
    "required": ["summary", "frustration_score"],
    "additionalProperties": False,
}
