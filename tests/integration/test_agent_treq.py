"""
``socks5_agent`` with treq, and ``tls=true`` endpoints, on real sockets:
our server as the proxy, ``twisted.web`` servers (plain and TLS with a
throwaway certificate) as the origins, all on loopback.  Origins are named
``localhost`` (resolved by the proxy, through the loopback resolver) or
127.0.0.1.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List

import pytest
import pytest_twisted
import treq
from conftest import LOOPBACKS, closed_port, listen, needs_ipv6
from helpers import self_signed
from OpenSSL import SSL
from service_identity import VerificationError
from test_clients import userpass
from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    clientFromString,
    connectProtocol,
)
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived

from twisted_socks5.agent import socks5_agent
from twisted_socks5.client import (
    REPLY_ERRORS,
    AuthenticationFailed,
    ConnectionNotAllowed,
    ConnectionRefused,
    ProxyConnectionLost,
    SOCKS5ClientEndpoint,
)
from twisted_socks5.codec import Reply

HELLO = b"hello through the agent\n"

# Twisted's own TLS server options still hand pyOpenSSL objects to pyOpenSSL.
pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")


class _Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return HELLO

    def render_POST(self, request: Any) -> bytes:
        body: bytes = request.content.read()
        return b"got " + body


class CountingSite(server.Site):
    """A Site that counts the connections it accepted, and the requests."""

    noisy = False

    def __init__(self) -> None:
        super().__init__(_Hello())
        self.connections = 0
        self.requests: List[bytes] = []

    def buildProtocol(self, addr: Any) -> Any:
        self.connections += 1
        return super().buildProtocol(addr)

    def log(self, request: Any) -> None:
        self.requests.append(request.uri)


@pytest.fixture
def origin() -> Iterator[Dict[str, Any]]:
    """An HTTP and an HTTPS origin on 127.0.0.1, the certificate for localhost."""
    key_pem, cert_pem = self_signed("localhost")
    site = CountingSite()
    http = listen(site)
    tls_options = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem).options()
    https = reactor.listenSSL(0, site, tls_options, interface="127.0.0.1")
    yield {
        "site": site,
        "http": http.getHost().port,
        "https": https.getHost().port,
        "cert_pem": cert_pem,
    }
    for port in (http, https):
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def proxy_at(port: int) -> TCP4ClientEndpoint:
    return TCP4ClientEndpoint(reactor, "127.0.0.1", port)


async def within(d: Any, seconds: float = 30) -> Any:
    """Await ``d``, failing instead of hanging the suite if it never fires."""
    return await defer.ensureDeferred(d).addTimeout(seconds, reactor)


async def get(url: str, agent: Any) -> bytes:
    response = await within(treq.get(url, agent=agent))
    assert response.code == 200
    body: bytes = await within(response.content())
    return body


# --------------------------------------------------------------------------
# http and https


@pytest.mark.parametrize("proxy_host", LOOPBACKS)
@pytest_twisted.ensureDeferred
async def test_get_http(
    make_proxy: Any, origin: Any, resolver: Any, proxy_host: str
) -> None:
    _, port = make_proxy(proxy_host)
    if ":" in proxy_host:
        agent = socks5_agent(reactor, TCP6ClientEndpoint(reactor, proxy_host, port))
    else:  # the proxy as a description
        agent = socks5_agent(reactor, f"tcp:{proxy_host}:{port}")
    assert await get(f"http://localhost:{origin['http']}/", agent) == HELLO
    # The name went to the proxy, which resolved it (socks5h).
    assert resolver.asked == ["localhost"]


@needs_ipv6
@pytest_twisted.ensureDeferred
async def test_get_an_ipv6_literal(make_proxy: Any, http_target: Any) -> None:
    _, port = make_proxy()
    agent = socks5_agent(reactor, proxy_at(port))
    # The agent itself: treq's URL handling (hyperlink) refuses IPv6 literals.
    url = f"http://[::1]:{http_target['::1']}/"
    response = await within(agent.request(b"GET", url.encode("ascii")))
    assert response.code == 200
    assert await within(treq.content(response)) == b"hello through socks\n"


@pytest.mark.parametrize("given_as", ["certificate", "path"])
@pytest_twisted.ensureDeferred
async def test_get_https_verified_with_the_trust_root(
    make_proxy: Any, origin: Any, tmp_path: Any, given_as: str
) -> None:
    _, port = make_proxy()
    if given_as == "path":
        (tmp_path / "ca.pem").write_bytes(origin["cert_pem"])
        trust_root: Any = str(tmp_path / "ca.pem")
    else:
        trust_root = ssl.Certificate.loadPEM(origin["cert_pem"])
    agent = socks5_agent(reactor, proxy_at(port), trust_root=trust_root)
    assert await get(f"https://localhost:{origin['https']}/", agent) == HELLO


async def _unverified(agent: Any, url: str, site: CountingSite, error: type) -> None:
    with pytest.raises(ResponseNeverReceived) as caught:
        await within(treq.get(url, agent=agent))
    assert any(r.check(error) for r in caught.value.reasons), caught.value.reasons
    assert site.requests == []  # not one byte of the request was accepted


@pytest_twisted.ensureDeferred
async def test_https_fails_without_the_trust_root(make_proxy: Any, origin: Any) -> None:
    """The platform's trust store does not know the throwaway certificate."""
    _, port = make_proxy()
    agent = socks5_agent(reactor, proxy_at(port))
    url = f"https://localhost:{origin['https']}/"
    await _unverified(agent, url, origin["site"], SSL.Error)


@pytest_twisted.ensureDeferred
async def test_https_fails_for_another_host_name(make_proxy: Any, origin: Any) -> None:
    """Trusted certificate, but for localhost, not for 127.0.0.1."""
    _, port = make_proxy()
    root = ssl.Certificate.loadPEM(origin["cert_pem"])
    agent = socks5_agent(reactor, proxy_at(port), trust_root=root)
    url = f"https://127.0.0.1:{origin['https']}/"
    await _unverified(agent, url, origin["site"], VerificationError)


@pytest_twisted.ensureDeferred
async def test_post_with_a_body(make_proxy: Any, origin: Any) -> None:
    _, port = make_proxy()
    agent = socks5_agent(
        reactor, proxy_at(port), trust_root=ssl.Certificate.loadPEM(origin["cert_pem"])
    )
    for scheme in ("http", "https"):
        url = f"{scheme}://localhost:{origin[scheme]}/form"
        response = await within(treq.post(url, data=b"a=1&b=2", agent=agent))
        assert await within(response.content()) == b"got a=1&b=2"


# --------------------------------------------------------------------------
# Authentication, pooling


@pytest_twisted.ensureDeferred
async def test_username_password(make_proxy: Any, origin: Any) -> None:
    _, port = make_proxy(authenticators=[userpass(alice="s3cret")])
    url = f"http://localhost:{origin['http']}/"
    agent = socks5_agent(reactor, proxy_at(port), username="alice", password="s3cret")
    assert await get(url, agent) == HELLO
    wrong = socks5_agent(reactor, proxy_at(port), username="alice", password="nope")
    with pytest.raises(AuthenticationFailed):
        await within(treq.get(url, agent=wrong))


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest_twisted.ensureDeferred
async def test_a_persistent_pool_reuses_one_tunnel(
    make_proxy: Any, origin: Any, scheme: str
) -> None:
    factory, port = make_proxy()
    pool = HTTPConnectionPool(reactor)
    root = ssl.Certificate.loadPEM(origin["cert_pem"])
    agent = socks5_agent(reactor, proxy_at(port), pool=pool, trust_root=root)
    url = f"{scheme}://localhost:{origin[scheme]}/"
    try:
        assert await get(url, agent) == HELLO
        assert await get(url, agent) == HELLO
        assert origin["site"].connections == 1
        assert len(factory.active) == 1
    finally:
        await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_a_shared_pool_keeps_the_proxy_in_its_key(
    make_proxy: Any, origin: Any
) -> None:
    """
    A direct Agent's pooled connection never carries a proxied request, nor
    does a tunnel opened with one user's credentials carry another's; agents
    with the same proxy endpoint and settings share their tunnels.
    """
    factory, port = make_proxy()
    pool = HTTPConnectionPool(reactor)
    proxy = proxy_at(port)
    url = f"http://127.0.0.1:{origin['http']}/"

    async def through(**kwargs: Any) -> int:
        assert (
            await get(url, socks5_agent(reactor, proxy, pool=pool, **kwargs)) == HELLO
        )
        return int(origin["site"].connections)

    try:
        assert await get(url, Agent(reactor, pool=pool)) == HELLO
        assert await through() == 2
        assert len(factory.active) == 1
        assert await through() == 2  # another agent, the same way out
        assert await through(username="bob", password="x") == 3
        assert await through(username="bob", password="y") == 4
        assert await through(username="bob", password="x") == 4
    finally:
        await pool.closeCachedConnections()


# --------------------------------------------------------------------------
# Failures


@pytest_twisted.ensureDeferred
async def test_refused_destination(make_proxy: Any) -> None:
    _, port = make_proxy()
    agent = socks5_agent(reactor, proxy_at(port))
    with pytest.raises(ConnectionRefused):
        await within(treq.get(f"http://127.0.0.1:{closed_port()}/", agent=agent))


@pytest_twisted.ensureDeferred
async def test_destination_the_rules_deny(make_proxy: Any, origin: Any) -> None:
    from twisted_socks5.rules import RuleSet

    rules = RuleSet.parse("deny to localhost\ndefault allow\n", "agent.rules")
    _, port = make_proxy(policy=rules)
    agent = socks5_agent(reactor, proxy_at(port))
    with pytest.raises(ConnectionNotAllowed):
        await within(treq.get(f"http://localhost:{origin['http']}/", agent=agent))
    assert origin["site"].connections == 0


class ScriptedProxy(protocol.Protocol):
    """Accepts any greeting with no authentication, then answers ``reply``."""

    reply = b""

    def __init__(self) -> None:
        self.greeted = False

    def dataReceived(self, data: bytes) -> None:
        if not self.greeted:
            self.greeted = True
            self.transport.write(b"\x05\x00")
            return
        if self.reply:
            self.transport.write(self.reply)
        self.transport.loseConnection()


@pytest.mark.parametrize("code", sorted(REPLY_ERRORS))
@pytest_twisted.ensureDeferred
async def test_each_refusal_reply_raises_its_error(code: int) -> None:
    ScriptedProxy.reply = Reply(code).to_bytes()
    port = listen(protocol.Factory.forProtocol(ScriptedProxy))
    try:
        agent = socks5_agent(reactor, proxy_at(port.getHost().port))
        with pytest.raises(REPLY_ERRORS[code]):
            await within(treq.get("http://localhost/", agent=agent))
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_proxy_closing_mid_handshake() -> None:
    ScriptedProxy.reply = b""
    port = listen(protocol.Factory.forProtocol(ScriptedProxy))
    try:
        agent = socks5_agent(reactor, proxy_at(port.getHost().port))
        with pytest.raises(ProxyConnectionLost):
            await within(treq.get("http://localhost/", agent=agent))
    finally:
        await port.stopListening()


# --------------------------------------------------------------------------
# tls=true on the endpoint and in socks5: strings


class Response(protocol.Protocol):
    """Sends an HTTP/1.0 GET, collects the answer until the connection ends."""

    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.reason = reason
        self.done.callback(self.data)


@pytest_twisted.ensureDeferred
async def test_tls_true_in_an_endpoint_string(
    make_proxy: Any, origin: Any, tmp_path: Any
) -> None:
    _, port = make_proxy(authenticators=[userpass(alice="s3cret")])
    (tmp_path / "ca.pem").write_bytes(origin["cert_pem"])
    endpoint = clientFromString(
        reactor,
        f"socks5:localhost:{origin['https']}:proxyHost=127.0.0.1:proxyPort={port}"
        f":username=alice:password=s3cret:tls=true:trustRoot={tmp_path}/ca.pem",
    )
    app = Response()
    await within(connectProtocol(endpoint, app))
    answer = await within(app.done)
    assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(HELLO)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
@pytest_twisted.ensureDeferred
async def test_tls_true_unverified_gets_nothing(
    make_proxy: Any, origin: Any, host: str
) -> None:
    """Untrusted (no trust root), or trusted but for another name: closed."""
    _, port = make_proxy()
    root = ssl.Certificate.loadPEM(origin["cert_pem"])
    endpoint = SOCKS5ClientEndpoint(
        proxy_at(port),
        host,
        origin["https"],
        tls=True,
        trust_root=root if host == "127.0.0.1" else None,
    )
    app = Response()
    await within(connectProtocol(endpoint, app))
    assert await within(app.done) == b""
    assert app.reason.check(SSL.Error if host == "localhost" else VerificationError)
    assert origin["site"].requests == []
