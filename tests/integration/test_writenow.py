"""
Write-through (``twisted_socks5.writenow``) on real loopback connections: it
sends at once only when Twisted holds nothing for the socket, keeps the
order of bytes, hands the rest of a partial send to Twisted, and leaves
every transport it does not know to ``transport.write``.
"""

from __future__ import annotations

import hashlib
import select
import socket
from typing import Any, List, Optional

import pytest
import pytest_twisted
from conftest import listen, until
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_socks5 import writenow
from twisted_socks5.writenow import write_now


class _Collect(protocol.Protocol):
    """The far end: collects what arrives, until the connection closes."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(bytes(self.data))


async def _pair(near: Optional[protocol.Protocol] = None) -> tuple[Any, _Collect]:
    """A connected client transport (of ``near``) and the server end's protocol."""
    accepted: List[_Collect] = []
    arrived: defer.Deferred[None] = defer.Deferred()

    class Factory(protocol.Factory):
        def buildProtocol(self, addr: Any) -> _Collect:
            far = _Collect()
            accepted.append(far)
            reactor.callLater(0, arrived.callback, None)
            return far

    port = listen(Factory(), "127.0.0.1")
    near = await connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
        near or protocol.Protocol(),
    )
    await arrived
    await port.stopListening()
    return near.transport, accepted[0]


def _queued(transport: Any) -> int:
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@pytest_twisted.ensureDeferred
async def test_sends_at_once_when_nothing_is_queued() -> None:
    transport, far = await _pair()
    assert writenow.supported(transport)
    write_now(transport, b"hello")
    assert _queued(transport) == 0  # in the kernel already, not in Twisted
    transport.loseConnection()
    assert await far.done == b"hello"


@pytest_twisted.ensureDeferred
async def test_queues_behind_what_twisted_holds() -> None:
    transport, far = await _pair()
    transport.write(b"first ")  # queued until the next reactor turn
    write_now(transport, b"second")
    assert _queued(transport) == len(b"first second")
    transport.loseConnection()
    assert await far.done == b"first second"


@pytest_twisted.ensureDeferred
async def test_a_partial_send_leaves_the_rest_to_twisted_in_order() -> None:
    transport, far = await _pair()
    transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    far.transport.pauseProducing()  # the far end stops reading for a while
    blob = bytes(range(256)) * 16 * 1024  # 4 MiB: more than the socket takes
    half = len(blob) // 2
    write_now(transport, blob[:half])
    held = _queued(transport)
    assert 0 < held < half, "expected a partial send"
    write_now(transport, blob[half:])  # queued behind the rest
    assert _queued(transport) == held + half
    far.transport.resumeProducing()
    transport.loseConnection()
    received = await far.done
    assert hashlib.sha256(received).digest() == hashlib.sha256(blob).digest()


@pytest_twisted.ensureDeferred
async def test_a_pending_half_close_is_left_to_twisted() -> None:
    """
    Between loseWriteConnection() and the FIN, Twisted still sends what is
    written (queued before the FIN); write_now must not jump that queue.
    """
    transport, far = await _pair()
    transport.loseWriteConnection()
    write_now(transport, b"still sent, before the FIN")
    assert _queued(transport) == len(b"still sent, before the FIN")
    transport.loseConnection()
    assert await far.done == b"still sent, before the FIN"


def test_unknown_transports_get_write() -> None:
    transport = StringTransport()
    assert not writenow.supported(transport)
    write_now(transport, b"through write()")
    assert transport.value() == b"through write()"


@implementer(IHalfCloseableProtocol)
class _Watch(protocol.Protocol):
    """Records whether the connection ended with a clean EOF or an error."""

    def __init__(self) -> None:
        self.read_eof = False
        self.lost: defer.Deferred[BaseException] = defer.Deferred()

    def readConnectionLost(self) -> None:
        self.read_eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback(reason.value)


@pytest_twisted.ensureDeferred
async def test_a_reset_seen_by_a_write_is_a_reset_not_an_eof() -> None:
    """
    A send that meets a reset consumes the socket's error: left to Twisted,
    the next read would find a clean EOF, and a proxy would pass a reset
    destination on as a complete answer.  write_now aborts instead.
    """
    near = _Watch()
    transport, far = await _pair(near)
    transport.pauseProducing()  # the reset must not be read first
    far.transport.abortConnection()  # Twisted closes it with a reset
    await far.done
    # On loopback the reset is delivered within the close() that sent it.
    poller = select.poll()
    poller.register(transport.getHandle(), select.POLLERR)
    assert poller.poll(0), "the reset has not arrived"
    failed = write_now(near.transport, b"into a reset connection")
    assert isinstance(failed, ConnectionResetError), failed
    reason = await near.lost
    assert not isinstance(reason, error.ConnectionDone), reason
    assert not near.read_eof, "the reset was taken for a clean EOF"


@implementer(IHalfCloseableProtocol)
class _HalfCloser(protocol.Protocol):
    """The near end: counts writeConnectionLost, keeps reading after our FIN."""

    def __init__(self) -> None:
        self.write_lost = 0
        self.data = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.write_lost += 1


@implementer(IHalfCloseableProtocol)
class _AnswerAfterEof(_Collect):
    """The far end answers once our FIN arrives: the read side stays open."""

    def readConnectionLost(self) -> None:
        self.transport.write(b"answer after your FIN")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_shut_write_now_sends_the_fin_at_once_and_keeps_reading() -> None:
    accepted: List[_AnswerAfterEof] = []

    class Factory(protocol.Factory):
        def buildProtocol(self, addr: Any) -> _AnswerAfterEof:
            accepted.append(_AnswerAfterEof())
            return accepted[-1]

    port = listen(Factory(), "127.0.0.1")
    near = _HalfCloser()
    await connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), near
    )
    await port.stopListening()
    transport = near.transport
    write_now(transport, b"request")
    writenow.shut_write_now(transport)
    # Done within the call: Twisted's state, the FIN, writeConnectionLost.
    assert transport._writeDisconnected and near.write_lost == 1
    view = socket.socket(fileno=transport.fileno())
    try:
        with pytest.raises(BrokenPipeError):  # our side is shut already
            view.send(b"x", socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
    finally:
        view.detach()
    await until(lambda: bool(accepted) and accepted[0].done.called, "the FIN")
    assert await accepted[0].done == b"request"
    await until(lambda: not transport.connected, "the far end's close")
    assert bytes(near.data) == b"answer after your FIN"
    assert near.write_lost == 1


@pytest_twisted.ensureDeferred
async def test_shut_write_now_leaves_a_queue_to_twisted() -> None:
    """With bytes still queued the FIN must follow them: Twisted's way."""
    transport, far = await _pair()
    transport.write(b"queued in Twisted")
    writenow.shut_write_now(transport)
    assert not transport._writeDisconnected and transport._writeDisconnecting
    transport.loseConnection()
    assert await far.done == b"queued in Twisted"


def test_shut_write_now_on_unknown_transports_is_lose_write_connection() -> None:
    class HalfClosable(StringTransport):
        write_closed = 0

        def loseWriteConnection(self) -> None:
            self.write_closed += 1

    transport = HalfClosable()
    writenow.shut_write_now(transport)
    assert transport.write_closed == 1


@implementer(IHalfCloseableProtocol)
class _StaysOpen(protocol.Protocol):
    """The near end: notes the peer's FIN and keeps the connection open."""

    def __init__(self) -> None:
        self.read_eof = False
        self.reasons: List[Failure] = []

    def readConnectionLost(self) -> None:
        self.read_eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reasons.append(reason)


@pytest_twisted.ensureDeferred
async def test_close_ended_closes_a_socket_ended_both_ways_at_once() -> None:
    near = _StaysOpen()
    transport, far = await _pair(near)
    sock = transport.socket
    writenow.shut_write_now(transport)  # our FIN; the far end closes on it
    await far.done
    await until(lambda: near.read_eof, "the far end's FIN")
    writenow.close_ended(transport)
    # Closed within the call, as a clean close with the one shared reason
    # (Twisted's loseConnection would build a Failure), unwatched, and
    # without Twisted's shutdown(SHUT_RDWR), which would fail with ENOTCONN.
    assert near.reasons == [writenow._CLEAN_CLOSE]
    assert near.reasons[0].type is error.ConnectionDone
    assert transport._shouldShutdown is False
    assert not transport.connected and sock.fileno() == -1
    assert transport not in reactor.getReaders()
    assert transport not in reactor.getWriters()


@pytest_twisted.ensureDeferred
async def test_close_ended_of_an_open_socket_is_twisteds() -> None:
    """Our write side still open: Twisted's loseConnection, queue first."""
    near = _StaysOpen()
    transport, far = await _pair(near)
    transport.write(b"queued in Twisted")
    writenow.close_ended(transport)
    assert transport.connected and transport.disconnecting and not near.reasons
    assert transport._shouldShutdown  # Twisted's close, shutdown included
    assert await far.done == b"queued in Twisted"
    await until(lambda: bool(near.reasons), "the close")
    assert near.reasons[0].type is error.ConnectionDone


def test_close_ended_of_unknown_transports_is_lose_connection() -> None:
    transport = StringTransport()
    writenow.close_ended(transport)
    assert transport.disconnecting
    assert not hasattr(transport, "_shouldShutdown")
