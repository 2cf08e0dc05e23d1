"""The library installs beside the app it serves: Claude Headspace is distributed as
``claude-headspace`` with the import package ``claude_headspace``, so this library must take
neither name. A stand-in host with exactly those names and this library go into one fresh
virtual environment, in both orders; neither install may remove the other, both packages
import with their own code, and ``pip check`` finds nothing broken.

Slow (two fresh environments, with the library's dependencies from pip's cache or the index):
``.ci/run`` runs it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

# The host's own app module: what the library's old name overwrote on install.
HOST_APP = "def create_app():\n    return 'the host app'\n"


def run(args: list[str], cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args[:4]} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A wheel of this library and one of a stand-in host named as Claude Headspace is."""
    root = tmp_path_factory.mktemp("beside")
    host = root / "host"
    (host / "claude_headspace").mkdir(parents=True)
    (host / "pyproject.toml").write_text(
        textwrap.dedent(
            """\
            [build-system]
            requires = ["setuptools>=68"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "claude-headspace"
            version = "3.1.0"

            [tool.setuptools]
            packages = ["claude_headspace"]
            """
        )
    )
    (host / "claude_headspace" / "__init__.py").write_text('"""The host."""\n')
    (host / "claude_headspace" / "app.py").write_text(HOST_APP)
    out = root / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(host)], root)
    run([*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(ROOT)], root)
    (host_wheel,) = out.glob("claude_headspace-*.whl")
    (library_wheel,) = out.glob("headspace_inference-*.whl")
    return {"host": host_wheel, "library": library_wheel}


CHECK = textwrap.dedent(
    """\
    import claude_headspace.app, headspace_inference
    from headspace_inference import Inference, create_app
    assert claude_headspace.app.create_app() == "the host app", claude_headspace.app.__file__
    assert headspace_inference.__file__ != claude_headspace.__file__
    print("both import")
    """
)


@pytest.mark.parametrize("order", [("host", "library"), ("library", "host")])
def test_the_library_and_a_host_named_claude_headspace_install_together(
    tmp_path: Path, wheels: dict[str, Path], order: tuple[str, str]
) -> None:
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    for name in order:
        said = run([*pip, "install", str(wheels[name])], tmp_path)
        assert "Uninstalling" not in said, said

    installed = run([*pip, "list", "--format=freeze"], tmp_path).lower().splitlines()
    assert "claude-headspace==3.1.0" in installed
    assert any(line.startswith("headspace-inference==") for line in installed)
    assert "both import" in run([python, "-c", CHECK], tmp_path)
    assert "No broken requirements" in run([*pip, "check"], tmp_path)
