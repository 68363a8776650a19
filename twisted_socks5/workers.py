"""
``--workers N``: several reactor processes serving the same ports.

The supervisor (the twistd process) opens the listening sockets itself, one
per worker and port with ``SO_REUSEPORT`` where the kernel has it (so the
kernel spreads connections evenly), else one shared socket per port.  Each
worker is ``python -m twisted_socks5.workerprocess``, which adopts its inherited
sockets with ``adoptStreamPort`` and runs an ordinary server.  A worker that
dies is restarted (with a back-off if it keeps dying); SIGTERM stops all of
them gracefully (each drains its tunnels) and SIGHUP is passed on.  A UDP
association lives in the worker that owns its control connection.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from typing import Any, Dict, List, Optional, Tuple

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from ._twisted import endpoint_address
from ._version import version_line
from .logs import escape_line

log = Logger()

#: Restart delays for a worker that keeps dying: 0.5 s doubling to 30 s.
RESTART_MIN, RESTART_MAX = 0.5, 30.0
#: A worker that lived this long is healthy: its next restart is immediate.
HEALTHY_AFTER = 60.0

Listener = Tuple[str, int, int, int]  # host, port, family, backlog


def tcp_listener(reactor: Any, description: str) -> Listener:
    """
    The (host, port, family, backlog) of a plain TCP endpoint string, or
    ``ValueError``: only TCP can be shared between worker processes.
    """
    from twisted.internet.endpoints import serverFromString

    endpoint = serverFromString(reactor, description)
    if not isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
        raise ValueError(
            f"--workers needs plain tcp: endpoints; {description!r} is not one"
        )
    address = endpoint_address(endpoint)
    if address is None:  # a Twisted that renamed them: say so, do not guess
        raise ValueError(
            f"--workers cannot read the address of {description!r} "
            "from this version of Twisted"
        )
    interface, port, backlog = address
    family = (
        socket.AF_INET6 if isinstance(endpoint, TCP6ServerEndpoint) else socket.AF_INET
    )
    host = interface or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    if ":" in host:
        family = socket.AF_INET6
    return host, port, family, backlog


def open_sockets(listeners: List[Listener], count: int) -> List[List[socket.socket]]:
    """
    Bind the listening sockets: ``result[worker]`` is that worker's list, one
    per listener.  With ``SO_REUSEPORT`` each worker gets its own sockets on
    the same port; without it they share one per listener.
    """
    reuse = hasattr(socket, "SO_REUSEPORT")
    per_worker: List[List[socket.socket]] = [[] for _ in range(count)]
    for host, port, family, backlog in listeners:
        shared: Optional[socket.socket] = None
        for worker in range(count):
            if shared is not None:
                per_worker[worker].append(shared)
                continue
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                s.close()
                raise CannotListenError(host, port, e) from None
            port = s.getsockname()[1]  # port 0: the others join the one chosen
            s.listen(backlog)
            s.setblocking(False)
            s.set_inheritable(True)
            per_worker[worker].append(s)
            if not reuse:
                shared = s
    return per_worker


class _WorkerProcess(protocol.ProcessProtocol):
    """One worker: its output goes to our log, its death to the supervisor."""

    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started = supervisor.reactor.seconds()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                log.info(
                    "[worker {index}] {line}",
                    index=self.index,
                    line=escape_line(line.decode("utf-8", "replace")),
                )

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)
        self.supervisor.worker_ended(self, reason.value)


class WorkerSupervisor(service.Service):
    """Runs and supervises the worker processes."""

    def __init__(
        self,
        reactor: Any,
        count: int,
        listen: List[str],
        worker_argv: List[str],
        drain_timeout: float = 10.0,
    ) -> None:
        self.reactor = reactor
        self.count = count
        self.listeners = [tcp_listener(reactor, d) for d in listen]
        self.worker_argv = worker_argv
        self.drain_timeout = drain_timeout
        self.sockets: List[List[socket.socket]] = []
        self.workers: Dict[int, _WorkerProcess] = {}
        self._delays: Dict[int, float] = {}
        self._stopping = False
        self._restarts: Dict[int, Any] = {}
        self.restarted = 0

    def privilegedStartService(self) -> None:
        # Bind before privileges are dropped (twistd --uid), like listenTCP.
        try:
            self.sockets = open_sockets(self.listeners, self.count)
        except CannotListenError as e:
            raise SystemExit(f"twistd socks5: {e}") from None
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        if not self.sockets:
            self.sockets = open_sockets(self.listeners, self.count)
        where = ", ".join(_describe(s) for s in self.sockets[0])
        log.info(
            "{version} listening on {listen} with {count} workers",
            version=version_line(),
            listen=where,
            count=self.count,
            event="socks5.listening",
        )
        signal.signal(signal.SIGHUP, self._forward_sighup)
        # i16-log: the workers' access logs reopen on SIGUSR1 (logrotate).
        signal.signal(signal.SIGUSR1, self._forward_sigusr1)
        for index in range(self.count):
            self._spawn(index)

    def _forward_sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.signal_all, signal.SIGHUP)

    def _forward_sigusr1(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.signal_all, signal.SIGUSR1)

    def signal_all(self, signum: int) -> None:
        for worker in list(self.workers.values()):
            with contextlib.suppress(Exception):  # already gone
                worker.transport.signalProcess(signum)  # type: ignore[union-attr]

    def _spawn(self, index: int) -> None:
        fds = [s.fileno() for s in self.sockets[index]]
        args = [sys.executable, "-m", "twisted_socks5.workerprocess"]
        for fd, (_, _, family, _) in zip(fds, self.listeners):
            args += ["--fd", f"{fd}:{6 if family == socket.AF_INET6 else 4}"]
        args += ["--", *self.worker_argv]
        child_fds: Dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for fd in fds:
            child_fds[fd] = fd
        worker = _WorkerProcess(self, index)
        self.reactor.spawnProcess(
            worker, sys.executable, args, env=dict(os.environ), childFDs=child_fds
        )
        self.workers[index] = worker
        log.info(
            "worker {index} started (pid {pid})",
            index=index,
            pid=worker.transport.pid,  # type: ignore[union-attr]
            event="socks5.worker_started",
        )

    def worker_ended(self, worker: _WorkerProcess, reason: Any) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self._stopping:
            return
        lived = self.reactor.seconds() - worker.started
        delay = self._delays.get(worker.index, 0.0)
        delay = (
            0.0
            if lived >= HEALTHY_AFTER
            else min(RESTART_MAX, max(RESTART_MIN, delay * 2))
        )
        self._delays[worker.index] = delay
        log.warn(
            "worker {index} ended ({reason}); restarting in {delay} s",
            index=worker.index,
            reason=reason,
            delay=delay,
            event="socks5.worker_ended",
        )
        self.restarted += 1
        self._restarts[worker.index] = self.reactor.callLater(
            delay, self._spawn, worker.index
        )

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        self._stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        ended = [w.ended for w in self.workers.values()]
        self.signal_all(signal.SIGTERM)

        def kill() -> None:
            self.signal_all(signal.SIGKILL)

        killer = self.reactor.callLater(self.drain_timeout + 5, kill)

        def done(result: Any) -> Any:
            if killer.active():
                killer.cancel()
            for sockets in self.sockets:
                for s in sockets:
                    with contextlib.suppress(OSError):  # shared: closed already
                        s.close()
            return result

        return defer.gatherResults(ended, consumeErrors=True).addBoth(done)


def _describe(s: socket.socket) -> str:
    host, port = s.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def worker_count(value: str) -> int:
    """``--workers``: a positive number or ``auto`` (the CPU count)."""
    if value == "auto":
        return max(
            1,
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1),
        )
    number = int(value)
    if number < 1:
        raise ValueError("at least 1 worker")
    return number


worker_count.coerceDoc = "A number, or 'auto' for one per CPU."  # type: ignore[attr-defined]
