"""``python -m simulators.servers messages|openai --port N ...``: serve until SIGTERM/Ctrl-C."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from types import FrameType

from ._base import FakeServer, ServerFaults
from ._messages import MessagesServer
from ._openai import OpenAIServer

_KINDS: dict[str, type[FakeServer]] = {"messages": MessagesServer, "openai": OpenAIServer}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simulators.servers",
        description="Serve a fake API on 127.0.0.1 until SIGTERM/Ctrl-C.",
    )
    p.add_argument("kind", choices=sorted(_KINDS))
    p.add_argument("--port", type=int, default=0, help="port (default: 0, an ephemeral one)")
    p.add_argument(
        "--latency",
        type=json.loads,
        default=None,
        help='latency spec as JSON, e.g. \'{"dist": "lognormal", "median": 1, "p99": 3}\'',
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-scale", type=float, default=1.0, help="sleep latency * this (default 1)")
    p.add_argument("--error-rate", type=float, default=0.0, help="share of 5xx answers")
    p.add_argument("--rate-limit", type=float, default=None, help="requests per second, then 429")
    p.add_argument("--throttle-rate", type=float, default=0.0, help="share of random 429 answers")
    p.add_argument("--malformed-rate", type=float, default=0.0)
    p.add_argument("--slow-drip-rate", type=float, default=0.0)
    p.add_argument("--drop-rate", type=float, default=0.0)
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        faults = ServerFaults(
            throttle_rate=args.throttle_rate,
            malformed_rate=args.malformed_rate,
            slow_drip_rate=args.slow_drip_rate,
            drop_rate=args.drop_rate,
        )
        server = _KINDS[args.kind](
            args.latency,
            seed=args.seed,
            time_scale=args.time_scale,
            error_rate=args.error_rate,
            rate_limit=args.rate_limit,
            faults=faults,
            port=args.port,
            verbose=args.verbose,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except OSError as exc:
        print(f"error: cannot listen on port {args.port}: {exc}", file=sys.stderr)
        return 1
    print(server.url, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    print("stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
