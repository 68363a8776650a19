"""
The TCP relay between a SOCKS client and its destination, ProxyClient-style.

Each transport is registered as the other's streaming producer, so a slow
receiver pauses reading from the fast sender (Twisted pauses the producer
once a transport buffers more than ``bufferSize``, 64 KiB): a tunnel never
holds more than about two socket reads per direction.

Half-close is relayed both ways: an EOF from one side becomes
``loseWriteConnection()`` (``shutdown(SHUT_WR)``) on the other, and the tunnel
closes once both directions have ended.  A reset on one side aborts the other,
so a truncated transfer is never passed off as a complete one.
"""

from __future__ import annotations

from typing import Any, Optional
from typing import Protocol as TypingProtocol

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    INegotiated,
    ISSLTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from .writenow import shut_write_now, write_now


def half_close(transport: Any) -> bool:
    """
    Shut down the write side of ``transport`` (our FIN), where that exists.

    TLS has no half-close in Twisted (``TLSMemoryBIOProtocol`` would send a
    bare TCP FIN, which the peer takes for a truncation attack), so TLS
    transports answer ``False`` and the caller decides.
    """
    tls = INegotiated.providedBy(transport) or ISSLTransport.providedBy(transport)
    if tls or not hasattr(transport, "loseWriteConnection"):
        return False
    shut_write_now(transport)
    return True


class RelayCounters:
    """Bytes and direction state of one tunnel."""

    __slots__ = (
        "bytes_up",
        "bytes_down",
        "up_closed",
        "down_closed",
        "active",
        "splice_at",
        "meter",
    )

    def __init__(self) -> None:
        self.bytes_up = 0
        self.bytes_down = 0
        self.up_closed = False
        self.down_closed = False
        #: Set on every chunk; the idle check clears it.
        self.active = False
        #: Bytes (both ways) after which the tunnel asks to be handed over
        #: to the zero-copy relay; infinite when it must not or already did.
        self.splice_at: float = NEVER
        #: The bandwidth limits' ``bandwidth.Meter``,
        #: ``None`` (the common case) when none applies.
        self.meter: Any = None

    def due_for_splice(self) -> bool:
        """Whether the tunnel has just passed ``splice_at`` (True only once)."""
        if self.bytes_up + self.bytes_down < self.splice_at:
            return False
        self.splice_at = NEVER
        return True


#: A byte count no tunnel reaches.
NEVER = float("inf")


class RelayingTunnel(TypingProtocol):
    """What the copying relay uses of its :class:`~twisted_socks5.tunnel.Tunnel`."""

    client: Any
    counters: RelayCounters

    def target_eof(self) -> None: ...

    def target_lost(self, reason: Failure) -> None: ...

    def hand_over_to_splice(self) -> None: ...


@implementer(IHalfCloseableProtocol)
class OutboundProtocol(Protocol):
    """
    The destination side of a tunnel.

    It holds back reading until :meth:`start_relay` so that nothing from the
    destination can overtake the SOCKS reply.
    """

    transport: Any

    def __init__(self) -> None:
        self.peer: Optional[ITransport] = None
        self.counters: Optional[RelayCounters] = None
        #: The tunnel this side belongs to once relaying (see tunnel.py);
        #: ``None`` again once the tunnel let go of it.
        self.tunnel: Optional[RelayingTunnel] = None

    #: Fired with this protocol once connected, by the fast connect path.
    connected_deferred: Any = None

    def connectionMade(self) -> None:
        d, self.connected_deferred = self.connected_deferred, None
        if d is not None and not d.called:
            # The fast connect path: the server sends its reply and starts
            # the relay from this callback, before anything can be read.
            d.callback(self)
        if self.counters is None:
            # Not relaying yet (an endpoint's wrapper fires later, or the
            # splice relay waits for the reply to be flushed): hold back what
            # the destination sends, so that it cannot overtake the reply.
            # When relaying already, pausing and resuming at once would
            # only cost two epoll_ctl calls.
            self.transport.pauseProducing()

    def start_relay(self, tunnel: RelayingTunnel) -> None:
        """Copy between this connection and ``tunnel``'s client."""
        self.tunnel = tunnel
        peer = self.peer = tunnel.client
        self.counters = tunnel.counters
        # Each side throttles the other (portforward.ProxyClient).
        peer.registerProducer(self.transport, True)
        self.transport.registerProducer(peer, True)
        self.transport.resumeProducing()
        meter = tunnel.counters.meter
        if meter is not None:  # bandwidth limits: gates between the two
            meter.link(self.transport, peer)

    def dataReceived(self, data: bytes) -> None:
        counters = self.counters
        if counters is None:  # pragma: no cover - reading is paused until then
            return
        counters.bytes_down += len(data)
        counters.active = True
        if write_now(self.peer, data) is not None:
            return  # the client is gone (reset): its transport is aborting
        if counters.meter is not None:
            counters.meter.moved(0, len(data))  # bandwidth.DOWN
        if counters.due_for_splice() and self.tunnel is not None:
            self.tunnel.hand_over_to_splice()

    def readConnectionLost(self) -> None:
        if self.tunnel is not None:
            self.tunnel.target_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None:
            tunnel.target_lost(reason)
