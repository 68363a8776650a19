"""
The servers under test, as child processes: ``twistd socks5`` (the command
users run) and the stress server (``stress_server.py``, for the faults that
need a loopback-only resolver).  Both run the working tree's
``twisted_socks5`` (the repository root goes first on ``PYTHONPATH``).
"""

# ruff: noqa: S603
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional

import procstat

STRESS = Path(__file__).resolve().parent
ROOT = STRESS.parent

#: Sets RLIMIT_NOFILE and the parent-death signal, then execs the command:
#: no preexec_fn (unsafe with the child-watcher threads asyncio runs).
_EXEC_WRAPPER = """\
import ctypes, os, resource, signal, sys
nofile = int(sys.argv[1])
if nofile > 0:  # hard too: twistd socks5 raises its soft limit to the hard one
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
try:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except Exception:
    pass
os.execv(sys.argv[2], sys.argv[2:])
"""

_TRACEBACK = re.compile(r"Traceback|Unhandled [Ee]rror|#critical\]|#error\]")


def child_env() -> Dict[str, str]:
    """The environment of a server process: the working tree first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    env.pop("PYTHONSTARTUP", None)
    return env


def twistd_command() -> List[str]:
    """twistd next to this Python, else twistd's entry point run by it."""
    candidate = Path(sys.executable).parent / "twistd"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return [str(candidate)]
    return [
        sys.executable,
        "-c",
        "import sys; from twisted.scripts.twistd import run; "
        "sys.argv[0] = 'twistd'; run()",
    ]


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.05
) -> bool:
    """Poll ``check`` until it is true or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)


async def _spawn(
    command: List[str],
    nofile: int,
    extra_env: Optional[Dict[str, str]] = None,
    **kwargs: Any,
) -> Any:
    """Start ``command`` through the exec wrapper (rlimit, death signal)."""
    argv = [sys.executable, "-c", _EXEC_WRAPPER, str(nofile)]
    if not os.path.isabs(command[0]):
        raise ValueError("the command needs an absolute path")
    env = child_env()
    env.update(extra_env or {})
    return await asyncio.create_subprocess_exec(
        *argv, *command, env=env, cwd=str(ROOT), **kwargs
    )


class Twistd:
    """``twistd -n socks5`` on 127.0.0.1 with Prometheus metrics on loopback."""

    def __init__(self, workdir: Path, name: str = "twistd") -> None:
        self.log_path = workdir / f"{name}.log"
        self.proc: Any = None
        self.pid = 0
        self.port = 0
        self.metrics_port = 0

    async def start(
        self,
        options: List[str],
        nofile: int = 0,
        extra_env: Optional[Dict[str, str]] = None,
    ) -> None:
        """Start it and wait (at most 30 s) until both ports listen."""
        command = [
            *twistd_command(),
            "-n",
            "--pidfile=",
            "socks5",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--metrics",
            "tcp:0:interface=127.0.0.1",
            *options,
        ]
        if not os.path.isabs(command[0]):  # pragma: no cover
            raise ValueError(command[0])
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = await _spawn(
            command,
            nofile,
            extra_env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self.log,
            stderr=asyncio.subprocess.STDOUT,
        )
        self.pid = self.proc.pid

        async def listening() -> bool:
            if self.proc.returncode is not None:
                raise RuntimeError(f"twistd exited:\n{self.log_text()[-3000:]}")
            text = self.log_text()
            socks = re.search(
                r"twisted-socks5 .*?listening on 127\.0\.0\.1:(\d+)", text
            )
            site = re.search(r"Site starting on (\d+)", text)
            if socks and site:
                self.port, self.metrics_port = int(socks[1]), int(site[1])
                return True
            return False

        if not await wait_until(listening, 30):
            raise RuntimeError(f"twistd did not start:\n{self.log_text()[-3000:]}")
        # The ports log that they listen before the reactor runs, and the
        # reactor opens its signal wake-up pipe (two descriptors) when it
        # starts: a request it answers means that is done, so a descriptor
        # count taken from now on is the server's real baseline.  (Counted
        # earlier, on a slow machine, the baseline came out 2 short and the
        # EMFILE phase reported descriptors "not back to baseline".)
        await self.metrics()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def errors(self) -> List[str]:
        """Log lines that show a traceback or an error-level event."""
        return [
            line for line in self.log_text().splitlines() if _TRACEBACK.search(line)
        ]

    async def metrics(self) -> Dict[str, float]:
        """The Prometheus samples, ``name{labels}`` -> value."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.metrics_port)
        writer.write(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        body = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        samples: Dict[str, float] = {}
        text = body.split(b"\r\n\r\n", 1)[-1].decode()
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    async def active(self) -> int:
        """``len(factory.active)``, as the metrics report it."""
        samples = await self.metrics()
        return int(
            sum(
                v
                for k, v in samples.items()
                if k.startswith("socks5_active_connections")
            )
        )

    async def stop(self) -> Optional[int]:
        """SIGTERM, then SIGKILL after 20 s; the exit status."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.log.close()
        return int(self.proc.returncode)


class StressServer:
    """``stress_server.py`` in its own process, driven over stdin/stdout."""

    def __init__(self) -> None:
        self.proc: Any = None
        self.pid = 0
        self.port = 0
        self.last_errors: List[str] = []

    async def start(
        self,
        options: List[str],
        nofile: int = 0,
        extra_env: Optional[Dict[str, str]] = None,
    ) -> None:
        command = [sys.executable, str(STRESS / "stress_server.py"), *options]
        self.proc = await _spawn(
            command,
            nofile,
            extra_env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        if not line:
            raise RuntimeError("the stress server did not start")
        hello = json.loads(line)
        self.port, self.pid = int(hello["port"]), int(hello["pid"])

    async def command(self, name: str) -> Dict[str, Any]:
        self.proc.stdin.write(name.encode() + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        if not line:
            raise RuntimeError("the stress server died")
        result: Dict[str, Any] = json.loads(line)
        self.last_errors = result.get("error_texts", [])
        return result

    async def stats(self) -> Dict[str, Any]:
        return await self.command("stats")

    async def active(self) -> int:
        """``len(factory.active)``."""
        return int((await self.stats())["active"])

    def errors(self) -> List[str]:
        """Errors logged, as of the last stats (see :meth:`stats`)."""
        return list(self.last_errors)

    async def stop(self) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return int(self.proc.returncode)


async def settle_fds(pid: int, target: int, timeout: float) -> int:
    """Wait (bounded) for the fd count of ``pid`` to come down to ``target``."""
    result = [procstat.fd_count(pid)]

    async def back() -> bool:
        result[0] = procstat.fd_count(pid)
        return result[0] <= target

    await wait_until(back, timeout)
    return result[0]
