"""The real host adopts the library: ``make host-trial`` (examples/claude-headspace/trial.py)
as a test of the suite. It unpacks Claude Headspace's snapshot from ../shared/hosts/, applies
examples/claude-headspace/host.patch, and runs the host's tests and an end-to-end run on
PostgreSQL in a venv of its own.

Slow. Skipped where ../shared/hosts/ is absent (a checkout without the snapshots); ``.ci/run``
runs the trial as its own step, where a missing snapshot fails, and sets HOST_TRIAL_STEP so
that this test does not run it twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOSTS = ROOT.parent / "shared" / "hosts"
TRIAL = ROOT / "examples" / "claude-headspace" / "trial.py"

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1800)
def test_claude_headspace_adopts_the_library() -> None:
    if os.environ.get("HOST_TRIAL_STEP") == "1":
        pytest.skip(".ci/run runs the host trial as its own step (make host-trial)")
    if not HOSTS.is_dir():
        pytest.skip(f"no host snapshots at {HOSTS} (make host-trial needs them)")
    done = subprocess.run([sys.executable, str(TRIAL)], capture_output=True, text=True)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
