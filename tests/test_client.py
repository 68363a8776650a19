"""
The SOCKS5 client endpoint in memory: exact bytes out, server replies in, no
sockets and no clock but a fake one.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any, Dict, List, Optional, Tuple

import pytest
from helpers import FakeConnector
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import HostnameAddress, IPv4Address, IPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    UNIXClientEndpoint,
    clientFromString,
)
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
    NoProtocol,
)
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHostnameResolver,
    IProtocolFactory,
    IPushProducer,
    IResolutionReceiver,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from twisted_socks5 import client
from twisted_socks5.client import (
    REPLY_ERRORS,
    AddressTypeNotSupported,
    AuthenticationFailed,
    CommandNotSupported,
    ConnectionNotAllowed,
    ConnectionRefused,
    GeneralServerFailure,
    HandshakeTimeout,
    HostUnreachable,
    MalformedReply,
    NetworkUnreachable,
    NoAcceptableMethods,
    ProxyConnectionLost,
    SOCKS5ClientEndpoint,
    SOCKS5Error,
    SOCKS5ReplyError,
    SOCKS5Transport,
    TTLExpired,
)
from twisted_socks5.codec import Address, AddressType, ReplyCode
from twisted_socks5.server import SOCKS5ServerFactory
from twisted_socks5.testing import HalfCloseTransport

LOCAL = IPv4Address("TCP", "127.0.0.1", 40000)
PROXY = IPv4Address("TCP", "127.0.0.1", 1080)

NO_AUTH = b"\x05\x00"
#: A success reply, BND = 127.0.0.1:50000.
OK_REPLY = b"\x05\x00\x00\x01\x7f\x00\x00\x01\xc3\x50"
REQUEST_WEB_TEST_80 = b"\x05\x01\x00\x03\x08web.test\x00\x50"


# --------------------------------------------------------------------------
# Doubles


class ProxyTransport(HalfCloseTransport):
    """The connection to the proxy, in memory."""

    def __init__(self) -> None:
        super().__init__(hostAddress=LOCAL, peerAddress=PROXY)

    def take(self) -> bytes:
        value = self.value()
        self.clear()
        return value


@implementer(IStreamClientEndpoint)
class FakeProxy:
    """A proxy endpoint whose connection attempts the test completes or fails."""

    def __init__(self) -> None:
        self.attempts: List[Tuple[IProtocolFactory, defer.Deferred[Any]]] = []
        self.cancelled = 0

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[Any]:
        def cancel(d: defer.Deferred[Any]) -> None:
            self.cancelled += 1
            d.errback(ConnectingCancelledError(PROXY))

        d: defer.Deferred[Any] = defer.Deferred(cancel)
        self.attempts.append((factory, d))
        return d

    def complete(self) -> Tuple[Any, ProxyTransport]:
        factory, d = self.attempts[-1]
        protocol = factory.buildProtocol(PROXY)
        transport = ProxyTransport()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        d.callback(protocol)
        return protocol, transport


class App(Protocol):
    """Records what the application side sees."""

    def __init__(self) -> None:
        self.events: List[Any] = []
        self.data = b""

    def connectionMade(self) -> None:
        self.events.append("made")

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.events.append(("data", data))

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.events.append(("lost", reason.type))


@implementer(IHalfCloseableProtocol)
class HalfCloseApp(App):
    def readConnectionLost(self) -> None:
        self.events.append("read closed")

    def writeConnectionLost(self) -> None:
        self.events.append("write closed")


class PausingApp(App):
    """Stops reading as soon as it is connected."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.pauseProducing()


class Attempt:
    """One connect() through a FakeProxy, with the server side in the test's hands."""

    def __init__(
        self,
        host: str = "web.test",
        port: int = 80,
        app: type = App,
        complete: bool = True,
        **kwargs: Any,
    ) -> None:
        self.proxy = FakeProxy()
        self.endpoint = SOCKS5ClientEndpoint(self.proxy, host, port, **kwargs)
        self.factory = Factory.forProtocol(app)
        self.d = self.endpoint.connect(self.factory)
        self.results: List[Any] = []
        self.d.addBoth(self._record)
        if complete:
            self.socks, self.transport = self.proxy.complete()

    def _record(self, result: Any) -> Any:
        """Keep the outcome; later callbacks still get the protocol."""
        self.results.append(result)
        return None if isinstance(result, Failure) else result

    def server(self, data: bytes) -> None:
        self.socks.dataReceived(data)

    def handshake(self, reply: bytes = OK_REPLY) -> Any:
        """Play a no-auth server up to the reply; return the app protocol."""
        assert self.transport.take() == b"\x05\x01\x00"
        self.server(NO_AUTH)
        self.transport.take()
        self.server(reply)
        return self.result()

    def result(self) -> Any:
        assert len(self.results) == 1, self.results
        return self.results[0]

    def failure(self) -> Failure:
        result = self.result()
        assert isinstance(result, Failure), result
        return result

    @property
    def pending(self) -> bool:
        return not self.results


# --------------------------------------------------------------------------
# Exact bytes


def test_greeting_offers_no_authentication() -> None:
    attempt = Attempt()
    assert attempt.transport.value() == b"\x05\x01\x00"
    assert attempt.pending


def test_greeting_with_credentials_offers_both_methods() -> None:
    attempt = Attempt(username="alice", password="s3cret")
    assert attempt.transport.value() == b"\x05\x02\x00\x02"


@pytest.mark.parametrize(
    ("host", "port", "request_bytes"),
    [
        ("127.0.0.1", 80, b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"),
        ("::1", 443, b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01\x01\xbb"),
        ("::ffff:127.0.0.1", 80, b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"),
        ("web.test", 80, REQUEST_WEB_TEST_80),
        (b"web.test", 80, REQUEST_WEB_TEST_80),
        ("bücher.test", 8080, b"\x05\x01\x00\x03\x12xn--bcher-kva.test\x1f\x90"),
        ("a" * 255, 1, b"\x05\x01\x00\x03\xff" + b"a" * 255 + b"\x00\x01"),
    ],
)
def test_request_bytes(host: Any, port: int, request_bytes: bytes) -> None:
    attempt = Attempt(host, port)
    attempt.transport.take()
    attempt.server(NO_AUTH)
    assert attempt.transport.take() == request_bytes


def test_username_password_exchange() -> None:
    attempt = Attempt(username="alice", password="s3cret")
    attempt.transport.take()
    attempt.server(b"\x05\x02")
    assert attempt.transport.take() == b"\x01\x05alice\x06s3cret"
    attempt.server(b"\x01\x00")
    assert attempt.transport.take() == REQUEST_WEB_TEST_80
    attempt.server(OK_REPLY)
    assert isinstance(attempt.result(), App)


def test_credentials_unused_when_server_needs_none() -> None:
    attempt = Attempt(username=b"alice", password=b"s3cret")
    attempt.transport.take()
    attempt.server(NO_AUTH)
    assert attempt.transport.take() == REQUEST_WEB_TEST_80


def test_authentication_failure() -> None:
    attempt = Attempt(username="alice", password="wrong")
    attempt.transport.take()
    attempt.server(b"\x05\x02")
    attempt.transport.take()
    attempt.server(b"\x01\x01")
    error = attempt.failure().value
    assert isinstance(error, AuthenticationFailed)
    assert error.status == 1
    assert attempt.transport.take() == b""  # no request after a refusal
    assert attempt.transport.disconnecting


def test_no_acceptable_methods() -> None:
    attempt = Attempt()
    attempt.server(b"\x05\xff")
    error = attempt.failure().value
    assert isinstance(error, NoAcceptableMethods)
    assert error.offered == (0,)
    assert "0x00" in str(error)
    assert attempt.transport.disconnecting


# --------------------------------------------------------------------------
# Replies


def test_success_fires_with_the_application_protocol() -> None:
    attempt = Attempt()
    app = attempt.handshake()
    assert isinstance(app, App)
    assert app.events == ["made"]
    transport = app.transport
    assert isinstance(transport, SOCKS5Transport)
    assert transport.bound == Address(AddressType.IPV4, "127.0.0.1", 50000)
    assert transport.target == Address(AddressType.DOMAIN, "web.test", 80)
    assert transport.getPeer() == HostnameAddress(b"web.test", 80)
    assert transport.getHost() == LOCAL
    assert transport.proxy_transport is attempt.transport
    assert not attempt.transport.disconnecting


@pytest.mark.parametrize(
    ("bound_bytes", "bound"),
    [
        (
            b"\x04" + b"\x00" * 15 + b"\x01\x04\x38",
            Address(AddressType.IPV6, "::1", 1080),
        ),
        (
            b"\x03\x0aproxy.test\x00\x50",
            Address(AddressType.DOMAIN, "proxy.test", 80),
        ),
    ],
)
def test_bound_address_of_every_type(bound_bytes: bytes, bound: Address) -> None:
    attempt = Attempt("::1", 443)
    app = attempt.handshake(b"\x05\x00\x00" + bound_bytes)
    assert app.transport.bound == bound
    assert app.transport.getPeer() == IPv6Address("TCP", "::1", 443)


def test_ipv4_target_peer_address() -> None:
    app = Attempt("127.0.0.1", 8080).handshake()
    assert app.transport.getPeer() == IPv4Address("TCP", "127.0.0.1", 8080)


@pytest.mark.parametrize(
    ("code", "error_class"),
    [
        (0x01, GeneralServerFailure),
        (0x02, ConnectionNotAllowed),
        (0x03, NetworkUnreachable),
        (0x04, HostUnreachable),
        (0x05, ConnectionRefused),
        (0x06, TTLExpired),
        (0x07, CommandNotSupported),
        (0x08, AddressTypeNotSupported),
    ],
)
def test_each_reply_code_raises_its_error(code: int, error_class: type) -> None:
    attempt = Attempt()
    attempt.handshake(b"\x05" + bytes((code,)) + b"\x00\x01\x00\x00\x00\x00\x00\x00")
    error = attempt.failure().value
    assert type(error) is error_class
    assert isinstance(error, SOCKS5ReplyError)
    assert isinstance(error, SOCKS5Error)
    assert error.code == code
    assert REPLY_ERRORS[code] is error_class
    assert ReplyCode(code).phrase in str(error)
    assert attempt.transport.disconnecting
    assert attempt.socks.app is None  # no application protocol was built


def test_registry_covers_every_failure_code() -> None:
    assert sorted(REPLY_ERRORS) == [c for c in ReplyCode if c != ReplyCode.SUCCEEDED]
    assert client.reply_error(0x05).__class__ is ConnectionRefused


@pytest.mark.parametrize("code", [0x09, 0xF1, 0xFF])
def test_unknown_reply_code_is_a_reply_error(code: int) -> None:
    attempt = Attempt()
    attempt.handshake(b"\x05" + bytes((code,)) + b"\x00\x01\x00\x00\x00\x00\x00\x00")
    error = attempt.failure().value
    assert type(error) is SOCKS5ReplyError
    assert error.code == code
    assert f"0x{code:02x}" in str(error)


def test_connect_errors_are_connect_errors() -> None:
    """Code handling ConnectError in general handles SOCKS failures too."""
    from twisted.internet.error import ConnectError

    assert issubclass(SOCKS5Error, ConnectError)
    assert str(ConnectionRefused()) == "SOCKS5 server replied 0x05: connection refused"


# --------------------------------------------------------------------------
# Framing: split and pipelined server bytes


def test_server_messages_byte_by_byte() -> None:
    attempt = Attempt(username="alice", password="s3cret")
    attempt.transport.take()
    script = [
        (b"\x05\x02", b"\x01\x05alice\x06s3cret"),
        (b"\x01\x00", REQUEST_WEB_TEST_80),
        (b"\x05\x00\x00\x03\x0aproxy.test\x04\x38", b""),
    ]
    for message, expected in script:
        for i in range(len(message)):
            assert attempt.transport.value() == b""
            assert attempt.pending
            attempt.server(message[i : i + 1])
        assert attempt.transport.take() == expected
    app = attempt.result()
    assert app.transport.bound == Address(AddressType.DOMAIN, "proxy.test", 1080)


SERVER_SCRIPT = b"\x05\x02" + b"\x01\x00" + b"\x05\x00\x00\x03\x0aproxy.test\x04\x38"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, len(SERVER_SCRIPT) + 8), max_size=12), st.binary())
def test_any_split_of_the_server_bytes(cuts: List[int], payload: bytes) -> None:
    """However the server's bytes are segmented, the outcome is the same."""
    stream = SERVER_SCRIPT + payload
    attempt = Attempt(username="alice", password="s3cret")
    start = 0
    for cut in [*sorted(cuts), len(stream)]:
        if cut > start:
            attempt.server(stream[start:cut])
            start = cut
    assert attempt.transport.value() == (
        b"\x05\x02\x00\x02" + b"\x01\x05alice\x06s3cret" + REQUEST_WEB_TEST_80
    )
    app = attempt.result()
    assert app.transport.bound == Address(AddressType.DOMAIN, "proxy.test", 1080)
    assert app.data == payload


def test_data_after_the_reply_reaches_the_application() -> None:
    attempt = Attempt()
    seen_at_connect: List[bytes] = []
    attempt.d.addCallback(lambda app: seen_at_connect.append(app.data) or app)
    app = attempt.handshake(OK_REPLY + b"HTTP/1.0 200 OK\r\n")
    assert app.data == b"HTTP/1.0 200 OK\r\n"
    # The caller has the protocol before its first bytes arrive.
    assert seen_at_connect == [b""]
    assert app.events == ["made", ("data", b"HTTP/1.0 200 OK\r\n")]
    attempt.server(b"more")
    assert app.data == b"HTTP/1.0 200 OK\r\nmore"


def test_everything_in_one_segment() -> None:
    """A server that answers ahead (method, status, reply, data at once)."""
    attempt = Attempt(username="alice", password="s3cret")
    attempt.transport.take()
    attempt.server(b"\x05\x02" + b"\x01\x00" + OK_REPLY + b"early")
    assert attempt.transport.take() == b"\x01\x05alice\x06s3cret" + REQUEST_WEB_TEST_80
    assert attempt.result().data == b"early"


def test_early_data_is_held_while_the_application_paused() -> None:
    attempt = Attempt(app=PausingApp)
    app = attempt.handshake(OK_REPLY + b"early")
    assert app.data == b""
    assert attempt.transport.producerState == "paused"
    app.transport.resumeProducing()
    assert attempt.transport.producerState == "producing"
    assert app.data == b"early"


def test_no_data_once_the_application_closed() -> None:
    """As on a socket: after loseConnection() nothing more is read."""
    attempt = Attempt()
    attempt.d.addCallback(lambda app: app.transport.loseConnection() or app)
    app = attempt.handshake(OK_REPLY + b"early")
    assert attempt.transport.disconnecting
    attempt.server(b"late")
    assert app.data == b""


def test_abort_from_the_application() -> None:
    app = Attempt().handshake()
    app.transport.abortConnection()
    assert app.transport.proxy_transport.aborted


def test_held_data_is_delivered_before_the_connection_ends() -> None:
    attempt = Attempt(app=PausingApp)
    app = attempt.handshake(OK_REPLY + b"early")
    attempt.socks.connectionLost(Failure(ConnectionDone()))
    assert app.events == ["made", ("data", b"early"), ("lost", ConnectionDone)]


# --------------------------------------------------------------------------
# Malformed servers


@pytest.mark.parametrize(
    ("script", "why"),
    [
        ([b"\x04\x00"], "version"),  # a SOCKS4 server
        ([b"\x05\x01"], "not offered"),  # GSSAPI, never offered
        ([b"\x05\x02"], "not offered"),  # user/pass without credentials
        ([NO_AUTH, b"\x04\x00\x00\x01" + b"\x00" * 6], "version"),
        ([NO_AUTH, b"\x04"], "version"),  # judged on its first byte
        ([NO_AUTH, b"\x05\x00\x00\x05" + b"\x00" * 6], "address type"),
        ([NO_AUTH, b"\x05\x00\x00\x03\x00\x00\x50"], "empty domain"),
        ([NO_AUTH, b"\x05\x00\x00\x03\x02\xff\xfe\x00\x50"], "UTF-8"),
    ],
)
def test_malformed_server_messages(script: List[bytes], why: str) -> None:
    attempt = Attempt()
    for message in script:
        attempt.server(message)
    error = attempt.failure().value
    assert isinstance(error, MalformedReply)
    assert why in str(error)
    assert attempt.transport.disconnecting


def test_malformed_auth_status() -> None:
    attempt = Attempt(username="alice", password="s3cret")
    attempt.server(b"\x05\x02")
    attempt.server(b"\x05\x00")  # a method selection where the status goes
    assert isinstance(attempt.failure().value, MalformedReply)


def test_bytes_after_a_failure_are_ignored() -> None:
    attempt = Attempt()
    attempt.server(b"\x05\xff" + b"\x05\x00" + OK_REPLY)
    assert isinstance(attempt.failure().value, NoAcceptableMethods)
    assert attempt.transport.take() == b"\x05\x01\x00"


@pytest.mark.parametrize(
    "script", [[], [NO_AUTH], [b"\x05\x02"], [NO_AUTH, OK_REPLY[:5]]]
)
def test_proxy_closing_during_the_handshake(script: List[bytes]) -> None:
    kwargs = {"username": "u", "password": "p"} if b"\x05\x02" in script else {}
    attempt = Attempt(**kwargs)
    for message in script:
        attempt.server(message)
    attempt.socks.connectionLost(Failure(ConnectionLost("reset")))
    error = attempt.failure().value
    assert isinstance(error, ProxyConnectionLost)
    assert error.reason.check(ConnectionLost)


def test_proxy_unreachable_is_the_proxy_endpoints_error() -> None:
    """Not our ConnectionRefused: that one means the *target* refused."""
    attempt = Attempt(complete=False)
    attempt.proxy.attempts[0][1].errback(ConnectionRefusedError())
    assert attempt.failure().check(ConnectionRefusedError)


# --------------------------------------------------------------------------
# Half-close and flow control pass through


def test_half_close_reaches_a_half_closeable_application() -> None:
    attempt = Attempt(app=HalfCloseApp)
    app = attempt.handshake()
    attempt.socks.readConnectionLost()
    assert app.events == ["made", "read closed"]
    assert not attempt.transport.disconnecting
    app.transport.write(b"still talking")
    app.transport.loseWriteConnection()
    assert attempt.transport.write_closed
    assert attempt.transport.value() == b"still talking"
    attempt.socks.writeConnectionLost()
    assert app.events[-1] == "write closed"


def test_eof_closes_an_application_that_cannot_half_close() -> None:
    """What Twisted does on EOF for a protocol without IHalfCloseableProtocol."""
    attempt = Attempt()
    app = attempt.handshake()
    attempt.socks.readConnectionLost()
    assert attempt.transport.disconnecting
    attempt.socks.writeConnectionLost()  # nobody to tell
    attempt.socks.connectionLost(Failure(ConnectionDone()))
    assert app.events == ["made", ("lost", ConnectionDone)]


def test_eof_during_the_handshake() -> None:
    attempt = Attempt()
    attempt.server(NO_AUTH)
    attempt.socks.readConnectionLost()
    error = attempt.failure().value
    assert isinstance(error, ProxyConnectionLost)
    assert error.reason.check(ConnectionDone)
    assert attempt.transport.disconnecting


def test_half_close_survives_the_proxy_endpoints_wrapper() -> None:
    """
    TCP endpoints wrap our protocol in a wrapper that decides once, when it
    is built, whether to pass half-close on: ours must say yes from the start.
    """
    reactor = MemoryReactorClock()
    proxy = TCP4ClientEndpoint(reactor, "127.0.0.1", 1080)
    results: List[Any] = []
    SOCKS5ClientEndpoint(proxy, "web.test", 80).connect(
        Factory.forProtocol(HalfCloseApp)
    ).addBoth(results.append)
    ((_, _, wrapping_factory, _, _),) = reactor.tcpClients
    wrapper = wrapping_factory.buildProtocol(PROXY)
    transport = ProxyTransport()
    wrapper.makeConnection(transport)
    assert IHalfCloseableProtocol.providedBy(wrapper)
    wrapper.dataReceived(NO_AUTH + OK_REPLY)
    (app,) = results
    wrapper.readConnectionLost()
    assert app.events == ["made", "read closed"]


def test_eof_with_held_data_delivers_data_first() -> None:
    class Half(HalfCloseApp, PausingApp):
        pass

    attempt = Attempt(app=Half)
    app = attempt.handshake(OK_REPLY + b"last words")
    attempt.socks.readConnectionLost()
    assert app.events == ["made", ("data", b"last words"), "read closed"]


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.state = "producing"

    def pauseProducing(self) -> None:
        self.state = "paused"

    def resumeProducing(self) -> None:
        self.state = "producing"

    def stopProducing(self) -> None:
        self.state = "stopped"


def test_producer_registration_passes_through() -> None:
    attempt = Attempt()
    app = attempt.handshake()
    producer = Producer()
    app.transport.registerProducer(producer, True)
    assert attempt.transport.producer is producer
    assert attempt.transport.streaming
    app.transport.write(b"x")
    app.transport.writeSequence([b"y", b"z"])
    assert attempt.transport.take() == b"xyz"
    app.transport.unregisterProducer()
    assert attempt.transport.producer is None


def test_application_transport_provides_what_the_proxy_transport_does() -> None:
    app = Attempt().handshake()
    for interface in (ITCPTransport,):
        assert interface.providedBy(app.transport) == interface.providedBy(
            app.transport.proxy_transport
        )
    assert "web.test:80" in repr(app.transport)


def test_connection_lost_after_connect_reaches_the_application() -> None:
    attempt = Attempt()
    app = attempt.handshake()
    attempt.socks.connectionLost(Failure(ConnectionLost()))
    assert app.events[-1] == ("lost", ConnectionLost)
    assert attempt.result() is app  # no second result


# --------------------------------------------------------------------------
# The application factory


def test_factory_returning_none() -> None:
    proxy = FakeProxy()
    endpoint = SOCKS5ClientEndpoint(proxy, "web.test", 80)

    class Nothing(Factory):
        def buildProtocol(self, addr: Any) -> None:  # type: ignore[override]
            return None

    results: List[Any] = []
    endpoint.connect(Nothing()).addBoth(results.append)
    _, transport = proxy.complete()
    transport.protocol.dataReceived(NO_AUTH + OK_REPLY)
    assert results[0].check(NoProtocol)
    assert transport.disconnecting


def test_factory_gets_the_target_address() -> None:
    seen: List[Any] = []

    class Recording(Factory):
        protocol = App

        def buildProtocol(self, addr: Any) -> Any:
            seen.append(addr)
            return super().buildProtocol(addr)

    proxy = FakeProxy()
    SOCKS5ClientEndpoint(proxy, "::1", 443).connect(Recording())
    _, transport = proxy.complete()
    transport.protocol.dataReceived(NO_AUTH + OK_REPLY)
    assert seen == [IPv6Address("TCP", "::1", 443)]


def test_application_connection_made_raising() -> None:
    class Broken(App):
        def connectionMade(self) -> None:
            raise RuntimeError("boom")

    attempt = Attempt(app=Broken)
    attempt.handshake()
    assert attempt.failure().check(RuntimeError)
    assert attempt.transport.aborted


# --------------------------------------------------------------------------
# Cancel and timeout


def test_cancel_while_reaching_the_proxy() -> None:
    attempt = Attempt(complete=False)
    attempt.d.cancel()
    assert attempt.failure().check(defer.CancelledError)
    assert attempt.proxy.cancelled == 1


def test_cancel_during_the_handshake() -> None:
    attempt = Attempt()
    attempt.server(NO_AUTH)
    attempt.d.cancel()
    assert attempt.failure().check(defer.CancelledError)
    assert attempt.transport.aborted
    # Whatever comes later changes nothing.
    attempt.server(OK_REPLY + b"late")
    attempt.socks.connectionLost(Failure(ConnectionLost()))
    assert len(attempt.results) == 1
    assert attempt.socks.app is None


def test_cancel_after_connect_does_nothing() -> None:
    attempt = Attempt()
    app = attempt.handshake()
    attempt.d.cancel()
    assert attempt.result() is app
    assert not attempt.transport.aborted


def test_proxy_connection_completing_after_cancel_is_dropped() -> None:
    """An endpoint that cannot cancel still connects: hang up at once."""
    proxy = FakeProxy()
    factories: List[Any] = []
    original = proxy.connect

    def uncancellable(factory: Any) -> defer.Deferred[Any]:
        factories.append(factory)
        original(factory)
        return defer.Deferred()  # no canceller: cancel() only errbacks it

    proxy.connect = uncancellable  # type: ignore[method-assign]
    endpoint = SOCKS5ClientEndpoint(proxy, "web.test", 80)
    results: List[Any] = []
    d = endpoint.connect(Factory.forProtocol(App))
    d.addBoth(results.append)
    d.cancel()
    assert results[0].check(defer.CancelledError)
    assert factories[0].buildProtocol(PROXY) is None


def test_timeout_during_the_handshake() -> None:
    clock = MemoryReactorClock()
    attempt = Attempt(timeout=5, reactor=clock)
    attempt.server(NO_AUTH)
    clock.advance(4.9)
    assert attempt.pending
    clock.advance(0.1)
    error = attempt.failure().value
    assert isinstance(error, HandshakeTimeout)
    assert error.timeout == 5
    assert "5 s" in str(error)
    assert attempt.transport.aborted
    assert clock.getDelayedCalls() == []


def test_timeout_while_reaching_the_proxy() -> None:
    clock = MemoryReactorClock()
    attempt = Attempt(timeout=2.5, reactor=clock, complete=False)
    clock.advance(2.5)
    assert attempt.failure().check(HandshakeTimeout)
    assert attempt.proxy.cancelled == 1


def test_timer_cancelled_on_success_and_on_failure() -> None:
    clock = MemoryReactorClock()
    Attempt(timeout=5, reactor=clock).handshake()
    assert clock.getDelayedCalls() == []
    attempt = Attempt(timeout=5, reactor=clock)
    attempt.server(b"\x05\xff")
    assert attempt.failure().check(NoAcceptableMethods)
    assert clock.getDelayedCalls() == []


def test_user_cancel_with_a_timeout_is_still_a_cancel() -> None:
    clock = MemoryReactorClock()
    attempt = Attempt(timeout=5, reactor=clock)
    attempt.d.cancel()
    assert attempt.failure().check(defer.CancelledError)
    assert clock.getDelayedCalls() == []


# --------------------------------------------------------------------------
# Local resolution (only when a resolver is given)


@implementer(IHostnameResolver)
class FakeResolver:
    def __init__(self, *addresses: Any) -> None:
        self.addresses = addresses
        self.asked: List[str] = []

    def resolveHostName(
        self, receiver: IResolutionReceiver, hostName: str, *a: Any, **kw: Any
    ) -> IResolutionReceiver:
        self.asked.append(hostName)
        receiver.resolutionBegan(None)  # type: ignore[arg-type]
        for address in self.addresses:
            receiver.addressResolved(address)
        receiver.resolutionComplete()
        return receiver


def test_names_go_to_the_proxy_by_default() -> None:
    attempt = Attempt("web.test", 80)
    attempt.server(NO_AUTH)
    assert attempt.transport.value().endswith(REQUEST_WEB_TEST_80)


def test_local_resolution_sends_the_first_address() -> None:
    resolver = FakeResolver(
        IPv6Address("TCP", "::1", 80), IPv4Address("TCP", "127.0.0.1", 80)
    )
    attempt = Attempt("web.test", 80, resolver=resolver)
    attempt.transport.take()
    attempt.server(NO_AUTH)
    assert attempt.transport.take() == (
        b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01\x00\x50"
    )
    assert resolver.asked == ["web.test"]


def test_local_resolution_skipped_for_literals() -> None:
    resolver = FakeResolver()
    Attempt("127.0.0.1", 80, resolver=resolver)
    assert resolver.asked == []


def test_local_resolution_failure() -> None:
    attempt = Attempt("nowhere.test", 80, resolver=FakeResolver(), complete=False)
    assert attempt.failure().check(DNSLookupError)
    assert attempt.proxy.attempts == []


# --------------------------------------------------------------------------
# Construction


@pytest.mark.parametrize(
    "kwargs",
    [
        {"host": "web.test", "port": 65536},
        {"host": "web.test", "port": -1},
        {"host": "", "port": 80},
        {"host": "a" * 256, "port": 80},
        {"host": "web.test", "port": 80, "username": "alice"},
        {"host": "web.test", "port": 80, "username": "", "password": "x"},
        {"host": "web.test", "port": 80, "username": "a", "password": "x" * 256},
        {"host": "web.test", "port": 80, "timeout": 0},
        {"host": "web.test", "port": 80, "timeout": float("nan")},
        {"host": "web.test", "port": 80, "timeout": float("inf")},
        {"host": "web.test", "port": 80, "trust_root": "/etc/ssl/certs"},
    ],
)
def test_bad_arguments_fail_early(kwargs: Any) -> None:
    with pytest.raises(ValueError):
        SOCKS5ClientEndpoint(FakeProxy(), **kwargs)


def test_repr_never_shows_the_password() -> None:
    endpoint = SOCKS5ClientEndpoint(
        FakeProxy(), "web.test", 80, username="alice", password="s3cret"
    )
    assert "alice" in repr(endpoint)
    assert "s3cret" not in repr(endpoint)
    assert endpoint.username == b"alice"


def test_endpoint_provides_the_interface() -> None:
    assert IStreamClientEndpoint.providedBy(
        SOCKS5ClientEndpoint(FakeProxy(), "web.test", 80)
    )


# --------------------------------------------------------------------------
# In memory against our own server (iosim)


@implementer(IStreamClientEndpoint)
class IOSimProxy:
    """Connects the client, in memory, to an instance of our server."""

    def __init__(self, server_factory: SOCKS5ServerFactory) -> None:
        self.server_factory = server_factory
        self.pump: Optional[iosim.IOPump] = None

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[Any]:
        client_protocol = factory.buildProtocol(PROXY)
        server_protocol = self.server_factory.buildProtocol(LOCAL)
        self.pump = iosim.connect(
            server_protocol,
            iosim.FakeTransport(server_protocol, isServer=True),
            client_protocol,
            iosim.FakeTransport(client_protocol, isServer=False),
        )
        return defer.succeed(client_protocol)


def test_round_trip_with_our_server_in_memory() -> None:
    connector = FakeConnector()
    server = SOCKS5ServerFactory(reactor=MemoryReactorClock(), connector=connector)
    proxy = IOSimProxy(server)
    results: List[Any] = []
    SOCKS5ClientEndpoint(proxy, "web.test", 80).connect(
        Factory.forProtocol(App)
    ).addBoth(results.append)
    assert proxy.pump is not None
    proxy.pump.flush()
    ((address, _, _),) = connector.calls
    assert address == Address(AddressType.DOMAIN, "web.test", 80)
    outbound, target = connector.succeed()
    proxy.pump.flush()
    (app,) = results
    assert isinstance(app, App)
    assert app.transport.bound == Address(AddressType.IPV4, "127.0.0.1", 50000)
    app.transport.write(b"GET / HTTP/1.0\r\n\r\n")
    proxy.pump.flush()
    assert target.value() == b"GET / HTTP/1.0\r\n\r\n"
    outbound.dataReceived(b"HTTP/1.0 200 OK\r\n")
    proxy.pump.flush()
    assert app.data == b"HTTP/1.0 200 OK\r\n"


# --------------------------------------------------------------------------
# The clientFromString plugin


def test_plugin_is_discovered() -> None:
    prefixes = [
        p.prefix for p in getPlugins(IStreamClientEndpointStringParserWithReactor)
    ]
    assert "socks5" in prefixes


def test_plugin_module_imports_cheaply() -> None:
    """Twisted imports it on every plugin lookup: it must not pull the client in."""
    code = (
        "import sys, twisted.plugins.socks5_endpoints\n"
        "print(sorted(m for m in sys.modules if m.startswith('twisted_socks5')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def parse(description: str) -> SOCKS5ClientEndpoint:
    endpoint = clientFromString(MemoryReactorClock(), description)
    assert isinstance(endpoint, SOCKS5ClientEndpoint)
    return endpoint


@pytest.mark.parametrize(
    "description",
    [
        r"socks5:host=web.test:port=80:proxy=tcp\:127.0.0.1\:1080",
        r"socks5:web.test:80:proxy=tcp\:127.0.0.1\:1080",
        r"socks5:web.test:port=80:proxy=tcp\:host=127.0.0.1\:port=1080",
    ],
)
def test_parse_nested_proxy_description(description: str) -> None:
    endpoint = parse(description)
    assert endpoint.target == Address(AddressType.DOMAIN, "web.test", 80)
    proxy = endpoint.proxy_endpoint
    assert isinstance(proxy, TCP4ClientEndpoint)
    assert (proxy._host, proxy._port) == ("127.0.0.1", 1080)
    assert endpoint.timeout is None
    assert endpoint.username is None
    assert endpoint.resolver is None


def test_parse_everything() -> None:
    endpoint = parse(
        r"socks5:\:\:1:443:proxy_host=\:\:1:proxy_port=1081"
        r":user=alice:password=pa\:ss:timeout=2.5:resolve=remote"
    )
    assert endpoint.target == Address(AddressType.IPV6, "::1", 443)
    proxy = endpoint.proxy_endpoint
    assert isinstance(proxy, HostnameEndpoint)
    assert (proxy._hostText, proxy._port) == ("::1", 1081)
    assert endpoint.username == b"alice"
    assert endpoint._credentials is not None
    assert endpoint._credentials.password == b"pa:ss"
    assert endpoint.timeout == 2.5


def test_parse_proxy_port_defaults_to_1080() -> None:
    proxy = parse("socks5:web.test:80:proxy_host=127.0.0.1").proxy_endpoint
    assert isinstance(proxy, HostnameEndpoint)
    assert proxy._port == 1080


def test_parse_local_resolution_uses_the_reactors_resolver() -> None:
    reactor = MemoryReactorClock()
    if not hasattr(reactor, "nameResolver"):  # Twisted < 25.5's memory reactor
        reactor.nameResolver = object()  # type: ignore[attr-defined]
    endpoint = clientFromString(
        reactor, "socks5:web.test:80:proxy_host=127.0.0.1:resolve=local"
    )
    assert endpoint.resolver is reactor.nameResolver


def test_parse_nested_ipv6_and_unix_proxies() -> None:
    """The escaping the plugin's docstring documents."""
    proxy = parse(r"socks5:web.test:80:proxy=tcp\:\\\:\\\:1\:1080").proxy_endpoint
    assert isinstance(proxy, TCP4ClientEndpoint)
    assert (proxy._host, proxy._port) == ("::1", 1080)
    proxy = parse(r"socks5:web.test:80:proxy=unix\:/run/socks.sock").proxy_endpoint
    assert isinstance(proxy, UNIXClientEndpoint)
    assert proxy._path == "/run/socks.sock"


def test_parse_bytes_description() -> None:
    endpoint = clientFromString(
        MemoryReactorClock(), rb"socks5:web.test:80:proxy=tcp\:127.0.0.1\:1080"
    )
    assert endpoint.target == Address(AddressType.DOMAIN, "web.test", 80)


def test_parsed_endpoint_connects_through_its_proxy() -> None:
    reactor = MemoryReactorClock()
    endpoint = clientFromString(
        reactor, r"socks5:web.test:80:proxy=tcp\:127.0.0.1\:1080:timeout=3"
    )
    endpoint.connect(Factory.forProtocol(App))
    ((host, port, _, timeout, _),) = reactor.tcpClients
    assert (host, port) == ("127.0.0.1", 1080)
    assert [call.getTime() for call in reactor.getDelayedCalls()] == [3.0]


@pytest.mark.parametrize(
    ("description", "message"),
    [
        ("socks5:web.test:80", "proxy is required"),
        ("socks5:web.test:proxy_host=127.0.0.1", "port is required"),
        ("socks5:port=80:proxy_host=127.0.0.1", "host is required"),
        ("socks5:web.test:80:1:proxy_host=127.0.0.1", "at most two"),
        ("socks5:web.test:80:host=x.test:proxy_host=127.0.0.1", "host given twice"),
        ("socks5:web.test:http:proxy_host=127.0.0.1", "must be a number"),
        ("socks5:web.test:0:proxy_host=127.0.0.1", "out of range"),
        ("socks5:web.test:80:proxy_host=127.0.0.1:proxy_port=99999", "out of range"),
        (
            r"socks5:web.test:80:proxy=tcp\:127.0.0.1\:1080:proxy_host=127.0.0.1",
            "not both",
        ),
        ("socks5:web.test:80:proxy_host=127.0.0.1:timeout=soon", "timeout"),
        ("socks5:web.test:80:proxy_host=127.0.0.1:timeout=-1", "positive"),
        ("socks5:web.test:80:proxy_host=127.0.0.1:resolve=maybe", "resolve"),
        ("socks5:web.test:80:proxy_host=127.0.0.1:user=alice", "go together"),
        ("socks5:web.test:80:proxy_host=127.0.0.1:passwd=x", "unknown parameter"),
    ],
)
def test_parse_errors(description: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        clientFromString(MemoryReactorClock(), description)


# --------------------------------------------------------------------------
# Twisted's spellings, tls=true


def test_parse_camel_case_and_username() -> None:
    endpoint = parse(
        "socks5:web.test:80:proxyHost=127.0.0.1:proxyPort=1081"
        ":username=alice:password=s3cret"
    )
    proxy = endpoint.proxy_endpoint
    assert isinstance(proxy, HostnameEndpoint)
    assert (proxy._hostText, proxy._port) == ("127.0.0.1", 1081)
    assert endpoint.username == b"alice"


def test_parse_the_same_value_under_both_spellings() -> None:
    endpoint = parse("socks5:web.test:80:proxy_host=127.0.0.1:proxyHost=127.0.0.1")
    assert endpoint.proxy_endpoint._hostText == "127.0.0.1"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("description", "names"),
    [
        (
            "socks5:web.test:80:proxy_host=127.0.0.1:proxyHost=::1",
            "proxy_host.*proxyHost",
        ),
        (
            "socks5:web.test:80:proxyHost=h:proxyPort=1:proxy_port=2",
            "proxyPort.*proxy_port",
        ),
        (
            "socks5:web.test:80:proxyHost=h:user=a:username=b:password=p",
            "user.*username",
        ),
    ],
)
def test_parse_conflicting_spellings(description: str, names: str) -> None:
    with pytest.raises(ValueError, match=f"{names}.*different values"):
        clientFromString(MemoryReactorClock(), description)


def test_parse_tls_without_a_trust_root() -> None:
    endpoint = parse("socks5:web.test:443:proxyHost=127.0.0.1:tls=true")
    assert endpoint.tls is not None
    assert " tls " in repr(endpoint)
    assert parse("socks5:web.test:443:proxyHost=127.0.0.1:tls=no").tls is None
    assert parse("socks5:web.test:443:proxyHost=127.0.0.1").tls is None


@pytest.mark.parametrize("spelling", ["trustRoot", "trust_root"])
def test_parse_tls_with_a_trust_root(tmp_path: Any, spelling: str) -> None:
    from helpers import self_signed

    (tmp_path / "ca.pem").write_bytes(self_signed("web.test")[1])
    endpoint = parse(
        f"socks5:web.test:443:proxyHost=127.0.0.1:tls=TRUE:{spelling}={tmp_path}/ca.pem"
    )
    assert endpoint.tls is not None


@pytest.mark.parametrize(
    ("description", "message"),
    [
        ("socks5:web.test:443:proxyHost=h:tls=maybe", "tls must be true or false"),
        ("socks5:web.test:443:proxyHost=h:trustRoot=/x.pem", "needs tls=true"),
        (
            "socks5:web.test:443:proxyHost=h:tls=1:trustRoot=/nonexistent.pem",
            "cannot read",
        ),
        ("socks5:web.test:443:proxyHost=h:tls=1:trustRoot=", "empty"),
        ("socks5:web.test:443:proxyHost=h:timeout=nan", "finite"),
        ("socks5:web.test:443:proxyhost=h", "unknown parameter"),
    ],
)
def test_parse_tls_errors(description: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        clientFromString(MemoryReactorClock(), description)


def test_tls_wraps_the_application_in_tls() -> None:
    from twisted.protocols.tls import TLSMemoryBIOFactory

    proxy = FakeProxy()
    SOCKS5ClientEndpoint(proxy, "web.test", 443, tls=True).connect(
        Factory.forProtocol(App)
    )
    ((factory, _),) = proxy.attempts
    assert isinstance(factory.app_factory, TLSMemoryBIOFactory)  # type: ignore[attr-defined]


def test_tls_takes_a_connection_creator() -> None:
    from twisted.internet.ssl import CertificateOptions, optionsForClientTLS

    creator = optionsForClientTLS("other.test")
    endpoint = SOCKS5ClientEndpoint(FakeProxy(), "web.test", 443, tls=creator)
    assert endpoint.tls is creator
    options = CertificateOptions()  # a context factory, as wrapClientTLS takes
    endpoint = SOCKS5ClientEndpoint(FakeProxy(), "web.test", 443, tls=options)  # type: ignore[arg-type]
    assert endpoint.tls is options
    with pytest.raises(TypeError):
        SOCKS5ClientEndpoint(FakeProxy(), "web.test", 443, tls="yes")  # type: ignore[arg-type]


#: Every parameter with more than one spelling, and a valid value for it.
ALIASED = {
    ("proxy_host", "proxyHost"): ("127.0.0.1", "::1"),
    ("proxy_port", "proxyPort"): ("1080", "1081"),
    ("user", "username"): ("alice", "bob"),
}


@settings(max_examples=200, deadline=None)
@given(choices=st.tuples(*[st.sampled_from(["first", "second", "both"])] * 3))
def test_any_spelling_gives_the_same_endpoint(choices: Tuple[str, ...]) -> None:
    kwargs = {"host": "web.test", "port": "80", "password": "pw"}
    for (names, (value, _)), choice in zip(ALIASED.items(), choices):
        for i, name in enumerate(names):
            if choice == "both" or choice == ("first", "second")[i]:
                kwargs[name] = value
    endpoint = client.endpoint_from_description(MemoryReactorClock(), **kwargs)
    proxy = endpoint.proxy_endpoint
    assert (proxy._hostText, proxy._port) == ("127.0.0.1", 1080)  # type: ignore[attr-defined]
    assert endpoint.username == b"alice"


@settings(max_examples=100, deadline=None)
@given(which=st.sampled_from(sorted(ALIASED)), order=st.booleans())
def test_two_spellings_that_disagree_are_refused(
    which: Tuple[str, str], order: bool
) -> None:
    kwargs = {"host": "web.test", "port": "80", "proxy_host": "127.0.0.1"}
    kwargs.update({"user": "alice", "password": "pw"})
    first, second = which if order else which[::-1]
    for name in which:
        kwargs.pop(name, None)
    kwargs[first], kwargs[second] = ALIASED[which]
    with pytest.raises(ValueError, match=f"{first}= and {second}=.*different values"):
        client.endpoint_from_description(MemoryReactorClock(), **kwargs)


_KEYS = sorted(set(client._CANONICAL) - {"proxy", "trust_root"})


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(_KEYS) | st.text(max_size=12),
        st.text(max_size=40) | st.binary(max_size=40).map(lambda b: b.hex()),
        max_size=10,
    )
)
def test_any_parameters_parse_or_raise_value_error(kwargs: Dict[str, str]) -> None:
    """Whatever the description holds, the parser answers ValueError or an endpoint."""
    try:
        endpoint = client.endpoint_from_description(MemoryReactorClock(), **kwargs)
    except ValueError:
        return
    assert isinstance(endpoint, SOCKS5ClientEndpoint)
