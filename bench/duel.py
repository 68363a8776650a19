#!/usr/bin/env python3
"""
Judge a change by churn: two builds of the server on one core, at once.

    python bench/duel.py OLD_TREE NEW_TREE [--rounds 3] [--b-options "..."]
        [-- SERVER OPTIONS...]

Full benchmark runs on a shared or virtual machine move by 15-25 % from one
run to the next, more than most changes are worth.  Here both builds run
pinned to the same CPU and take the same churn (bench.py's, greeting +
CONNECT + 64-byte echo + close, concurrency 50) at the same time, from two
load generators on the other CPU: whatever slows the machine slows both, and
the ratio B/A of each round is the measure.  Run it once with the same tree
twice first (an A/A run): its ratios (about 0.98-1.02 on the development
machine) are the noise to beat.

A tree is a checkout of this repository (``git worktree add /tmp/old
HEAD~1``); each is imported from its own directory.  Loopback only; every
run stops by itself.  Prints one line per round and exits 1 if a round had
errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (bench.py, next to this file)


def proxy(
    name: str, tree: Path, twistd: List[str], pin: List[str], extra: List[str]
) -> bench.Proc:
    port = bench.free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    cmd = [*pin, *bench.proxy_command(twistd, port), *extra]
    proc = bench.Proc(f"duel-{name}", cmd, env)
    proc.start()
    proc.wait_ready(port)
    return proc


def churn(load: List[str], port: int, echo: int, seconds: float) -> subprocess.Popen:
    cmd = [*load, str(bench.LOADGEN), "-p", str(port), "-t", str(seconds)]
    cmd += ["-c", "50", "churn", str(echo)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="tree A (the reference)")
    parser.add_argument("new", type=Path, help="tree B (the change)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds a round")
    parser.add_argument(
        "--b-options",
        default="",
        help="options for B only, as one shell-quoted string: a feature turned "
        "on against the same tree without it (e.g. an idle --admin console)",
    )
    argv = sys.argv[1:]
    extra: List[str] = []
    if "--" in argv:  # what follows goes to both servers
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    pin = bench.make_pinning(no_pin=False)
    if not pin.on:
        raise SystemExit(f"duel: needs two CPUs and taskset; pinning {pin.description}")
    bench.build_loadgen()
    twistd = bench.find_twistd(None)
    servers, ports = bench.start_servers(pin)
    procs: List[bench.Proc] = [servers]
    failed = False
    try:
        a = proxy("a", args.old.resolve(), twistd, pin.proxy, extra)
        procs.append(a)
        b_extra = [*extra, *shlex.split(args.b_options)]
        b = proxy("b", args.new.resolve(), twistd, pin.proxy, b_extra)
        procs.append(b)
        ratios: List[float] = []
        for round_ in range(1, args.rounds + 1):
            # Whichever load starts first has a head start: take turns.
            order = (a, b) if round_ % 2 else (b, a)
            runs = {
                p.name: churn(pin.load, p.port or 0, ports["echo"], args.duration)
                for p in order
            }
            ra, rb = (json.loads(runs[p.name].communicate()[0]) for p in (a, b))
            ratio = rb["cps"] / ra["cps"] if ra["cps"] else float("nan")
            ratios.append(ratio)
            errors = ra["errors"] + rb["errors"]
            failed = failed or bool(errors)
            print(
                f"round {round_}: A {ra['cps']:.0f} conn/s (p99 {ra['p99_ms']:.1f} ms)"
                f"  B {rb['cps']:.0f} conn/s (p99 {rb['p99_ms']:.1f} ms)"
                f"  B/A {ratio:.3f}  errors {ra['errors']} {rb['errors']}",
                flush=True,
            )
        print(f"median B/A {statistics.median(ratios):.3f}", flush=True)
    finally:
        for proc in reversed(procs):
            proc.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
