#!/usr/bin/env python3
"""
Benchmark twisted-socks5 against a direct connection (and microsocks / danted
when they are installed): single-stream download and upload throughput, and
connection churn (connect, SOCKS handshake, 64-byte echo, close).

    python bench/bench.py                 # about 1 minute
    python bench/bench.py --quick         # about 25 seconds
    python bench/bench.py --json out.json

Everything listens on and connects to 127.0.0.1 only.  The load generator and
the test servers are one C program (bench/loadgen.c), built at run time into
bench/_build/.  See bench/README.md for what the figures mean.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUILD = BENCH / "_build"
LOADGEN_SRC = BENCH / "loadgen.c"
LOADGEN = BUILD / "loadgen"
HOST = "127.0.0.1"  # loopback only, always

PROXY_NAME = "twisted-socks5"
METRICS = ("download", "upload", "churn")


# --------------------------------------------------------------------- helpers


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def accepting(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if this script dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def pin_prefixes(no_pin: bool) -> tuple[List[str], List[str], str]:
    """taskset prefixes for (load generator + servers, proxy) and a description."""
    taskset = shutil.which("taskset")
    if no_pin:
        return [], [], "off (--no-pin)"
    if taskset is None:
        return [], [], "off (no taskset)"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return [], [], "off (one CPU)"
    load, proxy = str(cpus[0]), str(cpus[1])
    return (
        [taskset, "-c", load],
        [taskset, "-c", proxy],
        f"load generator and servers on CPU {load}, proxies on CPU {proxy}",
    )


def build_loadgen() -> Path:
    BUILD.mkdir(exist_ok=True)
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= LOADGEN_SRC.stat().st_mtime:
        return LOADGEN
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("bench: no C compiler (cc or gcc) on PATH")
    tmp = BUILD / f"loadgen.{os.getpid()}.tmp"
    cmd = [cc, "-O2", "-Wall", "-o", str(tmp), str(LOADGEN_SRC)]
    log(f"building {LOADGEN.relative_to(ROOT)}: {' '.join(cmd)}")
    subprocess.run(cmd, check=True)
    tmp.replace(LOADGEN)
    return LOADGEN


def find_twistd(explicit: Optional[str]) -> List[str]:
    """The command that runs twistd with Twisted importable."""
    if explicit:
        return [explicit]
    candidates = [Path(sys.executable).parent / "twistd"]
    venv = os.environ.get("VIRTUAL_ENV")
    if venv:
        candidates.append(Path(venv) / "bin" / "twistd")
    for base in (ROOT / ".venv", ROOT / "venv", ROOT.parent / "venv"):
        candidates.append(base / "bin" / "twistd")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return [str(candidate)]
    if importlib.util.find_spec("twisted") is not None:
        # twisted.scripts.twistd has no __main__ guard: "python -m" would do nothing.
        code = "import sys; from twisted.scripts.twistd import run; sys.exit(run())"
        return [sys.executable, "-c", code]
    found = shutil.which("twistd")
    if found:
        return [found]
    raise SystemExit(
        "bench: no twistd found; run with the dev venv's python "
        "(e.g. /work/venv/bin/python bench/bench.py), or pass --twistd or --proxy-cmd"
    )


def proc_status(pid: int) -> Dict[str, int]:
    """VmRSS and VmHWM of a process, in kB."""
    out = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> Optional[List[str]]:
    """/proc/PID/stat fields after the command name (state is [0], ppid [1])."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(pid: int) -> List[int]:
    """pid and its live descendants (danted forks workers)."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def cpu_seconds(pid: int) -> Optional[float]:
    """
    CPU time of a process and all its descendants, in seconds: each live
    process's own time plus its reaped children's (cutime, cstime), so that a
    worker exiting between two readings is still counted once.
    """
    total = None
    for p in process_tree(pid):
        fields = _stat(p)
        if fields:
            ticks = sum(int(x) for x in fields[11:15])
            total = (total or 0.0) + ticks / CLK_TCK
    return total


def memory(pid: int) -> Dict[str, int]:
    """VmRSS/VmHWM of the process, and the RSS summed over its tree, in kB."""
    out = proc_status(pid)
    tree = process_tree(pid)
    if out and len(tree) > 1:
        out["tree_processes"] = len(tree)
        out["tree_VmRSS"] = sum(proc_status(p).get("VmRSS", 0) for p in tree)
    return out


# ------------------------------------------------------------------- processes


class Proc:
    """A child process with its output in a log file under bench/_build/."""

    def __init__(self, name: str, cmd: List[str], env: Optional[dict] = None):
        self.name = name
        self.cmd = cmd
        self.env = env
        self.log_path = BUILD / f"{name}.log"
        self.proc: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, **kwargs: Any) -> None:
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=kwargs.pop("stdout", out),
                stderr=out,
                env=self.env,
                cwd=ROOT,
                preexec_fn=die_with_parent,
                **kwargs,
            )

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def wait_accepting(self, port: int, tries: int = 100, delay: float = 0.1) -> None:
        assert self.proc is not None
        for _ in range(tries):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before "
                    f"accepting on {HOST}:{port}:\n{self.log_tail()}"
                )
            if accepting(port):
                self.port = port
                return
            time.sleep(delay)
        raise RuntimeError(
            f"{self.name} not accepting on {HOST}:{port} after {tries} tries:\n"
            f"{self.log_tail()}"
        )

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} still running {timeout} s after SIGTERM: killing it")
                proc.kill()
                proc.wait()
        if proc.stdin:
            proc.stdin.close()
        if proc.stdout:
            proc.stdout.close()
        return proc.returncode


def start_servers(load_pin: List[str]) -> tuple[Proc, Dict[str, int]]:
    servers = Proc("servers", [*load_pin, str(LOADGEN), "serve"])
    # stdin stays open: the servers exit when it closes (if this script dies).
    servers.start(stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    assert servers.proc is not None and servers.proc.stdout is not None
    line = servers.proc.stdout.readline().decode()
    ports = {}
    for item in line.split():
        key, _, value = item.partition("=")
        ports[key] = int(value)
    if set(ports) != {"source", "sink", "echo"}:
        servers.stop()
        raise RuntimeError(f"loadgen serve said {line!r}:\n{servers.log_tail()}")
    return servers, ports


def proxy_env() -> Dict[str, str]:
    """Run the working tree's twisted_socks5, not an installed copy."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def start_proxy(name: str, make_cmd: Any, pin: List[str], env=None) -> Proc:
    """Start a proxy on a free port; a lost race for the port is retried."""
    last: Optional[Exception] = None
    for _ in range(3):
        port = free_port()
        proxy = Proc(name, [*pin, *make_cmd(port)], env)
        proxy.start(stdin=subprocess.DEVNULL)
        try:
            proxy.wait_accepting(port)
            return proxy
        except RuntimeError as e:
            last = e
            proxy.stop()
    raise RuntimeError(str(last))


def danted_cmd(port: int) -> List[str]:
    conf = BUILD / "danted.conf"
    privileged = (
        "user.privileged: root\nuser.unprivileged: nobody\n"
        if os.geteuid() == 0
        else ""
    )
    conf.write_text(
        f"logoutput: stderr\n"
        f"internal: {HOST} port = {port}\n"
        f"external: {HOST}\n"
        f"clientmethod: none\n"
        f"socksmethod: none\n"
        f"{privileged}"
        f"client pass {{\n  from: 127.0.0.0/8 to: 0.0.0.0/0\n  log: error\n}}\n"
        f"socks pass {{\n  from: 127.0.0.0/8 to: 127.0.0.0/8\n"
        f"  command: connect\n  log: error\n}}\n"
    )
    return [str(shutil.which("danted")), "-f", str(conf)]


def microsocks_cmd(port: int) -> List[str]:
    return [str(shutil.which("microsocks")), "-i", HOST, "-p", str(port)]


# --------------------------------------------------------------------- running


class Runner:
    def __init__(self, args: argparse.Namespace, load_pin: List[str]):
        self.args = args
        self.load_pin = load_pin

    def loadgen(
        self,
        metric: str,
        port: int,
        proxy: Optional[Proc],
        seconds: float,
    ) -> Dict[str, Any]:
        cmd = [*self.load_pin, str(LOADGEN), "-t", str(seconds)]
        cmd += ["-T", str(self.args.timeout)]
        if proxy is not None:
            cmd += ["-p", str(proxy.port)]
        if metric == "churn":
            cmd += ["-c", str(self.args.concurrency)]
        elif self.args.bytes:
            cmd += ["-b", str(self.args.bytes)]
        cmd += [metric, str(port)]
        cpu0 = cpu_seconds(proxy.pid) if proxy else None
        t0 = time.monotonic()
        limit = seconds + 3 * self.args.timeout + 30
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"loadgen still running after {limit:g} s"}
        wall = time.monotonic() - t0
        cpu1 = cpu_seconds(proxy.pid) if proxy else None
        try:
            result: Dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            result = {
                "ok": False,
                "error": f"loadgen exited {done.returncode}: {done.stderr.strip()}",
            }
        if done.stderr.strip():
            result.setdefault("stderr", done.stderr.strip())
        if cpu0 is not None and cpu1 is not None and wall > 0:
            result["proxy_cpu"] = (cpu1 - cpu0) / wall
        return result


def value_of(metric: str, result: Dict[str, Any]) -> Dict[str, float]:
    if metric == "churn":
        return {
            "churn conn/s": result["cps"],
            "churn p50 ms": result["p50_ms"],
            "churn p99 ms": result["p99_ms"],
        }
    return {f"{metric} MB/s": result["mbps"]}


ROWS = (
    "download MB/s",
    "upload MB/s",
    "churn conn/s",
    "churn p50 ms",
    "churn p99 ms",
)


def fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def summarize(runs: List[Dict[str, Any]], targets: List[str]) -> Dict[str, Any]:
    """Median over the repetitions of each row, per target."""
    summary: Dict[str, Any] = {}
    for row in ROWS:
        metric = row.split()[0]
        summary[row] = {}
        for target in targets:
            mine = [r for r in runs if r["metric"] == metric and r["target"] == target]
            good = [r for r in mine if r["result"].get("ok")]
            values = [value_of(metric, r["result"])[row] for r in good]
            cpu = [r["result"]["proxy_cpu"] for r in good if "proxy_cpu" in r["result"]]
            summary[row][target] = {
                "median": statistics.median(values) if values else None,
                "runs": values,
                "ok_runs": len(good),
                "total_runs": len(mine),
                "proxy_cpu": statistics.median(cpu) if cpu else None,
            }
    for row in ROWS:
        direct = summary[row]["direct"]["median"]
        for target in targets:
            cell = summary[row][target]
            cell["ratio"] = (
                cell["median"] / direct
                if direct and cell["median"] is not None
                else None
            )
    return summary


def print_table(summary: Dict[str, Any], targets: List[str]) -> None:
    width = max(len(t) for t in targets)
    header = (
        f"{'metric':<14}  {'target':<{width}}  {'median':>8}  {'ratio':>6}  "
        f"{'proxy CPU':>9}  runs"
    )
    print(header)
    print("-" * len(header))
    for row in ROWS:
        for i, target in enumerate(targets):
            cell = summary[row][target]
            ratio = "-" if cell["ratio"] is None else f"{cell['ratio']:.2f}"
            if target == "direct":
                ratio = "1.00" if cell["median"] is not None else "-"
            cpu = "" if cell["proxy_cpu"] is None else f"{100 * cell['proxy_cpu']:.0f}%"
            runs = " ".join(fmt(v) for v in cell["runs"])
            if cell["ok_runs"] < cell["total_runs"]:
                runs += f"  ({cell['total_runs'] - cell['ok_runs']} FAILED)"
            print(
                f"{row if i == 0 else '':<14}  {target:<{width}}  "
                f"{fmt(cell['median']):>8}  {ratio:>6}  {cpu:>9}  {runs}"
            )
    print()


def git_describe() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def log_problems(proxy: Proc) -> List[str]:
    """Tracebacks and unhandled errors in a proxy's log."""
    problems = []
    try:
        lines = proxy.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return problems
    for i, line in enumerate(lines):
        if "Traceback" in line or "Unhandled" in line or "CRITICAL" in line:
            problems.append("\n".join(lines[i : i + 12]))
    return problems


# ------------------------------------------------------------------------ main

#: Seconds per measurement, and seconds for all measurements together, by
#: default and with --quick: with extra proxies, runs get shorter.
DEFAULT_RUN = {False: 3.0, True: 1.0}
DEFAULT_BUDGET = {False: 100.0, True: 22.0}


def default_duration(args: argparse.Namespace, n_targets: int) -> float:
    runs = args.repeat * len(METRICS) * n_targets
    budget = DEFAULT_BUDGET[args.quick] - 0.25 * len(METRICS) * n_targets  # warm-up
    seconds = min(DEFAULT_RUN[args.quick], budget / runs)
    return max(0.3, int(seconds * 10) / 10)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="short runs (under 30 s in all)"
    )
    p.add_argument(
        "--duration",
        type=float,
        help="seconds per measurement (default 3, or 1 with --quick; shorter when "
        "microsocks/danted are measured too, to keep the total time)",
    )
    p.add_argument(
        "--repeat", type=int, default=3, help="repetitions per measurement (median)"
    )
    p.add_argument(
        "--concurrency", type=int, default=50, help="churn: connections at once"
    )
    p.add_argument(
        "--bytes",
        type=int,
        default=0,
        help="download/upload: stop after this many bytes too (default: time only)",
    )
    p.add_argument(
        "--timeout", type=float, default=10.0, help="per-operation timeout, seconds"
    )
    p.add_argument("--json", metavar="FILE", help="write all figures to FILE as JSON")
    p.add_argument(
        "--proxy-cmd",
        metavar="CMD",
        help="command that runs the proxy under test; {port} is replaced by the "
        "port to listen on (127.0.0.1 only). Default: twistd -n --pidfile= socks5 "
        "--listen tcp:{port}:interface=127.0.0.1",
    )
    p.add_argument("--twistd", metavar="PATH", help="the twistd executable to use")
    p.add_argument(
        "--no-others",
        action="store_true",
        help="do not measure microsocks/danted even when installed",
    )
    p.add_argument("--no-pin", action="store_true", help="do not use taskset")
    args = p.parse_args(argv)
    if args.duration is not None and args.duration <= 0:
        p.error("--duration must be positive")
    if args.repeat < 1 or args.repeat < 1 or args.concurrency < 1:
        p.error("--repeat and --concurrency must be positive")
    if args.proxy_cmd and "{port}" not in args.proxy_cmd:
        p.error("--proxy-cmd must contain {port}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not sys.platform.startswith("linux"):
        raise SystemExit("bench: Linux only (epoll, /proc)")

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)

    build_loadgen()
    load_pin, proxy_pin, pinning = pin_prefixes(args.no_pin)

    if args.proxy_cmd:
        template = args.proxy_cmd

        def proxy_cmd(port: int) -> List[str]:
            return shlex.split(template.replace("{port}", str(port)))

    else:
        twistd = find_twistd(args.twistd)

        def proxy_cmd(port: int) -> List[str]:
            return [
                *twistd,
                "-n",
                "--pidfile=",
                "socks5",
                "--listen",
                f"tcp:{port}:interface={HOST}",
            ]

    others = []
    if not args.no_others:
        if shutil.which("microsocks"):
            others.append(("microsocks", microsocks_cmd))
        if shutil.which("danted"):
            others.append(("danted", danted_cmd))

    started: List[Proc] = []
    proxies: Dict[str, Proc] = {}
    report: Dict[str, Any] = {}
    t_start = time.monotonic()
    try:
        servers, ports = start_servers(load_pin)
        started.append(servers)
        proxy = start_proxy(PROXY_NAME, proxy_cmd, proxy_pin, proxy_env())
        started.append(proxy)
        proxies[PROXY_NAME] = proxy
        for name, make in others:
            try:
                other = start_proxy(name, make, proxy_pin)
            except (RuntimeError, OSError) as e:
                log(f"skipping {name}: {e}")
                continue
            started.append(other)
            proxies[name] = other
        targets = ["direct", *proxies]
        if args.duration is None:
            args.duration = default_duration(args, len(targets))
        rss_start = {name: memory(p.pid) for name, p in proxies.items()}

        print(f"twisted-socks5 benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}")
        print(f"  proxy command : {shlex.join(proxy.cmd)}")
        pids = ", ".join(f"{n} pid {p.pid}" for n, p in proxies.items())
        print(f"  proxies       : {pids}")
        print(f"  pinning       : {pinning}")
        print(
            f"  runs          : {args.repeat} x {args.duration:g} s per metric and "
            f"target, churn concurrency {args.concurrency}"
        )
        print(f"  tree          : {ROOT} ({git_describe()})")
        load = os.getloadavg()
        print(f"  load average  : {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        if load[0] > 0.5:
            print("  (other processes are busy: expect noisy figures)")
        print(flush=True)

        runner = Runner(args, load_pin)
        port_of = {"download": ports["source"], "upload": ports["sink"]}
        port_of["churn"] = ports["echo"]

        log("warming up")
        for target in targets:
            for metric in METRICS:
                runner.loadgen(
                    metric,
                    port_of[metric],
                    proxies.get(target),
                    min(0.25, args.duration),
                )

        runs: List[Dict[str, Any]] = []
        total = args.repeat * len(METRICS) * len(targets)
        for rep in range(args.repeat):
            for metric in METRICS:
                for target in targets:
                    result = runner.loadgen(
                        metric, port_of[metric], proxies.get(target), args.duration
                    )
                    runs.append(
                        {
                            "rep": rep,
                            "metric": metric,
                            "target": target,
                            "result": result,
                        }
                    )
                    status = (
                        "ok" if result.get("ok") else f"FAILED: {result.get('error')}"
                    )
                    shown = (
                        ", ".join(
                            f"{k} {fmt(v)}" for k, v in value_of(metric, result).items()
                        )
                        if "mbps" in result or "cps" in result
                        else ""
                    )
                    step = f"[{len(runs)}/{total}]"
                    log(f"  {step:>7} {metric:<8} {target:<14} {shown} {status}")

        rss_end = {name: memory(p.pid) for name, p in proxies.items()}
        summary = summarize(runs, targets)
        print_table(summary, targets)
        for name in proxies:
            start, end = rss_start[name], rss_end[name]
            code = proxies[name].proc.poll() if proxies[name].proc else None
            if not end or code is not None:
                print(f"{name}: DIED during the runs (exit status {code}), no RSS")
                continue
            pid = proxies[name].pid
            print(
                f"{name} RSS (pid {pid}): {end.get('VmRSS', 0) / 1024:.1f} MiB "
                f"after the runs (at start {start.get('VmRSS', 0) / 1024:.1f} MiB, "
                f"peak {end.get('VmHWM', 0) / 1024:.1f} MiB)"
            )
            if "tree_VmRSS" in end:
                print(
                    f"  (with its {end['tree_processes'] - 1} child process(es): "
                    f"{end['tree_VmRSS'] / 1024:.1f} MiB RSS summed)"
                )
        failures = [r for r in runs if not r["result"].get("ok")]
        churn_errors = sum(
            r["result"].get("errors", 0) for r in runs if r["metric"] == "churn"
        )
        # The exit status is about the proxy under test (and the baseline).
        ours = ("direct", PROXY_NAME)
        our_failures = [r for r in failures if r["target"] in ours]
        if failures:
            print(f"\n{len(failures)} run(s) FAILED:")
            for r in failures:
                print(
                    f"  {r['metric']} via {r['target']} (rep {r['rep'] + 1}): "
                    f"{r['result'].get('error')}"
                )
        if churn_errors:
            by_target = {
                t: sum(
                    r["result"].get("errors", 0)
                    for r in runs
                    if r["metric"] == "churn" and r["target"] == t
                )
                for t in targets
            }
            shown = ", ".join(f"{t} {n}" for t, n in by_target.items() if n)
            print(f"churn: failed connections: {shown}")
        problems = {name: log_problems(p) for name, p in proxies.items()}
        for name, found in problems.items():
            if found:
                print(
                    f"\n{name}: {len(found)} traceback(s)/unhandled error(s) in "
                    f"{proxies[name].log_path}; first:\n{found[0]}"
                )
        elapsed = time.monotonic() - t_start
        print(f"\ntotal time {elapsed:.0f} s; logs in {BUILD}")

        report = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "config": {
                "duration": args.duration,
                "repeat": args.repeat,
                "concurrency": args.concurrency,
                "bytes": args.bytes,
                "proxy_cmd": proxy.cmd,
                "pinning": pinning,
            },
            "environment": {
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "tree": str(ROOT),
                "git": git_describe(),
                "loadavg_start": load,
                "loadavg_end": os.getloadavg(),
            },
            "targets": targets,
            "summary": summary,
            "rss_kb": {"start": rss_start, "end": rss_end},
            "runs": runs,
            "proxy_log_problems": problems,
            "elapsed_s": elapsed,
        }
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
            print(f"JSON written to {args.json}")
        return 1 if our_failures or problems.get(PROXY_NAME) else 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        log(f"bench: {e}")
        return 2
    finally:
        for proc in reversed(started):
            code = proc.stop()
            if proc.name == PROXY_NAME and code not in (
                0,
                None,
                -signal.SIGTERM,
                -signal.SIGINT,
            ):
                log(f"{proc.name} exited with {code}; log: {proc.log_path}")


if __name__ == "__main__":
    sys.exit(main())
