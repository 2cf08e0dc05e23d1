"""Same-run A/B of this tree against an older revision: Python calls per fresh call
(deterministic) and the 64-caller throughput benchmark, the two trees taking turns.

    python -m bench.ab --against d115e91 --rounds 2

Each side runs in a fresh interpreter with its own ``src`` and ``bench`` first on the path
(the revision is checked out into a temporary git worktree, removed afterwards). Nothing
here asserts a time; it prints what each side measured, round by round.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run inside each tree: its own service, its own benchmark code.
_CALLS = """
import sys, tempfile, threading, uuid
from pathlib import Path
from bench.common import emulator_process
from bench.run import make_service
with tempfile.TemporaryDirectory() as tmp, emulator_process(latency_ms=0) as url:
    service = make_service(url, f"sqlite:///{tmp}/ab.db", Path(tmp) / "spool")
    for i in range(200):
        service.infer("turn", "warm", f"warm {i}")
    count = [0]
    def profile(frame, event, arg):
        if event in ("call", "c_call"):
            count[0] += 1
    sys.setprofile(profile)
    for i in range(1000):
        service.infer("turn", "ab", f"count {i} {uuid.uuid4().hex}")
    sys.setprofile(None)
    service.close()
print(f"{count[0] / 1000:.0f} Python calls per fresh call (the caller's thread)")
"""

_THROUGHPUT = """
import tempfile
from pathlib import Path
from bench.common import emulator_process
from bench.run import Run, throughput
with tempfile.TemporaryDirectory() as tmp, emulator_process(latency_ms=50) as url:
    throughput(Run(quick=False), url, Path(tmp))
"""


def _run(tree: Path, code: str) -> str:
    env = {**os.environ, "PYTHONPATH": f"{tree / 'src'}{os.pathsep}{tree}"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {done.stderr.strip()[-2000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--against", required=True, help="the revision to compare with")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q",
                        str(old), args.against], check=True)  # fmt: skip
        try:
            sides = {args.against: old, "this tree": ROOT}
            for name, tree in sides.items():
                print(f"{name}: {_run(tree, _CALLS).strip()}", flush=True)
            for round_ in range(1, args.rounds + 1):
                for name, tree in sides.items():
                    lines = _run(tree, _THROUGHPUT).splitlines()
                    shown = [ln.strip() for ln in lines if "per request" in ln or "ideal" in ln]
                    print(f"round {round_}, {name}: " + " | ".join(shown), flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)],
                           check=False)  # fmt: skip


if __name__ == "__main__":
    main()
