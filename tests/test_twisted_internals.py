"""
The canary for Twisted's private attributes (``twisted_socks5/_twisted.py``).

A Twisted upgrade that renames or changes anything the proxy relies on fails
here, naming it, before it can switch a fast path or a safety check off
unnoticed; the fallbacks are tested by taking the attributes away.  When
this fails: read the new Twisted's code for the attribute named, update
``_twisted.py`` (its ``typing.Protocol`` classes and functions), and keep
these tests passing on the oldest Twisted tox runs too.
"""

from __future__ import annotations

import inspect
import re
import socket
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import pytest
from twisted.internet import defer, ssl, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IHalfCloseableProtocol, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols.haproxy import proxyEndpoint
from zope.interface import implementer

from twisted_socks5 import _twisted, writenow
from twisted_socks5.exposure import exposed
from twisted_socks5.splice import plain_tcp
from twisted_socks5.tap import ListeningService
from twisted_socks5.tcpconnect import OutboundConnection
from twisted_socks5.workers import tcp_listener

PACKAGE = Path(_twisted.__file__).parent
#: Private names no module but _twisted.py may use.
PRIVATE_NAMES = (
    "_tempDataLen",
    "_tempDataBuffer",
    "_writeDisconnecting",
    "_writeDisconnected",
    "_shouldShutdown",
    "_closeWriteConnection",
    "_proxyInfo",
    "_interface",
    "_backlog",
    "_raiseSynchronously",
    "_waitingForPort",
    "_addressType",
    "dataBuffer",
)


class Quiet(Protocol):
    pass


@pytest.fixture
def transport() -> Iterator[tcp.Server]:
    """A Twisted TCP transport on a real loopback socket (no reactor turns)."""
    listener = socket.create_server(("127.0.0.1", 0))
    near = socket.create_connection(listener.getsockname())
    far, _ = listener.accept()
    listener.close()
    near.setblocking(False)
    t = OutboundConnection(near, Quiet(), far.getsockname(), MemoryReactor())
    try:
        yield t
    finally:
        near.close()
        far.close()


@pytest.mark.parametrize("name", _twisted.TRANSPORT_ATTRIBUTES)
def test_tcp_transport_has_every_attribute_relied_on(
    transport: tcp.Server, name: str
) -> None:
    assert hasattr(transport, name), (
        f"Twisted's TCP transport has no {name!r} any more: update "
        "twisted_socks5/_twisted.py (TCPTransportInternals)"
    )


def test_the_lists_are_the_protocol_classes() -> None:
    """The names checked are exactly those the typing.Protocol declares."""
    assert set(_twisted.TRANSPORT_ATTRIBUTES) >= {
        "dataBuffer",
        "offset",
        "_tempDataLen",
        "_writeDisconnecting",
        "_writeDisconnected",
        "_shouldShutdown",
        "_closeWriteConnection",
        "TLS",
    }
    assert _twisted.ENDPOINT_ATTRIBUTES == ("_interface", "_port", "_backlog")


def test_write_buffer_attributes_mean_what_we_read(transport: tcp.Server) -> None:
    """dataBuffer[offset:] plus _tempDataLen is what waits to be sent."""
    assert _twisted.supported(transport)
    assert _twisted.write_idle(transport)
    assert _twisted.write_buffered(transport) == 0
    transport.write(b"abc")  # queued: the (memory) reactor never runs doWrite
    assert _twisted.write_buffered(transport) == 3
    assert not _twisted.write_idle(transport)
    assert transport._shouldShutdown is True
    _twisted.skip_shutdown(transport)
    assert transport._shouldShutdown is False


def test_shut_write_is_what_loseWriteConnection_comes_to(
    transport: tcp.Server,
) -> None:
    ended: List[bool] = []

    @implementer(IHalfCloseableProtocol)
    class HalfClosing(Protocol):
        def readConnectionLost(self) -> None:
            pass

        def writeConnectionLost(self) -> None:
            ended.append(True)

    transport.protocol = HalfClosing()
    assert not _twisted.write_shut(transport)
    _twisted.shut_write(transport)
    assert _twisted.write_shut(transport) and ended == [True]
    with pytest.raises(OSError):  # shutdown(SHUT_WR) happened
        transport.socket.send(b"x")
    transport.loseWriteConnection()  # Twisted agrees: nothing left to do


def test_tcp_server_is_built_as_tcpconnect_builds_it() -> None:
    """OutboundConnection passes tcp.Server's arguments by position."""
    names = list(inspect.signature(tcp.Server.__init__).parameters)
    assert names[:7] == [
        "self",
        "sock",
        "protocol",
        "client",
        "server",
        "sessionno",
        "reactor",
    ]


@pytest.mark.parametrize(
    "peer, address_type",
    [
        (("127.0.0.1", 9), IPv4Address),
        (("::1", 9, 0, 0), IPv6Address),  # a 4-tuple: Twisted picks IPv6
    ],
)
def test_a_4_tuple_peer_is_an_ipv6_address(
    peer: Tuple[Any, ...], address_type: type
) -> None:
    family = socket.AF_INET6 if len(peer) == 4 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        t = OutboundConnection(sock, Quiet(), peer, MemoryReactor())
        got = t.getPeer()
        assert type(got) is address_type
        assert (got.host, got.port) == peer[:2]  # type: ignore[union-attr]
    finally:
        sock.close()


# Twisted's own TLS certificate, as its tests use it.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_start_tls_marks_the_transport_for_the_splice_check(
    transport: tcp.Server,
) -> None:
    """splice.plain_tcp refuses TLS by this public mark (no private TLS flag)."""
    pem = Path(ssl.__file__).parent.parent / "test" / "server.pem"
    certificate = ssl.PrivateCertificate.loadPEM(pem.read_bytes())
    transport.startTLS(certificate.options())
    assert ISSLTransport.providedBy(transport)
    assert not plain_tcp(transport)


# Fallbacks: a Twisted that renamed something keeps working, safely.


def test_a_transport_without_the_attributes_gets_the_public_api(
    transport: tcp.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    renamed = (*_twisted.TRANSPORT_ATTRIBUTES, "_renamedInANewerTwisted")
    monkeypatch.setattr(_twisted, "TRANSPORT_ATTRIBUTES", renamed)
    monkeypatch.setattr(_twisted, "_supported", {})
    assert not _twisted.supported(transport)
    assert not _twisted.write_idle(transport)
    assert not _twisted.write_shut(transport)
    writenow.write_now(transport, b"later")  # transport.write: queued
    assert transport._tempDataBuffer == [b"later"]
    _twisted.skip_shutdown(transport)
    assert transport._shouldShutdown is True


def test_the_stall_watch_falls_back_to_the_flow_control_flag(
    transport: tcp.Server,
) -> None:
    """Not 0 for ever (the stall timeout silently off): paused means stalled."""
    del transport._tempDataLen
    assert _twisted.write_buffered(transport) == 0
    transport.producerPaused = True
    assert _twisted.write_buffered(transport) == 1
    assert _twisted.write_buffered(StringTransport()) == 0  # unknown: not stalled


# HAProxy: the rules must never see HAProxy's address as the client's.


def _wrapped() -> Tuple[Any, List[bool]]:
    """An haproxy: endpoint's connection, as our protocol sees it."""
    seen: List[bool] = []

    class Recorder(Protocol):
        def connectionMade(self) -> None:
            seen.append(_twisted.awaiting_proxy_header(self.transport))

    reactor = MemoryReactor()
    haproxy = IPv4Address("TCP", "127.0.0.1", 40000)
    proxyEndpoint(serverFromString(reactor, "tcp:0")).listen(
        Factory.forProtocol(Recorder)
    )
    wrapper = reactor.tcpServers[0][1].buildProtocol(haproxy)
    wrapper.makeConnection(StringTransport(peerAddress=haproxy))
    return wrapper, seen


def test_the_proxy_header_is_awaited_then_names_the_client() -> None:
    assert _twisted.HAProxyProtocolWrapper is not None
    wrapper, seen = _wrapped()
    assert isinstance(wrapper, _twisted.HAProxyProtocolWrapper)
    assert seen == [True]
    assert getattr(wrapper, _twisted.PROXY_HEADER_ATTRIBUTE) is None
    wrapper.dataReceived(b"PROXY TCP4 127.0.0.9 127.0.0.1 4000 1080\r\n")
    assert not _twisted.awaiting_proxy_header(wrapper)
    assert wrapper.getPeer().host == "127.0.0.9"


def test_plain_transports_await_no_header(transport: tcp.Server) -> None:
    assert not _twisted.awaiting_proxy_header(transport)
    assert not _twisted.awaiting_proxy_header(StringTransport())


def test_a_renamed_header_attribute_still_awaits_the_header(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Taken as unnamed until its first data, not as HAProxy itself."""
    wrapper, _ = _wrapped()
    monkeypatch.setattr(_twisted, "PROXY_HEADER_ATTRIBUTE", "_renamed")
    assert _twisted.awaiting_proxy_header(wrapper)
    monkeypatch.setattr(_twisted, "HAProxyProtocolWrapper", None)  # class moved
    assert _twisted.awaiting_proxy_header(wrapper)


# TCP endpoints: --workers and the exposure check read their address.


@pytest.mark.parametrize(
    "description, expected",
    [
        ("tcp:1080:interface=127.0.0.1:backlog=7", ("127.0.0.1", 1080, 7)),
        (r"tcp6:1081:interface=\:\:1", ("::1", 1081, 50)),
        ("tcp:1082", ("", 1082, 50)),
    ],
)
def test_tcp_endpoints_tell_their_address(
    description: str, expected: Tuple[str, int, int]
) -> None:
    endpoint = serverFromString(MemoryReactor(), description)
    for name in _twisted.ENDPOINT_ATTRIBUTES:
        assert hasattr(endpoint, name), (
            f"Twisted's TCP server endpoint has no {name!r} any more: update "
            "twisted_socks5/_twisted.py (TCPServerEndpointInternals)"
        )
    assert _twisted.endpoint_address(endpoint) == expected


def test_an_unreadable_endpoint_is_refused_or_taken_as_exposed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_twisted, "endpoint_address", lambda endpoint: None)
    monkeypatch.setattr("twisted_socks5.exposure.endpoint_address", lambda e: None)
    monkeypatch.setattr("twisted_socks5.workers.endpoint_address", lambda e: None)
    with pytest.raises(ValueError, match="cannot read the address"):
        tcp_listener(MemoryReactor(), "tcp:1080:interface=127.0.0.1")
    assert exposed("tcp:1080:interface=127.0.0.1")
    assert _twisted.endpoint_address(object()) is None


# Listening with public API only (instead of _raiseSynchronously and
# _waitingForPort on StreamServerEndpointService).


class Port:
    listening = True

    def stopListening(self) -> None:
        self.listening = False


class Endpoint:
    def __init__(self, result: Any) -> None:
        self.result = result

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        if isinstance(self.result, Exception):
            return defer.fail(self.result)
        return defer.succeed(self.result)


def test_listening_service_fires_with_the_port_and_stops_it() -> None:
    port = Port()
    service = ListeningService(Endpoint(port), Factory())  # type: ignore[arg-type]
    service.privilegedStartService()
    service.startService()
    ports: List[Any] = []
    assert service.listening is not None
    service.listening.addCallback(lambda p: ports.append(p) or p)
    assert ports == [port]
    stopped = service.stopService()
    assert stopped.called and not port.listening


def test_listening_service_raises_at_start_up_when_the_port_is_taken() -> None:
    taken = CannotListenError("127.0.0.1", 1080, OSError("taken"))
    service = ListeningService(Endpoint(taken), Factory())  # type: ignore[arg-type]
    with pytest.raises(CannotListenError):
        service.privilegedStartService()


def test_private_names_are_used_only_in_the_internals_module() -> None:
    names = "|".join(PRIVATE_NAMES)
    pattern = re.compile(rf"""[."']({names})\b""")
    for path in sorted(PACKAGE.glob("**/*.py")):
        if path.name == "_twisted.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not pattern.search(line), (
                f"{path.name}:{number} uses a Twisted private attribute; "
                f"go through twisted_socks5/_twisted.py: {line.strip()}"
            )
