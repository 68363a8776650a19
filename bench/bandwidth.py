#!/usr/bin/env python3
"""
Bandwidth limits through the real server on loopback: do they hold, and
what do they cost when they do not bind.

    python bench/bandwidth.py                 # the rate check (about 1 minute)
    python bench/bandwidth.py --cost          # the cost of a line that never binds

The rate check pushes ``--bytes`` (10 MiB) at ``--rate`` (2 MiB/s) through
``twistd socks5 --rules FILE`` with a ``bandwidth`` line, through the copying
relay (``--no-splice``) and the splice relay (the default: it takes over
after 64 KiB), ``per-connection`` with one tunnel and ``per-user`` with two
tunnels at once (one client without a password: its "user" is its address),
downloading and uploading.  The rate is measured where the bytes arrive
(bench.py's load generator), and must be within ``--tolerance`` of the
limit; the exit status is 1 when one is not.  For the splice relay, the
proxy's descriptors are looked at during the transfer: the pipes column
shows that zero-copy stayed on.

``--cost`` runs single-stream downloads and uploads (bench.py's) through
two proxies at once, pinned to the same CPU (as duel.py does): A with rules that
allow the traffic, B with the same rules plus ``limit bandwidth 1TiB/s
per-user``, which never binds; it prints each round's B/A and the medians.
Churn with and without the line is ``bench/duel.py . . --b-option=...``
(see bench/README.md).  Loopback only; every run stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (bench.py, next to this file)

MIB = 1 << 20
ALLOW = "allow to 127.0.0.1 command connect\n"


def rules_file(name: str, text: str) -> Path:
    path = bench.BUILD / f"bandwidth-{name}.rules"
    path.write_text(text)
    return path


def start_proxy(
    name: str, twistd: List[str], pin: List[str], rules: Path, extra: List[str]
) -> bench.Proc:
    port = bench.free_port()
    cmd = [*pin, *bench.proxy_command(twistd, port), "--rules", str(rules), *extra]
    proc = bench.Proc(f"bandwidth-{name}", cmd, bench.proxy_env())
    proc.start()
    proc.wait_ready(port)
    return proc


def pipes(pid: int) -> int:
    """
    Pipe descriptors ``pid`` and its children (``--workers``) hold (the
    splice relay's: two per direction).
    """
    count = 0
    for process in bench.process_tree(pid):
        try:
            fds = list(Path(f"/proc/{process}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd).startswith("pipe:"):
                    count += 1
            except OSError:
                pass
    return count


def loadgen(
    load: List[str], proxy: int, mode: str, port: int, nbytes: int, extra: List[str]
) -> subprocess.Popen[str]:
    cmd = [*load, str(bench.LOADGEN), "-p", str(proxy), "-t", "120", "-T", "30"]
    cmd += ["-b", str(nbytes), *extra, mode, str(port)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def transfer(
    load: List[str],
    proxy: bench.Proc,
    ports: Dict[str, int],
    direction: str,
    tunnels: int,
    nbytes: int,
    sample_after: float,
) -> Tuple[float, int, Optional[str], int]:
    """
    Move ``nbytes`` over ``tunnels`` tunnels at once: (seconds until the
    last byte arrived, bytes, error, pipes seen ``sample_after`` seconds in).
    """
    assert proxy.port is not None
    seen = [0]

    def sample() -> None:
        seen[0] = pipes(proxy.pid)

    sampler = threading.Timer(sample_after, sample)
    if direction == "download":
        extra = ["-n", str(tunnels)] if tunnels > 1 else []
        runs = [loadgen(load, proxy.port, "download", ports["source"], nbytes, extra)]
    else:  # loadgen uploads one stream: one process per tunnel
        share = nbytes // tunnels
        runs = [
            loadgen(load, proxy.port, "upload", ports["sink"], share, [])
            for _ in range(tunnels)
        ]
    sampler.start()
    results = [json.loads(run.communicate()[0]) for run in runs]
    sampler.cancel()
    errors = [r["error"] for r in results if not r.get("ok")]
    moved = sum(int(r["bytes"]) for r in results)
    seconds = max(float(r["seconds"]) for r in results)
    return seconds, moved, (errors[0] if errors else None), seen[0]


def rate_check(args: argparse.Namespace, pin: bench.Pinning, twistd: List[str]) -> int:
    rate = args.rate * MIB
    limit = f"{args.rate:g}MiB/s"
    servers, ports = bench.start_servers(pin)
    procs: List[bench.Proc] = [servers]
    failures = 0
    print(
        f"limit {limit}, {args.bytes / MIB:g} MiB per run, tolerance "
        f"±{args.tolerance:.0%}; pinning: {pin.description}",
        flush=True,
    )
    header = (
        f"{'relay':<8} {'scope':<15} {'way':<9} {'tunnels':>7} {'MiB':>6} "
        f"{'seconds':>8} {'MiB/s':>7} {'÷ limit':>8} {'pipes':>5}  verdict"
    )
    print(header, flush=True)
    try:
        for relay, flags in (("copying", ["--no-splice"]), ("splice", [])):
            for scope, tunnels in (("per-connection", 1), ("per-user", args.tunnels)):
                rules = rules_file(
                    f"{relay}-{scope}", f"limit bandwidth {limit} {scope}\n{ALLOW}"
                )
                proxy = start_proxy(
                    f"{relay}-{scope}", twistd, pin.proxy, rules, flags + args.option
                )
                procs.append(proxy)
                baseline = pipes(proxy.pid)
                for direction in ("download", "upload"):
                    seconds, moved, error, seen = transfer(
                        pin.load,
                        proxy,
                        ports,
                        direction,
                        tunnels,
                        args.bytes,
                        sample_after=min(2.0, args.bytes / rate / 2),
                    )
                    achieved = moved / seconds if seconds else 0.0
                    ratio = achieved / rate
                    spliced = seen - baseline
                    ok = error is None and abs(ratio - 1) <= args.tolerance
                    if relay == "splice" and spliced < 4 * tunnels:
                        ok = False
                        error = error or "the splice relay was not running"
                    failures += not ok
                    verdict = "ok" if ok else f"OUTSIDE ({error or 'rate'})"
                    print(
                        f"{relay:<8} {scope:<15} {direction:<9} {tunnels:>7} "
                        f"{moved / MIB:>6.2f} {seconds:>8.2f} {achieved / MIB:>7.3f} "
                        f"{ratio:>8.3f} {spliced:>5}  {verdict}",
                        flush=True,
                    )
                proxy.stop()
                procs.remove(proxy)
    finally:
        for proc in reversed(procs):
            proc.stop()
    print("all within tolerance" if not failures else f"{failures} outside", flush=True)
    return 1 if failures else 0


def cost(args: argparse.Namespace, pin: bench.Pinning, twistd: List[str]) -> int:
    """Single-stream MB/s with and without a line that never binds."""
    if not pin.on:
        raise SystemExit("bandwidth --cost: needs two CPUs and taskset")
    plain = rules_file("allow", ALLOW)
    never = args.b_rules or rules_file(
        "never", f"limit bandwidth 1TiB/s per-user\n{ALLOW}"
    )
    servers, ports = bench.start_servers(pin)
    procs: List[bench.Proc] = [servers]
    failed = False
    try:
        for relay, flags in (("splice", []), ("copying", ["--no-splice"])):
            a = start_proxy(f"cost-{relay}-a", twistd, pin.proxy, plain, flags)
            b = start_proxy(f"cost-{relay}-b", twistd, pin.proxy, never, flags)
            procs += [a, b]
            modes = (("download", ports["source"]), ("upload", ports["sink"]))
            for mode, port in modes:
                ratios: List[float] = []
                for round_ in range(1, args.rounds + 1):
                    # At once, as duel.py: whatever slows the machine slows
                    # both; the one started first takes turns.
                    order = (a, b) if round_ % 2 else (b, a)
                    runs: Dict[str, Any] = {}
                    for proc in order:
                        cmd = [*pin.load, str(bench.LOADGEN), "-p", str(proc.port)]
                        cmd += ["-t", str(args.duration), mode, str(port)]
                        runs[proc.name] = subprocess.Popen(
                            cmd, stdout=subprocess.PIPE, text=True
                        )
                    ra, rb = (json.loads(runs[p.name].communicate()[0]) for p in (a, b))
                    failed = failed or not (ra["ok"] and rb["ok"])
                    ratio = rb["mbps"] / ra["mbps"] if ra["mbps"] else float("nan")
                    ratios.append(ratio)
                    print(
                        f"{relay} {mode} round {round_}: A {ra['mbps']:.0f} MB/s  "
                        f"B {rb['mbps']:.0f} MB/s  B/A {ratio:.3f}",
                        flush=True,
                    )
                print(
                    f"{relay} {mode}: median B/A {statistics.median(ratios):.3f}",
                    flush=True,
                )
            for proc in (b, a):
                proc.stop()
                procs.remove(proc)
    finally:
        for proc in reversed(procs):
            proc.stop()
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=2.0, help="MiB/s (default 2)")
    parser.add_argument(
        "--bytes", type=int, default=10 * MIB, help="bytes per run (10 MiB)"
    )
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument(
        "--tunnels", type=int, default=2, help="per-user tunnels at once (2)"
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        help="a server option for the rate check, e.g. --option=--workers=2 (repeat)",
    )
    parser.add_argument("--cost", action="store_true", help="the cost run instead")
    parser.add_argument("--rounds", type=int, default=5, help="--cost: rounds")
    parser.add_argument("--duration", type=float, default=2.0, help="--cost: seconds")
    parser.add_argument(
        "--b-rules", type=Path, help="--cost: B's rules instead (the same as A's: A/A)"
    )
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args()
    pin = bench.make_pinning(no_pin=args.no_pin)
    bench.build_loadgen()
    twistd = bench.find_twistd(None)
    started = time.monotonic()
    status = cost(args, pin, twistd) if args.cost else rate_check(args, pin, twistd)
    print(f"took {time.monotonic() - started:.0f} s", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
