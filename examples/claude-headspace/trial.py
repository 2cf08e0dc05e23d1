#!/usr/bin/env python3
"""`make host-trial`: Claude Headspace, the real host, adopts headspace-inference.

From the host's snapshot (HOST_SNAPSHOT) this script, with the standard library only:
1. unpacks it twice under the build directory: `original/` with only the host's environment
   fix applied (the tree as its developers have it today) and `claude-headspace/` with all of
   host.patch applied;
2. makes one venv holding the patched host, this library and the host's test tools (kept
   between runs while host.patch and pyproject.toml are unchanged; pip's cache does the rest);
3. on a fresh PostgreSQL database, runs the ORIGINAL host's own Alembic history
   (`flask db upgrade`) and inserts some of its call rows with its own model, then runs the
   service's `flask inference db upgrade` from the patched host, which takes the host's
   `inference_calls` over;
4. runs the host's consumer and route test files on the patched host (`--baseline` runs them
   on the original tree instead: the figures before the adoption);
5. runs e2e.py: the host's own consumers against the OpenRouter emulator on that database,
   and checks the rows, /usage, the host's log-page API and its live `inference_call` event.

Exit status 0 only when every step passed; a missing snapshot is an error, named.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

from e2e import RESULT_MARK  # beside this file; the line of e2e.py's output with its result

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PATCH = HERE / "host.patch"
E2E = HERE / "e2e.py"
SNAPSHOT_NAME = "claude-headspace-a0c3bbc.tar.gz"


def default_snapshot() -> Path:
    """``../shared/hosts/`` beside the checkout, or beside the nearest of its ancestors that
    has one (a CI clone may sit deeper than the working copy)."""
    for parent in REPO.parents:
        found = parent / "shared" / "hosts" / SNAPSHOT_NAME
        if found.is_file():
            return found
    return REPO.parent / "shared" / "hosts" / SNAPSHOT_NAME


# The file of host.patch that the unchanged host needs to import at all on Python 3.11+
# (its other environment fix, sqlalchemy<2.1, is a dependency the venv holds).
ENV_FIX_FILES = ("src/claude_headspace/services/redis_manager.py",)
# The host's consumer and route tests. The integration file goes first, as in the host's
# own full run: its session fixture creates the test database's schema for the others.
HOST_TESTS = (
    "tests/integration/test_route_integration.py",
    "tests/services/test_summarisation_service.py",
    "tests/services/test_priority_scoring.py",
    "tests/services/test_progress_summary.py",
    "tests/services/test_summarisation_frustration.py",
    "tests/routes/test_logging.py",
    "tests/routes/test_summarisation.py",
    "tests/routes/test_priority.py",
    "tests/routes/test_progress_summary.py",
    # and the route file of the project delete, which host.patch changes
    "tests/routes/test_projects.py",
)
# What the host's tests need beyond its runtime dependencies (its `dev` extra, less the
# browser and coverage tools these files do not use).
HOST_TEST_TOOLS = ("pytest>=7", "factory-boy>=3.3", "fakeredis[lua]>=2.20")
# What flask inference db upgrade must carry over from the host's rows, as e2e.py counts it.
CARRIED = ("rows", "input_tokens", "output_tokens", "cost", "prompts")
# The host's flask CLI, built in testing mode: no background watcher, poller or tmux thread.
HOST_FLASK_APP = "claude_headspace.app:create_app(testing=True)"
# Variables of the caller's that would point the host or the service elsewhere.
SCRUBBED = ("DATABASE_URL", "TEST_DATABASE_URL", "REDIS_URL", "PYTHONPATH", "VIRTUAL_ENV")
SCRUBBED_PREFIXES = ("HEADSPACE_", "OPENROUTER_")


class TrialError(Exception):
    """A step failed; the message says which and why."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--snapshot",
        type=Path,
        default=Path(os.environ.get("HOST_SNAPSHOT") or default_snapshot()),
        help="the host snapshot (default $HOST_SNAPSHOT, else %(default)s)",
    )
    parser.add_argument(
        "--build",
        type=Path,
        default=Path(os.environ.get("HOST_TRIAL_DIR") or REPO / "build" / "host-trial"),
        help="where to unpack, keep the venv and write results (default %(default)s)",
    )
    parser.add_argument(
        "--library",
        type=Path,
        default=Path(os.environ.get("HOST_TRIAL_LIBRARY") or REPO),
        help="the checkout of headspace-inference to install (default: this one)",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="run the host test files on the original tree only (the figures before)",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        trial = Trial(args.snapshot.resolve(), args.build.resolve(), args.library.resolve())
        if args.baseline:
            trial.baseline()
        else:
            trial.run()
    except TrialError as exc:
        print(f"host-trial: FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"host-trial: passed in {time.monotonic() - started:.0f} s")
    return 0


class Trial:
    def __init__(self, snapshot: Path, build: Path, library: Path) -> None:
        if not snapshot.is_file():
            raise TrialError(
                f"the Claude Headspace snapshot is missing: {snapshot} does not exist. "
                "Put claude-headspace-a0c3bbc.tar.gz there (see ../shared/hosts/README.md) "
                "or set HOST_SNAPSHOT=/path/to/it."
            )
        self.snapshot = snapshot
        self.build = build
        self.library = library
        self.original = build / "original" / "claude-headspace"
        self.host = build / "claude-headspace"
        self.venv = build / "venv"
        self.python = self.venv / "bin" / "python"
        server = os.environ.get("HOST_TRIAL_DATABASE_SERVER") or _server_of(
            os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
        )
        prefix = os.environ.get("HOST_TRIAL_DB_PREFIX", "host_trial")
        # The database the host's history, its rows and the end-to-end run share.
        self.e2e_url = f"{server}/{prefix}_e2e"
        # The host's tests create and drop theirs (its conftest insists on a "_test" name).
        self.suite_url = f"{server}/{prefix}_suite_test"
        self.figures: dict[str, object] = {"snapshot": snapshot.name}
        self.seconds: dict[str, float] = {}  # each step's
        self.seeded: dict[str, object] = {}  # what e2e.py seed wrote with the host's model

    # -- the two entry points -------------------------------------------------------------

    def run(self) -> None:
        self.step("unpack and patch", self.unpack)
        self.step("venv", self.ensure_venv)
        self.step("host history and call rows", self.migrate_original)
        self.step("flask inference db upgrade", self.adopt_table)
        self.step("host test files", lambda: self.host_tests(self.host, "after"))
        self.step("end to end", self.end_to_end)
        self.report()

    def baseline(self) -> None:
        self.step("unpack and patch", self.unpack)
        self.step("venv", self.ensure_venv)
        self.step("host test files (original)", lambda: self.host_tests(self.original, "before"))
        self.report()

    # -- steps ----------------------------------------------------------------------------

    def step(self, name: str, action: Callable[[], None]) -> None:
        began = time.monotonic()
        print(f"host-trial: {name} ...", flush=True)
        action()
        self.seconds[name] = round(time.monotonic() - began, 1)
        print(f"host-trial: {name}: done in {self.seconds[name]} s", flush=True)

    def unpack(self) -> None:
        for tree, includes in ((self.original, ENV_FIX_FILES), (self.host, ())):
            shutil.rmtree(tree, ignore_errors=True)
            tree.parent.mkdir(parents=True, exist_ok=True)
            with tarfile.open(self.snapshot) as archive:
                archive.extractall(tree.parent, filter="data")
            if not tree.is_dir():
                raise TrialError(f"{self.snapshot} did not unpack to {tree.name}/")
            self.apply_patch(tree, includes)

    def apply_patch(self, tree: Path, includes: tuple[str, ...]) -> None:
        """git apply host.patch in ``tree`` (only ``includes`` when given). The ceiling keeps
        git from taking the build directory for part of this repository."""
        command = ["git", "apply", "--whitespace=nowarn"]
        command += [f"--include={path}" for path in includes]
        env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tree.parent)}
        done = subprocess.run(
            [*command, str(PATCH)], cwd=tree, env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise TrialError(
                f"host.patch does not apply to {self.snapshot.name}:\n{done.stderr.strip()}"
            )

    def ensure_venv(self) -> None:
        """One venv: the patched host (editable), this library (editable) and the host's test
        tools; rebuilt only when what it was built from changed."""
        stamp = self.venv / ".host-trial-stamp"
        digest = hashlib.sha256()
        for part in (PATCH, self.library / "pyproject.toml"):
            digest.update(part.read_bytes())
        digest.update(f"{self.library} {HOST_TEST_TOOLS} {sys.version}".encode())
        want = digest.hexdigest()
        if stamp.is_file() and stamp.read_text() == want and self.python.is_file():
            print("host-trial: venv unchanged, kept")
            return
        shutil.rmtree(self.venv, ignore_errors=True)
        self.check([sys.executable, "-m", "venv", str(self.venv)], "make the venv")
        pip = [str(self.python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        self.check(
            [*pip, "-e", str(self.host), "-e", str(self.library), *HOST_TEST_TOOLS],
            "install the host, this library and the host's test tools",
        )
        stamp.write_text(want)

    def migrate_original(self) -> None:
        """The host's schema from its own, unpatched history, and some of its call rows."""
        self.e2e("db-reset", self.e2e_url)
        env = {"DATABASE_URL": self.e2e_url, "PYTHONPATH": str(self.original / "src")}
        self.flask(self.original, env, "db", "upgrade")
        self.seeded = self.e2e("seed", cwd=self.original, env=env)
        self.figures["host_rows_before_upgrade"] = self.seeded["rows"]

    def adopt_table(self) -> None:
        env = {"DATABASE_URL": self.e2e_url}
        self.flask(self.host, env, "inference", "db", "upgrade")
        counted = self.e2e("count", cwd=self.host, env=env)
        self.figures["host_rows_after_upgrade"] = counted["rows"]
        if counted["autogenerate_drops"]:
            raise TrialError(
                "after flask inference db upgrade the host's autogenerate would drop "
                f"{', '.join(counted['autogenerate_drops'])} (include_name)"
            )
        carried = {key: counted[key] for key in CARRIED}
        host = {key: self.seeded[key] for key in CARRIED}
        self.figures["carried"] = carried
        if carried != host:
            raise TrialError(f"flask inference db upgrade carried {carried} of the host's {host}")

    def host_tests(self, tree: Path, label: str) -> None:
        junit = self.build / f"junit-{label}.xml"
        env = self.env({"TEST_DATABASE_URL": self.suite_url})
        if tree == self.original:
            env["PYTHONPATH"] = str(self.original / "src")
        self.e2e("db-reset", self.suite_url)
        command = [str(self.python), "-m", "pytest", "-p", "no:cacheprovider", "-q"]
        command += ["-o", "console_output_style=classic", f"--junitxml={junit}", *HOST_TESTS]
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
        (self.build / f"pytest-{label}.log").write_text(done.stdout + done.stderr)
        self.e2e("db-drop", self.suite_url)
        counts = _junit_counts(junit, tree)
        self.figures[f"host_tests_{label}"] = counts
        total = counts["total"]
        print(
            f"host-trial: host tests ({label}): {total['passed']} passed, "
            f"{total['failed']} failed, {total['errors']} errors, {total['skipped']} skipped"
        )
        if done.returncode != 0 and label == "after":
            tail = "\n".join(done.stdout.splitlines()[-40:])
            raise TrialError(f"the host's tests failed on the patched host:\n{tail}")

    def end_to_end(self) -> None:
        result = self.e2e("run", cwd=self.host, env={"DATABASE_URL": self.e2e_url})
        self.figures["end_to_end"] = result
        self.e2e("db-drop", self.e2e_url)

    def report(self) -> None:
        self.figures["seconds"] = self.seconds
        out = self.build / "result.json"
        out.write_text(json.dumps(self.figures, indent=2) + "\n")
        for key, value in self.figures.items():
            if key.startswith("host_tests_") and isinstance(value, dict):
                for path, row in value.items():
                    print(f"host-trial: {key[len('host_tests_') :]:6} {path}: {row}")
            else:
                print(f"host-trial: {key}: {json.dumps(value)}")
        print(f"host-trial: figures in {out}")

    # -- helpers --------------------------------------------------------------------------

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in SCRUBBED and not k.startswith(SCRUBBED_PREFIXES)
        }
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra or {})
        return env

    def flask(self, tree: Path, extra: dict[str, str], *args: str) -> None:
        command = [str(self.venv / "bin" / "flask"), "--app", HOST_FLASK_APP, *args]
        self.check(command, f"flask {' '.join(args)} ({tree.parent.name})", cwd=tree, extra=extra)

    def e2e(
        self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> dict[str, object]:
        """Run e2e.py in the venv; its result is the JSON after its RESULT_MARK."""
        out = self.check(
            [str(self.python), str(E2E), *args], f"e2e.py {args[0]}", cwd=cwd, extra=env
        )
        marked = [line for line in out.splitlines() if line.startswith(RESULT_MARK)]
        if not marked:
            raise TrialError(f"e2e.py {args[0]} printed no result")
        result: dict[str, object] = json.loads(marked[-1][len(RESULT_MARK) :])
        return result

    def check(
        self,
        command: list[str],
        what: str,
        *,
        cwd: Path | None = None,
        extra: dict[str, str] | None = None,
    ) -> str:
        done = subprocess.run(
            command, cwd=cwd or self.build, env=self.env(extra), capture_output=True, text=True
        )
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-40:])
            raise TrialError(f"{what}: exit status {done.returncode}\n{tail}")
        return done.stdout


def _server_of(url: str) -> str:
    """postgresql://user@host:port/name -> postgresql://user@host:port."""
    return url.split("?", 1)[0].rsplit("/", 1)[0]


def _junit_counts(junit: Path, tree: Path) -> dict[str, dict[str, int]]:
    """Passed/failed/errors/skipped per host test file, and in total, from a JUnit report."""
    if not junit.is_file():
        raise TrialError(f"pytest wrote no report ({junit}); see {junit.parent}/pytest-*.log")
    counts: dict[str, dict[str, int]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("classname", "")
        path = _test_file(name, tree)
        row = counts.setdefault(path, {"passed": 0, "failed": 0, "errors": 0, "skipped": 0})
        if case.find("failure") is not None:
            row["failed"] += 1
        elif case.find("error") is not None:
            row["errors"] += 1
        elif case.find("skipped") is not None:
            row["skipped"] += 1
        else:
            row["passed"] += 1
    total = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for row in counts.values():
        for key in total:
            total[key] += row[key]
    counts["total"] = total
    return counts


def _test_file(classname: str, tree: Path) -> str:
    """tests.routes.test_logging.TestX -> tests/routes/test_logging.py (the longest prefix
    that is a file of the tree)."""
    parts = classname.split(".")
    for end in range(len(parts), 0, -1):
        candidate = "/".join(parts[:end]) + ".py"
        if (tree / candidate).is_file():
            return candidate
    return classname


if __name__ == "__main__":
    sys.exit(main())
