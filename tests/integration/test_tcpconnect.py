"""
tcpconnect.connect_tcp on real loopback sockets: what connectTCP gave the
server (a Twisted TCP transport, Twisted's errors), in fewer steps.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Iterator, List

import pytest
import pytest_twisted
from conftest import LOOPBACKS, Echo, closed_port, until
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock

from twisted_socks5 import tcpconnect
from twisted_socks5.codec import Address
from twisted_socks5.outbound import DirectConnector
from twisted_socks5.relay import OutboundProtocol
from twisted_socks5.splice import plain_tcp
from twisted_socks5.writenow import supported


class Recorder(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.made = 0
        self.reason: Any = None
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.made += 1

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any) -> None:
        self.reason = reason
        self.lost.callback(None)


@pytest.fixture
def echo_server() -> Iterator[Any]:
    ports: List[Any] = []

    def listen(host: str) -> int:
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface=host)
        ports.append(port)
        return int(port.getHost().port)

    yield listen
    for port in ports:
        port.stopListening()


def _open_fds() -> int:
    """Open descriptors (others' may close meanwhile: compare with <=)."""
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def full_listener() -> Iterator[Any]:
    """
    A loopback listener whose accept queue is full: the kernel drops further
    SYNs, so a connect to it neither succeeds nor fails until it times out.
    """
    held: List[socket.socket] = []

    def make() -> int:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        held.append(listener)
        port = int(listener.getsockname()[1])
        for _ in range(3):  # fill the queue (backlog 0 holds one or two)
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            held.append(filler)
        return port

    yield make
    for s in held:
        s.close()


def test_available_only_on_real_posix_reactors() -> None:
    assert tcpconnect.available(reactor)
    assert not tcpconnect.available(MemoryReactorClock())


@pytest.mark.parametrize("host", LOOPBACKS)
@pytest_twisted.ensureDeferred
async def test_connects_with_a_plain_twisted_tcp_transport(
    host: str, echo_server: Any
) -> None:
    port = echo_server(host)
    factory = protocol.Factory.forProtocol(Recorder)
    proto = await tcpconnect.connect_tcp(reactor, host, port, factory, 5)
    assert isinstance(proto, Recorder) and proto.made == 1
    transport = proto.transport
    assert isinstance(transport, tcpconnect.OutboundConnection)
    # What the relays ask of it: write-through, splice, addresses.
    assert supported(transport) and plain_tcp(transport)
    address_type = IPv6Address if ":" in host else IPv4Address
    peer, local = transport.getPeer(), transport.getHost()
    assert type(peer) is address_type and (peer.host, peer.port) == (host, port)
    assert type(local) is address_type and local.host == host and local.port > 0
    assert f"to {host}:{port}" in repr(transport)
    transport.write(b"ping")
    await until(lambda: proto.received == b"ping", "the echo")
    transport.loseConnection()
    await proto.lost
    assert proto.reason.check(error.ConnectionDone)


@pytest.mark.parametrize("host", LOOPBACKS)
@pytest_twisted.ensureDeferred
async def test_refused_is_twisteds_connection_refused(host: str) -> None:
    before = _open_fds()
    factory = protocol.Factory.forProtocol(Recorder)
    with pytest.raises(error.ConnectionRefusedError) as caught:
        await tcpconnect.connect_tcp(reactor, host, closed_port(host), factory, 5)
    assert caught.value.osError == 111  # ECONNREFUSED: reply 0x05
    assert _open_fds() <= before


@pytest_twisted.ensureDeferred
async def test_timeout_fails_with_timeout_error_and_closes(full_listener: Any) -> None:
    port = full_listener()
    before = _open_fds()
    factory = protocol.Factory.forProtocol(Recorder)
    d = tcpconnect.connect_tcp(reactor, "127.0.0.1", port, factory, 30)
    (attempt,) = [w for w in reactor.getWriters() if isinstance(w, tcpconnect._Attempt)]
    attempt.timer.reset(0)  # the 30 s are up on the next turn, not in 30 s
    with pytest.raises(error.TimeoutError):
        await d
    assert _open_fds() <= before
    assert not any(isinstance(w, tcpconnect._Attempt) for w in reactor.getWriters())


@pytest_twisted.ensureDeferred
async def test_cancel_closes_the_socket(full_listener: Any) -> None:
    port = full_listener()
    before = _open_fds()
    factory = protocol.Factory.forProtocol(Recorder)
    d = tcpconnect.connect_tcp(reactor, "127.0.0.1", port, factory, 30)
    assert _open_fds() == before + 1
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    assert _open_fds() <= before
    assert not any(isinstance(w, tcpconnect._Attempt) for w in reactor.getWriters())


@pytest_twisted.ensureDeferred
async def test_bind_address_is_the_local_address(echo_server: Any) -> None:
    port = echo_server("127.0.0.1")
    factory = protocol.Factory.forProtocol(Recorder)
    proto = await tcpconnect.connect_tcp(
        reactor, "127.0.0.1", port, factory, 5, ("127.0.0.2", 0)
    )
    assert proto.transport.getHost().host == "127.0.0.2"
    proto.transport.loseConnection()
    await proto.lost


@pytest_twisted.ensureDeferred
async def test_a_factory_that_builds_nothing_fails_and_closes(echo_server: Any) -> None:
    port = echo_server("127.0.0.1")
    before = _open_fds()

    class Refusing(protocol.Factory):
        def buildProtocol(self, addr: Any) -> None:  # type: ignore[override]
            return None

    with pytest.raises(error.ConnectError):
        await tcpconnect.connect_tcp(reactor, "127.0.0.1", port, Refusing(), 5)
    assert _open_fds() <= before


@pytest_twisted.ensureDeferred
async def test_direct_connector_fast_path_fires_from_connection_made(
    echo_server: Any,
) -> None:
    """
    The server's own outbound factory: the Deferred fires inside
    connectionMade (so the reply goes out before anything is read), once.
    """
    port = echo_server("127.0.0.1")
    inside: List[bool] = []

    class Outbound(OutboundProtocol):
        making = False

        def connectionMade(self) -> None:
            self.making = True
            super().connectionMade()
            self.making = False

    class Factory(protocol.Factory):
        fast_connect = True
        protocol = Outbound

    connector = DirectConnector(reactor, 5)
    d = connector.connect(Address.from_host("127.0.0.1", port), Factory())
    d.addCallback(lambda p: inside.append(p.making) or p)
    proto = await d
    assert inside == [True]
    assert proto.connected_deferred is None
    assert isinstance(proto.transport, tcpconnect.OutboundConnection)
    proto.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_protocol_that_fails_to_start_is_closed_and_reported(
    echo_server: Any,
) -> None:
    port = echo_server("127.0.0.1")
    made: List[Any] = []

    class Broken(Recorder):
        def connectionMade(self) -> None:
            made.append(self)
            raise RuntimeError("connectionMade failed")

    factory = protocol.Factory.forProtocol(Broken)
    with pytest.raises(RuntimeError):
        await tcpconnect.connect_tcp(reactor, "127.0.0.1", port, factory, 5)
    (broken,) = made
    await broken.lost  # the transport was closed, not left registered
    assert broken.reason.check(error.ConnectionAborted)
