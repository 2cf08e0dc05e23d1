"""The emulator's command line, declared once: ``headspace-inference openrouter-emulator`` and
``python -m headspace_inference.testing.emulator`` run this same click command."""

from __future__ import annotations

import json
import signal
import sys
import types
from collections.abc import Iterable
from typing import TextIO

import click

from .server import DEFAULT_CHAOS_MIX, NAMED_FAULTS, EmulatorServer, Fault, check_chaos_mix


def parse_fault(text: str) -> Fault:
    """A fault from its JSON form, e.g. ``{"status": 429, "retry_after": 2}``."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--fault {text!r} is not JSON: {exc}") from exc
    return Fault.from_dict(data)


def parse_faults(text: str) -> list[Fault]:
    """``--fault``'s value: a fault as JSON, or by name (e.g. ``provider-400-502``), either
    optionally followed by ``*N`` to send it N times in a row."""
    spec, count = text.strip(), 1
    head, star, times = spec.rpartition("*")
    if star and times.strip().isdigit():
        spec, count = head.strip(), int(times)
        if count < 1:
            raise ValueError(f"--fault {text!r}: the count after * must be at least 1")
    if spec in NAMED_FAULTS:
        return [NAMED_FAULTS[spec]] * count
    if not spec.startswith("{"):
        raise ValueError(
            f"--fault {spec!r} is neither JSON nor a named fault ({', '.join(NAMED_FAULTS)})"
        )
    return [parse_fault(spec)] * count


def parse_chaos_mix(text: str | None) -> dict[str, float]:
    """A chaos mix from ``outcome=weight,...`` (e.g. ``ok=0.8,429=0.1,drop=0.1``) or JSON."""
    if not text:
        return dict(DEFAULT_CHAOS_MIX)
    if text.lstrip().startswith("{"):
        mix = {str(k): float(v) for k, v in json.loads(text).items()}
    else:
        mix = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            outcome, sep, weight = part.partition("=")
            if not sep:
                raise ValueError(f"chaos mix entry {part!r} is not outcome=weight")
            mix[outcome.strip()] = float(weight)
    return check_chaos_mix(mix)


def build(
    *,
    host: str,
    port: int,
    latency_ms: int = 0,
    accept_keys: Iterable[str] = (),
    faults: Iterable[str] = (),
    chaos: int | None = None,
    chaos_mix: str | None = None,
    chaos_hang_ms: int = 3000,
    key_limit: float | None = None,
) -> EmulatorServer:
    """An emulator (bound, not yet serving) configured from command-line values."""
    scripted = [fault for text in faults for fault in parse_faults(text)]
    mix = parse_chaos_mix(chaos_mix)
    keys = set(accept_keys)
    server = EmulatorServer(host, port, latency_ms=latency_ms, accept_keys=keys or None)
    server.script(scripted)
    server.set_key_credit(key_limit)
    if chaos is not None:
        server.set_chaos(chaos, mix, hang_ms=chaos_hang_ms)
    return server


def serve(server: EmulatorServer, out: TextIO = sys.stdout) -> None:
    """Print the base URL as the first line of ``out``, then serve until interrupted (Ctrl-C
    or SIGTERM, which is how benchmarks and tests stop it)."""
    signal.signal(signal.SIGTERM, _interrupt)
    # The URL is the last word of the first line: scripts and benchmarks read it from there.
    print(f"OpenRouter emulator listening on {server.base_url}", file=out, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def _interrupt(signum: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt


@click.command("openrouter-emulator")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8099, show_default=True, type=int, help="0 picks a free port")
@click.option("--latency-ms", default=0, show_default=True, type=int, help="per chat answer")
@click.option("--accept-key", multiple=True, help="A key to accept (default: any sk-or-...).")
@click.option(
    "--fault",
    multiple=True,
    help='A scripted fault as JSON, e.g. {"status": 429}, or by name (provider-400-502, '
    "provider-400-503, provider-400-524, provider-400-529, provider-404, no-models-provided, "
    "trickle, huge, gzip-bomb); a trailing *N sends it N times.",
)
@click.option("--chaos", type=int, default=None, help="Seed for random faults.")
@click.option("--chaos-mix", default=None, help="outcome=weight,... e.g. ok=0.8,429=0.1,drop=0.1")
@click.option("--chaos-hang-ms", default=3000, show_default=True, type=int)
@click.option(
    "--key-limit", type=float, default=None, help="The key's credit limit in USD (default: none)."
)
def emulator_command(
    host: str,
    port: int,
    latency_ms: int,
    accept_key: tuple[str, ...],
    fault: tuple[str, ...],
    chaos: int | None,
    chaos_mix: str | None,
    chaos_hang_ms: int,
    key_limit: float | None,
) -> None:
    """Run the local OpenRouter emulator in the foreground; prints its URL first."""
    try:
        server = build(host=host, port=port, latency_ms=latency_ms, accept_keys=accept_key,
                       faults=fault, chaos=chaos, chaos_mix=chaos_mix,
                       chaos_hang_ms=chaos_hang_ms, key_limit=key_limit)  # fmt: skip
    except (ValueError, OSError) as exc:
        raise click.UsageError(str(exc)) from exc
    serve(server)
