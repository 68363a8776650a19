"""
In-memory doubles for driving the server protocol without sockets, and
bounded waits for tests on the real reactor.
"""

from __future__ import annotations

import datetime
from typing import Any, Callable, List, Optional, Tuple

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from twisted_socks5.codec import Address
from twisted_socks5.outbound import IOutboundConnector
from twisted_socks5.server import SOCKS5ServerFactory, SOCKS5ServerProtocol
from twisted_socks5.testing import HalfCloseTransport

CLIENT = IPv4Address("TCP", "127.0.0.1", 40000)
SERVER = IPv4Address("TCP", "127.0.0.1", 1080)
OUTBOUND_LOCAL = IPv4Address("TCP", "127.0.0.1", 50000)
TARGET = IPv4Address("TCP", "127.0.0.1", 8080)


@implementer(IOutboundConnector)
class FakeConnector:
    """Records connect() calls; the test decides how each one ends."""

    timeout = 10.0

    def __init__(self) -> None:
        self.calls: List[Tuple[Address, IProtocolFactory, defer.Deferred[Any]]] = []
        self.cancelled = 0
        self.lookups: List[Tuple[str, defer.Deferred[Any]]] = []

    def connect(
        self, address: Address, factory: IProtocolFactory
    ) -> defer.Deferred[Any]:
        def cancel(d: defer.Deferred[Any]) -> None:
            self.cancelled += 1

        d: defer.Deferred[Any] = defer.Deferred(cancel)
        self.calls.append((address, factory, d))
        return d

    def resolve(self, name: str) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.lookups.append((name, d))
        return d

    def succeed(self, index: int = -1) -> Tuple[Any, HalfCloseTransport]:
        """Complete a pending connect with an in-memory outbound transport."""
        address, factory, d = self.calls[index]
        protocol = factory.buildProtocol(TARGET)
        transport = HalfCloseTransport(OUTBOUND_LOCAL, TARGET)
        protocol.makeConnection(transport)
        d.callback(protocol)
        return protocol, transport

    def fail(self, exception: BaseException, index: int = -1) -> None:
        self.calls[index][2].errback(exception)


class Harness:
    """A server protocol on a StringTransport with a clock and fake connector."""

    def __init__(self, local: Any = SERVER, **factory_kwargs: Any) -> None:
        self.reactor = UDPReactor()
        self.connector = FakeConnector()
        factory_kwargs.setdefault("connector", self.connector)
        self.factory = SOCKS5ServerFactory(reactor=self.reactor, **factory_kwargs)
        self.protocol: SOCKS5ServerProtocol = self.factory.buildProtocol(CLIENT)
        #: ``local``: the server's end, the address the client connected to.
        self.transport = HalfCloseTransport(local, CLIENT)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def take(self) -> bytes:
        """Bytes written to the client since the last take()."""
        value = self.transport.value()
        self.transport.clear()
        return value

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting or self.transport.disconnected)

    def lose(self, reason: Optional[Any] = None) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        # As Twisted's transports do, before telling the protocol.
        self.transport.disconnected = True
        self.protocol.connectionLost(Failure(reason or ConnectionDone()))


class FakeUDPPort:
    """A listening UDP port that records what is written through it."""

    def __init__(self, protocol: Any, interface: str, port: int) -> None:
        self.protocol = protocol
        self.interface = interface
        self.port = port
        self.written: List[Tuple[bytes, Tuple[str, int]]] = []
        self.listening = True
        #: Raised by write() when set (a send the kernel refuses).
        self.fail: Optional[Exception] = None

    def getHost(self) -> Any:
        from twisted.internet.address import IPv4Address, IPv6Address

        if ":" in self.interface:
            return IPv6Address("UDP", self.interface, self.port)
        return IPv4Address("UDP", self.interface, self.port)

    def write(self, data: bytes, addr: Tuple[str, int]) -> None:
        if self.fail is not None:
            raise self.fail
        self.written.append((data, addr))

    def stopListening(self) -> None:
        self.listening = False


class UDPReactor(MemoryReactorClock):
    """MemoryReactorClock with a listenUDP that hands out FakeUDPPorts."""

    def __init__(self) -> None:
        super().__init__()
        self.udp_ports: List[FakeUDPPort] = []

    def listenUDP(
        self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192
    ) -> FakeUDPPort:
        self.max_packet_size = maxPacketSize
        fake = FakeUDPPort(protocol, interface, 30000 + len(self.udp_ports))
        protocol.transport = fake
        self.udp_ports.append(fake)
        return fake


def turn() -> defer.Deferred[None]:
    """One reactor iteration (an event, not a timed wait)."""
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(0, d.callback, None)
    return d


#: How long a test waits for something that should happen at once before
#: it fails (a bound, never a measure: no test asserts on time).
GIVE_UP_AFTER = 60.0


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Let the reactor run until ``predicate`` holds (bounded, no sleeping)."""
    deadline = reactor.seconds() + GIVE_UP_AFTER
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"never happened: {what}")
        await turn()


async def within(d: defer.Deferred[Any], what: str) -> Any:
    """``await d``, failing the test instead of hanging if it never fires."""
    try:
        return await d.addTimeout(GIVE_UP_AFTER, reactor)
    except defer.TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


def self_signed(name: str) -> tuple[bytes, bytes]:
    """A throwaway certificate for ``name`` (with the SAN TLS clients check)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)
