"""The prompt on the call's row: absent by default; with inference.store_input_text kept,
its secrets redacted, cut to inference.input_text_max_chars, and searchable through the
calls API (with answers and purposes), case-insensitively, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from tests.service_fixtures import KEY, AppFactory, rows

# The emulator's answer echoes the first twelve words: the rest is only in the prompt.
HEAD = "one two three four five six seven eight nine ten eleven twelve"
PROMPT = f"{HEAD} ZEBRA notes; key={KEY} " + "x" * 200
KEPT = 90


def calls(app: Any, query: str) -> list[dict[str, Any]]:
    answer = app.test_client().get(f"/api/inference/calls?{query}")
    assert answer.status_code == 200, answer.json
    return list(answer.json["calls"])


def test_the_prompt_is_not_kept_by_default(make_app: AppFactory) -> None:
    app = make_app()
    app.extensions["inference"].infer("turn", "summarise turn", PROMPT)
    [row] = rows(app)
    assert row.input_text is None
    detail = app.test_client().get(f"/api/inference/calls/{row.id}").json
    assert detail["input_text"] is None
    assert calls(app, "search=zebra") == []
    assert len(calls(app, "search=SUMMARISE TURN")) == 1  # the purpose is searched
    assert len(calls(app, "search=Eleven")) == 1  # and the answer


def test_a_kept_prompt_is_redacted_bounded_and_searchable(make_app: AppFactory) -> None:
    app = make_app(inference={"store_input_text": True, "input_text_max_chars": KEPT})
    service = app.extensions["inference"]
    service.infer("turn", "summarise turn", PROMPT)
    service.infer("task", "other purpose", "Nothing striped here: 100% plain_text")
    first, second = rows(app)
    assert KEY not in (first.input_text or "")
    assert first.input_text == f"{HEAD} ZEBRA notes; key=[REDACTED] {'x' * 200}"[:KEPT]
    assert second.input_text == "Nothing striped here: 100% plain_text"
    detail = app.test_client().get(f"/api/inference/calls/{first.id}").json
    assert detail["input_text"] == first.input_text
    # Case-insensitive, anywhere in the prompt; LIKE's wildcards are plain characters.
    assert [c["id"] for c in calls(app, "search=zebra")] == [first.id]
    assert [c["id"] for c in calls(app, "search=STRIPED")] == [second.id]
    assert [c["id"] for c in calls(app, "search=100%25")] == [second.id]
    assert [c["id"] for c in calls(app, "search=here_%20100")] == []  # "_" is no wildcard
    assert [c["id"] for c in calls(app, "search=n_text")] == [second.id]
    assert calls(app, "search=zebra&level=task") == []
    # Nothing past the bound is kept, so nothing past it is found.
    assert calls(app, "search=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx") == []


def test_search_bad_values_are_400_naming_it(make_app: AppFactory) -> None:
    app = make_app()
    for query in ("search=", "search=" + "a" * 201):
        answer = app.test_client().get(f"/api/inference/calls?{query}")
        assert answer.status_code == 400
        assert answer.json["error"].startswith("search:")
