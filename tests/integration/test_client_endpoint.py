"""
The SOCKS5 client endpoint on real sockets, against our server and against
peer servers from Debian (microsocks, dante-server), all on loopback.

Every target here is an IP literal or a ``*.test`` name that our server
resolves with the LoopbackResolver; the peers get IP literals only, since
they would ask the system resolver.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
from typing import Any, Callable, Iterator, List, Optional

import pytest
import pytest_twisted
from conftest import HAS_IPV6, LOOPBACKS, HashSink, Source, closed_port
from helpers import self_signed
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer, protocol, reactor, ssl, task
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    clientFromString,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.error import ConnectionRefusedError as TCPConnectionRefused
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IPushProducer,
    IStreamClientEndpoint,
)
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from twisted_socks5.auth import UsernamePasswordAuthenticator
from twisted_socks5.client import (
    AuthenticationFailed,
    ConnectionNotAllowed,
    ConnectionRefused,
    HandshakeTimeout,
    HostUnreachable,
    NoAcceptableMethods,
    SOCKS5ClientEndpoint,
    SOCKS5Transport,
)
from twisted_socks5.codec import AddressType
from twisted_socks5.testing import pattern_chunk, pattern_sha256

HELLO = b"hello through socks\n"


# --------------------------------------------------------------------------
# Helpers


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def to_proxy(host: str, port: int) -> IStreamClientEndpoint:
    """A plain TCP endpoint to a proxy on a loopback address."""
    if ":" in host:
        return TCP6ClientEndpoint(reactor, host, port)
    return TCP4ClientEndpoint(reactor, host, port)


def userpass(**users: str) -> UsernamePasswordAuthenticator:
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.users = {k.encode(): v.encode() for k, v in users.items()}
    return UsernamePasswordAuthenticator.from_checkers(checker)


@implementer(IAgentEndpointFactory)
class ThroughSOCKS:
    """An Agent endpoint factory: every request goes through the proxy."""

    def __init__(self, proxy: IStreamClientEndpoint, **kwargs: Any) -> None:
        self.proxy = proxy
        self.kwargs = kwargs

    def endpointForURI(self, uri: Any) -> SOCKS5ClientEndpoint:
        return SOCKS5ClientEndpoint(self.proxy, uri.host, uri.port, **self.kwargs)


async def fetch(proxy: IStreamClientEndpoint, url: str, **kwargs: Any) -> bytes:
    """GET ``url`` through ``proxy`` with Twisted's HTTP client."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent.usingEndpointFactory(reactor, ThroughSOCKS(proxy, **kwargs), pool)
    response = await within(agent.request(b"GET", url.encode("ascii")))
    assert response.code == 200
    body = Collect()
    response.deliverBody(body)
    return await within(body.done)


class Collect(protocol.Protocol):
    """Everything received until the connection ends."""

    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.data)


async def connect(endpoint: IStreamClientEndpoint, proto: Any) -> Any:
    return await within(connectProtocol(endpoint, proto))


async def within(d: defer.Deferred[Any], seconds: float = 30) -> Any:
    """Await ``d``, failing instead of hanging the suite if it never fires."""
    return await d.addTimeout(seconds, reactor)


# --------------------------------------------------------------------------
# Against our server


@pytest.mark.parametrize("proxy_host", LOOPBACKS)
@pytest.mark.parametrize("target", ["127.0.0.1", "::1", "web.test"])
@pytest_twisted.ensureDeferred
async def test_fetch_through_our_server(
    make_proxy: Any, http_target: Any, resolver: Any, proxy_host: str, target: str
) -> None:
    if target == "::1" and not HAS_IPV6:
        pytest.skip("no IPv6 loopback here")
    _, port = make_proxy(proxy_host)
    http_port = http_target.get(target, http_target["127.0.0.1"])
    body = await fetch(
        to_proxy(proxy_host, port), f"http://{url_host(target)}:{http_port}/"
    )
    assert body == HELLO
    # Names were resolved by the proxy, never here.
    assert resolver.asked == (["web.test"] if target == "web.test" else [])


@pytest_twisted.ensureDeferred
async def test_one_mebibyte_download(
    make_proxy: Any, http_target: Any, blob: bytes
) -> None:
    _, port = make_proxy()
    body = await fetch(
        to_proxy("127.0.0.1", port), f"http://web.test:{http_target['127.0.0.1']}/blob"
    )
    assert hashlib.sha256(body).digest() == hashlib.sha256(blob).digest()


@pytest_twisted.ensureDeferred
async def test_username_password_accepted(make_proxy: Any, http_target: Any) -> None:
    _, port = make_proxy(authenticators=[userpass(alice="s3cret")])
    url = f"http://web.test:{http_target['127.0.0.1']}/"
    proxy = to_proxy("127.0.0.1", port)
    assert await fetch(proxy, url, username="alice", password="s3cret") == HELLO


@pytest_twisted.ensureDeferred
async def test_username_password_rejected(make_proxy: Any, http_target: Any) -> None:
    _, port = make_proxy(authenticators=[userpass(alice="s3cret")])
    endpoint = SOCKS5ClientEndpoint(
        to_proxy("127.0.0.1", port),
        "web.test",
        http_target["127.0.0.1"],
        username="alice",
        password="wrong",
    )
    with pytest.raises(AuthenticationFailed) as caught:
        await connect(endpoint, Collect())
    assert caught.value.status != 0


@pytest_twisted.ensureDeferred
async def test_credentials_required_but_not_given(
    make_proxy: Any, http_target: Any
) -> None:
    _, port = make_proxy(authenticators=[userpass(alice="s3cret")])
    endpoint = SOCKS5ClientEndpoint(
        to_proxy("127.0.0.1", port), "web.test", http_target["127.0.0.1"]
    )
    with pytest.raises(NoAcceptableMethods):
        await connect(endpoint, Collect())


@pytest.mark.parametrize("proxy_host", LOOPBACKS)
@pytest_twisted.ensureDeferred
async def test_refused_target(make_proxy: Any, proxy_host: str) -> None:
    _, port = make_proxy(proxy_host)
    endpoint = SOCKS5ClientEndpoint(
        to_proxy(proxy_host, port), "127.0.0.1", closed_port()
    )
    with pytest.raises(ConnectionRefused) as caught:
        await connect(endpoint, Collect())
    assert caught.value.code == 0x05


@pytest_twisted.ensureDeferred
async def test_unresolvable_name(make_proxy: Any, resolver: Any) -> None:
    _, port = make_proxy()
    endpoint = SOCKS5ClientEndpoint(to_proxy("127.0.0.1", port), "nowhere.invalid", 80)
    with pytest.raises(HostUnreachable):
        await connect(endpoint, Collect())
    assert resolver.asked == ["nowhere.invalid"]


@pytest_twisted.ensureDeferred
async def test_unreachable_proxy_is_the_proxy_endpoints_error() -> None:
    endpoint = SOCKS5ClientEndpoint(
        to_proxy("127.0.0.1", closed_port()), "127.0.0.1", 80
    )
    with pytest.raises(TCPConnectionRefused):
        await connect(endpoint, Collect())


@implementer(IHalfCloseableProtocol)
class PeerRecorder(HashSink):
    """A HashSink that also records where its connection came from."""

    peers: List[Any] = []

    def connectionMade(self) -> None:
        super().connectionMade()
        PeerRecorder.peers.append(self.transport.getPeer())


@pytest_twisted.ensureDeferred
async def test_bound_address_is_where_the_target_sees_us(
    make_proxy: Any, tcp_target: Any
) -> None:
    PeerRecorder.peers = []
    _, port = make_proxy()
    target_port = tcp_target(PeerRecorder)
    app = Collect()
    await connect(
        SOCKS5ClientEndpoint(to_proxy("127.0.0.1", port), "127.0.0.1", target_port),
        app,
    )
    transport = app.transport
    assert isinstance(transport, SOCKS5Transport)
    (seen,) = PeerRecorder.peers
    assert transport.bound.type is AddressType.IPV4
    assert (transport.bound.host, transport.bound.port) == (seen.host, seen.port)
    assert transport.getPeer().port == target_port
    transport.loseConnection()
    await within(app.done)


# --------------------------------------------------------------------------
# Half-close and flow control through the tunnel


@implementer(IPushProducer, IHalfCloseableProtocol)
class Uploader(protocol.Protocol):
    """
    Sends ``size`` pattern bytes as a registered streaming producer, then
    half-closes and reads the answer; records how often it was paused.
    """

    def __init__(self, size: int) -> None:
        self.left = size
        self.counter = 0
        self.paused = True
        self.pauses = 0
        self.most_buffered = 0
        self.answer = b""
        self.events: List[str] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        raw = self.transport.proxy_transport
        while not self.paused and self.left > 0:
            chunk = pattern_chunk(self.counter)[: self.left]
            self.counter += 1
            self.left -= len(chunk)
            self.transport.write(chunk)
            pending = len(raw.dataBuffer) - raw.offset + raw._tempDataLen
            self.most_buffered = max(self.most_buffered, pending)
        if self.left <= 0 and self.transport.producer is not None:
            self.transport.unregisterProducer()
            self.transport.loseWriteConnection()

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def stopProducing(self) -> None:
        self.left = 0

    def dataReceived(self, data: bytes) -> None:
        self.answer += data

    def readConnectionLost(self) -> None:
        self.events.append("eof")
        # Both directions are done; Twisted leaves the full close to us.
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.events.append("write closed")

    def connectionLost(self, reason: Any = None) -> None:
        self.events.append("lost")
        self.done.callback(self.answer)


@pytest.mark.parametrize("proxy_host", LOOPBACKS)
@pytest_twisted.ensureDeferred
async def test_upload_then_half_close(
    make_proxy: Any, tcp_target: Any, proxy_host: str
) -> None:
    """The target answers only after our EOF: half-close must pass through."""
    size = 4 << 20
    _, port = make_proxy(proxy_host)
    endpoint = SOCKS5ClientEndpoint(
        to_proxy(proxy_host, port), "127.0.0.1", tcp_target(HashSink)
    )
    app = Uploader(size)
    await connect(endpoint, app)
    answer = await within(app.done)
    assert answer.decode() == pattern_sha256(size)
    assert app.events[:2] == ["write closed", "eof"]
    # The transport paused our producer: registration reached the socket.
    assert app.pauses > 0
    assert app.most_buffered <= (64 << 10) * 2


@implementer(IHalfCloseableProtocol)
class GreetThenListen(protocol.Protocol):
    """A target that says hello, sends EOF, and waits for the client's answer."""

    received: List[defer.Deferred[bytes]] = []

    def connectionMade(self) -> None:
        self.got = b""
        self.transport.write(b"hello")
        self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.got += data

    def readConnectionLost(self) -> None:
        GreetThenListen.received[-1].callback(self.got)
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class AnswerAfterEOF(protocol.Protocol):
    """Answers only once the other side has finished sending."""

    def __init__(self) -> None:
        self.got = b""
        self.events: List[str] = []
        self.done: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.got += data

    def readConnectionLost(self) -> None:
        self.events.append("eof")
        self.transport.write(b"you said " + self.got)
        self.transport.loseWriteConnection()

    def writeConnectionLost(self) -> None:
        self.events.append("write closed")
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.events.append("lost")
        self.done.callback(None)


async def _eof_from_the_target(proxy: IStreamClientEndpoint, port: int) -> None:
    target_got: defer.Deferred[bytes] = defer.Deferred()
    GreetThenListen.received = [target_got]
    app = AnswerAfterEOF()
    await connect(SOCKS5ClientEndpoint(proxy, "127.0.0.1", port), app)
    assert await within(target_got) == b"you said hello"
    await within(app.done)
    assert app.events == ["eof", "write closed", "lost"]


@pytest.mark.parametrize("proxy_host", LOOPBACKS)
@pytest_twisted.ensureDeferred
async def test_eof_from_the_target_reaches_the_application(
    make_proxy: Any, tcp_target: Any, proxy_host: str
) -> None:
    _, port = make_proxy(proxy_host)
    await _eof_from_the_target(to_proxy(proxy_host, port), tcp_target(GreetThenListen))


class SlowReader(protocol.Protocol):
    """Pauses the transport after every chunk and resumes on the next turn."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.hash = hashlib.sha256()
        self.received = 0
        self.pauses = 0
        self.reading_while_paused = 0
        self.done: defer.Deferred[str] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"%d\n" % self.size)

    def dataReceived(self, data: bytes) -> None:
        self.hash.update(data)
        self.received += len(data)
        self.transport.pauseProducing()
        self.pauses += 1
        raw = self.transport.proxy_transport
        if raw in reactor.getReaders():
            self.reading_while_paused += 1
        reactor.callLater(0, self.transport.resumeProducing)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.hash.hexdigest())


@pytest_twisted.ensureDeferred
async def test_pausing_the_application_transport_stops_reading(
    make_proxy: Any, tcp_target: Any
) -> None:
    size = 4 << 20
    _, port = make_proxy()
    app = SlowReader(size)
    await connect(
        SOCKS5ClientEndpoint(
            to_proxy("127.0.0.1", port), "127.0.0.1", tcp_target(Source)
        ),
        app,
    )
    assert await within(app.done) == pattern_sha256(size)
    assert app.pauses > 0
    assert app.reading_while_paused == 0


# --------------------------------------------------------------------------
# Other ways to reach the proxy


# Twisted's own TLS options still hand pyOpenSSL objects to pyOpenSSL.
@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_proxy_behind_tls(make_proxy: Any, http_target: Any) -> None:
    factory, _ = make_proxy()
    key_pem, cert_pem = self_signed("proxy.test")
    server_options = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem).options()
    tls_port = reactor.listenSSL(0, factory, server_options, interface="127.0.0.1")
    try:
        client_options = ssl.optionsForClientTLS(
            "proxy.test", trustRoot=ssl.Certificate.loadPEM(cert_pem)
        )
        proxy = wrapClientTLS(
            client_options,
            TCP4ClientEndpoint(reactor, "127.0.0.1", tls_port.getHost().port),
        )
        url = f"http://web.test:{http_target['127.0.0.1']}/"
        assert await fetch(proxy, url) == HELLO
    finally:
        await tls_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_proxy_chain(make_proxy: Any, http_target: Any) -> None:
    """A SOCKS5ClientEndpoint is an endpoint: it can lead to the next proxy."""
    first, first_port = make_proxy()
    second_host = "::1" if HAS_IPV6 else "127.0.0.1"
    second, second_port = make_proxy(second_host)
    hop = SOCKS5ClientEndpoint(
        to_proxy("127.0.0.1", first_port), second_host, second_port
    )
    app = Collect()
    await connect(SOCKS5ClientEndpoint(hop, "web.test", http_target["127.0.0.1"]), app)
    # Both relay: the first to the second proxy, the second to the target.
    assert [p.request.address.host for p in first.active] == [second_host]
    assert [p.request.address.host for p in second.active] == ["web.test"]
    app.transport.write(b"GET / HTTP/1.0\r\nHost: web.test\r\n\r\n")
    assert (await within(app.done)).endswith(HELLO)


@pytest_twisted.ensureDeferred
async def test_client_from_string(make_proxy: Any, http_target: Any) -> None:
    _, port = make_proxy()
    endpoint = clientFromString(
        reactor,
        rf"socks5:host=web.test:port={http_target['127.0.0.1']}"
        rf":proxy=tcp\:127.0.0.1\:{port}:timeout=10",
    )
    app = Collect()
    await connect(endpoint, app)
    app.transport.write(b"GET / HTTP/1.0\r\nHost: web.test\r\n\r\n")
    response = await within(app.done)
    assert response.startswith(b"HTTP/1.0 200")
    assert response.endswith(HELLO)


class Silent(protocol.Protocol):
    """A 'proxy' that accepts and never answers."""

    lost: List[defer.Deferred[None]] = []

    def connectionLost(self, reason: Any = None) -> None:
        Silent.lost[-1].callback(None)


@pytest_twisted.ensureDeferred
async def test_timeout_against_a_silent_proxy(tcp_target: Any) -> None:
    server_saw_close: defer.Deferred[None] = defer.Deferred()
    Silent.lost = [server_saw_close]
    endpoint = SOCKS5ClientEndpoint(
        to_proxy("127.0.0.1", tcp_target(Silent)), "127.0.0.1", 80, timeout=0.2
    )
    with pytest.raises(HandshakeTimeout):
        await connect(endpoint, Collect())
    await within(server_saw_close)  # the connection was really dropped


# --------------------------------------------------------------------------
# Peer servers from Debian, started here on 127.0.0.1


class PeerProcess(protocol.ProcessProtocol):
    """A peer server process: its last output and a way to wait for its end."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.output = b""
        self.ended = False
        self._waiters: List[defer.Deferred[None]] = []

    def outReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-16384:]

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended = True
        for waiter in self._waiters:
            waiter.callback(None)

    def wait(self) -> defer.Deferred[None]:
        if self.ended:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(d)
        return d

    def signal(self, name: str) -> None:
        if not self.ended:
            with contextlib.suppress(ProcessExitedAlready):
                self.transport.signalProcess(name)

    async def stop(self) -> None:
        self.signal("TERM")
        killer = reactor.callLater(5, self.signal, "KILL")
        await within(self.wait())
        if killer.active():
            killer.cancel()


def free_port() -> int:
    """A loopback port free right now (the peer binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_listening(peer: PeerProcess, port: int) -> bool:
    """Connect until the peer accepts (bounded); False if it exited first."""
    probe_endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2)
    for _ in range(250):
        if peer.ended:
            return False
        try:
            probe = await connectProtocol(probe_endpoint, protocol.Protocol())
        except TCPConnectionRefused:
            await task.deferLater(reactor, 0.02, lambda: None)
            continue
        probe.transport.abortConnection()
        return True
    raise AssertionError(f"{peer.name} never listened on 127.0.0.1:{port}")


@pytest.fixture
def peer_server() -> Iterator[Callable[..., Any]]:
    """Start a peer server: ``await start(name, argv_for_port)`` -> its port."""
    started: List[PeerProcess] = []

    async def start(name: str, argv_for_port: Callable[[int], List[str]]) -> int:
        for _ in range(3):  # the free port may be taken in between
            port = free_port()
            argv = argv_for_port(port)
            peer = PeerProcess(name)
            started.append(peer)
            reactor.spawnProcess(
                peer, argv[0], argv, env={"PATH": os.environ.get("PATH", "")}
            )
            if await wait_listening(peer, port):
                return port
        raise AssertionError(f"{name} did not start: {peer.output!r}")

    yield start
    for peer in started:
        pytest_twisted.blockon(defer.ensureDeferred(peer.stop()))


MICROSOCKS = shutil.which("microsocks")
DANTED = shutil.which("danted") or (
    "/usr/sbin/danted" if os.path.exists("/usr/sbin/danted") else None
)
needs_microsocks = pytest.mark.skipif(
    MICROSOCKS is None,
    reason="no microsocks (apt-get install microsocks)",
)
needs_dante = pytest.mark.skipif(
    DANTED is None, reason="no danted (apt-get install dante-server)"
)


def microsocks(user: Optional[str] = None, password: Optional[str] = None) -> Any:
    def argv(port: int) -> List[str]:
        args = [str(MICROSOCKS), "-i", "127.0.0.1", "-p", str(port)]
        if user is not None and password is not None:
            args += ["-u", user, "-P", password]
        return args

    return argv


#: Dante refuses this destination by rule (answering 0x02); never connected to.
DANTE_BLOCKED_PORT = 9


def dante(tmp_path: Any) -> Any:
    def argv(port: int) -> List[str]:
        externals = "external: 127.0.0.1\n" + ("external: ::1\n" if HAS_IPV6 else "")
        config = tmp_path / f"danted-{port}.conf"
        config.write_text(
            "logoutput: stderr\n"
            f"internal: 127.0.0.1 port = {port}\n"
            f"{externals}"
            "clientmethod: none\n"
            "socksmethod: none\n"
            "client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }\n"
            "socks block { from: 0.0.0.0/0 to: 127.0.0.1/32 "
            f"port = {DANTE_BLOCKED_PORT} }}\n"
            "socks pass { from: 127.0.0.0/8 to: 127.0.0.0/8 }\n"
            "socks pass { from: 127.0.0.0/8 to: ::1/128 }\n"
        )
        pid = tmp_path / f"danted-{port}.pid"
        return [str(DANTED), "-f", str(config), "-p", str(pid), "-N", "1"]

    return argv


PEER_TARGETS = ["127.0.0.1", pytest.param("::1", marks=LOOPBACKS[1].marks)]


@needs_microsocks
@pytest.mark.parametrize("target", PEER_TARGETS)
@pytest_twisted.ensureDeferred
async def test_microsocks_fetch(
    peer_server: Any, http_target: Any, target: str
) -> None:
    port = await peer_server("microsocks", microsocks())
    url = f"http://{url_host(target)}:{http_target[target]}/blob"
    body = await fetch(to_proxy("127.0.0.1", port), url)
    assert len(body) == 1 << 20


@needs_microsocks
@pytest_twisted.ensureDeferred
async def test_microsocks_username_password(peer_server: Any, http_target: Any) -> None:
    port = await peer_server("microsocks", microsocks("alice", "s3cret"))
    proxy = to_proxy("127.0.0.1", port)
    url = f"http://127.0.0.1:{http_target['127.0.0.1']}/"
    assert await fetch(proxy, url, username="alice", password="s3cret") == HELLO
    with pytest.raises(AuthenticationFailed):
        await fetch(proxy, url, username="alice", password="wrong")
    with pytest.raises(NoAcceptableMethods):
        await fetch(proxy, url)


@needs_microsocks
@pytest_twisted.ensureDeferred
async def test_microsocks_refused_target(peer_server: Any) -> None:
    port = await peer_server("microsocks", microsocks())
    endpoint = SOCKS5ClientEndpoint(
        to_proxy("127.0.0.1", port), "127.0.0.1", closed_port()
    )
    with pytest.raises(ConnectionRefused):
        await connect(endpoint, Collect())


@needs_dante
@pytest.mark.parametrize("target", PEER_TARGETS)
@pytest_twisted.ensureDeferred
async def test_dante_fetch(
    peer_server: Any, http_target: Any, tmp_path: Any, target: str
) -> None:
    port = await peer_server("danted", dante(tmp_path))
    url = f"http://{url_host(target)}:{http_target[target]}/blob"
    body = await fetch(to_proxy("127.0.0.1", port), url)
    assert len(body) == 1 << 20


@needs_dante
@pytest_twisted.ensureDeferred
async def test_dante_refusals(peer_server: Any, tmp_path: Any) -> None:
    port = await peer_server("danted", dante(tmp_path))
    proxy = to_proxy("127.0.0.1", port)
    with pytest.raises(ConnectionNotAllowed):
        await connect(
            SOCKS5ClientEndpoint(proxy, "127.0.0.1", DANTE_BLOCKED_PORT), Collect()
        )
    with pytest.raises(ConnectionRefused):
        await connect(
            SOCKS5ClientEndpoint(proxy, "127.0.0.1", closed_port()), Collect()
        )


@needs_dante
@pytest_twisted.ensureDeferred
async def test_dante_half_close(
    peer_server: Any, tcp_target: Any, tmp_path: Any
) -> None:
    port = await peer_server("danted", dante(tmp_path))
    proxy = to_proxy("127.0.0.1", port)
    await _eof_from_the_target(proxy, tcp_target(GreetThenListen))
    app = Uploader(1 << 20)
    await connect(SOCKS5ClientEndpoint(proxy, "127.0.0.1", tcp_target(HashSink)), app)
    assert (await within(app.done)).decode() == pattern_sha256(1 << 20)
