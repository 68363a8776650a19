#!/usr/bin/env python3
"""
What a limits check costs with ``--limits-store redis://``: the latency of
one call (one at a time) and the calls per second with many in flight, for
each kind of check, against a redis-server this script starts on a free
127.0.0.1 port (saving nothing) and stops.

    PYTHONPATH=. python bench/redis_store.py            # about 10 seconds
    PYTHONPATH=. python bench/redis_store.py --calls 50000

The figures are this process's (one reactor, one connection): a proxy
process makes the same calls, so they bound how many checked requests per
second one process can do, not Redis.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from typing import Any, Callable, List

from twisted.internet import defer, task

from twisted_socks5.redisstore import RedisLimitStore


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = _free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        + ["--appendonly", "no", "--dir", directory],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if b"Ready to accept connections" in line:
            return process, port
    raise SystemExit("redis-server did not start")


CHECKS: List[tuple[str, Callable[[RedisLimitStore, int], Any]]] = [
    ("sessions (open)", lambda s, n: s.open_session(f"user:{n % 100}", 10**9)),
    ("rate", lambda s, n: s.hit_rate(f"client:{n % 100}", 10**9, 60)),
    ("quota add", lambda s, n: s.add_usage(f"user:{n % 100}", "day", 1500)),
    (
        "bandwidth slice",
        lambda s, n: s.take_bandwidth(f"user:{n % 100}", 1e9, 10**9, 65536),
    ),
]


async def one_at_a_time(store: RedisLimitStore, check: Any, calls: int) -> List[float]:
    latencies = []
    for n in range(calls):
        began = time.perf_counter()
        await check(store, n)
        latencies.append(time.perf_counter() - began)
    return latencies


async def in_flight(
    store: RedisLimitStore, check: Any, calls: int, width: int
) -> float:
    began = time.perf_counter()
    for first in range(0, calls, width):
        batch = [check(store, n) for n in range(first, min(calls, first + width))]
        await defer.gatherResults(batch)
    return calls / (time.perf_counter() - began)


async def main(reactor: Any, calls: int, width: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        process, port = start_redis(directory)
        try:
            store = RedisLimitStore(f"redis://127.0.0.1:{port}/0", reactor)
            await store.start()
            print(f"{calls} calls each; {width} in flight for the throughput")
            print(f"{'check':24} {'median µs':>10} {'p99 µs':>8} {'calls/s':>9}")
            for name, check in CHECKS:
                latencies = await one_at_a_time(store, check, calls // 5)
                rate = await in_flight(store, check, calls, width)
                p99 = statistics.quantiles(latencies, n=100)[98]
                median = statistics.median(latencies)
                print(f"{name:24} {median * 1e6:10.0f} {p99 * 1e6:8.0f} {rate:9.0f}")
            await store.stop()
        finally:
            process.terminate()
            process.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--width", type=int, default=100)
    arguments = parser.parse_args()
    task.react(
        lambda reactor: defer.ensureDeferred(
            main(reactor, arguments.calls, arguments.width)
        )
    )
