"""``python -m headspace_inference.testing.emulator``: the ``headspace-inference
openrouter-emulator`` command."""

from __future__ import annotations

from .cli import emulator_command

if __name__ == "__main__":
    emulator_command(prog_name="openrouter-emulator")
