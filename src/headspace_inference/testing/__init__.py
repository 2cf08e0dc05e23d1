"""For a host's tests: what stands in for the service, and for OpenRouter.

- ``inference_result(text=..., input_tokens=..., ...)``: a real InferenceResult from flat
  keywords (results.py).
- ``FakeInferenceService``: a scripted stand-in for the service that records its calls
  (and its purges, ``FakePurge``), refuses what the real one refuses, and tells
  ``on_call_recorded`` callbacks the CALL the real one would (fake.py).
- ``create_tables(bind)`` / ``drop_tables(bind)``: the service's tables in a test database
  built with ``create_all`` (database.py).
- ``headspace_inference.testing.emulator``: the local OpenRouter emulator; and
  ``headspace_inference.testing.pytest_plugin``, the emulator as pytest fixtures, enabled
  by a host with ``pytest_plugins = ["headspace_inference.testing.pytest_plugin"]``.

Importing this package loads none of them (each on first use) and starts nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .database import create_tables, drop_tables
    from .fake import FakeCall, FakeInferenceService, FakePurge, UnscriptedCallError
    from .results import inference_result

__all__ = [
    "FakeCall",
    "FakeInferenceService",
    "FakePurge",
    "UnscriptedCallError",
    "create_tables",
    "drop_tables",
    "inference_result",
]

# Public names and the modules they load from on first use (PEP 562).
_LAZY = {
    "FakeCall": ".fake",
    "FakeInferenceService": ".fake",
    "FakePurge": ".fake",
    "UnscriptedCallError": ".fake",
    "create_tables": ".database",
    "drop_tables": ".database",
    "inference_result": ".results",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
