"""
Flow control on real sockets: a fast sender and a receiver that stops
reading must not grow the proxy's buffers; once the receiver reads again,
every byte arrives intact.
"""

from __future__ import annotations

from typing import Any, List, Optional

import pytest_twisted
from conftest import HashSink, turn
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from zope.interface import implementer

from twisted_socks5.codec import Address, Command, Request
from twisted_socks5.testing import pattern_chunk, pattern_sha256

TOTAL = 64 << 20
#: Two socket reads (64 KiB each) per direction plus Twisted's write
#: threshold: the most a tunnel should ever hold in user space.
BOUND = 512 * 1024


def buffered(transport: Any) -> int:
    """Bytes waiting in a Twisted TCP transport's user-space write buffer."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class StallingSink(HashSink):
    """A HashSink that does not read until told to."""

    instances: List[StallingSink] = []

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.pauseProducing()
        StallingSink.instances.append(self)


@implementer(IPushProducer, IHalfCloseableProtocol)
class FastSender(protocol.Protocol):
    """SOCKS handshake, then writes as fast as the transport lets it."""

    def __init__(self, request: bytes, on_progress: Any) -> None:
        self.request = request
        self.on_progress = on_progress
        self.sent = 0
        self.chunk_index = 0
        self.paused = False
        self.relaying = False
        self.received = b""
        self.reply: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"\x05\x01\x00" + self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.relaying and len(self.received) >= 12:
            self.relaying = True
            self.received = self.received[12:]
            self.transport.registerProducer(self, True)
            self.resumeProducing()
        elif self.relaying and len(self.received) == 64:
            self.reply.callback(self.received)

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.sent < TOTAL:
            chunk = pattern_chunk(self.chunk_index)[: TOTAL - self.sent]
            self.chunk_index += 1
            self.sent += len(chunk)
            self.transport.write(chunk)
            self.on_progress()
        if self.sent >= TOTAL and not self.paused:
            self.transport.unregisterProducer()
            self.transport.loseWriteConnection()

    def pauseProducing(self) -> None:
        self.paused = True
        self.on_progress()

    def stopProducing(self) -> None:
        self.paused = True

    def readConnectionLost(self) -> None:
        pass

    def writeConnectionLost(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_slow_receiver_keeps_proxy_buffers_bounded(
    make_proxy: Any, tcp_target: Any
) -> None:
    StallingSink.instances.clear()
    factory, port = make_proxy()
    sink_port = tcp_target(StallingSink)
    peak = [0]

    def proxy_buffered() -> int:
        total = 0
        for p in factory.active:
            total += buffered(p.transport)
            if p.tunnel is not None and p.tunnel.outbound is not None:
                total += buffered(p.tunnel.outbound.transport)
        return total

    def on_progress() -> None:
        peak[0] = max(peak[0], proxy_buffered())

    request = Request(Command.CONNECT, Address.from_host("127.0.0.1", sink_port))
    sender = FastSender(request.to_bytes(), on_progress)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), sender)

    # Wait (in reactor turns, not seconds) until nothing moves any more:
    # the sink reads nothing, so kernel buffers fill and the proxy must stop
    # reading from the sender.
    last: Optional[int] = None
    still = 0
    for _ in range(200_000):
        await turn()
        on_progress()
        if sender.sent == last and sender.paused:
            still += 1
            if still >= 200:
                break
        else:
            still = 0
        last = sender.sent
    assert still >= 200, "the sender never stalled"
    assert sender.sent < TOTAL, "everything fit in kernel buffers: test is void"
    assert peak[0] <= BOUND, f"proxy buffered {peak[0]} bytes"
    (server_side,) = factory.active
    assert server_side.counters.bytes_up < TOTAL

    # Now let the sink read: all 64 MiB must arrive, in order.
    (sink,) = StallingSink.instances
    sink.transport.resumeProducing()
    digest = await sender.reply.addTimeout(120, reactor)
    assert digest.decode() == pattern_sha256(TOTAL)
    assert peak[0] <= BOUND, f"proxy buffered {peak[0]} bytes"
    sender.transport.loseConnection()
