"""
Fixtures for tests on the real reactor, on 127.0.0.1 and ::1 only.

Names resolve through :class:`LoopbackResolver`, so no test ever asks the
machine's DNS server anything: ``localhost`` and ``*.test`` names map to the
loopback addresses, everything else fails as a DNS error would.
"""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Any, Dict, Iterator, List

import pytest
import pytest_twisted

# Re-exported: integration tests import them from here.
from helpers import turn as turn
from helpers import until as until
from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
)
from twisted.web import resource, server
from zope.interface import implementer

from twisted_socks5.outbound import DirectConnector
from twisted_socks5.server import SOCKS5ServerFactory
from twisted_socks5.testing import LoopbackResolver as _LoopbackResolver
from twisted_socks5.testing import pattern_chunk


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


HAS_IPV6 = _has_ipv6()
needs_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback here")
LOOPBACKS = ["127.0.0.1", pytest.param("::1", marks=needs_ipv6)]


class LoopbackResolver(_LoopbackResolver):
    """The shared loopback resolver, without IPv6 where ::1 is missing."""

    def __init__(self, v4: bool = True, v6: bool = True) -> None:
        super().__init__(v4, v6 and HAS_IPV6)


def all_closed(factory: SOCKS5ServerFactory, timeout: float = 60) -> Any:
    """A Deferred that fires once the factory has no connection left."""
    d: defer.Deferred[None] = defer.Deferred()
    original = factory.connection_closed

    def closed(protocol: Any, reason: Any) -> None:
        original(protocol, reason)
        if not factory.active and not d.called:
            factory.connection_closed = original  # type: ignore[method-assign]
            d.callback(None)

    if not factory.active:
        d.callback(None)
    else:
        factory.connection_closed = closed  # type: ignore[method-assign]
    return d.addTimeout(timeout, reactor)


def listen(factory: Any, host: str = "127.0.0.1") -> Any:
    return reactor.listenTCP(0, factory, interface=host)


@pytest.fixture
def resolver() -> LoopbackResolver:
    return LoopbackResolver()


@pytest.fixture
def make_proxy(resolver: LoopbackResolver) -> Iterator[Any]:
    """Start a SOCKS5 server on loopback; returns (factory, port number)."""
    ports: List[Any] = []
    factories: List[SOCKS5ServerFactory] = []

    def make(host: str = "127.0.0.1", **kwargs: Any) -> tuple[SOCKS5ServerFactory, int]:
        kwargs.setdefault(
            "connector",
            DirectConnector(
                reactor, kwargs.pop("connect_timeout", 5), resolver=resolver
            ),
        )
        factory = SOCKS5ServerFactory(reactor=reactor, **kwargs)
        port = listen(factory, host)
        ports.append(port)
        factories.append(factory)
        return factory, port.getHost().port

    yield make
    for port in ports:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))
    for factory in factories:
        for p in list(factory.active):
            p.transport.abortConnection()


# --------------------------------------------------------------------------
# Targets


BLOB = os.urandom(1 << 20)


@pytest.fixture(scope="session")
def blob() -> bytes:
    return BLOB


class _Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"hello through socks\n"


class _Blob(resource.Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/octet-stream")
        return BLOB


@pytest.fixture
def http_target(request: Any) -> Iterator[Dict[str, int]]:
    """An HTTP server on 127.0.0.1 and (if present) ::1: / and /blob."""
    root = resource.Resource()
    root.putChild(b"", _Hello())
    root.putChild(b"blob", _Blob())
    site = server.Site(root)
    site.noisy = False
    ports = {"127.0.0.1": listen(site, "127.0.0.1")}
    if HAS_IPV6:
        ports["::1"] = listen(site, "::1")
    yield {host: port.getHost().port for host, port in ports.items()}
    for port in ports.values():
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@implementer(IHalfCloseableProtocol)
class HashSink(protocol.Protocol):
    """Reads until EOF, then answers the sha256 of what it read and closes."""

    def connectionMade(self) -> None:
        self.hash = hashlib.sha256()

    def dataReceived(self, data: bytes) -> None:
        self.hash.update(data)

    def readConnectionLost(self) -> None:
        self.transport.write(self.hash.hexdigest().encode())
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class Source(protocol.Protocol):
    """Sends ``size`` deterministic bytes (from the first line's number), closes."""

    def dataReceived(self, data: bytes) -> None:
        size = int(data.split(b"\n", 1)[0])
        self.transport.registerProducer(_Chunks(self.transport, size), False)


class _Chunks:
    def __init__(self, transport: Any, size: int) -> None:
        self.transport = transport
        self.left = size
        self.counter = 0

    def resumeProducing(self) -> None:
        if self.left <= 0:
            self.transport.unregisterProducer()
            self.transport.loseConnection()
            return
        chunk = pattern_chunk(self.counter)[: self.left]
        self.counter += 1
        self.left -= len(chunk)
        self.transport.write(chunk)

    def stopProducing(self) -> None:
        self.left = 0


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


@pytest.fixture
def tcp_target() -> Iterator[Any]:
    """Start a target protocol factory on a loopback address."""
    ports: List[Any] = []
    accepted: List[Any] = []

    def make(protocol_class: type, host: str = "127.0.0.1") -> int:
        factory = protocol.Factory.forProtocol(protocol_class)
        factory.noisy = False
        build = factory.buildProtocol

        def remember(addr: Any) -> Any:
            built = build(addr)
            accepted.append(built)
            return built

        factory.buildProtocol = remember  # type: ignore[method-assign]
        port = listen(factory, host)
        ports.append(port)
        return int(port.getHost().port)

    yield make
    for port in ports:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))
    # Targets that never read would otherwise keep their sockets (and the
    # megabytes queued in them) until the test process ends.
    for target in accepted:
        if target.transport is not None and target.transport.connected:
            target.transport.abortConnection()


def closed_port(host: str = "127.0.0.1") -> int:
    """A loopback port nobody listens on (bound then closed, not listening)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
