"""
A real ``redis-server`` for the tests that need one: on a free 127.0.0.1
port, in a temporary directory, saving nothing; started and stopped through
the reactor (its "Ready to accept connections" line, not a sleep).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from typing import Any, AsyncIterator, List, Optional

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
HAS_REDIS = os.access(REDIS_SERVER, os.X_OK)
needs_redis = pytest.mark.skipif(
    not HAS_REDIS,
    reason="redis-server is not installed (Debian: apt-get install redis-server); "
    "CI installs it",
)
#: A bound on start-up, never a measure.
START_WITHIN = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tls_supported() -> bool:
    """Whether this redis-server was built with TLS (``--tls-port``)."""
    if not HAS_REDIS:
        return False
    # A build without TLS refuses the option; one with it only lacks a cert.
    probe = subprocess.run(
        [REDIS_SERVER, "--port", "0", "--tls-port", "1", "--save", ""],
        capture_output=True,
        check=False,
        timeout=30,
    )
    return b"tls-cert-file" in probe.stdout + probe.stderr


class RedisServer(protocol.ProcessProtocol):
    """One redis-server process; :meth:`start` again restarts it on its port."""

    def __init__(self, directory: str, *extra: str, tls: bool = False) -> None:
        self.directory = directory
        self.extra = list(extra)
        self.tls = tls
        self.port = _free_port()
        self.output: List[bytes] = []
        self._ready: Optional[defer.Deferred[None]] = None
        self.ended: defer.Deferred[None] = defer.succeed(None)
        self.pid: Optional[int] = None

    def url(self, db: int = 0, query: str = "") -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/{db}" + (f"?{query}" if query else "")

    def start(self) -> defer.Deferred[None]:
        self._ready = defer.Deferred()
        self.ended = defer.Deferred()
        port = (
            ["--port", "0", "--tls-port", str(self.port)]
            if self.tls
            else [
                "--port",
                str(self.port),
            ]
        )
        args = [
            REDIS_SERVER,
            *port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.directory,
            *self.extra,
        ]
        transport = reactor.spawnProcess(self, REDIS_SERVER, args, path=self.directory)
        self.pid = transport.pid
        return self._ready.addTimeout(START_WITHIN, reactor)

    def outReceived(self, data: bytes) -> None:
        self.output.append(data)
        if self._ready is not None and b"Ready to accept connections" in b"".join(
            self.output
        ):
            ready, self._ready = self._ready, None
            ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.pid = None
        if self._ready is not None:
            ready, self._ready = self._ready, None
            ready.errback(RuntimeError(b"".join(self.output).decode(errors="replace")))
        self.ended.callback(None)

    def kill(self) -> defer.Deferred[None]:
        """SIGKILL: an outage, not a clean shutdown."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
        self.output.clear()
        return self.ended


@pytest_twisted.async_yield_fixture
async def redis(tmp_path: Any) -> AsyncIterator[RedisServer]:
    """A redis-server of the test's own (import it into a test module)."""
    server = RedisServer(str(tmp_path))
    await server.start()
    yield server
    await server.kill()
