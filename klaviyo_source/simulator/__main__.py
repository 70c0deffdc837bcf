"""Run the simulator standalone: ``python -m klaviyo_source.simulator --port 8765 --seed 7``.

Prints the base URL and the API key, then serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .generator import generate_account
from .rate_limits import WINDOW_KINDS
from .server import KlaviyoSimulator
from .spec_tables import ALL_SCOPES


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, generate an account and serve it until SIGINT or SIGTERM."""
    stopped = threading.Event()
    # Handlers first: a stop that arrives while the account is generated still ends cleanly.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, lambda *_: stopped.set())
    parser = argparse.ArgumentParser(prog="python -m klaviyo_source.simulator", description=__doc__)
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--segments", type=int, default=12)
    parser.add_argument("--tags", type=int, default=8)
    parser.add_argument("--profiles", type=int, default=3000)
    parser.add_argument("--memberships", type=int, default=9000)
    parser.add_argument("--no-rate-limits", action="store_true")
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument(
        "--windows",
        choices=WINDOW_KINDS,
        default="fixed",
        help="rate-limit windows: fixed as Klaviyo documents them, or sliding",
    )
    parser.add_argument("--api-key", default=None, help="private key to accept (all scopes)")
    args = parser.parse_args(argv)

    account = generate_account(
        seed=args.seed,
        segments=args.segments,
        tags=args.tags,
        profiles=args.profiles,
        memberships=args.memberships,
    )
    keys = {args.api_key: set(ALL_SCOPES)} if args.api_key else None
    sim = KlaviyoSimulator(
        account,
        api_keys=keys,
        rate_limits=not args.no_rate_limits,
        time_scale=args.time_scale,
        port=args.port,
        windows=args.windows,
    )
    with sim:
        print(f"base_url={sim.base_url}", flush=True)
        print(f"api_key={sim.api_key}", flush=True)
        stopped.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
