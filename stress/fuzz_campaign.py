"""
A coverage-guided fuzz campaign over every target of ``fuzz_targets.py``
(the codec's parsers, the server's handshake, the rules file and htpasswd
files), run under atheris until a total number of inputs is reached:

    python stress/fuzz_campaign.py                   # 10,000,000 inputs
    python stress/fuzz_campaign.py --inputs 200000 --jobs 2 --json out.json

``tox -e fuzz`` runs it.  By hand or overnight, not in CI: on two cores
the whole campaign takes tens of minutes.  Each target runs in its own
process (``fuzz_targets.py TARGET -runs=N``), two at a time by default;
the inputs are shared out by weight, fewer to the slow, structured server
targets.  A target that finds a crash or a broken invariant stops, and its
input is kept in ``--artifacts`` (reproduce it with ``fuzz_targets.py
TARGET ARTIFACT``).  Exit status 0 only when every target ran its share
without a finding.
"""

# The commands are this script's own (sys.executable and fuzz_targets.py).
# ruff: noqa: S603
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
TARGETS_SCRIPT = HERE / "fuzz_targets.py"

#: Relative share of the inputs per target.  The server targets run a whole
#: protocol per input (a thousandth of a parser's speed), so they get fewer.
WEIGHTS: Dict[str, float] = {
    "server.noauth": 0.1,
    "server.userpass": 0.1,
    "config.rules": 0.5,
    "config.htpasswd": 1.0,
}
DEFAULT_WEIGHT = 1.0
#: The longest input libFuzzer makes, per target family.
MAX_LEN = {"codec": 700, "config": 4096, "server": 4096}

DONE = re.compile(r"Done (\d+) runs in (\d+) second")


def targets() -> List[str]:
    out = subprocess.run(
        [sys.executable, str(TARGETS_SCRIPT), "--list"],
        capture_output=True,
        text=True,
        check=True,
        env=_env(),
    ).stdout
    return out.split(":", 1)[1].replace(",", " ").split()


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    paths = [str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def shares(names: List[str], total: int) -> Dict[str, int]:
    """Split ``total`` inputs over the targets by weight (each gets one at least)."""
    weights = {name: WEIGHTS.get(name, DEFAULT_WEIGHT) for name in names}
    whole = sum(weights.values())
    plan = {name: max(1, int(total * w / whole)) for name, w in weights.items()}
    # What rounding down left over goes to the first targets, one each, so
    # that the shares add up to the total asked for.
    for name in sorted(plan)[: max(0, total - sum(plan.values()))]:
        plan[name] += 1
    return plan


def run_target(
    name: str, runs: int, workdir: Path, artifacts: Path, timeout: float
) -> Dict[str, Any]:
    """One target under atheris for ``runs`` inputs; what libFuzzer reported."""
    dictionary = subprocess.run(
        [sys.executable, str(TARGETS_SCRIPT), name, "--dictionary"],
        capture_output=True,
        text=True,
        check=True,
        env=_env(),
    ).stdout
    command = [
        sys.executable,
        str(TARGETS_SCRIPT),
        name,
        f"-runs={runs}",
        f"-max_len={MAX_LEN[name.split('.')[0]]}",
        "-timeout=30",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/{name}-",
    ]
    if dictionary.strip():
        path = workdir / f"{name}.dict"
        path.write_text(dictionary)
        command.append(f"-dict={path}")
    start = time.monotonic()
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=_env()
        )
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode() + (e.stderr or b"").decode()
        code = -1
    seconds = time.monotonic() - start
    done = DONE.findall(output)
    executed = re.findall(r"stat::number_of_executed_units: (\d+)", output)
    inputs = int(done[-1][0]) if done else int(executed[-1]) if executed else 0
    finding: Optional[str] = None
    if code != 0:
        tail = output[-3000:]
        finding = tail if code != -1 else f"timed out after {timeout:.0f} s\n{tail}"
    return {
        "target": name,
        "inputs": inputs,
        "asked": runs,
        "seconds": round(seconds, 1),
        "rate": round(inputs / seconds) if seconds else 0,
        "finding": finding,
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=10_000_000, help="in all")
    parser.add_argument("--jobs", type=int, default=2, help="targets at once")
    parser.add_argument("--only", action="append", help="a target (repeatable)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--artifacts", default="fuzz-artifacts", help="where findings are kept"
    )
    parser.add_argument(
        "--timeout", type=float, default=4 * 3600, help="seconds per target at most"
    )
    args = parser.parse_args(argv)
    try:
        import atheris  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        print("atheris is not installed: pip install atheris", file=sys.stderr)
        return 2
    names = args.only or targets()
    plan = shares(names, args.inputs)
    artifacts = Path(args.artifacts).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    print(f"fuzz campaign: {args.inputs:,} inputs over {len(names)} targets")
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        futures = [
            pool.submit(run_target, n, plan[n], Path(tmp), artifacts, args.timeout)
            for n in sorted(names, key=lambda n: -WEIGHTS.get(n, DEFAULT_WEIGHT))
        ]
        results = []
        for future in futures:
            result = future.result()
            results.append(result)
            mark = "FINDING" if result["finding"] else "ok"
            print(
                f"  {result['target']:<24} {result['inputs']:>11,} inputs "
                f"{result['seconds']:>8.1f} s {result['rate']:>8,}/s  {mark}",
                flush=True,
            )
    total = sum(r["inputs"] for r in results)
    elapsed = time.monotonic() - start
    ok = all(r["finding"] is None for r in results)
    print(
        f"fuzz campaign: {total:,} inputs in {elapsed:.0f} s, "
        f"{'no finding' if ok else 'FINDINGS (see above)'}"
    )
    for r in results:
        if r["finding"]:
            print(f"--- {r['target']}\n{r['finding']}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "inputs": total,
                    "seconds": round(elapsed),
                    "ok": ok,
                    "targets": results,
                },
                indent=2,
            )
        )
    return 0 if ok and total >= args.inputs * 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
