"""The test kit on the base install, which has no pytest: everything but the plugin works,
and importing it starts nothing."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.packaging.test_base_install import run, venv  # noqa: F401 - the venv fixture

pytestmark = pytest.mark.slow

KIT = textwrap.dedent(
    """
    import json, sys, threading
    threads_before = {t.name for t in threading.enumerate()}
    import headspace_inference.testing as kit
    loaded_at_import = [m for m in sys.modules if m.startswith("headspace_inference.testing.")]
    from headspace_inference.testing import FakeInferenceService, create_tables, inference_result
    from sqlalchemy import create_engine, inspect

    result = inference_result(text="t", input_tokens=1, output_tokens=2, model="m", latency_ms=3)
    fake = FakeInferenceService(levels=["turn", "command"]).always("answer")
    engine = create_engine("sqlite:///kit.db")
    create_tables(engine)
    try:
        import headspace_inference.testing.pytest_plugin
        plugin = "imported"
    except ModuleNotFoundError as exc:
        plugin = exc.name
    print(json.dumps({
        "loaded_at_import": loaded_at_import,
        "text": result.text,
        "fake": fake.infer(level="command", purpose="p", input_text="x").text,
        "tables": sorted(inspect(engine).get_table_names()),
        "threads": sorted({t.name for t in threading.enumerate()} - threads_before),
        "pytest": "pytest" in sys.modules,
        "plugin": plugin,
    }))
    """
)


def test_the_kit_works_without_pytest_and_starts_nothing(
    venv: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    out = run([str(venv / "bin" / "python"), "-c", KIT], tmp_path)
    seen = json.loads(out.strip().splitlines()[-1])

    assert seen["loaded_at_import"] == []
    assert seen["text"] == "t"
    assert seen["fake"] == "answer"
    assert seen["tables"] == [
        "alembic_version_inference",
        "inference_budget_use",
        "inference_calls",
        "inference_usage_rollup",
    ]
    assert seen["threads"] == []
    assert seen["pytest"] is False
    assert seen["plugin"] == "pytest"  # the plugin alone needs pytest
