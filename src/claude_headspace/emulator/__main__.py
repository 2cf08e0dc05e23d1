"""``python -m claude_headspace.emulator``: run the emulator in the foreground."""

from __future__ import annotations

import argparse
import json
import sys

from .server import EmulatorServer, Fault


def main(argv: list[str] | None = None) -> None:
    """Parse flags, start the emulator, print its URL on the first line, serve."""
    parser = argparse.ArgumentParser(prog="openrouter-emulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=int, default=0)
    parser.add_argument(
        "--accept-key",
        action="append",
        default=None,
        help="a key to accept (repeatable; default: any sk-or-... key)",
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        help='a scripted fault as JSON, e.g. \'{"status": 429, "retry_after": 2}\'',
    )
    parser.add_argument("--chaos", type=int, default=None, help="seed for random faults")
    args = parser.parse_args(argv)
    server = EmulatorServer(
        args.host, args.port, latency_ms=args.latency_ms,
        accept_keys=set(args.accept_key) if args.accept_key else None,
    )  # fmt: skip
    server.script([Fault.from_dict(json.loads(f)) for f in args.fault])
    if args.chaos is not None:
        server.set_chaos(args.chaos)
    print(f"OpenRouter emulator listening on {server.base_url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
