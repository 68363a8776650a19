"""
Zero-copy relay with ``os.splice`` (Linux) for CONNECT tunnels between two
plain TCP sockets.

The ordinary relay (:mod:`twisted_socks5.relay`) copies every chunk into a
Python bytes object and back out again.  Here bytes go socket -> kernel pipe ->
socket and never enter user space; the reactor only tells us when a socket is
readable or writable.

When it starts: a tunnel begins on the ordinary relay and is handed over
once it has moved ``splice_after`` bytes (64 KiB by default).  Most tunnels
are short (a request, an answer): they never pay for two pipes (four
descriptors, about 100 µs to set up and tear down), and an idle tunnel holds
two descriptors, not six.  ``splice_after=0`` takes over right after the reply.

How it fits into Twisted, with public APIs only:

1. The SOCKS reply (and any payload pipelined with the request, or what the
   ordinary relay had queued before a hand-over) is still in Twisted's
   user-space write buffers: both transports stop reading, a pull producer on
   each is told when its buffer is empty, and only then do we take over, so
   nothing is reordered.  A hand-over whose buffers do not drain within
   :data:`HANDOVER_GRACE` seconds (a peer that does not read) is called off
   and the ordinary relay goes on: meanwhile nothing was read either way, and
   a peer that only reads once its own writes complete must not wait on us.
2. Both transports stop reading and writing (``pauseProducing`` and
   ``stopWriting``): Twisted keeps owning the sockets but no longer touches them.
3. The reactor maps a file descriptor to ONE selectable, so each socket gets
   one :class:`_SocketEnd` providing both IReadDescriptor and
   IWriteDescriptor: ``doRead`` pumps the direction that reads the socket,
   ``doWrite`` the direction that writes it.
4. Each direction has its own pipe.  A direction reads its source only while
   its pipe is empty; when the destination cannot take what the pipe holds,
   it waits for the destination to become writable instead.  That is the flow
   control: never more than one pipe's worth in flight, no user-space buffer.
5. EOF on a source becomes ``shutdown(SHUT_WR)`` on the destination.  Once
   both directions have ended, our descriptors are removed and the
   transports are told the connection is done (see :meth:`SpliceRelay._finish`);
   on an error they get ``abortConnection()``.  Either way Twisted closes the
   sockets and runs the protocols' ``connectionLost``.

While the relay runs, nobody else may start reading or writing on the two
transports: because the reactor is keyed by file descriptor, that would
displace our descriptors.  ``abortConnection()`` (the idle timeout) is fine:
it only removes registrations, and ``connectionLost`` then calls :meth:`stop`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
import weakref
from typing import Any, Callable, List, Optional, Protocol, cast

from twisted.internet import tcp
from twisted.internet.interfaces import (
    IPullProducer,
    IReactorFDSet,
    IReadDescriptor,
    ISSLTransport,
    IWriteDescriptor,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .relay import OutboundProtocol, RelayCounters
from .writenow import connection_done

#: Pipe capacity asked for; the kernel may refuse (pipe-max-size, per-user
#: pipe quotas), and then the default (64 KiB) is used.  128 KiB measured
#: best on loopback (bench/README.md): 1 MiB holds more bytes in flight
#: than the caches keep warm for the reader (single-stream download 0.53x
#: of direct against 0.60x, upload 0.73x against 0.80x, 8 streams 0.71x
#: against 0.77x); 64 KiB costs the relay more system calls per byte than
#: it has (upload 0.66x).
PIPE_SIZE = 1 << 17

#: Most splice() calls per readiness callback, so that one busy tunnel cannot
#: starve the other connections of the reactor; level-triggered readiness
#: brings us straight back if there is more to do.
SPLICES_PER_WAKEUP = 16

#: Seconds a hand-over from the ordinary relay may wait for Twisted's write
#: buffers to drain before it is called off (see the module docstring).
HANDOVER_GRACE = 0.5


class SplicedTunnel(Protocol):
    """What the splice relay uses of its :class:`~twisted_socks5.tunnel.Tunnel`."""

    client: Any
    outbound: Optional[OutboundProtocol]
    counters: RelayCounters
    client_eof: bool

    def target_failed(self, why: str) -> None: ...

    def target_lost(self, reason: Failure) -> None: ...

    def splice_called_off(self) -> None: ...


def _no_splice(*args: Any) -> int:
    raise OSError(errno.ENOSYS, "os.splice is not available")


_SPLICE: Callable[..., int] = getattr(os, "splice", None) or _no_splice
_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_F_SETPIPE_SZ: Optional[int] = getattr(fcntl, "F_SETPIPE_SZ", None)
_F_GETPIPE_SZ: Optional[int] = getattr(fcntl, "F_GETPIPE_SZ", None)
_DEFAULT_PIPE_SIZE = 1 << 16


def splice_available() -> bool:
    """Whether this platform can splice between sockets (Linux, Python 3.10+)."""
    return (
        sys.platform.startswith("linux")
        and getattr(os, "splice", None) is not None
        and bool(_FLAGS)
    )


def plain_tcp(transport: Any, producer_allowed: bool = False) -> bool:
    """
    Whether ``transport`` is a connected Twisted TCP socket with no layer on
    top that needs to see the bytes (TLS, a wrapper, a test double), and no
    producer registered on it (unless ``producer_allowed``: the ordinary
    relay's own, which a hand-over unregisters).
    """
    if not isinstance(transport, tcp.Connection):
        return False
    # startTLS() keeps the tcp.Connection class but marks the transport.
    if ISSLTransport.providedBy(transport):
        return False
    if not transport.connected or transport.disconnecting:
        return False
    if transport.producer is not None and not producer_allowed:
        return False
    handle = transport.getHandle()
    # tcp.Connection is also the base of UNIX sockets: TCP only.
    return (
        isinstance(handle, socket.socket)
        and handle.family in (socket.AF_INET, socket.AF_INET6)
        and handle.type == socket.SOCK_STREAM
    )


def _make_pipe() -> tuple[int, int, int]:
    """A non-blocking pipe enlarged if the kernel allows: (read, write, size)."""
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    size = _DEFAULT_PIPE_SIZE
    if _F_SETPIPE_SZ is not None:
        # Refused (EPERM over pipe-max-size or the per-user pipe quota):
        # a smaller pipe only means more splice() calls.
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_fd, _F_SETPIPE_SZ, PIPE_SIZE)
    if _F_GETPIPE_SZ is not None:
        with contextlib.suppress(OSError):
            size = fcntl.fcntl(write_fd, _F_GETPIPE_SZ)
    return read_fd, write_fd, size


def can_splice(client: Any, target: Any, producer_allowed: bool = False) -> bool:
    """Whether both transports of a tunnel are sockets this module can drive."""
    if not splice_available():
        return False
    if not (
        plain_tcp(client, producer_allowed) and plain_tcp(target, producer_allowed)
    ):
        return False
    reactor = client.reactor
    return target.reactor is reactor and IReactorFDSet.providedBy(reactor)


def start_splice_relay(
    tunnel: SplicedTunnel, early: bytes = b"", handover: bool = False
) -> Optional[SpliceRelay]:
    """
    Take over the tunnel's byte moving, or return ``None`` (having changed
    nothing) so that the ordinary relay runs (or goes on, for a ``handover``
    from a running ordinary relay).
    """
    outbound = tunnel.outbound
    if outbound is None or not can_splice(
        tunnel.client, outbound.transport, producer_allowed=handover
    ):
        return None
    try:
        up_pipe = _make_pipe()
    except OSError:
        return None  # out of file descriptors: copying still works
    try:
        down_pipe = _make_pipe()
    except OSError:
        os.close(up_pipe[0])
        os.close(up_pipe[1])
        return None
    relay = SpliceRelay(tunnel.client.reactor, tunnel, outbound, up_pipe, down_pipe)
    if handover:
        relay.hand_over()
    else:
        relay.start(early)
    return relay


@implementer(IPullProducer)
class _WhenFlushed:
    """
    Calls back once a transport has written out its user-space buffer.

    Twisted calls a pull producer's ``resumeProducing`` when the buffer has
    drained; ``startWriting`` makes sure that happens on the next writable
    event even if the buffer is already empty.
    """

    def __init__(self, transport: Any, callback: Callable[[], None]) -> None:
        self._transport = transport
        self._callback: Optional[Callable[[], None]] = None
        # registerProducer() calls resumeProducing() at once: not a drain.
        transport.registerProducer(self, False)
        self._callback = callback
        transport.startWriting()

    def resumeProducing(self) -> None:
        callback, self._callback = self._callback, None
        if callback is None:
            return
        self._transport.unregisterProducer()
        callback()

    def stopProducing(self) -> None:
        """The transport is gone: ``connectionLost`` will stop the relay."""
        self._callback = None

    def cancel(self) -> None:
        """Let go of the transport, so that its loseConnection() can finish."""
        self._callback = None
        if self._transport.producer is self:
            self._transport.unregisterProducer()


class _StoppedRelay:
    """What a stopped relay's ends call: nothing happens any more."""

    stopped = True

    def pump(self, d: Any) -> None:
        pass

    def fail(self, end: Any, why: str) -> None:
        pass


_STOPPED = _StoppedRelay()


@implementer(IReadDescriptor, IWriteDescriptor)
class _SocketEnd:
    """The reactor's one selectable for one socket of the tunnel."""

    def __init__(self, relay: SpliceRelay, transport: Any, is_target: bool) -> None:
        self.relay: Any = relay
        self.transport = transport
        self.is_target = is_target
        self.sock: socket.socket = transport.getHandle()
        self.fd = self.sock.fileno()
        self.reading = False
        self.writing = False
        #: The direction that reads from this socket / writes to it (None
        #: once the relay stopped).
        self.source_of: Any = None
        self.sink_of: Any = None

    def fileno(self) -> int:
        # -1 once Twisted has closed the socket: the reactor then finds us
        # by identity instead of by a number that may already be reused.
        return self.sock.fileno()

    def doRead(self) -> None:
        self.relay.pump(self.source_of)

    def doWrite(self) -> None:
        self.relay.pump(self.sink_of)

    def connectionLost(self, reason: Failure) -> None:
        """The reactor saw a hangup or error we were not reading for."""
        self.reading = self.writing = False
        self.relay.fail(self, reason.getErrorMessage())

    def logPrefix(self) -> str:
        return "SpliceRelay"

    def want_read(self, wanted: bool) -> None:
        if wanted != self.reading:
            self.reading = wanted
            if wanted:
                self.relay.reactor.addReader(self)
            else:
                self.relay.reactor.removeReader(self)

    def want_write(self, wanted: bool) -> None:
        if wanted != self.writing:
            self.writing = wanted
            if wanted:
                self.relay.reactor.addWriter(self)
            else:
                self.relay.reactor.removeWriter(self)

    def remove(self) -> None:
        self.want_read(False)
        self.want_write(False)


class _Direction:
    """One way through the tunnel: source socket -> pipe -> destination."""

    __slots__ = (
        "src",
        "dst",
        "pipe_r",
        "pipe_w",
        "size",
        "up",
        "pending",
        "eof",
        "done",
    )

    def __init__(
        self, src: _SocketEnd, dst: _SocketEnd, pipe: tuple[int, int, int], up: bool
    ) -> None:
        self.src = src
        self.dst = dst
        self.pipe_r, self.pipe_w, self.size = pipe
        self.up = up
        #: Bytes in the pipe, read from src and not yet written to dst.
        self.pending = 0
        self.eof = False
        self.done = False
        src.source_of = self
        dst.sink_of = self


class SpliceRelay:
    """Moves a tunnel's bytes with splice(2); see the module docstring."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        tunnel: SplicedTunnel,
        outbound: OutboundProtocol,
        up_pipe: tuple[int, int, int],
        down_pipe: tuple[int, int, int],
    ) -> None:
        self.reactor = reactor
        # A weak back-reference: the tunnel holds the relay (``splice``),
        # and a strong one back would make every spliced tunnel a reference
        # cycle, freed by the cyclic garbage collector instead of at close.
        self.tunnel = cast(SplicedTunnel, weakref.proxy(tunnel))
        self.outbound = outbound
        self.counters = tunnel.counters
        self.client = _SocketEnd(self, tunnel.client, is_target=False)
        self.target = _SocketEnd(self, outbound.transport, is_target=True)
        self.up = _Direction(self.client, self.target, up_pipe, up=True)
        self.down = _Direction(self.target, self.client, down_pipe, up=False)
        self.started = False
        self.stopped = False
        self._flushing: List[_WhenFlushed] = []
        self._unflushed = 0
        self._grace: Any = None
        #: Called once by :meth:`stop` (the server's descriptor accounting).
        self.on_stop: Optional[Callable[[], None]] = None

    @property
    def pipe_fds(self) -> tuple[int, int, int, int]:
        return (self.up.pipe_r, self.up.pipe_w, self.down.pipe_r, self.down.pipe_w)

    @property
    def buffered(self) -> int:
        """Bytes held in the pipes: at most one pipe's capacity per direction."""
        return self.up.pending + self.down.pending

    def start(self, early: bytes) -> None:
        """Send what must go first through Twisted, then take over."""
        if self.tunnel.client_eof:
            # Twisted already read the client's EOF during the connect.
            self.up.eof = True
            self.counters.up_closed = True
        if early:
            self.counters.bytes_up += len(early)
            self.counters.active = True
            self.outbound.transport.write(early)
        self._take_over_once_flushed()

    def hand_over(self) -> None:
        """
        Take over from the running ordinary relay (see the module docstring
        for the grace period); the tunnel ignores the target's EOF meanwhile.
        """
        self._take_over_once_flushed()
        self._grace = self.reactor.callLater(HANDOVER_GRACE, self._call_off)

    def _take_over_once_flushed(self) -> None:
        """
        Stop reading both sides, let Twisted write out what it holds for
        them (the reply, early data, what the ordinary relay queued), then
        splice: nothing is read that could overtake it.
        """
        transports = [self.client.transport, self.target.transport]
        for transport in transports:
            transport.unregisterProducer()  # the ordinary relay's cross-links
            transport.pauseProducing()
        self._unflushed = len(transports)
        self._flushing = [_WhenFlushed(t, self._flushed) for t in transports]

    def _call_off(self) -> None:
        """A buffer did not drain in time: the ordinary relay goes on."""
        self._grace = None
        if self.started or self.stopped:
            return
        self.stop()
        self.tunnel.splice_called_off()

    def _flushed(self) -> None:
        self._unflushed -= 1
        if self.stopped or self._unflushed:
            return
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        self._flushing.clear()
        for end in (self.client, self.target):
            transport = end.transport
            if not transport.connected or transport.disconnecting:
                return  # closing already: connectionLost will stop us
        for end in (self.client, self.target):
            end.transport.pauseProducing()
            end.transport.stopWriting()
        self.started = True
        self.pump(self.up)
        self.pump(self.down)

    def pump(self, d: _Direction) -> None:
        """Move what one direction can move now, within the wakeup budget."""
        if self.stopped or d.done:
            return
        counters = self.counters
        meter = counters.meter  # bandwidth limits, if any
        waiting = False
        splice, flags = _SPLICE, _FLAGS
        failed_end = d.dst
        try:
            for _ in range(SPLICES_PER_WAKEUP):
                if d.pending:
                    failed_end = d.dst
                    d.pending -= splice(
                        d.pipe_r, d.dst.fd, d.pending, None, None, flags
                    )
                elif d.eof:
                    failed_end = d.dst
                    d.dst.sock.shutdown(socket.SHUT_WR)
                    d.done = True
                    break
                else:
                    failed_end = d.src
                    if meter is None:
                        n = splice(d.src.fd, d.pipe_w, d.size, None, None, flags)
                    else:
                        n = meter.splice(self, d, splice, flags)
                        if n < 0:  # no tokens: the meter pumps again later
                            waiting = True
                            break
                    if n:
                        d.pending = n
                        if d.up:
                            counters.bytes_up += n
                        else:
                            counters.bytes_down += n
                        counters.active = True
                    else:
                        d.eof = True
                        if d.up:
                            counters.up_closed = True
                        else:
                            counters.down_closed = True
        except (BlockingIOError, InterruptedError):
            pass  # source drained or destination full: wait for readiness
        except OSError as e:
            self.fail(failed_end, e.strerror or errno.errorcode.get(e.errno or 0, ""))
            return
        if d.done:
            d.src.want_read(False)
            d.dst.want_write(False)
            if self.up.done and self.down.done:
                self._finish()
        elif d.pending:
            # Flow control: the pipe holds what dst could not take.
            d.src.want_read(False)
            d.dst.want_write(True)
        elif waiting:
            d.src.want_read(False)
            d.dst.want_write(False)
        else:
            d.src.want_read(True)
            d.dst.want_write(False)

    def _finish(self) -> None:
        """
        Both directions ended cleanly: Twisted closes both sockets and runs
        the protocols' ``connectionLost`` with ConnectionDone.

        We report the end the way the reactor would for its own descriptors,
        through the transports' ``connectionLost`` (``connection_done``,
        without the ``shutdown(2)`` both sockets are past): ``loseConnection()``
        would make Twisted send a last zero-byte write on a socket we already
        shut down for writing, get EPIPE and report ConnectionLost, and the
        server would then abort the target with a reset.
        """
        self.stop()
        for transport in (self.target.transport, self.client.transport):
            if transport.connected:
                try:
                    connection_done(transport)
                except Exception:
                    self.log.failure("connectionLost failed")

    def fail(self, end: _SocketEnd, why: str) -> None:
        """An error on one socket: abort both, so no truncation looks complete."""
        if self.stopped:
            return
        if end.is_target:
            self.tunnel.target_failed(why)
        self.stop()
        self.client.transport.abortConnection()
        self.target.transport.abortConnection()

    def stop(self) -> None:
        """Unregister our descriptors and close the pipes; idempotent."""
        if self.stopped:
            return
        self.stopped = True
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        for flushing in self._flushing:
            flushing.cancel()
        self._flushing.clear()
        self.client.remove()
        self.target.remove()
        # Break the cycles (end <-> relay, end <-> direction) so that a
        # finished tunnel is freed at once rather than by the cyclic garbage
        # collector.  A late callback (the reactor can still hold an end in
        # the batch it is dispatching) finds a relay that does nothing.
        for end in (self.client, self.target):
            end.relay = _STOPPED
            end.source_of = end.sink_of = None
        for fd in self.pipe_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        on_stop, self.on_stop = self.on_stop, None
        if on_stop is not None:
            on_stop()
