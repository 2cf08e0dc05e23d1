"""``python -m claude_headspace.emulator``: run the emulator in the foreground."""

from __future__ import annotations

import argparse
import signal
import sys
import types

from .cli import build, serve


def main(argv: list[str] | None = None) -> None:
    """Parse flags, start the emulator, print its URL on the first line, serve."""
    parser = argparse.ArgumentParser(prog="openrouter-emulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=int, default=0, help="added to every chat answer")
    parser.add_argument(
        "--accept-key",
        action="append",
        default=[],
        help="a key to accept (repeatable; default: any sk-or-... key)",
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        help='a scripted fault as JSON (repeatable, in order), e.g. \'{"status": 429, '
        '"retry_after": 2}\'',
    )
    parser.add_argument("--chaos", type=int, default=None, help="seed for random faults")
    parser.add_argument(
        "--chaos-mix", default=None, help="outcome=weight,... e.g. ok=0.8,429=0.1,drop=0.1"
    )
    parser.add_argument("--chaos-hang-ms", type=int, default=3000, help="how long a hang lasts")
    args = parser.parse_args(argv)
    try:
        server = build(
            host=args.host,
            port=args.port,
            latency_ms=args.latency_ms,
            accept_keys=args.accept_key,
            faults=args.fault,
            chaos=args.chaos,
            chaos_mix=args.chaos_mix,
            chaos_hang_ms=args.chaos_hang_ms,
        )
    except (ValueError, OSError) as exc:
        parser.exit(2, f"openrouter-emulator: error: {exc}\n")
    # SIGTERM (how benchmarks and tests stop it) ends it as cleanly as Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    serve(server)
    sys.exit(0)


def _interrupt(signum: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
