"""The base install alone: ``pip install headspace-inference`` with no extras gives a host a
working ``infer()`` on SQLite (here against the bundled emulator), and ``init_app`` starts
nothing: no thread, file, connection or exit hook until the first call. A feature configured
without its extra stops with one line naming the extra to install.

Slow (a fresh environment, with the library's dependencies from pip's cache or the index):
``.ci/run`` runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

# What each extra brings; none of it may come with the base install.
EXTRA_PACKAGES = ("redis", "psycopg", "prometheus-client", "gunicorn", "jsonschema",
                  "opentelemetry-api")  # fmt: skip

# A host as a new user writes one: its own Flask app, the extension, a call. It prints what
# it saw as JSON for the test to judge.
HOST = textwrap.dedent(
    """\
    import atexit, json, os, sys, threading
    from pathlib import Path

    # The exit hooks the library holds (modules imported on the way register their own).
    hooks = []
    register, unregister = atexit.register, atexit.unregister
    def counted_register(hook, *args, **kwargs):
        if hook.__module__.startswith("headspace_inference"):
            hooks.append(hook)
        return register(hook, *args, **kwargs)
    def counted_unregister(hook):
        if hook in hooks:
            hooks.remove(hook)
        unregister(hook)
    atexit.register, atexit.unregister = counted_register, counted_unregister

    from flask import Flask

    from headspace_inference import Inference
    from headspace_inference.testing.emulator import REQUEST_THREAD, EmulatorServer

    seen = {}
    emulator = EmulatorServer().start()
    threads_before = {t.name for t in threading.enumerate()}
    here = Path.cwd()
    files_before = sorted(str(p.relative_to(here)) for p in here.rglob("*"))

    app = Flask("host", instance_path=str(here / "instance"))
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{here / 'host.db'}"
    os.environ["OPENROUTER_API_KEY"] = "sk-or-test"
    service = Inference(app, overrides={"openrouter": {"base_url": emulator.base_url}})
    seen["modules_after_init_app"] = sorted(
        m for m in ("alembic", "redis", "psycopg", "jsonschema", "prometheus_client",
                    "gunicorn", "opentelemetry") if m in sys.modules
    )
    seen["threads_after_init_app"] = sorted(
        {t.name for t in threading.enumerate()} - threads_before
    )
    seen["files_after_init_app"] = sorted(
        set(str(p.relative_to(here)) for p in here.rglob("*")) - set(files_before)
    )
    seen["exit_hooks_after_init_app"] = len(hooks)

    service = app.extensions["inference"]
    service.database.upgrade()  # `flask inference db upgrade`, as the README says
    result = service.infer("turn", "summarise", "the base install works")
    service.recorder.flush(10)
    with service.database.engine.connect() as conn:
        from sqlalchemy import text
        seen["rows"] = conn.execute(text("select count(*) from inference_calls")).scalar()
    seen["text"] = result.text
    seen["exit_hooks_started"] = len(hooks)
    seen["threads_started"] = sorted(
        {t.name for t in threading.enumerate()} - threads_before
    )
    service.close()
    seen["threads_after_close"] = sorted(
        {t.name for t in threading.enumerate()} - threads_before
        - {"health-probe"}  # a one-shot probe that ends by itself
        - {REQUEST_THREAD}  # the emulator's, not the service's
    )
    seen["exit_hooks_after_close"] = len(hooks)
    emulator.stop()
    print(json.dumps(seen))
    """
)


def run(args: list[str], cwd: Path, *, ok: bool = True, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=600, env=env, check=False
    )
    if ok:
        assert done.returncode == 0, f"{args[:4]} exited {done.returncode}:\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment with this library's wheel and nothing else."""
    root = tmp_path_factory.mktemp("base")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(root / "w"), str(ROOT)], root)
    (wheel,) = (root / "w").glob("headspace_inference-*.whl")
    run([sys.executable, "-m", "venv", str(root / "venv")], root)
    python = root / "venv" / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         str(wheel)], root)  # fmt: skip
    return root / "venv"


def test_the_base_install_brings_no_extra(venv: Path) -> None:
    listed = run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"], venv)
    names = {p["name"].lower() for p in json.loads(listed.splitlines()[0])}
    assert "headspace-inference" in names
    assert not names & set(EXTRA_PACKAGES)


def test_a_host_calls_infer_on_sqlite_and_init_app_starts_nothing(
    venv: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEADSPACE", "OPENROUTER"))}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    out = run([str(venv / "bin" / "python"), "-c", HOST], tmp_path, env=env)
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["modules_after_init_app"] == []
    assert seen["threads_after_init_app"] == []
    assert seen["files_after_init_app"] == []
    assert seen["rows"] == 1
    assert seen["text"]
    assert "call-log-writer" in seen["threads_started"]
    assert seen["threads_after_close"] == []
    assert seen["exit_hooks_after_init_app"] == 0
    assert seen["exit_hooks_started"] > 0
    assert seen["exit_hooks_after_close"] == 0


@pytest.mark.parametrize(
    ("code", "extra"),
    [
        ("Inference(app, redis_url='redis://127.0.0.1:6379/0')", "redis"),
        ("Inference(app, database_url='postgresql://u@127.0.0.1/db')", "postgres"),
        (
            "import os; os.environ['OPENROUTER_API_KEY'] = 'k'\n"
            "Inference(app, overrides={'openrouter': {'base_url': 'http://127.0.0.1:9'}})\n"
            "service = app.extensions['inference']\n"
            "service.database.upgrade()\n"
            "service.infer('turn', 'p', 'x', response_format={'type': 'object'})",
            "jsonschema",
        ),
    ],
    ids=["redis", "postgres", "jsonschema"],
)
def test_a_feature_without_its_extra_names_the_extra(
    venv: Path, tmp_path: Path, code: str, extra: str
) -> None:
    script = (
        "from flask import Flask\n"
        "from headspace_inference import Inference\n"
        f"app = Flask('host', instance_path='{tmp_path / 'instance'}')\n"
        f"app.config['SQLALCHEMY_DATABASE_URI'] = 'sqlite:///{tmp_path / 'h.db'}'\n"
        "try:\n" + textwrap.indent(code, "    ") + "\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = run([str(venv / "bin" / "python"), "-c", script], tmp_path)
    (line,) = out.strip().splitlines()
    assert f"pip install 'headspace-inference[{extra}]'" in line


def test_serve_without_the_server_extra_says_which_to_install(venv: Path, tmp_path: Path) -> None:
    out = run([str(venv / "bin" / "headspace-inference"), "serve"], tmp_path, ok=False)
    assert "pip install 'headspace-inference[server]'" in out
    assert "Traceback" not in out
    assert not (tmp_path / "instance").exists()
