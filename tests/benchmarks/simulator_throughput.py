"""Throughput of the Klaviyo simulator: segment-profile rows per second on loopback.

Not a test. Run: ``.venv/bin/python tests/benchmarks/simulator_throughput.py [--seconds 10]``.
The simulator runs in a child process with rate limits off; a few client threads with their own
``requests.Session`` (HTTP/1.1 keep-alive) walk ``/api/segments/{id}/profiles?page[size]=100``
following ``links.next`` until the time budget is spent. Rows are counted from each page's
``data``; the client only scans bytes for the next link and the row count, skips proxy
lookups and reads each body in one go, so the figure measures the server rather than
client-side overhead.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from klaviyo_source.simulator import KlaviyoSimulator, generate_account  # noqa: E402

REVISION = "2026-07-15"


def serve(conn: Connection, profiles: int, memberships: int) -> None:
    """Child process: build an account, serve it until told to stop."""
    account = generate_account(
        seed=7, segments=6, tags=4, profiles=profiles, memberships=memberships
    )
    biggest = max(account.segments(), key=account.profile_count)
    with KlaviyoSimulator(account, rate_limits=False) as sim:
        conn.send((sim.base_url, sim.api_key, biggest, account.profile_count(biggest)))
        conn.recv()


def _next_link(body: bytes) -> str | None:
    marker = b'"next":"'
    at = body.rfind(marker)
    if at < 0:
        return None
    start = at + len(marker)
    return body[start : body.index(b'"', start)].decode()


def run_client(first_url: str, key: str, deadline: float, out: list[int]) -> None:
    """Walk the segment over and over until the deadline; append rows served."""
    session = requests.Session()
    session.trust_env = False  # skip per-request proxy lookups in os.environ
    session.headers.update(
        {
            "Authorization": f"Klaviyo-API-Key {key}",
            "revision": REVISION,
            "Accept": "application/vnd.api+json",
        }
    )
    rows = 0
    url: str | None = first_url
    while time.perf_counter() < deadline:
        resp = session.get(url or first_url, stream=True)
        body = resp.raw.read()  # whole body in one read instead of 10 kB chunks
        if resp.status_code != 200:
            raise RuntimeError(f"{resp.status_code}: {body[:200]!r}")
        rows += body.count(b'{"type":"profile","id":')
        url = _next_link(body)
    out.append(rows)


def measure(base: str, key: str, sid: str, query: str, threads: int, seconds: float) -> float:
    """Rows per second for one query string over ``seconds``."""
    first = f"{base}/api/segments/{sid}/profiles?{query}"
    results: list[int] = []
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    workers = [
        threading.Thread(target=run_client, args=(first, key, deadline, results))
        for _ in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    return sum(results) / elapsed


def main() -> None:
    """Start the server process, warm caches, measure and print."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=3)
    parser.add_argument("--profiles", type=int, default=20000)
    args = parser.parse_args()

    parent, child = mp.Pipe()
    proc = mp.Process(target=serve, args=(child, args.profiles, args.profiles * 2), daemon=True)
    proc.start()
    base, key, sid, size = parent.recv()
    print(f"segment {sid}: {size} members; {args.threads} client threads, {args.seconds:.0f} s")
    cases = [
        ("all attributes", "page%5Bsize%5D=100&sort=joined_group_at"),
        (
            "fields[profile]=email,joined_group_at",
            "page%5Bsize%5D=100&sort=joined_group_at&fields%5Bprofile%5D=email%2Cjoined_group_at",
        ),
    ]
    try:
        for label, query in cases:
            measure(base, key, sid, query, 1, 1.5)  # warm the row caches
            rate = measure(base, key, sid, query, args.threads, args.seconds)
            print(f"{label:40s} {rate:10,.0f} rows/s")
    finally:
        parent.send("stop")
        proc.join(timeout=10)


if __name__ == "__main__":
    main()
