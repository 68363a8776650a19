"""
An outgoing TCP connection to an IP address in fewer steps than
``reactor.connectTCP``.

A CONNECT to an IP literal is most of what a busy proxy does, and
``connectTCP`` spends a good part of a short connection's cost on it: a
``Connector``, a ``callLater(0)`` before it even starts, two ``connect()``
and two ``SO_ERROR`` reads, the socket made non-blocking twice, and five
``epoll_ctl`` calls as it watches both readability and writability during
the connect.  Here the socket is created non-blocking, ``connect()`` is
called at once, the attempt is watched for writability only, and the
connected socket becomes an ordinary Twisted TCP transport
(``tcp.Server``, the class ``adoptStreamConnection`` uses), so everything
above it (the relays, write-through, splice, TLS checks) sees what it
always sees.

Failures are Twisted's: the errno goes through ``error.getConnectError``
(``ConnectionRefusedError``, ``NoRouteError``...), the timeout is
``error.TimeoutError``, and cancelling the Deferred closes the socket.

Only real POSIX reactors take this path (:func:`available`); others (a
``MemoryReactor`` in tests, a reactor without file descriptors) keep
``connectTCP``.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any, Optional, Tuple

from twisted.internet import defer, error, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IWriteDescriptor
from twisted.internet.posixbase import PosixReactorBase
from twisted.python.failure import Failure
from zope.interface import implementer

from .outgoing import set_freebind

_IN_PROGRESS = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN)
_FLAGS = getattr(socket, "SOCK_NONBLOCK", 0) | getattr(socket, "SOCK_CLOEXEC", 0)


def _connect_error(code: int) -> error.ConnectError:
    """Twisted's exception for a failed connect's errno (refused, unreachable...)."""
    failure: error.ConnectError = error.getConnectError((code, os.strerror(code)))
    return failure


def available(reactor: Any) -> bool:
    """Whether ``reactor`` runs real sockets with Twisted's TCP transports."""
    return isinstance(reactor, PosixReactorBase) and bool(_FLAGS)


class OutboundConnection(tcp.Server):
    """
    A connected outgoing socket as a Twisted TCP transport.

    ``tcp.Server`` is the transport of an accepted socket, and
    ``adoptStreamConnection`` gives it sockets connected elsewhere: only the
    listening port it would name in its ``repr`` is missing here.  An IPv6
    ``peer`` is a 4-tuple (as ``accept`` returns it), from which Twisted
    itself makes ``getPeer()`` and ``getHost()`` IPv6 addresses.
    """

    def __init__(
        self,
        sock: socket.socket,
        protocol: IProtocol,
        peer: Tuple[Any, ...],
        reactor: Any,
    ) -> None:
        super().__init__(sock, protocol, peer, None, 0, reactor)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"<{type(self.protocol).__name__} to {self.client[0]}:{self.client[1]}>"


@implementer(IWriteDescriptor)
class _Attempt:
    """One connect in progress, watched for writability."""

    __slots__ = ("reactor", "sock", "fd", "factory", "peer", "d", "timer")

    def __init__(
        self,
        reactor: Any,
        sock: socket.socket,
        factory: IProtocolFactory,
        peer: Tuple[Any, ...],
        timeout: float,
    ) -> None:
        self.reactor = reactor
        self.sock = sock
        self.fd = sock.fileno()
        self.factory = factory
        self.peer = peer
        self.d: defer.Deferred[IProtocol] = defer.Deferred(self._cancel)
        self.timer: Any = reactor.callLater(timeout, self._expire, timeout)
        reactor.addWriter(self)

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "OutboundConnect"

    def doWrite(self) -> None:
        """Writable: connected, or failed (the error is in SO_ERROR)."""
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code in _IN_PROGRESS:  # pragma: no cover - spurious wake-up
            return
        self._end()
        if code:
            self.sock.close()
            self.d.errback(Failure(_connect_error(code)))
            return
        self._connected()

    def _connected(self) -> None:
        peer = self.peer
        address_type = IPv6Address if ":" in peer[0] else IPv4Address
        protocol = self.factory.buildProtocol(address_type("TCP", peer[0], peer[1]))
        if protocol is None:
            self.sock.close()
            self.d.errback(Failure(error.ConnectError(string="no protocol built")))
            return
        transport = OutboundConnection(self.sock, protocol, peer, self.reactor)
        d = self.d
        # The server's OutboundProtocol fires this itself from connectionMade,
        # before anything can be read (see _FastClientFactory): keep that.
        if getattr(protocol, "connected_deferred", False) is None:
            protocol.connected_deferred = d  # type: ignore[attr-defined]
        try:
            protocol.makeConnection(transport)
        except Exception:
            # Twisted's own connect would have the reactor close the
            # transport; here the reactor only knows this attempt (already
            # unregistered), so close it and report to whoever waits.
            failed = Failure()
            transport.abortConnection()
            if not d.called:
                d.errback(failed)
            return
        if not d.called:
            d.callback(protocol)

    def connectionLost(self, reason: Failure) -> None:
        """
        The reactor drops the descriptor: epoll reported an error or hang-up
        without writability (a refused or unreachable connect: the errno is
        in SO_ERROR), or the reactor is shutting down.
        """
        if self.d.called:
            return
        self._end()
        try:
            code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            code = 0
        self.sock.close()
        if code:
            reason = Failure(_connect_error(code))
        self.d.errback(reason)

    def _end(self) -> None:
        self.reactor.removeWriter(self)
        if self.timer.active():
            self.timer.cancel()

    def _expire(self, timeout: float) -> None:
        self.reactor.removeWriter(self)
        self.sock.close()
        self.d.errback(
            Failure(error.TimeoutError(string=f"no connection within {timeout} s"))
        )

    def _cancel(self, d: defer.Deferred[IProtocol]) -> None:
        self._end()
        self.sock.close()
        # Deferred.cancel then fails d with CancelledError.


def connect_tcp(
    reactor: Any,
    host: str,
    port: int,
    factory: IProtocolFactory,
    timeout: float,
    bind_address: Optional[Tuple[str, int]] = None,
    freebind: bool = False,
) -> defer.Deferred[IProtocol]:
    """
    Connect to the IP address ``host`` (not a name) and ``port``; the
    Deferred fires with the protocol ``factory`` built once it is connected.
    ``freebind``: bind ``bind_address`` with ``IP_FREEBIND`` (an address of
    a prefix routed to this host but on no interface).
    """
    peer: Tuple[Any, ...]
    if ":" in host:
        family, peer = socket.AF_INET6, (host, port, 0, 0)
    else:
        family, peer = socket.AF_INET, (host, port)
    try:
        sock = socket.socket(family, socket.SOCK_STREAM | _FLAGS)
    except OSError as e:
        return defer.fail(error.ConnectError(string=str(e)))
    try:
        if bind_address is not None:
            if freebind:
                set_freebind(sock)
            sock.bind(bind_address)
        code = sock.connect_ex((host, port))
    except OSError as e:
        sock.close()
        return defer.fail(error.getConnectError(e))
    if code and code not in _IN_PROGRESS:
        sock.close()
        return defer.fail(_connect_error(code))
    attempt = _Attempt(reactor, sock, factory, peer, timeout)
    return attempt.d
