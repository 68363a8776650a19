#!/usr/bin/env python3
"""
Benchmark twisted-socks5 against a direct connection (and microsocks, danted
and pproxy when they are installed), everything the performance issue asks for in one
run: single-stream download and upload, 8-stream download, connection churn
with its latency, 64-byte round trips over one tunnel (proxy on its own core,
and everything on one core), UDP ASSOCIATE echo, RSS per idle tunnel with
5,000 open, and churn with --workers 2 against one worker.  Twisted's own
port forwarder (twisted.protocols.portforward, bench/forward.py: no SOCKS) is
measured in the same run for the TCP rows, as a reference for the relay.

    python bench/bench.py                 # about 4 minutes
    python bench/bench.py --quick         # under 1 minute
    python bench/bench.py --json out.json

Everything listens on and connects to 127.0.0.0/8 only.  The load generator
and the test servers are one C program (bench/loadgen.c), built at run time
into bench/_build/.  See bench/README.md for what the figures mean.
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
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUILD = BENCH / "_build"
LOADGEN_SRC = BENCH / "loadgen.c"
LOADGEN = BUILD / "loadgen"
HOST = "127.0.0.1"  # loopback only, always

PROXY_NAME = "twisted-socks5"
WORKERS_NAME = f"{PROXY_NAME} --workers 2"
SERVER_PORTS = {"source", "sink", "echo", "pecho", "udp"}
#: Twisted's port forwarder (no SOCKS): its script, the servers it forwards to
#: (one listening port each), and the measurements it takes part in.
FORWARD_NAME = "portforward (Twisted, no SOCKS)"
FORWARD_SCRIPT = BENCH / "forward.py"
FORWARD_SERVERS = ("source", "sink", "echo", "pecho")
FORWARD_KEYS = ("download", "upload", "streams", "churn", "rtt", "rtt_same")


# --------------------------------------------------------------------- helpers


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def socks_ready(port: int) -> bool:
    """Whether a SOCKS5 server answers a no-auth greeting on the port."""
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as s:
            s.sendall(b"\x05\x01\x00")
            return s.recv(2) == b"\x05\x00"
    except OSError:
        return False


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if this script dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def raise_nofile(needed: int) -> str:
    """
    Raise RLIMIT_NOFILE (inherited by every child) to at least ``needed``
    when allowed: a spliced tunnel can hold 6 descriptors in the proxy (two
    sockets, two pipes), so 5,000 may need 30,000.  Raising the hard limit
    needs CAP_SYS_RESOURCE; without it the soft limit goes up to the hard one.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(needed, soft)
    with contextlib.suppress(OSError, ValueError):
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
        want = min(want, nr_open)
    if hard != resource.RLIM_INFINITY and hard < want:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))  # root only
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    note = f"{soft}"
    if soft < needed:
        note += f" (hard limit; {needed} wanted for the idle tunnels at worst)"
    return note


@dataclass
class Pinning:
    """Where things run: taskset prefixes and CPU sets for each placement."""

    load: List[str] = field(default_factory=list)  # taskset prefix, load side
    proxy: List[str] = field(default_factory=list)  # taskset prefix, proxies
    load_cpus: Optional[set] = None
    proxy_cpus: Optional[set] = None
    all_cpus: set = field(default_factory=set)
    description: str = "off"

    @property
    def on(self) -> bool:
        return bool(self.proxy)


def make_pinning(no_pin: bool) -> Pinning:
    cpus = sorted(os.sched_getaffinity(0))
    pin = Pinning(all_cpus=set(cpus))
    taskset = shutil.which("taskset")
    if no_pin:
        pin.description = "off (--no-pin)"
    elif taskset is None:
        pin.description = "off (no taskset)"
    elif len(cpus) < 2:
        pin.description = "off (one CPU)"
    else:
        load, proxy = cpus[0], cpus[1]
        pin.load, pin.proxy = [taskset, "-c", str(load)], [taskset, "-c", str(proxy)]
        pin.load_cpus, pin.proxy_cpus = {load}, {proxy}
        pin.description = (
            f"load generator and servers on CPU {load}, proxies on CPU {proxy} "
            f"(same-core rows: all on CPU {proxy}; unpinned rows: anywhere, "
            f"{len(cpus)} CPUs)"
        )
    return pin


def build_loadgen() -> Path:
    BUILD.mkdir(exist_ok=True)
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= LOADGEN_SRC.stat().st_mtime:
        return LOADGEN
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("bench: no C compiler (cc or gcc) on PATH")
    tmp = BUILD / f"loadgen.{os.getpid()}.tmp"
    cmd = [cc, "-O2", "-Wall", "-Wextra", "-o", str(tmp), str(LOADGEN_SRC)]
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


def proxy_command(twistd: List[str], port: int) -> List[str]:
    """``twistd socks5`` in the foreground on 127.0.0.1:``port``."""
    return [
        *twistd,
        "-n",
        "--pidfile=",
        # The cheaper text observer the deployment docs recommend; standard
        # output goes to the target's log file.
        "--logger",
        "twisted_socks5.logs.text_observer",
        "socks5",
        "--listen",
        f"tcp:{port}:interface={HOST}",
    ]


def proxy_help(twistd: List[str]) -> str:
    """``twistd socks5 --help``: which flags this proxy has."""
    try:
        return subprocess.run(
            [*twistd, "socks5", "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            env=proxy_env(),
            cwd=ROOT,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def splice_flags(twistd: List[str]) -> List[str]:
    """The relay-path flags ``twistd socks5 --help`` offers, of --splice/--no-splice."""
    found = set(re.findall(r"(--(?:no-)?splice)(?![\w-])", proxy_help(twistd)))
    return [flag for flag in ("--splice", "--no-splice") if flag in found]


def speaks_http(twistd: List[str]) -> bool:
    """Whether ``twistd socks5`` has ``--protocols`` (the HTTP CONNECT rows)."""
    return "--protocols" in proxy_help(twistd)


def proc_status(pid: int) -> Dict[str, int]:
    """VmRSS and VmHWM of a process, in kB."""
    out = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def pss_kb(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> Optional[List[str]]:
    """/proc/PID/stat fields after the command name (state is [0], ppid [1])."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(pid: int) -> List[int]:
    """pid and its live descendants (danted and --workers fork)."""
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


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy() -> float:
    """CPU seconds all CPUs have been busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def memory(pid: int) -> Dict[str, int]:
    """VmRSS/VmHWM of the process, and RSS and PSS summed over its tree, in kB."""
    out = proc_status(pid)
    tree = process_tree(pid)
    if out and len(tree) > 1:
        out["tree_processes"] = len(tree)
        out["tree_VmRSS"] = sum(proc_status(p).get("VmRSS", 0) for p in tree)
        out["tree_Pss"] = sum(pss_kb(p) for p in tree)
    return out


def footprint_kb(pid: int) -> Tuple[int, str]:
    """
    The proxy's memory for the idle-tunnel figure: VmRSS of a single process;
    for a process tree (danted), PSS summed, so shared pages count once.
    """
    tree = process_tree(pid)
    if len(tree) == 1:
        return proc_status(pid).get("VmRSS", 0), "VmRSS"
    return sum(pss_kb(p) for p in tree), f"PSS of {len(tree)} processes"


def set_affinity(pid: int, cpus: Optional[set]) -> None:
    """Move every thread of a process tree to ``cpus`` (None: leave it)."""
    if not cpus:
        return
    for p in process_tree(pid):
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{p}/task")]
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)


def fd_count(pid: int) -> int:
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{p}/fd"))
    return total


# ------------------------------------------------------------------- processes


class Proc:
    """A child process with its output in a log file under bench/_build/."""

    def __init__(self, name: str, cmd: List[str], env: Optional[dict] = None):
        self.name = name
        self.cmd = cmd
        self.env = env
        self.log_path = BUILD / f"{name.replace(' ', '_')}.log"
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

    def wait_ready(self, port: int, tries: int = 150, delay: float = 0.1) -> None:
        """Until the SOCKS greeting is answered ``streak`` times in a row."""
        assert self.proc is not None
        streak = 0
        for _ in range(tries):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before "
                    f"accepting on {HOST}:{port}:\n{self.log_tail()}"
                )
            if socks_ready(port):
                streak += 1
                # --workers: every worker's socket must answer, not only one.
                if streak >= 8:
                    self.port = port
                    return
                continue
            streak = 0
            time.sleep(delay)
        raise RuntimeError(
            f"{self.name} not answering on {HOST}:{port} after {tries} tries:\n"
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


def start_servers(pin: Pinning) -> Tuple[Proc, Dict[str, int]]:
    servers = Proc("servers", [*pin.load, str(LOADGEN), "serve"])
    # stdin stays open: the servers exit when it closes (if this script dies).
    servers.start(stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    assert servers.proc is not None and servers.proc.stdout is not None
    line = servers.proc.stdout.readline().decode()
    ports = {}
    for item in line.split():
        key, _, value = item.partition("=")
        ports[key] = int(value)
    if set(ports) != SERVER_PORTS:
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


CommandFactory = Callable[[int], List[str]]


@dataclass
class Target:
    """A way to reach the servers: directly, or through a proxy."""

    name: str
    make_cmd: Optional[CommandFactory] = None  # None: direct
    env: Optional[Dict[str, str]] = None
    pinned: bool = True  # started on the proxy CPU
    udp: bool = False  # measured for UDP ASSOCIATE
    http: bool = False  # measured for HTTP CONNECT
    ours: bool = False  # a twisted-socks5 target: its failures fail the run
    splice: Optional[bool] = None  # relay path, for twisted-socks5
    idle_cmd: Optional[CommandFactory] = None  # for the fresh idle-tunnel proxies
    proc: Optional[Proc] = None
    # A port forwarder (no SOCKS): its command, to which "name=port,..." of the
    # servers is appended; once started, its listening port for each server.
    forward: Optional[List[str]] = None
    forward_ports: Optional[Dict[str, int]] = None

    @property
    def direct(self) -> bool:
        return self.make_cmd is None and self.forward is None


def start_proxy(target: Target, pin: Pinning, idle: bool = False) -> Proc:
    """Start a proxy on a free port; a lost race for the port is retried."""
    make = (target.idle_cmd if idle else None) or target.make_cmd
    assert make is not None
    last: Optional[Exception] = None
    prefix = pin.proxy if target.pinned else []
    for _ in range(3):
        port = free_port()
        name = f"{target.name} idle" if idle else target.name
        proxy = Proc(name, [*prefix, *make(port)], target.env)
        proxy.start(stdin=subprocess.DEVNULL)
        try:
            proxy.wait_ready(port)
            return proxy
        except RuntimeError as e:
            last = e
            proxy.stop()
    raise RuntimeError(str(last))


#: What forward_works sends through the forwarder to each server, and what it
#: expects back: the pattern's first byte from the source; an empty upload's
#: trailer from the sink (0 bytes, ok); the 64-byte churn message from the
#: echo server (which then closes); one byte from the persistent echo.
FORWARD_PROBES = {
    "source": (b"", b"\x00"),
    "sink": (b"\x00" * 4, b"\x00" * 8 + b"\x01"),
    "echo": (bytes(range(64)), bytes(range(64))),
    "pecho": (b"\x07", b"\x07"),
}


def forward_works(server: str, port: int) -> bool:
    """
    Whether the forwarder's port for ``server`` accepts a connection and
    reaches that server, end to end (a wrong mapping would fail here, not
    halfway through the runs).
    """
    send, expect = FORWARD_PROBES[server]
    try:
        with socket.create_connection((HOST, port), timeout=2) as s:
            if send:
                s.sendall(send)
            got = b""
            while len(got) < len(expect):
                chunk = s.recv(len(expect) - len(got))
                if not chunk:
                    break
                got += chunk
            return got == expect
    except OSError:
        return False


def start_forwarder(target: Target, pin: Pinning, ports: Dict[str, int]) -> Proc:
    """
    Start bench/forward.py on the proxy CPU, forwarding to the test servers;
    ready once it has said its ports and each one reaches its server.
    """
    assert target.forward is not None
    mapping = ",".join(f"{server}={ports[server]}" for server in FORWARD_SERVERS)
    proc = Proc("portforward", [*pin.proxy, *target.forward, mapping], target.env)
    # stdin stays open: the forwarder exits when it closes (if this script dies).
    proc.start(stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    assert proc.proc is not None
    try:
        said, _ = read_json_line(proc.proc, time.monotonic() + 30)
        if (
            not isinstance(said, dict)
            or set(said) != set(FORWARD_SERVERS)
            or not all(isinstance(v, int) for v in said.values())
        ):
            raise RuntimeError(
                f"{proc.name} said {said!r} (exit status {proc.proc.poll()}):\n"
                f"{proc.log_tail()}"
            )
        for server in FORWARD_SERVERS:
            for _ in range(20):
                if proc.proc.poll() is not None:
                    raise RuntimeError(
                        f"{proc.name} exited with {proc.proc.returncode}:\n"
                        f"{proc.log_tail()}"
                    )
                if forward_works(server, said[server]):
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError(
                    f"{proc.name}: {HOST}:{said[server]} does not reach the "
                    f"{server} server:\n{proc.log_tail()}"
                )
    except BaseException:
        proc.stop()
        raise
    target.forward_ports = said
    return proc


def twisted_python(args: argparse.Namespace) -> Optional[str]:
    """
    A Python that can import Twisted, to run forward.py: the one that runs
    twistd (same Twisted as the proxy) when it can be told, else this one.
    """
    candidates: List[str] = []
    try:
        twistd = find_twistd(args.twistd)
    except SystemExit:
        twistd = []
    if len(twistd) == 3 and twistd[1] == "-c":
        candidates.append(twistd[0])
    elif twistd:
        first = b""
        with contextlib.suppress(OSError), open(twistd[0], "rb") as f:
            first = f.readline(256)
        parts = first[2:].decode(errors="replace").split()
        if first.startswith(b"#!") and parts:
            if Path(parts[0]).name == "env" and len(parts) > 1:
                parts = [shutil.which(parts[1]) or ""]
            candidates.append(parts[0])
    if importlib.util.find_spec("twisted") is not None:
        candidates.append(sys.executable)
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def danted_cmd(conf_name: str) -> CommandFactory:
    def make(port: int) -> List[str]:
        conf = BUILD / conf_name
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
            f"  command: connect udpassociate udpreply\n  log: error\n}}\n"
        )
        return [str(shutil.which("danted")), "-f", str(conf)]

    return make


def microsocks_cmd(port: int) -> List[str]:
    return [str(shutil.which("microsocks")), "-i", HOST, "-p", str(port)]


def find_pproxy() -> Optional[str]:
    """pproxy (PyPI, asyncio) on PATH or next to this Python, if installed."""
    beside = Path(sys.executable).parent / "pproxy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("pproxy")


def pproxy_cmd(port: int) -> List[str]:
    return [str(find_pproxy()), "-l", f"socks5://{HOST}:{port}"]


# ---------------------------------------------------------------- measurements


@dataclass
class Measure:
    """One loadgen mode, run for each of its targets, ``--repeat`` times."""

    key: str
    mode: str
    server: str  # which test server (SERVER_PORTS)
    rows: List[Tuple[str, str]]  # (row label, field of the loadgen JSON)
    placement: str = "split"  # split, same (one core) or unpinned
    kind: str = "tcp"  # which targets: tcp, udp, workers
    args: List[str] = field(default_factory=list)


def measures(args: argparse.Namespace) -> List[Measure]:
    conc = ["-c", str(args.concurrency)]
    nbytes = ["-b", str(args.bytes)] if args.bytes else []
    all_measures = [
        Measure("download", "download", "source", [("download MB/s", "mbps")]),
        Measure("upload", "upload", "sink", [("upload MB/s", "mbps")], args=nbytes),
        Measure(
            "streams",
            "download",
            "source",
            [(f"download {args.streams} streams MB/s", "mbps")],
            args=["-n", str(args.streams), *nbytes],
        ),
        Measure(
            "churn",
            "churn",
            "echo",
            [
                ("churn conn/s", "cps"),
                ("churn p50 ms", "p50_ms"),
                ("churn p99 ms", "p99_ms"),
            ],
            args=conc,
        ),
        Measure(
            "rtt",
            "rtt",
            "pecho",
            [("RTT p50 µs", "p50_us"), ("RTT p99 µs", "p99_us")],
            args=["-s", "64"],
        ),
        Measure(
            "rtt_same",
            "rtt",
            "pecho",
            [("RTT same core p50 µs", "p50_us"), ("RTT same core p99 µs", "p99_us")],
            placement="same",
            args=["-s", "64"],
        ),
        Measure(
            "udp",
            "udp",
            "udp",
            [("UDP datagrams/s", "dgps"), ("UDP loss %", "loss_pct")],
            kind="udp",
            args=["-s", "64", "-w", str(args.udp_window)],
        ),
        # The same tunnels opened with an HTTP CONNECT (loadgen -H), through
        # the proxies that speak HTTP (--protocols socks5,http).
        Measure(
            "http_download",
            "download",
            "source",
            [("HTTP CONNECT download MB/s", "mbps")],
            kind="http",
            args=["-H"],
        ),
        Measure(
            "http_upload",
            "upload",
            "sink",
            [("HTTP CONNECT upload MB/s", "mbps")],
            kind="http",
            args=["-H", *nbytes],
        ),
        Measure(
            "workers",
            "churn",
            "echo",
            [("churn unpinned conn/s", "cps")],
            placement="unpinned",
            kind="workers",
            args=conc,
        ),
    ]
    return [m for m in all_measures if m.key in args.only]


IDLE_ROW = "idle KiB/tunnel"


class Runner:
    def __init__(
        self,
        args: argparse.Namespace,
        pin: Pinning,
        servers: Proc,
        ports: Dict[str, int],
    ):
        self.args = args
        self.pin = pin
        self.servers = servers
        self.ports = ports

    def _placement(self, measure: Measure, target: Target) -> List[str]:
        """Move things for the measurement; the load generator's prefix."""
        pin = self.pin
        if not pin.on:
            return []
        if measure.placement == "same":
            set_affinity(self.servers.pid, pin.proxy_cpus)
            return pin.proxy
        if measure.placement == "unpinned":
            set_affinity(self.servers.pid, pin.all_cpus)
            if target.proc is not None and target.pinned:
                set_affinity(target.proc.pid, pin.all_cpus)
            return []
        return pin.load

    def _restore(self, measure: Measure, target: Target) -> None:
        if not self.pin.on or measure.placement == "split":
            return
        set_affinity(self.servers.pid, self.pin.load_cpus)
        if target.proc is not None and target.pinned:
            set_affinity(target.proc.pid, self.pin.proxy_cpus)

    def loadgen(
        self, measure: Measure, target: Target, seconds: float
    ) -> Dict[str, Any]:
        prefix = self._placement(measure, target)
        try:
            return self._run(measure, target, seconds, prefix)
        finally:
            self._restore(measure, target)

    def _run(
        self, measure: Measure, target: Target, seconds: float, prefix: List[str]
    ) -> Dict[str, Any]:
        cmd = [*prefix, str(LOADGEN), "-t", f"{seconds:g}"]
        cmd += ["-T", f"{self.args.timeout:g}"]
        proxy = target.proc
        port = self.ports[measure.server]
        if target.forward_ports is not None:  # a forwarder: its port, no SOCKS
            port = target.forward_ports[measure.server]
        elif proxy is not None:
            cmd += ["-p", str(proxy.port)]
        cmd += [*measure.args, measure.mode, str(port)]
        cpu0 = cpu_seconds(proxy.pid) if proxy else None
        serv0, gen0 = cpu_seconds(self.servers.pid), children_cpu()
        busy0, self0 = machine_busy(), own_cpu()
        t0 = time.monotonic()
        limit = seconds + 3 * self.args.timeout + 30
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"loadgen still running after {limit:g} s"}
        wall = time.monotonic() - t0
        cpu1 = cpu_seconds(proxy.pid) if proxy else None
        serv1, gen1 = cpu_seconds(self.servers.pid), children_cpu()
        busy1, self1 = machine_busy(), own_cpu()
        try:
            result: Dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            result = {
                "ok": False,
                "error": f"loadgen exited {done.returncode}: {done.stderr.strip()}",
            }
        if done.stderr.strip():
            result.setdefault("stderr", done.stderr.strip())
        result["wall"] = wall
        if cpu0 is not None and cpu1 is not None and wall > 0:
            result["proxy_cpu"] = (cpu1 - cpu0) / wall
        if serv0 is not None and serv1 is not None and wall > 0:
            result["load_cpu"] = ((serv1 - serv0) + (gen1 - gen0)) / wall
            # Everything else the machine did meanwhile: other processes.
            ours = (serv1 - serv0) + (gen1 - gen0) + (self1 - self0)
            if cpu0 is not None and cpu1 is not None:
                ours += cpu1 - cpu0
            result["others_cpu"] = max(0.0, (busy1 - busy0 - ours) / wall)
        return result


def read_json_line(
    proc: subprocess.Popen, deadline: float
) -> Tuple[Optional[dict], bytes]:
    """
    One JSON line from a child's stdout, waiting at most until ``deadline``;
    and what was read after it.
    """
    assert proc.stdout is not None
    buf = b""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        if b"\n" in buf:
            line, _, rest = buf.partition(b"\n")
            try:
                return json.loads(line), rest
            except ValueError:
                return {"ok": False, "error": f"loadgen said {line!r}"}, rest
    return None, buf


def idle_once(
    target: Target, pin: Pinning, args: argparse.Namespace, port: int
) -> Dict[str, Any]:
    """
    A fresh proxy: warm it up with 100 tunnels, take its memory, open
    ``--tunnels`` tunnels (each checked with a 1-byte echo), take its memory
    again, then end them.  Returns the figures (KiB per tunnel).
    """
    result: Dict[str, Any] = {"ok": False}
    proxy = start_proxy(target, pin, idle=True)
    gen: Optional[subprocess.Popen] = None
    base = [*pin.load, str(LOADGEN), "-T", f"{args.timeout:g}", "-p", str(proxy.port)]
    try:
        warm = subprocess.run(
            [*base, "-t", "1", "-n", "100", "idle", str(port)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=3 * args.timeout + 30,
        )
        if warm.returncode != 0:
            result["error"] = f"warm-up: {warm.stdout.strip().splitlines()[-1:]}"
            return result
        time.sleep(0.3)
        before, kind = footprint_kb(proxy.pid)
        fds_before = fd_count(proxy.pid)
        t0 = time.monotonic()
        # The tunnels are held until stdin closes (at most 120 s).
        gen = subprocess.Popen(
            [*base, "-t", "120", "-n", str(args.tunnels), "idle", str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        deadline = t0 + 3 * args.timeout + args.tunnels / 50 + 30
        opened, early = read_json_line(gen, deadline)
        if opened is None:
            result["error"] = "the load generator did not report its open tunnels"
            return result
        time.sleep(0.5)  # let the proxy finish with the last ones
        after, kind = footprint_kb(proxy.pid)
        fds_after = fd_count(proxy.pid)
        count = int(opened.get("opened", 0))
        result.update(
            {
                "before_kb": before,
                "after_kb": after,
                "measured": kind,
                "tunnels": count,
                "open_seconds": opened.get("seconds"),
                "open_p50_ms": opened.get("open_p50_ms"),
                "open_p99_ms": opened.get("open_p99_ms"),
                "sources": opened.get("sources"),
                "proxy_fds_per_tunnel": (fds_after - fds_before) / count
                if count
                else None,
                "kib_per_tunnel": (after - before) / count if count else None,
            }
        )
        try:  # closes stdin: the generator ends the tunnels and reports
            rest, _ = gen.communicate(timeout=3 * args.timeout + 30)
        except subprocess.TimeoutExpired:
            gen.kill()
            gen.communicate()
            result["error"] = "the load generator did not end its tunnels"
            return result
        text = early + (rest or b"")
        lines = text.decode(errors="replace").strip().splitlines()
        end = json.loads(lines[-1]) if lines else {}
        result["end"] = end
        result["ok"] = bool(end.get("ok")) and count == args.tunnels
        if not result["ok"]:
            error = end.get("error") or opened.get("error") or "failed"
            partial = result["kib_per_tunnel"]
            result["error"] = (
                f"{count} of {args.tunnels} tunnels opened"
                + (f" ({partial:.1f} KiB each)" if partial is not None else "")
                + f": {error}"
            )
        return result
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        result["error"] = str(e)
        return result
    finally:
        if gen is not None and gen.poll() is None:
            gen.kill()
            gen.wait()
        if proxy.proc is not None and proxy.proc.poll() is not None:
            result["ok"] = False
            result["error"] = f"proxy died (exit {proxy.proc.returncode})"
        proxy.stop()  # first: its log is complete only once it has exited
        problems = log_problems(proxy)
        if problems:
            result["ok"] = False
            result["error"] = f"traceback in {proxy.log_path}:\n{problems[0]}"
        elif not result["ok"]:
            text = log_text(proxy)
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            full = re.search(r"server full \(\d+ connections\)", text)
            if full:
                result["error"] = str(result.get("error")) + (
                    f"; the proxy said {full.group(0)!r} (its connection limit, "
                    f"from RLIMIT_NOFILE {soft} unless --max-connections)"
                )
            elif "EMFILE" in text:
                result["error"] = str(result.get("error")) + (
                    f"; the proxy ran out of file descriptors (EMFILE, "
                    f"RLIMIT_NOFILE {soft})"
                )


# --------------------------------------------------------------------- summary


def fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def summarize(
    runs: List[Dict[str, Any]], plan: List[Tuple[str, str, List[str]]]
) -> Dict[str, Any]:
    """Median over the repetitions of each row, per target; ratio to direct."""
    summary: Dict[str, Any] = {}
    for row, fieldname, targets in plan:
        summary[row] = {}
        for target in targets:
            mine = [r for r in runs if row in r["rows"] and r["target"] == target]
            good = [r for r in mine if r["result"].get("ok")]
            counted = [r for r in good if r["result"].get(fieldname) is not None]
            values = [float(r["result"][fieldname]) for r in counted]
            noisy = [r["result"].get("others_cpu", 0) > NOISY for r in counted]
            cells = {
                key: [r["result"][key] for r in good if key in r["result"]]
                for key in ("proxy_cpu", "load_cpu")
            }
            summary[row][target] = {
                "median": statistics.median(values) if values else None,
                "runs": values,
                "noisy": noisy,
                "ok_runs": len(good),
                "total_runs": len(mine),
                **{k: statistics.median(v) if v else None for k, v in cells.items()},
            }
        direct = summary[row].get("direct", {}).get("median")
        for target in targets:
            cell = summary[row][target]
            cell["ratio"] = (
                cell["median"] / direct
                if direct and cell["median"] is not None
                else None
            )
    return summary


def goals(summary: Dict[str, Any], splice_target: Optional[str]) -> None:
    """The issue's targets, checked where they apply (cell["goal"])."""

    def check(row: str, target: str, text: str, ok: Optional[bool]) -> None:
        cell = summary.get(row, {}).get(target)
        if cell is None:
            return
        verdict = "-" if ok is None else ("ok" if ok else "MISS")
        cell["goal"] = f"{text} {verdict}"
        cell["goal_met"] = ok

    for row in summary:
        for target, cell in summary[row].items():
            ours = target.startswith(PROXY_NAME) and target != WORKERS_NAME
            ratio, median = cell["ratio"], cell["median"]
            if row in ("download MB/s", "upload MB/s"):
                if splice_target is None and target == PROXY_NAME:
                    check(row, target, "≥0.85× (splice)", None)
                elif target == splice_target:
                    check(row, target, "≥0.85×", ratio and ratio >= 0.85)
            elif row == "churn conn/s" and ours:
                check(row, target, "≥0.35×", None if ratio is None else ratio >= 0.35)
            elif row == "RTT same core p50 µs" and ours:
                check(row, target, "≤50 µs", None if median is None else median <= 50)
            elif row == IDLE_ROW and ours:
                check(row, target, "≤10 KiB", None if median is None else median <= 10)
            elif row == "UDP datagrams/s" and ours:
                dante = summary[row].get("danted", {}).get("median")
                check(
                    row,
                    target,
                    "≥danted",
                    None if dante is None or median is None else median >= dante,
                )
            elif row == "churn unpinned conn/s" and target == WORKERS_NAME:
                one = summary[row].get(PROXY_NAME, {}).get("median")
                if one and median is not None:
                    cell["goal"] = f"×{median / one:.2f} vs 1"


def print_table(summary: Dict[str, Any], plan: List[Tuple[str, str, List[str]]]):
    names = [t for _, _, targets in plan for t in targets]
    width = max(len(t) for t in names)
    label = max(len(row) for row, _, _ in plan)
    header = (
        f"{'metric':<{label}}  {'target':<{width}}  {'median':>8}  {'ratio':>6}  "
        f"{'proxy CPU':>9}  {'load CPU':>8}  {'goal':<13}  runs"
    )
    print(header)
    print("-" * len(header))
    for row, _, targets in plan:
        for i, target in enumerate(targets):
            cell = summary[row][target]
            ratio = "-" if cell["ratio"] is None else f"{cell['ratio']:.2f}"
            if target == "direct":
                ratio = "1.00" if cell["median"] is not None else "-"
            cpu = "" if cell["proxy_cpu"] is None else f"{100 * cell['proxy_cpu']:.0f}%"
            load = "" if cell["load_cpu"] is None else f"{100 * cell['load_cpu']:.0f}%"
            runs = " ".join(
                fmt(v) + ("*" if noisy else "")
                for v, noisy in zip(cell["runs"], cell["noisy"])
            )
            if cell["ok_runs"] < cell["total_runs"]:
                runs += f"  ({cell['total_runs'] - cell['ok_runs']} FAILED)"
            print(
                f"{row if i == 0 else '':<{label}}  {target:<{width}}  "
                f"{fmt(cell['median']):>8}  {ratio:>6}  {cpu:>9}  {load:>8}  "
                f"{cell.get('goal', ''):<13}  {runs}".rstrip()
            )
    print()


def git_describe() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def log_text(proxy: Proc) -> str:
    try:
        return proxy.log_path.read_text(errors="replace")
    except OSError:
        return ""


def log_problems(proxy: Proc) -> List[str]:
    """Tracebacks and unhandled errors in a proxy's log."""
    problems: List[str] = []
    lines = log_text(proxy).splitlines()
    for i, line in enumerate(lines):
        if "Traceback" in line or "Unhandled" in line or "CRITICAL" in line:
            problems.append("\n".join(lines[i : i + 12]))
    return problems


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


# ------------------------------------------------------------------------ main

#: Seconds per timed measurement at most, and seconds for all the timed runs
#: together (warm-up included), by default and with --quick.
DEFAULT_RUN = {False: 3.0, True: 0.3}
DEFAULT_BUDGET = {False: 150.0, True: 28.0}
#: Seconds each loadgen run costs beyond its duration (start, /proc readings).
RUN_OVERHEAD = 0.1
WARMUP = 0.2
#: A run during which other processes used more than this share of a CPU.
NOISY = 0.25
MEASURE_KEYS = (
    "download",
    "upload",
    "streams",
    "churn",
    "rtt",
    "rtt_same",
    "udp",
    "http_download",
    "http_upload",
)
ALL_KEYS = (*MEASURE_KEYS, "workers", "idle")


def default_duration(args: argparse.Namespace, runs: int, warmups: int) -> float:
    budget = DEFAULT_BUDGET[args.quick] - warmups * (WARMUP + RUN_OVERHEAD)
    seconds = budget / max(1, runs) - RUN_OVERHEAD
    seconds = min(DEFAULT_RUN[args.quick], seconds)
    return max(0.2, int(seconds * 20) / 20)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="short runs, one idle-tunnel round, twisted-socks5 only for it "
        "(under 1 minute)",
    )
    p.add_argument(
        "--duration",
        type=float,
        help="seconds per timed measurement (default: what fits the time budget, "
        "at most 3, or 0.3 with --quick)",
    )
    p.add_argument(
        "--repeat", type=int, default=3, help="repetitions per measurement (median)"
    )
    p.add_argument(
        "--concurrency", type=int, default=50, help="churn: connections at once"
    )
    p.add_argument(
        "--streams", type=int, default=8, help="streams of the multi-stream download"
    )
    p.add_argument(
        "--tunnels", type=int, default=5000, help="idle tunnels for the RSS figure"
    )
    p.add_argument(
        "--udp-window", type=int, default=32, help="UDP datagrams in flight at most"
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
    p.add_argument(
        "--only",
        metavar="LIST",
        default=",".join(ALL_KEYS),
        help=f"comma-separated measurements to run, of: {', '.join(ALL_KEYS)}",
    )
    p.add_argument("--json", metavar="FILE", help="write all figures to FILE as JSON")
    p.add_argument(
        "--proxy-cmd",
        metavar="CMD",
        help="command that runs the proxy under test; {port} is replaced by the "
        "port to listen on (127.0.0.1 only); '--workers 2' is appended for the "
        "workers row. Default: twistd -n --pidfile= --logger "
        "twisted_socks5.logs.text_observer socks5 "
        "--listen tcp:{port}:interface=127.0.0.1",
    )
    p.add_argument("--twistd", metavar="PATH", help="the twistd executable to use")
    p.add_argument(
        "--no-others",
        action="store_true",
        help="do not measure microsocks, danted, pproxy (even when installed) "
        "or Twisted's "
        "portforward",
    )
    p.add_argument("--no-pin", action="store_true", help="do not use taskset")
    args = p.parse_args(argv)
    if args.duration is not None and args.duration <= 0:
        p.error("--duration must be positive")
    if min(args.repeat, args.concurrency, args.streams, args.tunnels) < 1:
        p.error("--repeat, --concurrency, --streams and --tunnels must be positive")
    if args.udp_window < 1:
        p.error("--udp-window must be positive")
    if args.proxy_cmd and "{port}" not in args.proxy_cmd:
        p.error("--proxy-cmd must contain {port}")
    only = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in only if k not in ALL_KEYS]
    if unknown or not only:
        p.error(f"--only: unknown {unknown}; use {', '.join(ALL_KEYS)}")
    args.only = only
    return args


def build_targets(
    args: argparse.Namespace, pin: Pinning
) -> Tuple[List[Target], str, Optional[str]]:
    """
    The targets: direct, twisted-socks5 (and its other relay path when twistd
    has a splice flag), --workers 2, Twisted's portforward (for the TCP rows),
    microsocks, danted and pproxy when installed.
    Returns them, a description of the relay paths, and the splice target.
    """
    env = proxy_env()
    if args.proxy_cmd:
        template = args.proxy_cmd

        def base(port: int) -> List[str]:
            return shlex.split(template.replace("{port}", str(port)))

        flags: List[str] = []
        http = False
    else:
        twistd = find_twistd(args.twistd)

        def base(port: int) -> List[str]:
            return proxy_command(twistd, port)

        flags = splice_flags(twistd)
        http = speaks_http(twistd)

    def with_flags(*extra: str) -> CommandFactory:
        if http:  # SOCKS5 clients pay nothing for it (the sniff is on errors)
            extra = (*extra, "--protocols", "socks5,http")
        return lambda port: [*base(port), *extra]

    targets = [Target("direct")]
    splice_target: Optional[str] = None
    if flags == ["--no-splice"]:  # splice by default
        paths = "splice by default; --no-splice also measured"
        main = Target(PROXY_NAME, with_flags(), env, udp=True, ours=True, splice=True)
        other = Target(f"{PROXY_NAME} --no-splice", with_flags("--no-splice"), env)
        other.ours, other.splice = True, False
        splice_target = PROXY_NAME
        targets += [main, other]
    elif flags:  # --splice exists: copy by default, or both flags given
        paths = f"twistd has {' and '.join(flags)}; both measured"
        main_flags = ("--no-splice",) if "--no-splice" in flags else ()
        main = Target(PROXY_NAME, with_flags(*main_flags), env, udp=True, ours=True)
        main.splice = False
        other = Target(f"{PROXY_NAME} --splice", with_flags("--splice"), env)
        other.ours, other.splice = True, True
        splice_target = other.name
        targets += [main, other]
    else:
        paths = (
            "one relay path (custom --proxy-cmd)"
            if args.proxy_cmd
            else "no --splice/--no-splice in 'twistd socks5 --help': one path"
        )
        targets.append(Target(PROXY_NAME, with_flags(), env, udp=True, ours=True))
    for target in targets:
        target.http = http and target.ours
    if "workers" in args.only:
        w2 = Target(WORKERS_NAME, with_flags("--workers", "2"), env, pinned=False)
        w2.ours = True
        targets.append(w2)
    if not args.no_others:
        if any(key in args.only for key in FORWARD_KEYS):
            python = twisted_python(args)
            if python is None:
                log(f"skipping {FORWARD_NAME}: no Python that can import Twisted")
            else:
                forward_env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
                forward = Target(FORWARD_NAME, env=forward_env)
                forward.forward = [python, str(FORWARD_SCRIPT)]
                targets.append(forward)
        if shutil.which("microsocks"):
            targets.append(Target("microsocks", microsocks_cmd))
        if find_pproxy():
            targets.append(Target("pproxy", pproxy_cmd))
        if shutil.which("danted"):
            dante = Target("danted", danted_cmd("danted.conf"), udp=True)
            dante.idle_cmd = danted_cmd("danted-idle.conf")
            targets.append(dante)
    return targets, paths, splice_target


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not sys.platform.startswith("linux"):
        raise SystemExit("bench: Linux only (epoll, /proc)")

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    command_line = shlex.join([sys.executable, *sys.argv]) if argv is None else ""
    # 5,000 spliced tunnels: 2 sockets and 4 pipe ends each, in the proxy.
    nofile = raise_nofile(6 * args.tunnels + 1024)
    build_loadgen()
    pin = make_pinning(args.no_pin)

    started: List[Proc] = []
    report: Dict[str, Any] = {}
    t_start = time.monotonic()
    try:
        targets, paths, splice_target = build_targets(args, pin)
        servers, ports = start_servers(pin)
        started.append(servers)
        for target in targets:
            if target.direct:
                continue
            try:
                if target.forward is not None:
                    target.proc = start_forwarder(target, pin, ports)
                else:
                    target.proc = start_proxy(target, pin)
            except (RuntimeError, OSError) as e:
                if target.ours:
                    raise
                log(f"skipping {target.name}: {e}")
                continue
            started.append(target.proc)
        targets = [t for t in targets if t.direct or t.proc is not None]
        by_name = {t.name: t for t in targets}
        proxies = {t.name: t.proc for t in targets if t.proc is not None}

        def targets_for(kind: str) -> List[str]:
            if kind == "workers":
                wanted = ["direct", PROXY_NAME, WORKERS_NAME]
                return [n for n in wanted if n in by_name]
            names = [t.name for t in targets if t.name != WORKERS_NAME]
            if kind == "udp":
                names = [n for n in names if n == "direct" or by_name[n].udp]
            if kind == "http":
                names = [n for n in names if n == "direct" or by_name[n].http]
            return names  # a forwarder has no udp and is not in "workers"

        plan_measures = measures(args)
        idle_targets = [
            t.name
            for t in targets
            if t.proc is not None
            and t.name != WORKERS_NAME
            and t.forward is None
            and (t.ours or not args.quick)
        ]
        plan: List[Tuple[str, str, List[str]]] = []
        for m in plan_measures:
            for row, fieldname in m.rows:
                plan.append((row, fieldname, targets_for(m.kind)))
        if "idle" in args.only:
            plan.append((IDLE_ROW, "kib_per_tunnel", ["direct", *idle_targets]))

        n_runs = args.repeat * sum(len(targets_for(m.kind)) for m in plan_measures)
        warm = {(m.mode, t) for m in plan_measures for t in targets_for(m.kind)}
        if args.duration is None:
            args.duration = default_duration(args, n_runs, len(warm))
        idle_reps = 1 if args.quick else args.repeat
        rss_start = {name: memory(p.pid) for name, p in proxies.items()}

        load = os.getloadavg()
        main_proc = proxies[PROXY_NAME]
        print(f"twisted-socks5 benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}")
        print(f"  command       : {command_line or '(called from Python)'}")
        print(f"  git revision  : {git_describe()} ({ROOT})")
        print(f"  proxy command : {shlex.join(main_proc.cmd)}")
        print(f"  relay paths   : {paths}")
        pids = ", ".join(f"{n} {p.pid}" for n, p in proxies.items())
        print(f"  proxy pids    : {pids}")
        print(f"  machine       : {os.cpu_count()} CPUs, {cpu_model()}")
        print(f"  pinning       : {pin.description}")
        print(
            f"  runs          : median of {args.repeat} x {args.duration:g} s per "
            f"metric and target; churn {args.concurrency} at once; "
            f"{args.streams} streams; RTT and UDP 64 B, UDP {args.udp_window} in flight"
        )
        print(
            f"  idle tunnels  : {args.tunnels} per fresh proxy, {idle_reps} round(s); "
            f"RLIMIT_NOFILE {nofile}"
        )
        print(f"  load average  : {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        if load[0] > 0.5:
            print("  (other processes are busy: expect noisy figures)")
        print(flush=True)

        runner = Runner(args, pin, servers, ports)
        log("warming up")
        warmed = set()
        for m in plan_measures:
            for name in targets_for(m.kind):
                if (m.mode, name) not in warmed:
                    warmed.add((m.mode, name))
                    runner.loadgen(m, by_name[name], min(WARMUP, args.duration / 2))

        runs: List[Dict[str, Any]] = []
        total = n_runs
        name_width = max(26, *(len(t.name) for t in targets))
        for rep in range(args.repeat):
            for m in plan_measures:
                for name in targets_for(m.kind):
                    result = runner.loadgen(m, by_name[name], args.duration)
                    runs.append(
                        {
                            "rep": rep,
                            "measure": m.key,
                            "rows": [row for row, _ in m.rows],
                            "target": name,
                            "result": result,
                        }
                    )
                    status = (
                        "ok" if result.get("ok") else f"FAILED: {result.get('error')}"
                    )
                    shown = ", ".join(
                        f"{row} {fmt(result.get(f))}"
                        for row, f in m.rows
                        if result.get(f) is not None
                    )
                    step = f"[{len(runs)}/{total}]"
                    log(f"  {step:>9} {m.key:<8} {name:<{name_width}} {shown} {status}")

        if "idle" in args.only:
            for rep in range(idle_reps):
                for name in idle_targets:
                    log(f"  idle {rep + 1}/{idle_reps} {name}: {args.tunnels} tunnels")
                    result = idle_once(by_name[name], pin, args, ports["echo"])
                    runs.append(
                        {
                            "rep": rep,
                            "measure": "idle",
                            "rows": [IDLE_ROW],
                            "target": name,
                            "result": result,
                        }
                    )
                    status = (
                        "ok" if result.get("ok") else f"FAILED: {result.get('error')}"
                    )
                    log(
                        f"    {fmt(result.get('kib_per_tunnel'))} KiB/tunnel, "
                        f"opened in {fmt(result.get('open_seconds'))} s {status}"
                    )

        rss_end = {name: memory(p.pid) for name, p in proxies.items()}
        summary = summarize(runs, plan)
        goals(summary, splice_target)
        print_table(summary, plan)
        others = sorted(
            r["result"]["others_cpu"] for r in runs if "others_cpu" in r["result"]
        )
        if others:
            noisy = sum(1 for x in others if x > NOISY)
            print(
                f"other processes during the timed runs: median "
                f"{100 * statistics.median(others):.0f}%, max {100 * others[-1]:.0f}% "
                f"of one CPU (of {100 * len(pin.all_cpus)}%); "
                f"{noisy} of {len(others)} runs above {100 * NOISY:.0f}%"
                + (
                    " (marked *): figures are noisy, rerun on a quiet machine"
                    if noisy
                    else ""
                )
            )

        for name, proc in proxies.items():
            start, end = rss_start[name], rss_end[name]
            code = proc.proc.poll() if proc.proc else None
            if not end or code is not None:
                print(f"{name}: DIED during the runs (exit status {code}), no RSS")
                continue
            line = (
                f"{name} RSS (pid {proc.pid}): {end.get('VmRSS', 0) / 1024:.1f} MiB "
                f"after the runs (at start {start.get('VmRSS', 0) / 1024:.1f} MiB, "
                f"peak {end.get('VmHWM', 0) / 1024:.1f} MiB)"
            )
            if "tree_Pss" in end:
                line += (
                    f"; with its {end['tree_processes'] - 1} child process(es): "
                    f"{end['tree_Pss'] / 1024:.1f} MiB PSS"
                )
            print(line)
        idle_runs = [r for r in runs if r["measure"] == "idle"]
        for name in idle_targets:
            mine = [
                r["result"]
                for r in idle_runs
                if r["target"] == name and r["result"].get("ok")
            ]
            if mine:
                fds = statistics.median(
                    r["proxy_fds_per_tunnel"] for r in mine if r["proxy_fds_per_tunnel"]
                )
                opened = statistics.median(r["open_seconds"] for r in mine)
                print(
                    f"{name} idle: {mine[0]['measured']}, {fds:.1f} descriptors per "
                    f"tunnel, {args.tunnels} opened in {opened:.1f} s"
                )

        failures = [r for r in runs if not r["result"].get("ok")]
        ours = {"direct", *(t.name for t in targets if t.ours)}
        our_failures = [r for r in failures if r["target"] in ours]
        if failures:
            print(f"\n{len(failures)} run(s) FAILED:")
            for r in failures:
                print(
                    f"  {r['measure']} via {r['target']} (rep {r['rep'] + 1}): "
                    f"{r['result'].get('error')}"
                )
        churn_errors: Dict[str, int] = {}
        for r in runs:
            if r["result"].get("errors") and r["measure"] in ("churn", "workers"):
                churn_errors[r["target"]] = (
                    churn_errors.get(r["target"], 0) + r["result"]["errors"]
                )
        if churn_errors:
            shown = ", ".join(f"{t} {n}" for t, n in churn_errors.items())
            print(f"churn: failed connections: {shown}")
        for proc in proxies.values():
            proc.stop()  # their logs are complete only once they have exited
        problems = {name: log_problems(p) for name, p in proxies.items()}
        for name, found in problems.items():
            if found:
                print(
                    f"\n{name}: {len(found)} traceback(s)/unhandled error(s) in "
                    f"{proxies[name].log_path}; first:\n{found[0]}"
                )
        elapsed = time.monotonic() - t_start
        load_end = os.getloadavg()
        print(
            f"\ntotal time {elapsed:.0f} s; load average at the end "
            f"{load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}; logs in {BUILD}"
        )

        report = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": command_line,
            "config": {
                "duration": args.duration,
                "repeat": args.repeat,
                "concurrency": args.concurrency,
                "streams": args.streams,
                "tunnels": args.tunnels,
                "idle_repeat": idle_reps,
                "udp_window": args.udp_window,
                "bytes": args.bytes,
                "proxy_cmd": main_proc.cmd,
                "relay_paths": paths,
                "pinning": pin.description,
                "rlimit_nofile": nofile,
            },
            "environment": {
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "cpu_model": cpu_model(),
                "tree": str(ROOT),
                "git": git_describe(),
                "loadavg_start": load,
                "loadavg_end": load_end,
            },
            "targets": {
                t.name: {
                    "cmd": t.proc.cmd if t.proc else None,
                    "pid": t.proc.pid if t.proc else None,
                    "splice": t.splice,
                }
                for t in targets
            },
            "summary": summary,
            "rss_kb": {"start": rss_start, "end": rss_end},
            "runs": runs,
            "proxy_log_problems": problems,
            "elapsed_s": elapsed,
        }
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
            print(f"JSON written to {args.json}")
        our_problems = any(problems.get(n) for n in ours)
        return 1 if our_failures or our_problems else 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        log(f"bench: {e}")
        return 2
    finally:
        for proc in reversed(started):
            code = proc.stop()
            if proc.name.startswith(PROXY_NAME) and code not in (
                0,
                None,
                -signal.SIGTERM,
                -signal.SIGINT,
            ):
                log(f"{proc.name} exited with {code}; log: {proc.log_path}")


if __name__ == "__main__":
    sys.exit(main())
